"""The PTX primitives (csrc/cuda/common/ptx.h) against the PTX ISA's tables.

Each probe (csrc/cuda/probe/ptx_probe.cu) runs one primitive in one warp on
inputs given per lane and returns what each lane receives. The expected values
come from the ISA's fragment tables, transcribed here independently of both the
kernels and the emulator (csrc/emu/ptx.h):

- ldmatrix (9.7.14.5.15, "ldmatrix"): matrix i is read from the row addresses
  of lanes 8i..8i+7; lane l receives in register i the pair
  (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, or with .trans the pair
  (rows 2(l%4), 2(l%4)+1, col l/4).
- mma.m16n8k16 .f16/.bf16 (9.7.14.5.8), with groupID g = l/4 and t = l%4:
  A a0,a1: (g, 2t+{0,1}); a2,a3: (g+8, 2t+{0,1}); a4,a5: (g, 2t+8+{0,1}); a6,a7: (g+8, 2t+8+{0,1})
  B b0,b1: (2t+{0,1}, g); b2,b3: (2t+8+{0,1}, g)
  C c0,c1: (g, 2t+{0,1}); c2,c3: (g+8, 2t+{0,1})
- mma.m16n8k8 .tf32 (9.7.14.5.7): A a0: (g, t), a1: (g+8, t), a2: (g, t+4),
  a3: (g+8, t+4); B b0: (t, g), b1: (t+4, g); C as above.
- cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits.
- ex2.approx.ftz.f32: 2^x within 2 ulp; ex2(-inf) = +0; subnormals flush.
- cp.async + wait_group N: the older groups have landed; src-size 0 zero-fills.

Runs on a real GPU and on the emulated device.
"""
import math

import pytest
import torch

from . import emu_device

DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
           pytest.param("emu", marks=[pytest.mark.emu, pytest.mark.emu_quick], id="emu")]


@pytest.fixture(params=DEVICES)
def probe(request):
    """probe(name, int32 input, out_numel, divisor=0) -> int32 output (on the CPU)."""
    if request.param == "emu":
        emu_device.require()
        op, device = torch.ops.tfkernels_emu._ptx_probe, "cpu"
    else:
        op, device = torch.ops.tfkernels._ptx_probe, "cuda"

    def run(name, values, out_numel, divisor=0):
        return op(name, values.to(device=device, dtype=torch.int32), out_numel, divisor).cpu()

    return run


def _b16(x):
    return int(x) & 0xFFFF


# ----------------------------------------------------------------------------- ldmatrix


@pytest.mark.parametrize("name", ["ldmatrix_x4", "ldmatrix_x4_trans", "ldmatrix_x2", "ldmatrix_x2_trans"])
def test_ldmatrix_fragments(probe, name):
    # 32 rows of 8 distinct b16 values: element (r, c) = 8r + c + 1.
    elems = torch.arange(1, 257, dtype=torch.int64).view(32, 8)
    packed = (elems[:, 0::2] | (elems[:, 1::2] << 16)).to(torch.int32)  # little-endian pairs
    out = probe(name, packed.flatten(), 128).view(32, 4)
    matrices = 4 if "x4" in name else 2
    trans = name.endswith("trans")
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(matrices):
            if trans:
                lo, hi = elems[8 * i + 2 * t, g], elems[8 * i + 2 * t + 1, g]
            else:
                lo, hi = elems[8 * i + g, 2 * t], elems[8 * i + g, 2 * t + 1]
            got = int(out[lane, i]) & 0xFFFFFFFF
            assert (got & 0xFFFF, got >> 16) == (int(lo), int(hi)), f"lane {lane} register {i}"


# ----------------------------------------------------------------------------- mma


def _bits16(x, dtype):
    return x.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def _pack(lo, hi):
    return lo | (hi << 16)


def _mma_inputs_16816(a, b, c, dtype):
    a16, b16 = _bits16(a, dtype), _bits16(b, dtype)
    lanes = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs_a = [_pack(a16[g, 2 * t], a16[g, 2 * t + 1]), _pack(a16[g + 8, 2 * t], a16[g + 8, 2 * t + 1]),
                  _pack(a16[g, 2 * t + 8], a16[g, 2 * t + 9]), _pack(a16[g + 8, 2 * t + 8], a16[g + 8, 2 * t + 9])]
        regs_b = [_pack(b16[2 * t, g], b16[2 * t + 1, g]), _pack(b16[2 * t + 8, g], b16[2 * t + 9, g])]
        regs_c = [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]
        lanes.append([int(r) for r in regs_a + regs_b] +
                     [int(torch.tensor([float(x)], dtype=torch.float32).view(torch.int32)) for x in regs_c])
    return torch.tensor(lanes, dtype=torch.int64).to(torch.int32)


