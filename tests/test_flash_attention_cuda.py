"""flash_attention forward on CUDA against tfkernels.reference.flash_attention.

fp16/bf16: the FlashAttention rule (tests/utils.assert_flash_rule) against the
reference on float32 copies, with the reference in the input dtype as the
low-precision yardstick; lse against the float32 reference. fp32: tightly against
the float64 reference. Outputs start NaN-poisoned (conftest sets
TFKERNELS_POISON_OUTPUTS=1), so an element the kernel forgets to write fails.

The grid covers each feature along its own axis instead of the full cartesian
product (head dims x dtypes on one odd shape; sequence lengths x causal; the
rectangular shapes x alignments; GQA; seqlens_k; layouts), to run in about a
minute on an H100. Every test runs on a GPU ("cuda", skipped without one) and on
the emulated device ("emu", tests/devices.py), except those that need CUDA itself
(graphs, streams) or sizes that take minutes under emulation (marked `gpu_only`).
Small cases are also marked `sanitize` for compute-sanitizer runs.
"""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .attention_cuda_cases import ALL_HEAD_DIMS, HALF_DTYPES, MASK_IDS, MASKS, no_tf32  # noqa: F401 (fixture)
from .attention_cuda_cases import make_qkv as _qkv
from .attention_cuda_cases import misaligned_qkv
from .utils import assert_flash_rule, max_abs_err

sanitize = pytest.mark.sanitize
gpu_only = pytest.mark.gpu_only  # minutes per case on the emulated device
# The emulated quick grid (make test): every instantiation once, odd shapes throughout.
quick = pytest.mark.emu_quick


def _check_lse(lse, lse_ref, atol, rtol):
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    assert not torch.isnan(lse).any(), "lse: contains NaN"
    ref_ninf = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), ref_ninf), "lse: -inf pattern differs from the reference"
    torch.testing.assert_close(lse[~ref_ninf], lse_ref[~ref_ninf].float(), atol=atol, rtol=rtol)


def _run_and_check(q, k, v, **kw):
    """Runs the op on q, k, v and checks out and lse against the reference."""
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3]
    if q.dtype == torch.float32:
        hi = [t.double() for t in (q, k, v)]
        ref64, lse64 = reference.flash_attention(*hi, return_lse=True, **kw)
        ref32 = reference.flash_attention(q, k, v, **kw)
        assert not torch.isnan(out).any(), "output: contains NaN"
        err, ref_err = max_abs_err(out, ref64), max_abs_err(ref32, ref64)
        # Within a few times the float32 reference's own error (cuBLAS sums in another
        # order; the kernel's exp2 is the ~2-ulp hardware one), or 1e-5 absolute.
        assert err <= max(8 * ref_err, 1e-5), f"fp32 output: max error {err:.3e} (fp32 reference {ref_err:.3e})"
        _check_lse(lse, lse64, atol=2e-5, rtol=2e-5)
    else:
        hi = [t.float() for t in (q, k, v)]
        ref_high, lse_high = reference.flash_attention(*hi, return_lse=True, **kw)
        ref_low = reference.flash_attention(q, k, v, **kw)
        assert_flash_rule(out, ref_high, ref_low)
        _check_lse(lse, lse_high, atol=2e-3, rtol=1e-3)
    return out, lse


# --------------------------------------------------------------------------- head dims x dtypes


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_head_dims(cuda_device, head_dim, dtype):
    # Odd Sq and Sk: partial query and key tiles at every head dim (the padded
    # dims 40/59/80/111 zero-fill their D tail; 59 and 111 take the unaligned path).
    q, k, v = _qkv(cuda_device, 2, 3, 3, 113, 203, head_dim, dtype)
    _run_and_check(q, k, v)


@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_head_dims_small(cuda_device, head_dim, dtype):
    # Every instantiation on one query tile, cheap enough for the quick emulated grid:
    # Sq 17 against Sk 70 (a partial second key tile), GQA, causal bottom_right.
    q, k, v = _qkv(cuda_device, 1, 2, 1, 17, 70, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 128, 256])
def test_head_dims_causal(cuda_device, head_dim, dtype):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 200, 257, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


# --------------------------------------------------------------------------- sequence lengths


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("seqlen", [pytest.param(1, marks=quick), pytest.param(17, marks=quick), 97, 128, 200, 257,
                                    pytest.param(1023, marks=gpu_only),
                                    pytest.param(2048, marks=gpu_only)])
