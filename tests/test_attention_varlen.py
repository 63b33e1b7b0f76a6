"""Packed variable-length attention (issue 16): tfkernels.flash_attention_varlen against
tfkernels.reference.attention_varlen, forward and backward (q, k, v, sinks; through out
and lse), on fresh random batches of 1 to 8 sequences whose lengths mix 0, 1, 17, 300
and 1000, query and key lengths drawn apart.

Precision: the reference runs in float64 (on CPU copies). float64 inputs (CPU) agree to
round-off; float32 and bfloat16 by the FlashAttention rule (docs/ARCHITECTURE.md, Conventions): the kernel's
error is within a small factor of the same reference's error in the input dtype.
Dropout is compared exactly: the test draws the rng_state the wrapper draws from the
same generator, gets the padded keep mask from _dropout_mask and hands it to the
reference (which takes sequence b's corner of entry b, as the kernels count rows and
keys within each sequence).

Devices: "cpu", and the CUDA kernels on "emu" (emulated) and "cuda" (tests/devices.py).
A CUDA device whose build has no varlen kernel yet skips with the missing kernel's
name (detected from the dispatcher and tests/emu_device.OPS). The emulated quick grid
(cases marked emu_quick) keeps to short sequences: emulation is ~1000x slower.
"""
import itertools

import pytest
import torch

import tfkernels
from tfkernels import reference

from . import devices, emu_device
from .attention_cases import no_tf32  # noqa: F401 (an autouse fixture: TF32 off in this file's tests)
from .utils import assert_close_float64, assert_flash_rule

_ops = torch.ops.tfkernels
quick = pytest.mark.emu_quick
LENGTHS = (0, 1, 17, 300, 1000)
_VARLEN_OPS = ("flash_attention_varlen_fwd", "flash_attention_varlen_bwd")


def _missing_kernel(device_name):
    """Why `device_name` cannot run the varlen ops yet (the op without a kernel there), or None."""
    for op in _VARLEN_OPS:
        if device_name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"tfkernels::{op}", "CUDA"):
            return f"tfkernels::{op} has no CUDA kernel in this build yet"
        if device_name == "emu" and not (op in emu_device.OPS and hasattr(torch.ops.tfkernels_emu, op)):
            return f"tfkernels::{op} has no emulated CUDA kernel yet (not in tests/emu_device.OPS)"
    return None


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), *devices.CUDA_DEVICES])
def device(request):
    """(name, torch device): "cpu", "emu" (CPU tensors, CUDA kernels emulated) or "cuda"."""
    with devices.on(request.param) as torch_device:
        why = _missing_kernel(request.param)
        if why:
            pytest.skip(why)
        yield request.param, torch_device


# ------------------------------------------------------------------------------ helpers

def _cu(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _draw_lengths(batch, choices=LENGTHS):
    """`batch` lengths drawn from `choices` (the test's seeded torch RNG), at most one 1000."""
    lengths = [choices[int(i)] for i in torch.randint(len(choices), (batch,))]
    while lengths.count(1000) > 1:
        lengths[lengths.index(1000)] = 300
    return lengths


def _inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, device):
    return (torch.randn(sum(lens_q), heads, head_dim, dtype=dtype, device=device),
            torch.randn(sum(lens_k), kv_heads, head_dim, dtype=dtype, device=device),
            torch.randn(sum(lens_k), kv_heads, head_dim, dtype=dtype, device=device))


def _sinks(heads, device):
    # float32 values (what the kernel computes with), so the float64 reference sees the same ones.
    return (torch.randn(heads) * 1.5).to(device)