def _mma_inputs_1688(a, b, c):
    bits = lambda x: int(torch.tensor([float(x)], dtype=torch.float32).view(torch.int32))  # noqa: E731
    lanes = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        lanes.append([bits(a[g, t]), bits(a[g + 8, t]), bits(a[g, t + 4]), bits(a[g + 8, t + 4]),
                      bits(b[t, g]), bits(b[t + 4, g]),
                      bits(c[g, 2 * t]), bits(c[g, 2 * t + 1]), bits(c[g + 8, 2 * t]), bits(c[g + 8, 2 * t + 1])])
    return torch.tensor(lanes, dtype=torch.int64).to(torch.int32)


def _d_from_lanes(out):
    d = torch.empty(16, 8, dtype=torch.float64)
    vals = out.view(32, 4).view(torch.float32).double()
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = vals[lane]
    return d


@pytest.mark.parametrize("name,dtype", [("mma_f16", torch.float16), ("mma_bf16", torch.bfloat16)])
def test_mma_m16n8k16(probe, name, dtype):
    a = torch.randn(16, 16).to(dtype).double()
    b = torch.randn(16, 8).to(dtype).double()
    c = torch.randn(16, 8).float().double()
    d = _d_from_lanes(probe(name, _mma_inputs_16816(a, b, c, dtype).flatten(), 128))
    expected = a @ b + c
    # Exact products; the sum of 17 fp32-rounded-or-better terms: fp32 round-off.
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-5)


def test_mma_m16n8k8_tf32_reads_19_bits(probe):
    a, b, c = torch.randn(16, 8).double(), torch.randn(8, 8).double(), torch.randn(16, 8).float().double()
    d = _d_from_lanes(probe("mma_tf32", _mma_inputs_1688(a, b, c).flatten(), 128))

    def tf32_truncated(x):
        bits = x.float().view(torch.int32) & ~0x1FFF
        return bits.view(torch.float32).double()

    expected = tf32_truncated(a) @ tf32_truncated(b) + c
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-5)
    # The low 13 bits matter only if the hardware read them: check they were dropped.
    assert (d - (a @ b + c)).abs().max() > 1e-6


def test_mma_propagates_nan_and_inf(probe):
    a, b, c = torch.randn(16, 16).half().double(), torch.randn(16, 8).half().double(), torch.zeros(16, 8).double()
    a[3, 5] = float("nan")
    b[2, 6] = float("inf")
    d = _d_from_lanes(probe("mma_f16", _mma_inputs_16816(a, b, c, torch.float16).flatten(), 128))
    expected = a @ b + c
    assert torch.equal(torch.isnan(d), torch.isnan(expected))
    assert torch.equal(torch.isinf(d), torch.isinf(expected))


# ----------------------------------------------------------------------------- conversions and math


def test_cvt_rna_tf32(probe):
    specials = [0.0, -0.0, 1.0, float("inf"), float("-inf"), 3.4e38, 1e-40]
    # Exact ties (bit 12 set, bits 0-11 clear) round away from zero.
    ties = [torch.tensor([0x3F801000, 0xBF801000, 0x3F803000], dtype=torch.int64).to(torch.int32).view(torch.float32)]
    x = torch.cat([torch.randn(200), torch.tensor(specials), *ties]).float()
    got = probe("cvt_tf32", x.view(torch.int32), x.numel())
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = torch.isfinite(x)
    rounded = ((bits + 0x1000) & 0xFFFFE000)
    expected = torch.where(finite, rounded, bits)
    assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, expected)


def test_ex2_approx(probe):
    x = torch.cat([torch.linspace(-140, 127, 500), torch.tensor([float("-inf"), float("inf"), 0.0])]).float()
    got = probe("ex2", x.view(torch.int32), x.numel()).view(torch.float32)
    assert got[-3] == 0.0 and got[-3].sign() >= 0 and got[-2] == float("inf") and got[-1] == 1.0
    expected = torch.exp2(x[:-3].double())
    normal = expected >= 2.0 ** -126
    rel = ((got[:-3].double() - expected).abs() / expected)[normal]
    assert float(rel.max()) < 2 * 2.0 ** -22, "ex2.approx is documented to about 2 ulp"
    assert torch.all(got[:-3][~normal] <= 2.0 ** -126)  # flushed (ftz) or tiny


def test_fastdiv_matches_integer_division(probe):
    n = torch.cat([torch.arange(0, 300), torch.randint(0, 2**31 - 1, (300,))])
    for d in (1, 3, 7, 64, 129, 1000003, 2**31 - 1):
        got = probe("fastdiv", n, n.numel(), d)
        assert torch.equal(got.to(torch.int64), n // d), f"divisor {d}"


def test_cp_async_groups_and_zero_fill(probe):
    src = torch.randint(-2**31, 2**31 - 1, (384,), dtype=torch.int64).to(torch.int32)
    got = probe("cp_async", src, 384)
    assert torch.equal(got[:256], src[:256]), "groups 0 and 1 must have landed after wait_group 1"
    assert torch.equal(got[256:], torch.zeros(128, dtype=torch.int32)), "src-size 0 must zero-fill"
