"""The attention family: flash_attention forward and backward against tfkernels.reference.

Devices (tests/devices.py): a test that takes `device` runs on the CPU, on a GPU
("cuda", skipped without one) and on the emulated CUDA device ("emu"); one that
takes `cuda_device` on the last two only; a test marked
`cuda` needs CUDA itself (graphs, streams, 100-run determinism); a test with no
device fixture runs on the CPU only. The emulated device runs the cases marked
`emu_quick` unless TFKERNELS_EMU_GRID=full; `gpu_only` cases (minutes each under
emulation) run on a GPU only; `sanitize` marks the small ones compute-sanitizer runs.
The window, softcap, sinks and dropout variants are in tests/test_attention_variants.py.

Sections:
- The CPU grid (CPU only: float64, gradcheck, opcheck with autograd, the memory
  bound): parity by the FlashAttention rule against the float64 reference
  (assert_close_float64 in float64), outputs, lse and all three gradients, gradient
  flowing through both the output and lse.
- Every device (`device`): the argument checks, shared by both backends.
- The CUDA grid (`cuda_device`): forward and backward on the same shapes (the
  `direction` parameter; the backward also over its two dQ modes), checks in
  tests/attention_cases.py. It covers each feature along its own axis instead of
  the cartesian product (head dims x dtypes on one odd shape; sequence lengths x
  masks; rectangular shapes x alignments; GQA; seqlens_k; layouts).
- CUDA only (`cuda` mark): graphs, side streams, bitwise determinism and the
  atomics' noise over 100 runs.

Outputs and gradients start NaN-poisoned (conftest sets TFKERNELS_POISON_OUTPUTS=1),
so an element a kernel forgets to write fails.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tfkernels
from tfkernels import reference

from .attention_cases import (ALL_HEAD_DIMS, BACKWARD, DIRECTIONS, FORWARD, FORWARD_AND_DQ_MODES, HALF_DTYPES,
                              MASK_IDS, MASKS, NO_VARIANTS, check, check_backward, check_forward, gpu_only,
                              kernel_grads, make_qkv, misaligned_qkv, quick, reference_grads, sanitize,
                              with_directions)
from .attention_cases import no_tf32  # noqa: F401 (an autouse fixture: TF32 off in this file's tests)
from .utils import assert_close_float64, assert_flash_rule, high_precision, max_abs_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
_ops = torch.ops.tfkernels


# ============================================================================= the CPU grid (CPU only)

def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device)
    return q, k, v


def _fwd_bwd(fn, q, k, v, grad_out, grad_lse, **kwargs):
    """out, lse and (dq, dk, dv) of fn with upstream gradients grad_out (and grad_lse)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    dq, dk, dv = torch.autograd.grad(outputs, [q, k, v], grads)
    return out.detach(), lse.detach(), (dq, dk, dv)


def _dense_flash_backward(q, k, v, out, lse, grad_out, grad_lse, *, is_causal=False, causal_alignment="top_left",
                          scale=None, seqlens_k=None):
    """The FlashAttention backward formulas as dense PyTorch ops in the inputs' dtype: P
    recomputed from lse, Delta = rowsum(dO * O) - grad_lse, dS = P * (dP - Delta).

    In float32 this is the low-precision reference of the same algorithm. Autograd
    through the reference computes sum_j P dP instead of Delta, whose rounding
    cancels exactly when a row sees one key (dS = 0), so its error is no yardstick
    for any kernel that takes Delta from O.
    """
    batch, heads, seqlen_q, head_dim = q.shape
    group = heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = reference.attention_mask(seqlen_q, k.shape[2], batch=batch, is_causal=is_causal,
                                    causal_alignment=causal_alignment, seqlens_k=seqlens_k)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(q.dtype)
    p = torch.exp(q @ kr.transpose(-1, -2) * scale - finite_lse.unsqueeze(-1)).masked_fill(~mask, 0)
    dp = grad_out @ vr.transpose(-1, -2)
    delta = (grad_out * out).sum(-1) - (0 if grad_lse is None else grad_lse.to(q.dtype))
    ds = p * (dp - delta.unsqueeze(-1))
    dq = ds @ kr * scale
    dk = (ds.transpose(-1, -2) @ q * scale).unflatten(1, (-1, group)).sum(2)
    dv = (p.transpose(-1, -2) @ grad_out).unflatten(1, (-1, group)).sum(2)
    return dq, dk, dv


