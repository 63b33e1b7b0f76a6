"""The MLP family: bias_gelu, linear_gelu and fused_mlp (forward and backward ops)
against tfkernels.reference, on every device.

Devices (tests/devices.py): a test that takes `device` runs on the CPU, on the
emulated CUDA device ("emu") and on a GPU ("cuda", skipped without one); `cuda_device`
only on the last two (CUDA-only paths: tile shapes, fp32 with TF32, the large grid);
a test with neither runs on the CPU only (float64, which the CUDA kernels lack, and
the CPU kernel's blocking). The emulated device runs the cases marked `emu_quick`
unless TFKERNELS_EMU_GRID=full; `gpu_only` cases (minutes each under emulation) run
on a GPU only; the small ones are also marked `sanitize` (compute-sanitizer runs them).

The oracle is tfkernels.reference. The CPU grid compares float64 tightly and the other
dtypes by the FlashAttention rule against float64; the CUDA-style checks
(tests/gemm_checks.py) compare fp16/bf16 by that rule against float32 (TF32 off) and
fp32 by relative error against float64, TF32 on and off. Outputs are NaN-poisoned
(TFKERNELS_POISON_OUTPUTS=1, conftest), so an element a kernel forgets to write fails.

The CUDA grid covers, rather than multiplies out, M in {1, 17, 1000, 16384} (also as
leading dims [B, S] and a 1-D x), d_model in {40, 768, 1024, 4096}, d_ff = 4 d_model
and odd ones (1001, 37: the generic kernel for every GEMM that touches d_ff), both GELU
forms, with and without biases, outputs, `pre` and every gradient.
"""
import math

import pytest
import torch

import tfkernels
from tfkernels import reference

from .gemm_checks import (ALL_DTYPES, CPU_DTYPES, HALF_DTYPES, KERNELS, TF32, check_16bit, check_by_dtype, check_fp32,
                          compare_16bit, force_gemm16, gpu_only, leaf, quick, rejects, run_reference, sanitize)
from .utils import assert_close_float64, assert_flash_rule, tf32_matmul

ops = torch.ops.tfkernels
APPROX = ["none", "tanh"]
LINEAR_GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")
MLP_GRAD_NAMES = ("grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")
# Problems of more than this many multiply-adds per GEMM take minutes each on the
# emulated device (two schedules, fibers per thread): they run on a GPU only.
EMU_MAX_MACS = 2 * 10**7


# ============================================================================= sample inputs

def _param(device, shape, dtype, requires_grad, scale=1.0):
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad) if requires_grad else t


def linear_inputs(device, lead, d_in, d_out, bias, dtype, requires_grad=False):
    """x [*lead, d_in], weight [d_out, d_in] (scaled to keep activations O(1)), bias [d_out] or None."""
    x = _param(device, (*lead, d_in), dtype, requires_grad)
    w = _param(device, (d_out, d_in), dtype, requires_grad, scale=1 / max(d_in, 1) ** 0.5)
    b = _param(device, (d_out,), dtype, requires_grad) if bias else None
    return x, w, b


def mlp_inputs(device, lead, d_model, d_ff, bias, dtype, requires_grad=False):
    x, w1, b1 = linear_inputs(device, lead, d_model, d_ff, bias, dtype, requires_grad)
    w2 = _param(device, (d_model, d_ff), dtype, requires_grad, scale=1 / max(d_ff, 1) ** 0.5)
    b2 = _param(device, (d_model,), dtype, requires_grad) if bias else None
    return x, w1, b1, w2, b2


def bias_gelu_inputs(device, shape, dtype, requires_grad=False):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    bias = torch.randn(shape[-1], device=device, dtype=dtype)
    return x.requires_grad_(requires_grad), bias.requires_grad_(requires_grad)


def ref_pre(tensors, dtype):
    """x W1^T + b1 (the saved pre-activation) in `dtype`, TF32 off."""
    x, w, b = (None if t is None else t.detach().to(dtype) for t in tensors[:3])
    with tf32_matmul(False):
        return torch.nn.functional.linear(x, w, b)


def run_ref(fn, tensors, dtype, grad=None, **kwargs):
    """The reference fn on copies in `dtype`: (out, grads or None)."""
    return run_reference(fn, tensors, dtype, None if grad is None else [grad], **kwargs)


# ============================================================================= the CPU grid

