"""bias_gelu / bias_gelu_bwd on CUDA against tfkernels.reference.bias_gelu.

float32 is compared with the float32 reference; bf16/fp16 by the FlashAttention
rule against the float32 reference (tests/utils.assert_flash_rule). Every test
runs on a GPU ("cuda", skipped without one) and on the emulated device ("emu",
tests/devices.py), except streams, CUDA graphs, torch.compile and the cases
marked `gpu_only`, which need a GPU.
"""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_flash_rule


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = ["none", "tanh"]
# Odd widths exercise the per-element bias gather and the scalar tail; 64 and 1024
# the full-vector path; 4099 a prime past one column tile.
# The emulated quick grid (make test) takes 7, 40 and 1024: tail, gather, full vectors.
quick = pytest.mark.emu_quick
WIDTHS = [1, pytest.param(7, marks=quick), pytest.param(40, marks=quick), 64, 1000, pytest.param(1024, marks=quick),
          4099]
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(device, shape, dtype, requires_grad=False):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    bias = torch.randn(shape[-1], device=device, dtype=dtype)
    return x.requires_grad_(requires_grad), bias.requires_grad_(requires_grad)


def _ref_forward_backward(x, bias, grad_out, approximate, dtype):
    """The reference's output and gradients with inputs cast to `dtype`."""
    xr = x.detach().to(dtype).requires_grad_(True)
    br = bias.detach().to(dtype).requires_grad_(True)
    out = reference.bias_gelu(xr, br, approximate=approximate)
    out.backward(grad_out.to(dtype))
    return out.detach(), xr.grad, br.grad


def _check(actual, x, bias, grad_out, approximate, which):
    """Compare one of (out, grad_x, grad_bias) with the reference."""
    idx = {"out": 0, "grad_x": 1, "grad_bias": 2}[which]
    high = _ref_forward_backward(x, bias, grad_out, approximate, torch.float32)[idx]
    if actual.dtype == torch.float32 and which == "grad_bias":
        # A sum over every row (70000 in the grid): the kernel's chunked order and the
        # reference's pairwise one differ by fp32 summation noise far above F32_TOL.
        # Against float64, within a few times the float32 reference's own error.
        exact = _ref_forward_backward(x, bias, grad_out, approximate, torch.float64)[idx]
        assert_flash_rule(actual, exact, high, name=which, factor=8.0)
    elif actual.dtype == torch.float32:
        assert not torch.isnan(actual).any(), f"{which}: contains NaN"
        torch.testing.assert_close(actual, high, **F32_TOL, msg=lambda m: f"{which}: {m}")
    else:
        low = _ref_forward_backward(x, bias, grad_out, approximate, actual.dtype)[idx]
        assert_flash_rule(actual, high, low, name=which)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("n", WIDTHS)
def test_forward(cuda_device, n, approximate, dtype):
    x, bias = _inputs(cuda_device, (3, 37, n), dtype)
    out = tfkernels.bias_gelu(x, bias, approximate=approximate)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _check(out, x, bias, torch.zeros_like(x), approximate, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("n", WIDTHS)
def test_backward(cuda_device, n, approximate, dtype):
    x, bias = _inputs(cuda_device, (5, 29, n), dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    out = tfkernels.bias_gelu(x, bias, approximate=approximate)
    out.backward(grad_out)
    _check(x.grad, x, bias, grad_out, approximate, "grad_x")
    _check(bias.grad, x, bias, grad_out, approximate, "grad_bias")
    assert bias.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [pytest.param(1, marks=quick), 63, 64, 65, pytest.param(4097, marks=quick), 70000])
def test_backward_row_chunks(cuda_device, rows, dtype):
    # Row counts around the chunking thresholds: one chunk (written directly) and
    # many chunks (float partials, then a second pass).
    x, bias = _inputs(cuda_device, (rows, 96), dtype)
    grad_out = torch.randn_like(x)
    grad_x, grad_bias = torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, "none")
    _check(grad_x, x, bias, grad_out, "none", "grad_x")
    _check(grad_bias, x, bias, grad_out, "none", "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("n", [8, pytest.param(40, marks=quick), 1000])
def test_misaligned_views(cuda_device, n, offset, dtype):
    # Views that start `offset` elements into their storage: not 16-byte aligned,
    # so the kernels must take the scalar path (or the misaligned bias path).
    rows = 33
    xbuf = torch.randn(rows * n + offset, device=cuda_device, dtype=dtype) * 2
    bbuf = torch.randn(n + offset, device=cuda_device, dtype=dtype)
    gbuf = torch.randn(rows * n + offset, device=cuda_device, dtype=dtype)
    x = xbuf[offset:].view(rows, n)
    bias = bbuf[offset:]
    grad_out = gbuf[offset:].view(rows, n)
    for approximate in FORMS:
        out = torch.ops.tfkernels.bias_gelu(x, bias, approximate)
        _check(out, x, bias, grad_out, approximate, "out")
        grad_x, grad_bias = torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, approximate)
        _check(grad_x, x, bias, grad_out, approximate, "grad_x")
        _check(grad_bias, x, bias, grad_out, approximate, "grad_bias")
    # Only the bias misaligned, x aligned.
    x_aligned = xbuf[: rows * n].view(rows, n)
    _check(torch.ops.tfkernels.bias_gelu(x_aligned, bias, "none"), x_aligned, bias, grad_out, "none", "out")


