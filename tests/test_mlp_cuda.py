"""linear_gelu / fused_mlp (forward and backward) on CUDA: csrc/cuda/mlp.cpp over the
project's GEMM core (csrc/cuda/gemm/mlp_impl.cuh).

Every test runs on a GPU ("cuda", skipped without one) and on the emulated device
("emu", tests/devices.py), except CUDA-graph capture and the sizes marked `gpu_only`
(minutes each under emulation), which need a GPU; the small ones are also marked
`sanitize` (compute-sanitizer runs them). The oracle is tfkernels.reference: fp16/bf16
follow the FlashAttention rule (tests/utils.assert_flash_rule) against the reference on
float32 copies (TF32 off) and the reference in the dtype; fp32 is checked by relative
error against a float64 reference, TF32 on and off. The suite sets
TFKERNELS_POISON_OUTPUTS=1 (conftest): an element a kernel forgets to write is NaN.

The grid covers, rather than multiplies out, M in {1, 17, 1000, 16384} (also as
leading dims [B, S] and a 1-D x), d_model in {40, 768, 1024, 4096}, d_ff = 4 d_model
and odd ones (1001, 37: the generic kernel for every GEMM that touches d_ff), both GELU
forms, with and without biases, outputs, `pre` and every gradient; plus every forced
tile shape, strided / misaligned / expanded operands, degenerate sizes, save_pre=False,
CUDA-graph capture, determinism and opcheck.
"""

import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_flash_rule, max_abs_err, tf32_matmul



sanitize = pytest.mark.sanitize
gpu_only = pytest.mark.gpu_only
# Problems of more than this many multiply-adds per GEMM take minutes each on the
# emulated device (two schedules, fibers per thread): they run on a GPU only.
EMU_MAX_MACS = 2 * 10**7
# The emulated quick grid (make test): the small (sanitize) cases, fp32, views, edges;
# the tile shapes run quick in test_fused_qkv_cuda.py.
quick = pytest.mark.emu_quick




def _param(device, shape, dtype, requires_grad, scale=1.0):
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad) if requires_grad else t


def linear_inputs(device, lead, d_in, d_out, bias, dtype, requires_grad=False):
    x = _param(device, (*lead, d_in), dtype, requires_grad)
    w = _param(device, (d_out, d_in), dtype, requires_grad, scale=1 / max(d_in, 1) ** 0.5)
    b = _param(device, (d_out,), dtype, requires_grad) if bias else None
    return x, w, b


