"""Modules built on the fused ops, with the parameters of the PyTorch blocks they replace.

- FusedQKV:      nn.Linear(E, (H + 2*Hkv) * D) followed by the head split.
- SelfAttention: nn.MultiheadAttention (batch_first, self-attention), same state_dict keys.
- FusedMLP:      Linear -> GELU -> Linear, keys linear1/linear2 as in nn.TransformerEncoderLayer.
- TransformerEncoderLayer: nn.TransformerEncoderLayer's constructor, state_dict and forward.
- convert(model): swaps every nn.TransformerEncoderLayer in a model for the fused one, in place.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["FusedQKV", "SelfAttention", "FusedMLP", "TransformerEncoderLayer", "convert", "ConvertReport"]


def _resolve_kv_heads(num_heads, num_kv_heads):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return num_kv_heads


def _head_dim(embed_dim, num_heads):
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    return embed_dim // num_heads


class FusedQKV(nn.Module):
    """x [B,S,E] -> q [B,H,S,D], k, v [B,Hkv,S,D] in one GEMM with the head split fused.

    `weight` is [(H + 2*Hkv) * D, E] with rows ordered q heads, k heads, v heads,
    initialised like nn.Linear.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, bias=True, *, device=None, dtype=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = _resolve_kv_heads(num_heads, num_kv_heads)
        self.head_dim = _head_dim(embed_dim, num_heads)
        out_features = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, embed_dim, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation, so swapping this in changes nothing at init.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.embed_dim) if self.embed_dim > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return ops.fused_qkv(x, self.weight, self.bias, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"bias={self.bias is not None}")


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV, flash attention, output projection.

    Parameters are named like nn.MultiheadAttention's (in_proj_weight,
    in_proj_bias, out_proj.weight, out_proj.bias), so with num_kv_heads equal
    to n_head `load_state_dict(mha.state_dict())` works unchanged. With fewer KV
    heads (GQA) in_proj_weight has (n_head + 2*num_kv_heads) * head_dim rows.
    forward(x [B,S,E], seqlens=None): seqlens [B] are the valid key lengths
    (right padding); outputs at padded query positions are finite but meaningless.
    """

    def __init__(self, d_model, n_head, *, num_kv_heads=None, bias=True, is_causal=False, device=None, dtype=None):
        super().__init__()
        self.embed_dim = d_model
        self.num_heads = n_head
        self.num_kv_heads = _resolve_kv_heads(n_head, num_kv_heads)
        self.head_dim = _head_dim(d_model, n_head)
        self.is_causal = is_causal
        factory = dict(device=device, dtype=dtype)
        rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(rows, d_model, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, seqlens=None, *, is_causal=None):
        batch, seqlen, _ = x.shape
        q, k, v = ops.fused_qkv(x, self.in_proj_weight, self.in_proj_bias, num_heads=self.num_heads,
                                num_kv_heads=self.num_kv_heads)
        causal = self.is_causal if is_causal is None else is_causal
        attn = ops.flash_attention(q, k, v, is_causal=causal, seqlens_k=seqlens)
        attn = attn.transpose(1, 2).reshape(batch, seqlen, self.embed_dim)
        return self.out_proj(attn)

    def extra_repr(self):
        return (f"d_model={self.embed_dim}, n_head={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"is_causal={self.is_causal}")


class FusedMLP(nn.Module):
    """linear2(gelu(linear1(x))) with bias and GELU fused into the first GEMM.

    The hidden activation is not stored for the backward (it is recomputed from
    the pre-activation). Submodules linear1/linear2 are plain nn.Linear, named as
    in nn.TransformerEncoderLayer.
    """

    def __init__(self, d_model, d_ff, bias=True, approximate="none", *, device=None, dtype=None):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        factory = dict(device=device, dtype=dtype)
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.approximate = approximate

    def forward(self, x):
        return ops.fused_mlp(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                             approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


# --------------------------------------------------------------------------- masks outside the kernels' reach

_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _attention_with_bias(q, k, v, bias, scale=None):
    """softmax(q k^T * scale + bias) v in plain PyTorch, for masks the kernels cannot express.

    q [B,H,Sq,D], k/v [B,Hkv,Sk,D] (GQA by repetition); bias is additive (0 / -inf, or
    any float) and broadcasts to [B,H,Sq,Sk]. Scores and softmax are float32 (float64
    stays float64); a query row that sees no key gets 0, as in the kernels.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q, k.transpose(-1, -2)).to(compute) * scale + bias.to(compute)
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(probs.to(v.dtype), v)


