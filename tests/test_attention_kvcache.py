"""flash_attention_with_kvcache against tfkernels.reference.attention_with_kvcache.

Devices (tests/devices.py): every test that takes `kv_device` runs on the CPU, on a GPU
("cuda") and on the emulated CUDA device ("emu"), and skips (naming what is missing)
on a device whose kvcache kernel does not exist yet: the check looks for it (the CUDA
dispatch key, tests/emu_device.OPS), so the cases start running when it lands. The
emulated device runs the cases marked `emu_quick` only (small caches).

Each parity case draws fresh caches, fills the rows past every sequence's length with
random data too (so an append at the wrong row, or a read past a sequence's end,
changes the result), and checks:
- out and lse by the FlashAttention rule (tests/utils.assert_flash_rule) against the
  float64 reference, with the reference in the input dtype as the yardstick (float64
  inputs on the CPU: to round-off);
- the caches: the appended rows equal the reference's (v exactly; k exactly without
  rotary, within one rounding of the rotation with it), every other row unchanged, exactly.
Outputs start NaN-poisoned (conftest), so an element the kernel does not write fails.
"""
import dataclasses

import pytest
import torch

import tfkernels
from tfkernels import reference

from . import emu_device
from .utils import assert_close_float64, assert_flash_rule

_ops = torch.ops.tfkernels
_OP = "flash_attention_kvcache"
quick = pytest.mark.emu_quick


def _missing_kernel(device_name):
    """Why `device_name` cannot run the kvcache op yet, or None."""
    if device_name == "emu" and _OP not in emu_device.OPS:
        return f"no emulated CUDA kernel for tfkernels::{_OP} yet (tests/emu_device.OPS lacks it)"
    if device_name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"tfkernels::{_OP}", "CUDA"):
        return f"no CUDA kernel registered for tfkernels::{_OP} yet"
    return None


@pytest.fixture
def kv_device(request, device):
    why = _missing_kernel(request.node.callspec.params["device"])
    if why:
        pytest.skip(why)
    return device


# ------------------------------------------------------------------------------ inputs

@dataclasses.dataclass
class Case:
    cache_lens: list            # rows cached per sequence (B = len)
    seqlen_q: int
    seqlen_new: int             # 0: no k, v
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int = 0         # 0: dense cache
    is_causal: bool = False
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    rotary: tuple = None        # (rotary_dim, interleaved)
    num_splits: int = 0
    spare: int = 7              # cache rows beyond the longest sequence


