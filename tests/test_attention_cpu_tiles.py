"""The CPU attention's ways to multiply tiles, each against the reference: AMX-BF16
tiles (csrc/cpu/amx_dot.h) and AVX512-BF16 dot products (csrc/cpu/bf16_dot.h) on bf16
tiles, AVX-512 and AVX2 fp32 tile kernels on fp32 tiles and on fp16 ones widened to
fp32 (csrc/cpu/f32_dot.h), and BLAS on tiles widened to fp32
(TFKERNELS_CPU_AMX=0 / TFKERNELS_CPU_BF16_DOT=0 / TFKERNELS_CPU_F32_DOT=0, and every
CPU without the instructions). The shapes put the packing on its edges: odd key
counts (bf16 keys go in pairs), head dims that are not a multiple of 16 (vector
tails; for AMX, reductions that are not a multiple of its 16 pairs), windows whose
first key is odd (the pairs start mid-sequence), one query row, long key tiles."""
import math

import pytest
import torch

import tfkernels
from tfkernels import reference

from .test_attention_variants import VARIANTS, _inputs, _variant, check_parity
from .utils import cpu_flags


# path: (the CPU flags it needs, and the switches that select it)
PATHS = {
    "bf16-amx": ({"amx_bf16"}, {"TFKERNELS_CPU_BF16_DOT": None, "TFKERNELS_CPU_AMX": None}),
    # The AVX512-BF16 products where the CPU's best are AMX ("bf16-amx" runs them elsewhere).
    "bf16-dot": ({"avx512_bf16"}, {"TFKERNELS_CPU_BF16_DOT": None, "TFKERNELS_CPU_AMX": "0"}),
    "f32-dot": ({"avx2", "fma"}, {"TFKERNELS_CPU_F32_DOT": None, "TFKERNELS_CPU_BF16_DOT": "0"}),
    # The AVX2 kernels where the CPU's best are AVX-512 ("f32-dot" runs them elsewhere).
    "f32-dot-avx2": ({"avx2", "fma", "avx512f"},
                     {"TFKERNELS_CPU_F32_DOT": "avx2", "TFKERNELS_CPU_BF16_DOT": "0"}),
    "blas": (set(), {"TFKERNELS_CPU_BF16_DOT": "0", "TFKERNELS_CPU_F32_DOT": "0"}),
}
# (path, input dtype): bf16 tiles take the bf16 products where the CPU has them; fp32
# tiles, and 16-bit ones widened (fp16 always, bf16 without AVX512-BF16), the fp32
# kernels; every dtype can be sent to BLAS.
CASES = [("bf16-amx", torch.bfloat16), ("bf16-dot", torch.bfloat16), ("f32-dot", torch.float32), ("f32-dot", torch.float16),
         ("f32-dot", torch.bfloat16), ("f32-dot-avx2", torch.float32), ("f32-dot-avx2", torch.float16),
         ("blas", torch.bfloat16), ("blas", torch.float32)]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}")
def products(request, monkeypatch):
    """The input dtype, with the switches set so that its tiles take the path."""
    path, dtype = request.param
    flags, switches = PATHS[path]
    missing = flags - cpu_flags()
    if missing:
        pytest.skip(f"this CPU has no {', '.join(sorted(missing))}: the {path} kernels never run on it")
    for name, value in switches.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return dtype


# (batch, heads, kv heads, seqlen_q, seqlen_k, head dim)
SHAPES = [(2, 4, 2, 77, 129, 64), (1, 2, 1, 17, 113, 40), (1, 2, 2, 1, 1000, 80), (1, 2, 1, 300, 601, 128),
          (2, 2, 1, 113, 17, 34)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", *VARIANTS])
def test_tiles_match_the_reference(products, shape, variant):
    sinks, kwargs = (None, {}) if variant == "plain" else _variant(variant, shape, "cpu")
    q, k, v = _inputs(shape, products, "cpu")
    check_parity(q, k, v, sinks, causal_alignment="bottom_right", **kwargs)


def _bshd_inputs(shape, dtype, device):
    """_inputs from [B,S,H,D] storage seen as [B,H,S,D]: rows H * D elements apart."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    return tuple(torch.randn(batch, s, h, head_dim, dtype=dtype, device=device).transpose(1, 2)
                 for s, h in ((seqlen_q, heads), (seqlen_k, kv_heads), (seqlen_k, kv_heads)))


# H * D a multiple of 128 elements: rows that crowd a few L1 sets, which the fp32
# kernels copy into rows an odd number of cache lines apart (f32dot::crowds_l1_sets)
# before reading them down their rows: V in the forward, Q, dO and K in the backward.
CROWDED_SHAPES = [(2, 4, 2, 77, 300, 64), (1, 2, 2, 130, 257, 128)]


@pytest.mark.parametrize("shape", CROWDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "window_causal_seqlens", "all"])
def test_bshd_rows_that_crowd_the_l1(products, shape, variant):
    sinks, kwargs = (None, {}) if variant == "plain" else _variant(variant, shape, "cpu")
    q, k, v = _bshd_inputs(shape, products, "cpu")
    assert k.stride(2) % 128 == 0 and not q.is_contiguous()
    check_parity(q, k, v, sinks, causal_alignment="bottom_right", **kwargs)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_reaches_only_the_rows_that_see_it(products, where, value, layout):
    # 40 rows = a block of 32 and one of 8 whose first visible key (29) is odd.
    # [B,S,H,D] with D = 128: q and k, v rows 256 and 128 elements apart (crowding the L1).
    make, shape = (_inputs, (1, 2, 1, 40, 40, 64)) if layout == "bhsd" else (_bshd_inputs, (1, 2, 1, 40, 40, 128))
    q, k, v = make(shape, products, "cpu")
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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("seqlen_k", [40, 700])
def test_non_finite_on_tiles_every_row_sees(products, where, value, seqlen_k):
    # No mask and no softcap: on the fp32 kernels each row's max comes out of the
    # product's registers (f32dot::gemm_row_max) rather than a pass over the visible
    # scores, so a NaN or +inf score must reach every row from there. 700 keys: a
    # second key tile, after the bad key's, with a masked vector tail.
    q, k, v = _inputs((1, 2, 1, 33, seqlen_k, 64), products, "cpu")
    q[..., 3].abs_()  # an Inf in k gives +inf scores (a NaN row) and a -inf one probability 0
    (k if where == "k" else v)[0, 0, 20, 3] = value
    out = tfkernels.flash_attention(q, k, v)
    ref = reference.flash_attention(*(t.double() for t in (q, k, v)))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    poisoned = value != float("-inf") or where == "v"
    assert bool(finite.all()) != poisoned  # the case poisons every row, or none
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seqlen_k", [37, 700])
def test_scores_far_below_zero(products, seqlen_k):
    # Every score near -1500 (after the scale): exp(score - m) underflows to 0 unless
    # m is the row's true max, so a max that took a padding lane (the masked tail of
    # 37 or 700 keys) as 0 would leave l = 0 and NaN rows.
    q, k, v = _inputs((1, 2, 1, 19, seqlen_k, 64), products, "cpu")
    q = -(q.abs() + 3) * 4
    k = (k.abs() + 3) * 4
    out = tfkernels.flash_attention(q, k, v)
    ref = reference.flash_attention(*(t.double() for t in (q, k, v)))
    assert (q.double() @ k.double().transpose(-1, -2)).max() / 8 < -1000
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
