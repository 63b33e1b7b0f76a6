"""The CPU forward's two ways to multiply bf16 tiles: AVX512-BF16 dot products
(csrc/cpu/bf16_dot.h, on a CPU that has them) and tiles widened to fp32 for sgemm
(TFKERNELS_CPU_BF16_DOT=0, and every CPU without the instruction), each against the
reference. The shapes put the packing on its edges: odd key counts (keys go in
pairs), head dims that are not a multiple of 16 (vector tails), windows whose first
key is odd (the pairs start mid-sequence), one query row, long key tiles."""
import math

import pytest
import torch

import tfkernels
from tfkernels import reference

from .test_attention_variants import VARIANTS, _inputs, _variant, check_parity


def _cpu_has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


@pytest.fixture(params=["bf16-dot", "widened"])
def products(request, monkeypatch):
    if request.param == "bf16-dot":
        if not _cpu_has_avx512_bf16():
            pytest.skip("this CPU has no AVX512-BF16: its kernels always widen bf16 tiles")
        monkeypatch.delenv("TFKERNELS_CPU_BF16_DOT", raising=False)
    else:
        monkeypatch.setenv("TFKERNELS_CPU_BF16_DOT", "0")
    return request.param


# (batch, heads, kv heads, seqlen_q, seqlen_k, head dim)
SHAPES = [(2, 4, 2, 77, 129, 64), (1, 2, 1, 17, 113, 40), (1, 2, 2, 1, 1000, 80), (1, 2, 1, 300, 601, 128),
          (2, 2, 1, 113, 17, 34)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", *VARIANTS])
def test_bf16_tiles_match_the_reference(products, shape, variant):
    sinks, kwargs = (None, {}) if variant == "plain" else _variant(variant, shape, "cpu")
    q, k, v = _inputs(shape, torch.bfloat16, "cpu")
    check_parity(q, k, v, sinks, causal_alignment="bottom_right", **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_reaches_only_the_rows_that_see_it(products, where, value):
    # 40 rows = a block of 32 and one of 8 whose first visible key (29) is odd.
    q, k, v = _inputs((1, 2, 1, 40, 40, 64), torch.bfloat16, "cpu")
    bad = 20
    q[..., 3].abs_()  # an Inf in k gives +inf scores (NaN rows), not -inf ones (probability 0)
    (k if where == "k" else v)[0, 0, bad, 3] = value
    window = (3, 2)
    softcap = 10.0 if math.isnan(value) else 0.0  # c * tanh(inf) = c would hide an Inf
    out = tfkernels.flash_attention(q, k, v, window_size=window, softcap=softcap)
    i = torch.arange(40)
    sees_bad = (bad >= i - window[0]) & (bad <= i + window[1])
    for h in range(2):
        assert torch.equal(~torch.isfinite(out[0, h]).all(-1), sees_bad)
    ref = reference.flash_attention(*(t.double() for t in (q, k, v)), window_size=window, softcap=softcap)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