def _rotary_tables(seqlen_ro, rotary_dim, dtype, device):
    """cos, sin [seqlen_ro, rotary_dim / 2] of real angles (theta = 10000, as RoPE)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def make_inputs(case, dtype, device):
    """The op's keyword arguments for `case`, on `device`; every tensor random (no zeros)."""
    batch, D = len(case.cache_lens), case.head_dim
    total = [c + case.seqlen_new for c in case.cache_lens]
    capacity = max(total) + case.spare

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    kw = dict(cache_seqlens=torch.tensor(case.cache_lens, dtype=torch.int32, device=device),
              is_causal=case.is_causal, window_size=case.window_size, softcap=case.softcap,
              num_splits=case.num_splits)
    if case.block_size:
        max_blocks = -(-capacity // case.block_size)
        num_blocks = batch * max_blocks + 3  # spare blocks nobody owns
        kw["block_table"] = (torch.randperm(num_blocks, device=device)[:batch * max_blocks]
                             .view(batch, max_blocks).to(torch.int32))
        cache_shape = (num_blocks, case.block_size, case.kv_heads, D)
    else:
        cache_shape = (batch, capacity, case.kv_heads, D)
    q = randn(batch, case.seqlen_q, case.heads, D)
    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    if case.seqlen_new:
        kw["k"], kw["v"] = randn(batch, case.seqlen_new, case.kv_heads, D), randn(batch, case.seqlen_new,
                                                                                   case.kv_heads, D)
    if case.rotary:
        rotary_dim, kw["rotary_interleaved"] = case.rotary
        kw["rotary_cos"], kw["rotary_sin"] = _rotary_tables(capacity + case.seqlen_q, rotary_dim, dtype, device)
    if case.sinks:
        kw["sinks"] = torch.randn(case.heads, device=device)
    return q, k_cache, v_cache, kw


def _to(t, dtype=None):
    """t on the CPU (in `dtype`), for the reference; None stays None."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.cpu()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def run_reference(q, k_cache, v_cache, kw, dtype=None):
    """reference.attention_with_kvcache on CPU copies (in `dtype`): (out, lse, k_cache, v_cache)."""
    ref_kw = {name: _to(value, dtype) for name, value in kw.items() if name != "num_splits"}
    if "sinks" in ref_kw and dtype is not None:
        ref_kw["sinks"] = kw["sinks"].cpu().to(dtype)
    return reference.attention_with_kvcache(_to(q, dtype), _to(k_cache, dtype), _to(v_cache, dtype), **ref_kw)


def written_rows(case, kw, cache_shape):
    """Bool [dim0, dim1] of the cache: True at the rows the append writes."""
    mask = torch.zeros(cache_shape[:2], dtype=torch.bool)
    table = kw.get("block_table")
    for b, c in enumerate(case.cache_lens):
        for p in range(c, c + case.seqlen_new):
            if table is None:
                mask[b, p] = True
            else:
                mask[int(table[b, p // case.block_size]), p % case.block_size] = True
    return mask


def check_case(case, dtype, device):
    q, k_cache, v_cache, kw = make_inputs(case, dtype, device)
    k0, v0 = k_cache.clone(), v_cache.clone()
    out, lse = tfkernels.flash_attention_with_kvcache(q, k_cache, v_cache, return_lse=True, **kw)
    batch, seqlen_q, heads, _ = q.shape
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32

    ref_out, ref_lse, ref_k, ref_v = run_reference(q, k0, v0, kw, torch.float64)
    out, lse, k_cache, v_cache = out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu()
    # Rows that see no key: output 0 and lse = -inf (or the sink) exactly where the reference has them.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    if dtype == torch.float64:
        assert_close_float64(out, ref_out, "output")
        torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    else:
        low_out, low_lse, _, _ = run_reference(q, k0, v0, kw)
        assert_flash_rule(out, ref_out, low_out, "output")
        assert_flash_rule(lse, ref_lse.float(), low_lse, "lse")

    written = written_rows(case, kw, k_cache.shape)
    k0, v0 = k0.cpu(), v0.cpu()
    assert torch.equal(k_cache[~written], k0[~written]), "k_cache: a row outside the append changed"
    assert torch.equal(v_cache[~written], v0[~written]), "v_cache: a row outside the append changed"
    assert torch.equal(v_cache[written], ref_v[written].to(dtype)), "v_cache: appended rows differ"
    if case.rotary is None:
        assert torch.equal(k_cache[written], ref_k[written].to(dtype)), "k_cache: appended rows differ"
    elif written.any():
        # The kernel rotates in float (double) and rounds once: within a unit of rounding of
        # the operands' size (|cos|, |sin| <= 1) from the exact rotation.
        size = float(kw["k"].abs().max())
        torch.testing.assert_close(k_cache[written].double(), ref_k[written], rtol=0,
                                   atol=2 * torch.finfo(dtype).eps * size)
    return out, lse


# ------------------------------------------------------------------------------ parity

CASES = {
    # decode: one new key per sequence, GQA, cache lengths from 0 to 1000
    "decode_gqa": Case([17, 1000, 0, 300], 1, 1, 8, 2, 64, is_causal=True),
    "decode_paged16_rotary": Case([1, 300, 1000], 1, 1, 4, 1, 80, block_size=16, is_causal=True, rotary=(32, False)),
    "decode_mqa_long": Case([1000], 1, 1, 8, 1, 64, is_causal=True),
    "decode_odd_head_dim": Case([300, 5], 1, 1, 4, 2, 59, is_causal=True),  # D % 8 != 0: the loops' tails
    # no new keys (k = v = None); a sequence with an empty cache sees nothing
    "no_append": Case([0, 1, 17, 300], 1, 0, 4, 4, 64, softcap=30.0),
    "no_append_paged256_rotary": Case([300, 0, 1000], 3, 0, 4, 2, 64, block_size=256, is_causal=True,
                                      rotary=(64, True)),
    # several query rows (speculative decoding, chunked prefill)
    "chunk_paged256_interleaved": Case([1000, 17], 3, 5, 6, 2, 40, block_size=256, is_causal=True,
                                       rotary=(40, True)),
    "chunk_window_rotary": Case([300, 0], 17, 17, 4, 2, 64, is_causal=True, window_size=(32, 0),
                                rotary=(64, False)),
    "window_softcap_sinks_paged16": Case([1000, 17, 1], 3, 3, 8, 2, 80, block_size=16, window_size=(100, 50),
                                         softcap=20.0, sinks=True),
    "noncausal_rotary_q_at_cache_end": Case([17, 300], 3, 1, 4, 1, 64, rotary=(16, True)),
    "prefill_gemm_paged16_sinks": Case([1000, 5], 17, 5, 4, 1, 40, block_size=16, is_causal=True, sinks=True),
}
# Small caches for the emulated device (~1000x slower than a GPU).
QUICK_CASES = {
    "quick_decode_paged16": Case([0, 1, 17], 1, 1, 4, 2, 64, block_size=16, is_causal=True, rotary=(64, False)),
    "quick_chunk_window": Case([17, 5], 3, 3, 2, 1, 40, window_size=(8, 0), softcap=10.0, sinks=True,
                               rotary=(16, True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_parity(kv_device, name, dtype):
    check_case(CASES[name], dtype, kv_device)


@quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(QUICK_CASES))
def test_parity_quick(kv_device, name, dtype):
    check_case(QUICK_CASES[name], dtype, kv_device)


@pytest.mark.parametrize("name", ["decode_paged16_rotary", "chunk_window_rotary", "window_softcap_sinks_paged16",
                                  "prefill_gemm_paged16_sinks"])
def test_parity_float64(name):
    check_case(CASES[name], torch.float64, "cpu")


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_num_splits(kv_device, num_splits):
    """Any number of key splits gives the unsplit result, up to rounding (the lse merge)."""
    case = dataclasses.replace(CASES["window_softcap_sinks_paged16"], num_splits=num_splits)
    check_case(case, torch.float32, kv_device)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_deterministic_across_threads(kv_heads):
    """Key splits are chosen from the shape and merged in order, and a decode call's kv
    heads run as groups: bitwise equal results on any thread count (B * Hkv <= 8 here,
    so the default splits the keys)."""
    case = Case([1000, 300], 1, 1, 8, kv_heads, 64, is_causal=True)
    q, k_cache, v_cache, kw = make_inputs(case, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(),
                                                                  return_lse=True, **kw))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_head_strided_cache_matches_contiguous():
    """A cache whose heads are not side by side ([B, Hkv, S, D] storage seen as [B, S, Hkv, D])
    gives the contiguous cache's result bit for bit: the same sums, read from other addresses."""
    case = Case([17, 1000, 300], 1, 1, 8, 2, 64, is_causal=True)
    q, k_cache, v_cache, kw = make_inputs(case, torch.float32, "cpu")
    expected = tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), return_lse=True, **kw)
    k_strided = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    v_strided = v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_strided.stride(2) != k_cache.stride(2)
    got = tfkernels.flash_attention_with_kvcache(q, k_strided, v_strided, return_lse=True, **kw)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_cache_seqlens_int_and_int64(kv_device):
    """cache_seqlens as a Python int (every sequence) or an int64 tensor: the same as int32."""
    case = Case([17, 17], 1, 1, 4, 2, 64, is_causal=True)
    q, k_cache, v_cache, kw = make_inputs(case, torch.float32, kv_device)
    expected = tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), **kw)
    for lens in (17, kw["cache_seqlens"].long()):
        got = tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), **{**kw,
                                                                                            "cache_seqlens": lens})
        assert torch.equal(got, expected)