def _check_parity(q, k, v, *, through_lse=True, **kwargs):
    dtype = q.dtype
    grad_out = torch.randn_like(q)
    # Upstream gradient of lse; 0 on rows that see no key (their lse is -inf).
    mask = reference.attention_mask(q.shape[2], k.shape[2], batch=q.shape[0], is_causal=kwargs.get("is_causal", False),
                                    causal_alignment=kwargs.get("causal_alignment", "top_left"),
                                    seqlens_k=kwargs.get("seqlens_k"))
    sees_a_key = mask.any(-1).expand(q.shape[:3])
    grad_lse = torch.randn(q.shape[:3]) * sees_a_key if through_lse else None

    out, lse, grads = _fwd_bwd(tfkernels.flash_attention, q, k, v, grad_out, grad_lse, **kwargs)
    hp = [high_precision(t) for t in (q, k, v, grad_out)]
    ref_out, ref_lse, ref_grads = _fwd_bwd(reference.flash_attention, *hp, grad_lse, **kwargs)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == q.shape[:3]
    # Rows that see no key: lse = -inf exactly where the reference has it, output 0.
    assert torch.equal(torch.isinf(lse), ~sees_a_key)
    assert torch.equal(torch.isinf(ref_lse), ~sees_a_key)
    assert (out[~sees_a_key] == 0).all()
    for g in grads:
        assert torch.isfinite(g).all()
    names = ("dq", "dk", "dv")
    if dtype == torch.float64:
        assert_close_float64(out, ref_out, "output")
        # lse is float32 by the schema: equal to the float64 reference up to its rounding.
        torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
        for g, r, name in zip(grads, ref_grads, names):
            assert_close_float64(g, r, name)
    else:
        low_out, low_lse, low_grads = _fwd_bwd(reference.flash_attention, q, k, v, grad_out, grad_lse, **kwargs)
        assert_flash_rule(out, ref_out, low_out, "output")
        assert_flash_rule(lse, ref_lse.float(), low_lse, "lse")
        grad_factor = 2.0
        if dtype == torch.float32:
            # The yardstick is the larger error of the two float32 references (see
            # _dense_flash_backward); in 16-bit the dtype's own rounding dominates both.
            # The kernel computes in the reference's own precision here, with a different
            # summation order in every GEMM and the exp recomputed from a rounded lse, so
            # dq and dk land up to ~3x the reference error (2-3x over 20 seeds): allow 4x.
            dense_grads = _dense_flash_backward(q, k, v, low_out, low_lse, grad_out, grad_lse, **kwargs)
            low_grads = [max(pair, key=lambda t: max_abs_err(t, r)) for pair, r in zip(zip(low_grads, dense_grads),
                                                                                         ref_grads)]
            grad_factor = 4.0
        for g, r, lo, name in zip(grads, ref_grads, low_grads, names):
            assert_flash_rule(g, r, lo, name, factor=grad_factor)


# ------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [1, 17, 113])
def test_parity_seqlen(seqlen, dtype):
    _check_parity(*_inputs(2, 3, 3, seqlen, seqlen, 64, dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_parity_long_sequence(is_causal, dtype):
    # Several query and key tiles, partial last tiles (1000 is no multiple of a block).
    _check_parity(*_inputs(1, 2, 1, 1000, 1000, 64, dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 40, 64, 80, 128, 256])
def test_parity_head_dim(head_dim, dtype):
    _check_parity(*_inputs(1, 2, 2, 41, 113, head_dim, dtype), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 113), (113, 17)])
def test_parity_unequal_lengths(seqlen_q, seqlen_k, is_causal, alignment, dtype):
    _check_parity(*_inputs(2, 2, 2, seqlen_q, seqlen_k, 40, dtype), is_causal=is_causal, causal_alignment=alignment)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_parity_gqa_mqa(heads, kv_heads, is_causal, dtype):
    _check_parity(*_inputs(2, heads, kv_heads, 113, 97, 64, dtype), is_causal=is_causal,
                  causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_parity_seqlens_k(is_causal, alignment, dtype):
    batch, seqlen_k = 5, 113
    lens = torch.randint(1, seqlen_k, (batch,))
    lens[0], lens[1] = 0, seqlen_k  # an empty batch element and a full one
    _check_parity(*_inputs(batch, 4, 2, 77, seqlen_k, 40, dtype), is_causal=is_causal, causal_alignment=alignment,
                  seqlens_k=lens.to(torch.int32 if is_causal else torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_parity_custom_scale(scale, dtype):
    _check_parity(*_inputs(2, 2, 1, 33, 65, 40, dtype), is_causal=True, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_gradient_through_output_only(dtype):
    _check_parity(*_inputs(2, 4, 2, 50, 70, 64, dtype), is_causal=True, through_lse=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_parity_non_contiguous(dtype):
    """A [B, S, H, D] tensor viewed as [B, H, S, D] (only the last dim is contiguous)."""
    batch, seqlen, heads, kv_heads, head_dim = 2, 57, 4, 2, 40
    q = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype).transpose(1, 2)
    kv = torch.randn(batch, seqlen + 7, 2, kv_heads, head_dim, dtype=dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    _check_parity(q, k, v, is_causal=True, causal_alignment="bottom_right")


# ------------------------------------------------------------------- rows that see no key

@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(dtype):
    """bottom_right with Sq > Sk hides every key from the first Sq - Sk rows; seqlens_k = 0
    hides every key from a whole batch element. Output 0, lse -inf, gradients finite and 0."""
    batch, heads, seqlen_q, seqlen_k, head_dim = 2, 2, 40, 9, 16
    q, k, v = _inputs(batch, heads, heads, seqlen_q, seqlen_k, head_dim, dtype)
    lens = torch.tensor([seqlen_k, 0])
    grad_out = torch.randn_like(q)
    out, lse, (dq, dk, dv) = _fwd_bwd(tfkernels.flash_attention, q, k, v, grad_out, None, is_causal=True,
                                      causal_alignment="bottom_right", seqlens_k=lens)
    hidden = seqlen_q - seqlen_k  # rows 0 .. hidden-1 of batch 0 see no key
    assert (out[0, :, :hidden] == 0).all() and (out[1] == 0).all()
    assert torch.isneginf(lse[0, :, :hidden]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, hidden:]).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0, :, :hidden] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    _check_parity(q, k, v, is_causal=True, causal_alignment="bottom_right", seqlens_k=lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7), (1, 2, 2, 0, 7), (1, 2, 2, 5, 0)],
                         ids=["batch0", "seqlen_q0", "seqlen_k0"])
def test_empty_sizes(shape, dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k = shape
    q, k, v = _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, 8, dtype)
    grad_out = torch.randn_like(q)
    out, lse, (dq, dk, dv) = _fwd_bwd(tfkernels.flash_attention, q, k, v, grad_out, None)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out == 0).all() and torch.isneginf(lse).all()  # no key anywhere (or nothing at all)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and (g == 0).all()


