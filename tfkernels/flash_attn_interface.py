"""FlashAttention's Python entry points on tfkernels' kernels.

    from tfkernels.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same names, signatures and layouts as the `flash_attn` package (FlashAttention 2):
q [B,S,H,D] (packed: [total,H,D]), k/v with Hkv heads, `causal` aligned to the
bottom right as FlashAttention does, `softmax_lse` [B,H,S] (packed: [H,total]).
Code written for `flash_attn` runs unchanged after changing the import. Every
call goes to tfkernels.flash_attention, flash_attention_varlen or
flash_attention_with_kvcache; the [B,S,H,D] inputs reach the kernels as strided
views (no copies).

Not supported, with an error instead of a different answer: `alibi_slopes`,
`return_attn_probs`'s probability matrix (None is returned in its place, with the
lse), `cache_batch_idx`, `cache_leftpad`, and `block_table` in the varlen function.
"""
import torch

from . import ops

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func"]


def _unsupported(name, value):
    if value is not None:
        raise NotImplementedError(f"tfkernels.flash_attn_interface: {name} is not supported (got a value; "
                                  f"pass None)")


def _with_lse(out, lse, return_attn_probs):
    # flash_attn returns (out, softmax_lse, S_dmask) when asked for the probabilities;
    # the kernels never form them, so their slot holds None.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over [B,S,H,D] tensors; see flash_attn.flash_attn_func."""
    _unsupported("alibi_slopes", alibi_slopes)
    out, lse = ops.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                   causal_alignment="bottom_right", scale=softmax_scale, window_size=window_size,
                                   softcap=softcap, dropout_p=dropout_p, deterministic=deterministic,
                                   return_lse=True)
    return _with_lse(out.transpose(1, 2), lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv [B,S,3,H,D]; see flash_attn.flash_attn_qkvpacked_func."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """kv [B,S,2,Hkv,D]; see flash_attn.flash_attn_kvpacked_func."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences, q [total_q,H,D], k/v [total_k,Hkv,D], int32 cu_seqlens [B+1];
    see flash_attn.flash_attn_varlen_func. softmax_lse is [H,total_q]."""
    _unsupported("alibi_slopes", alibi_slopes)
    _unsupported("block_table (use flash_attn_with_kvcache for paged caches)", block_table)
    out, lse = ops.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                          is_causal=causal, causal_alignment="bottom_right", scale=softmax_scale,
                                          window_size=window_size, softcap=softcap, dropout_p=dropout_p,
                                          deterministic=deterministic, return_lse=True)
    return _with_lse(out, lse, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding over a dense or paged KV cache, appending k, v in place;
    see flash_attn.flash_attn_with_kvcache. Without cache_seqlens every cache row is
    taken as filled (FlashAttention's default)."""
    _unsupported("alibi_slopes", alibi_slopes)
    _unsupported("cache_batch_idx", cache_batch_idx)
    _unsupported("cache_leftpad", cache_leftpad)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("tfkernels.flash_attn_interface: cache_seqlens is required when appending k, v "
                             "(where would they go?)")
        filled = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
        cache_seqlens = torch.full((q.shape[0],), filled, dtype=torch.int32, device=q.device)
    out, lse = ops.flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                                rotary_interleaved=rotary_interleaved, is_causal=causal,
                                                scale=softmax_scale, window_size=window_size, softcap=softcap,
                                                num_splits=num_splits, return_lse=True)
    return (out, lse) if return_softmax_lse else out