def test_square_seqlens(cuda_device, seqlen, mask):
    is_causal, alignment = mask
    # Cycle head dim and dtype with the length so each pairing shows up somewhere.
    head_dim = {1: 64, 17: 32, 97: 96, 128: 128, 200: 80, 257: 160, 1023: 64, 2048: 128}[seqlen]
    dtype = torch.float16 if seqlen % 2 else torch.bfloat16
    batch = 2 if seqlen <= 257 else 1
    q, k, v = _qkv(cuda_device, batch, 2, 2, seqlen, seqlen, head_dim, dtype)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment)


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
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment)


@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim", [(300, 257, 224), (97, 160, 192), (257, 300, 160)])
def test_large_head_dims_causal_rectangular(cuda_device, seqlen_q, seqlen_k, head_dim):
    q, k, v = _qkv(cuda_device, 1, 2, 2, seqlen_q, seqlen_k, head_dim, torch.bfloat16)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="top_left")
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


# --------------------------------------------------------------------------- GQA / MQA


@pytest.mark.parametrize("kv_heads", [1, 3])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("head_dim", [64, 111])
def test_gqa(cuda_device, head_dim, mask, kv_heads):
    is_causal, alignment = mask
    q, k, v = _qkv(cuda_device, 2, 9, kv_heads, 150, 190, head_dim, torch.float16)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment)


# --------------------------------------------------------------------------- seqlens_k


@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 59),
                                            (torch.float32, 64)], ids=["fp16-64", "bf16-128", "fp16-59", "fp32-64"])
def test_seqlens_k(cuda_device, dtype, head_dim, mask, lens_dtype):
    is_causal, alignment = mask
    batch, seqlen_q, seqlen_k = 5, 140, 300
    # Random lengths plus the edges: 0 (every row sees nothing), Sk, 1.
    lens = torch.randint(1, seqlen_k + 1, (batch,))
    lens[0], lens[1], lens[2] = 0, seqlen_k, 1
    lens = lens.to(device=cuda_device, dtype=lens_dtype)
    q, k, v = _qkv(cuda_device, batch, 4, 2, seqlen_q, seqlen_k, head_dim, dtype)
    out, lse = _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment, seqlens_k=lens)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


@sanitize
@quick
def test_seqlens_k_padding_is_never_read(cuda_device):
    # K/V rows at or past seqlens_k are zero-filled on load: NaN there must not leak.
    q, k, v = _qkv(cuda_device, 2, 2, 2, 70, 130, 64, torch.float16)
    lens = torch.tensor([50, 129], device=cuda_device, dtype=torch.int32)
    k[0, :, 50:] = float("nan")
    v[0, :, 50:] = float("nan")
    k[1, :, 129:] = float("nan")
    v[1, :, 129:] = float("nan")
    out, lse = tfkernels.flash_attention(q, k, v, seqlens_k=lens, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    clean = [t.clone() for t in (k, v)]
    for t in clean:
        t[0, :, 50:] = 0
        t[1, :, 129:] = 0
    ref = reference.flash_attention(q.float(), clean[0].float(), clean[1].float(), seqlens_k=lens)
    low = reference.flash_attention(q, clean[0], clean[1], seqlens_k=lens)
    assert_flash_rule(out, ref, low)


# --------------------------------------------------------------------------- fp32


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("head_dim,seqlen_q,seqlen_k",
                         [pytest.param(32, 1, 1, marks=quick), (59, 113, 203), (64, 128, 128), (128, 257, 200),
                          (256, 97, 300), (111, 512, 256)])
def test_fp32(cuda_device, head_dim, seqlen_q, seqlen_k, mask):
    is_causal, alignment = mask
    q, k, v = _qkv(cuda_device, 2, 3, 1, seqlen_q, seqlen_k, head_dim, torch.float32)
    _run_and_check(q, k, v, is_causal=is_causal, causal_alignment=alignment)


@sanitize
@quick
def test_fp32_small(cuda_device):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 17, 33, 40, torch.float32)
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


# --------------------------------------------------------------------------- layouts and strides


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, pytest.param(59, marks=quick), 128])
def test_bshd_views(cuda_device, head_dim, dtype):
    # [B,S,H,D] storage seen as [B,H,S,D]: no copy on the aligned path.
    q, k, v = _qkv(cuda_device, 2, 4, 2, 129, 77, head_dim, dtype, layout="bshd")
    assert not q.is_contiguous()
    _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")


@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_misaligned_views(cuda_device, dtype):
    q, k, v = misaligned_qkv(cuda_device, dtype)
    _run_and_check(q, k, v, is_causal=True)


@sanitize
@quick
def test_odd_head_dim_strided_views(cuda_device):
    # D = 59 with [B,S,H,D] views: the element-wise path with arbitrary strides.
    q, k, v = _qkv(cuda_device, 2, 3, 3, 40, 50, 59, torch.bfloat16, layout="bshd")
    _run_and_check(q, k, v)


