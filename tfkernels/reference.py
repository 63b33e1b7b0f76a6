"""Pure-PyTorch references of every tfkernels op: the tests' oracle.

Same signatures and semantics as the fused ops, written for clarity, not speed:
they materialise the full attention matrix and every intermediate. They compute
in the dtype of their inputs, so a test gets the high-precision answer by passing
float64 (or float32) copies, and the low-precision reference error by passing the
inputs as they are.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["flash_attention", "fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp", "attention_mask"]


def attention_mask(seqlen_q, seqlen_k, *, batch=1, is_causal=False, causal_alignment="top_left",
                   seqlens_k=None, device=None):
    """Boolean [B, 1, Sq, Sk] mask, True where query i may attend to key j.

    Keys at or past seqlens_k[b] are hidden. With is_causal, key j is visible to
    query i when j <= i + offset: offset is 0 for "top_left" and len_k - Sq for
    "bottom_right", where len_k is seqlens_k[b] (or Sk without seqlens_k).
    """
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")
    i = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    if seqlens_k is None:
        len_k = torch.full((batch,), seqlen_k, device=device, dtype=torch.long)
    else:
        len_k = seqlens_k.to(device=device, dtype=torch.long)
    len_k = len_k.view(-1, 1, 1, 1)
    mask = j < len_k
    if is_causal:
        offset = len_k - seqlen_q if causal_alignment == "bottom_right" else torch.zeros_like(len_k)
        mask = mask & (j <= i + offset)
    return mask


def flash_attention(q, k, v, *, is_causal=False, causal_alignment="top_left", scale=None, seqlens_k=None,
                    return_lse=False, deterministic=False):
    """softmax(q k^T * scale + mask) v for q [B,H,Sq,D], k/v [B,Hkv,Sk,D].

    A query row that sees no key returns 0 and lse = -inf. `deterministic` is
    accepted for signature parity; the reference is always deterministic.
    """
    del deterministic
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = attention_mask(seqlen_q, seqlen_k, batch=batch, is_causal=is_causal, causal_alignment=causal_alignment,
                          seqlens_k=seqlens_k, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    # exp(s - lse) is exactly softmax where a row sees a key, and 0 (not NaN) where none.
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores.to(finite_lse.dtype) - finite_lse.unsqueeze(-1)).to(q.dtype)
    out = torch.matmul(probs, v)
    if return_lse:
        return out, lse.float()
    return out


def fused_qkv(x, weight, bias=None, *, num_heads, num_kv_heads=None):
    """x [B,S,E] @ weight^T (+ bias), split into q [B,H,S,D] and k, v [B,Hkv,S,D]."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    batch, seqlen, _ = x.shape
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = F.linear(x, weight, bias)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)

    def heads_first(t, n):
        return t.reshape(batch, seqlen, n, head_dim).transpose(1, 2).contiguous()

    return heads_first(q, num_heads), heads_first(k, num_kv_heads), heads_first(v, num_kv_heads)


def bias_gelu(x, bias, *, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


def linear_gelu(x, weight, bias=None, *, approximate="none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def fused_mlp(x, w1, b1, w2, b2, *, approximate="none"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
