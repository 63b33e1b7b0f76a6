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
  model's sliding window: the kernel, with seqlens_k and window_size.
- Anything else (left padding, packed sequences, position biases, float biases):
  plain PyTorch math attention, with a one-time warning.
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
from .._masks import KernelPlan, PlanCache, additive_bias, attention_with_bias, warn_once

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
        if attention_mask is None:
            plan = _maskless_plan(bool(causal), seqlen_q, seqlen_k, sliding_window)
        else:
            plan = _plans.get(attention_mask, (batch, seqlen_q, seqlen_k, bool(causal), sliding_window))
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
