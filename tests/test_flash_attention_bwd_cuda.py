"""flash_attention backward on CUDA against autograd through tfkernels.reference.

fp16/bf16: dq, dk, dv meet the FlashAttention rule (tests/utils.assert_flash_rule)
against autograd of the reference on float32 copies, with autograd of the
reference in the input dtype as the low-precision yardstick. fp32: against the
float64 reference, within a few times the float32 reference's own error.
Gradients start NaN-poisoned (conftest sets TFKERNELS_POISON_OUTPUTS=1), so an
element the kernels forget to write fails.

The grid covers each feature along its own axis (head dims x dtypes; square
lengths x masks; rectangular shapes x alignments; GQA; seqlens_k; layouts; both
dQ modes), not the full product. Determinism: deterministic=True is bitwise
reproducible; the default (fp32 atomics) mode stays within 2x the arithmetic
noise over 100 runs. Every test runs on a GPU ("cuda") and on the emulated device
("emu", tests/devices.py), except those that need CUDA itself (graphs, streams) or
sizes that take minutes under emulation (marked `gpu_only`). Small cases are also
marked `sanitize` for compute-sanitizer runs.
"""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .attention_cuda_cases import ALL_HEAD_DIMS, HALF_DTYPES, MASK_IDS, MASKS, no_tf32  # noqa: F401 (fixture)
from .attention_cuda_cases import make_qkv as _qkv
from .attention_cuda_cases import misaligned_qkv
from .utils import assert_flash_rule, max_abs_err

NO_VARIANTS = (-1, -1, 0.0, None, 0.0, None)  # window_left/right, softcap, sinks, dropout_p, rng_state

sanitize = pytest.mark.sanitize
gpu_only = pytest.mark.gpu_only  # minutes per case on the emulated device
# The emulated quick grid (make test): every instantiation and dQ mode once, odd shapes.
quick = pytest.mark.emu_quick