def _rng_state(seed, device):
    """The rng_state flash_attention_varlen draws from a generator seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=gen)


def _sees_a_key(lens_q, lens_k, heads, kwargs):
    """bool [H, total_q]: the rows that see at least one key."""
    rows = [reference.attention_mask(lq, lk, is_causal=kwargs.get("is_causal", False),
                                     causal_alignment=kwargs.get("causal_alignment", "top_left"),
                                     window_size=kwargs.get("window_size", (-1, -1)))[0, 0].expand(lq, lk).any(-1)
            for lq, lk in zip(lens_q, lens_k)]
    return torch.cat([torch.zeros(0, dtype=torch.bool), *rows]).expand(heads, -1)


def _run(fn, args, q, k, v, sinks, grad_out, grad_lse, **kwargs):
    """out, lse and the gradients (dq, dk, dv[, dsinks]) of fn(q, k, v, *args, ...)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if sinks is not None:
        sinks = sinks.detach().clone().requires_grad_(True)
        leaves.append(sinks)
    out, lse = fn(*leaves[:3], *args, sinks=sinks, return_lse=True, **kwargs)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    return out.detach(), lse.detach(), torch.autograd.grad(outputs, leaves, grads)


def check_parity(lens_q, lens_k, q, k, v, sinks=None, *, seed=0, through_lse=True, **kwargs):
    """The kernel against the reference: float64 to round-off, 32/16-bit by the FlashAttention rule."""
    dtype, device = q.dtype, q.device
    heads = q.shape[1]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    sees = _sees_a_key(lens_q, lens_k, heads, kwargs)
    grad_out = torch.randn_like(q)
    grad_lse = None
    if through_lse:  # 0 where lse is -inf (no key and no sink)
        grad_lse = torch.randn(heads, q.shape[0]) * (sees if sinks is None else 1)
        grad_lse = grad_lse.to(device)
    ref_kwargs = dict(kwargs)
    if kwargs.get("dropout_p", 0) > 0:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
        ref_kwargs["dropout_mask"] = _ops._dropout_mask(_rng_state(seed, device), len(lens_q), heads, max_q, max_k,
                                                        kwargs["dropout_p"]).cpu()
    out, lse, grads = _run(tfkernels.flash_attention_varlen, (cu_q, cu_k, max_q, max_k), q, k, v, sinks, grad_out,
                           grad_lse, **kwargs)

    def on_cpu(t, to=None):
        return None if t is None else t.detach().to("cpu", to or t.dtype)

    cu = (on_cpu(cu_q), on_cpu(cu_k))
    hp = [on_cpu(t, torch.float64) for t in (q, k, v, sinks, grad_out)]
    ref_out, ref_lse, ref_grads = _run(reference.attention_varlen, cu, *hp[:4], hp[4], on_cpu(grad_lse), **ref_kwargs)
    out, lse, grads = on_cpu(out), on_cpu(lse), [on_cpu(g) for g in grads]

    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0])
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
    if sinks is None:
        assert torch.equal(torch.isneginf(lse), ~sees) and torch.equal(torch.isneginf(ref_lse), ~sees)
    else:  # a row without keys has its head's sink as lse
        assert torch.equal(lse[~sees], sinks.detach().cpu().view(-1, 1).expand_as(lse)[~sees])
    assert (out.transpose(0, 1)[~sees] == 0).all()
    names = ("dq", "dk", "dv")
    if dtype == torch.float64:
        assert_close_float64(out, ref_out, "output")
        torch.testing.assert_close(lse, ref_lse.float(), rtol=2e-6, atol=2e-6)
        for g, r, name in zip(grads[:3], ref_grads[:3], names):
            assert_close_float64(g, r, name)
    else:
        low = [on_cpu(t) for t in (q, k, v, sinks, grad_out)]
        low_out, low_lse, low_grads = _run(reference.attention_varlen, cu, *low[:4], low[4], on_cpu(grad_lse),
                                           **ref_kwargs)
        assert_flash_rule(out, ref_out, low_out, "output", eps_ulps=2)
        assert_flash_rule(lse, ref_lse.float(), low_lse, "lse", eps_ulps=2)
        # A row with one visible key has dS = 0 exactly in the reference (autograd's softmax
        # backward cancels) but not in a flash kernel, which takes Delta = rowsum(dO * O):
        # the wider fp32 epsilon admits that difference (as tests/test_attention_variants.py).
        grad_ulps = 32 if dtype == torch.float32 else 4
        for g, r, lo, name in zip(grads[:3], ref_grads[:3], low_grads[:3], names):
            assert_flash_rule(g, r, lo, name, factor=4.0, eps_ulps=grad_ulps)
    if sinks is not None:
        torch.testing.assert_close(grads[3].double(), ref_grads[3], rtol=2e-5 if dtype == torch.float64 else 2e-2,
                                   atol=2e-5 if dtype == torch.float64 else 2e-2 * float(ref_grads[3].abs().max()))
    return out, lse, grads