def _run(fn, tensors, grad_out, dtype=None, **kwargs):
    """Forward + backward on copies of `tensors` (None stays None), in `dtype` if given."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def _check_cpu(fn, ref_fn, tensors, grad_out, names, dtype, **kwargs):
    actual = _run(fn, tensors, grad_out, **kwargs)
    expected = _run(ref_fn, tensors, grad_out, torch.float64, **kwargs)
    low = _run(ref_fn, tensors, grad_out, **kwargs) if dtype != torch.float64 else expected
    for name, a, e, lo in zip(names, actual, expected, low):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == e.shape, name
        if dtype == torch.float64:
            assert_close_float64(a, e, name=name)
        else:
            assert_flash_rule(a, e, lo, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(1, 40), (17, 97), (113, 256), (3, 17, 64)], ids=str)
def test_bias_gelu_matches_reference(shape, approximate, dtype):
    x = (2 * torch.randn(shape)).to(dtype)
    bias = torch.randn(shape[-1], dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    _check_cpu(tfkernels.bias_gelu, reference.bias_gelu, [x, bias], grad, ["out", "grad_x", "grad_bias"], dtype,
               approximate=approximate)


# (leading dims, d_model, d_ff): rows 1, 17, 113; d_model 40, 64, 256; d_ff 4x and odd.
CPU_LINEAR_CASES = [((1,), 40, 160), ((17,), 64, 97), ((113,), 256, 1024), ((3, 17), 40, 97), ((2, 9), 64, 256)]


@pytest.mark.parametrize("huge_pages", ["1", "0"], ids=["huge-pages", "small-pages"])
def test_bias_gelu_large_buffers(huge_pages, monkeypatch):
    """bias_gelu advises its outputs of 8 MiB and more for huge pages before their first touch
    (csrc/alloc.h): forward and backward match the reference with the advice on and off."""
    monkeypatch.setenv("TFKERNELS_CPU_HUGE_PAGES", huge_pages)
    x = torch.randn(1024, 4096, dtype=torch.float64, requires_grad=True)  # 32 MiB
    bias = torch.randn(4096, dtype=torch.float64, requires_grad=True)
    out = tfkernels.bias_gelu(x, bias)
    grad = torch.randn_like(out)
    gx, gb = torch.autograd.grad(out, (x, bias), grad)
    ref = reference.bias_gelu(x, bias)
    rgx, rgb = torch.autograd.grad(ref, (x, bias), grad)
    for name, got, want in (("out", out, ref), ("grad_x", gx, rgx), ("grad_bias", gb, rgb)):
        assert_close_float64(got, want, name)


@pytest.mark.parametrize("dtype,gemm16", CPU_DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CPU_LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_linear_gelu_matches_reference(case, bias, approximate, dtype, gemm16, monkeypatch):
    force_gemm16(monkeypatch, gemm16)
    lead, d_model, d_ff = case
    x, w, b = linear_inputs("cpu", lead, d_model, d_ff, bias, dtype)
    grad = torch.randn(*lead, d_ff, dtype=dtype)
    _check_cpu(tfkernels.linear_gelu, reference.linear_gelu, [x, w, b], grad,
               ["out", "grad_x", "grad_weight", "grad_bias"], dtype, approximate=approximate)


@pytest.mark.parametrize("dtype,gemm16", CPU_DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [(True, True), (False, False), (True, False)], ids=["b1b2", "nobias", "b1"])
@pytest.mark.parametrize("case", CPU_LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_fused_mlp_matches_reference(case, bias, approximate, dtype, gemm16, monkeypatch):
    force_gemm16(monkeypatch, gemm16)
    lead, d_model, d_ff = case
    x, w1, b1, w2, b2 = mlp_inputs("cpu", lead, d_model, d_ff, True, dtype)
    b1, b2 = (b1 if bias[0] else None), (b2 if bias[1] else None)
    grad = torch.randn(*lead, d_model, dtype=dtype)
    _check_cpu(tfkernels.fused_mlp, reference.fused_mlp, [x, w1, b1, w2, b2], grad,
               ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], dtype, approximate=approximate)


@pytest.mark.parametrize("f32_gemms", ["0", "whole"], ids=["blas-tiles", "packed-tiles"])
def test_linear_gelu_fp32_crosses_tiles(f32_gemms, monkeypatch):
    """fp32 forward over several tiles in both dims (rows 600, features 1100: past the
    256 x 512 tiles of the BLAS path and the 128 x 256 of our packed kernels), with
    the GEMMs on BLAS (TFKERNELS_CPU_F32_DOT=0) and on our kernels (=whole)."""
    monkeypatch.setenv("TFKERNELS_CPU_F32_DOT", f32_gemms)
    x, w, b = linear_inputs("cpu", (600,), 72, 1100, True, torch.float32)
    grad = torch.randn(600, 1100)
    _check_cpu(tfkernels.linear_gelu, reference.linear_gelu, [x, w, b], grad,
               ["out", "grad_x", "grad_weight", "grad_bias"], torch.float32, approximate="tanh")


def test_fused_mlp_large_rows_cross_blocks():
    # More rows and hidden units than one block of the CPU kernel (512 rows, 256 hidden).
    x, w1, b1 = linear_inputs("cpu", (1100,), 48, 600, True, torch.float64)
    w2 = torch.randn(40, 600, dtype=torch.float64) / 25
    b2 = torch.randn(40, dtype=torch.float64)
    grad = torch.randn(1100, 40, dtype=torch.float64)
    _check_cpu(tfkernels.fused_mlp, reference.fused_mlp, [x, w1, b1, w2, b2], grad,
               ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], torch.float64, approximate="tanh")


@pytest.mark.parametrize("op,dtype", [("linear_gelu", torch.float32), ("fused_mlp", torch.float32),
                                      ("linear_gelu", torch.bfloat16)], ids=str)
def test_tiles_inside_packed_weight_panels(op, dtype):
    """Tiles whose columns start inside a 64-column panel of the weight packed once per
    call (f32_dot.h's PackedB; bf16 forwards on bf16_dot's tiles where the CPU has
    AVX512-BF16) and reductions that start inside one: 1000 features split into tiles
    of 250, several row blocks, forward and backward."""
    x, w1, b1 = linear_inputs("cpu", (300,), 72, 1000, True, dtype)
    if op == "linear_gelu":
        grad = torch.randn(300, 1000, dtype=dtype)
        _check_cpu(tfkernels.linear_gelu, reference.linear_gelu, [x, w1, b1], grad,
                   ["out", "grad_x", "grad_weight", "grad_bias"], dtype)
        return
    w2 = torch.randn(72, 1000, dtype=dtype) / 32
    b2 = torch.randn(72, dtype=dtype)
    grad = torch.randn(300, 72, dtype=dtype)
    _check_cpu(tfkernels.fused_mlp, reference.fused_mlp, [x, w1, b1, w2, b2], grad,
               ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kept_scratch_carries_nothing_between_calls(monkeypatch, dtype):
    """The backward temporaries (dpre, h; warm_buffers.h) and packed weights come from
    memory kept from earlier calls: a call after another with other values gives what
    it gives in fresh memory, bit for bit (scratch sizes above the 1 MiB kept minimum)."""
    x, w1, b1 = linear_inputs("cpu", (512,), 64, 1024, True, dtype)
    w2, b2 = torch.randn(48, 1024, dtype=dtype) / 32, torch.randn(48, dtype=dtype)
    grad = torch.randn(512, 48, dtype=dtype)

    def grads(*inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = tfkernels.fused_mlp(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad)]

    monkeypatch.setenv("TFKERNELS_CPU_WARM_BUFFERS", "0")
    fresh = grads(x, w1, b1, w2, b2)
    monkeypatch.setenv("TFKERNELS_CPU_WARM_BUFFERS", "1")
    grads(x * -3 + 1, w1.flip(0), b1, w2 * 5, b2)  # leaves other values in the kept blocks
    for name, a, b in zip(["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], grads(x, w1, b1, w2, b2), fresh):
        assert torch.equal(a, b), f"{name} differs after a call that left other values in the kept scratch"


def test_large_outputs_from_kept_memory_are_ordinary_tensors():
    """CPU outputs of 1 MiB and more take memory kept between calls (alloc.h): they
    resize, move to shared memory and free like any tensor, and a later call that
    reuses their memory still gives the right values."""
    x, w, b = linear_inputs("cpu", (512,), 64, 1024, True, torch.float32)
    expected = tfkernels.reference.linear_gelu(x.double(), w.double(), b.double())
    out = tfkernels.linear_gelu(x, w, b)  # 2 MiB
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    first = out.clone()
    first_rows = out[:8].clone()
    out.resize_(700, 1024)  # grows through the same allocator
    assert torch.equal(out[:8], first_rows)
    out.fill_(7.0)
    out.share_memory_()
    assert out.is_shared() and bool((out == 7.0).all())
    del out
    again = tfkernels.linear_gelu(x, w, b)
    assert torch.equal(again, first), "a call into reused output memory differs"


@pytest.mark.parametrize("approximate", APPROX)
def test_backward_ops_return_all_bias_grads(approximate):
    dt = torch.float64
    x, w, _ = linear_inputs("cpu", (2, 5), 8, 12, False, dt)
    pre = torch.nn.functional.linear(x, w)
    g = torch.randn(2, 5, 12, dtype=dt)
    gx, gw, gb = ops.linear_gelu_bwd(g, x, w, pre, approximate)
    dpre = g * torch.ops.aten.gelu_backward(torch.ones_like(pre), pre, approximate=approximate)
    assert_close_float64(gb, dpre.sum((0, 1)), "grad_bias")
    w2 = torch.randn(6, 12, dtype=dt)
    g2 = torch.randn(2, 5, 6, dtype=dt)
    outs = ops.fused_mlp_bwd(g2, x, w, w2, pre, approximate)
    assert [tuple(t.shape) for t in outs] == [(2, 5, 8), (12, 8), (12,), (6, 12), (6,)]
    assert_close_float64(outs[4], g2.sum((0, 1)), "grad_b2")


@pytest.mark.parametrize("approximate", APPROX)
def test_gradcheck(approximate):
    dt = torch.float64
    x, w, b = linear_inputs("cpu", (2, 3), 5, 7, True, dt, requires_grad=True)
    w2 = (torch.randn(4, 7, dtype=dt) / 3).requires_grad_()
    b2 = torch.randn(4, dtype=dt, requires_grad=True)
    xb = torch.randn(2, 3, 7, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, b_: tfkernels.bias_gelu(x_, b_, approximate=approximate), (xb, b))
    assert torch.autograd.gradcheck(lambda *a: tfkernels.linear_gelu(*a, approximate=approximate), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: tfkernels.fused_mlp(*a, approximate=approximate), (x, w, b, w2, b2))
    assert torch.autograd.gradcheck(lambda x_, w_, v_: tfkernels.fused_mlp(x_, w_, None, v_, None,
                                                                           approximate=approximate), (x, w, w2))


def test_opcheck_autograd():
    dt = torch.float64
    x, w, b = linear_inputs("cpu", (2, 3), 8, 12, True, dt, requires_grad=True)
    w2 = torch.randn(8, 12, dtype=dt, requires_grad=True)
    torch.library.opcheck(ops.bias_gelu.default, (torch.randn(2, 12, dtype=dt, requires_grad=True), b, "tanh"))
    torch.library.opcheck(ops.linear_gelu.default, (x, w, b, "none", True))
    torch.library.opcheck(ops.fused_mlp.default, (x, w, b, w2, None, "tanh", True))


# ============================================================================= the CUDA grid

_BOTH = ("fp16", "bf16")
# (leading dims, d_in, d_out, bias, approximate, dtypes, small). M = prod(leading dims).
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
    out, pre = ops.linear_gelu(x, w, b, approx, True)
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


@pytest.mark.parametrize("lead,d_model,d_ff,bias,approx,dtype", _cases(MLP_CASES, "mlp-"))
def test_fused_mlp_16bit(cuda_device, lead, d_model, d_ff, bias, approx, dtype):
    tensors = mlp_inputs(cuda_device, lead, d_model, d_ff, bias, dtype, requires_grad=True)
    out, pre = ops.fused_mlp(*tensors, approx, True)
    assert out.shape == (*lead, d_model) and pre.shape == (*lead, d_ff)
    grad = torch.randn_like(out)
    high, high_g = run_ref(reference.fused_mlp, tensors, torch.float32, grad, approximate=approx)
    low, low_g = run_ref(reference.fused_mlp, tensors, dtype, grad, approximate=approx)
    check_16bit("out", out, high, low)
    check_16bit("pre", pre, ref_pre(tensors, torch.float32), ref_pre(tensors, dtype))
    tfkernels.fused_mlp(*tensors, approximate=approx).backward(grad)
    compare_16bit(MLP_GRAD_NAMES, [None if t is None else t.grad for t in tensors], high_g, low_g)


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


def _check_fp32_run(op, tensors, approx, tf32, grad_names):
    """op (a name) forward with pre, and backward through the wrapper, in fp32 with TF32 as given."""
    with tf32_matmul(tf32):
        out, pre = getattr(ops, op)(*tensors, approx, True)
        grad = torch.randn_like(out)
        getattr(tfkernels, op)(*tensors, approximate=approx).backward(grad)
    ref, ref_g = run_ref(getattr(reference, op), tensors, torch.float64, grad, approximate=approx)
    check_fp32("out", out, ref, tf32)
    check_fp32("pre", pre, ref_pre(tensors, torch.float64), tf32)
    for name, t, r in zip(grad_names, tensors, ref_g):
        if t is not None:
            check_fp32(name, t.grad, r, tf32)


@pytest.mark.parametrize("tf32", TF32)
@pytest.mark.parametrize("lead,d_in,d_out,bias,approx", FP32_LINEAR)
def test_linear_gelu_fp32(cuda_device, lead, d_in, d_out, bias, approx, tf32):
    tensors = linear_inputs(cuda_device, lead, d_in, d_out, bias, torch.float32, requires_grad=True)
    _check_fp32_run("linear_gelu", tensors, approx, tf32, LINEAR_GRAD_NAMES)


@pytest.mark.parametrize("tf32", TF32)
@pytest.mark.parametrize("lead,d_model,d_ff,bias,approx", FP32_MLP)
def test_fused_mlp_fp32(cuda_device, lead, d_model, d_ff, bias, approx, tf32):
    tensors = mlp_inputs(cuda_device, lead, d_model, d_ff, bias, torch.float32, requires_grad=True)
    _check_fp32_run("fused_mlp", tensors, approx, tf32, MLP_GRAD_NAMES)


def _check_16bit_run(op, tensors, approx, dtype, grad_names, label=""):
    """The public op forward and backward on 16-bit tensors that require grad, against the reference."""
    out = getattr(tfkernels, op)(*tensors, approximate=approx)
    grad = torch.randn_like(out)
    out.backward(grad)
    high, high_g = run_ref(getattr(reference, op), tensors, torch.float32, grad, approximate=approx)
    low, low_g = run_ref(getattr(reference, op), tensors, dtype, grad, approximate=approx)
    check_16bit(f"{label}out", out, high, low)
    compare_16bit(grad_names, [t.grad for t in tensors], high_g, low_g)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tile", ["128x256", "128x128", "64x128"])
def test_every_tile_shape(cuda_device, tile, dtype, monkeypatch):
    """Each tensor-core tile shape, forced, on every GEMM of both ops, with edges in
    every dim: M = 300, d_model = 200 (3 x 64 + 8), d_ff = 280 (not a multiple of 64).
    The backward GEMMs have no 128x256 shape: it falls back to 128x128. (The quick
    emulated grid runs the tile shapes in test_qkv.py.)"""
    monkeypatch.setenv("TFKERNELS_GEMM_TILE", tile)
    tensors = mlp_inputs(cuda_device, (2, 150), 200, 280, True, dtype, requires_grad=True)
    _check_16bit_run("fused_mlp", tensors, "tanh", dtype, MLP_GRAD_NAMES)
    lin = [t.detach().requires_grad_(True) for t in tensors[:3]]
    _check_16bit_run("linear_gelu", lin, "none", dtype, LINEAR_GRAD_NAMES, label="linear ")


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
    """All six ops launch on the current stream with no host sync: captured and
    replayed, they give the eager results."""
    x, w1, b1, w2, b2 = mlp_inputs("cuda", (2, 37), 128, 512, True, dtype)
    g_out = torch.randn(2, 37, 128, device="cuda").to(dtype)
    g_hid = torch.randn(2, 37, 512, device="cuda").to(dtype)

    def step():
        out, pre = ops.fused_mlp(x, w1, b1, w2, b2, "tanh", True)
        lout, lpre = ops.linear_gelu(x, w1, b1, "none", True)
        bg = ops.bias_gelu(lpre, b1, "none")
        return ((out, pre, lout, lpre, bg) + tuple(ops.fused_mlp_bwd(g_out, x, w1, w2, pre, "tanh"))
                + tuple(ops.linear_gelu_bwd(g_hid, x, w1, lpre, "none"))
                + tuple(ops.bias_gelu_bwd(g_hid, lpre, b1, "none")))

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


@pytest.mark.cuda
def test_bias_gelu_compile_fullgraph():
    x, bias = bias_gelu_inputs("cuda", (16, 128), torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda a, b: tfkernels.bias_gelu(a, b, approximate="tanh"), fullgraph=True)
    out = fn(x, bias)
    _check_bias_gelu(out.detach(), x, bias, torch.zeros_like(x), "tanh", "out")


@quick
def test_cuda_rejects_bad_input(cuda_device):
    """The CUDA launchers' own checks (their messages differ from the CPU's in places)."""
    x, w1, b1, w2, b2 = mlp_inputs(cuda_device, (4,), 64, 128, True, torch.float32)
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


@pytest.mark.parametrize("make, match", [
    (lambda dev: (torch.randn(4, 8, device=dev), torch.randn(7, device=dev)), "bias must be a 1-D tensor"),
    (lambda dev: (torch.randn(4, 8, device=dev), torch.randn(8, device=dev).half()), "bias must have the dtype"),
    # A bias on the CPU: the emulated device is the CPU, so this one needs a GPU.
    pytest.param(lambda dev: (torch.randn(4, 8, device=dev), torch.randn(8)), "bias must be on the device",
                 marks=gpu_only),
    (lambda dev: (torch.randn(4, 8, device=dev).double(), torch.randn(8, device=dev).double()),
     "x must have dtype"),
])
def test_cuda_bias_gelu_rejects_bad_arguments(cuda_device, make, match):
    x, bias = make(cuda_device)
    with pytest.raises(RuntimeError, match=match):
        ops.bias_gelu(x, bias, "none")


@quick
def test_cuda_bias_gelu_rejects_bad_approximate(cuda_device):
    x, bias = bias_gelu_inputs(cuda_device, (4, 8), torch.float32)
    with pytest.raises(RuntimeError, match="approximate"):
        ops.bias_gelu(x, bias, "erf")


# ============================================================================= bias_gelu on every device

BG_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# Odd widths exercise the per-element bias gather and the scalar tail; 64 and 1024
# the full-vector path; 4099 a prime past one column tile.
# The emulated quick grid (make test) takes 7, 40 and 1024: tail, gather, full vectors.
WIDTHS = [1, pytest.param(7, marks=quick), pytest.param(40, marks=quick), 64, 1000, pytest.param(1024, marks=quick),
          4099]


def _bias_gelu_reference(x, bias, grad_out, approximate, dtype):
    """The reference's output and gradients with inputs cast to `dtype`."""
    out, (grad_x, grad_bias) = run_ref(reference.bias_gelu, (leaf(x, dtype).requires_grad_(True),
                                                             leaf(bias, dtype).requires_grad_(True)),
                                       dtype, grad_out, approximate=approximate)
    return out, grad_x, grad_bias