def _blocked(mask, name):
    """A torch-convention mask (bool True = blocked, or additive float) as bool 'blocked',
    or None when it is a float mask with values other than 0 and -inf."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"tfkernels: {name} must be a bool or floating-point tensor, got {mask.dtype}")
    blocked = torch.isneginf(mask)
    if not bool((blocked | (mask == 0)).all()):
        return None
    return blocked


def _additive(mask):
    """Torch-convention mask -> additive float mask (bool True = blocked -> -inf)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


@dataclass
class _AttentionPlan:
    """How one forward runs attention: the kernel (causal, seqlens) or a bias for the math path."""
    causal: bool = False
    seqlens: torch.Tensor = None
    bias: torch.Tensor = None  # additive [B or 1, H or 1, S, S]; set -> math path


# --------------------------------------------------------------------------- torch.nn drop-in

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _gelu_form(activation):
    """'none'/'tanh' when activation is a GELU the fused MLP can run, else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    return None


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

    Dropout: the attention kernel has no dropout, so an attention dropout > 0 in training
    raises. It defaults to ``dropout`` as in torch; pass ``attention_dropout=0.0`` to keep
    the other dropouts (dropout, dropout1, dropout2: plain nn.Dropout modules, applied
    exactly where torch applies them) and drop only the attention one.

    Extra keyword-only arguments: ``attention_dropout`` (see above) and, in forward,
    ``seqlens``.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *, attention_dropout=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.self_attn = SelfAttention(d_model, nhead, bias=bias, **factory)
        # Read by nn.TransformerEncoder (sequence dim) and by users of torch's layer.
        self.self_attn.batch_first = batch_first
        self.self_attn.dropout = float(dropout if attention_dropout is None else attention_dropout)
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
        reason = _why_not_convertible(layer)
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
            blocked = _blocked(key_padding_mask, "src_key_padding_mask")
            lens = None
            if blocked is not None:
                lens = (~blocked).sum(dim=1)
                right_padding = torch.arange(seqlen, device=blocked.device)[None, :] >= lens[:, None]
                if not torch.equal(blocked, right_padding):
                    lens = None  # left padding or holes
            if lens is not None:
                plan.seqlens = lens if bool((lens < seqlen).any()) else None
            else:
                bias = _additive(key_padding_mask).view(batch, 1, 1, seqlen)
        if src_mask is not None:
            blocked = _blocked(src_mask, "src_mask")
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=src_mask.device).triu(1)
            if blocked is not None and blocked.dim() == 2 and torch.equal(blocked, causal):
                plan.causal = True
            elif blocked is not None and not bool(blocked.any()):
                plan.causal = False
            else:
                attn_bias = _additive(src_mask)
                if attn_bias.dim() == 3:  # (B * nhead, S, S), torch's per-head layout
                    attn_bias = attn_bias.view(batch, -1, seqlen, seqlen)
                bias = attn_bias if bias is None else bias + attn_bias
                plan.causal = False
        if bias is not None:
            _warn_once(("encoder", "mask"), "tfkernels.nn.TransformerEncoderLayer: the mask is not plain right "
                       "padding and/or causal; attention for it runs in plain PyTorch (slower).")
            if plan.seqlens is not None:
                bias = bias + _additive(torch.arange(seqlen, device=bias.device)[None, :] >= plan.seqlens[:, None]
                                        ).view(batch, 1, 1, seqlen)
            if plan.causal:
                bias = bias + _additive(torch.ones(seqlen, seqlen, dtype=torch.bool, device=bias.device).triu(1))
            plan.bias, plan.seqlens, plan.causal = bias, None, False
        return plan

    def _sa_block(self, x, plan):
        if self.training and self.self_attn.dropout > 0:
            raise RuntimeError(
                f"tfkernels.nn.TransformerEncoderLayer: attention dropout (p={self.self_attn.dropout}) is not "
                "supported in training: the fused attention kernel has no dropout. Build the layer with "
                "attention_dropout=0.0 (or convert(model, attention_dropout=0.0)); the other dropouts are kept.")
        if plan.bias is None:
            out = self.self_attn(x, plan.seqlens, is_causal=plan.causal)
        else:
            attn = self.self_attn
            q, k, v = ops.fused_qkv(x, attn.in_proj_weight, attn.in_proj_bias, num_heads=attn.num_heads,
                                    num_kv_heads=attn.num_kv_heads)
            o = _attention_with_bias(q, k, v, plan.bias)
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


# --------------------------------------------------------------------------- convert()

_PLAIN_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _has_hooks(module):
    return any(len(getattr(m, attr, {})) for m in module.modules()
               for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


def _why_not_convertible(layer):
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


@dataclass
class ConvertReport:
    """What convert() did: `swapped` [(name, what)], `left_alone` [(name, type, reason)], `notes`."""
    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self):
        lines = [f"tfkernels.nn.convert: swapped {len(self.swapped)}, left {len(self.left_alone)} alone"]
        lines += [f"  swapped    {name or '<root>'}: {what}" for name, what in self.swapped]
        lines += [f"  left alone {name or '<root>'} ({kind}): {why}" for name, kind, why in self.left_alone]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def convert(model, *, attention_dropout=None):
    """Swap every nn.TransformerEncoderLayer in `model` for tfkernels.nn.TransformerEncoderLayer, in place.

    The new layers take over the old layers' Parameter objects (weights, device, dtype,
    requires_grad, optimizer references) and train/eval mode. nn.TransformerEncoder
    stacks whose layers were swapped get their nested-tensor fast path turned off (it
    would hand the layers nested tensors and drop the padding mask); they keep working
    with mask, src_key_padding_mask and is_causal. Left alone, with the reason in the
    report: subclasses and layers with unusual parts (see ConvertReport), decoder layers
    (cross-attention), and bare nn.MultiheadAttention (its forward takes separate
    query/key/value, possibly different: swapping it blindly is unsafe; use
    tfkernels.nn.SelfAttention where you know it is self-attention).

    attention_dropout: None keeps each layer's attention dropout (torch uses `dropout`
    there, so converted layers with dropout > 0 raise in training); pass 0.0 to drop it
    (the other dropouts stay). Returns a ConvertReport; `print(report)` lists it all.
    """
    if isinstance(model, nn.TransformerEncoderLayer):
        raise TypeError("tfkernels.nn.convert swaps layers inside a model; for a bare layer use "
                        "tfkernels.nn.TransformerEncoderLayer.from_torch(layer)")
    report = ConvertReport()
    _convert_children(model, "", report, attention_dropout)
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer, TransformerEncoderLayer) for layer in module.layers):
            if getattr(module, "use_nested_tensor", False):
                report.notes.append(f"{name or '<root>'}: nn.TransformerEncoder nested-tensor fast path turned off")
            module.use_nested_tensor = False
    dropouts = sorted({m.self_attn.dropout for _, m in model.named_modules()
                       if isinstance(m, TransformerEncoderLayer) and m.self_attn.dropout > 0})
    if dropouts:
        report.notes.append(f"attention dropout {dropouts} kept: these layers raise in training mode; call "
                            "convert(model, attention_dropout=0.0) to drop it (other dropouts stay)")
    return report


def _convert_children(module, prefix, report, attention_dropout):
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.TransformerEncoderLayer):
            reason = _why_not_convertible(child)
            if reason:
                report.left_alone.append((full, type(child).__name__, reason))
            else:
                setattr(module, name, TransformerEncoderLayer.from_torch(child, attention_dropout=attention_dropout))
                report.swapped.append((full, "nn.TransformerEncoderLayer -> tfkernels.nn.TransformerEncoderLayer"))
        elif isinstance(child, nn.TransformerDecoderLayer):
            report.left_alone.append((full, type(child).__name__, "decoder layers (cross-attention) are not supported"))
        elif isinstance(child, nn.MultiheadAttention):
            report.left_alone.append((full, type(child).__name__, "bare nn.MultiheadAttention is not swapped: its "
                                      "forward takes separate query/key/value (possibly cross-attention)"))
        else:
            _convert_children(child, full, report, attention_dropout)
