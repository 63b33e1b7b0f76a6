"""The argument checks of the fake (meta) kernels in ops.py.

A fake kernel is what torch.compile and make_fx run instead of the real one while
tracing, so these checks make a bad shape fail at trace time rather than first when
the compiled graph runs. They mirror the C++ checks (csrc/args.cpp) and use their
wording, so a test's expected message matches either. torch._check (as PyTorch's
extension-cpp does) also accepts symbolic sizes, so dynamic shapes still trace.
Values (e.g. `approximate`) are left to the C++ kernels: they are not shapes.
"""
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(cond, message):
    torch._check(cond, lambda: f"tfkernels: {message}")


def _shape(t):
    return f"{t.dim()}-D {list(t.shape)}"


def check_floating(t, name):
    _check(t.dtype in _FLOAT_DTYPES, f"{name} must have dtype in {_FLOAT_DTYPES}, got {t.dtype}")


def check_rank(t, name, rank, layout):
    _check(t.dim() == rank, f"{name} must be a {rank}-D tensor {layout}, got {_shape(t)}")


def check_like(t, name, ref, ref_name):
    """Same device and dtype as ref."""
    _check(t.device == ref.device, f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    _check(t.dtype == ref.dtype, f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_dim(t, name, dim, expected, what):
    _check(t.shape[dim] == expected, f"{name}.shape[{dim}] ({what}) must be {expected}, got {t.shape[dim]}")


def check_bias(bias, name, x, x_name, features):
    if bias is not None:
        check_like(bias, name, x, x_name)
        _check(bias.dim() == 1 and bias.shape[0] == features,
               f"{name} must be a 1-D tensor [{features}], got {_shape(bias)}")


def check_rows_like(t, name, x, features):
    """t is [*x.shape[:-1], features] on x's device, in x's dtype."""
    check_like(t, name, x, "x")
    expected = (*x.shape[:-1], features)
    _check(tuple(t.shape) == expected,
           f"{name} must have the leading dims of x {list(x.shape)} and last dim {features}, got {list(t.shape)}")


def check_qkv(x, weight, bias, num_heads, num_kv_heads):
    """The fused_qkv arguments; returns the head dim."""
    check_floating(x, "x")
    check_rank(x, "x", 3, "[B, S, E]")
    check_rank(weight, "weight", 2, "[(H + 2*Hkv) * D, E]")
    check_like(weight, "weight", x, "x")
    _check(num_heads >= 1, f"num_heads must be >= 1, got {num_heads}")
    _check(num_kv_heads >= 1 and num_heads % num_kv_heads == 0,
           f"num_heads ({num_heads}) must be a multiple of num_kv_heads, got num_kv_heads = {num_kv_heads}")
    check_dim(weight, "weight", 1, x.shape[2], "E, as x.shape[2]")
    groups = num_heads + 2 * num_kv_heads
    rows = weight.shape[0]
    _check(rows > 0 and rows % groups == 0,
           f"weight.shape[0] must be (num_heads + 2*num_kv_heads) * head_dim = {groups} * D, got {rows}")
    check_bias(bias, "bias", x, "x", rows)
    return rows // groups


def check_qkv_grads(grad_q, grad_k, grad_v, x, weight):
    """The fused_qkv_bwd arguments; the head counts come from the gradients."""
    check_rank(grad_q, "grad_q", 4, "[B, H, S, D]")
    check_rank(grad_k, "grad_k", 4, "[B, Hkv, S, D]")
    check_rank(grad_v, "grad_v", 4, "[B, Hkv, S, D]")
    heads, kv_heads = grad_q.shape[1], grad_k.shape[1]
    head_dim = check_qkv(x, weight, None, heads, kv_heads)
    batch, seqlen = x.shape[0], x.shape[1]
    for name, grad, h in (("grad_q", grad_q, heads), ("grad_k", grad_k, kv_heads), ("grad_v", grad_v, kv_heads)):
        check_like(grad, name, x, "x")
        expected = (batch, h, seqlen, head_dim)
        _check(tuple(grad.shape) == expected, f"{name} must have shape {list(expected)}, got {list(grad.shape)}")


def check_linear(x, x_name, weight, weight_name, bias, bias_name):
    """x [..., K] @ weight [N, K]^T + bias [N]; returns N."""
    check_floating(x, x_name)
    _check(x.dim() >= 1, f"{x_name} must have at least 1 dimension [..., K], got a scalar")
    check_rank(weight, weight_name, 2, "[N, K]")
    check_like(weight, weight_name, x, x_name)
    check_dim(weight, weight_name, 1, x.shape[-1], "K, as the last dim of the input")
    check_bias(bias, bias_name, x, x_name, weight.shape[0])
    return weight.shape[0]


def check_bias_gelu(x, bias):
    """x [..., N] + bias [N]; returns N."""
    check_floating(x, "x")
    _check(x.dim() >= 1, "x must have at least 1 dimension [..., N], got a scalar")
    check_rank(bias, "bias", 1, "[N]")
    check_like(bias, "bias", x, "x")
    check_dim(bias, "bias", 0, x.shape[-1], "N, as the last dim of x")
    return x.shape[-1]


def check_mlp(x, w1, b1, w2, b2):
    """gelu(x W1^T + b1) W2^T + b2; returns (hidden F, output N)."""
    hidden = check_linear(x, "x", w1, "w1", b1, "b1")
    check_rank(w2, "w2", 2, "[N, F]")
    check_like(w2, "w2", x, "x")
    check_dim(w2, "w2", 1, hidden, "F, as w1.shape[0]")
    check_bias(b2, "b2", x, "x", w2.shape[0])
    return hidden, w2.shape[0]


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The flash_attention_varlen_fwd/_bwd tensors (shapes only: cu_seqlens' values are the kernels')."""
    check_floating(q, "q")
    check_rank(q, "q", 3, "[total_q, H, D]")
    check_rank(k, "k", 3, "[total_k, Hkv, D]")
    check_rank(v, "v", 3, "[total_k, Hkv, D]")
    check_like(k, "k", q, "q")
    check_like(v, "v", q, "q")
    heads, head_dim = q.shape[1], q.shape[2]
    _check(1 <= head_dim <= 256, f"head dim q.shape[2] must be in [1, 256], got {head_dim}")
    check_dim(k, "k", 2, head_dim, "head dim, as q")
    check_dim(v, "v", 0, k.shape[0], "total_k, as k")
    check_dim(v, "v", 1, k.shape[1], "kv heads, as k")
    check_dim(v, "v", 2, head_dim, "head dim, as q")
    _check(k.shape[1] >= 1 and heads % k.shape[1] == 0,
           f"the number of query heads (q.shape[1] = {heads}) must be a multiple of the number of kv heads "
           f"(k.shape[1] = {k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check(cu.dtype == torch.int32, f"{name} must have dtype int32, got {cu.dtype}")
        _check(cu.dim() == 1 and cu.shape[0] >= 1,
               f"{name} must be a 1-D tensor [B + 1] (B >= 0 sequences), got {_shape(cu)}")
        _check(cu.device == q.device, f"{name} must be on the device of q ({q.device}), got {cu.device}")
    _check(cu_seqlens_k.shape[0] == cu_seqlens_q.shape[0],
           f"cu_seqlens_k must have the length of cu_seqlens_q (B + 1 = {cu_seqlens_q.shape[0]}), "
           f"got {cu_seqlens_k.shape[0]}")
    _check(max_seqlen_q >= 0, f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    _check(max_seqlen_k >= 0, f"max_seqlen_k must be >= 0, got {max_seqlen_k}")


def check_varlen_grads(q, grad_out, grad_lse, out, lse):
    """The flash_attention_varlen_bwd gradients and saved outputs."""
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_like(t, name, q, "q")
        _check(t.shape == q.shape, f"{name} must have the shape of q {list(q.shape)}, got {list(t.shape)}")
    heads, total_q = q.shape[1], q.shape[0]
    _check(lse.dtype == torch.float32 and lse.dim() == 2 and lse.shape[0] == heads and lse.shape[1] == total_q,
           f"lse must be float32 [H, total_q] = [{heads}, {total_q}], got {lse.dtype} {list(lse.shape)}")
    if grad_lse is not None:
        _check(grad_lse.dtype == torch.float32 and grad_lse.shape == lse.shape,
               f"grad_lse must be float32 of the shape of lse {list(lse.shape)}, got {grad_lse.dtype} "
               f"{list(grad_lse.shape)}")

def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, rotary_cos, rotary_sin, num_splits):
    """The flash_attention_kvcache shapes (csrc/kvcache_args.cpp); values are the kernels' to check."""
    check_floating(q, "q")
    check_rank(q, "q", 4, "[B, Sq, H, D]")
    batch, _, heads, head_dim = q.shape
    _check(1 <= head_dim <= 256, f"head dim q.shape[3] must be in [1, 256], got {head_dim}")
    paged = block_table is not None
    layout = ("[num_blocks, block_size, Hkv, D] (paged: block_table is given)" if paged
              else "[B, S_cache, Hkv, D] (dense: no block_table)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_rank(t, name, 4, layout)
        check_like(t, name, q, "q")
    _check(tuple(v_cache.shape) == tuple(k_cache.shape),
           f"v_cache must have the shape of k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}")
    check_dim(k_cache, "k_cache", 3, head_dim, "head dim, as q")
    kv_heads = k_cache.shape[2]
    _check(kv_heads >= 1 and heads % kv_heads == 0,
           f"the number of query heads (q.shape[2] = {heads}) must be a multiple of the number of kv heads "
           f"(k_cache.shape[2] = {kv_heads})")
    if paged:
        _check(block_table.dtype == torch.int32, f"block_table must have dtype int32, got {block_table.dtype}")
        _check(block_table.dim() == 2 and block_table.shape[0] == batch,
               f"block_table must be a 2-D tensor [B, max_blocks] with B = {batch} (q.shape[0]), got "
               f"{_shape(block_table)}")
    else:
        check_dim(k_cache, "k_cache", 0, batch, "batch, as q")
    _check((k is None) == (v is None), "the new k and v must be given together (both or neither)")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_rank(t, name, 4, "[B, Snew, Hkv, D]")
            check_like(t, name, q, "q")
            check_dim(t, name, 0, batch, "batch, as q")
            check_dim(t, name, 2, kv_heads, "kv heads, as k_cache")
            check_dim(t, name, 3, head_dim, "head dim, as q")
        check_dim(v, "v", 1, k.shape[1], "Snew, as k")
    _check(cache_seqlens.dtype == torch.int32, f"cache_seqlens must have dtype int32, got {cache_seqlens.dtype}")
    _check(cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == batch,
           f"cache_seqlens must be a 1-D tensor [B] with B = {batch} (q.shape[0]), got {_shape(cache_seqlens)}")
    _check((rotary_cos is None) == (rotary_sin is None), "rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        check_rank(rotary_cos, "rotary_cos", 2, "[seqlen_ro, rotary_dim / 2]")
        check_like(rotary_cos, "rotary_cos", q, "q")
        check_like(rotary_sin, "rotary_sin", q, "q")
        _check(tuple(rotary_sin.shape) == tuple(rotary_cos.shape),
               f"rotary_sin must have the shape of rotary_cos {list(rotary_cos.shape)}, got {list(rotary_sin.shape)}")
        _check(2 * rotary_cos.shape[1] <= head_dim,
               f"rotary_dim (2 * rotary_cos.shape[1]) must be even and <= the head dim {head_dim}, got "
               f"{2 * rotary_cos.shape[1]}")
    _check(num_splits >= 0, f"num_splits must be >= 0 (0 = chosen from the shape), got {num_splits}")