def _check_bias_gelu(actual, x, bias, grad_out, approximate, which):
    """Compare one of (out, grad_x, grad_bias) with the reference."""
    idx = {"out": 0, "grad_x": 1, "grad_bias": 2}[which]
    high = _bias_gelu_reference(x, bias, grad_out, approximate, torch.float32)[idx]
    if actual.dtype == torch.float32 and which == "grad_bias":
        # A sum over every row (70000 in the grid): the kernel's chunked order and the
        # reference's pairwise one differ by fp32 summation noise far above F32_TOL.
        # Against float64, within a few times the float32 reference's own error, plus a
        # few ulps of the sum (the reference's order can be exact by luck: seen on the CPU).
        exact = _bias_gelu_reference(x, bias, grad_out, approximate, torch.float64)[idx]
        assert_flash_rule(actual, exact, high, name=which, factor=8.0, eps_ulps=4)
    elif actual.dtype == torch.float32:
        assert not torch.isnan(actual).any(), f"{which}: contains NaN"
        torch.testing.assert_close(actual, high, **F32_TOL, msg=lambda m: f"{which}: {m}")
    else:
        low = _bias_gelu_reference(x, bias, grad_out, approximate, actual.dtype)[idx]
        assert_flash_rule(actual, high, low, name=which)