# ------------------------------------------------------------------------------ the grid

FULL, CAUSAL_TL, CAUSAL_BR = dict(), dict(is_causal=True), dict(is_causal=True, causal_alignment="bottom_right")
# (batch, heads, kv_heads, head_dim, self-attention (len_k = len_q), mask, dtype): each axis
# covered along the cases rather than as a product (the reference dominates the time).
MIXED = [
    pytest.param((1, 2, 2, 64, True, FULL, torch.float32), id="b1-d64-full-fp32"),
    pytest.param((3, 4, 2, 40, False, CAUSAL_TL, torch.bfloat16), id="b3-d40-gqa-causal_tl-bf16"),
    pytest.param((5, 3, 1, 80, True, CAUSAL_BR, torch.float32), id="b5-d80-mqa-causal_br-fp32"),
    pytest.param((8, 2, 1, 64, False, CAUSAL_BR, torch.bfloat16), id="b8-d64-mqa-causal_br-bf16"),
    pytest.param((8, 2, 1, 40, True, CAUSAL_TL, torch.float32), id="b8-d40-mqa-causal_tl-fp32"),
    pytest.param((4, 2, 2, 80, False, FULL, torch.bfloat16), id="b4-d80-full-bf16"),
    pytest.param((6, 4, 2, 64, False, CAUSAL_TL, torch.float32), id="b6-d64-gqa-causal_tl-fp32"),
    pytest.param((2, 2, 1, 40, False, CAUSAL_BR, torch.bfloat16), id="b2-d40-mqa-causal_br-bf16"),
]


@pytest.mark.parametrize("case", MIXED)
def test_parity_mixed_lengths(device, case):
    _, torch_device = device
    count, heads, kv_heads, head_dim, self_attention, mask, dtype = case
    lens_q = _draw_lengths(count)
    lens_k = lens_q if self_attention else _draw_lengths(count)
    q, k, v = _inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, torch_device)
    check_parity(lens_q, lens_k, q, k, v, **mask)


def _variant(name, heads, device):
    """(sinks, kwargs) of a variant."""
    return {
        "window": (None, dict(window_size=(40, 7))),
        "window_causal": (None, dict(window_size=(100, 0), is_causal=True)),
        "softcap": (None, dict(softcap=2.0, scale=0.5)),
        "sinks": (_sinks(heads, device), {}),
        "dropout": (None, dict(dropout_p=0.3)),
        "all": (_sinks(heads, device), dict(window_size=(30, 5), is_causal=True, softcap=2.5, dropout_p=0.2)),
    }[name]


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("variant", ["window", "window_causal", "softcap", "sinks", "dropout", "all"])
def test_parity_variants(device, variant, alignment):
    name, torch_device = device
    lens_q, lens_k = [300, 0, 17, 1, 120], [290, 17, 0, 1, 300]
    sinks, kwargs = _variant(variant, 2, torch_device)
    dtype = torch.float64 if name == "cpu" else torch.float32
    q, k, v = _inputs(lens_q, lens_k, 2, 1, 64, dtype, torch_device)
    check_parity(lens_q, lens_k, q, k, v, sinks, seed=5, causal_alignment=alignment, **kwargs)


