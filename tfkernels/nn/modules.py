"""The fused building blocks: FusedQKV, SelfAttention (nn.MultiheadAttention's parameters), FusedMLP."""
import math

import torch
from torch import nn

from .. import ops

__all__ = ["FusedQKV", "SelfAttention", "FusedMLP"]


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
    `dropout` is nn.MultiheadAttention's: the probability of dropping an attention
    weight, in training mode only (flash_attention's dropout_p, drawn from torch's
    default generator; the kept weights are scaled by 1 / (1 - dropout)).
    """

    def __init__(self, d_model, n_head, *, dropout=0.0, num_kv_heads=None, bias=True, is_causal=False, device=None,
                 dtype=None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = d_model
        self.num_heads = n_head
        self.num_kv_heads = _resolve_kv_heads(n_head, num_kv_heads)
        self.head_dim = _head_dim(d_model, n_head)
        self.is_causal = is_causal
        self.dropout = float(dropout)
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
        attn = ops.flash_attention(q, k, v, is_causal=causal, seqlens_k=seqlens, dropout_p=self.active_dropout)
        attn = attn.transpose(1, 2).reshape(batch, seqlen, self.embed_dim)
        return self.out_proj(attn)

    @property
    def active_dropout(self):
        """The attention dropout a forward applies now: `dropout` in training, 0 in eval."""
        return self.dropout if self.training else 0.0

    def extra_repr(self):
        return (f"d_model={self.embed_dim}, n_head={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"is_causal={self.is_causal}, dropout={self.dropout}")


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