@pytest.mark.parametrize("dtype", BG_DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n", WIDTHS)
def test_bias_gelu_forward(device, n, approximate, dtype):
    x, bias = bias_gelu_inputs(device, (3, 37, n), dtype)
    out = tfkernels.bias_gelu(x, bias, approximate=approximate)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _check_bias_gelu(out, x, bias, torch.zeros_like(x), approximate, "out")


@pytest.mark.parametrize("dtype", BG_DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n", WIDTHS)
def test_bias_gelu_backward(device, n, approximate, dtype):
    x, bias = bias_gelu_inputs(device, (5, 29, n), dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    out = tfkernels.bias_gelu(x, bias, approximate=approximate)
    out.backward(grad_out)
    _check_bias_gelu(x.grad, x, bias, grad_out, approximate, "grad_x")
    _check_bias_gelu(bias.grad, x, bias, grad_out, approximate, "grad_bias")
    assert bias.grad.dtype == dtype


@pytest.mark.parametrize("dtype", BG_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [pytest.param(1, marks=quick), 63, 64, 65, pytest.param(4097, marks=quick), 70000])
def test_bias_gelu_backward_row_chunks(device, rows, dtype):
    # Row counts around the CUDA kernel's chunking thresholds: one chunk (written
    # directly) and many chunks (float partials, then a second pass).
    x, bias = bias_gelu_inputs(device, (rows, 96), dtype)
    grad_out = torch.randn_like(x)
    grad_x, grad_bias = ops.bias_gelu_bwd(grad_out, x, bias, "none")
    _check_bias_gelu(grad_x, x, bias, grad_out, "none", "grad_x")
    _check_bias_gelu(grad_bias, x, bias, grad_out, "none", "grad_bias")


@pytest.mark.parametrize("dtype", BG_DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("n", [8, pytest.param(40, marks=quick), 1000])
def test_bias_gelu_misaligned_views(device, n, offset, dtype):
    # Views that start `offset` elements into their storage: not 16-byte aligned,
    # so the kernels must take the scalar path (or the misaligned bias path).
    rows = 33
    xbuf = torch.randn(rows * n + offset, device=device, dtype=dtype) * 2
    bbuf = torch.randn(n + offset, device=device, dtype=dtype)
    gbuf = torch.randn(rows * n + offset, device=device, dtype=dtype)
    x = xbuf[offset:].view(rows, n)
    bias = bbuf[offset:]
    grad_out = gbuf[offset:].view(rows, n)
    for approximate in APPROX:
        out = ops.bias_gelu(x, bias, approximate)
        _check_bias_gelu(out, x, bias, grad_out, approximate, "out")
        grad_x, grad_bias = ops.bias_gelu_bwd(grad_out, x, bias, approximate)
        _check_bias_gelu(grad_x, x, bias, grad_out, approximate, "grad_x")
        _check_bias_gelu(grad_bias, x, bias, grad_out, approximate, "grad_bias")
    # Only the bias misaligned, x aligned.
    x_aligned = xbuf[: rows * n].view(rows, n)
    _check_bias_gelu(ops.bias_gelu(x_aligned, bias, "none"), x_aligned, bias, grad_out, "none", "out")


@quick
def test_bias_gelu_non_contiguous_input(device):
    # A transposed x [48, 64] with strides (1, 48) and a strided bias: the kernels
    # make both contiguous; the output is contiguous.
    xt = (torch.randn(64, 48, device=device) * 2).t()
    bias = torch.randn(128, device=device)[::2]
    out = tfkernels.bias_gelu(xt, bias)
    assert out.is_contiguous()
    _check_bias_gelu(out, xt, bias, torch.zeros_like(xt), "none", "out")
    grad_out = torch.randn(64, 48, device=device).t()
    grad_x, grad_bias = ops.bias_gelu_bwd(grad_out, xt, bias, "tanh")
    _check_bias_gelu(grad_x, xt, bias, grad_out, "tanh", "grad_x")
    _check_bias_gelu(grad_bias, xt, bias, grad_out, "tanh", "grad_bias")


@quick
def test_bias_gelu_empty(device):
    x = torch.empty(0, 16, device=device)
    bias = torch.randn(16, device=device)
    assert tfkernels.bias_gelu(x, bias).shape == (0, 16)
    grad_x, grad_bias = ops.bias_gelu_bwd(x, x, bias, "none")
    assert grad_x.shape == (0, 16)
    assert torch.equal(grad_bias, torch.zeros(16, device=device))


def test_bias_gelu_deterministic_grad_bias(device):
    x, bias = bias_gelu_inputs(device, (8192, 257), torch.bfloat16)
    grad_out = torch.randn_like(x)
    first = ops.bias_gelu_bwd(grad_out, x, bias, "tanh")[1]
    for _ in range(3):
        again = ops.bias_gelu_bwd(grad_out, x, bias, "tanh")[1]
        assert torch.equal(first, again), "grad_bias is not bitwise reproducible"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bias_gelu_covers_wide_range(device, dtype):
    # Tails of the vectorised erf/exp: large |x| where GELU saturates to x or 0. The
    # 16-bit results run a shorter 2^x polynomial on the CPU (vec_math.h).
    x = torch.linspace(-30, 30, 4001, dtype=torch.float32, device=device).to(dtype).view(1, -1)
    bias = torch.zeros(x.shape[-1], device=device, dtype=dtype)
    for approximate in APPROX:
        out = tfkernels.bias_gelu(x, bias, approximate=approximate)
        ref = reference.bias_gelu(x.double(), bias.double(), approximate=approximate)
        assert_flash_rule(out, ref, reference.bias_gelu(x, bias, approximate=approximate), name=approximate)
        gx, gb = ops.bias_gelu_bwd(torch.ones_like(x), x, bias, approximate)
        xd = x.double().requires_grad_()
        torch.nn.functional.gelu(xd, approximate=approximate).sum().backward()
        xf = x.clone().requires_grad_()
        torch.nn.functional.gelu(xf, approximate=approximate).sum().backward()
        assert_flash_rule(gx, xd.grad, xf.grad, name=f"grad {approximate}")
        assert gb.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_tanh_gelu_16bit_is_correctly_rounded(dtype):
    # 16-bit results come from a degree-4 2^x polynomial (2.6e-6 relative, vec_math.h):
    # far under their rounding, so nearly every value must be the correctly rounded
    # one and none may be a whole ulp off. A coefficient off by 0.5% fails this; it
    # would pass the error-relative-to-PyTorch rule above.
    x = torch.linspace(-30, 30, 40001).to(dtype).view(1, -1)
    bias = torch.zeros(x.shape[-1], dtype=dtype)
    gx, _ = ops.bias_gelu_bwd(torch.ones_like(x), x, bias, "tanh")
    # The exact values in float64, written without the cancellation of 1 + tanh(u)
    # for negative x (torch's float64 GELU loses all digits there below -5).
    xd = x.double()
    u = math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)
    s, one_minus_s = torch.sigmoid(2 * u), torch.sigmoid(-2 * u)  # (1 + tanh u) / 2, (1 - tanh u) / 2
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * xd**2)
    for name, ours, exact in (("gelu", tfkernels.bias_gelu(x, bias, approximate="tanh"), xd * s),
                              ("gelu'", gx, s + 2 * xd * s * one_minus_s * du)):
        # Normal results only (fp16 subnormals carry fewer bits), and none below 1e-30,
        # where the clamped tails give tiny values where the exact one is smaller still.
        seen = exact.abs() > max(torch.finfo(dtype).tiny, 1e-30)
        rounded = exact.to(dtype)
        wrong = (ours != rounded)[seen].float().mean().item()
        assert wrong < 0.005, f"{name} {dtype}: {wrong:.2%} of values not correctly rounded"
        rel = ((ours.double() - exact).abs() / exact.abs())[seen].max().item()
        assert rel < torch.finfo(dtype).eps, f"{name} {dtype}: relative error {rel:.3g}"


# ============================================================================= linear_gelu / fused_mlp on every device

@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_strided_and_misaligned_inputs(device, dtype):
    """x as a column slice (row stride d_model + 8: read in place), as a transposed view
    (copied), and off 16-byte alignment (generic kernel); weights with padded row
    strides. Forward and both backward ops."""
    B, S, D, F = 3, 19, 64, 96
    x_pad = torch.randn(B, S, D + 8, device=device).to(dtype)[..., :D]
    x_t = torch.randn(S, B, D, device=device).to(dtype).transpose(0, 1)
    flat = torch.randn(B * S * D + 1, device=device).to(dtype)
    x_mis = flat[1:].view(B, S, D)
    w1 = (torch.randn(F, D + 8, device=device) / D**0.5).to(dtype)[:, :D]
    b1 = torch.randn(F, device=device).to(dtype)
    w2 = (torch.randn(D, F + 16, device=device) / F**0.5).to(dtype)[:, :F]
    b2 = torch.randn(D, device=device).to(dtype)
    for x in (x_pad, x_t, x_mis):
        tensors = [t.detach().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
        out, pre = ops.fused_mlp(x, w1, b1, w2, b2, "none", True)
        grad = torch.randn_like(out)
        grads = ops.fused_mlp_bwd(grad, x, w1, w2, pre, "none")

        def mlp_ref(rd, grad=grad, tensors=tensors):
            out, grads = run_ref(reference.fused_mlp, tensors, rd, grad, approximate="none")
            return [out, *grads]

        check_by_dtype(("out",) + MLP_GRAD_NAMES, [out, *grads], mlp_ref, dtype)

        out, pre = ops.linear_gelu(x, w1, b1, "tanh", True)
        grad = torch.randn_like(out)
        grads = ops.linear_gelu_bwd(grad, x, w1, pre, "tanh")

        def lin_ref(rd, grad=grad, tensors=tensors[:3]):
            out, grads = run_ref(reference.linear_gelu, tensors, rd, grad, approximate="tanh")
            return [out, *grads]

        check_by_dtype(("linear out",) + LINEAR_GRAD_NAMES, [out, *grads], lin_ref, dtype)


@sanitize
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_ops_read_strided_grad_and_pre(device, dtype):
    """grad_out and pre as column slices of wider tensors (row strides read in place),
    and grad_out expanded from a [N] vector (row stride 0): the same answer as
    contiguous copies, bit for bit (same kernels, same order of summation)."""
    B, S, D, F = 2, 33, 64, 128
    x = torch.randn(B, S, D, device=device).to(dtype)
    w1 = (torch.randn(F, D, device=device) / D**0.5).to(dtype)
    w2 = (torch.randn(D, F, device=device) / F**0.5).to(dtype)
    pre_wide = torch.randn(B, S, F + 8, device=device).to(dtype)
    pre_lin_wide = torch.randn(B, S, F + 24, device=device).to(dtype)
    for grad_kind in ("slice", "expanded"):
        if grad_kind == "slice":
            g_mlp = torch.randn(B, S, D + 8, device=device).to(dtype)[..., :D]
            g_lin = torch.randn(B, S, F + 8, device=device).to(dtype)[..., :F]
        else:
            g_mlp = torch.randn(D, device=device).to(dtype).expand(B, S, D)
            g_lin = torch.randn(F, device=device).to(dtype).expand(B, S, F)
        for op, names, g, pre, args in (("fused_mlp_bwd", MLP_GRAD_NAMES, g_mlp, pre_wide[..., :F], (x, w1, w2)),
                                        ("linear_gelu_bwd", LINEAR_GRAD_NAMES, g_lin, pre_lin_wide[..., :F], (x, w1))):
            approx = "tanh" if op == "fused_mlp_bwd" else "none"
            strided = getattr(ops, op)(g, *args, pre, approx)
            contiguous = getattr(ops, op)(g.contiguous(), *args, pre.contiguous(), approx)
            for name, u, v in zip(names, strided, contiguous):
                assert not torch.isnan(u).any(), name
                torch.testing.assert_close(u, v, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_from_sum(device, dtype):
    """loss = out.sum(): autograd hands the backward an expanded gradient (strides 0)."""
    tensors = mlp_inputs(device, (2, 21), 64, 256, True, dtype, requires_grad=True)
    tfkernels.fused_mlp(*tensors, approximate="none").sum().backward()
    lin = [t.detach().requires_grad_(True) for t in tensors[:3]]
    tfkernels.linear_gelu(*lin, approximate="tanh").sum().backward()
    refs = {}
    for rd in (torch.float32, dtype):
        leaves = [leaf(t, rd) for t in tensors]
        lin_leaves = [leaf(t, rd) for t in lin]
        with tf32_matmul(False):
            reference.fused_mlp(*leaves, approximate="none").sum().backward()
            reference.linear_gelu(*lin_leaves, approximate="tanh").sum().backward()
        refs[rd] = ([t.grad for t in leaves], [t.grad for t in lin_leaves])
    compare_16bit(MLP_GRAD_NAMES, [t.grad for t in tensors], refs[torch.float32][0], refs[dtype][0])
    compare_16bit(LINEAR_GRAD_NAMES, [t.grad for t in lin], refs[torch.float32][1], refs[dtype][1])


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_save_pre_false(device, dtype):
    """save_pre=False (what the wrapper passes under no_grad): pre is an empty [0]
    tensor with no storage and the output is the same, bit for bit."""
    x, w1, b1, w2, b2 = mlp_inputs(device, (3, 7), 64, 256, True, dtype, requires_grad=True)
    out_s, pre_s = ops.linear_gelu(x, w1, b1, "tanh", True)
    out_n, pre_n = ops.linear_gelu(x, w1, b1, "tanh", False)
    assert pre_s.shape == (3, 7, 256) and pre_n.shape == (0,) and pre_n.untyped_storage().nbytes() == 0
    assert torch.equal(out_s, out_n)
    mout_s, mpre_s = ops.fused_mlp(x, w1, b1, w2, b2, "none", True)
    mout_n, mpre_n = ops.fused_mlp(x, w1, b1, w2, b2, "none", False)
    assert mpre_s.shape == (3, 7, 256) and mpre_n.shape == (0,) and mpre_n.untyped_storage().nbytes() == 0
    assert torch.equal(mout_s, mout_n)
    with torch.no_grad():
        assert torch.equal(tfkernels.linear_gelu(x, w1, b1, approximate="tanh"), out_s)
        assert torch.equal(tfkernels.fused_mlp(x, w1, b1, w2, b2, approximate="none"), mout_s)
    # The saved pre-activation is x W1^T + b1.
    tensors = (x, w1, b1)
    check_by_dtype(("pre", "fused_mlp pre"), [pre_s, mpre_s], lambda rd: [ref_pre(tensors, rd)] * 2, dtype)


@quick
def test_public_api_saves_pre_only_when_needed(device):
    x, w, b = linear_inputs(device, (3, 5), 16, 24, True, torch.float32)
    w2 = torch.randn(16, 24, device=device)
    with torch.no_grad():
        y = tfkernels.linear_gelu(x, w.requires_grad_(), b)
        assert y.grad_fn is None
    y = tfkernels.linear_gelu(x, w, b)
    saved = [t for t in y.grad_fn.saved_tensors if t.shape == (3, 5, 24)]
    assert saved, "the pre-activation must be saved for the backward"
    y.sum().backward()
    assert w.grad is not None
    z = tfkernels.fused_mlp(x, w, b, w2.requires_grad_(), None)
    z.sum().backward()
    assert w2.grad is not None


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_empty_and_degenerate(device, dtype):
    # No rows: empty outputs; the backward still writes dW = 0 and db = 0.
    x, w1, b1, w2, b2 = mlp_inputs(device, (0, 5), 64, 128, True, dtype)
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
    both_ways("linear_gelu", mlp_inputs(device, (2, 3), 0, 16, True, dtype)[:3], approximate="tanh")
    both_ways("fused_mlp", mlp_inputs(device, (2, 3), 0, 16, True, dtype), approximate="none")
    # d_ff = 0: the output is b2; db2 from one reduction.
    both_ways("fused_mlp", mlp_inputs(device, (2, 3), 16, 0, True, dtype), approximate="none")


@sanitize
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_opcheck(device, dtype):
    x, w1, b1, w2, b2 = mlp_inputs(device, (2, 9), 64, 96, True, dtype, requires_grad=True)
    # save_pre=True with inputs that require grad (opcheck also runs the backward through
    # the registered autograd formula); save_pre=False is the inference form.
    torch.library.opcheck(ops.linear_gelu.default, (x, w1, b1, "tanh", True))
    torch.library.opcheck(ops.fused_mlp.default, (x, w1, b1, w2, b2, "none", True))
    plain = [t.detach() for t in (x, w1, b1, w2, b2)]
    xd, w1d, b1d, w2d, b2d = plain
    torch.library.opcheck(ops.linear_gelu.default, (xd, w1d, b1d, "none", False))
    torch.library.opcheck(ops.fused_mlp.default, (*plain, "tanh", False))
    torch.library.opcheck(ops.linear_gelu.default, (xd, w1d, None, "none", True))
    torch.library.opcheck(ops.fused_mlp.default, (xd, w1d, None, w2d, None, "tanh", True))
    pre = torch.randn(2, 9, 96, device=device).to(dtype)
    g96, g64 = torch.randn(2, 9, 96, device=device).to(dtype), torch.randn(2, 9, 64, device=device).to(dtype)
    torch.library.opcheck(ops.linear_gelu_bwd.default, (g96, xd, w1d, pre, "none"))
    torch.library.opcheck(ops.fused_mlp_bwd.default, (g64, xd, w1d, w2d, pre, "tanh"))
    # bias_gelu: forward with inputs that require grad, then the backward op.
    pre_req = pre.detach().requires_grad_(True)
    b1_req = b1d.detach().requires_grad_(True)
    for approximate in APPROX:
        torch.library.opcheck(ops.bias_gelu.default, (pre_req, b1_req, approximate))
        torch.library.opcheck(ops.bias_gelu_bwd.default, (g96, pre, b1d, approximate))


# ============================================================================= bad input (CPU kernels, fake kernels)
# Each table runs on the CPU kernels and on the fake kernels (what torch.compile traces
# with): both reject the input with the same message. `approximate` is a value, not a
# shape, and is checked by the kernels only (csrc/args.cpp).

def _bg_args():
    return torch.randn(3, 8), torch.randn(8)


def _lin_args():
    return linear_inputs("cpu", (3,), 8, 12, True, torch.float32)


def _mlp_args():
    x, w1, b1 = _lin_args()
    return x, w1, b1, torch.randn(6, 12), torch.randn(6)


KERNEL_ONLY = pytest.mark.parametrize("kernel", ["cpu"])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make,match", [
    (lambda x, b: (x.int(), b, "none"), r"x must have dtype"),
    (lambda x, b: (x, b.double(), "none"), r"bias must have the dtype of x"),
    (lambda x, b: (x, b[:-1], "none"), r"bias\.shape\[0\]"),
    (lambda x, b: (x, b[None], "none"), r"bias must be a 1-D tensor"),
    (lambda x, b: (x[0, 0], b, "none"), r"x must have at least 1 dimension"),
])
def test_bias_gelu_rejects_bad_input(kernel, make, match):
    rejects(kernel, lambda: ops.bias_gelu(*make(*_bg_args())), match)


@KERNEL_ONLY
def test_bias_gelu_rejects_bad_approximate(kernel):
    rejects(kernel, lambda: ops.bias_gelu(*_bg_args(), "erf"), r"approximate must be")


@pytest.mark.parametrize("kernel", KERNELS)
def test_bias_gelu_bwd_rejects_bad_grad(kernel):
    def call(grad):
        return lambda: ops.bias_gelu_bwd(grad(), *_bg_args(), "none")

    rejects(kernel, call(lambda: torch.randn(4, 8)), r"grad_out must have the leading dims of x")
    rejects(kernel, call(lambda: torch.randn(3, 8, dtype=torch.float64)), r"grad_out must have the dtype of x")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make,match", [
    (lambda x, w, b: (x.to(torch.int64), w, b), r"x must have dtype"),
    (lambda x, w, b: (x, w[None], b), r"weight must be a 2-D tensor"),
    (lambda x, w, b: (x, w.half(), b), r"weight must have the dtype of x"),
    (lambda x, w, b: (x, w[:, :-1], b), r"weight\.shape\[1\]"),
    (lambda x, w, b: (x, w, b[:-1]), r"bias must be a 1-D tensor \[12\]"),
    (lambda x, w, b: (x, w, b.double()), r"bias must have the dtype of x"),
])
def test_linear_gelu_rejects_bad_input(kernel, make, match):
    rejects(kernel, lambda: ops.linear_gelu(*make(*_lin_args()), "none", False), match)


