"""The public functional API: thin wrappers over torch.ops.tfkernels.*.

Each op gets a fake (meta) kernel, so torch.compile(fullgraph=True) traces it
without a graph break, and an autograd formula whose backward calls the
registered backward op, so compiled graphs and CUDA graphs see only our ops.
"""
import math

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from . import _fake_checks

__all__ = ["flash_attention", "flash_attention_varlen", "flash_attention_with_kvcache", "merge_attention",
           "fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp"]

_ops = torch.ops.tfkernels
_ALIGNMENTS = ("top_left", "bottom_right")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"tfkernels: {name} must be one of {choices}, got {value!r}")


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- autograd
# Each differentiable op has its formula registered on the op itself
# (torch.library.register_autograd), which is what torch.compile, torch.func, autocast,
# tensor subclasses and callers of torch.ops.tfkernels.* go through. In plain eager
# mode the public wrappers call the op through a torch.autograd.Function built from the
# same setup and backward instead: the registered route's forward wrapper costs ~60 us
# more per call on the CPU, most of it torch._library's fill_defaults, which rebuilds
# the schema's argument list once per argument (quadratic in the arity: 47 us for
# flash_attention_fwd's 14; pytorch/pytorch#195110). B1 H1 S16 D64 fp32 attention
# forward + backward on a 2-core Xeon: 124 -> 72 us (SDPA 43-48). Without a gradient
# the registered route is only ~5 us slower (its wrapper sees grad mode off), so
# such calls keep it.

def _plain_eager_grad(args):
    """Whether gradients will flow through a call on `args` and nothing that needs the
    registered formula is active: no tracing, functorch transform or autocast, and only
    plain tensors."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not _needs_grad(*tensors) or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is torch.Tensor for t in tensors) and not torch.is_autocast_enabled(tensors[0].device.type)


def _register_autograd(name, backward, setup_context):
    """Registers backward / setup_context as op `name`'s formula and returns the
    wrappers' entry point to the op (see above)."""
    op = getattr(_ops, name).default
    torch.library.register_autograd(f"tfkernels::{name}", backward, setup_context=setup_context)
    # forward(ctx, *args) rather than a setup_context staticmethod: with one, apply binds
    # the arguments through inspect.signature on every call (40 us here). The op runs
    # below the Autograd key, as torch._library's own wrapper runs it: through the key it
    # would re-enter that wrapper (16 us) only to find grad mode off.
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"_{name}_function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        return function.apply(*args) if _plain_eager_grad(args) else op(*args)

    return call


# --------------------------------------------------------------------------- attention

def flash_attention(q, k, v, *, is_causal=False, causal_alignment="top_left", scale=None, seqlens_k=None,
                    window_size=(-1, -1), softcap=0.0, sinks=None, dropout_p=0.0, generator=None,
                    return_lse=False, deterministic=False):
    """Tiled attention with online softmax: softmax(q k^T * scale + mask) v.

    q [B,H,Sq,D]; k, v [B,Hkv,Sk,D] with H % Hkv == 0 (GQA/MQA). Returns out
    [B,H,Sq,D], and with return_lse also lse [B,H,Sq] in float32. A query row that
    sees no key gets 0 and lse = -inf (lse = sinks[h] with sinks); NaN/Inf inputs
    propagate as the README's Semantics section says (a row that sees a NaN score
    gets NaN, never 0). `deterministic=True` makes the CUDA backward bitwise
    reproducible (the default may accumulate dq with atomics); the CPU backward is
    always deterministic.

    Variants (FlashAttention's names; README, Semantics):
    - window_size=(left, right): query i sees key j only when
      i + off - left <= j <= i + off + right, off the causal_alignment offset; -1 = unbounded.
    - softcap=c > 0: scores become c * tanh(s / c) before the softmax.
    - sinks: [H] logits (any float dtype, differentiable) that join every row's softmax
      denominator and lse but add no value (GPT-OSS's s_aux).
    - dropout_p in [0, 1) with an optional torch.Generator: probabilities are dropped after
      the softmax and the kept ones scaled by 1 / (1 - p). The mask comes from a counter-based
      RNG whose state is drawn from `generator` on q's device; the backward regenerates it.
    """
    _check_choice("causal_alignment", causal_alignment, _ALIGNMENTS)
    window_left, window_right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    dropout_p = _check_dropout(dropout_p)
    if sinks is not None:
        _check_sinks(sinks, q)
        sinks = sinks.to(torch.float32).contiguous()  # differentiable: the gradient returns in sinks' dtype
    rng_state = None
    if dropout_p > 0:
        rng_state = torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=q.device, generator=generator)
    out, lse = _attention_fwd(q, k, v, is_causal, causal_alignment, scale, seqlens_k, deterministic, window_left,
                              window_right, softcap, sinks, dropout_p, rng_state)
    return (out, lse) if return_lse else out