def test_block_table_padding_past_the_used_blocks(kv_device):
    """Entries a sequence does not use are never read: -1 padding there is fine."""
    case = Case([17, 1], 1, 1, 2, 1, 40, block_size=16, spare=40)
    q, k_cache, v_cache, kw = make_inputs(case, torch.float32, kv_device)
    expected = tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), **kw)
    table = kw["block_table"].clone()
    table[0, 2:] = -1  # sequence 0 uses 2 blocks (18 rows)
    table[1, 1:] = -1  # sequence 1 uses 1 block
    got = tfkernels.flash_attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), **{**kw, "block_table": table})
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------ bad input
# Every device checks with the same code (csrc/kvcache_args.cpp), so the messages match.

def _good(device):
    # 12 rows per sequence (3 blocks of 4), 9 blocks; rotated positions up to 6 of 14.
    case = Case([3, 5], 2, 2, 4, 2, 8, block_size=4, rotary=(4, False), is_causal=True, spare=5)
    return make_inputs(case, torch.float32, device)


def _direct(q, k_cache, v_cache, kw):
    """The op itself, bypassing the wrapper's conversions and checks."""
    return _ops.flash_attention_kvcache(q, k_cache, v_cache, kw.get("k"), kw.get("v"), kw["cache_seqlens"],
                                        kw.get("block_table"), kw.get("rotary_cos"), kw.get("rotary_sin"),
                                        kw.get("rotary_interleaved", False), kw.get("is_causal", False),
                                        kw.get("scale"), *kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0),
                                        kw.get("sinks"), kw.get("num_splits", 0))


