"""What tests/test_attention.py's CUDA grid shares between forward and backward:
the grid's axes, the input makers and the two checks against tfkernels.reference.

Makers take the torch device first ("cuda", or "cpu" for the emulated device).

Forward (check_forward): fp16/bf16 by the FlashAttention rule
(tests/utils.assert_flash_rule) against the reference on float32 copies, with the
reference in the input dtype as the low-precision yardstick; lse against the
float32 reference. fp32: against the float64 reference, within a few times the
float32 reference's own error.

Backward (check_backward): dq, dk, dv by the same rules against autograd through
the reference.
"""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_flash_rule, max_abs_err, tf32_matmul

NO_VARIANTS = (-1, -1, 0.0, None, 0.0, None)  # window_left/right, softcap, sinks, dropout_p, rng_state
HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
# (is_causal, causal_alignment)
MASKS = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]
MASK_IDS = ["full", "causal_tl", "causal_br"]
FORWARD, BACKWARD = "forward", "backward"
DIRECTIONS = [FORWARD, BACKWARD]

sanitize = pytest.mark.sanitize  # small cases that compute-sanitizer runs
gpu_only = pytest.mark.gpu_only  # minutes per case on the emulated device
# The emulated quick grid (make test): every instantiation and dQ mode once, odd shapes.
quick = pytest.mark.emu_quick


@pytest.fixture(autouse=True)
def no_tf32():
    # The float32 oracle must be real fp32 (and the fp32 kernels never use TF32).
    with tf32_matmul(False):
        yield


def make_qkv(device, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, layout="bhsd"):
    """Random q, k, v on `device`; layout "bshd" gives [B,H,S,D] views of [B,S,H,D] storage."""
    def make(h, s):
        if layout == "bshd":
            return torch.randn(batch, s, h, head_dim, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, h, s, head_dim, device=device, dtype=dtype)

    return make(heads, seqlen_q), make(kv_heads, seqlen_k), make(kv_heads, seqlen_k)


def misaligned_qkv(device, dtype, batch=2, heads=3, seqlen=90, head_dim=64):
    """q, k, v whose base pointers are off by one element and whose row strides are
    not a multiple of 16 bytes (the launchers copy these to keep the 16-byte path)."""
    buf = torch.randn(batch, heads, seqlen, head_dim + 3, device=device, dtype=dtype)
    q = buf[..., 1:head_dim + 1]
    kbuf = torch.randn(batch, heads, seqlen * (head_dim + 1) + 1, device=device, dtype=dtype)
    k = kbuf[..., 1:].view(batch, heads, seqlen, head_dim + 1)[..., :head_dim]
    v = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    assert q.data_ptr() % 16 != 0 and k.stride(2) == head_dim + 1
    return q, k, v


# ------------------------------------------------------------------------------ forward

def check_lse(lse, lse_ref, atol, rtol):
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    assert not torch.isnan(lse).any(), "lse: contains NaN"
    ref_ninf = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), ref_ninf), "lse: -inf pattern differs from the reference"
    torch.testing.assert_close(lse[~ref_ninf], lse_ref[~ref_ninf].float(), atol=atol, rtol=rtol)


def check_forward(q, k, v, **kw):
    """Runs the op on q, k, v and checks out and lse against the reference; returns them."""
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
        check_lse(lse, lse64, atol=2e-5, rtol=2e-5)
    else:
        hi = [t.float() for t in (q, k, v)]
        ref_high, lse_high = reference.flash_attention(*hi, return_lse=True, **kw)
        ref_low = reference.flash_attention(q, k, v, **kw)
        assert_flash_rule(out, ref_high, ref_low)
        check_lse(lse, lse_high, atol=2e-3, rtol=1e-3)
    return out, lse


# ------------------------------------------------------------------------------ backward

def kernel_grads(q, k, v, dout, grad_lse=None, deterministic=False, **kw):
    """dq, dk, dv through tfkernels.flash_attention's autograd (which calls the
    flash_attention_bwd op with grad_lse and deterministic)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = tfkernels.flash_attention(*leaves, return_lse=True, deterministic=deterministic, **kw)
    outputs, grads = [out], [dout]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    return torch.autograd.grad(outputs, leaves, grads)


def reference_grads(q, k, v, dout, grad_lse=None, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = reference.flash_attention(*leaves, return_lse=True, **kw)
    outputs, grads = [out], [dout.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    return torch.autograd.grad(outputs, leaves, grads)


def check_backward(q, k, v, grad_lse=None, deterministic=False, **kw):
    """Gradients of the op on q, k, v (random grad_out) against the reference's; returns dq, dk, dv."""
    dout = torch.randn_like(q)
    grads = kernel_grads(q, k, v, dout, grad_lse, deterministic, **kw)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
    if q.dtype == torch.float32:
        hi = reference_grads(*[t.double() for t in (q, k, v, dout)], grad_lse, **kw)
        ref32 = reference_grads(q, k, v, dout, grad_lse, **kw)
        for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, ref32):
            assert not torch.isnan(g).any(), f"{name}: contains NaN"
            err, ref_err = max_abs_err(g, h), max_abs_err(r, h)
            mag = float(h.abs().max()) if h.numel() else 1.0
            assert err <= max(8 * ref_err, 1e-5 * max(mag, 1.0)), \
                f"fp32 {name}: max error {err:.3e} (fp32 reference {ref_err:.3e})"
    else:
        hi = reference_grads(*[t.float() for t in (q, k, v, dout)], grad_lse, **kw)
        low = reference_grads(q, k, v, dout, grad_lse, **kw)
        for name, g, h, r in zip(("dq", "dk", "dv"), grads, hi, low):
            assert_flash_rule(g, h, r, name=name)
    return grads


def check(direction, q, k, v, deterministic=False, **kw):
    """check_forward or check_backward; `deterministic` picks the backward's dQ mode
    (the forward has one)."""
    if direction == FORWARD:
        assert not deterministic, "the forward has no dQ mode"
        return check_forward(q, k, v, **kw)
    return check_backward(q, k, v, deterministic=deterministic, **kw)


def with_directions(values, quick_in=()):
    """(direction, *value) params: every value forward and backward. `quick_in` lists
    the (direction, value) pairs that are in the emulated quick grid."""
    def param(direction, value):
        value = value if isinstance(value, tuple) else (value,)
        marks = quick if (direction, value if len(value) > 1 else value[0]) in quick_in else ()
        return pytest.param(direction, *value, marks=marks)

    return [param(d, v) for d in DIRECTIONS for v in values]


# The backward's two dQ modes (fp32 atomics by default; deterministic=True) next to the forward.
FORWARD_AND_DQ_MODES = [pytest.param(FORWARD, False, id="forward"), pytest.param(BACKWARD, False, id="backward"),
                        pytest.param(BACKWARD, True, id="backward-deterministic")]