def _is_int(x):
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _check_window(window_size):
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"tfkernels: window_size must be a pair of ints (left, right) >= -1, got {window_size!r}")
    if not (_is_int(left) and _is_int(right)) or left < -1 or right < -1:
        raise ValueError(f"tfkernels: window_size must be a pair of ints (left, right) >= -1 (-1 = unbounded), "
                         f"got {window_size!r}")
    return int(left), int(right)


def _check_softcap(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"tfkernels: softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"tfkernels: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_sinks(sinks, q, heads_dim=1):
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        what = sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"tfkernels: sinks must be a floating-point tensor [H], got {what}")
    heads = q.shape[heads_dim]
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        raise ValueError(f"tfkernels: sinks must have shape [H] = [{heads}] (q.shape[{heads_dim}]), got "
                         f"{list(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"tfkernels: sinks must be on q's device ({q.device}), got {sinks.device}")


@torch.library.register_fake("tfkernels::flash_attention_fwd")
def _(q, k, v, is_causal, causal_alignment, scale, seqlens_k, deterministic, window_left, window_right, softcap,
      sinks, dropout_p, rng_state):
    _check_variants_fake(q, window_left, window_right, softcap, sinks, dropout_p, rng_state)
    batch, heads, seqlen_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.register_fake("tfkernels::flash_attention_bwd")
def _(grad_out, grad_lse, q, k, v, out, lse, is_causal, causal_alignment, scale, seqlens_k, deterministic,
      window_left, window_right, softcap, sinks, dropout_p, rng_state):
    _check_variants_fake(q, window_left, window_right, softcap, sinks, dropout_p, rng_state)
    grad_sinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_sinks


@torch.library.register_fake("tfkernels::_dropout_mask")
def _(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p):
    return rng_state.new_empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.bool)


def _check_variants_fake(q, window_left, window_right, softcap, sinks, dropout_p, rng_state):
    """The kernels' checks of the variant arguments, for tracing (fake tensors)."""
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"tfkernels: window_size must be >= -1, got ({window_left}, {window_right})")
    torch._check(math.isfinite(softcap) and softcap >= 0,
                 lambda: f"tfkernels: softcap must be a finite number >= 0, got {softcap}")
    torch._check(0 <= dropout_p < 1, lambda: f"tfkernels: dropout_p must be in [0, 1), got {dropout_p}")
    if sinks is not None:
        torch._check(sinks.dtype == torch.float32, lambda: f"tfkernels: sinks must be float32, got {sinks.dtype}")
        torch._check(sinks.dim() == 1 and sinks.shape[0] == q.shape[1],
                     lambda: f"tfkernels: sinks must have shape [H] = [{q.shape[1]}], got {list(sinks.shape)}")
        torch._check(sinks.device == q.device, lambda: f"tfkernels: sinks must be on {q.device}, got {sinks.device}")
    if dropout_p > 0:
        torch._check(rng_state is not None, lambda: "tfkernels: rng_state is required when dropout_p > 0")
        torch._check(rng_state.dtype == torch.int64 and rng_state.shape == (2,),
                     lambda: f"tfkernels: rng_state must be int64 [2], got {rng_state.dtype} {list(rng_state.shape)}")