def _strided_last_dim(t):
    return torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]


def _set(name, make):
    """A mutation replacing argument `name` by make(q, k_cache, v_cache, kw)."""
    def mutate(q, k_cache, v_cache, kw):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache)
        value = make(q, k_cache, v_cache, kw)
        if name in args:
            args[name] = value
        else:
            kw = {**kw, name: value}
        return args["q"], args["k_cache"], args["v_cache"], kw
    return mutate


BAD = {
    "q_dtype": (_set("q", lambda q, kc, vc, kw: q.to(torch.int32)), r"q must have dtype in"),
    "q_rank": (_set("q", lambda q, kc, vc, kw: q[0]), r"q must be a 4-D tensor \[B, Sq, H, D\]"),
    "head_dim_257": (lambda q, kc, vc, kw: (torch.randn(*q.shape[:3], 257, device=q.device), kc, vc, kw),
                     r"head dim q\.shape\[3\] must be in \[1, 256\], got 257"),
    "q_last_dim_strided": (_set("q", lambda q, kc, vc, kw: _strided_last_dim(q)), r"q must be contiguous in its last"),
    "k_cache_rank": (_set("k_cache", lambda q, kc, vc, kw: kc[0]), r"k_cache must be a 4-D tensor \[num_blocks"),
    "k_cache_dtype": (_set("k_cache", lambda q, kc, vc, kw: kc.double()), r"k_cache must have the dtype of q"),
    "v_cache_shape": (_set("v_cache", lambda q, kc, vc, kw: vc[:-1]), r"v_cache must have the shape of k_cache"),
    "cache_head_dim": (lambda q, kc, vc, kw: (q, kc[..., :4], vc[..., :4], {**kw, "k": kw["k"][..., :4],
                                                                           "v": kw["v"][..., :4]}),
                       r"k_cache\.shape\[3\] \(head dim, as q\) must be 8"),
    "heads_not_multiple": (_set("q", lambda q, kc, vc, kw: q[:, :, :3]),
                           r"query heads \(q\.shape\[2\] = 3\) must be a multiple of the number of kv heads "
                           r"\(k_cache\.shape\[2\] = 2\)"),
    "cache_strided": (_set("v_cache", lambda q, kc, vc, kw: _strided_last_dim(vc)),
                      r"v_cache must be contiguous in its last"),
    "dense_batch": (lambda q, kc, vc, kw: (q, *(torch.randn(1, 16, 2, 8, device=q.device) for _ in "kv"),
                                           {n: t for n, t in kw.items() if n != "block_table"}),
                    r"k_cache\.shape\[0\] \(batch, as q\) must be 2"),
    "k_without_v": (_set("v", lambda q, kc, vc, kw: None), r"the new k and v must be given together"),
    "k_kv_heads": (_set("k", lambda q, kc, vc, kw: kw["k"][:, :, :1]), r"k\.shape\[2\] \(kv heads, as k_cache\)"),
    "k_dtype": (_set("k", lambda q, kc, vc, kw: kw["k"].double()), r"k must have the dtype of q"),
    "v_seqlen_new": (_set("v", lambda q, kc, vc, kw: kw["v"][:, :1]), r"v\.shape\[1\] \(Snew, as k\) must be 2"),
    "k_strided": (_set("k", lambda q, kc, vc, kw: _strided_last_dim(kw["k"])), r"k must be contiguous in its last"),
    "cache_seqlens_dtype": (_set("cache_seqlens", lambda q, kc, vc, kw: kw["cache_seqlens"].long()),
                            r"cache_seqlens must have dtype int32"),
    "cache_seqlens_shape": (_set("cache_seqlens", lambda q, kc, vc, kw: kw["cache_seqlens"][:1]),
                            r"cache_seqlens must be a 1-D tensor \[B\] with B = 2"),
    "cache_seqlens_negative": (_set("cache_seqlens", lambda q, kc, vc, kw: kw["cache_seqlens"] * 0 - 1),
                               r"cache_seqlens must be >= 0, got cache_seqlens\[0\] = -1"),
    "cache_too_small": (_set("cache_seqlens", lambda q, kc, vc, kw: kw["cache_seqlens"] * 0 + 11),
                        r"the cache is too small for the append: cache_seqlens\[0\] \+ Snew = 11 \+ 2 = 13 rows, "
                        r"but the cache holds 12 \(max_blocks \* block_size"),
    "dense_cache_too_small": (lambda q, kc, vc, kw: (q, *(torch.randn(2, 6, 2, 8, device=q.device) for _ in "kv"),
                                                     {n: t for n, t in kw.items() if n != "block_table"}),
                              r"the cache is too small for the append: cache_seqlens\[1\] \+ Snew = 5 \+ 2 = 7 "
                              r"rows, but the cache holds 6 \(S_cache"),
    "block_table_dtype": (_set("block_table", lambda q, kc, vc, kw: kw["block_table"].long()),
                          r"block_table must have dtype int32"),
    "block_table_shape": (_set("block_table", lambda q, kc, vc, kw: kw["block_table"][:1]),
                          r"block_table must be a 2-D tensor \[B, max_blocks\] with B = 2"),
    "block_table_too_large": (_set("block_table", lambda q, kc, vc, kw: kw["block_table"].index_fill(
        1, torch.tensor([1], device=q.device), kc.shape[0])),
        r"block_table entries must lie in \[0, num_blocks = 9\) \(k_cache\.shape\[0\]\), got block_table\[0\]\[1\] "
        r"= 9"),
    "block_table_negative": (_set("block_table", lambda q, kc, vc, kw: kw["block_table"] * 0 - 1),
                             r"block_table entries must lie in \[0, num_blocks = 9\).*got block_table\[0\]\[0\] = -1"),
    "rotary_cos_without_sin": (_set("rotary_sin", lambda q, kc, vc, kw: None),
                               r"rotary_cos and rotary_sin must be given together"),
    "rotary_dim_too_large": (lambda q, kc, vc, kw: (q, kc, vc, {**kw, "rotary_cos": torch.randn(20, 5, device=q.device),
                                                                "rotary_sin": torch.randn(20, 5, device=q.device)}),
                             r"rotary_dim \(2 \* rotary_cos\.shape\[1\]\) must be even and <= the head dim 8, got 10"),
    "rotary_sin_shape": (_set("rotary_sin", lambda q, kc, vc, kw: kw["rotary_sin"][:, :1]),
                         r"rotary_sin must have the shape of rotary_cos"),
    "rotary_dtype": (_set("rotary_cos", lambda q, kc, vc, kw: kw["rotary_cos"].double()),
                     r"rotary_cos must have the dtype of q"),
    "rotary_too_short": (lambda q, kc, vc, kw: (q, kc, vc, {**kw, "rotary_cos": kw["rotary_cos"][:6],
                                                            "rotary_sin": kw["rotary_sin"][:6]}),
                         r"seqlen_ro = 6 rows \(shape\[0\]\), too few for the largest rotated position 6"),
    "num_splits_negative": (_set("num_splits", lambda q, kc, vc, kw: -1), r"num_splits must be >= 0"),
    "window": (_set("window_size", lambda q, kc, vc, kw: (-2, 0)), r"window_size must be a pair of ints >= -1"),
    "softcap": (_set("softcap", lambda q, kc, vc, kw: -1.0), r"softcap must be a finite number >= 0"),
    "sinks_shape": (_set("sinks", lambda q, kc, vc, kw: torch.zeros(3, device=q.device)),
                    r"sinks must be a 1-D tensor \[H\] with H = 4 \(q\.shape\[2\]\)"),
    "scale": (_set("scale", lambda q, kc, vc, kw: float("inf")), r"scale must be finite"),
}


