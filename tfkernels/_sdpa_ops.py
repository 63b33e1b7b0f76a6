"""The aten attention ops that the SDPA backend replaces, written over tfkernels' kernels.

Each function takes the aten op's arguments and returns what the aten op returns
(shapes, dtypes and the memory layout of torch's meta kernels, which compiled graphs
rely on), or raises `Unsupported` before doing any work when the kernel cannot serve
the call; `sdpa_backend` then runs torch's own kernel instead. Nothing here checks the
device: the dispatch key an adapter is registered under decides that.

Conventions of the ops replaced:
- CPU, `_scaled_dot_product_flash_attention_for_cpu`: q [B,H,Sq,D], k/v [B,Hkv,Sk,D],
  is_causal top-left (SDPA's), an optional additive float `attn_mask` (SDPA turns a
  bool mask into 0 / -inf before it gets here); lse [B,H,Sq] in the computation dtype
  (float64 for float64, else float32) laid out [B,Sq,H]; gradients laid out [B,S,H,D].
- CUDA, FlashAttention's ops: `_scaled_dot_product_flash_attention` takes [B,H,S,D],
  `_flash_attention_forward` [B,S,H,D], or packed [T,H,D] with int32 cum_seq_q/k
  (torch's varlen_attn), which runs flash_attention_varlen (lse [H,T]);
  is_causal is FlashAttention's bottom-right alignment (SDPA only sends it with Sq ==
  Sk, where both alignments agree); lse is float32 [B,H,Sq]. Sliding windows
  (window_size_left/right, bottom-right aligned like FlashAttention's) and dropout
  are passed to the kernel. With dropout the kernel's rng_state (int64 [2], seed and
  offset, drawn from torch's default generator on q's device) travels in the
  philox-seed slot (uint64 [2], its bits unchanged) and returns to the backward
  there; the offset slot is 0. Without dropout both are zeros, as torch's FA4
  provider returns them. The CPU op's backward takes no rng state, so on the CPU
  dropout still runs torch's kernel.
"""
import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from ._masks import PlanCache, keep_mask, kernel_plan

__all__ = ["Unsupported", "cpu_forward", "cpu_backward", "sdpa_flash_forward", "sdpa_flash_backward",
           "flash_forward", "flash_forward_inplace", "flash_backward"]

_ops = torch.ops.tfkernels
# window_left, window_right, softcap, sinks, dropout_p, rng_state: plain attention.
_NO_VARIANTS = (-1, -1, 0.0, None, 0.0, None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256


class Unsupported(Exception):
    """The call needs something the kernel lacks; the message says what."""


# --------------------------------------------------------------------------- shared checks and layouts

def _check_dense(q, k, v, dropout_p, dtypes=_DTYPES, dropout=False):
    if dropout_p != 0.0 and not dropout:
        raise Unsupported(f"dropout_p={dropout_p} (this op cannot carry the dropout rng state to its backward)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise Unsupported(f"q, k, v must be 4-D, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise Unsupported(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (supported: one of {list(dtypes)})")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise Unsupported(f"head dims q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]} differ")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise Unsupported(f"head dim {head_dim} (supported: 1 to {_MAX_HEAD_DIM})")
    if q.numel() == 0 or k.numel() == 0:
        raise Unsupported("an empty q or k")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise Unsupported("a last dimension that is not contiguous")


def _same_layout(a, b):
    # Strides of size-1 dims never matter (and compiled code ignores them too).
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _in_layout(value, target):
    """`value` with the strides of the empty tensor `target` (copied only if they differ)."""
    if _same_layout(value, target):
        return value
    return target.copy_(value)


def _like(value, like):
    """`value` laid out as torch.empty_like(like) would be (torch's meta kernels' promise)."""
    if _same_layout(value, torch.empty_like(like, device="meta")):
        return value
    return torch.empty_like(like).copy_(value)


def _bhsd(*tensors):
    return tuple(t.transpose(1, 2) for t in tensors)


def _deterministic():
    return torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------- CPU

def _mask_plan(attn_mask, is_causal, batch, seqlen_q, seqlen_k):
    """(is_causal, alignment, seqlens_k) for an SDPA mask (and SDPA's top-left is_causal), or None."""
    keep = keep_mask(attn_mask)
    if keep is None:
        return None
    if is_causal:
        keep = keep & torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=keep.device).tril()
    plan = kernel_plan(keep, batch, seqlen_q, seqlen_k, True)
    if plan is None:
        return None
    plan = plan[:3]  # (is_causal, alignment, seqlens_k): no window is tried, so none is needed
    if attn_mask.is_floating_point() and _has_empty_rows(plan, seqlen_q, seqlen_k):
        # Rows that see no key: the kernel returns 0 there; torch returns 0 for -inf masks
        # but averages all values when the mask blocks with a finite value (finfo.min).
        if not bool((torch.isneginf(attn_mask) | (attn_mask == 0)).all()):
            return None
    return plan