def _attention_setup(ctx, inputs, output):
    (q, k, v, is_causal, causal_alignment, scale, seqlens_k, deterministic, window_left, window_right, softcap,
     sinks, dropout_p, rng_state) = inputs
    out, lse = output
    # Unused outputs (lse without return_lse) then arrive as None, not as zeros.
    ctx.set_materialize_grads(False)
    # rng_state (two int64) is saved, not the mask: the backward regenerates the mask from it.
    ctx.save_for_backward(q, k, v, out, lse, seqlens_k, sinks, rng_state)
    ctx.attrs = (is_causal, causal_alignment, scale, deterministic, window_left, window_right, softcap, dropout_p)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, seqlens_k, sinks, rng_state = ctx.saved_tensors
    is_causal, causal_alignment, scale, deterministic, window_left, window_right, softcap, dropout_p = ctx.attrs
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # Autograd may hand over expanded gradients (stride 0, e.g. from out.sum()), which the
    # kernels' argument checks reject: they want the last dim contiguous.
    grad_out = grad_out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    grad_q, grad_k, grad_v, grad_sinks = _ops.flash_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, is_causal, causal_alignment, scale, seqlens_k, deterministic,
        window_left, window_right, softcap, sinks, dropout_p, rng_state)
    grad_sinks = grad_sinks if sinks is not None and ctx.needs_input_grad[11] else None
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None, grad_sinks, None, None


_attention_fwd = _register_autograd("flash_attention_fwd", _attention_backward, _attention_setup)


# --------------------------------------------------------------------------- packed variable-length attention

def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                           causal_alignment="top_left", scale=None, window_size=(-1, -1), softcap=0.0, sinks=None,
                           dropout_p=0.0, generator=None, return_lse=False, deterministic=False):
    """flash_attention over a packed batch of sequences of different lengths (FlashAttention's varlen layout).

    q [total_q, H, D] and k, v [total_k, Hkv, D] (last dim contiguous) hold the sequences
    one after the other: sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q and
    cu_seqlens_k[b] .. cu_seqlens_k[b+1] of k and v. cu_seqlens_* are int32 [B + 1] on q's
    device, start at 0, never decrease and end at total_q (total_k); max_seqlen_* (ints)
    bound every length. Empty sequences and B = 0 are legal. Each sequence attends only
    to its own keys, exactly as flash_attention would on it alone: the causal offset and
    the window use that sequence's lengths; dropout draws for (sequence b, head, row, key)
    what flash_attention draws for batch entry b. Every keyword means what it means for
    flash_attention. Returns out [total_q, H, D], and with return_lse also lse float32
    [H, total_q]; differentiable in q, k, v and sinks.
    """
    _check_choice("causal_alignment", causal_alignment, _ALIGNMENTS)
    window_left, window_right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    dropout_p = _check_dropout(dropout_p)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(value):
            raise ValueError(f"tfkernels: {name} must be an int, got {type(value).__name__}")
    if sinks is not None:
        _check_sinks(sinks, q)
        sinks = sinks.to(torch.float32).contiguous()
    rng_state = None
    if dropout_p > 0:
        rng_state = torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=q.device, generator=generator)
    out, lse = _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                           causal_alignment, scale, deterministic, window_left, window_right, softcap, sinks,
                           dropout_p, rng_state)
    return (out, lse) if return_lse else out


@torch.library.register_fake("tfkernels::flash_attention_varlen_fwd")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, causal_alignment, scale,
      deterministic, window_left, window_right, softcap, sinks, dropout_p, rng_state):
    _fake_checks.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_variants_fake(q, window_left, window_right, softcap, sinks, dropout_p, rng_state)
    total_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total_q), dtype=torch.float32)


@torch.library.register_fake("tfkernels::flash_attention_varlen_bwd")
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
      causal_alignment, scale, deterministic, window_left, window_right, softcap, sinks, dropout_p, rng_state):
    _fake_checks.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _fake_checks.check_varlen_grads(q, grad_out, grad_lse, out, lse)
    _check_variants_fake(q, window_left, window_right, softcap, sinks, dropout_p, rng_state)
    grad_sinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_sinks


