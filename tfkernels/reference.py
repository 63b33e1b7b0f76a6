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

__all__ = ["flash_attention", "attention_varlen", "fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp",
           "attention_mask"]


def attention_mask(seqlen_q, seqlen_k, *, batch=1, is_causal=False, causal_alignment="top_left",
                   seqlens_k=None, window_size=(-1, -1), device=None):
    """Boolean [B, 1, Sq, Sk] mask, True where query i may attend to key j.

    Keys at or past seqlens_k[b] are hidden. The diagonal of query i is key
    i + offset: offset is 0 for "top_left" and len_k - Sq for "bottom_right", where
    len_k is seqlens_k[b] (or Sk without seqlens_k). With is_causal, key j is visible
    when j <= i + offset; with window_size = (left, right), when
    i + offset - left <= j <= i + offset + right (-1 = unbounded on that side).
    """
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")
    left, right = window_size
    i = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    if seqlens_k is None:
        len_k = torch.full((batch,), seqlen_k, device=device, dtype=torch.long)
    else:
        len_k = seqlens_k.to(device=device, dtype=torch.long)
    len_k = len_k.view(-1, 1, 1, 1)
    mask = j < len_k
    diagonal = i + (len_k - seqlen_q if causal_alignment == "bottom_right" else torch.zeros_like(len_k))
    if is_causal:
        mask = mask & (j <= diagonal)
    if left >= 0:
        mask = mask & (j >= diagonal - left)
    if right >= 0:
        mask = mask & (j <= diagonal + right)
    return mask


