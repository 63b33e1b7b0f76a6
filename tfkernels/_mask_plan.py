"""Reading an attention mask as the kernel's own masking, when it can be.

The kernel expresses key padding on the right (`seqlens_k`), a causal mask in either
alignment, or both. `kernel_plan` finds the (is_causal, causal_alignment, seqlens_k)
that reproduce a given mask exactly, or returns None. It costs a few passes over the
[B, Sq, Sk] mask: for a CUDA mask that means a host sync, so callers cache the plan of
a mask they expect to see again (`PlanCache`). Shared by the Hugging Face integration
and the SDPA backend.
"""
import weakref

import torch

from . import reference

__all__ = ["keep_mask", "kernel_plan", "PlanCache"]


def keep_mask(mask):
    """Bool or additive float mask -> bool 'may attend' of the same shape, or None when
    the float mask holds biases (values other than 0 and a blocking large negative)."""
    if mask.dtype == torch.bool:
        return mask
    blocked = mask <= torch.finfo(mask.dtype).min  # finfo.min (transformers' eager masks) or -inf
    if not bool((blocked | (mask == 0)).all()):
        return None
    return ~blocked


def _as_4d(mask, batch, seqlen_q, seqlen_k):
    """The mask viewed as [B|1, H|1, Sq, Sk] (broadcast, no copy), or None if it does not broadcast."""
    if mask.dim() > 4:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seqlen_q) or mask.shape[3] not in (1, seqlen_k):
        return None
    return mask.expand(mask.shape[0], mask.shape[1], seqlen_q, seqlen_k)


def kernel_plan(mask, batch, seqlen_q, seqlen_k, prefer_causal):
    """(is_causal, causal_alignment, seqlens_k) that reproduce `mask` exactly, or None.

    mask: bool (True = attend) or additive float, broadcastable to [B, H, Sq, Sk] with
    the same pattern in every head. `prefer_causal` picks the causal reading first when
    several fit (they then agree on every visible key). seqlens_k is None when no key is
    padded, else the number of keys that some query of each batch element sees.
    """
    mask = _as_4d(mask, batch, seqlen_q, seqlen_k)
    if mask is None:
        return None
    keep = keep_mask(mask)
    if keep is None:
        return None
    if keep.shape[1] != 1:
        if not bool((keep == keep[:, :1]).all()):
            return None
        keep = keep[:, :1]
    keep = keep[:, 0].expand(batch, seqlen_q, seqlen_k)
    lens = keep.any(dim=1).sum(dim=-1)  # keys that some query sees
    candidates = [(True, "top_left"), (True, "bottom_right"), (False, "top_left")]
    if not prefer_causal:
        candidates = candidates[::-1]
    for causal, alignment in candidates:
        expected = reference.attention_mask(seqlen_q, seqlen_k, batch=batch, is_causal=causal,
                                            causal_alignment=alignment, seqlens_k=lens, device=keep.device)
        if torch.equal(keep, expected[:, 0].expand(batch, seqlen_q, seqlen_k)):
            return causal, alignment, (None if bool((lens == seqlen_k).all()) else lens)
    return None


class PlanCache:
    """The plan of the last mask seen: every layer of a forward gets the same mask tensor.

    `plan_fn(mask, *args)` runs on a miss; a hit needs the same tensor object, unchanged
    since (its version counter), and the same args.
    """

    def __init__(self, plan_fn=kernel_plan):
        self.plan_fn = plan_fn
        self.key, self.plan = None, None

    def get(self, mask, args):
        if mask.is_inference():  # inference tensors have no version counter: plan, don't cache
            return self.plan_fn(mask, *args)
        if self.key is not None:
            ref, version, cached_args = self.key
            if ref() is mask and version == mask._version and cached_args == args:
                return self.plan
        plan = self.plan_fn(mask, *args)
        if not torch.compiler.is_compiling():
            self.key, self.plan = (weakref.ref(mask), mask._version, args), plan
        return plan