def _kernel_grads(q, k, v, dout, grad_lse=None, deterministic=False, **kw):
    """dq, dk, dv through tfkernels.flash_attention's autograd (which calls the
    flash_attention_bwd op with grad_lse and deterministic)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = tfkernels.flash_attention(*leaves, return_lse=True, deterministic=deterministic, **kw)
    outputs, grads = [out], [dout]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    return torch.autograd.grad(outputs, leaves, grads)


def _reference_grads(q, k, v, dout, grad_lse=None, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = reference.flash_attention(*leaves, return_lse=True, **kw)
    outputs, grads = [out], [dout.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    return torch.autograd.grad(outputs, leaves, grads)


def _run_and_check(q, k, v, grad_lse=None, deterministic=False, **kw):
    dout = torch.randn_like(q)
    grads = _kernel_grads(q, k, v, dout, grad_lse, deterministic, **kw)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
    if q.dtype == torch.float32:
        hi = _reference_grads(*[t.double() for t in (q, k, v, dout)], grad_lse, **kw)
        ref32 = _reference_grads(q, k, v, dout, grad_lse, **kw)
        for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, ref32):
            assert not torch.isnan(g).any(), f"{name}: contains NaN"
            err, ref_err = max_abs_err(g, h), max_abs_err(r, h)
            mag = float(h.abs().max()) if h.numel() else 1.0
            assert err <= max(8 * ref_err, 1e-5 * max(mag, 1.0)), \
                f"fp32 {name}: max error {err:.3e} (fp32 reference {ref_err:.3e})"
    else:
        hi = _reference_grads(*[t.float() for t in (q, k, v, dout)], grad_lse, **kw)
        low = _reference_grads(q, k, v, dout, grad_lse, **kw)
        for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, low):
            assert_flash_rule(g, h, r, name=name)
    return grads


# --------------------------------------------------------------------------- head dims x dtypes


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_head_dims(cuda_device, head_dim, dtype):
    q, k, v = _qkv(cuda_device, 2, 3, 3, 113, 203, head_dim, dtype)
    _run_and_check(q, k, v)


@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_head_dims_small(cuda_device, head_dim, dtype):
    # Every instantiation on one query tile, cheap enough for the quick emulated grid:
    # Sq 17 against Sk 70 (a partial second key tile), GQA, causal bottom_right; the
    # dQ mode alternates with the dtype.
    q, k, v = _qkv(cuda_device, 1, 2, 1, 17, 70, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 128, 256])
def test_head_dims_causal_deterministic(cuda_device, head_dim, dtype):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 200, 257, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=True)


# --------------------------------------------------------------------------- sequence lengths


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("seqlen", [pytest.param(1, marks=quick), pytest.param(17, marks=quick), 97, 128, 200, 257,
                                    pytest.param(1023, marks=gpu_only),
                                    pytest.param(2048, marks=gpu_only)])
def test_square_seqlens(cuda_device, seqlen, mask):
    is_causal, alignment = mask
    head_dim = {1: 64, 17: 32, 97: 96, 128: 128, 200: 80, 257: 160, 1023: 64, 2048: 128}[seqlen]
    dtype = torch.float16 if seqlen % 2 else torch.bfloat16
    batch = 2 if seqlen <= 257 else 1
    q, k, v = _qkv(cuda_device, batch, 2, 2, seqlen, seqlen, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment, deterministic=seqlen in (97, 1023))


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k",
                         [pytest.param(17, 130, marks=quick), pytest.param(130, 17, marks=quick),
                          (113, 203), (128, 217), (108, 256), (256, 512), (512, 256),
                          pytest.param(1023, 1024, marks=gpu_only), pytest.param(1024, 1023, marks=gpu_only)])
def test_rectangular(cuda_device, seqlen_q, seqlen_k, mask):
    is_causal, alignment = mask
    dtype = torch.bfloat16 if seqlen_q % 2 else torch.float16
    head_dim = 64 if seqlen_q < 1000 else 128
    q, k, v = _qkv(cuda_device, 2, 2, 2, seqlen_q, seqlen_k, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment,
                   deterministic=(seqlen_q + seqlen_k) % 3 == 0)


@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim", [(300, 257, 224), (97, 160, 192), (257, 300, 160)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_large_head_dims_causal_rectangular(cuda_device, seqlen_q, seqlen_k, head_dim, deterministic):
    q, k, v = _qkv(cuda_device, 1, 2, 2, seqlen_q, seqlen_k, head_dim, torch.bfloat16)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="top_left", deterministic=deterministic)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=deterministic)


# --------------------------------------------------------------------------- GQA / MQA


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 3])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("head_dim", [64, 111])
def test_gqa(cuda_device, head_dim, mask, kv_heads, deterministic):
    is_causal, alignment = mask
    q, k, v = _qkv(cuda_device, 2, 9, kv_heads, 150, 190, head_dim, torch.float16)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment, deterministic=deterministic)


# --------------------------------------------------------------------------- seqlens_k


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 59),
                                            (torch.float32, 64)], ids=["fp16-64", "bf16-128", "fp16-59", "fp32-64"])
def test_seqlens_k(cuda_device, dtype, head_dim, mask, deterministic):
    is_causal, alignment = mask
    batch, seqlen_q, seqlen_k = 5, 140, 300
    lens = torch.randint(1, seqlen_k + 1, (batch,))
    lens[0], lens[1], lens[2] = 0, seqlen_k, 1
    lens = lens.to(device=cuda_device, dtype=torch.int32 if deterministic else torch.int64)
    q, k, v = _qkv(cuda_device, batch, 4, 2, seqlen_q, seqlen_k, head_dim, dtype)
    dq, dk, dv = _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment, seqlens_k=lens,
                                deterministic=deterministic)
    # Batch 0 sees nothing; keys at or past seqlens_k get zero gradients.
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    for b in range(batch):
        n = int(lens[b])
        assert torch.all(dk[b, :, n:] == 0) and torch.all(dv[b, :, n:] == 0)


@sanitize
@quick
def test_seqlens_k_padding_is_never_read(cuda_device):
    q, k, v = _qkv(cuda_device, 2, 2, 2, 70, 130, 64, torch.float16)
    lens = torch.tensor([50, 129], device=cuda_device, dtype=torch.int32)
    clean = [t.clone() for t in (k, v)]
    for t in (k, v):
        t[0, :, 50:] = float("nan")
        t[1, :, 129:] = float("nan")
    for t in clean:
        t[0, :, 50:] = 0
        t[1, :, 129:] = 0
    dout = torch.randn_like(q)
    for det in (False, True):
        dq, dk, dv = _kernel_grads(q, k, v, dout, deterministic=det, seqlens_k=lens)
        assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
        hi = _reference_grads(q.float(), clean[0].float(), clean[1].float(), dout.float(), seqlens_k=lens)
        low = _reference_grads(q, clean[0], clean[1], dout, seqlens_k=lens)
        for name, g, h, r in zip(("dq", "dk", "dv"), (dq, dk, dv), hi, low):
            assert_flash_rule(g, h, r, name=name)


# --------------------------------------------------------------------------- fp32


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("head_dim,seqlen_q,seqlen_k",
                         [(32, 1, 1), (59, 113, 203), (64, 128, 128), (128, 257, 200), (256, 97, 300),
                          (111, 512, 256)])
def test_fp32(cuda_device, head_dim, seqlen_q, seqlen_k, mask):
    is_causal, alignment = mask
    q, k, v = _qkv(cuda_device, 2, 3, 1, seqlen_q, seqlen_k, head_dim, torch.float32)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment)


@sanitize
@quick
def test_fp32_small(cuda_device):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 17, 33, 40, torch.float32)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


# --------------------------------------------------------------------------- grad through lse


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, pytest.param(torch.float32, marks=quick)], ids=str)
def test_grad_lse(cuda_device, dtype, deterministic):
    # Causal top_left, Sq <= Sk: every row sees a key, so lse is finite everywhere.
    q, k, v = _qkv(cuda_device, 2, 4, 2, 150, 170, 64, dtype)
    grad_lse = torch.randn(2, 4, 150, device=cuda_device, dtype=torch.float32)
    _run_and_check(q, k, v, grad_lse=grad_lse, is_causal=True, deterministic=deterministic)


@sanitize
@quick
def test_grad_lse_only(cuda_device):
    # Only lse is used: grad_out arrives as zeros, the gradient comes through lse.
    q, k, v = _qkv(cuda_device, 1, 2, 2, 40, 50, 64, torch.float16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    _, lse = tfkernels.flash_attention(*leaves, return_lse=True)
    grad_lse = torch.randn_like(lse)
    grads = torch.autograd.grad(lse, leaves, grad_lse)
    hi = _reference_grads(q.float(), k.float(), v.float(), torch.zeros_like(q, dtype=torch.float32), grad_lse)
    low = _reference_grads(q, k, v, torch.zeros_like(q), grad_lse)
    for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, low):
        assert_flash_rule(g, h, r, name=name)


# --------------------------------------------------------------------------- masked rows, empty


@sanitize
@quick
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fully_masked_rows(cuda_device, dtype, deterministic):
    # bottom_right with Sq > Sk: query rows i < Sq - Sk see no key (lse = -inf).
    seqlen_q, seqlen_k = 50, 20
    q, k, v = _qkv(cuda_device, 2, 2, 2, seqlen_q, seqlen_k, 64, dtype)
    dq, dk, dv = _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=deterministic)
    hidden = seqlen_q - seqlen_k
    assert torch.all(dq[:, :, :hidden] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_all_rows_masked_by_zero_lengths(cuda_device, dtype):
    q, k, v = _qkv(cuda_device, 2, 2, 1, 33, 40, 128 if dtype != torch.float32 else 64, dtype)
    lens = torch.zeros(2, device=cuda_device, dtype=torch.int64)
    for det in (False, True):
        grads = _kernel_grads(q, k, v, torch.randn_like(q), deterministic=det, seqlens_k=lens)
        assert all(torch.all(g == 0) for g in grads)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_empty_keys(cuda_device, dtype):
    # Sk = 0: dq is zero, dk and dv are empty.
    q, k, v = _qkv(cuda_device, 2, 2, 1, 20, 0, 64, dtype)
    for det in (False, True):
        dq, dk, dv = _kernel_grads(q, k, v, torch.randn_like(q), deterministic=det)
        assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_empty_query(cuda_device, dtype):
    q, k, v = _qkv(cuda_device, 2, 2, 2, 0, 16, 64, dtype)
    for det in (False, True):
        dq, dk, dv = _kernel_grads(q, k, v, torch.randn_like(q), deterministic=det)
        assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


# --------------------------------------------------------------------------- layouts, scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 59, 128])
def test_bshd_views(cuda_device, head_dim, dtype):
    q, k, v = _qkv(cuda_device, 2, 4, 2, 129, 77, head_dim, dtype, layout="bshd")
    assert not q.is_contiguous()
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_misaligned_views(cuda_device, dtype):
    q, k, v = misaligned_qkv(cuda_device, dtype)
    _run_and_check(q, k, v, is_causal=True)


@sanitize
@quick
def test_odd_head_dim_strided_views(cuda_device):
    q, k, v = _qkv(cuda_device, 2, 3, 3, 40, 50, 59, torch.bfloat16, layout="bshd")
    _run_and_check(q, k, v, deterministic=True)
    _run_and_check(q, k, v)


@sanitize
@quick
def test_expanded_kv(cuda_device):
    q = torch.randn(3, 2, 33, 64, device=cuda_device, dtype=torch.float16)
    k = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    v = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    _run_and_check(q, k, v)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_expanded_grad_out(cuda_device, dtype):
    # out.sum() hands the backward a stride-0 (expanded) grad_out.
    q, k, v = _qkv(cuda_device, 1, 2, 1, 30, 40, 64, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    tfkernels.flash_attention(*leaves, is_causal=True).sum().backward()
    ones = torch.ones_like(q)
    if dtype == torch.float32:
        hi = _reference_grads(*[t.double() for t in (q, k, v, ones)], is_causal=True)
        for name, t, h in zip(("dq", "dk", "dv"), leaves, hi):
            torch.testing.assert_close(t.grad.double(), h, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        hi = _reference_grads(*[t.float() for t in (q, k, v, ones)], is_causal=True)
        low = _reference_grads(q, k, v, ones, is_causal=True)
        for name, t, h, r in zip(("dq", "dk", "dv"), leaves, hi, low):
            assert_flash_rule(t.grad, h, r, name=name)


@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0])
def test_custom_scale(cuda_device, scale):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 100, 140, 96, torch.float16)
    _run_and_check(q, k, v, scale=scale, is_causal=True)


# --------------------------------------------------------------------------- determinism


def _direct_bwd(q, k, v, dout, deterministic, **kw):
    """The backward op called directly on one forward's out / lse."""
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    is_causal = kw.get("is_causal", False)
    alignment = kw.get("causal_alignment", "top_left")
    return out, lse, lambda: torch.ops.tfkernels.flash_attention_bwd(
        dout, None, q, k, v, out, lse, is_causal, alignment, None, None, deterministic, *NO_VARIANTS)[:3]


