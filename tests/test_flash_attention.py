"""CPU flash attention (tfkernels.flash_attention) against tfkernels.reference.

Parity: float64 to round-off (assert_close_float64); float32, bfloat16 and
float16 by the FlashAttention rule (assert_flash_rule: error against the float64
reference at most 2x that of the reference run in the inputs' dtype). Outputs,
lse and all three gradients are compared, with gradient flowing through both
the output and lse, on fresh random data.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_close_float64, assert_flash_rule, high_precision, max_abs_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ops = torch.ops.tfkernels
NO_VARIANTS = (-1, -1, 0.0, None, 0.0, None)  # window_left/right, softcap, sinks, dropout_p, rng_state


def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype):
    q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
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


# ------------------------------------------------------------------------------ bad input

def _good():
    return _inputs(2, 4, 2, 5, 6, 8, torch.float32)


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
        (lambda q, k, v: tuple(torch.randn(*t.shape[:3], 257) for t in (q, k, v)),
         r"head dim q\.shape\[3\] must be in \[1, 256\], got 257"),
        (lambda q, k, v: (torch.randn(*q.shape[:3], 16)[..., ::2], k, v), r"q must be contiguous in its last dim"),
        (lambda q, k, v: (q, torch.randn(*k.shape[:3], 16)[..., ::2], v), r"k must be contiguous in its last dim"),
        (lambda q, k, v: (q, k, torch.randn(*v.shape[:3], 16)[..., ::2]), r"v must be contiguous in its last dim"),
    ],
    ids=["q_dtype", "q_rank", "k_rank", "v_rank", "k_mixed_dtype", "v_mixed_dtype", "k_batch", "k_head_dim",
         "v_batch", "v_kv_heads", "v_seqlen", "v_head_dim", "heads_not_multiple", "head_dim_257",
         "q_last_dim_strided", "k_last_dim_strided", "v_last_dim_strided"],
)
def test_bad_tensors(mutate, match):
    with pytest.raises(RuntimeError, match=match):
        _call(*mutate(*_good()))


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
def test_bad_seqlens_k(lens, match):
    with pytest.raises(RuntimeError, match=match):
        _call(*_good(), seqlens_k=lens)


def test_bad_alignment_and_scale():
    q, k, v = _good()
    with pytest.raises(ValueError, match=r"causal_alignment must be one of"):
        tfkernels.flash_attention(q, k, v, is_causal=True, causal_alignment="center")
    with pytest.raises(RuntimeError, match=r"causal_alignment must be \"top_left\" or \"bottom_right\""):
        _call(q, k, v, True, "center")
    with pytest.raises(RuntimeError, match=r"scale must be finite"):
        _call(q, k, v, scale=float("inf"))


def test_bad_backward_args():
    q, k, v = _good()
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
        bwd(grad_lse=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"grad_out must be contiguous in its last dim"):
        bwd(grad_out=torch.randn(*go.shape[:3], 16)[..., ::2])


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