@quick
@pytest.mark.parametrize("variant", ["window_causal", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_small(device, dtype, variant):
    """Short sequences (the emulated quick grid): zero lengths, q and k lengths apart, GQA."""
    _, torch_device = device
    lens_q, lens_k = [17, 0, 1, 40, 5], [30, 3, 0, 40, 1]
    sinks, kwargs = _variant(variant, 4, torch_device)
    kwargs["window_size"] = (9, 2)
    q, k, v = _inputs(lens_q, lens_k, 4, 2, 40, dtype, torch_device)
    check_parity(lens_q, lens_k, q, k, v, sinks, seed=2, causal_alignment="bottom_right", **kwargs)


@quick
def test_gradient_through_output_only(device):
    _, torch_device = device
    lens = [33, 1, 0, 20]
    q, k, v = _inputs(lens, lens, 2, 1, 80, torch.float32, torch_device)
    check_parity(lens, lens, q, k, v, through_lse=False, is_causal=True)


def test_float64_to_round_off():
    lens_q, lens_k = [1000, 17, 0, 1], [300, 1000, 17, 0]
    q, k, v = _inputs(lens_q, lens_k, 2, 1, 40, torch.float64, "cpu")
    check_parity(lens_q, lens_k, q, k, v, is_causal=True, causal_alignment="bottom_right")


def test_strided_packed_qkv(device):
    """q, k, v as views of one packed [total, 3, H, D] projection (rows 3 H D apart): read in place."""
    _, torch_device = device
    lens = [17, 300, 1]
    qkv = torch.randn(sum(lens), 3, 4, 64, device=torch_device)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    check_parity(lens, lens, q, k, v, is_causal=True)


# ------------------------------------------------------------------------------ semantics

@quick
def test_empty_sequences_and_batch(device):
    """B = 0, and sequences without queries or keys: out 0, lse -inf (the sink with sinks), zero gradients."""
    _, torch_device = device
    q, k, v = _inputs([], [], 2, 1, 16, torch.float32, torch_device)
    cu = _cu([], torch_device)
    out, lse = tfkernels.flash_attention_varlen(q, k, v, cu, cu, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)

    lens_q, lens_k = [0, 5, 3], [4, 0, 2]
    q, k, v = (t.requires_grad_() for t in _inputs(lens_q, lens_k, 2, 1, 16, torch.float32, torch_device))
    sinks = _sinks(2, torch_device)
    out, lse = tfkernels.flash_attention_varlen(q, k, v, _cu(lens_q, torch_device), _cu(lens_k, torch_device), 5, 4,
                                                sinks=sinks, return_lse=True)
    assert (out[:5] == 0).all() and torch.equal(lse[:, :5], sinks.view(2, 1).expand(2, 5))
    dq, dk, dv = torch.autograd.grad(out[:5].sum() + out[5:].sum(), [q, k, v])
    assert (dq[:5] == 0).all() and (dk[:4] == 0).all() and (dv[:4] == 0).all()
    assert dk[4:].abs().sum() > 0

    # No key in any sequence: every lse is its head's sink, and d sink is the sum of grad_lse.
    q = torch.randn(6, 2, 16, device=torch_device, requires_grad=True)
    k = v = torch.randn(0, 1, 16, device=torch_device)
    sinks = sinks.clone().requires_grad_()
    out, lse = tfkernels.flash_attention_varlen(q, k, v, _cu([2, 4], torch_device), _cu([0, 0], torch_device), 4, 0,
                                                sinks=sinks, return_lse=True)
    grad_lse = torch.randn_like(lse)
    dq, dsinks = torch.autograd.grad((out, lse), [q, sinks], (torch.randn_like(out), grad_lse))
    assert (out == 0).all() and (dq == 0).all() and torch.equal(lse, sinks.detach().view(2, 1).expand(2, 6))
    torch.testing.assert_close(dsinks, grad_lse.sum(1))


def test_dropout_matches_the_padded_op():
    """Varlen with dropout draws what the padded op draws for batch entry b on the same data:
    the valid rows of the padded op's output (top-left causal, seqlens_k) equal varlen's."""
    lens_q, lens_k = [40, 0, 17, 64], [50, 9, 17, 30]
    heads, head_dim, max_q, max_k = 2, 32, max(lens_q), max(lens_k)
    q, k, v = _inputs(lens_q, lens_k, heads, heads, head_dim, torch.float64, "cpu")
    kwargs = dict(is_causal=True, dropout_p=0.4)
    out = tfkernels.flash_attention_varlen(q, k, v, _cu(lens_q, "cpu"), _cu(lens_k, "cpu"), max_q, max_k,
                                           generator=torch.Generator().manual_seed(9), **kwargs)

    def padded(t, lens, rows):
        pieces = t.split(lens)
        return torch.stack([torch.cat([p, p.new_zeros(rows - len(p), *p.shape[1:])]) for p in pieces]).transpose(1, 2)

    out_padded = tfkernels.flash_attention(padded(q, lens_q, max_q), padded(k, lens_k, max_k),
                                           padded(v, lens_k, max_k), seqlens_k=torch.tensor(lens_k),
                                           generator=torch.Generator().manual_seed(9), **kwargs)
    valid = torch.cat([o.transpose(0, 1)[:n] for o, n in zip(out_padded, lens_q)])
    torch.testing.assert_close(out, valid, rtol=1e-12, atol=1e-12)


def test_backward_is_deterministic():
    """Bitwise-equal results across runs: GQA (dK, dV summed over query heads), one long
    sequence among short ones (split into key chunks whose dQ partials are summed)."""
    lens_q, lens_k = [1000, 17, 0, 300], [1000, 5, 3, 300]
    q, k, v = _inputs(lens_q, lens_k, 2, 1, 64, torch.float32, "cpu")
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    grad_out, grad_lse = torch.randn_like(q), torch.randn(2, q.shape[0])
    sinks = _sinks(2, "cpu")

    def run():
        return _run(tfkernels.flash_attention_varlen, (cu_q, cu_k, 1000, 1000), q, k, v, sinks, grad_out, grad_lse,
                    is_causal=True, softcap=4.0)

    first = run()
    for again in (run(), run()):
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        for g, g0 in zip(again[2], first[2]):
            assert torch.equal(g, g0)


def test_gradcheck():
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    q, k, v = (t.requires_grad_() for t in _inputs(lens_q, lens_k, 2, 1, 4, torch.float64, "cpu"))
    sinks = _sinks(2, "cpu").double().requires_grad_()
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")

    def fn(q, k, v, sinks):
        return tfkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, is_causal=True,
                                                causal_alignment="bottom_right", softcap=3.0, sinks=sinks)

    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, sinks.detach()), (q, k, v), fast_mode=True)
    # sinks are float32 in the kernel: a larger step and tolerance for them.
    assert torch.autograd.gradcheck(fn, (q, k, v, sinks), eps=1e-3, atol=1e-3, rtol=1e-3, fast_mode=True)