def _has_empty_rows(plan, seqlen_q, seqlen_k):
    causal, alignment, seqlens_k = plan
    shortest = seqlen_k if seqlens_k is None else int(seqlens_k.min())
    return shortest == 0 or (causal and alignment == "bottom_right" and shortest < seqlen_q)


_cpu_plans = PlanCache(_mask_plan)


def _cpu_plan(q, k, is_causal, attn_mask):
    if attn_mask is None:
        return bool(is_causal), "top_left", None
    if attn_mask.requires_grad:
        raise Unsupported("an attn_mask that requires grad")
    plan = _cpu_plans.get(attn_mask, (bool(is_causal), q.shape[0], q.shape[2], k.shape[2]))
    if plan is None:
        raise Unsupported("an attn_mask that is not key padding on the right and/or causal")
    return plan


def _cpu_lse(lse, q):
    """float32 [B,H,Sq] -> the computation dtype, laid out [B,Sq,H] like torch's CPU kernel."""
    batch, heads, seqlen_q, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    target = torch.empty((batch, seqlen_q, heads), dtype=dtype, device=q.device).transpose(1, 2)
    return target.copy_(lse)


def cpu_forward(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    _check_dense(q, k, v, dropout_p)
    causal, alignment, seqlens_k = _cpu_plan(q, k, is_causal, attn_mask)
    out, lse = _ops.flash_attention_fwd(q, k, v, causal, alignment, scale, seqlens_k, False, *_NO_VARIANTS)
    return _like(out, q), _cpu_lse(lse, q)


def _cpu_grad(grad, like):
    """Gradients laid out [B,S,H,D], like torch's CPU backward (its meta kernel)."""
    target = torch.empty_permuted(like.shape, (0, 2, 1, 3), dtype=like.dtype, device=like.device)
    return _in_layout(grad, target)


def cpu_backward(grad_out, q, k, v, out, lse, dropout_p, is_causal, *, attn_mask=None, scale=None):
    _check_dense(q, k, v, dropout_p)
    causal, alignment, seqlens_k = _cpu_plan(q, k, is_causal, attn_mask)
    lse = lse.to(torch.float32).contiguous()
    grads = _ops.flash_attention_bwd(grad_out.contiguous(), None, q, k, v, out, lse, causal, alignment, scale,
                                     seqlens_k, False, *_NO_VARIANTS)
    return tuple(_cpu_grad(g, t) for g, t in zip(grads[:3], (q, k, v)))


# --------------------------------------------------------------------------- CUDA (FlashAttention's ops)

def _dropout_rng(q, dropout_p):
    """(rng_state for the kernel or None, philox seed slot, philox offset slot)."""
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    if dropout_p == 0.0:
        # What FA4's provider returns without dropout: the state is never read.
        return None, torch.zeros((2,), dtype=torch.uint64, device=q.device), offset
    rng_state = torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=q.device)
    return rng_state, rng_state.view(torch.uint64), offset


def _rng_from_slot(philox_seed, dropout_p):
    """The kernel's rng_state back from the philox seed slot (see _dropout_rng)."""
    return philox_seed.view(torch.int64) if dropout_p != 0.0 else None


def _window(window_size_left, window_size_right):
    return (-1 if window_size_left is None else int(window_size_left),
            -1 if window_size_right is None else int(window_size_right))


def _no_debug_mask(q):
    return torch.empty(0, dtype=q.dtype, device=q.device)


