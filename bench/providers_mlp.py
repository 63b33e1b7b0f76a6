"""MLP-family providers (bias_gelu, linear_gelu, fused_mlp): tfkernels; eager
(tfkernels.reference: F.linear + F.gelu) and torch.compile of it; cuBLASLt's GELU
epilogue (torch._addmm_activation, CUDA, forward only); the GEMMs alone (a ceiling).
Every GELU is the tanh form (settings.GELU)."""
import torch
import torch.nn.functional as F

from providers import Prepared, Skip, maybe_compile, randn, reference, tfkernels_ops
from settings import GELU


# Every input gets a gradient in fwd+bwd.
_GRAD_INDEX = {"bias_gelu": (0, 1), "linear_gelu": (0, 1, 2), "fused_mlp": (0, 1, 2, 3, 4)}


def _need_cublaslt(case, device):
    if device != "cuda":
        raise Skip("cuBLASLt GELU epilogue is CUDA-only (on the CPU torch._addmm_activation is addmm + gelu)")
    if case.direction == "fwd+bwd":
        raise Skip("torch._addmm_activation has no autograd formula (forward only)")


def _inputs(case, device):
    """() -> the op's inputs: x, then (weight, bias) per layer, or bias_gelu's x, bias."""
    d, dtype = case.dims, case.dtype
    if case.op == "bias_gelu":
        m, n = d["M"], d["N"]
        return lambda: (randn((m, n), dtype, device), randn((n,), dtype, device, 0.1))
    if case.op == "linear_gelu":
        m, k, n = d["M"], d["K"], d["N"]
        return lambda: (randn((m, k), dtype, device), randn((n, k), dtype, device, k**-0.5),
                        randn((n,), dtype, device, 0.1))
    m, width, ff = d["M"], d["d"], d["ff"]
    return lambda: (randn((m, width), dtype, device), randn((ff, width), dtype, device, width**-0.5),
                    randn((ff,), dtype, device, 0.1), randn((width, ff), dtype, device, ff**-0.5),
                    randn((width,), dtype, device, 0.1))


def _cublaslt(op):
    if op == "linear_gelu":
        return lambda x, w, bias: torch._addmm_activation(bias, x, w.t(), use_gelu=True)
    return lambda x, w1, b1, w2, b2: torch.addmm(b2, torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2.t())


def _gemm_only(op):
    if op == "linear_gelu":
        return F.linear
    return lambda x, w1, b1, w2, b2: F.linear(F.linear(x, w1, b1), w2, b2)


def prepare(case, device):
    op, p = case.op, case.provider
    if p == "tfkernels":
        fn = getattr(tfkernels_ops(), op)
    elif p in ("eager", "compile"):
        fn = getattr(reference(), op)
    elif p == "cublaslt" and op != "bias_gelu":
        _need_cublaslt(case, device)
        fn = _cublaslt(op)
    elif p == "gemm-only" and op != "bias_gelu":
        fn = _gemm_only(op)
    else:
        raise ValueError(f"unknown {op} provider {p}")
    if p in ("tfkernels", "eager", "compile"):
        fn = maybe_compile(_with_gelu_form(fn), p)
    return Prepared(fn, _inputs(case, device), _GRAD_INDEX[op], compiled=p == "compile")


def _with_gelu_form(fn):
    return lambda *inputs: fn(*inputs, approximate=GELU)