# ------------------------------------------------------------------ autograd and opcheck

@pytest.mark.parametrize(
    "config",
    [
        dict(heads=2, kv_heads=2, is_causal=True, causal_alignment="top_left"),
        dict(heads=4, kv_heads=2, is_causal=True, causal_alignment="bottom_right"),
        dict(heads=3, kv_heads=1, is_causal=False, seqlens_k=torch.tensor([7, 3])),
        dict(heads=2, kv_heads=1, is_causal=True, causal_alignment="bottom_right", seqlens_k=torch.tensor([7, 5]),
             scale=0.7),
    ],
    ids=["causal", "gqa_bottom_right", "mqa_seqlens", "gqa_causal_seqlens_scale"],
)
def test_gradcheck(config):
    config = dict(config)
    heads, kv_heads = config.pop("heads"), config.pop("kv_heads")
    q, k, v = (t.requires_grad_() for t in _inputs(2, heads, kv_heads, 5, 7, 4, torch.float64))

    def out_and_lse(q, k, v):
        return tfkernels.flash_attention(q, k, v, return_lse=True, **config)

    assert torch.autograd.gradcheck(lambda *t: out_and_lse(*t)[0], (q, k, v), fast_mode=True)
    # Every query row sees a key in these configs, so lse is finite and differentiable. It is
    # float32 by the schema: finite differences need a larger step and tolerance.
    assert torch.autograd.gradcheck(lambda *t: out_and_lse(*t)[1].double(), (q, k, v), eps=1e-3, atol=1e-3,
                                    rtol=1e-3, fast_mode=True)


def _opcheck_args(dtype=torch.float32):
    lens = torch.tensor([5, 0, 9], dtype=torch.int32)
    return [
        (*_inputs(2, 4, 2, 11, 9, 16, dtype), False, "top_left", None, None, False, *NO_VARIANTS),
        (*_inputs(3, 2, 1, 7, 9, 8, dtype), True, "bottom_right", 0.3, lens, True, *NO_VARIANTS),
        (*_inputs(1, 3, 3, 13, 5, 40, torch.float64), True, "top_left", None, None, False, *NO_VARIANTS),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck_forward(case):
    q, k, v, *attrs = _opcheck_args()[case]
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *attrs)
    torch.library.opcheck(_ops.flash_attention_fwd.default, args)


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_opcheck_backward(case, with_grad_lse):
    q, k, v, *attrs = _opcheck_args()[case]
    out, lse = _ops.flash_attention_fwd(q, k, v, *attrs)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(_ops.flash_attention_bwd.default, (grad_out, grad_lse, q, k, v, out, lse, *attrs))


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_deterministic(deterministic):
    """Bitwise-equal gradients across runs (fixed reduction order), GQA and key chunks included."""
    q, k, v = _inputs(1, 4, 2, 300, 700, 32, torch.float32)
    grad_out, grad_lse = torch.randn_like(q), torch.randn(q.shape[:3])
    runs = [_fwd_bwd(tfkernels.flash_attention, q, k, v, grad_out, grad_lse, is_causal=True,
                     deterministic=deterministic) for _ in range(3)]
    for out, lse, grads in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
        for g, g0 in zip(grads, runs[0][2]):
            assert torch.equal(g, g0)


# --------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, tfkernels
    torch.manual_seed(0)
    ops = torch.ops.tfkernels
    S, D = 16384, 64
    q, k, v, go = (torch.randn(1, 1, S, D) for _ in range(4))
    nv = (-1, -1, 0.0, None, 0.0, None)  # no variants
    out, lse = ops.flash_attention_fwd(q[:, :, :64], k[:, :, :64], v[:, :, :64], False, "top_left", None, None, False,
                                       *nv)
    ops.flash_attention_bwd(go[:, :, :64], None, q[:, :, :64], k[:, :, :64], v[:, :, :64], out, lse,
                            False, "top_left", None, None, False, *nv)  # warm up (BLAS buffers, thread pool)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    base = rss()
    out, lse = ops.flash_attention_fwd(q, k, v, False, "top_left", None, None, False, *nv)
    fwd = rss() - base
    grads = ops.flash_attention_bwd(go, None, q, k, v, out, lse, False, "top_left", None, None, False, *nv)
    bwd = rss() - base
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    print(fwd, bwd)
    """
)


def test_memory_is_linear_in_sequence_length():
    """Sq = Sk = 16384: the S x S float32 matrix would be 1 GiB; the tiled kernels stay far below."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    fwd, bwd = (int(x) for x in proc.stdout.split())
    limit = 256 * 2**20
    assert fwd < limit, f"forward peak RSS grew by {fwd / 2**20:.0f} MiB"
    assert bwd < limit, f"backward peak RSS grew by {bwd / 2**20:.0f} MiB"


# ============================================================================= every device (cpu, cuda, emu)

# ------------------------------------------------------------------------------ bad input
# The launchers of both backends check their arguments with the same code (csrc/args.cpp):
# the same messages on every device. Cheap (nothing is launched but the good calls), so
# in the emulated quick grid.

