"""tfkernels attention for Hugging Face transformers.

    import tfkernels.integrations.huggingface  # registers "tfkernels"
    model = AutoModel.from_config(config, attn_implementation="tfkernels")
    # or an existing model: model.set_attn_implementation("tfkernels")

Importing this module registers `attention_forward` with transformers'
AttentionInterface and, under the same name, transformers' `sdpa_mask` with
AttentionMaskInterface, so models build the same masks for us as for "sdpa": None
when the mask is plain causal or full (no padding), else a 4-D boolean mask
[B, 1, Sq, Sk] (True = attend). Models or users may also pass 4-D float masks
(0 = attend, large negative = blocked).

How masks run:
- None: the kernel, causal when the module is causal (`is_causal` kwarg, else
  `module.is_causal`) and there is more than one query (SDPA's rule).
- A 4-D mask that is exactly key padding on the right, alone or with a causal mask
  (top-left, or bottom-right as in cached decoding), and with or without the
  model's sliding window: the kernel, with seqlens_k and window_size. In cached
  decoding without gradients (a few queries at the end of the keys) that is the
  KV-cache kernel, flash_attention_with_kvcache, which splits the keys across
  blocks when the queries alone cannot fill the machine.
- Any other padding whose valid rows are contiguous in each batch entry (left
  padding, as batched generation uses): the kernel on the packed valid rows
  (flash_attention_varlen); the rows are gathered and the output scattered back.
- Padding-free packed batches (DataCollatorWithFlattening: `cu_seq_lens_q/k`
  kwargs, or position ids restarting at 0 within a row): flash_attention_varlen
  over the sequences they mark, checked against the model's mask when it has one.
- Anything else (position biases, float biases, arbitrary masks): plain PyTorch
  math attention, with a one-time warning.
Reading a mask costs a host sync per new mask (cached across layers).

Passed through to the kernel (and to the fallback, which means the same):
- `sliding_window` W (Mistral, Gemma 2/3, GPT-OSS): window_size (W - 1, W - 1), the
  window of transformers' masks (a query sees its W - 1 predecessors) and of its
  FlashAttention integration;
- `softcap` (Gemma 2's attn_logit_softcapping): softcap;
- `s_aux` (GPT-OSS's per-head sinks): sinks, with their gradient;
- `dropout` (the config's attention dropout, which transformers passes only in
  training): dropout_p, drawn from torch's default generator.
"""
import torch

from .. import ops, reference
from .._masks import (KernelPlan, PlanCache, VarlenPlan, additive_bias, attention_varlen_plan, attention_with_bias,
                      varlen_plan, warn_once)

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("tfkernels.integrations.huggingface needs Hugging Face transformers "
                      "(`pip install transformers`)") from err

__all__ = ["NAME", "attention_forward", "register"]

NAME = "tfkernels"