@KERNEL_ONLY
def test_linear_gelu_rejects_bad_approximate(kernel):
    rejects(kernel, lambda: ops.linear_gelu(*_lin_args(), "fast", False), r"approximate must be")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make,match", [
    (lambda g, pre: (torch.randn(3, 11), pre), r"grad_out must have the leading dims of x"),
    (lambda g, pre: (g, torch.randn(2, 12)), r"pre must have the leading dims of x"),
    (lambda g, pre: (g, pre.double()), r"pre must have the dtype of x"),
])
def test_linear_gelu_bwd_rejects_bad_input(kernel, make, match):
    def call():
        x, w, _ = _lin_args()
        grad, pre = make(torch.randn(3, 12), torch.randn(3, 12))
        return ops.linear_gelu_bwd(grad, x, w, pre, "none")

    rejects(kernel, call, match)


@KERNEL_ONLY
def test_linear_gelu_bwd_rejects_bad_approximate(kernel):
    x, w, _ = _lin_args()
    rejects(kernel, lambda: ops.linear_gelu_bwd(torch.randn(3, 12), x, w, torch.randn(3, 12), ""),
             r"approximate must be")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make,match", [
    (lambda x, w1, b1, w2, b2: (x.bool(), w1, b1, w2, b2), r"x must have dtype"),
    (lambda x, w1, b1, w2, b2: (x, w1.double(), b1, w2, b2), r"w1 must have the dtype of x"),
    (lambda x, w1, b1, w2, b2: (x, w1[:, :-1], b1, w2, b2), r"w1\.shape\[1\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1[:-1], w2, b2), r"b1 must be a 1-D tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2[None], b2), r"w2 must be a 2-D tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2.double(), b2), r"w2 must have the dtype of x"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2[:, :-1], b2), r"w2\.shape\[1\] \(F, as w1\.shape\[0\]\)"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[:-1]), r"b2 must be a 1-D tensor \[6\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2.half()), r"b2 must have the dtype of x"),
])
def test_fused_mlp_rejects_bad_input(kernel, make, match):
    rejects(kernel, lambda: ops.fused_mlp(*make(*_mlp_args()), "none", False), match)


