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

__all__ = ["keep_mask", "keep_mask_torch_nn", "additive_bias", "KernelPlan", "kernel_plan", "VarlenPlan", "varlen_plan",
           "attention_varlen_plan", "PlanCache", "attention_with_bias", "warn_once"]


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


class VarlenPlan(NamedTuple):
    """Packed sequences that reproduce a mask (flash_attention_varlen's arguments).

    Row i of batch entry b is flat row b * Sq + i of the [B*Sq, H, D] queries (keys
    likewise); q_index / k_index list the rows that join a sequence, in packed order.
    Rows outside q_index see no key and get 0, as the kernel gives such rows.
    """
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [N + 1]
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    is_causal: bool
    causal_alignment: str
    window_size: tuple = (-1, -1)


def _segments_of_rows(sees):
    """One segment per batch entry: the rows that see something, when they are contiguous.

    sees: bool [B, S]. Returns (segment id [B, S], -1 = none; position within it), or None.
    """
    batch, length = sees.shape
    count = sees.sum(dim=1)
    start = torch.where(count > 0, sees.int().argmax(dim=1), 0)
    pos = torch.arange(length, device=sees.device) - start[:, None]
    inside = (pos >= 0) & (pos < count[:, None])
    if not torch.equal(inside, sees):
        return None
    ids = torch.arange(batch, device=sees.device)[:, None].expand(batch, length)
    return torch.where(sees, ids, -1), pos


def _segments_from_positions(position_ids, batch, length):
    """Packed sequences of each batch entry from position ids restarting at 0 (transformers' padding-free
    batches): (segment id [B, S], position within it), or None when the ids are not such a packing."""
    if position_ids is None or tuple(position_ids.shape) != (batch, length) or length == 0:
        return None
    starts = position_ids == 0
    if not bool(starts[:, 0].all()):
        return None
    local = torch.cumsum(starts.long(), dim=1) - 1
    ids = local + torch.arange(batch, device=position_ids.device)[:, None] * length  # unique across the batch
    first = torch.cummax(torch.where(starts, torch.arange(length, device=starts.device), 0), dim=1).values
    pos = torch.arange(length, device=starts.device) - first
    if not torch.equal(pos, position_ids.long()):
        return None
    return ids, pos


def _band(pos_q, pos_k, len_q, len_k, causal, alignment, window):
    """Whether packed query position pos_q sees packed key position pos_k (flash_attention's band)."""
    diagonal = pos_q + (len_k - len_q if alignment == "bottom_right" else 0)
    left, right = window
    ok = torch.ones_like(pos_q + pos_k, dtype=torch.bool)
    if causal:
        ok = ok & (pos_k <= diagonal)
    if left >= 0:
        ok = ok & (pos_k >= diagonal - left)
    if right >= 0:
        ok = ok & (pos_k <= diagonal + right)
    return ok


def varlen_plan(mask, batch, seqlen_q, seqlen_k, prefer_causal, sliding_window=None, position_ids=None):
    """The VarlenPlan that reproduces `mask` exactly, or None.

    The sequences are the contiguous rows of each batch entry that see a key (left,
    right or both-sided padding), or, with `position_ids` restarting at 0 and Sq ==
    Sk, the packed sequences they mark. Either way the plan is used only when the
    band of some reading (as kernel_plan's) inside every sequence gives back the
    mask, element for element; `mask=None` means every key is visible, causality
    aside (a padding-free packed batch then relies on position_ids alone).
    """
    if mask is None:
        keep = None
    else:
        mask = _as_4d(mask, batch, seqlen_q, seqlen_k)
        keep = None if mask is None else keep_mask(mask)
        if keep is None or (keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all())):
            return None
        keep = keep[:, 0].expand(batch, seqlen_q, seqlen_k)
    packed = _segments_from_positions(position_ids, batch, seqlen_q) if seqlen_q == seqlen_k else None
    if packed is not None:
        (seg_q, pos_q), (seg_k, pos_k) = packed, packed
    elif keep is not None:
        rows, cols = _segments_of_rows(keep.any(dim=2)), _segments_of_rows(keep.any(dim=1))
        if rows is None or cols is None:
            return None
        (seg_q, pos_q), (seg_k, pos_k) = rows, cols
    else:
        return None
    # Sequence lengths, indexed by segment id (ids are < B * S).
    size = batch * max(seqlen_q, seqlen_k, 1)
    len_q = torch.bincount(seg_q[seg_q >= 0], minlength=size)
    len_k = torch.bincount(seg_k[seg_k >= 0], minlength=size)
    same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] >= 0)
    lq = len_q[seg_q.clamp(min=0)][:, :, None]
    lk = len_k[seg_k.clamp(min=0)][:, None, :]
    readings = [(True, "top_left"), (True, "bottom_right"), (False, "top_left")]
    if not prefer_causal:
        readings = readings[::-1]
    windows = [(-1, -1)] + ([(sliding_window - 1, sliding_window - 1)] if sliding_window else [])
    if keep is None:  # no mask: the model's causality, no window beyond the one it passes
        readings, windows = readings[:1] if prefer_causal else readings[-1:], windows[-1:]
    for window in windows:
        for causal, alignment in readings:
            expected = same & _band(pos_q[:, :, None], pos_k[:, None, :], lq, lk, causal, alignment, window)
            if keep is None or torch.equal(keep, expected):
                return _packing(seg_q, seg_k, len_q, len_k, causal, alignment, window)
    return None


def _packing(seg_q, seg_k, len_q, len_k, causal, alignment, window):
    """The VarlenPlan of segment ids (ascending along the flattened rows, which they are)."""
    used = torch.unique(torch.cat([seg_q[seg_q >= 0], seg_k[seg_k >= 0]]))
    lq, lk = len_q[used], len_k[used]
    zero = torch.zeros(1, dtype=torch.int32, device=used.device)
    cu_q = torch.cat([zero, torch.cumsum(lq, 0).to(torch.int32)])
    cu_k = torch.cat([zero, torch.cumsum(lk, 0).to(torch.int32)])
    return VarlenPlan(torch.nonzero(seg_q.flatten() >= 0).flatten(), torch.nonzero(seg_k.flatten() >= 0).flatten(),
                      cu_q, cu_k, int(lq.max()) if len(lq) else 0, int(lk.max()) if len(lk) else 0, causal,
                      alignment, window)


def attention_varlen_plan(query, key, value, plan, **kwargs):
    """Attention of [B,H,S,D] tensors run as the packed sequences of `plan`; returns [B,Sq,H,D]
    (rows outside every sequence are 0). kwargs go to flash_attention_varlen."""
    from . import ops

    batch, heads, seqlen_q, dim = query.shape
    seqlen_k = key.shape[2]
    # One gather each, straight from the [B,H,S,D] layout: rows (b, :, i) -> [rows, H, D].
    q = query[plan.q_index // seqlen_q, :, plan.q_index % seqlen_q]
    k = key[plan.k_index // seqlen_k, :, plan.k_index % seqlen_k]
    v = value[plan.k_index // seqlen_k, :, plan.k_index % seqlen_k]
    out = ops.flash_attention_varlen(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                                     plan.max_seqlen_k, is_causal=plan.is_causal,
                                     causal_alignment=plan.causal_alignment, window_size=plan.window_size, **kwargs)
    full = out.new_zeros((batch * seqlen_q, heads, out.shape[-1]))
    return full.index_copy(0, plan.q_index, out).view(batch, seqlen_q, heads, out.shape[-1])


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