def mlp_inputs(device, lead, d_model, d_ff, bias, dtype, requires_grad=False):
    x, w1, b1 = linear_inputs(device, lead, d_model, d_ff, bias, dtype, requires_grad)
    w2 = _param(device, (d_model, d_ff), dtype, requires_grad, scale=1 / max(d_ff, 1) ** 0.5)
    b2 = _param(device, (d_model,), dtype, requires_grad) if bias else None
    return x, w1, b1, w2, b2


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def run_ref(fn, tensors, dtype, grad=None, **kwargs):
    """fn (a reference op) on copies of `tensors` in `dtype` with TF32 off; with grad,
    also the gradient of every tensor (None where the tensor is None)."""
    leaves = [_leaf(t, dtype) for t in tensors]
    with tf32_matmul(False):
        out = fn(*leaves, **kwargs)
        if grad is None:
            return out.detach(), None
        out.backward(grad.to(dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def ref_pre(tensors, dtype):
    """x W1^T + b1 (the saved pre-activation) in `dtype`, TF32 off."""
    x, w, b = (None if t is None else t.detach().to(dtype) for t in tensors[:3])
    with tf32_matmul(False):
        return torch.nn.functional.linear(x, w, b)


def check_16bit(name, actual, ref_high, ref_low):
    assert actual.dtype == ref_low.dtype, f"{name}: dtype {actual.dtype} != {ref_low.dtype}"
    assert actual.is_contiguous(), f"{name}: not contiguous"
    assert_flash_rule(actual.detach(), ref_high.to(torch.float32), ref_low, name=name)


def check_fp32(name, actual, ref64, tf32):
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}"
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    scale = max(float(ref64.abs().max()) if ref64.numel() else 1.0, 1e-6)
    rel = max_abs_err(actual.detach(), ref64) / scale
    # fp32 FMA over reductions up to 16384: ~1e-6 of the largest value; TF32 (10-bit mantissa): ~1e-3.
    tol = 1e-2 if tf32 else 5e-5
    assert rel <= tol, f"{name}: relative error {rel:.3e} > {tol:.0e} (tf32={tf32})"


LINEAR_GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")
MLP_GRAD_NAMES = ("grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")


def compare_16bit(names, actual, high, low):
    for name, a, h, l in zip(names, actual, high, low):
        if h is None:
            assert a is None, f"{name}: expected None without a bias"
            continue
        check_16bit(name, a, h, l)


# ------------------------------------------------------------------ linear_gelu

# (leading dims, d_in, d_out, bias, approximate, dtypes). M = prod(leading dims).
_BOTH = ("fp16", "bf16")
LINEAR_CASES = [
    ((1,), 40, 160, True, "none", _BOTH, True),
    ((), 40, 160, False, "tanh", ("bf16",), True),  # 1-D x: M = 1, no leading dims
    ((17,), 768, 3072, False, "tanh", _BOTH, False),
    ((2, 500), 1024, 4096, True, "tanh", ("bf16",), False),
    ((1000,), 4096, 16384, True, "none", ("fp16",), False),
    ((4, 4096), 768, 3072, True, "none", ("bf16",), False),
    ((16384,), 4096, 16384, False, "tanh", ("bf16",), False),
    ((16384,), 40, 160, True, "tanh", ("fp16",), False),
    # Generic kernel: odd d_out (every GEMM), odd d_in (x and W operands).
    ((17,), 40, 1001, True, "tanh", _BOTH, True),
    ((1000,), 37, 160, True, "none", ("fp16",), False),
]


def _cases(cases, prefix):
    params = []
    for lead, d_in, d_out, bias, approx, dtypes, small in cases:
        for dt in dtypes:
            dtype = torch.float16 if dt == "fp16" else torch.bfloat16
            m = 1
            for s in lead:
                m *= s
            shape = "x".join(map(str, lead)) if lead else "1d"  # the leading dims
            pid = f"{prefix}M{m}-{shape}-{d_in}-{d_out}-{approx}{'-bias' if bias else ''}-{dt}"
            marks = ([sanitize, quick] if small else []) + ([gpu_only] if m * d_in * d_out > EMU_MAX_MACS else [])
            params.append(pytest.param(lead, d_in, d_out, bias, approx, dtype, id=pid, marks=marks))
    return params


@pytest.mark.parametrize("lead,d_in,d_out,bias,approx,dtype", _cases(LINEAR_CASES, ""))
def test_linear_gelu_16bit(cuda_device, lead, d_in, d_out, bias, approx, dtype):
    x, w, b = linear_inputs(cuda_device, lead, d_in, d_out, bias, dtype, requires_grad=True)
    out, pre = torch.ops.tfkernels.linear_gelu(x, w, b, approx, True)
    assert out.shape == (*lead, d_out) and pre.shape == (*lead, d_out)
    grad = torch.randn_like(out)
    tensors = (x, w, b)
    high, high_g = run_ref(reference.linear_gelu, tensors, torch.float32, grad, approximate=approx)
    low, low_g = run_ref(reference.linear_gelu, tensors, dtype, grad, approximate=approx)
    check_16bit("out", out, high, low)
    check_16bit("pre", pre, ref_pre(tensors, torch.float32), ref_pre(tensors, dtype))
    # The backward through autograd (the public wrapper saves pre and calls linear_gelu_bwd).
    tfkernels.linear_gelu(x, w, b, approximate=approx).backward(grad)
    compare_16bit(LINEAR_GRAD_NAMES, (x.grad, w.grad, None if b is None else b.grad), high_g, low_g)


# ------------------------------------------------------------------ fused_mlp

MLP_CASES = [
    ((1,), 40, 160, True, "none", _BOTH, True),
    ((17,), 40, 160, False, "tanh", _BOTH, True),
    ((1, 17), 768, 3072, True, "tanh", ("fp16",), False),
    ((2, 500), 768, 3072, True, "none", ("bf16",), False),
    ((1000,), 1024, 4096, False, "tanh", ("fp16",), False),
    ((17,), 4096, 16384, True, "none", ("bf16",), False),
    ((4, 4096), 1024, 4096, True, "tanh", ("bf16",), False),
    ((16384,), 4096, 16384, True, "none", ("bf16",), False),
    ((16384,), 40, 160, True, "tanh", ("fp16",), False),
    # Odd d_ff: every GEMM that touches d_ff runs the generic kernel.
    ((1000,), 1024, 1001, True, "none", _BOTH, False),
    ((17,), 40, 37, False, "tanh", ("fp16",), True),
]


@pytest.mark.parametrize("lead,d_model,d_ff,bias,approx,dtype", _cases(MLP_CASES, "mlp-"))
def test_fused_mlp_16bit(cuda_device, lead, d_model, d_ff, bias, approx, dtype):
    tensors = mlp_inputs(cuda_device, lead, d_model, d_ff, bias, dtype, requires_grad=True)
    out, pre = torch.ops.tfkernels.fused_mlp(*tensors, approx, True)
    assert out.shape == (*lead, d_model) and pre.shape == (*lead, d_ff)
    grad = torch.randn_like(out)
    high, high_g = run_ref(reference.fused_mlp, tensors, torch.float32, grad, approximate=approx)
    low, low_g = run_ref(reference.fused_mlp, tensors, dtype, grad, approximate=approx)
    check_16bit("out", out, high, low)
    check_16bit("pre", pre, ref_pre(tensors, torch.float32), ref_pre(tensors, dtype))
    tfkernels.fused_mlp(*tensors, approximate=approx).backward(grad)
    compare_16bit(MLP_GRAD_NAMES, [None if t is None else t.grad for t in tensors], high_g, low_g)


# ------------------------------------------------------------------ fp32

FP32_LINEAR = [
    pytest.param((17,), 40, 160, True, "none", id="M17-40-160-none-bias", marks=[sanitize, quick]),
    pytest.param((1000,), 768, 3072, True, "tanh", id="M1000-768-3072-tanh-bias", marks=gpu_only),
    pytest.param((2, 500), 1024, 1001, False, "none", id="M1000-1024-1001-none", marks=gpu_only),
]
FP32_MLP = [
    pytest.param((1,), 40, 160, True, "tanh", id="M1-40-160-tanh-bias", marks=[sanitize, quick]),
    pytest.param((1000,), 768, 3072, False, "none", id="M1000-768-3072-none", marks=gpu_only),
    pytest.param((16384,), 1024, 4096, True, "tanh", id="M16384-1024-4096-tanh-bias", marks=gpu_only),
    pytest.param((17,), 40, 37, True, "none", id="M17-40-37-none-bias", marks=[sanitize, quick]),
]
TF32 = [pytest.param(False, id="tf32-off"), pytest.param(True, id="tf32-on")]


@pytest.mark.parametrize("tf32", TF32)
@pytest.mark.parametrize("lead,d_in,d_out,bias,approx", FP32_LINEAR)
def test_linear_gelu_fp32(cuda_device, lead, d_in, d_out, bias, approx, tf32):
    tensors = linear_inputs(cuda_device, lead, d_in, d_out, bias, torch.float32, requires_grad=True)
    with tf32_matmul(tf32):
        out, pre = torch.ops.tfkernels.linear_gelu(*tensors, approx, True)
        grad = torch.randn_like(out)
        tfkernels.linear_gelu(*tensors, approximate=approx).backward(grad)
    ref, ref_g = run_ref(reference.linear_gelu, tensors, torch.float64, grad, approximate=approx)
    check_fp32("out", out, ref, tf32)
    check_fp32("pre", pre, ref_pre(tensors, torch.float64), tf32)
    for name, t, r in zip(LINEAR_GRAD_NAMES, tensors, ref_g):
        if t is not None:
            check_fp32(name, t.grad, r, tf32)


@pytest.mark.parametrize("tf32", TF32)
@pytest.mark.parametrize("lead,d_model,d_ff,bias,approx", FP32_MLP)
def test_fused_mlp_fp32(cuda_device, lead, d_model, d_ff, bias, approx, tf32):
    tensors = mlp_inputs(cuda_device, lead, d_model, d_ff, bias, torch.float32, requires_grad=True)
    with tf32_matmul(tf32):
        out, pre = torch.ops.tfkernels.fused_mlp(*tensors, approx, True)
        grad = torch.randn_like(out)
        tfkernels.fused_mlp(*tensors, approximate=approx).backward(grad)
    ref, ref_g = run_ref(reference.fused_mlp, tensors, torch.float64, grad, approximate=approx)
    check_fp32("out", out, ref, tf32)
    check_fp32("pre", pre, ref_pre(tensors, torch.float64), tf32)
    for name, t, r in zip(MLP_GRAD_NAMES, tensors, ref_g):
        if t is not None:
            check_fp32(name, t.grad, r, tf32)


# ------------------------------------------------------------------ paths and edges

HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ALL_DTYPES = HALF_DTYPES + [pytest.param(torch.float32, id="fp32")]


def check_by_dtype(names, actual, ref_fn, dtype):
    """Compare each of `actual` with ref_fn(ref_dtype)[i] by the rule of the dtype:
    float64 relative error for fp32, the FlashAttention rule for 16-bit."""
    if dtype == torch.float32:
        ref = ref_fn(torch.float64)
        for name, a, r in zip(names, actual, ref):
            check_fp32(name, a, r, tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        high, low = ref_fn(torch.float32), ref_fn(dtype)
        for name, a, h, l in zip(names, actual, high, low):
            check_16bit(name, a, h, l)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tile", ["128x256", "128x128", "64x128"])
def test_every_tile_shape(cuda_device, tile, dtype, monkeypatch):
    """Each tensor-core tile shape, forced, on every GEMM of both ops, with edges in
    every dim: M = 300, d_model = 200 (3 x 64 + 8), d_ff = 280 (not a multiple of 64).
    The backward GEMMs have no 128x256 shape: it falls back to 128x128."""
    monkeypatch.setenv("TFKERNELS_GEMM_TILE", tile)
    tensors = mlp_inputs(cuda_device, (2, 150), 200, 280, True, dtype, requires_grad=True)
    out = tfkernels.fused_mlp(*tensors, approximate="tanh")
    grad = torch.randn_like(out)
    out.backward(grad)
    high, high_g = run_ref(reference.fused_mlp, tensors, torch.float32, grad, approximate="tanh")
    low, low_g = run_ref(reference.fused_mlp, tensors, dtype, grad, approximate="tanh")
    check_16bit("out", out, high, low)
    compare_16bit(MLP_GRAD_NAMES, [t.grad for t in tensors], high_g, low_g)

    lin = tensors[:3]
    for t in lin:
        t.grad = None
    out = tfkernels.linear_gelu(*lin, approximate="none")
    grad = torch.randn_like(out)
    out.backward(grad)
    high, high_g = run_ref(reference.linear_gelu, lin, torch.float32, grad, approximate="none")
    low, low_g = run_ref(reference.linear_gelu, lin, dtype, grad, approximate="none")
    check_16bit("linear out", out, high, low)
    compare_16bit(LINEAR_GRAD_NAMES, [t.grad for t in lin], high_g, low_g)


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_strided_and_misaligned_inputs(cuda_device, dtype):
    """x as a column slice (row stride d_model + 8: read in place), as a transposed view
    (copied), and off 16-byte alignment (generic kernel); weights with padded row
    strides. Forward and both backward ops."""
    B, S, D, F = 3, 19, 64, 96
    x_pad = torch.randn(B, S, D + 8, device=cuda_device).to(dtype)[..., :D]
    x_t = torch.randn(S, B, D, device=cuda_device).to(dtype).transpose(0, 1)
    flat = torch.randn(B * S * D + 1, device=cuda_device).to(dtype)
    x_mis = flat[1:].view(B, S, D)
    w1 = (torch.randn(F, D + 8, device=cuda_device) / D**0.5).to(dtype)[:, :D]
    b1 = torch.randn(F, device=cuda_device).to(dtype)
    w2 = (torch.randn(D, F + 16, device=cuda_device) / F**0.5).to(dtype)[:, :F]
    b2 = torch.randn(D, device=cuda_device).to(dtype)
    for x in (x_pad, x_t, x_mis):
        tensors = [t.detach().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
        out, pre = torch.ops.tfkernels.fused_mlp(x, w1, b1, w2, b2, "none", True)
        grad = torch.randn_like(out)
        grads = torch.ops.tfkernels.fused_mlp_bwd(grad, x, w1, w2, pre, "none")

        def mlp_ref(rd, grad=grad, tensors=tensors):
            out, grads = run_ref(reference.fused_mlp, tensors, rd, grad, approximate="none")
            return [out, *grads]

        check_by_dtype(("out",) + MLP_GRAD_NAMES, [out, *grads], mlp_ref, dtype)

        out, pre = torch.ops.tfkernels.linear_gelu(x, w1, b1, "tanh", True)
        grad = torch.randn_like(out)
        grads = torch.ops.tfkernels.linear_gelu_bwd(grad, x, w1, pre, "tanh")

        def lin_ref(rd, grad=grad, tensors=tensors[:3]):
            out, grads = run_ref(reference.linear_gelu, tensors, rd, grad, approximate="tanh")
            return [out, *grads]

        check_by_dtype(("linear out",) + LINEAR_GRAD_NAMES, [out, *grads], lin_ref, dtype)


@sanitize
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_ops_read_strided_grad_and_pre(cuda_device, dtype):
    """grad_out and pre as column slices of wider tensors (row strides read in place),
    and grad_out expanded from a [N] vector (row stride 0): the same answer as
    contiguous copies, bit for bit (same kernels, same order of summation)."""
    B, S, D, F = 2, 33, 64, 128
    x = torch.randn(B, S, D, device=cuda_device).to(dtype)
    w1 = (torch.randn(F, D, device=cuda_device) / D**0.5).to(dtype)
    w2 = (torch.randn(D, F, device=cuda_device) / F**0.5).to(dtype)
    pre_wide = torch.randn(B, S, F + 8, device=cuda_device).to(dtype)
    pre_lin_wide = torch.randn(B, S, F + 24, device=cuda_device).to(dtype)
    for grad_kind in ("slice", "expanded"):
        if grad_kind == "slice":
            g_mlp = torch.randn(B, S, D + 8, device=cuda_device).to(dtype)[..., :D]
            g_lin = torch.randn(B, S, F + 8, device=cuda_device).to(dtype)[..., :F]
        else:
            g_mlp = torch.randn(D, device=cuda_device).to(dtype).expand(B, S, D)
            g_lin = torch.randn(F, device=cuda_device).to(dtype).expand(B, S, F)
        pre = pre_wide[..., :F]
        a = torch.ops.tfkernels.fused_mlp_bwd(g_mlp, x, w1, w2, pre, "tanh")
        c = torch.ops.tfkernels.fused_mlp_bwd(g_mlp.contiguous(), x, w1, w2, pre.contiguous(), "tanh")
        for name, u, v in zip(MLP_GRAD_NAMES, a, c):
            assert not torch.isnan(u).any(), name
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        pre = pre_lin_wide[..., :F]
        a = torch.ops.tfkernels.linear_gelu_bwd(g_lin, x, w1, pre, "none")
        c = torch.ops.tfkernels.linear_gelu_bwd(g_lin.contiguous(), x, w1, pre.contiguous(), "none")
        for name, u, v in zip(LINEAR_GRAD_NAMES, a, c):
            assert not torch.isnan(u).any(), name
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_from_sum(cuda_device, dtype):
    """loss = out.sum(): autograd hands the backward an expanded gradient (strides 0)."""
    tensors = mlp_inputs(cuda_device, (2, 21), 64, 256, True, dtype, requires_grad=True)
    tfkernels.fused_mlp(*tensors, approximate="none").sum().backward()
    lin = [t.detach().requires_grad_(True) for t in tensors[:3]]
    tfkernels.linear_gelu(*lin, approximate="tanh").sum().backward()
    refs = {}
    for rd in (torch.float32, dtype):
        leaves = [_leaf(t, rd) for t in tensors]
        lin_leaves = [_leaf(t, rd) for t in lin]
        with tf32_matmul(False):
            reference.fused_mlp(*leaves, approximate="none").sum().backward()
            reference.linear_gelu(*lin_leaves, approximate="tanh").sum().backward()
        refs[rd] = ([t.grad for t in leaves], [t.grad for t in lin_leaves])
    compare_16bit(MLP_GRAD_NAMES, [t.grad for t in tensors], refs[torch.float32][0], refs[dtype][0])
    compare_16bit(LINEAR_GRAD_NAMES, [t.grad for t in lin], refs[torch.float32][1], refs[dtype][1])


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_save_pre_false(cuda_device, dtype):
    """save_pre=False (what the wrapper passes under no_grad): pre is an empty [0]
    tensor and the output is the same, bit for bit."""
    x, w1, b1, w2, b2 = mlp_inputs(cuda_device, (3, 7), 64, 256, True, dtype, requires_grad=True)
    out_s, pre_s = torch.ops.tfkernels.linear_gelu(x, w1, b1, "tanh", True)
    out_n, pre_n = torch.ops.tfkernels.linear_gelu(x, w1, b1, "tanh", False)
    assert pre_s.shape == (3, 7, 256) and pre_n.shape == (0,)
    assert torch.equal(out_s, out_n)
    mout_s, mpre_s = torch.ops.tfkernels.fused_mlp(x, w1, b1, w2, b2, "none", True)
    mout_n, mpre_n = torch.ops.tfkernels.fused_mlp(x, w1, b1, w2, b2, "none", False)
    assert mpre_s.shape == (3, 7, 256) and mpre_n.shape == (0,)
    assert torch.equal(mout_s, mout_n)
    with torch.no_grad():
        assert torch.equal(tfkernels.linear_gelu(x, w1, b1, approximate="tanh"), out_s)
        assert torch.equal(tfkernels.fused_mlp(x, w1, b1, w2, b2, approximate="none"), mout_s)


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_empty_and_degenerate(cuda_device, dtype):
    ops = torch.ops.tfkernels
    # No rows: empty outputs; the backward still writes dW = 0 and db = 0.
    x, w1, b1, w2, b2 = mlp_inputs(cuda_device, (0, 5), 64, 128, True, dtype)
    out, pre = ops.fused_mlp(x, w1, b1, w2, b2, "none", True)
    assert out.shape == (0, 5, 64) and pre.shape == (0, 5, 128)
    gx, gw1, gb1, gw2, gb2 = ops.fused_mlp_bwd(torch.zeros_like(out), x, w1, w2, pre, "none")
    assert gx.shape == x.shape
    for t in (gw1, gb1, gw2, gb2):
        assert torch.equal(t, torch.zeros_like(t))
    out, pre = ops.linear_gelu(x, w1, b1, "tanh", True)
    gx, gw, gb = ops.linear_gelu_bwd(torch.zeros_like(out), x, w1, pre, "tanh")
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))

    def both_ways(fn, tensors, **kw):
        """Forward + backward of fn, ours and the reference in the dtype (TF32 off)."""
        ours = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
        out = getattr(tfkernels, fn)(*ours, **kw)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out, ref_g = run_ref(getattr(reference, fn), ours, dtype, grad, **kw)  # leaves that require grad
        # Reductions over zero or few terms: exact up to one rounding of the same sums.
        torch.testing.assert_close(out.detach(), ref_out, rtol=2e-2, atol=2e-2)
        for t, r in zip(ours, ref_g):
            if t is not None:
                torch.testing.assert_close(t.grad, r, rtol=2e-2, atol=2e-2)

    # d_model = 0: the output is gelu(b1) (then b2 + gelu(b1) W2^T); db1 from one reduction.
    both_ways("linear_gelu", mlp_inputs(cuda_device, (2, 3), 0, 16, True, dtype)[:3], approximate="tanh")
    both_ways("fused_mlp", mlp_inputs(cuda_device, (2, 3), 0, 16, True, dtype), approximate="none")
    # d_ff = 0: the output is b2; db2 from one reduction.
    both_ways("fused_mlp", mlp_inputs(cuda_device, (2, 3), 16, 0, True, dtype), approximate="none")


@gpu_only  # the emulated device checks every launch under two schedules instead
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_deterministic(cuda_device, dtype):
    """No atomics anywhere: two runs agree bit for bit."""
    tensors = mlp_inputs(cuda_device, (2, 500), 768, 3072, True, dtype, requires_grad=True)
    results = []
    for _ in range(2):
        for t in tensors:
            t.grad = None
        out = tfkernels.fused_mlp(*tensors, approximate="tanh")
        lin = tfkernels.linear_gelu(*tensors[:3], approximate="none")
        torch.manual_seed(0)
        torch.autograd.backward([out, lin], [torch.randn_like(out), torch.randn_like(lin)])
        results.append([out.detach().clone(), lin.detach().clone()] + [t.grad.clone() for t in tensors])
    for a, c in zip(*results):
        assert torch.equal(a, c)


@sanitize
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.cuda
def test_cuda_graph_capture(dtype):
    """All four ops launch on the current stream with no host sync: captured and
    replayed, they give the eager results."""
    x, w1, b1, w2, b2 = mlp_inputs("cuda", (2, 37), 128, 512, True, dtype)
    ops = torch.ops.tfkernels
    g_out = torch.randn(2, 37, 128, device="cuda").to(dtype)
    g_hid = torch.randn(2, 37, 512, device="cuda").to(dtype)

    def step():
        out, pre = ops.fused_mlp(x, w1, b1, w2, b2, "tanh", True)
        lout, lpre = ops.linear_gelu(x, w1, b1, "none", True)
        return ((out, pre, lout, lpre) + tuple(ops.fused_mlp_bwd(g_out, x, w1, w2, pre, "tanh"))
                + tuple(ops.linear_gelu_bwd(g_hid, x, w1, lpre, "none")))

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel attributes, allocator) off the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)