# ------------------------------------------------------------------------------ bad input

def _good(device):
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    q, k, v = _inputs(lens_q, lens_k, 4, 2, 8, torch.float32, device)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device), 5, 6


def _fwd(q, k, v, cu_q, cu_k, max_q, max_k):
    return _ops.flash_attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, False, "top_left", None, False, -1, -1,
                                           0.0, None, 0.0, None)


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, d: {3: a[3].long()}, r"cu_seqlens_q must have dtype int32, got Long"),
        (lambda a, d: {4: a[4].float()}, r"cu_seqlens_k must have dtype int32, got Float"),
        (lambda a, d: {3: a[3].view(1, -1)}, r"cu_seqlens_q must be a 1-D tensor \[B \+ 1\] .*got 2-D"),
        (lambda a, d: {4: _int32([], d)}, r"cu_seqlens_k must be a 1-D tensor \[B \+ 1\] .*got 1-D \[0\]"),
        (lambda a, d: {4: a[4][:3]}, r"cu_seqlens_k must have the length of cu_seqlens_q \(B \+ 1 = 4\), got 3"),
        (lambda a, d: {3: _int32([1, 3, 3, 8], d)}, r"cu_seqlens_q\[0\] must be 0, got 1"),
        (lambda a, d: {4: _int32([0, 4, 3, 12], d)},
         r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[2\] = 3 < cu_seqlens_k\[1\] = 4"),
        (lambda a, d: {3: _int32([0, 3, 3, 7], d)},
         r"cu_seqlens_q\[-1\] must be the number of rows of q \(q.shape\[0\]\) = 8, got cu_seqlens_q\[3\] = 7"),
        (lambda a, d: {4: _int32([0, 4, 6, 13], d), 6: 7},
         r"cu_seqlens_k\[-1\] must be the number of rows of k \(k.shape\[0\]\) = 12, got cu_seqlens_k\[3\] = 13"),
        (lambda a, d: {5: 4}, r"sequence 2 is longer than max_seqlen_q = 4: cu_seqlens_q\[3\] - cu_seqlens_q\[2\] = 5"),
        (lambda a, d: {6: 5}, r"sequence 2 is longer than max_seqlen_k = 5"),
        (lambda a, d: {5: -1}, r"max_seqlen_q must be >= 0, got -1"),
        (lambda a, d: {6: -2}, r"max_seqlen_k must be >= 0, got -2"),
        (lambda a, d: {0: a[0].unsqueeze(0)}, r"q must be a 3-D tensor \[total_q, H, D\]"),
        (lambda a, d: {1: a[1][0]}, r"k must be a 3-D tensor \[total_k, Hkv, D\]"),
        (lambda a, d: {2: a[2].double()}, r"v must have the dtype of q"),
        (lambda a, d: {1: a[1][..., :4]}, r"k\.shape\[2\] \(head dim, as q\) must be 8"),
        (lambda a, d: {2: a[2][:5]}, r"v\.shape\[0\] \(total_k, as k\) must be 12"),
        (lambda a, d: {0: a[0][:, :3]}, r"query heads \(q\.shape\[1\] = 3\) must be a multiple of the number of kv "
                                        r"heads \(k\.shape\[1\] = 2\)"),
        (lambda a, d: {0: torch.randn(8, 4, 16, device=d)[..., ::2]}, r"q must be contiguous in its last dim"),
    ],
    ids=["cu_q_int64", "cu_k_float", "cu_q_2d", "cu_k_empty", "cu_lengths_differ", "cu_q_start", "cu_k_decreasing",
         "cu_q_total", "cu_k_total", "max_q_short", "max_k_short", "max_q_negative", "max_k_negative", "q_rank",
         "k_rank", "v_dtype", "k_head_dim", "v_total", "heads_not_multiple", "q_last_dim_strided"],
)
@quick
def test_bad_arguments(device, mutate, match):
    _, torch_device = device
    args = list(_good(torch_device))
    _fwd(*args)  # the good call works
    for i, value in mutate(args, torch_device).items():
        args[i] = value
    with pytest.raises(RuntimeError, match=match):
        _fwd(*args)