@pytest.mark.parametrize("dtype,head_dim,kv_heads", [(torch.float16, 64, 4), (torch.bfloat16, 128, 1)],
                         ids=["fp16-64-mha", "bf16-128-mqa"])
@pytest.mark.cuda
def test_deterministic_bitwise(dtype, head_dim, kv_heads):
    q, k, v = _qkv("cuda", 8, 4, kv_heads, 1024, 1024, head_dim, dtype)
    dout = torch.randn_like(q)
    _, _, bwd = _direct_bwd(q, k, v, dout, True, is_causal=True)
    first = bwd()
    for _ in range(19):
        again = bwd()
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name}: deterministic=True differs between runs"


@pytest.mark.cuda
def test_default_mode_race_check():
    # The default mode adds dQ with fp32 atomics: run-to-run differences are
    # summation-order noise. A lost update or a race would be far larger.
    q, k, v = _qkv("cuda", 8, 4, 2, 1024, 1024, 64, torch.float16)
    dout = torch.randn_like(q)
    _, _, det_bwd = _direct_bwd(q, k, v, dout, True, is_causal=True)
    _, _, def_bwd = _direct_bwd(q, k, v, dout, False, is_causal=True)
    det = det_bwd()
    first = def_bwd()
    noise = [max_abs_err(a, b) for a, b in zip(first, det)]
    eps = [torch.finfo(q.dtype).eps * float(b.abs().max()) for b in det]
    # dk, dv come from the same fixed-order code in both modes.
    assert torch.equal(first[1], det[1]) and torch.equal(first[2], det[2])
    for _ in range(100):
        run = def_bwd()
        for i, name in enumerate(("dq", "dk", "dv")):
            err = max_abs_err(run[i], det[i])
            assert err <= 2 * noise[i] + eps[i], f"{name}: {err:.3e} > 2 x noise {noise[i]:.3e}"