_VARLEN_SINKS = 14  # flash_attention_varlen_fwd's `sinks` argument


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, causal_alignment, scale,
     deterministic, window_left, window_right, softcap, sinks, dropout_p, rng_state) = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # see _attention_setup
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, rng_state)
    ctx.attrs = (max_seqlen_q, max_seqlen_k, is_causal, causal_alignment, scale, deterministic, window_left,
                 window_right, softcap, dropout_p)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, rng_state = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, is_causal, causal_alignment, scale, deterministic, window_left, window_right,
     softcap, dropout_p) = ctx.attrs
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.contiguous()  # see _attention_backward
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    grad_q, grad_k, grad_v, grad_sinks = _ops.flash_attention_varlen_bwd(
        grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
        causal_alignment, scale, deterministic, window_left, window_right, softcap, sinks, dropout_p, rng_state)
    grad_sinks = grad_sinks if sinks is not None and ctx.needs_input_grad[_VARLEN_SINKS] else None
    grads = [grad_q, grad_k, grad_v] + [None] * 14
    grads[_VARLEN_SINKS] = grad_sinks
    return tuple(grads)


_varlen_fwd = _register_autograd("flash_attention_varlen_fwd", _varlen_backward, _varlen_setup)

# --------------------------------------------------------------------------- attention over a KV cache

def flash_attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens, block_table=None,
                                 rotary_cos=None, rotary_sin=None, rotary_interleaved=False, is_causal=False,
                                 scale=None, window_size=(-1, -1), softcap=0.0, sinks=None, num_splits=0,
                                 return_lse=False):
    """Attention of q over a KV cache, appending the new keys first (FlashAttention's
    flash_attn_with_kvcache). Inference only: no autograd.

    q [B,Sq,H,D]. The cache is dense, k_cache/v_cache [B,S_cache,Hkv,D], or paged,
    [num_blocks,block_size,Hkv,D] with block_table int32 [B,max_blocks] (row p of sequence b
    lives in block block_table[b][p // block_size], slot p % block_size). cache_seqlens (an
    int for every sequence, or an int32/int64 tensor [B]) counts the rows already cached.

    k, v [B,Snew,Hkv,D] (both or neither) are written into k_cache/v_cache IN PLACE at rows
    cache_seqlens[b] .. + Snew; with rotary_cos/rotary_sin [seqlen_ro, rotary_dim/2] the new k
    is rotated first (interleaved: pairs 2i, 2i+1; else i, i + rotary_dim/2) and so is q, at
    positions cache_seqlens[b] + i when is_causal or a window is set, else at cache_seqlens[b].
    Sequence b then attends over its cache_seqlens[b] + Snew keys with the causal mask and the
    window bottom-right aligned; scale, window_size, softcap and sinks ([H]) as in
    flash_attention. num_splits > 0 computes that many key ranges apart and merges them by lse
    (0 = chosen from the shape). Returns out [B,Sq,H,D] (and lse float32 [B,H,Sq]).
    """
    window_left, window_right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    if isinstance(num_splits, bool) or not _is_int(num_splits) or num_splits < 0:
        raise ValueError(f"tfkernels: num_splits must be an int >= 0 (0 = chosen from the shape), got {num_splits!r}")
    if sinks is not None:
        _check_sinks(sinks, q, heads_dim=2)
        sinks = sinks.to(torch.float32).contiguous()
    cache_seqlens = _as_cache_seqlens(cache_seqlens, q)
    out, lse = _ops.flash_attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos,
                                            rotary_sin, bool(rotary_interleaved), bool(is_causal), scale, window_left,
                                            window_right, softcap, sinks, int(num_splits))
    return (out, lse) if return_lse else out


def _as_cache_seqlens(cache_seqlens, q):
    """An int (the same for every sequence) or an int32/int64 tensor [B], as int32 on q's device."""
    if _is_int(cache_seqlens):
        return torch.full((q.shape[0],), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        what = cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"tfkernels: cache_seqlens must be an int or an int32/int64 tensor [B], got {what}")
    return cache_seqlens.to(torch.int32)