def _good(device):
    return _inputs(2, 4, 2, 5, 6, 8, torch.float32, device=device)


def _last_dim_strided(t):
    """A tensor of t's shape whose last dim has stride 2."""
    return torch.randn(*t.shape[:3], 2 * t.shape[3], device=t.device)[..., ::2]


def _call(q, k, v, is_causal=False, alignment="top_left", scale=None, seqlens_k=None):
    return _ops.flash_attention_fwd(q, k, v, is_causal, alignment, scale, seqlens_k, False, *NO_VARIANTS)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q.to(torch.int32), k, v), r"q must have dtype in"),
        (lambda q, k, v: (q[0], k, v), r"q must be a 4-D tensor"),
        (lambda q, k, v: (q, k[0], v), r"k must be a 4-D tensor"),
        (lambda q, k, v: (q, k, v[0]), r"v must be a 4-D tensor"),
        (lambda q, k, v: (q, k.double(), v), r"k must have the dtype of q"),
        (lambda q, k, v: (q, k, v.bfloat16()), r"v must have the dtype of q"),
        (lambda q, k, v: (q, k[:1], v), r"k\.shape\[0\] \(batch, as q\)"),
        (lambda q, k, v: (q, k[..., :4], v), r"k\.shape\[3\] \(head dim, as q\)"),
        (lambda q, k, v: (q, k, v[:1]), r"v\.shape\[0\] \(batch, as q\)"),
        (lambda q, k, v: (q, k, v[:, :1]), r"v\.shape\[1\] \(kv heads, as k\)"),
        (lambda q, k, v: (q, k, v[:, :, :3]), r"v\.shape\[2\] \(Sk, as k\)"),
        (lambda q, k, v: (q, k, v[..., :4]), r"v\.shape\[3\] \(head dim, as q\)"),
        (lambda q, k, v: (q[:, :3], k, v), r"query heads \(q\.shape\[1\] = 3\) must be a multiple of the number "
                                           r"of kv heads \(k\.shape\[1\] = 2\)"),
        (lambda q, k, v: tuple(torch.randn(*t.shape[:3], 257, device=t.device) for t in (q, k, v)),
         r"head dim q\.shape\[3\] must be in \[1, 256\], got 257"),
        (lambda q, k, v: (_last_dim_strided(q), k, v), r"q must be contiguous in its last dim"),
        (lambda q, k, v: (q, _last_dim_strided(k), v), r"k must be contiguous in its last dim"),
        (lambda q, k, v: (q, k, _last_dim_strided(v)), r"v must be contiguous in its last dim"),
    ],
    ids=["q_dtype", "q_rank", "k_rank", "v_rank", "k_mixed_dtype", "v_mixed_dtype", "k_batch", "k_head_dim",
         "v_batch", "v_kv_heads", "v_seqlen", "v_head_dim", "heads_not_multiple", "head_dim_257",
         "q_last_dim_strided", "k_last_dim_strided", "v_last_dim_strided"],
)
@quick
def test_bad_tensors(device, mutate, match):
    with pytest.raises(RuntimeError, match=match):
        _call(*mutate(*_good(device)))


@pytest.mark.parametrize(
    "lens,match",
    [
        (torch.tensor([1.0, 2.0]), r"seqlens_k must have dtype int32 or int64"),
        (torch.tensor([1, 2, 3]), r"seqlens_k must be a 1-D tensor \[B\] with B = 2"),
        (torch.tensor([[1, 2]]), r"seqlens_k must be a 1-D tensor \[B\] with B = 2"),
        (torch.tensor([1, 7]), r"seqlens_k values must lie in \[0, Sk = 6\], got min 1 and max 7"),
        (torch.tensor([-1, 2]), r"seqlens_k values must lie in \[0, Sk = 6\], got min -1"),
    ],
    ids=["float", "long", "2d", "too_long", "negative"],
)
@quick
def test_bad_seqlens_k(device, lens, match):
    if device == "cuda" and "values" in match:
        pytest.skip("seqlens_k values are read back from CPU tensors only (csrc/args.cpp: no host sync); "
                    "the CUDA kernels clamp them")
    with pytest.raises(RuntimeError, match=match):
        _call(*_good(device), seqlens_k=lens.to(device))


@quick
def test_bad_alignment_and_scale(device):
    q, k, v = _good(device)
    with pytest.raises(ValueError, match=r"causal_alignment must be one of"):
        tfkernels.flash_attention(q, k, v, is_causal=True, causal_alignment="center")
    with pytest.raises(RuntimeError, match=r"causal_alignment must be \"top_left\" or \"bottom_right\""):
        _call(q, k, v, True, "center")
    with pytest.raises(RuntimeError, match=r"scale must be finite"):
        _call(q, k, v, scale=float("inf"))