# --------------------------------------------------------------------------- CUDA graphs, opcheck


@pytest.mark.cuda
def test_cuda_graph_capture():
    q, k, v = _qkv("cuda", 2, 4, 2, 200, 300, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    lens = torch.tensor([300, 123], device="cuda", dtype=torch.int32)
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, is_causal=True, seqlens_k=lens)
    args = (dout, None, q, k, v, out, lse, True, "top_left", None, lens)

    def bwd(deterministic):  # dq, dk, dv
        return torch.ops.tfkernels.flash_attention_bwd(*args, deterministic, *NO_VARIANTS)[:3]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bwd(True)
        bwd(False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_det = bwd(True)
        g_def = bwd(False)
    graph.replay()
    e_det = bwd(True)
    e_def = bwd(False)
    for a, b in zip(g_det, e_det):
        assert torch.equal(a, b)
    for a, b in zip(g_def, e_def):
        assert max_abs_err(a, b) <= 1e-2 * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(cuda_device, dtype):
    q, k, v = _qkv(cuda_device, 2, 4, 2, 33, 47, 64, dtype, layout="bshd")
    lens = torch.tensor([47, 5], device=cuda_device, dtype=torch.int32)
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, is_causal=True, causal_alignment="bottom_right",
                                         seqlens_k=lens)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.tfkernels.flash_attention_bwd.default,
                          (dout, torch.randn_like(lse), q, k, v, out, lse, True, "bottom_right", None, lens, True,
                           *NO_VARIANTS),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- attention variants x dQ modes