@KERNEL_ONLY
def test_fused_mlp_rejects_bad_approximate(kernel):
    rejects(kernel, lambda: ops.fused_mlp(*_mlp_args(), "tanh ", False), r"approximate must be")


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_mlp_bwd_rejects_bad_grads(kernel):
    def call(grad, pre):
        def run():
            x, w1, _, w2, _ = _mlp_args()
            return ops.fused_mlp_bwd(grad(), x, w1, w2, pre(), "none")
        return run

    rejects(kernel, call(lambda: torch.randn(3, 12), lambda: torch.randn(3, 12)),
             r"grad_out must have the leading dims of x")
    rejects(kernel, call(lambda: torch.randn(3, 6), lambda: torch.randn(3, 6)), r"pre must have the leading dims of x")


@pytest.mark.cuda
def test_rejects_mixed_devices():
    x, w, b = _lin_args()
    with pytest.raises(RuntimeError, match=r"(weight|x) must be on the device"):
        ops.linear_gelu(x, w.cuda(), b, "none", False)
    with pytest.raises(RuntimeError, match=r"(bias|x) must be on the device"):
        ops.bias_gelu(x, b.cuda()[:8], "none")
    x, w1, b1, w2, b2 = _mlp_args()
    with pytest.raises(RuntimeError, match=r"(w2|x) must be on the device"):
        ops.fused_mlp(x, w1, b1, w2.cuda(), b2, "none", False)
