"""Properties of the CUDA kernels of flash_attention_kvcache (on "cuda" and "emu",
tests/devices.py).

Parity with tfkernels.reference, on every device, is tests/test_attention_kvcache.py's
job; this file checks what the CUDA path adds (the same forward kernel with paged
rows, split-KV and a combine pass), against the already verified padded op
(flash_attention_fwd) on the same device, bitwise where it runs the same kernel:
  (a) a dense cache gives exactly the padded op over the appended cache with
      seqlens_k = cache_seqlens + Snew, bottom-right alignment;
  (b) a paged cache (any block size, blocks in random order) gives exactly the dense result;
  (c) split-KV (num_splits 2, 3 and 0 = chosen from the shape) agrees with unsplit
      up to the fp32 partials, lse included;
  (d) the append writes exactly the new rows (every other cache element bitwise
      unchanged), rotated as a few lines of torch say;
  (e) rows that see no key give out 0 and lse -inf (or the sink), and a NaN in a
      visible key reaches exactly the rows that see it, split or not;
  (f) bad values raise, and under a (simulated) CUDA-graph capture, where the
      host checks are skipped, nothing outside the cache's valid rows is written.
"""
import math

import pytest
import torch

import tfkernels  # noqa: F401 (loads the ops)
from tests import devices, emu_device

# Emulation runs the quick grid (D 64; block sizes 5 and 16) unless TFKERNELS_EMU_GRID=full.
QUICK = pytest.mark.emu_quick

OP = "flash_attention_kvcache"
@pytest.fixture(params=devices.CUDA_DEVICES)
def device(request):
    with devices.on(request.param) as torch_device:
        yield torch_device


def kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, cos=None, sin=None,
            interleaved=False, causal=False, scale=None, window=(-1, -1), softcap=0.0, sinks=None, num_splits=1):
    return torch.ops.tfkernels.flash_attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin,
                                                       interleaved, causal, scale, window[0], window[1], softcap,
                                                       sinks, num_splits)


def padded(q, k_cache, v_cache, lens_k, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, sinks=None):
    """The padded op over [B, S, H, D] tensors (as transposed views), bottom-right aligned."""
    out, lse = torch.ops.tfkernels.flash_attention_fwd(q.transpose(1, 2), k_cache.transpose(1, 2),
                                                       v_cache.transpose(1, 2), causal, "bottom_right", scale, lens_k,
                                                       False, window[0], window[1], softcap, sinks, 0.0, None)
    return out.transpose(1, 2), lse


def rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


class Case:
    """q [B,Sq,H,D], a dense cache [B,capacity,Hkv,D] and new rows [B,Snew,Hkv,D]."""

    def __init__(self, device, dtype, *, batch=2, sq=1, heads=4, kv_heads=2, d=64, capacity=150, lens=None, snew=None,
                 variant="plain"):
        self.device, self.dtype = device, dtype
        snew = sq if snew is None else snew
        lens = lens if lens is not None else [int(x) for x in torch.randint(0, capacity - snew + 1, (batch,))]
        self.q = rand(batch, sq, heads, d, dtype=dtype, device=device)
        self.k_cache = rand(batch, capacity, kv_heads, d, dtype=dtype, device=device)
        self.v_cache = rand(batch, capacity, kv_heads, d, dtype=dtype, device=device)
        self.k = rand(batch, snew, kv_heads, d, dtype=dtype, device=device) if snew else None
        self.v = rand(batch, snew, kv_heads, d, dtype=dtype, device=device) if snew else None
        self.snew = snew
        self.cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.kw = variant_kwargs(variant, heads, device)

    def lens_k(self):
        return self.cache_seqlens + self.snew

    def run(self, **kw):
        return kvcache(self.q, self.k_cache, self.v_cache, self.k, self.v, cache_seqlens=self.cache_seqlens,
                       **{**self.kw, **kw})


def variant_kwargs(variant, heads, device):
    return {
        "plain": {},
        "causal": {"causal": True},
        "window": {"causal": True, "window": (37, 0)},
        "softcap_sinks": {"softcap": 7.5, "sinks": torch.randn(heads, device=device), "scale": 0.2},
    }[variant]


def split_tolerance(dtype):
    # Split outputs are fp32 partials merged and rounded once: within a couple of
    # ulps of the unsplit kernel's rounding at |out| <~ 1.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


