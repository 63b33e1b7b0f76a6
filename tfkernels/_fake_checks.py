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