_plans = PlanCache()


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention function: q [B,H,Sq,D], k/v [B,Hkv,Sk,D] -> ([B,Sq,H,D], None)."""
    if kwargs.get("output_attentions", False):
        warn_once(("hf", "weights"), "tfkernels attention does not return attention weights "
                  "(output_attentions=True); they are None.")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    variants = dict(softcap=float(softcap or 0.0), sinks=s_aux, dropout_p=float(dropout or 0.0))
    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    # The kernel has no additive bias: a position bias (T5, MPT, ...) always runs the fallback below.
    plan = None
    if position_bias is None:
        position_ids = _packing_positions(kwargs, batch, seqlen_q, seqlen_k)
        if position_ids is not None:  # a padding-free packed batch: its sequences (checked against any mask)
            plan = _packed_plans.get(position_ids, (_SameMask(attention_mask), batch, seqlen_q, seqlen_k,
                                                    bool(causal), sliding_window))
        if plan is None and attention_mask is None:
            plan = _maskless_plan(bool(causal), seqlen_q, seqlen_k, sliding_window)
        elif plan is None:
            plan = _plans.get(attention_mask, (batch, seqlen_q, seqlen_k, bool(causal), sliding_window))
            if plan is None:  # left padding and the like: the kernel on the packed valid rows
                plan = _padding_plans.get(attention_mask, (batch, seqlen_q, seqlen_k, bool(causal), sliding_window))
    if isinstance(plan, VarlenPlan):
        return attention_varlen_plan(query, key, value, plan, scale=scaling, **variants), None
    if plan is not None and _decodes_from_cache(plan, query, key, value, variants):
        out = ops.flash_attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                               cache_seqlens=_cache_lengths(plan, batch, seqlen_k, query.device),
                                               is_causal=plan.is_causal, scale=scaling, window_size=plan.window_size,
                                               softcap=variants["softcap"], sinks=variants["sinks"])
        return out, None
    if plan is not None:
        out = ops.flash_attention(query, key, value, is_causal=plan.is_causal, causal_alignment=plan.causal_alignment,
                                  scale=scaling, seqlens_k=plan.seqlens_k, window_size=plan.window_size, **variants)
    else:
        if position_bias is not None:
            warn_once(("hf", "bias"), "tfkernels attention: the kernel takes no position bias (T5-style relative "
                      "attention); attention with one runs in plain PyTorch (slower).")
        else:
            warn_once(("hf", "mask"), "tfkernels attention: this attention mask is not plain right padding (with "
                      "or without a causal mask and a sliding window); attention for it runs in plain PyTorch "
                      "(slower).")
        if attention_mask is None:
            bias = torch.zeros((), device=query.device)
            if causal and seqlen_q > 1:
                bias = reference.attention_mask(seqlen_q, seqlen_k, is_causal=True, device=query.device)
        else:
            bias = attention_mask
        bias = additive_bias(bias)
        if position_bias is not None:
            bias = bias + position_bias
        out = attention_with_bias(query, key, value, bias, scale=scaling, **variants)
    return out.transpose(1, 2).contiguous(), None


def _packing_positions(kwargs, batch, seqlen_q, seqlen_k):
    """Position ids of a padding-free packed batch (transformers' DataCollatorWithFlattening:
    `cu_seq_lens_q/k` kwargs, or position ids that restart at 0 inside a row), else None."""
    if seqlen_q != seqlen_k or seqlen_q < 2:
        return None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and batch == 1 and torch.equal(cu_seqlens, kwargs.get("cu_seq_lens_k", cu_seqlens)):
        starts = torch.zeros(seqlen_q, dtype=torch.long, device=cu_seqlens.device)
        starts[cu_seqlens[:-1].long().clamp(max=seqlen_q - 1)] = 1
        first = torch.cummax(torch.where(starts.bool(), torch.arange(seqlen_q, device=starts.device), 0), 0).values
        return (torch.arange(seqlen_q, device=starts.device) - first)[None]
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != seqlen_q:
        return None
    if not bool((position_ids[:, 1:] == 0).any()):  # nothing restarts: one sequence per row
        return None
    return position_ids.expand(batch, seqlen_q)


class _SameMask:
    """A mask as a PlanCache argument: equal only to the same, unchanged tensor (or both None)."""

    def __init__(self, mask):
        self.mask, self.version = mask, (None if mask is None or mask.is_inference() else mask._version)

    def __eq__(self, other):
        return isinstance(other, _SameMask) and self.mask is other.mask and self.version == other.version


def _packed_plan(position_ids, mask, *args):
    return varlen_plan(mask.mask, *args, position_ids=position_ids)


_packed_plans = PlanCache(_packed_plan)  # keyed by the position ids; checked against the mask when there is one
_padding_plans = PlanCache(varlen_plan)  # keyed by the mask

# Queries per batch entry up to which a no-grad call runs the KV-cache kernel (split-KV decode).
_DECODE_MAX_QUERIES = 16


def _decodes_from_cache(plan, query, key, value, variants):
    """Whether this call is cached decoding that the KV-cache kernel runs as it is: a few new
    queries at the end of the keys (bottom-right causal, or one query), no gradient, no dropout."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return False
    if variants["dropout_p"] or query.shape[2] > _DECODE_MAX_QUERIES or query.shape[2] >= key.shape[2]:
        return False
    aligned = (not plan.is_causal and plan.window_size == (-1, -1) and query.shape[2] == 1) or \
        plan.causal_alignment == "bottom_right"
    return aligned and key.stride(-1) == 1 and value.stride(-1) == 1


def _cache_lengths(plan, batch, seqlen_k, device):
    if plan.seqlens_k is None:
        return torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
    return plan.seqlens_k.to(device=device, dtype=torch.int32)


def _maskless_plan(causal, seqlen_q, seqlen_k, sliding_window):
    """The kernel's arguments when transformers passes no mask.

    No mask means SDPA's rule: causal top-left with more than one query, else full.
    transformers drops a sliding-window mask only when the window spans every key;
    a window that a caller passes without a mask still applies (as in transformers'
    FlashAttention integration), read from the end of the keys when there is no
    causal diagonal (a single query is the newest token).
    """
    causal = causal and seqlen_q > 1
    window = (-1, -1)
    if sliding_window and seqlen_k > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    return KernelPlan(causal, "top_left" if causal else "bottom_right", None, window)


def register(name=NAME):
    """Register the attention and mask functions under `name` (done for "tfkernels" on import)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
