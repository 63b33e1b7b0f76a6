"""Attention masks: reading them as the kernel's own masking, and attention for the rest.

One internal meaning for every caller: a bool *keep* mask, True = may attend. The
two public conventions convert into it at the boundary:
- Hugging Face and SDPA masks: bool True = attend (`keep_mask`);
- torch.nn masks (nn.MultiheadAttention, nn.TransformerEncoderLayer): bool
  True = blocked (`keep_mask_torch_nn`).
Float masks are additive in both.

The kernel expresses key padding on the right (`seqlens_k`), a causal mask in either
alignment, or both. `kernel_plan` finds the (is_causal, causal_alignment, seqlens_k)
that reproduce a keep mask exactly, or returns None. It costs a few passes over the
[B, Sq, Sk] mask: for a CUDA mask that means a host sync, so callers cache the plan of
a mask they expect to see again (`PlanCache`). A mask the kernel cannot express runs
`attention_with_bias`, plain PyTorch, announced once per kind by `warn_once`.
Shared by tfkernels.nn, the Hugging Face integration and the SDPA backend.
"""
import math
import warnings
import weakref
from typing import NamedTuple, Optional

import torch

from . import reference

__all__ = ["keep_mask", "keep_mask_torch_nn", "additive_bias", "KernelPlan", "kernel_plan", "PlanCache", "attention_with_bias",
           "warn_once"]


# --------------------------------------------------------------------------- conventions

def _keep_from_float(mask, blocked):
    """`blocked` (bool, same shape) inverted when the float mask holds only 0 and blocked values, else None."""
    if not bool((blocked | (mask == 0)).all()):
        return None
    return ~blocked


def keep_mask(mask):
    """Hugging Face / SDPA mask (bool True = attend, or additive float) -> bool keep mask,
    or None when the float mask holds biases. A float value blocks when it is -inf or
    finfo.min (transformers' eager masks)."""
    if mask.dtype == torch.bool:
        return mask
    return _keep_from_float(mask, mask <= torch.finfo(mask.dtype).min)


def keep_mask_torch_nn(mask, name):
    """torch.nn mask (bool True = blocked, or additive float) -> bool keep mask, or None
    when the float mask holds biases. Only -inf blocks a float mask: torch treats a
    finite value as a bias (a row of finfo.min averages every value; the kernel gives 0)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"tfkernels: {name} must be a bool or floating-point tensor, got {mask.dtype}")
    return _keep_from_float(mask, torch.isneginf(mask))


def additive_bias(mask):
    """Keep mask (bool True = attend) -> additive float mask (0 / -inf); a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


# --------------------------------------------------------------------------- the kernel's reading of a mask

def _as_4d(mask, batch, seqlen_q, seqlen_k):
    """The mask viewed as [B|1, H|1, Sq, Sk] (broadcast, no copy), or None if it does not broadcast."""
    if mask.dim() > 4:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seqlen_q) or mask.shape[3] not in (1, seqlen_k):
        return None
    return mask.expand(mask.shape[0], mask.shape[1], seqlen_q, seqlen_k)


class KernelPlan(NamedTuple):
    """The kernel arguments that reproduce a mask (flash_attention's names)."""
    is_causal: bool
    causal_alignment: str
    seqlens_k: Optional[torch.Tensor]  # None: no key padded
    window_size: tuple = (-1, -1)


def kernel_plan(mask, batch, seqlen_q, seqlen_k, prefer_causal, sliding_window=None):
    """The KernelPlan that reproduces `mask` exactly, or None.

    mask: Hugging Face / SDPA convention (bool True = attend, or additive float),
    broadcastable to [B, H, Sq, Sk] with the same pattern in every head.
    `prefer_causal` picks the causal reading first when several fit (they then agree
    on every visible key). seqlens_k is None when no key is padded, else one past the
    last key that some query of each batch element sees. `sliding_window` W (Hugging
    Face's: a query sees the W keys up to its own position) adds the window
    (W - 1, W - 1) to the readings tried; the causal flag then bounds the right side.
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
    # One past the last key some query sees (not a count: a window hides the first keys from every query).
    seen = keep.any(dim=1)
    if seqlen_k == 0:
        lens = torch.zeros(batch, dtype=torch.long, device=keep.device)
    else:
        lens = torch.where(seen, torch.arange(1, seqlen_k + 1, device=keep.device), 0).amax(dim=-1)
    seqlens_k = None if bool((lens == seqlen_k).all()) else lens
    readings = [(True, "top_left"), (True, "bottom_right"), (False, "top_left")]
    if not prefer_causal:
        readings = readings[::-1]
    windows = [(-1, -1)] + ([(sliding_window - 1, sliding_window - 1)] if sliding_window else [])
    for window in windows:
        for causal, alignment in readings:
            expected = reference.attention_mask(seqlen_q, seqlen_k, batch=batch, is_causal=causal,
                                                causal_alignment=alignment, seqlens_k=lens, window_size=window,
                                                device=keep.device)
            if torch.equal(keep, expected[:, 0].expand(batch, seqlen_q, seqlen_k)):
                return KernelPlan(causal, alignment, seqlens_k, window)
    return None


class PlanCache:
    """The plans of the last few masks seen: every layer of a forward gets the same mask
    tensor, or one of a few (models that alternate sliding-window and full layers).

    `plan_fn(mask, *args)` runs on a miss; a hit needs the same tensor object, unchanged
    since (its version counter), and the same args.
    """

    def __init__(self, plan_fn=kernel_plan, size=4):
        self.plan_fn = plan_fn
        self.size = size
        self.entries = []  # [(weakref, version, args, plan)], most recent last

    def get(self, mask, args):
        if mask.is_inference():  # inference tensors have no version counter: plan, don't cache
            return self.plan_fn(mask, *args)
        for index, (ref, version, cached_args, plan) in enumerate(self.entries):
            if ref() is mask and version == mask._version and cached_args == args:
                self.entries.append(self.entries.pop(index))
                return plan
        plan = self.plan_fn(mask, *args)
        if not torch.compiler.is_compiling():
            self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1):]
            self.entries.append((weakref.ref(mask), mask._version, args, plan))
        return plan


# --------------------------------------------------------------------------- masks outside the kernel's reach

def attention_with_bias(q, k, v, bias, scale=None, *, softcap=0.0, sinks=None, dropout_p=0.0, generator=None):
    """Attention with an additive bias in plain PyTorch, for masks the kernel cannot express.

    q [B,H,Sq,D], k/v [B,Hkv,Sk,D] (GQA by repetition); bias is additive (0 / -inf, or
    any float) and broadcasts to [B,H,Sq,Sk]. The variants mean what they mean for
    flash_attention: scores s = scale * q.k, capped to softcap * tanh(s / softcap), plus
    the bias; sinks [H] join each row's softmax denominator; dropout_p drops
    probabilities (scaled by 1 / (1 - p)) with `generator`'s stream. Scores and softmax
    are float32 (float64 stays float64); a query row that sees no key gets 0, as in the
    kernel.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q, k.transpose(-1, -2)).to(compute) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias.to(compute)
    if sinks is None:
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    else:  # the sink is one more logit per row, whose probability goes nowhere
        sink = sinks.to(compute).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    if dropout_p > 0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs.to(v.dtype), v)


_warned = set()


def warn_once(key, message):
    """A RuntimeWarning the first time `key` is seen in this process (one per fallback kind, not per layer)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