def _packed(q, k, v, cum_seq_q, cum_seq_k, dropout_p, seqused_k=None):
    """Whether the call is packed variable-length ([T,H,D] with cum_seq_q/k), checked for
    flash_attention_varlen: int32 offsets on q's device, no seqused_k alongside."""
    if cum_seq_q is None and cum_seq_k is None:
        return False
    if cum_seq_q is None or cum_seq_k is None:
        raise Unsupported("only one of cum_seq_q / cum_seq_k")
    if seqused_k is not None:
        raise Unsupported("seqused_k with packed sequences")
    for name, cu in (("cum_seq_q", cum_seq_q), ("cum_seq_k", cum_seq_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise Unsupported(f"{name} {cu.dtype} {list(cu.shape)} on {cu.device} (int32 [B+1] on q's device)")
    # The dense checks, on the packed tensors seen as one batch entry.
    _check_dense(*(t.unsqueeze(0) if t.dim() == 3 else t for t in (q, k, v)), dropout_p, dropout=True)
    return True


def _check_flash_extras(return_debug_mask=False, alibi_slopes=None, block_table=None):
    if return_debug_mask:
        raise Unsupported("return_debug_mask=True")
    if alibi_slopes is not None:
        raise Unsupported("alibi_slopes")
    if block_table is not None:
        raise Unsupported("a paged KV cache (block_table)")


def sdpa_flash_forward(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    _check_dense(q, k, v, dropout_p, dropout=True)
    _check_flash_extras(return_debug_mask)
    rng_state, seed_slot, offset_slot = _dropout_rng(q, dropout_p)
    out, lse = _ops.flash_attention_fwd(q, k, v, bool(is_causal), "bottom_right", scale, None, False, -1, -1, 0.0,
                                        None, float(dropout_p), rng_state)
    return _like(out, q), lse, None, None, q.shape[2], k.shape[2], seed_slot, offset_slot, _no_debug_mask(q)


def sdpa_flash_backward(grad_out, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                        philox_seed, philox_offset, *, scale=None):
    _check_dense(q, k, v, dropout_p, dropout=True)
    if cum_seq_q is not None or cum_seq_k is not None:
        raise Unsupported("packed inputs to the [B,H,S,D] op's backward")
    grads = _ops.flash_attention_bwd(grad_out.contiguous(), None, q, k, v, out, lse.contiguous(), bool(is_causal),
                                     "bottom_right", scale, None, _deterministic(), -1, -1, 0.0, None,
                                     float(dropout_p), _rng_from_slot(philox_seed, dropout_p))
    return tuple(_like(g, t) for g, t in zip(grads[:3], (q, k, v)))


def _flash_forward_bshd(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, scale,
                        window_size_left, window_size_right, seqused_k, alibi_slopes, block_table, rng_state=None):
    """Checks, then runs the kernel on [B,S,H,D] inputs, or packed [T,H,D] ones with
    cum_seq_q/k (torch's varlen_attn): (out in the kernel's layout, lse)."""
    _check_flash_extras(return_debug_mask, alibi_slopes=alibi_slopes, block_table=block_table)
    window = _window(window_size_left, window_size_right)
    # FlashAttention's window is bottom-right aligned, as its causal mask; (-1, 0) is causal.
    if _packed(q, k, v, cum_seq_q, cum_seq_k, dropout_p, seqused_k):
        return _ops.flash_attention_varlen_fwd(q, k, v, cum_seq_q, cum_seq_k, int(max_q), int(max_k),
                                               bool(is_causal), "bottom_right", scale, False, *window, 0.0, None,
                                               float(dropout_p), rng_state)
    _check_dense(q, k, v, dropout_p, dropout=rng_state is not None)
    q_, k_, v_ = _bhsd(q, k, v)
    out, lse = _ops.flash_attention_fwd(q_, k_, v_, bool(is_causal), "bottom_right", scale, seqused_k, False,
                                        *window, 0.0, None, float(dropout_p), rng_state)
    return out.transpose(1, 2), lse


def flash_forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                  scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None):
    # num_splits only tunes how the work is split (1 = batch invariant); the kernel never splits KV.
    rng_state, seed_slot, offset_slot = _dropout_rng(q, dropout_p)
    out, lse = _flash_forward_bshd(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                   return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                                   alibi_slopes, block_table, rng_state)
    return _like(out, q), lse, seed_slot, offset_slot, _no_debug_mask(q)


def flash_forward_inplace(out, q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                          return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                          seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    result, lse = _flash_forward_bshd(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                      return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                                      alibi_slopes, block_table)
    out.copy_(result)
    return lse


def flash_backward(grad_out, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                   rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    window = _window(window_size_left, window_size_right)
    variants = (0.0, None, float(dropout_p), _rng_from_slot(rng_state, dropout_p))
    if _packed(q, k, v, cum_seq_q, cum_seq_k, dropout_p):
        grads = _ops.flash_attention_varlen_bwd(grad_out.contiguous(), None, q, k, v, out, lse.contiguous(),
                                                cum_seq_q, cum_seq_k, int(max_q), int(max_k), bool(is_causal),
                                                "bottom_right", scale, _deterministic(), *window, *variants)
        return tuple(_like(g, t) for g, t in zip(grads[:3], (q, k, v)))
    _check_dense(q, k, v, dropout_p, dropout=True)
    grad_out, q_, k_, v_, out = _bhsd(grad_out.contiguous(), q, k, v, out)
    grads = _ops.flash_attention_bwd(grad_out, None, q_, k_, v_, out, lse.contiguous(), bool(is_causal),
                                     "bottom_right", scale, None, _deterministic(), *window, *variants)
    return tuple(_like(g.transpose(1, 2), t) for g, t in zip(grads[:3], (q, k, v)))