@torch.library.register_fake("tfkernels::flash_attention_kvcache")
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos, rotary_sin, rotary_interleaved, is_causal,
      scale, window_left, window_right, softcap, sinks, num_splits):
    _fake_checks.check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos, rotary_sin,
                               num_splits)
    _check_variants_fake(q.transpose(1, 2), window_left, window_right, softcap, sinks, 0.0, None)
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Attention over keys A and B from the results over each: (out, lse), differentiable.

    out_* [..., S, D] and lse_* [..., S] (the log-sum-exp of each row's scores, as
    flash_attention(..., return_lse=True) returns) of the same queries over two disjoint
    sets of keys, e.g. the halves of a split KV cache or two steps of ring attention.
    A partial whose row saw no key (lse = -inf) leaves the other unchanged, exactly;
    when neither saw a key the row is 0 with lse = -inf, as in the kernel. NaNs
    propagate. (FlashAttention-2's +inf lse for empty rows is not understood: it gives NaN.)
    Weights are computed in float32 (float64 for float64); out keeps
    out_a's dtype and lse lse_a's.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"tfkernels.merge_attention: out_a and out_b must have the same shape, got "
                         f"{tuple(out_a.shape)} and {tuple(out_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise ValueError(f"tfkernels.merge_attention: {name} must have shape out.shape[:-1] = "
                             f"{tuple(out_a.shape[:-1])}, got {tuple(lse.shape)}")
    out_dtype, lse_dtype = out_a.dtype, lse_a.dtype
    work = torch.float64 if torch.float64 in (out_dtype, lse_dtype) else torch.float32
    lse_a, lse_b = lse_a.to(work), lse_b.to(work)
    # Shift by the larger lse (any shift gives the same result; detached, it adds no gradient
    # terms that cancel only in exact arithmetic). Rows empty in both shift by 0.
    top = torch.maximum(lse_a, lse_b).detach()
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), top + torch.log(total))
    out = (weight_a / total).unsqueeze(-1) * out_a.to(work) + (weight_b / total).unsqueeze(-1) * out_b.to(work)
    return out.to(out_dtype), lse.to(lse_dtype)


# --------------------------------------------------------------------------- fused QKV
# Each op below: the wrapper, the fake kernels (forward and backward op; they check
# shapes as the C++ kernels do, see _fake_checks.py) and the autograd formula.
# Fake kernels return contiguous tensors, as the real kernels do (new_empty, not
# empty_like, which would copy a non-contiguous input's strides).