@sanitize
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_opcheck(cuda_device, dtype):
    x, w1, b1, w2, b2 = mlp_inputs(cuda_device, (2, 9), 64, 96, True, dtype, requires_grad=True)
    ops = torch.ops.tfkernels
    # save_pre=True with inputs that require grad (opcheck also runs the backward through
    # the registered autograd formula); save_pre=False is the inference form.
    torch.library.opcheck(ops.linear_gelu.default, (x, w1, b1, "tanh", True))
    torch.library.opcheck(ops.fused_mlp.default, (x, w1, b1, w2, b2, "none", True))
    plain = [t.detach() for t in (x, w1, b1, w2, b2)]
    torch.library.opcheck(ops.linear_gelu.default, (*plain[:3], "none", False))
    torch.library.opcheck(ops.fused_mlp.default, (*plain, "tanh", False))
    xd, w1d, w2d = x.detach(), w1.detach(), w2.detach()
    pre = torch.randn(2, 9, 96, device=cuda_device).to(dtype)
    torch.library.opcheck(ops.linear_gelu_bwd.default,
                          (torch.randn(2, 9, 96, device=cuda_device).to(dtype), xd, w1d, pre, "none"))
    torch.library.opcheck(ops.fused_mlp_bwd.default,
                          (torch.randn(2, 9, 64, device=cuda_device).to(dtype), xd, w1d, w2d, pre, "tanh"))