@quick
def test_bad_backward_args(device):
    q, k, v = _good(device)
    out, lse = _call(q, k, v)
    go = torch.randn_like(out)
    attrs = (False, "top_left", None, None, False, *NO_VARIANTS)

    def bwd(grad_out=go, grad_lse=None, out=out, lse=lse):
        return _ops.flash_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, *attrs)

    bwd()  # the good call works
    with pytest.raises(RuntimeError, match=r"grad_out must have the shape of q"):
        bwd(grad_out=go[:, :, :3])
    with pytest.raises(RuntimeError, match=r"grad_out must have the dtype of q"):
        bwd(grad_out=go.double())
    with pytest.raises(RuntimeError, match=r"out must have the shape of q"):
        bwd(out=out[:1])
    with pytest.raises(RuntimeError, match=r"lse must be float32 \[B, H, Sq\]"):
        bwd(lse=lse.double())
    with pytest.raises(RuntimeError, match=r"lse must be float32 \[B, H, Sq\]"):
        bwd(lse=lse[:, :1])
    with pytest.raises(RuntimeError, match=r"grad_lse must be float32 of the shape of lse"):
        bwd(grad_lse=torch.randn(2, 4, device=device))


def test_bad_backward_grad_out_strides():
    # CPU only: the CUDA launcher copies a grad_out whose last dim is strided instead
    # (csrc/cuda/flash_launch.cpp), the CPU kernel rejects it.
    q, k, v = _good("cpu")
    out, lse = _call(q, k, v)
    with pytest.raises(RuntimeError, match=r"grad_out must be contiguous in its last dim"):
        _ops.flash_attention_bwd(_last_dim_strided(out), None, q, k, v, out, lse, False, "top_left", None, None,
                                 False, *NO_VARIANTS)


# ============================================================================= the CUDA grid (cuda, emu)

# --------------------------------------------------------------------------- head dims x dtypes


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_head_dims(cuda_device, direction, head_dim, dtype):
    # Odd Sq and Sk: partial query and key tiles at every head dim (the padded
    # dims 40/59/80/111 zero-fill their D tail; 59 and 111 take the unaligned path).
    q, k, v = make_qkv(cuda_device, 2, 3, 3, 113, 203, head_dim, dtype)
    check(direction, q, k, v)


@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_head_dims_small(cuda_device, direction, head_dim, dtype):
    # Every instantiation on one query tile, cheap enough for the quick emulated grid:
    # Sq 17 against Sk 70 (a partial second key tile), GQA, causal bottom_right; the
    # backward's dQ mode alternates with the dtype.
    q, k, v = make_qkv(cuda_device, 1, 2, 1, 17, 70, head_dim, dtype)
    check(direction, q, k, v, is_causal=True, causal_alignment="bottom_right",
          deterministic=direction == BACKWARD and dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 128, 256])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_head_dims_causal(cuda_device, direction, head_dim, dtype):
    # The backward in its deterministic dQ mode.
    q, k, v = make_qkv(cuda_device, 1, 2, 2, 200, 257, head_dim, dtype)
    check(direction, q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=direction == BACKWARD)


# --------------------------------------------------------------------------- sequence lengths


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("seqlen", [pytest.param(1, marks=quick), pytest.param(17, marks=quick), 97, 128, 200, 257,
                                    pytest.param(1023, marks=gpu_only),
                                    pytest.param(2048, marks=gpu_only)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_square_seqlens(cuda_device, direction, seqlen, mask):
    is_causal, alignment = mask
    # Cycle head dim, dtype and the backward's dQ mode with the length so each pairing shows up somewhere.
    head_dim = {1: 64, 17: 32, 97: 96, 128: 128, 200: 80, 257: 160, 1023: 64, 2048: 128}[seqlen]
    dtype = torch.float16 if seqlen % 2 else torch.bfloat16
    batch = 2 if seqlen <= 257 else 1
    q, k, v = make_qkv(cuda_device, batch, 2, 2, seqlen, seqlen, head_dim, dtype)
    check(direction, q, k, v, is_causal=is_causal, causal_alignment=alignment,
          deterministic=direction == BACKWARD and seqlen in (97, 1023))


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k",
                         [pytest.param(17, 130, marks=quick), pytest.param(130, 17, marks=quick),
                          (113, 203), (128, 217), (108, 256), (256, 512), (512, 256),
                          pytest.param(1023, 1024, marks=gpu_only), pytest.param(1024, 1023, marks=gpu_only)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rectangular(cuda_device, direction, seqlen_q, seqlen_k, mask):
    is_causal, alignment = mask
    dtype = torch.bfloat16 if seqlen_q % 2 else torch.float16
    head_dim = 64 if seqlen_q < 1000 else 128
    q, k, v = make_qkv(cuda_device, 2, 2, 2, seqlen_q, seqlen_k, head_dim, dtype)
    check(direction, q, k, v, is_causal=is_causal, causal_alignment=alignment,
          deterministic=direction == BACKWARD and (seqlen_q + seqlen_k) % 3 == 0)


@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim", [(300, 257, 224), (97, 160, 192), (257, 300, 160)])
@pytest.mark.parametrize("direction,deterministic", FORWARD_AND_DQ_MODES)
def test_large_head_dims_causal_rectangular(cuda_device, direction, deterministic, seqlen_q, seqlen_k, head_dim):
    q, k, v = make_qkv(cuda_device, 1, 2, 2, seqlen_q, seqlen_k, head_dim, torch.bfloat16)
    check(direction, q, k, v, is_causal=True, causal_alignment="top_left", deterministic=deterministic)
    check(direction, q, k, v, is_causal=True, causal_alignment="bottom_right", deterministic=deterministic)


# --------------------------------------------------------------------------- GQA / MQA


@pytest.mark.parametrize("kv_heads", [1, 3])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("head_dim", [64, 111])
@pytest.mark.parametrize("direction,deterministic", FORWARD_AND_DQ_MODES)
def test_gqa(cuda_device, direction, deterministic, head_dim, mask, kv_heads):
    is_causal, alignment = mask
    q, k, v = make_qkv(cuda_device, 2, 9, kv_heads, 150, 190, head_dim, torch.float16)
    check(direction, q, k, v, is_causal=is_causal, causal_alignment=alignment, deterministic=deterministic)


# --------------------------------------------------------------------------- seqlens_k


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 59),
                                            (torch.float32, 64)], ids=["fp16-64", "bf16-128", "fp16-59", "fp32-64"])