@quick
def test_bad_backward_arguments(device):
    _, torch_device = device
    q, k, v, cu_q, cu_k, max_q, max_k = _good(torch_device)
    out, lse = _fwd(q, k, v, cu_q, cu_k, max_q, max_k)
    attrs = (False, "top_left", None, False, -1, -1, 0.0, None, 0.0, None)

    def bwd(grad_out=torch.randn_like(out), grad_lse=None, out=out, lse=lse, cu_q=cu_q):
        return _ops.flash_attention_varlen_bwd(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                               *attrs)

    bwd()  # the good call works
    with pytest.raises(RuntimeError, match=r"grad_out must have the shape of q"):
        bwd(grad_out=out[:3])
    with pytest.raises(RuntimeError, match=r"out must have the dtype of q"):
        bwd(out=out.double())
    with pytest.raises(RuntimeError, match=r"lse must be float32 \[H, total_q\] = \[4, 8\]"):
        bwd(lse=lse.t().contiguous())
    with pytest.raises(RuntimeError, match=r"grad_lse must be float32 of the shape of lse"):
        bwd(grad_lse=torch.randn(4, 7, device=torch_device))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must be non-decreasing"):
        bwd(cu_q=_int32([0, 3, 2, 8], torch_device))


def test_bad_wrapper_arguments():
    q, k, v, cu_q, cu_k, max_q, max_k = _good("cpu")
    with pytest.raises(ValueError, match=r"max_seqlen_q must be an int, got Tensor"):
        tfkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, torch.tensor(max_q), max_k)
    with pytest.raises(ValueError, match=r"causal_alignment must be one of"):
        tfkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, causal_alignment="x")
    with pytest.raises(ValueError, match=r"window_size must be a pair of ints"):
        tfkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"sinks must have shape \[H\] = \[4\] \(q.shape\[1\]\), got \[3\]"):
        tfkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, sinks=torch.zeros(3))