def fused_qkv(x, weight, bias=None, *, num_heads, num_kv_heads=None):
    """One GEMM x [B,S,E] @ weight^T (+ bias) written straight into the head layout.

    weight is [(H + 2*Hkv) * D, E] with rows ordered q heads, k heads, v heads
    (nn.MultiheadAttention.in_proj_weight when Hkv == H). Returns q [B,H,S,D] and
    k, v [B,Hkv,S,D], contiguous.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    return tuple(_fused_qkv(x, weight, bias, num_heads, num_kv_heads))


@torch.library.register_fake("tfkernels::fused_qkv")
def _(x, weight, bias, num_heads, num_kv_heads):
    head_dim = _fake_checks.check_qkv(x, weight, bias, num_heads, num_kv_heads)
    batch, seqlen, _ = x.shape
    kv_shape = (batch, num_kv_heads, seqlen, head_dim)
    return x.new_empty((batch, num_heads, seqlen, head_dim)), x.new_empty(kv_shape), x.new_empty(kv_shape)


@torch.library.register_fake("tfkernels::fused_qkv_bwd")
def _(grad_q, grad_k, grad_v, x, weight):
    _fake_checks.check_qkv_grads(grad_q, grad_k, grad_v, x, weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])


def _qkv_setup(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _qkv_backward(ctx, grad_q, grad_k, grad_v):
    x, weight = ctx.saved_tensors
    # An output that did not reach the loss has no gradient; the kernel wants all three.
    grads = [grad_q, grad_k, grad_v]
    if all(g is None for g in grads):  # none of q, k, v reached the loss
        return None, None, None, None, None
    shapes = _qkv_grad_shapes(x, weight, grads)
    grads = [g if g is not None else x.new_zeros(s) for g, s in zip(grads, shapes)]
    grad_x, grad_weight, grad_bias = _ops.fused_qkv_bwd(*grads, x, weight)
    return grad_x, grad_weight, (grad_bias if ctx.has_bias else None), None, None


def _qkv_grad_shapes(x, weight, grads):
    """Shapes of (q, k, v) from whichever gradients are present (at least one is)."""
    batch, seqlen, _ = x.shape
    known = {i: g.shape for i, g in enumerate(grads) if g is not None}
    head_dim = next(iter(known.values()))[3]
    groups = weight.shape[0] // head_dim
    if 0 in known:
        heads = known[0][1]
        kv_heads = (groups - heads) // 2
    else:
        kv_heads = known[1][1] if 1 in known else known[2][1]
        heads = groups - 2 * kv_heads
    return [(batch, heads, seqlen, head_dim), (batch, kv_heads, seqlen, head_dim), (batch, kv_heads, seqlen, head_dim)]


_fused_qkv = _register_autograd("fused_qkv", _qkv_backward, _qkv_setup)


# --------------------------------------------------------------------------- the MLP family: bias_gelu
# `approximate` ("none" or "tanh") is checked in one place for every op of the family,
# forward and backward, CPU and CUDA: parse_gelu_approximate in csrc/args.cpp.

def bias_gelu(x, bias, *, approximate="none"):
    """gelu(x + bias) over the last dim of x, in one elementwise pass."""
    return _bias_gelu(x, bias, approximate)


@torch.library.register_fake("tfkernels::bias_gelu")
def _(x, bias, approximate):
    _fake_checks.check_bias_gelu(x, bias)
    return x.new_empty(x.shape)


@torch.library.register_fake("tfkernels::bias_gelu_bwd")
def _(grad_out, x, bias, approximate):
    features = _fake_checks.check_bias_gelu(x, bias)
    _fake_checks.check_rows_like(grad_out, "grad_out", x, features)
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = _ops.bias_gelu_bwd(grad_out, x, bias, ctx.approximate)
    return grad_x, grad_bias, None


_bias_gelu = _register_autograd("bias_gelu", _bias_gelu_backward, _bias_gelu_setup)


# --------------------------------------------------------------------------- the MLP family: linear_gelu
# linear_gelu and fused_mlp return the pre-activation too when asked (save_pre), so that
# their backward need not recompute it; the wrappers ask only when a gradient will flow.

def _pre_shape(x, features, save_pre):
    return (*x.shape[:-1], features) if save_pre else (0,)


def _missing_pre_error(op):
    return RuntimeError(f"tfkernels: {op} ran without saving its pre-activation (save_pre=False) but a gradient "
                        "was requested; call it with save_pre=True (the public wrapper does this when any input "
                        "requires grad)")


def linear_gelu(x, weight, bias=None, *, approximate="none"):
    """gelu(x @ weight^T + bias) with the bias and GELU fused into the GEMM's output pass."""
    out, _ = _linear_gelu(x, weight, bias, approximate, _needs_grad(x, weight, bias))
    return out


@torch.library.register_fake("tfkernels::linear_gelu")
def _(x, weight, bias, approximate, save_pre):
    features = _fake_checks.check_linear(x, "x", weight, "weight", bias, "bias")
    return x.new_empty((*x.shape[:-1], features)), x.new_empty(_pre_shape(x, features, save_pre))


@torch.library.register_fake("tfkernels::linear_gelu_bwd")
def _(grad_out, x, weight, pre, approximate):
    features = _fake_checks.check_linear(x, "x", weight, "weight", None, "bias")
    _fake_checks.check_rows_like(grad_out, "grad_out", x, features)
    _fake_checks.check_rows_like(pre, "pre", x, features)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, save_pre = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None
    ctx.approximate = approximate
    ctx.saved_pre = save_pre