@quick
def test_rejects_bad_input(cuda_device):
    x, w1, b1, w2, b2 = mlp_inputs(cuda_device, (4,), 64, 128, True, torch.float32)
    ops = torch.ops.tfkernels
    with pytest.raises(RuntimeError, match="dtype"):
        tfkernels.linear_gelu(x.double(), w1.double(), b1.double())
    with pytest.raises(RuntimeError, match="weight"):
        tfkernels.linear_gelu(x, w1[:, :32], b1)
    with pytest.raises(RuntimeError, match="w2"):
        tfkernels.fused_mlp(x, w1, b1, w2[:, :64], b2)
    with pytest.raises(RuntimeError, match="b2"):
        tfkernels.fused_mlp(x, w1, b1, w2, b2[:-1])
    with pytest.raises(RuntimeError, match="approximate"):
        ops.linear_gelu(x, w1, b1, "sigmoid", False)
    out, pre = ops.fused_mlp(x, w1, b1, w2, b2, "none", False)
    with pytest.raises(RuntimeError, match="pre"):  # the [0] tensor of save_pre=False
        ops.fused_mlp_bwd(torch.ones_like(out), x, w1, w2, pre, "none")
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.linear_gelu_bwd(out, x, w1, torch.zeros(4, 128, device=cuda_device), "none")