@quick
def test_non_contiguous_input(cuda_device):
    # A transposed x [48, 64] with strides (1, 48) and a strided bias: the launcher
    # makes both contiguous; the output is contiguous.
    xt = (torch.randn(64, 48, device=cuda_device) * 2).t()
    bias = torch.randn(128, device=cuda_device)[::2]
    out = tfkernels.bias_gelu(xt, bias)
    assert out.is_contiguous()
    _check(out, xt, bias, torch.zeros_like(xt), "none", "out")
    grad_out = torch.randn(64, 48, device=cuda_device).t()
    grad_x, grad_bias = torch.ops.tfkernels.bias_gelu_bwd(grad_out, xt, bias, "tanh")
    _check(grad_x, xt, bias, grad_out, "tanh", "grad_x")
    _check(grad_bias, xt, bias, grad_out, "tanh", "grad_bias")


@quick
def test_empty(cuda_device):
    x = torch.empty(0, 16, device=cuda_device)
    bias = torch.randn(16, device=cuda_device)
    assert tfkernels.bias_gelu(x, bias).shape == (0, 16)
    grad_x, grad_bias = torch.ops.tfkernels.bias_gelu_bwd(x, x, bias, "none")
    assert grad_x.shape == (0, 16)
    assert torch.equal(grad_bias, torch.zeros(16, device=cuda_device))


def test_deterministic_grad_bias(cuda_device):
    x, bias = _inputs(cuda_device, (8192, 257), torch.bfloat16)
    grad_out = torch.randn_like(x)
    first = torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, "tanh")[1]
    for _ in range(3):
        again = torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, "tanh")[1]
        assert torch.equal(first, again), "grad_bias is not bitwise reproducible"


@pytest.mark.cuda
def test_current_stream_and_graph_capture():
    x, bias = _inputs("cuda", (128, 1024), torch.bfloat16)
    grad_out = torch.randn_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Warm up on the side stream, as CUDA-graph capture requires.
        torch.ops.tfkernels.bias_gelu(x, bias, "none")
        torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, "none")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.tfkernels.bias_gelu(x, bias, "none")
        grad_x, grad_bias = torch.ops.tfkernels.bias_gelu_bwd(grad_out, x, bias, "none")
    graph.replay()
    torch.cuda.synchronize()
    _check(out, x, bias, grad_out, "none", "out")
    _check(grad_x, x, bias, grad_out, "none", "grad_x")
    _check(grad_bias, x, bias, grad_out, "none", "grad_bias")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda dev: (torch.randn(4, 8, device=dev), torch.randn(7, device=dev)), "bias must be a 1-D tensor"),
        (lambda dev: (torch.randn(4, 8, device=dev), torch.randn(8, device=dev).half()), "bias must have the dtype"),
        # A bias on the CPU: the emulated device is the CPU, so this one needs a GPU.
        pytest.param(lambda dev: (torch.randn(4, 8, device=dev), torch.randn(8)), "bias must be on the device",
                     marks=pytest.mark.gpu_only),
        (lambda dev: (torch.randn(4, 8, device=dev).double(), torch.randn(8, device=dev).double()),
         "x must have dtype"),
    ],
)
def test_bad_arguments(cuda_device, make, match):
    x, bias = make(cuda_device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tfkernels.bias_gelu(x, bias, "none")


@quick
def test_bad_approximate(cuda_device):
    x, bias = _inputs(cuda_device, (4, 8), torch.float32)
    with pytest.raises(RuntimeError, match="approximate"):
        torch.ops.tfkernels.bias_gelu(x, bias, "erf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", FORMS)
def test_opcheck(cuda_device, approximate, dtype):
    x, bias = _inputs(cuda_device, (6, 40), dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.tfkernels.bias_gelu.default, (x, bias, approximate))
    grad_out = torch.randn(6, 40, device=cuda_device, dtype=dtype)
    torch.library.opcheck(torch.ops.tfkernels.bias_gelu_bwd.default,
                          (grad_out, x.detach(), bias.detach(), approximate))


@pytest.mark.cuda
def test_compile_fullgraph():
    x, bias = _inputs("cuda", (16, 128), torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda a, b: tfkernels.bias_gelu(a, b, approximate="tanh"), fullgraph=True)
    out = fn(x, bias)
    _check(out.detach(), x, bias, torch.zeros_like(x), "tanh", "out")