@pytest.mark.parametrize("direction,deterministic,lens_dtype", [
    pytest.param(FORWARD, False, torch.int32, id="forward-int32"),
    pytest.param(FORWARD, False, torch.int64, id="forward-int64"),
    pytest.param(BACKWARD, False, torch.int64, id="backward-int64"),
    pytest.param(BACKWARD, True, torch.int32, id="backward-deterministic-int32"),
])
def test_seqlens_k(cuda_device, direction, deterministic, lens_dtype, dtype, head_dim, mask):
    is_causal, alignment = mask
    batch, seqlen_q, seqlen_k = 5, 140, 300
    # Random lengths plus the edges: 0 (every row sees nothing), Sk, 1.
    lens = torch.randint(1, seqlen_k + 1, (batch,))
    lens[0], lens[1], lens[2] = 0, seqlen_k, 1
    lens = lens.to(device=cuda_device, dtype=lens_dtype)
    q, k, v = make_qkv(cuda_device, batch, 4, 2, seqlen_q, seqlen_k, head_dim, dtype)
    kw = dict(is_causal=is_causal, causal_alignment=alignment, seqlens_k=lens)
    if direction == FORWARD:
        out, lse = check_forward(q, k, v, **kw)
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
        return
    dq, dk, dv = check_backward(q, k, v, deterministic=deterministic, **kw)
    # Batch 0 sees nothing; keys at or past seqlens_k get zero gradients.
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    for b in range(batch):
        n = int(lens[b])
        assert torch.all(dk[b, :, n:] == 0) and torch.all(dv[b, :, n:] == 0)


def _nan_padded_kv(k, v, lens):
    """k, v with NaN at and past seqlens_k (in place), and clean copies with 0 there."""
    clean = [t.clone() for t in (k, v)]
    for b, n in enumerate(lens.tolist()):
        for t in (k, v):
            t[b, :, n:] = float("nan")
        for t in clean:
            t[b, :, n:] = 0
    return clean


