"""Attention providers: tfkernels.flash_attention, F.scaled_dot_product_attention (on
CUDA each backend forced in turn), a hand-written eager attention and torch.compile of it;
and the GEMM ceiling (op "gemm": torch.mm alone) that attention's forward is read against."""
import contextlib
import math

import torch
import torch.nn.functional as F

from cases import element_size
from providers import Prepared, Skip, maybe_compile, randn, tfkernels_ops


def eager_attention(q, k, v, mask, scale):
    """The attention a user writes by hand: softmax(q k^T * scale) v.

    Not tfkernels.reference.flash_attention: the reference checks its inputs for
    non-finite values (host syncs) and computes the softmax in float32 with exact
    per-row masking, work that would slow this peer below what a user's code does."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _score_limit(device):
    return (4 << 30) if device == "cuda" else (1 << 30)


def check_score_bytes(nbytes, device):
    """Skip a provider that would materialise a score matrix larger than the device's limit."""
    if nbytes > _score_limit(device):
        raise Skip(f"would materialise a {nbytes / 2**30:.1f} GiB score matrix per call "
                   f"(limit {_score_limit(device) >> 30} GiB on {device})")


def _sdpa_context(provider):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[provider]
    return lambda: sdpa_kernel(backend)


def _gemm_ceiling(case, device):
    """torch.mm of M x K @ K x N in the case's dtype: the machine's GEMM throughput."""
    d = case.dims
    return Prepared(torch.mm, lambda: (randn((d["M"], d["K"]), case.dtype, device),
                                       randn((d["K"], d["N"]), case.dtype, device)))


def prepare(case, device):
    if case.op == "gemm":
        return _gemm_ceiling(case, device)
    d = case.dims
    b, h, s, hd, causal = d["B"], d["H"], d["S"], d["D"], d["causal"]
    score_bytes = b * h * s * s * element_size(case.dtype)

    def make():
        return tuple(randn((b, h, s, hd), case.dtype, device) for _ in range(3))

    p = case.provider
    if p == "tfkernels":
        tfk = tfkernels_ops()
        return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, is_causal=causal), make, (0, 1, 2))
    if p.startswith("sdpa"):
        if p == "sdpa-math":
            check_score_bytes(score_bytes, device)
        ctx = _sdpa_context(p) if p != "sdpa" else contextlib.nullcontext
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), make, (0, 1, 2),
                        context=ctx)
    if p in ("eager", "compile"):
        check_score_bytes(score_bytes, device)
        mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1) if causal else None
        scale = 1.0 / math.sqrt(hd)
        fn = lambda q, k, v: eager_attention(q, k, v, mask, scale)  # noqa: E731
        return Prepared(maybe_compile(fn, p), make, (0, 1, 2), compiled=p == "compile")
    raise ValueError(f"unknown attention provider {p}")
