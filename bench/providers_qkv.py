"""QKV providers: tfkernels.fused_qkv; eager (tfkernels.reference.fused_qkv: F.linear,
split, view/permute/contiguous) and torch.compile of it; the GEMM alone (a ceiling)."""
import torch.nn.functional as F

from providers import Prepared, maybe_compile, randn, reference, tfkernels_ops


def prepare(case, device):
    d = case.dims
    b, s, width, heads = d["B"], d["S"], d["d"], d["H"]

    def make():
        return (randn((b, s, width), case.dtype, device), randn((3 * width, width), case.dtype, device, width**-0.5),
                randn((3 * width,), case.dtype, device, 0.1))

    p = case.provider
    if p == "tfkernels":
        tfk = tfkernels_ops()
        fn = lambda x, w, bias: tfk.fused_qkv(x, w, bias, num_heads=heads)  # noqa: E731
    elif p in ("eager", "compile"):
        ref = reference()
        fn = maybe_compile(lambda x, w, bias: ref.fused_qkv(x, w, bias, num_heads=heads), p)
    elif p == "gemm-only":
        fn = F.linear
    else:
        raise ValueError(f"unknown fused_qkv provider {p}")
    return Prepared(fn, make, (0, 1, 2), compiled=p == "compile")