@sanitize
@quick
def test_seqlens_k_padding_is_never_read_forward(cuda_device):
    # K/V rows at or past seqlens_k are zero-filled on load: NaN there must not leak.
    q, k, v = make_qkv(cuda_device, 2, 2, 2, 70, 130, 64, torch.float16)
    lens = torch.tensor([50, 129], device=cuda_device, dtype=torch.int32)
    clean = _nan_padded_kv(k, v, lens)
    out, lse = tfkernels.flash_attention(q, k, v, seqlens_k=lens, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref = reference.flash_attention(q.float(), clean[0].float(), clean[1].float(), seqlens_k=lens)
    low = reference.flash_attention(q, clean[0], clean[1], seqlens_k=lens)
    assert_flash_rule(out, ref, low)


@sanitize
@quick
def test_seqlens_k_padding_is_never_read_backward(cuda_device):
    q, k, v = make_qkv(cuda_device, 2, 2, 2, 70, 130, 64, torch.float16)
    lens = torch.tensor([50, 129], device=cuda_device, dtype=torch.int32)
    clean = _nan_padded_kv(k, v, lens)
    dout = torch.randn_like(q)
    for det in (False, True):
        dq, dk, dv = kernel_grads(q, k, v, dout, deterministic=det, seqlens_k=lens)
        assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
        hi = reference_grads(q.float(), clean[0].float(), clean[1].float(), dout.float(), seqlens_k=lens)
        low = reference_grads(q, clean[0], clean[1], dout, seqlens_k=lens)
        for name, g, h, r in zip(("dq", "dk", "dv"), (dq, dk, dv), hi, low):
            assert_flash_rule(g, h, r, name=name)


# --------------------------------------------------------------------------- fp32

FP32_SHAPES = [(32, 1, 1), (59, 113, 203), (64, 128, 128), (128, 257, 200), (256, 97, 300), (111, 512, 256)]


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("direction,head_dim,seqlen_q,seqlen_k",
                         with_directions(FP32_SHAPES, quick_in=[(FORWARD, (32, 1, 1))]))
def test_fp32(cuda_device, direction, head_dim, seqlen_q, seqlen_k, mask):
    is_causal, alignment = mask
    q, k, v = make_qkv(cuda_device, 2, 3, 1, seqlen_q, seqlen_k, head_dim, torch.float32)
    check(direction, q, k, v, is_causal=is_causal, causal_alignment=alignment)


@sanitize
@quick
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fp32_small(cuda_device, direction):
    q, k, v = make_qkv(cuda_device, 1, 2, 2, 17, 33, 40, torch.float32)
    check(direction, q, k, v, is_causal=True, causal_alignment="bottom_right")


# --------------------------------------------------------------------------- grad through lse (backward)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, pytest.param(torch.float32, marks=quick)], ids=str)
def test_grad_lse(cuda_device, dtype, deterministic):
    # Causal top_left, Sq <= Sk: every row sees a key, so lse is finite everywhere.
    q, k, v = make_qkv(cuda_device, 2, 4, 2, 150, 170, 64, dtype)
    grad_lse = torch.randn(2, 4, 150, device=cuda_device, dtype=torch.float32)
    check_backward(q, k, v, grad_lse=grad_lse, is_causal=True, deterministic=deterministic)


@sanitize
@quick
def test_grad_lse_only(cuda_device):
    # Only lse is used: grad_out arrives as zeros, the gradient comes through lse.
    q, k, v = make_qkv(cuda_device, 1, 2, 2, 40, 50, 64, torch.float16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    _, lse = tfkernels.flash_attention(*leaves, return_lse=True)
    grad_lse = torch.randn_like(lse)
    grads = torch.autograd.grad(lse, leaves, grad_lse)
    hi = reference_grads(q.float(), k.float(), v.float(), torch.zeros_like(q, dtype=torch.float32), grad_lse)
    low = reference_grads(q, k, v, torch.zeros_like(q), grad_lse)
    for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, low):
        assert_flash_rule(g, h, r, name=name)


# --------------------------------------------------------------------------- layouts and strides


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("direction,head_dim", with_directions([64, 59, 128], quick_in=[(FORWARD, 59)]))
def test_bshd_views(cuda_device, direction, head_dim, dtype):
    # [B,S,H,D] storage seen as [B,H,S,D]: no copy on the aligned path.
    q, k, v = make_qkv(cuda_device, 2, 4, 2, 129, 77, head_dim, dtype, layout="bshd")
    assert not q.is_contiguous()
    check(direction, q, k, v, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("direction", [pytest.param(FORWARD, marks=quick), BACKWARD])
def test_misaligned_views(cuda_device, direction, dtype):
    q, k, v = misaligned_qkv(cuda_device, dtype)
    check(direction, q, k, v, is_causal=True)


@sanitize
@quick
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_odd_head_dim_strided_views(cuda_device, direction):
    # D = 59 with [B,S,H,D] views: the element-wise path with arbitrary strides.
    q, k, v = make_qkv(cuda_device, 2, 3, 3, 40, 50, 59, torch.bfloat16, layout="bshd")
    if direction == BACKWARD:
        check_backward(q, k, v, deterministic=True)
    check(direction, q, k, v)


@sanitize
@quick
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_expanded_kv(cuda_device, direction):
    # Zero strides (expand) over batch are legal strided inputs.
    q = torch.randn(3, 2, 33, 64, device=cuda_device, dtype=torch.float16)
    k = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    v = torch.randn(1, 2, 45, 64, device=cuda_device, dtype=torch.float16).expand(3, -1, -1, -1)
    check(direction, q, k, v)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_expanded_grad_out(cuda_device, dtype):
    # out.sum() hands the backward a stride-0 (expanded) grad_out.
    q, k, v = make_qkv(cuda_device, 1, 2, 1, 30, 40, 64, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    tfkernels.flash_attention(*leaves, is_causal=True).sum().backward()
    ones = torch.ones_like(q)
    if dtype == torch.float32:
        hi = reference_grads(*[t.double() for t in (q, k, v, ones)], is_causal=True)
        for name, t, h in zip(("dq", "dk", "dv"), leaves, hi):
            torch.testing.assert_close(t.grad.double(), h, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        hi = reference_grads(*[t.float() for t in (q, k, v, ones)], is_causal=True)
        low = reference_grads(q, k, v, ones, is_causal=True)
        for name, t, h, r in zip(("dq", "dk", "dv"), leaves, hi, low):
            assert_flash_rule(t.grad, h, r, name=name)


# --------------------------------------------------------------------------- scale, masked rows, empty


@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_custom_scale(cuda_device, direction, scale):
    q, k, v = make_qkv(cuda_device, 1, 2, 2, 100, 140, 96, torch.float16)
    check(direction, q, k, v, scale=scale, is_causal=True)


@sanitize
def test_large_magnitude_scores(cuda_device):
    # Scores of several hundred: the online max must keep exp2 in range (forward).
    q, k, v = make_qkv(cuda_device, 1, 2, 2, 80, 150, 64, torch.float16)
    q = q * 8
    check_forward(q, k, v, scale=1.0)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("direction,deterministic", FORWARD_AND_DQ_MODES)
def test_fully_masked_rows_cuda(cuda_device, direction, deterministic, dtype):
    # bottom_right with Sq > Sk: query rows i < Sq - Sk see no key (lse = -inf).
    seqlen_q, seqlen_k = 50, 20
    q, k, v = make_qkv(cuda_device, 2, 2, 2, seqlen_q, seqlen_k, 64, dtype)
    hidden = seqlen_q - seqlen_k
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    if direction == FORWARD:
        out, lse = check_forward(q, k, v, **kw)
        assert torch.all(out[:, :, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))
        assert torch.all(torch.isfinite(lse[:, :, hidden:]))
        return
    dq, dk, dv = check_backward(q, k, v, deterministic=deterministic, **kw)
    assert torch.all(dq[:, :, :hidden] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@sanitize
@quick
@pytest.mark.parametrize("direction,dtype", [pytest.param(FORWARD, torch.bfloat16, id="forward-bfloat16"),
                                             pytest.param(BACKWARD, torch.bfloat16, id="backward-bfloat16"),
                                             pytest.param(BACKWARD, torch.float32, id="backward-float32")])
def test_all_rows_masked_by_zero_lengths(cuda_device, direction, dtype):
    q, k, v = make_qkv(cuda_device, 2, 2, 1, 33, 40, 128 if dtype != torch.float32 else 64, dtype)
    lens = torch.zeros(2, device=cuda_device, dtype=torch.int64)
    if direction == FORWARD:
        out, lse = tfkernels.flash_attention(q, k, v, seqlens_k=lens, return_lse=True)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        return
    for det in (False, True):
        grads = kernel_grads(q, k, v, torch.randn_like(q), deterministic=det, seqlens_k=lens)
        assert all(torch.all(g == 0) for g in grads)


@sanitize
@quick
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_empty_keys(cuda_device, direction, dtype):
    # Sk = 0: every row sees nothing; dq is zero, dk and dv are empty.
    q, k, v = make_qkv(cuda_device, 2, 2, 1, 20, 0, 64, dtype)
    if direction == FORWARD:
        out, lse = tfkernels.flash_attention(q, k, v, return_lse=True)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        return
    for det in (False, True):
        dq, dk, dv = kernel_grads(q, k, v, torch.randn_like(q), deterministic=det)
        assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


@sanitize
@quick
@pytest.mark.parametrize("direction,dtype", [pytest.param(FORWARD, torch.float16, id="forward-float16"),
                                             pytest.param(BACKWARD, torch.float16, id="backward-float16"),
                                             pytest.param(BACKWARD, torch.float32, id="backward-float32")])
def test_empty_query(cuda_device, direction, dtype):
    q, k, v = make_qkv(cuda_device, 2, 2, 2, 0, 16, 64, dtype)
    if direction == FORWARD:
        out, lse = tfkernels.flash_attention(q, k, v, return_lse=True)
        assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)
        return
    for det in (False, True):
        dq, dk, dv = kernel_grads(q, k, v, torch.randn_like(q), deterministic=det)
        assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


# --------------------------------------------------------------------------- errors, opcheck, SDPA


def test_float64_is_rejected_clearly(cuda_device):
    q, k, v = make_qkv(cuda_device, 1, 1, 1, 8, 8, 32, torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        tfkernels.flash_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_opcheck_cuda(cuda_device, direction, dtype):
    # Schema and fake-kernel agreement (autograd is tfkernels.flash_attention's, checked above).
    q, k, v = make_qkv(cuda_device, 2, 4, 2, 33, 47, 64, dtype, layout="bshd")
    lens = torch.tensor([47, 5], device=cuda_device, dtype=torch.int32)
    utils = ("test_schema", "test_faketensor")
    if direction == FORWARD:
        torch.library.opcheck(_ops.flash_attention_fwd.default,
                              (q, k, v, True, "bottom_right", None, lens, False, *NO_VARIANTS), test_utils=utils)
        return
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, is_causal=True, causal_alignment="bottom_right",
                                         seqlens_k=lens)
    torch.library.opcheck(_ops.flash_attention_bwd.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, True, "bottom_right", None,
                           lens, True, *NO_VARIANTS), test_utils=utils)


def test_default_scale_matches_sdpa(cuda_device):
    # An independent oracle: PyTorch's own SDPA math backend in float32.
    q, k, v = make_qkv(cuda_device, 2, 3, 3, 65, 70, 64, torch.float32)
    out = tfkernels.flash_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)


# ============================================================================= CUDA only (graphs, streams, 100 runs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.cuda
def test_cuda_graph_capture_forward(dtype):
    q, k, v = make_qkv("cuda", 2, 4, 2, 200, 300, 128 if dtype != torch.float32 else 64, dtype)
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
    check_forward(q, k, v, **kw)


@pytest.mark.cuda
def test_cuda_graph_capture_backward():
    q, k, v = make_qkv("cuda", 2, 4, 2, 200, 300, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    lens = torch.tensor([300, 123], device="cuda", dtype=torch.int32)
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, is_causal=True, seqlens_k=lens)
    args = (dout, None, q, k, v, out, lse, True, "top_left", None, lens)

    def bwd(deterministic):  # dq, dk, dv
        return _ops.flash_attention_bwd(*args, deterministic, *NO_VARIANTS)[:3]

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


@pytest.mark.cuda
def test_side_stream():
    q, k, v = make_qkv("cuda", 1, 2, 2, 130, 130, 64, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = tfkernels.flash_attention(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(side)
    ref = reference.flash_attention(q.float(), k.float(), v.float(), is_causal=True)
    low = reference.flash_attention(q, k, v, is_causal=True)
    assert_flash_rule(out, ref, low)


def _direct_bwd(q, k, v, dout, deterministic, **kw):
    """The backward op called directly on one forward's out / lse."""
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, **kw)
    is_causal = kw.get("is_causal", False)
    alignment = kw.get("causal_alignment", "top_left")
    return out, lse, lambda: _ops.flash_attention_bwd(
        dout, None, q, k, v, out, lse, is_causal, alignment, None, None, deterministic, *NO_VARIANTS)[:3]


@pytest.mark.parametrize("dtype,head_dim,kv_heads", [(torch.float16, 64, 4), (torch.bfloat16, 128, 1)],
                         ids=["fp16-64-mha", "bf16-128-mqa"])
@pytest.mark.cuda
def test_deterministic_bitwise(dtype, head_dim, kv_heads):
    q, k, v = make_qkv("cuda", 8, 4, kv_heads, 1024, 1024, head_dim, dtype)
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
    q, k, v = make_qkv("cuda", 8, 4, 2, 1024, 1024, 64, torch.float16)
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
