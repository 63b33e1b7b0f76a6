"""tfkernels.nn.TransformerEncoderLayer: nn.TransformerEncoderLayer's interface on the fused kernels."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from .._masks import additive_bias, attention_with_bias, keep_mask_torch_nn, warn_once
from .modules import SelfAttention

__all__ = ["TransformerEncoderLayer", "why_not_convertible"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _gelu_form(activation):
    """'none'/'tanh' when activation is a GELU the fused MLP can run, else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    return None


def _torch_nn_bias(mask):
    """A torch.nn mask (bool True = blocked, or additive float) as an additive float mask."""
    return additive_bias(~mask if mask.dtype == torch.bool else mask)


@dataclass
class _AttentionPlan:
    """How one forward runs attention: the kernel (causal, seqlens) or a bias for the math path."""
    causal: bool = False
    seqlens: torch.Tensor = None
    bias: torch.Tensor = None  # additive [B or 1, H or 1, S, S]; set -> math path


class TransformerEncoderLayer(nn.Module):
    """Drop-in for nn.TransformerEncoderLayer running on the fused kernels.

    Same constructor arguments, attribute names and state_dict keys
    (self_attn.in_proj_weight, self_attn.in_proj_bias, self_attn.out_proj.*,
    linear1.*, linear2.*, norm1.*, norm2.*), so ``load_state_dict`` from a torch layer
    works unchanged, and the same forward(src, src_mask, src_key_padding_mask, is_causal).

    Attention runs fused_qkv + flash_attention; a GELU feed-forward runs fused_mlp
    (linear_gelu then dropout then linear2 when its dropout is active); a ReLU or other
    activation runs the plain nn.Linear path.

    Masks: ``src_key_padding_mask`` (bool True = padding, or float 0/-inf) that is right
    padding becomes the kernel's seqlens_k; ``is_causal=True`` (with or without a mask)
    or a ``src_mask`` that is exactly the causal mask becomes the kernel's causal flag.
    Any other mask (left padding, arbitrary patterns, float biases) runs attention in
    plain PyTorch on the same fused projections, with a one-time RuntimeWarning. Reading
    masks costs a host sync; pass ``seqlens=`` (valid lengths [B]) instead for
    torch.compile(fullgraph=True) and CUDA graphs. Padded query rows are computed (they
    attend to the valid keys), as in torch's non-nested path, not zeroed.

    Dropout, as in torch: the attention dropout (on the attention weights, in training
    only) runs in the kernel (flash_attention's dropout_p) and defaults to ``dropout``;
    ``attention_dropout=`` sets it apart from the others. dropout, dropout1 and dropout2
    are plain nn.Dropout modules, applied exactly where torch applies them. The kernel
    draws its dropout mask from torch's default generator, so runs are reproducible
    under torch.manual_seed, but the masks differ from torch's.

    Extra keyword-only arguments: ``attention_dropout`` (see above) and, in forward,
    ``seqlens``.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *, attention_dropout=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.self_attn = SelfAttention(d_model, nhead, dropout=attention_dropout, bias=bias, **factory)
        # Read by nn.TransformerEncoder (sequence dim) and by users of torch's layer.
        self.self_attn.batch_first = batch_first
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation should be relu/gelu, not {activation}")
            activation = _ACTIVATIONS[activation]
        if not callable(activation):
            raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
        self.activation = activation
        # Same meaning as torch's attribute: 1 relu, 2 gelu, 0 other.
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0

    @property
    def batch_first(self):
        return self.self_attn.batch_first

    @property
    def attention_dropout(self):
        return self.self_attn.dropout

    @classmethod
    def from_torch(cls, layer, *, attention_dropout=None):
        """A fused layer that takes over `layer`'s parameters and submodules (the same
        Parameter objects, so optimizers and tied weights stay valid), device, dtype and
        train mode. `attention_dropout=None` keeps torch's attention dropout
        (layer.self_attn.dropout)."""
        reason = why_not_convertible(layer)
        if reason:
            raise ValueError(f"tfkernels: cannot convert this nn.TransformerEncoderLayer: {reason}")
        attn = layer.self_attn
        weight = attn.in_proj_weight
        new = cls(attn.embed_dim, attn.num_heads, layer.linear1.out_features, dropout=layer.dropout.p,
                  activation=layer.activation, layer_norm_eps=layer.norm1.eps, batch_first=attn.batch_first,
                  norm_first=layer.norm_first, bias=attn.in_proj_bias is not None, device="meta", dtype=weight.dtype,
                  attention_dropout=attn.dropout if attention_dropout is None else attention_dropout)
        new.self_attn.in_proj_weight = attn.in_proj_weight
        new.self_attn.in_proj_bias = attn.in_proj_bias
        for name in ("linear1", "linear2", "norm1", "norm2", "dropout", "dropout1", "dropout2"):
            setattr(new, name, getattr(layer, name))
        new.self_attn.out_proj = attn.out_proj
        leftover = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
        if leftover:  # pragma: no cover - guards the list above against torch adding parameters
            raise RuntimeError(f"tfkernels: conversion left parameters unset: {leftover}")
        new.train(layer.training)
        return new

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, seqlens=None):
        if src.is_nested:
            raise ValueError("tfkernels.nn.TransformerEncoderLayer does not take nested tensors; pass a padded "
                             "tensor with src_key_padding_mask (convert() turns nn.TransformerEncoder's nested "
                             "fast path off for this reason)")
        unbatched = src.dim() == 2
        if unbatched:
            x = src.unsqueeze(0)
            if src_key_padding_mask is not None:
                src_key_padding_mask = src_key_padding_mask.unsqueeze(0)
        elif src.dim() == 3:
            x = src if self.batch_first else src.transpose(0, 1).contiguous()
        else:
            raise ValueError(f"tfkernels: src must be 2-D (S, E) or 3-D, got {src.dim()}-D {tuple(src.shape)}")
        plan = self._plan(src_mask, src_key_padding_mask, is_causal, seqlens, x.shape[0], x.shape[1])
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), plan)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, plan))
            x = self.norm2(x + self._ff_block(x))
        if unbatched:
            return x.squeeze(0)
        return x if self.batch_first else x.transpose(0, 1).contiguous()  # (S, B, E) in memory, as torch's

    # -- attention

    def _plan(self, src_mask, key_padding_mask, is_causal, seqlens, batch, seqlen):
        plan = _AttentionPlan(causal=bool(is_causal), seqlens=seqlens)
        if seqlens is not None and key_padding_mask is not None:
            raise ValueError("tfkernels: pass either seqlens or src_key_padding_mask, not both")
        bias = None
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, seqlen):
                raise ValueError(f"tfkernels: src_key_padding_mask must have shape (batch, seq) = {(batch, seqlen)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            keep = keep_mask_torch_nn(key_padding_mask, "src_key_padding_mask")
            lens = None
            if keep is not None:
                lens = keep.sum(dim=1)
                if not torch.equal(keep, torch.arange(seqlen, device=keep.device)[None, :] < lens[:, None]):
                    lens = None  # left padding or holes
            if lens is not None:
                plan.seqlens = lens if bool((lens < seqlen).any()) else None
            else:
                bias = _torch_nn_bias(key_padding_mask).view(batch, 1, 1, seqlen)
        if src_mask is not None:
            keep = keep_mask_torch_nn(src_mask, "src_mask")
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=src_mask.device).tril()
            if keep is not None and keep.dim() == 2 and torch.equal(keep, causal):
                plan.causal = True
            elif keep is not None and bool(keep.all()):
                plan.causal = False
            else:
                attn_bias = _torch_nn_bias(src_mask)
                if attn_bias.dim() == 3:  # (B * nhead, S, S), torch's per-head layout
                    attn_bias = attn_bias.view(batch, -1, seqlen, seqlen)
                bias = attn_bias if bias is None else bias + attn_bias
                plan.causal = False
        if bias is not None:
            warn_once(("encoder", "mask"), "tfkernels.nn.TransformerEncoderLayer: the mask is not plain right "
                      "padding and/or causal; attention for it runs in plain PyTorch (slower).")
            if plan.seqlens is not None or plan.causal:
                bias = bias + additive_bias(reference.attention_mask(
                    seqlen, seqlen, batch=batch, is_causal=plan.causal, seqlens_k=plan.seqlens, device=bias.device))
            plan.bias, plan.seqlens, plan.causal = bias, None, False
        return plan

    def _sa_block(self, x, plan):
        if plan.bias is None:
            out = self.self_attn(x, plan.seqlens, is_causal=plan.causal)
        else:
            attn = self.self_attn
            q, k, v = ops.fused_qkv(x, attn.in_proj_weight, attn.in_proj_bias, num_heads=attn.num_heads,
                                    num_kv_heads=attn.num_kv_heads)
            o = attention_with_bias(q, k, v, plan.bias, dropout_p=attn.active_dropout)
            out = attn.out_proj(o.transpose(1, 2).reshape(x.shape))
        return self.dropout1(out)

    # -- feed-forward

    def _ff_block(self, x):
        approximate = _gelu_form(self.activation)
        if approximate is None:
            h = self.linear2(self.dropout(self.activation(self.linear1(x))))
        elif self.training and self.dropout.p > 0:
            h = ops.linear_gelu(x, self.linear1.weight, self.linear1.bias, approximate=approximate)
            h = self.linear2(self.dropout(h))
        else:
            h = ops.fused_mlp(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                              approximate=approximate)
        return self.dropout2(h)

    def extra_repr(self):
        act = {1: "relu", 2: "gelu"}.get(self.activation_relu_or_gelu, getattr(self.activation, "__name__", "custom"))
        return (f"batch_first={self.batch_first}, norm_first={self.norm_first}, activation={act}, "
                f"attention_dropout={self.self_attn.dropout}")


# --------------------------------------------------------------------------- which torch layers can be taken over

_PLAIN_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _has_hooks(module):
    return any(len(getattr(m, attr, {})) for m in module.modules()
               for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


def why_not_convertible(layer):
    """None when `layer` (an nn.TransformerEncoderLayer) can be swapped, else the reason."""
    attn = layer.self_attn
    if type(layer) is not nn.TransformerEncoderLayer:
        return f"{type(layer).__name__} subclasses nn.TransformerEncoderLayer; its forward may differ"
    if not isinstance(attn, nn.MultiheadAttention) or type(attn) is not nn.MultiheadAttention:
        return f"self_attn is a {type(attn).__name__}, not a plain nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim:
        return "self_attn has kdim/vdim != embed_dim (separate q/k/v projection weights)"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "self_attn uses add_bias_kv or add_zero_attn"
    if attn.head_dim > 256:
        return f"head dim {attn.head_dim} > 256, the kernels' maximum"
    if attn.in_proj_weight.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {attn.in_proj_weight.dtype} is not one the kernels support"
    for name, sub in (("self_attn.out_proj", attn.out_proj), ("linear1", layer.linear1), ("linear2", layer.linear2)):
        if type(sub) not in _PLAIN_LINEAR:
            return f"{name} is a {type(sub).__name__}, not a plain nn.Linear (wrapped or quantized)"
    if type(layer.norm1) is not nn.LayerNorm or type(layer.norm2) is not nn.LayerNorm:
        return "norm1/norm2 are not plain nn.LayerNorm"
    if _has_hooks(layer):
        return "hooks are attached to the layer or its submodules (swapping would drop them)"
    return None