def _linear_gelu_backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # only `pre` (internal) was differentiated: nothing flows back
        return None, None, None, None, None
    x, weight, pre = ctx.saved_tensors
    if not ctx.saved_pre:
        raise _missing_pre_error("linear_gelu")
    grad_x, grad_weight, grad_bias = _ops.linear_gelu_bwd(grad_out, x, weight, pre, ctx.approximate)
    return grad_x, grad_weight, (grad_bias if ctx.has_bias else None), None, None


_linear_gelu = _register_autograd("linear_gelu", _linear_gelu_backward, _linear_gelu_setup)


# --------------------------------------------------------------------------- the MLP family: fused_mlp

def fused_mlp(x, w1, b1, w2, b2, *, approximate="none"):
    """gelu(x @ w1^T + b1) @ w2^T + b2; the hidden activation is never stored."""
    out, _ = _fused_mlp(x, w1, b1, w2, b2, approximate, _needs_grad(x, w1, b1, w2, b2))
    return out


@torch.library.register_fake("tfkernels::fused_mlp")
def _(x, w1, b1, w2, b2, approximate, save_pre):
    hidden, features = _fake_checks.check_mlp(x, w1, b1, w2, b2)
    return x.new_empty((*x.shape[:-1], features)), x.new_empty(_pre_shape(x, hidden, save_pre))


@torch.library.register_fake("tfkernels::fused_mlp_bwd")
def _(grad_out, x, w1, w2, pre, approximate):
    hidden, features = _fake_checks.check_mlp(x, w1, None, w2, None)
    _fake_checks.check_rows_like(grad_out, "grad_out", x, features)
    _fake_checks.check_rows_like(pre, "pre", x, hidden)
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1]), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[:1]))


def _fused_mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, save_pre = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.approximate = approximate
    ctx.saved_pre = save_pre


def _fused_mlp_backward(ctx, grad_out, _grad_pre):
    if grad_out is None:
        return (None,) * 7
    x, w1, w2, pre = ctx.saved_tensors
    if not ctx.saved_pre:
        raise _missing_pre_error("fused_mlp")
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = _ops.fused_mlp_bwd(grad_out, x, w1, w2, pre, ctx.approximate)
    has_b1, has_b2 = ctx.has_bias
    return (grad_x, grad_w1, grad_b1 if has_b1 else None, grad_w2, grad_b2 if has_b2 else None, None, None)


_fused_mlp = _register_autograd("fused_mlp", _fused_mlp_backward, _fused_mlp_setup)


# --------------------------------------------------------------------------- autocast

def _register_autocast(opname, keep_dtype=()):
    """Under torch.autocast the forward ops run in the autocast dtype, like F.linear and SDPA:
    floating-point inputs on the autocast device are cast (float64 is left alone, as autocast
    does), then the op runs with autocast off. The casts are differentiable, so gradients
    reach float32 parameters in float32. The backward ops need no rule: they see the
    forward's dtypes. Same mechanism as torch.library.register_autocast, except that the
    dtype is read from the active autocast context (bf16 or fp16) instead of fixed.
    Arguments at the positions in `keep_dtype` are passed as they are (attention sinks
    stay float32, as the kernels want)."""
    op = getattr(_ops, opname).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)

            def cast(a):
                if (isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == _device_type
                        and a.dtype != torch.float64):
                    return a.to(dtype)
                return a

            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*[a if i in keep_dtype else cast(a) for i, a in enumerate(args)])

        op.py_impl(key)(kernel)  # seen by tracing (torch.compile, make_fx)
        _autocast_lib.impl(opname, lambda _keyset, *args, _k=kernel: _k(*args), key_name, with_keyset=True)


_autocast_lib = torch.library.Library("tfkernels", "IMPL")
_register_autocast("flash_attention_fwd", keep_dtype=(11,))  # sinks
_register_autocast("flash_attention_varlen_fwd", keep_dtype=(_VARLEN_SINKS,))
for _name in ("fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp"):
    _register_autocast(_name)