@quick
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(kv_device, name):
    """The op's own checks (C++) name the argument, the expectation and what came; a call
    that fails leaves the caches exactly as they were (values are checked before any write)."""
    mutate, match = BAD[name]
    q, k_cache, v_cache, kw = _good(kv_device)
    _direct(q, k_cache.clone(), v_cache.clone(), kw)  # the good call works
    q, k_bad, v_bad, kw = mutate(q, k_cache, v_cache, kw)
    k_before, v_before = k_bad.clone(), v_bad.clone()
    with pytest.raises(RuntimeError, match=match):
        _direct(q, k_bad, v_bad, kw)
    assert torch.equal(k_bad, k_before) and torch.equal(v_bad, v_before), "a failing call wrote into the cache"


@quick
def test_bad_wrapper_arguments(kv_device):
    q, k_cache, v_cache, kw = _good(kv_device)
    cases = [
        (dict(cache_seqlens=kw["cache_seqlens"].float()), r"cache_seqlens must be an int or an int32/int64 tensor"),
        (dict(num_splits=-1), r"num_splits must be an int >= 0"),
        (dict(num_splits=1.5), r"num_splits must be an int >= 0"),
        (dict(window_size=(3,)), r"window_size must be a pair of ints"),
        (dict(softcap=float("nan")), r"softcap must be a finite number >= 0"),
        (dict(sinks=torch.zeros(2, 4, device=q.device)), r"sinks must have shape \[H\] = \[4\] \(q\.shape\[2\]\)"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            tfkernels.flash_attention_with_kvcache(q, k_cache, v_cache, **{**kw, **change})


# ------------------------------------------------------------------------------ tracing

def test_fake_kernel_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k_cache, v_cache, kw = _good("cpu")
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k_cache, v_cache))
        fkw = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
        out, lse = _direct(fq, fk, fv, fkw)
        assert out.shape == q.shape and lse.shape == (2, 4, 2) and lse.dtype == torch.float32
        with pytest.raises(RuntimeError, match=r"v\.shape\[1\] \(Snew, as k\) must be 2"):
            _direct(fq, fk, fv, {**fkw, "v": fkw["v"][:, :1]})


def test_torch_compile_smoke():
    """fullgraph compile (aot_eager: fake tensors and functionalization of the in-place append)."""
    case = Case([17, 40], 1, 1, 4, 2, 64, block_size=16, is_causal=True, rotary=(32, False))
    q, k_cache, v_cache, kw = make_inputs(case, torch.float32, "cpu")

    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin):
        return tfkernels.flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                      block_table=block_table, rotary_cos=cos, rotary_sin=sin,
                                                      is_causal=True, return_lse=True)

    args = (kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"], kw["rotary_cos"], kw["rotary_sin"])
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    out, lse = step(q, k_eager, v_eager, *args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out_c, lse_c = compiled(q, k_cache, v_cache, *args)
    assert torch.equal(out_c, out) and torch.equal(lse_c, lse)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager), "the compiled call did not append"


def test_opcheck():
    q, k_cache, v_cache, kw = _good("cpu")
    args = (q, k_cache, v_cache, kw["k"], kw["v"], kw["cache_seqlens"], kw["block_table"], kw["rotary_cos"],
            kw["rotary_sin"], False, True, None, -1, -1, 0.0, None, 0)
    torch.library.opcheck(_ops.flash_attention_kvcache.default, args)