def flash_attention(q, k, v, *, is_causal=False, causal_alignment="top_left", scale=None, seqlens_k=None,
                    window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, generator=None,
                    dropout_mask=None, return_lse=False, deterministic=False):
    """softmax(q k^T * scale + mask) v for q [B,H,Sq,D], k/v [B,Hkv,Sk,D].

    Each query row attends over exactly the keys it sees (attention_mask: seqlens_k,
    is_causal, window_size). A hidden key never enters a row's output or any
    gradient through that row, even as 0 x NaN; a query row that sees no key
    returns 0 and lse = -inf (lse = sinks[h] with sinks). Non-finite values among
    the keys a row sees propagate as in softmax (see _attend).

    Variants: softcap c > 0 maps each scaled score s to c * tanh(s / c); sinks [H]
    are logits that join every row's softmax denominator (and lse) with no value;
    dropout_p > 0 multiplies the probabilities by keep / (1 - dropout_p) after the
    softmax (lse stays pre-dropout), with keep = dropout_mask (bool [B,H,Sq,Sk],
    e.g. torch.ops.tfkernels._dropout_mask, to reproduce a kernel's draw exactly),
    or else drawn here from torch.rand(generator=generator) (a different stream
    than the kernels'). `deterministic` is accepted for signature parity.

    With finite q, k, v one masked product over all keys is exact (a hidden key
    adds 0 x finite = 0). Otherwise the rows are grouped by the set of keys they
    see and each group is computed on those keys alone.
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
    mask = attention_mask(seqlen_q, seqlen_k, batch=batch, is_causal=is_causal, causal_alignment=causal_alignment,
                          seqlens_k=seqlens_k, window_size=tuple(window_size),
                          device=q.device).expand(batch, 1, seqlen_q, seqlen_k)
    keep = None
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(batch, heads, seqlen_q, seqlen_k, generator=generator, device=q.device,
                                      dtype=torch.float64) >= dropout_p
        keep = dropout_mask.to(device=q.device, dtype=q.dtype) / (1.0 - dropout_p)
    sink = None if sinks is None else sinks.view(heads, 1, 1)
    variant = dict(softcap=softcap, sink=sink)
    if seqlen_q == 0 or seqlen_k == 0 or all(bool(torch.isfinite(t).all()) for t in (q, k, v)):
        out, lse = _attend(q, k, v, scale, mask, keep=keep, **variant)
    else:
        outs, lses = [], []
        for b in range(batch):
            pieces = [(rows, *_attend(q[b][:, rows], k[b][:, keys], v[b][:, keys], scale,
                                      keep=None if keep is None else keep[b][:, rows][:, :, keys], **variant))
                      for rows, keys in _row_groups(mask[b, 0])]
            order = torch.cat([rows for rows, _, _ in pieces]).argsort()
            outs.append(torch.cat([o for _, o, _ in pieces], dim=1)[:, order])
            lses.append(torch.cat([lse for _, _, lse in pieces], dim=1)[:, order])
        out, lse = torch.stack(outs), torch.stack(lses)
    if return_lse:
        return out, lse.float()
    return out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False, causal_alignment="top_left",
                     scale=None, window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, dropout_mask=None,
                     return_lse=True):
    """flash_attention over a packed batch: q [total_q, H, D], k, v [total_k, Hkv, D], sequence b =
    rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q (cu_seqlens_k for k, v). Returns (out
    [total_q, H, D], lse [H, total_q]) (out alone with return_lse=False).

    Each sequence is computed on its own by flash_attention on [1, H, S, D] views, so
    the causal offset, the window and empty rows follow that sequence's lengths.
    dropout_mask, when given, is the padded keep mask bool [B, H, >= max len_q, >= max
    len_k] (torch.ops.tfkernels._dropout_mask(rng_state, B, H, max_seqlen_q,
    max_seqlen_k, p) gives the kernels' draw, which counts rows and keys within each
    sequence); sequence b uses its top-left [len_q, len_k] corner of entry b.
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(starts_q) != len(starts_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k differ in length: {len(starts_q)} and {len(starts_k)}")
    heads = q.shape[1]
    outs, lses = [q.new_zeros((0, heads, q.shape[2]))], [q.new_zeros((heads, 0), dtype=torch.float32)]
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        mask = None if dropout_mask is None else dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0]
        out, lse = flash_attention(
            *(t[r0:r1].transpose(0, 1).unsqueeze(0) for t, r0, r1 in ((q, q0, q1), (k, k0, k1), (v, k0, k1))),
            is_causal=is_causal, causal_alignment=causal_alignment, scale=scale, window_size=window_size,
            softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_mask=mask, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def _row_groups(mask):
    """(rows, keys) index pairs that partition the rows of a [Sq, Sk] mask by the keys they see."""
    patterns, group_of_row = torch.unique(mask, dim=0, return_inverse=True)
    return [((group_of_row == g).nonzero().squeeze(1), keys.nonzero().squeeze(1)) for g, keys in enumerate(patterns)]


def _attend(q, k, v, scale, visible=None, *, softcap=0.0, sink=None, keep=None):
    """Attention of q [..., H, n, D] over the keys k, v [..., H, m, D] that `visible` ([..., n, m]
    bool, default all) allows: (out, lse).

    lse = mx + log(sum(exp(s - mx)) + exp(sink - mx)) with mx the row max of the
    visible scores s (and the sink [H, 1, 1], if any), and softmax = exp(s - lse), in
    float32 (float64 for float64 inputs); `keep` ([..., n, m], 0 or 1 / (1 - p))
    scales the probabilities after that (dropout). A NaN score, a +inf score
    (inf - inf) or visible scores that are all -inf without a sink (-inf + inf) make
    the row's lse and output NaN; a -inf score among finite ones gets probability 0.
    A row that sees no key gets output 0 and lse = -inf, or lse = sink with a sink.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    s = scores if scores.dtype == torch.float64 else scores.float()
    if visible is None:
        empty = torch.full(s.shape[:-1] + (1,), k.shape[-2] == 0, dtype=torch.bool, device=s.device)
    else:
        s = s.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(dim=-1, keepdim=True)
    # amax keeps NaN; the lse's gradient does not depend on mx. Empty rows without a
    # sink: exp(-inf - 0) = 0, lse = log 0 = -inf.
    row_max = s.amax(dim=-1, keepdim=True) if s.shape[-1] else torch.full_like(empty, float("-inf"), dtype=s.dtype)
    sink_s = None if sink is None else sink.to(s.dtype)
    if sink_s is not None:
        row_max = torch.maximum(row_max, sink_s)
    row_max = row_max.detach().masked_fill(empty & torch.isneginf(row_max.detach()), 0)
    total = torch.exp(s - row_max).sum(dim=-1, keepdim=True)
    if sink_s is not None:
        total = total + torch.exp(sink_s - row_max)
    lse = row_max + torch.log(total)
    probs = torch.exp(s - lse.masked_fill(empty & torch.isneginf(lse.detach()), 0))
    if keep is not None:
        probs = probs * keep.to(probs.dtype)
    return torch.matmul(probs.to(q.dtype), v), lse.squeeze(-1)


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
