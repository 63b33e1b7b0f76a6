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
  (top-left, or bottom-right as in cached decoding): the kernel, with seqlens_k.
- Anything else (left padding, sliding windows, packed sequences, position biases,
  float biases): plain PyTorch math attention, with a one-time warning.
Reading a mask costs a host sync per new mask (cached across layers).

Unsupported, with a clear error: attention dropout > 0 (the kernel has no dropout;
HF passes it only in training), softcap, attention sinks (s_aux).
"""
import torch

from .. import ops, reference
from .._masks import PlanCache, additive_bias, attention_with_bias, warn_once

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
                      position_bias=None, **kwargs):
    """transformers attention function: q [B,H,Sq,D], k/v [B,Hkv,Sk,D] -> ([B,Sq,H,D], None)."""
    if dropout:
        raise ValueError(f"tfkernels attention has no dropout, got dropout={dropout} (transformers passes the "
                         "config's attention dropout in training): set it to 0 in the config (e.g. "
                         "attention_probs_dropout_prob / attn_pdrop / attention_dropout = 0.0), or use eval()")
    if kwargs.get("softcap") is not None:
        raise ValueError("tfkernels attention does not support softcap")
    if kwargs.get("s_aux") is not None:
        raise ValueError("tfkernels attention does not support attention sinks (s_aux)")
    if kwargs.get("output_attentions", False):
        warn_once(("hf", "weights"), "tfkernels attention does not return attention weights "
                   "(output_attentions=True); they are None.")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    # The kernel has no additive bias: a position bias (T5, MPT, ...) always runs the fallback below.
    plan = None
    if position_bias is None:
        if attention_mask is None:
            plan = (bool(causal) and seqlen_q > 1, "top_left", None)
        else:
            plan = _plans.get(attention_mask, (batch, seqlen_q, seqlen_k, bool(causal)))
    if plan is not None:
        is_causal_k, alignment, seqlens_k = plan
        out = ops.flash_attention(query, key, value, is_causal=is_causal_k, causal_alignment=alignment,
                                  scale=scaling, seqlens_k=seqlens_k)
    else:
        if position_bias is not None:
            warn_once(("hf", "bias"), "tfkernels attention: the kernel takes no position bias (T5-style relative "
                       "attention); attention with one runs in plain PyTorch (slower).")
        else:
            warn_once(("hf", "mask"), "tfkernels attention: this attention mask is not plain right padding (with "
                       "or without a causal mask); attention for it runs in plain PyTorch (slower).")
        if attention_mask is None:
            bias = torch.zeros((), device=query.device)
            if causal and seqlen_q > 1:
                bias = reference.attention_mask(seqlen_q, seqlen_k, is_causal=True, device=query.device)
        else:
            bias = attention_mask
        bias = additive_bias(bias)
        if position_bias is not None:
            bias = bias + position_bias
        out = attention_with_bias(query, key, value, bias, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name=NAME):
    """Register the attention and mask functions under `name` (done for "tfkernels" on import)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