@quick
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32], ids=str)
def test_variants_both_dq_modes(cuda_device, dtype, deterministic):
    """Window + causal + seqlens_k, softcap, sinks and dropout at once through both dQ
    paths (16-bit: fp32 atomics or the dQ kernel; fp32: its own kernels), against the
    reference with the same dropout mask (tests/test_attention_variants.check_parity);
    deterministic=True is bitwise reproducible, the sink gradient included."""
    from .test_attention_variants import _sinks, check_parity

    q = torch.randn(2, 4, 77, 64, device=cuda_device, dtype=dtype)
    k, v = (torch.randn(2, 2, 129, 64, device=cuda_device, dtype=dtype) for _ in range(2))
    sinks = _sinks(4, cuda_device)
    kwargs = dict(window_size=(40, 7), is_causal=True, causal_alignment="bottom_right", softcap=2.5, dropout_p=0.2,
                  seqlens_k=torch.tensor([129, 50], device=cuda_device), deterministic=deterministic)
    check_parity(q, k, v, sinks, seed=4, **kwargs)
    if deterministic:
        runs = []
        for _ in range(2):
            leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
            gen = torch.Generator(cuda_device).manual_seed(4)
            out = tfkernels.flash_attention(*leaves[:3], sinks=leaves[3], generator=gen, **kwargs)
            runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