@sanitize
@quick
def test_expanded_kv(cuda_device):
    # Zero strides (expand) over batch are legal strided inputs.
    q = torch.randn(3, 2, 33, 64, device=cuda_device, dtype=torch.float16)
    k = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    v = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    _run_and_check(q, k, v)


# --------------------------------------------------------------------------- scale, masked rows


@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0])
def test_custom_scale(cuda_device, scale):
    q, k, v = _qkv(cuda_device, 1, 2, 2, 100, 140, 96, torch.float16)
    _run_and_check(q, k, v, scale=scale, is_causal=True)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fully_masked_rows(cuda_device, dtype):
    # bottom_right with Sq > Sk: query rows i < Sq - Sk see no key.
    seqlen_q, seqlen_k = 50, 20
    q, k, v = _qkv(cuda_device, 2, 2, 2, seqlen_q, seqlen_k, 64, dtype)
    out, lse = _run_and_check(q, k, v, is_causal=True, causal_alignment="bottom_right")
    hidden = seqlen_q - seqlen_k
    assert torch.all(out[:, :, :hidden] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :hidden]))
    assert torch.all(torch.isfinite(lse[:, :, hidden:]))


@sanitize
@quick
def test_all_rows_masked_by_zero_lengths(cuda_device):
    q, k, v = _qkv(cuda_device, 2, 2, 1, 33, 40, 128, torch.bfloat16)
    lens = torch.zeros(2, device=cuda_device, dtype=torch.int64)
    out, lse = tfkernels.flash_attention(q, k, v, seqlens_k=lens, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@sanitize
def test_large_magnitude_scores(cuda_device):
    # Scores of several hundred: the online max must keep exp2 in range.
    q, k, v = _qkv(cuda_device, 1, 2, 2, 80, 150, 64, torch.float16)
    q = q * 8
    _run_and_check(q, k, v, scale=1.0)


# --------------------------------------------------------------------------- CUDA graphs, streams


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.cuda
def test_cuda_graph_capture(dtype):
    q, k, v = _qkv("cuda", 2, 4, 2, 200, 300, 128 if dtype != torch.float32 else 64, dtype)
    lens = torch.tensor([300, 123], device="cuda", dtype=torch.int32)
    kw = dict(is_causal=True, causal_alignment="bottom_right", seqlens_k=lens)
    # Warm up on a side stream (one-time attribute setup happens outside capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tfkernels.flash_attention(q, k, v, **kw)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    graph.replay()
    out_e, lse_e = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)

    # New data in the same buffers (and new lengths, read on the device).
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    lens.copy_(torch.tensor([77, 0], dtype=torch.int32))
    graph.replay()
    out_e, lse_e = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
    _run_and_check(q, k, v, **kw)


@pytest.mark.cuda
def test_side_stream():
    q, k, v = _qkv("cuda", 1, 2, 2, 130, 130, 64, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = tfkernels.flash_attention(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(side)
    ref = reference.flash_attention(q.float(), k.float(), v.float(), is_causal=True)
    low = reference.flash_attention(q, k, v, is_causal=True)
    assert_flash_rule(out, ref, low)


# --------------------------------------------------------------------------- errors


def test_float64_is_rejected_clearly(cuda_device):
    q, k, v = _qkv(cuda_device, 1, 1, 1, 8, 8, 32, torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        tfkernels.flash_attention(q, k, v)


@sanitize
@quick
def test_empty_query(cuda_device):
    q, k, v = _qkv(cuda_device, 2, 2, 2, 0, 16, 64, torch.float16)
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_empty_keys(cuda_device, dtype):
    # Sk = 0: every row sees nothing.
    q, k, v = _qkv(cuda_device, 2, 2, 1, 20, 0, 64, dtype)
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(cuda_device, dtype):
    # Schema and fake-kernel agreement (the backward is a later issue, so no
    # autograd / AOT checks here).
    q, k, v = _qkv(cuda_device, 2, 4, 2, 33, 47, 64, dtype, layout="bshd")
    lens = torch.tensor([47, 5], device=cuda_device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.tfkernels.flash_attention_fwd.default,
                          (q, k, v, True, "bottom_right", None, lens, False, -1, -1, 0.0, None, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_default_scale_matches_sdpa(cuda_device):
    # An independent oracle: PyTorch's own SDPA math backend in float32.
    q, k, v = _qkv(cuda_device, 2, 3, 3, 65, 70, 64, torch.float32)
    out = tfkernels.flash_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)