# ------------------------------------------------------------------------------ opcheck, compile, autocast

def _op_args(device, variants):
    q, k, v, cu_q, cu_k, max_q, max_k = _good(device)
    if variants:
        rest = (True, "bottom_right", 0.4, True, 3, 1, 2.0, _sinks(4, device), 0.25, _rng_state(1, device))
    else:
        rest = (False, "top_left", None, False, -1, -1, 0.0, None, 0.0, None)
    return (q, k, v, cu_q, cu_k, max_q, max_k, *rest)


@quick
@pytest.mark.parametrize("variants", [False, True], ids=["plain", "variants"])
def test_opcheck(device, variants):
    _, torch_device = device
    args = _op_args(torch_device, variants)
    leaves = [a.requires_grad_() if i in (0, 1, 2, 14) and a is not None else a for i, a in enumerate(args)]
    torch.library.opcheck(_ops.flash_attention_varlen_fwd.default, tuple(leaves))
    args = _op_args(torch_device, variants)
    out, lse = _ops.flash_attention_varlen_fwd(*args)
    torch.library.opcheck(_ops.flash_attention_varlen_bwd.default,
                          (torch.randn_like(out), torch.randn_like(lse), *args[:3], out, lse, *args[3:]))


def test_compile_fullgraph():
    lens = [17, 0, 33]
    q, k, v = (t.requires_grad_() for t in _inputs(lens, lens, 4, 2, 16, torch.float32, "cpu"))
    cu = _cu(lens, "cpu")

    def attention(q, k, v):
        return tfkernels.flash_attention_varlen(q, k, v, cu, cu, 33, 33, is_causal=True, window_size=(8, 0),
                                                softcap=3.0)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    grads = torch.autograd.grad(got.sum(), [q, k, v])
    expected = attention(q, k, v)
    expected_grads = torch.autograd.grad(expected.sum(), [q, k, v])
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_autocast():
    lens = [17, 5]
    q, k, v = _inputs(lens, lens, 2, 2, 32, torch.float32, "cpu")
    sinks = _sinks(2, "cpu")
    cu = _cu(lens, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tfkernels.flash_attention_varlen(q, k, v, cu, cu, 17, 17, sinks=sinks, is_causal=True)
    assert out.dtype == torch.bfloat16
    expected = reference.attention_varlen(*(t.bfloat16().double() for t in (q, k, v)), cu, cu, sinks=sinks.double(),
                                          is_causal=True, return_lse=False)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
