"""What the GEMM families' tests (test_qkv.py, test_mlp.py) share: the grid marks, the
dtype parameters and the comparison rules of their CUDA-style checks.

Rules: fp16/bf16 follow the FlashAttention rule (utils.assert_flash_rule) against the
reference on float32 copies (TF32 off) and the reference in the dtype; fp32 is checked
by relative error against a float64 reference, with TF32 on or off.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .utils import assert_flash_rule, max_abs_err, tf32_matmul

sanitize = pytest.mark.sanitize  # small cases, cheap enough for compute-sanitizer
# Sizes that take minutes each on the emulated device: they run on a GPU only.
gpu_only = pytest.mark.gpu_only
# The emulated quick grid (make test); TFKERNELS_EMU_GRID=full runs every case.
quick = pytest.mark.emu_quick

HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ALL_DTYPES = HALF_DTYPES + [pytest.param(torch.float32, id="fp32")]
TF32 = [pytest.param(False, id="tf32-off"), pytest.param(True, id="tf32-on")]

# The CPU parity grid's (dtype, GEMM backend). The CPU kernels run bf16/half GEMMs on
# oneDNN or on MKL, chosen from the CPU's ISA (csrc/cpu/gemm16.h), and fp32 ones on our
# AVX-512 kernel or MKL's sgemm (on AVX2 and on Intel's CPUs sgemm:
# f32dot::whole_gemms_available); the tests force each, whichever this machine would pick.
CPU_DTYPES = [pytest.param(torch.float64, None, id="float64"), pytest.param(torch.float32, None, id="float32"),
              pytest.param(torch.float32, "sgemm", id="float32-sgemm"),
              pytest.param(torch.float32, "whole", id="float32-whole")] + [
    pytest.param(dtype, backend, id=f"{name}-{backend}")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")) for backend in ("onednn", "blas")] + [
    pytest.param(torch.bfloat16, "onednn-nodot", id="bf16-onednn-nodot")]


def force_gemm16(monkeypatch, backend):
    """Make the CPU kernels run their 16-bit GEMMs on `backend` ("onednn", "blas"; None:
    the CPU's choice), or with "sgemm" their fp32 GEMMs on MKL's sgemm rather than our
    AVX-512 kernel (csrc/cpu/f32_dot.h, the choice where the CPU has AVX-512 and is not
    Intel's), with "whole" on our kernel (where the CPU has AVX-512 or AVX2). On a CPU
    with AVX512-BF16, "onednn" runs the bf16 GEMMs on our vdpbf16ps tiles (gemm16.h's
    forward_on_bf16_tiles, and mm_out_cpu for the backwards) and "onednn-nodot" keeps
    them on oneDNN."""
    if backend == "sgemm":
        monkeypatch.setenv("TFKERNELS_CPU_F32_DOT", "0")
    elif backend == "whole":
        monkeypatch.setenv("TFKERNELS_CPU_F32_DOT", "whole")
    elif backend == "onednn-nodot":
        monkeypatch.setenv("TFKERNELS_CPU_GEMM16", "onednn")
        monkeypatch.setenv("TFKERNELS_CPU_BF16_DOT", "0")
    elif backend is not None:
        monkeypatch.setenv("TFKERNELS_CPU_GEMM16", backend)


def leaf(t, dtype):
    """A detached copy of t in dtype that requires grad when t does (None stays None)."""
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


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


def compare_16bit(names, actual, high, low):
    """check_16bit over parallel lists; where the reference has None (no bias), so must actual."""
    for name, a, h, lo in zip(names, actual, high, low):
        if h is None:
            assert a is None, f"{name}: expected None without a bias"
            continue
        check_16bit(name, a, h, lo)


def check_by_dtype(names, actual, ref_fn, dtype):
    """Compare each of `actual` with ref_fn(ref_dtype)[i] by the rule of the dtype:
    float64 relative error for fp32, the FlashAttention rule for 16-bit."""
    if dtype == torch.float32:
        for name, a, r in zip(names, actual, ref_fn(torch.float64)):
            check_fp32(name, a, r, tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        compare_16bit(names, actual, ref_fn(torch.float32), ref_fn(dtype))


def run_reference(fn, tensors, dtype, grads=None, **kwargs):
    """fn (a reference op) on copies of `tensors` in `dtype` with TF32 off: (outputs, grads).

    outputs is a tensor or a tuple as fn returns it; with `grads` (one per output) also the
    gradient of every tensor (None where the tensor is None), else None."""
    leaves = [leaf(t, dtype) for t in tensors]
    with tf32_matmul(False):
        out = fn(*leaves, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        if grads is None:
            return _detach(out), None
        torch.autograd.backward(list(outs), [g.to(dtype) for g in grads])
    return _detach(out), [None if t is None else t.grad for t in leaves]


def _detach(out):
    return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()


# Bad-input tables run on the CPU kernels and on the fake kernels (what torch.compile
# traces with, see tfkernels/_fake_checks.py): both must reject with the same message.
KERNELS = ["cpu", "fake"]


def rejects(kernel, call, match):
    """call() raises RuntimeError matching `match`, with real tensors or under FakeTensorMode."""
    if kernel == "fake":
        with FakeTensorMode(), pytest.raises(RuntimeError, match=match):
            call()
    else:
        with pytest.raises(RuntimeError, match=match):
            call()