# ---------------------------------------------------------------- (a) dense == padded op


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [pytest.param(64, marks=QUICK), 40])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "causal", "window", "softcap_sinks"])
def test_dense_equals_padded_op(device, dtype, d, sq, variant):
    case = Case(device, dtype, sq=sq, d=d, variant=variant, lens=[0 if sq == 1 else 5, 147 - sq])
    out, lse = case.run()
    assert out.shape == case.q.shape and lse.shape == (2, 4, sq)
    ref_out, ref_lse = padded(case.q, case.k_cache, case.v_cache, case.lens_k(), **case.kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- rotary


def rotate(x, cos, sin, pos, interleaved):
    """x [B,S,h,D] rotated at positions pos [B,S] in float64 (rotary_dim = 2 * cos.shape[1])."""
    rd = 2 * cos.shape[1]
    c = cos.double()[pos][:, :, None, :]
    s = sin.double()[pos][:, :, None, :]
    x = x.double()
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        r = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        a, b = x[..., :rd // 2], x[..., rd // 2:rd]
        r = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return torch.cat([r, x[..., rd:]], dim=-1)


def assert_rounded_from(actual, exact, source, dtype):
    """actual is exact (float64) rounded to dtype, give or take one ulp, plus what
    computing x_a cos - x_b sin in fp32 (possibly fused) may lose against the
    largest |x| of the source row."""
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}[dtype]
    err = (actual.double() - exact).abs()
    row_max = source.double().abs().amax(dim=-1, keepdim=True)
    bound = ulp * exact.abs() + 2.0 ** -21 * row_max + 2.0 ** -24
    assert (err <= bound).all(), f"max error {err.max().item():.3g} exceeds the rounding bound"


@QUICK
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("d,rotary_dim", [(64, 64), (40, 20)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rotary_append_and_query(device, dtype, interleaved, d, rotary_dim, causal):
    case = Case(device, dtype, sq=3, d=d, lens=[0, 60], capacity=80)
    seqlen_ro = 70
    angles = torch.rand(seqlen_ro, rotary_dim // 2, device=device) * 2 * math.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_before = case.k_cache.clone()
    out, lse = case.run(cos=cos, sin=sin, interleaved=interleaved, causal=causal)

    lens = case.cache_seqlens.long()
    j = torch.arange(case.snew, device=device)
    pos_k = lens[:, None] + j[None, :]
    written = torch.stack([case.k_cache[b, pos_k[b]] for b in range(2)])
    assert_rounded_from(written, rotate(case.k, cos, sin, pos_k, interleaved), case.k, dtype)
    # the other rows of k_cache are untouched
    mask = torch.ones(2, 80, dtype=torch.bool, device=device)
    for b in range(2):
        mask[b, pos_k[b]] = False
    assert torch.equal(bits(case.k_cache[mask]), bits(k_before[mask]))

    # q at cache_seqlens + i when causal, else at cache_seqlens: the attention equals
    # the padded op on q rotated in torch (rounded to dtype; a 1-ulp difference in q
    # moves the output a little).
    pos_q = lens[:, None] + (j[None, :] if causal else 0 * j[None, :])
    q_rot = rotate(case.q, cos, sin, pos_q, interleaved).to(dtype)
    ref_out, ref_lse = padded(q_rot, case.k_cache, case.v_cache, case.lens_k(), causal=causal)
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=0)


# ---------------------------------------------------------------- (b) paged == dense


def to_paged(dense, block_size, table):
    """A paged copy of dense [B, capacity, Hkv, D] through table [B, max_blocks]; the
    blocks no entry names keep random values."""
    b, capacity, hkv, d = dense.shape
    num_blocks = int(table.max()) + 3
    paged = rand(num_blocks, block_size, hkv, d, dtype=dense.dtype, device=dense.device)
    blocks = dense.view(b, capacity // block_size, block_size, hkv, d)
    paged[table.long().flatten()] = blocks.flatten(0, 1)
    return paged


def from_paged(paged, table):
    b, max_blocks = table.shape
    return paged[table.long().flatten()].view(b, max_blocks * paged.shape[1], *paged.shape[2:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("block_size", [pytest.param(16, marks=QUICK), 64, pytest.param(5, marks=QUICK)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_paged_equals_dense(device, dtype, block_size, num_splits, rotary):
    max_blocks = math.ceil(130 / block_size)
    capacity = max_blocks * block_size
    case = Case(device, dtype, sq=3, heads=6, kv_heads=2, capacity=capacity, lens=[capacity - 3, 17],
                variant="window")
    perm = torch.randperm(2 * max_blocks + 2, device=device)[:2 * max_blocks]
    table = perm.view(2, max_blocks).to(torch.int32)
    k_paged, v_paged = to_paged(case.k_cache, block_size, table), to_paged(case.v_cache, block_size, table)
    unused = torch.ones(k_paged.shape[0], dtype=torch.bool, device=device)
    unused[table.long().flatten()] = False
    k_unused, v_unused = k_paged[unused].clone(), v_paged[unused].clone()
    kw = {}
    if rotary:
        angles = torch.rand(capacity, 16, device=device)
        kw = {"cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype)}

    out_p, lse_p = kvcache(case.q, k_paged, v_paged, case.k, case.v, cache_seqlens=case.cache_seqlens,
                           block_table=table, num_splits=num_splits, **case.kw, **kw)
    out_d, lse_d = case.run(num_splits=num_splits, **kw)
    assert torch.equal(out_p, out_d) and torch.equal(lse_p, lse_d)
    assert torch.equal(bits(from_paged(k_paged, table)), bits(case.k_cache))
    assert torch.equal(bits(from_paged(v_paged, table)), bits(case.v_cache))
    assert torch.equal(bits(k_paged[unused]), bits(k_unused)) and torch.equal(bits(v_paged[unused]), bits(v_unused))


# ---------------------------------------------------------------- (c) split-KV


def combine_launches():
    return sum(int(r["launches"]) for r in emu_device.stats() if "flash_fwd_split_combine" in r["kernel"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [pytest.param(64, marks=QUICK), 40])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "window", "softcap_sinks"])
def test_splits_agree(device, request, dtype, d, sq, variant):
    # capacity 600 with at most 150 keys in use: num_splits = 0 splits this shape
    # (B * H = 8 blocks on a machine of >= 100 SMs); the blocks visit only the
    # tiles of their keys.
    case = Case(device, dtype, sq=sq, d=d, variant=variant, capacity=600, lens=[150 - sq, 1])
    out1, lse1 = case.run(num_splits=1)
    tol = split_tolerance(dtype)
    emu = request.node.callspec.params["device"] == "emu"
    for splits in (2, 3, 0):
        if emu:
            before = combine_launches()
        out, lse = case.run(num_splits=splits)
        torch.testing.assert_close(out.float(), out1.float(), atol=tol, rtol=0)
        torch.testing.assert_close(lse, lse1, atol=1e-5, rtol=1e-5)
        if emu:  # every split count above picks split-KV on the emulated H200 (132 SMs)
            assert combine_launches() > before, f"num_splits={splits} did not run the combine kernel"


# ---------------------------------------------------------------- (d) the append


@QUICK
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("snew", [1, 3])
def test_append_writes_only_the_new_rows(device, dtype, snew):
    capacity = 40
    # batch 0 fills the cache exactly; batch 2 appends at 0
    case = Case(device, dtype, batch=3, sq=2, snew=snew, capacity=capacity, lens=[capacity - snew, 11, 0])
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    case.run()
    for b, start in enumerate(case.cache_seqlens.tolist()):
        rows = slice(start, start + snew)
        assert torch.equal(bits(case.k_cache[b, rows]), bits(case.k[b]))
        assert torch.equal(bits(case.v_cache[b, rows]), bits(case.v[b]))
        for cache, before in ((case.k_cache, k_before), (case.v_cache, v_before)):
            assert torch.equal(bits(cache[b, :start]), bits(before[b, :start]))
            assert torch.equal(bits(cache[b, start + snew:]), bits(before[b, start + snew:]))


@QUICK
def test_no_new_rows_leaves_the_cache_alone(device):
    case = Case(device, torch.bfloat16, sq=3, snew=0, lens=[3, 100], variant="causal")
    k_before = case.k_cache.clone()
    out, lse = case.run(num_splits=2)
    assert torch.equal(bits(case.k_cache), bits(k_before))
    ref_out, ref_lse = padded(case.q, case.k_cache, case.v_cache, case.cache_seqlens, causal=True)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=split_tolerance(torch.bfloat16), rtol=0)


# ---------------------------------------------------------------- (e) no keys, NaN


@QUICK
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_rows_without_keys(device, num_splits, with_sinks):
    # batch 0: empty cache, nothing new (no key at all); batch 1: one key, Sq = 3
    # causal bottom-right: rows 0 and 1 see no key, row 2 sees it.
    case = Case(device, torch.float16, sq=3, snew=0, lens=[0, 1], variant="causal")
    sinks = torch.randn(4, device=device) if with_sinks else None
    out, lse = case.run(num_splits=num_splits, sinks=sinks)
    hidden = torch.zeros(2, 3, dtype=torch.bool, device=device)
    hidden[0, :] = True
    hidden[1, :2] = True
    no_key_lse = sinks[None, :, None].expand(2, 4, 3) if with_sinks else torch.full((2, 4, 3), -math.inf, device=device)
    assert (out.transpose(1, 2)[hidden[:, None, :].expand(2, 4, 3)] == 0).all()
    assert torch.equal(lse.transpose(1, 2)[hidden], no_key_lse.transpose(1, 2)[hidden])
    assert torch.isfinite(out[1, 2]).all() and torch.isfinite(lse[1, :, 2]).all()


@QUICK
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("where", ["visible", "past_len_k"])
def test_nan_key_reaches_the_rows_that_see_it(device, num_splits, where):
    case = Case(device, torch.bfloat16, sq=3, snew=0, lens=[120, 120])
    case.k_cache[0, 7 if where == "visible" else 121, 1] = float("nan")  # kv head 1: query heads 2, 3
    out, lse = case.run(num_splits=num_splits)
    if where == "visible":
        assert out[0, :, 2:].isnan().all() and lse[0, 2:].isnan().all()
        out, lse = out.clone(), lse.clone()
        out[0, :, 2:] = 0
        lse[0, 2:] = 0
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------- (f) bad values, capture


@QUICK
def test_bad_values_raise(device):
    case = Case(device, torch.float16, sq=1, capacity=20, lens=[19, 0])
    with pytest.raises(RuntimeError, match="too small"):
        kvcache(case.q, case.k_cache, case.v_cache, case.k, case.v, cache_seqlens=case.cache_seqlens + 1)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        kvcache(case.q, case.k_cache, case.v_cache, case.k, case.v, cache_seqlens=case.cache_seqlens - 1)
    with pytest.raises(RuntimeError, match="together"):
        kvcache(case.q, case.k_cache, case.v_cache, case.k, None, cache_seqlens=case.cache_seqlens)
    paged = case.k_cache.view(8, 5, 2, 64)
    table = torch.tensor([[0, 1, 2, 3], [8, 5, 6, 7]], dtype=torch.int32, device=device)  # 8 of 8 blocks, used
    with pytest.raises(RuntimeError, match="block_table"):
        kvcache(case.q, paged, paged.clone(), case.k, case.v, cache_seqlens=case.cache_seqlens, block_table=table)


@pytest.fixture
def capturing(monkeypatch):
    """The emulated device's stand-in for CUDA-graph capture: host value checks off."""
    monkeypatch.setenv("TFKERNELS_EMU_CAPTURING", "1")


@QUICK
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_capture_clamps_instead_of_checking(capturing, paged):
    with devices.on("emu") as device:
        # Batch 0 appends 3 rows at capacity - 1 (two past the end). Dense: batch 1
        # appends at -2 (two before the start); paged: at 16, in the block of
        # table entry 3, which names a block that does not exist.
        case = Case(device, torch.float16, sq=3, capacity=20, lens=[19, 16 if paged else -2])
        k_cache, v_cache, table = case.k_cache, case.v_cache, None
        if paged:
            table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 99]], dtype=torch.int32, device=device)
            k_cache, v_cache = case.k_cache.reshape(8, 5, 2, 64), case.v_cache.reshape(8, 5, 2, 64)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        out, lse = kvcache(case.q, k_cache, v_cache, case.k, case.v, cache_seqlens=case.cache_seqlens,
                           block_table=table)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        # Exactly the in-range rows were written: batch 0 row 19 (new row 0); dense
        # batch 1 row 0 (new row 2), paged batch 1 nothing.
        expected_k, expected_v = k_before.view(2, 20, 2, 64).clone(), v_before.view(2, 20, 2, 64).clone()
        expected_k[0, 19], expected_v[0, 19] = case.k[0, 0], case.v[0, 0]
        if not paged:
            expected_k[1, 0], expected_v[1, 0] = case.k[1, 2], case.v[1, 2]
        assert torch.equal(bits(k_cache.reshape(2, 20, 2, 64)), bits(expected_k))
        assert torch.equal(bits(v_cache.reshape(2, 20, 2, 64)), bits(expected_v))
