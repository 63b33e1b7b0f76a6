"""Attention variants (issue 15): sliding window, softcap, sinks, dropout.

Every case runs tfkernels.flash_attention forward and backward (gradients of q,
k, v, sinks, through out and lse) and compares with tfkernels.reference on fresh
random data: in float64 to round-off on the CPU, in the lower precisions by the
FlashAttention rule. Dropout is compared exactly: the test draws the same
rng_state the wrapper draws from the same generator state, gets the keep mask from
the test-only op _dropout_mask and hands it to the reference.

Devices: "cpu", and the CUDA kernels on "emu" (emulated) and "cuda". Until the
CUDA kernels have the variants they raise "not yet supported on CUDA": those
cases skip with that reason.
"""
import math

import pytest
import torch

import tfkernels
from tfkernels import reference

from . import devices
from .utils import assert_close_float64, assert_flash_rule

_ops = torch.ops.tfkernels
DEVICES = [pytest.param("cpu", id="cpu"), *devices.CUDA_DEVICES]
quick = pytest.mark.emu_quick
# fp16 runs the same variant code as bf16 (only the 16-bit conversions differ): the
# emulated device's quick grid keeps bf16 (test_attention covers fp16's kernels).
FP16_FULL_GRID = pytest.param(torch.float16, marks=pytest.mark.emu_full, id=str(torch.float16))


@pytest.fixture(params=DEVICES)
def device(request):
    """(name, torch device): "cpu", "emu" (CPU tensors, CUDA kernels emulated) or "cuda"."""
    with devices.on(request.param) as torch_device:
        yield request.param, torch_device


# ------------------------------------------------------------------------------ helpers

def _inputs(shape, dtype, device):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    return (torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype, device=device),
            torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device),
            torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device))


def _sinks(heads, device):
    # float32 values (what the kernel computes with), so the float64 reference sees the same ones.
    return (torch.randn(heads) * 1.5).to(device)


def _rng_state(seed, device):
    """The rng_state flash_attention draws from a generator seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=gen)


def _run(fn, q, k, v, sinks, grad_out, grad_lse, **kwargs):
    """out, lse and the gradients (dq, dk, dv, dsinks) of fn."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    inputs = [q, k, v]
    if sinks is not None:
        sinks = sinks.detach().clone().requires_grad_(True)
        inputs.append(sinks)
    out, lse = fn(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    got = torch.autograd.grad(outputs, inputs, grads)
    return out.detach(), lse.detach(), got


def _sees_a_key(q, k, kwargs):
    mask = reference.attention_mask(q.shape[2], k.shape[2], batch=q.shape[0], is_causal=kwargs.get("is_causal", False),
                                    causal_alignment=kwargs.get("causal_alignment", "top_left"),
                                    seqlens_k=kwargs.get("seqlens_k"), window_size=kwargs.get("window_size", (-1, -1)))
    return mask.any(-1).expand(q.shape[:3]).to(q.device)


def check_parity(q, k, v, sinks=None, *, seed=0, through_lse=True, **kwargs):
    """Kernel against the reference: float64 to round-off, 16/32-bit by the FlashAttention rule."""
    dtype, device = q.dtype, q.device
    sees = _sees_a_key(q, k, kwargs)
    grad_out = torch.randn_like(q)
    # The gradient of lse: 0 where lse is -inf (no key and no sink).
    grad_lse = None
    if through_lse:
        grad_lse = torch.randn(q.shape[:3], device=device)
        if sinks is None:
            grad_lse = grad_lse * sees
    ref_kwargs = dict(kwargs)
    if kwargs.get("dropout_p", 0) > 0:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
        ref_kwargs["dropout_mask"] = _ops._dropout_mask(_rng_state(seed, device), q.shape[0], q.shape[1], q.shape[2],
                                                        k.shape[2], kwargs["dropout_p"]).cpu()
    out, lse, grads = _run(tfkernels.flash_attention, q, k, v, sinks, grad_out, grad_lse, **kwargs)

    def on_cpu(t, to=None):
        return None if t is None else t.detach().to("cpu", to or t.dtype)

    hp = [on_cpu(t, torch.float64) for t in (q, k, v, sinks, grad_out)]
    ref_kwargs = {n: (on_cpu(t) if isinstance(t, torch.Tensor) else t) for n, t in ref_kwargs.items()}
    ref_out, ref_lse, ref_grads = _run(reference.flash_attention, *hp[:4], hp[4], on_cpu(grad_lse), **ref_kwargs)
    out, lse, grads = on_cpu(out), on_cpu(lse), [on_cpu(g) for g in grads]

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    sees = sees.cpu()
    if sinks is None:
        assert torch.equal(torch.isneginf(lse), ~sees) and torch.equal(torch.isneginf(ref_lse), ~sees)
    else:  # an empty row's lse is its head's sink
        empty_lse = lse.masked_select(~sees)
        sink_rows = sinks.detach().cpu().view(1, -1, 1).expand(q.shape[:3]).masked_select(~sees)
        assert torch.equal(empty_lse, sink_rows)
    assert (out[~sees] == 0).all()
    names = ("dq", "dk", "dv", "dsinks")
    if dtype == torch.float64:
        assert_close_float64(out, ref_out, "output")
        torch.testing.assert_close(lse, ref_lse.float(), rtol=2e-6, atol=2e-6)
        for g, r, name in zip(grads[:3], ref_grads[:3], names):
            assert_close_float64(g, r, name)
    else:
        low = [on_cpu(t) for t in (q, k, v, sinks, grad_out)]
        low_out, low_lse, low_grads = _run(reference.flash_attention, *low[:4], low[4], on_cpu(grad_lse), **ref_kwargs)
        assert_flash_rule(out, ref_out, low_out, "output", eps_ulps=2)
        assert_flash_rule(lse, ref_lse.float(), low_lse, "lse", eps_ulps=2)
        # fp32 (the CUDA kernels): a row with one visible key has dS = P (dP - delta) = 0
        # exactly in the reference (autograd's softmax backward cancels), while a flash
        # kernel takes dP and delta = rowsum(dO * O) from two different fp32 sums; their
        # difference (~sqrt(D) ulps of |dO| |v|) is what the wider epsilon admits.
        grad_ulps = 32 if dtype == torch.float32 else 4
        for g, r, lo, name in zip(grads[:3], ref_grads[:3], low_grads[:3], names):
            assert_flash_rule(g, r, lo, name, factor=4.0, eps_ulps=grad_ulps)
    if sinks is not None:
        # float32 by the kernel (a sum over B * Sq rows), then cast to the sinks' dtype.
        torch.testing.assert_close(grads[3].double(), ref_grads[3], rtol=2e-5 if dtype == torch.float64 else 2e-2,
                                   atol=2e-5 if dtype == torch.float64 else 2e-2 * float(ref_grads[3].abs().max()))


# ------------------------------------------------------------------------------ the grid

# (B, H, Hkv, Sq, Sk, D): S 1, 17, 113, 1000; D 40..256; Sq != Sk both ways; GQA.
SHAPES = [
    pytest.param((2, 2, 1, 1, 1, 40), id="s1-d40", marks=quick),
    pytest.param((2, 4, 2, 17, 17, 80), id="s17-d80-gqa", marks=quick),
    pytest.param((1, 2, 2, 113, 113, 64), id="s113-d64"),
    pytest.param((2, 3, 1, 17, 113, 128), id="sq17-sk113-d128-mqa"),
    pytest.param((2, 2, 2, 113, 17, 256), id="sq113-sk17-d256"),
    pytest.param((1, 2, 1, 1000, 1000, 64), id="s1000-d64-mqa"),
]


def _window(seqlen_k):
    # A band narrower than a key tile on long sequences (tiles outside it are skipped).
    return (max(1, seqlen_k // 8), seqlen_k // 16)


def _lens(batch, seqlen_k, device):
    lens = torch.randint(0, seqlen_k + 1, (batch,))
    lens[0] = seqlen_k
    if batch > 1:
        lens[1] = min(seqlen_k, 1)
    return lens.to(device)


def _variant(name, shape, device):
    """(sinks, kwargs) of a variant for a shape."""
    batch, heads, _, _, seqlen_k, _ = shape
    window = dict(window_size=_window(seqlen_k))
    causal_seqlens = dict(is_causal=True, seqlens_k=_lens(batch, seqlen_k, device))
    return {
        "window": (None, window),
        "softcap": (None, dict(softcap=2.0, scale=0.5)),
        "sinks": (_sinks(heads, device), {}),
        "dropout": (None, dict(dropout_p=0.3)),
        "window_causal_seqlens": (None, {**window, **causal_seqlens}),
        "softcap_sinks": (_sinks(heads, device), dict(softcap=3.0)),
        "all": (_sinks(heads, device), {**window, **causal_seqlens, "softcap": 2.5, "dropout_p": 0.2}),
    }[name]


VARIANTS = ["window", "softcap", "sinks", "dropout", "window_causal_seqlens", "softcap_sinks", "all"]


def _dtype_for(device_name):
    return torch.float64 if device_name == "cpu" else torch.float32


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity(device, variant, shape, alignment):
    name, torch_device = device
    sinks, kwargs = _variant(variant, shape, torch_device)
    q, k, v = _inputs(shape, _dtype_for(name), torch_device)
    check_parity(q, k, v, sinks, causal_alignment=alignment, **kwargs)


@quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP16_FULL_GRID], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_low_precision(device, variant, dtype):
    _, torch_device = device
    shape = (2, 4, 2, 77, 129, 64)
    sinks, kwargs = _variant(variant, shape, torch_device)
    q, k, v = _inputs(shape, dtype, torch_device)
    check_parity(q, k, v, sinks, causal_alignment="bottom_right", **kwargs)


@pytest.mark.parametrize("window", [(0, 0), (-1, 3), (3, -1), (2, 5), (0, -1), (10**12, 10**12)],
                         ids=["diagonal", "right_only", "left_only", "band", "left0", "huge"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_window_shapes(device, window, is_causal, alignment):
    name, torch_device = device
    q, k, v = _inputs((2, 2, 1, 37, 53, 40), _dtype_for(name), torch_device)
    check_parity(q, k, v, window_size=window, is_causal=is_causal, causal_alignment=alignment,
                 seqlens_k=torch.tensor([53, 20], device=torch_device))


def test_window_long_sequence_gqa(device):
    """Several key tiles inside the band and many outside it, partial last tiles."""
    name, torch_device = device
    if name != "cpu":
        pytest.skip("a long case, CPU only (the grid covers S = 1000 on the CUDA devices)")
    q, k, v = _inputs((1, 4, 2, 1500, 1900, 64), torch.float64, torch_device)
    check_parity(q, k, v, window_size=(700, 300), is_causal=True, causal_alignment="bottom_right")


@quick
def test_gradient_through_output_only(device):
    name, torch_device = device
    q, k, v = _inputs((2, 4, 2, 50, 70, 64), _dtype_for(name), torch_device)
    check_parity(q, k, v, _sinks(4, torch_device), through_lse=False, window_size=(9, 4), softcap=4.0,
                 dropout_p=0.25)


# ------------------------------------------------------------------------------ gradcheck (CPU, float64)

@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    shape = (2, 2, 1, 5, 7, 4)
    sinks, kwargs = _variant(variant, shape, "cpu")
    q, k, v = (t.requires_grad_() for t in _inputs(shape, torch.float64, "cpu"))
    inputs = [q, k, v]
    if sinks is not None:
        inputs.append(sinks.double().requires_grad_())

    def fn(*args):
        if kwargs.get("dropout_p", 0) > 0:  # the same mask on every call
            kwargs["generator"] = torch.Generator().manual_seed(7)
        sinks_arg = args[3] if len(args) > 3 else None
        return tfkernels.flash_attention(*args[:3], sinks=sinks_arg, return_lse=True, **kwargs)

    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, *inputs[3:])[0], inputs[:3], fast_mode=True)
    # The kernels use sinks (and lse) in float32: larger steps and tolerances for them;
    # rows without keys (lse -inf) excluded.
    loose = dict(eps=1e-3, atol=1e-3, rtol=1e-3, fast_mode=True)
    if sinks is not None:
        assert torch.autograd.gradcheck(lambda *t: fn(*t)[0], inputs, **loose)

    def finite_lse(*t):
        lse = fn(*t)[1].double()
        return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(finite_lse, inputs, **loose)


# ------------------------------------------------------------------------------ dropout

def test_dropout_mask_known_answer():
    """Philox4x32-10 with key 0 and counter 0 (Random123's known answer) decides keys 0..3 of
    row 0 of slice 0 for rng_state (0, 0): key t is kept iff word t >= floor(p * 2^32)."""
    words = [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    state = torch.zeros(2, dtype=torch.int64)
    for t, word in enumerate(words):
        p = float(torch.tensor(word / 2**32, dtype=torch.float32))
        while math.floor(p * 2**32) > word:  # the largest float32 p that keeps the key
            p = float(torch.nextafter(torch.tensor(p, dtype=torch.float32), torch.tensor(0.0)))
        p_drop = float(torch.nextafter(torch.tensor(p, dtype=torch.float32), torch.tensor(1.0)))
        assert math.floor(p_drop * 2**32) > word
        assert bool(_ops._dropout_mask(state, 1, 1, 1, 4, p)[0, 0, 0, t]), f"word {t} kept at p = {p}"
        assert not bool(_ops._dropout_mask(state, 1, 1, 1, 4, p_drop)[0, 0, 0, t]), f"word {t} dropped at {p_drop}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_within_binomial_bounds(p):
    batch, heads, seqlen_q, seqlen_k = 2, 3, 300, 517
    for seed in range(3):
        mask = _ops._dropout_mask(_rng_state(seed, "cpu"), batch, heads, seqlen_q, seqlen_k, p)
        n = mask.numel()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(float(mask.double().mean()) - (1 - p)) < 6 * sigma
        # Neither rows nor key columns (j % 4 picks the Philox word) may be biased.
        per_word = mask.view(-1, 4).double().mean(0)
        assert ((per_word - (1 - p)).abs() < 6 * math.sqrt(p * (1 - p) / (n / 4))).all()
    a = _ops._dropout_mask(_rng_state(0, "cpu"), batch, heads, seqlen_q, seqlen_k, p)
    b = _ops._dropout_mask(_rng_state(1, "cpu"), batch, heads, seqlen_q, seqlen_k, p)
    assert not torch.equal(a, b)
    assert torch.equal(a, _ops._dropout_mask(_rng_state(0, "cpu"), batch, heads, seqlen_q, seqlen_k, p))


def _philox4x32_10(counter, key):
    """Philox4x32-10 in plain Python (Salmon et al., SC'11), independent of csrc/dropout_rng.h."""
    x, y, z, w = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x, 0xCD9E8D57 * z
        x, y, z, w = ((p1 >> 32) ^ y ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF, ((p0 >> 32) ^ w ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return x, y, z, w


def _python_dropout_mask(rng_state, batch, heads, seqlen_q, seqlen_k, p):
    """The keep mask of README "Semantics" (Dropout), element by element."""
    seed, offset = (int(x) & 0xFFFFFFFFFFFFFFFF for x in rng_state.cpu())
    key = (seed & 0xFFFFFFFF, ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)
    threshold = int(p * 2**32)
    mask = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    for bh in range(batch * heads):
        for i in range(seqlen_q):
            for j in range(seqlen_k):
                words = _philox4x32_10((j // 4, i, bh, offset & 0xFFFFFFFF), key)
                mask[bh // heads, bh % heads, i, j] = words[j % 4] >= threshold
    return mask


@quick
def test_dropout_mask_op_devices(device):
    """Every device's _dropout_mask (the CPU kernel, the CUDA kernel, emulated or real)
    draws the decisions of an independent Python Philox."""
    name, torch_device = device
    state = _rng_state(3, torch_device)
    mask = _ops._dropout_mask(state, 2, 3, 17, 41, 0.4)
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 17, 41) and mask.device.type == state.device.type
    assert torch.equal(mask.cpu(), _python_dropout_mask(state, 2, 3, 17, 41, 0.4))


def test_dropout_preserves_the_mean(device):
    """E[out] is the output without dropout: with v = 1 every row's output is sum_j P_ij Z_ij, of
    mean 1 and variance sum_j P_ij^2 p / (1 - p); the mean over all rows is within 6 sigma."""
    name, torch_device = device
    p = 0.4
    shape = (2, 4, 4, 256, 384, 32)
    q, k, _ = _inputs(shape, torch.float32, torch_device)
    v = torch.ones_like(k)
    out = tfkernels.flash_attention(q, k, v, dropout_p=p, generator=torch.Generator(torch_device).manual_seed(1))
    probs = torch.softmax(q.double().cpu() @ k.double().cpu().transpose(-1, -2) / math.sqrt(shape[-1]), -1)
    var = (probs ** 2).sum(-1) * p / (1 - p)
    sigma = math.sqrt(float(var.mean()) / var.numel())
    assert abs(float(out[..., 0].double().mean()) - 1.0) < 6 * sigma
    assert torch.allclose(out[..., 0], out[..., 1])  # one mask per score, shared by all D columns


def test_dropout_reproducible_and_fresh(device):
    _, torch_device = device
    q, k, v = _inputs((1, 2, 2, 33, 45, 16), torch.float32, torch_device)

    def run(seed):
        return tfkernels.flash_attention(q, k, v, dropout_p=0.5,
                       generator=torch.Generator(torch_device).manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    torch.manual_seed(0)
    a = tfkernels.flash_attention(q, k, v, dropout_p=0.5)  # the default generator advances
    b = tfkernels.flash_attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


def test_dropout_backward_is_deterministic():
    q, k, v = _inputs((1, 4, 2, 300, 700, 32), torch.float32, "cpu")
    sinks = _sinks(4, "cpu")
    grad_out, grad_lse = torch.randn_like(q), torch.randn(q.shape[:3])
    kwargs = dict(window_size=(200, 50), softcap=5.0, dropout_p=0.1, is_causal=True)
    runs = []
    for _ in range(3):
        kwargs["generator"] = torch.Generator().manual_seed(11)
        runs.append(_run(tfkernels.flash_attention, q, k, v, sinks, grad_out, grad_lse, **kwargs))
    for out, lse, grads in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
        for g, g0 in zip(grads, runs[0][2]):
            assert torch.equal(g, g0)


# ------------------------------------------------------------------------------ rows without keys, NaN

def test_rows_without_keys(device):
    """Window and bottom_right alignment leave rows without keys: out 0, lse -inf, or the sink's
    logit with sinks, whose gradient then receives those rows' grad_lse."""
    name, torch_device = device
    q, k, v = _inputs((2, 2, 2, 30, 9, 16), _dtype_for(name), torch_device)
    lens = torch.tensor([9, 0], device=torch_device)
    kwargs = dict(window_size=(2, 0), causal_alignment="bottom_right", seqlens_k=lens)
    sees = _sees_a_key(q, k, kwargs)
    assert (~sees).any() and sees.any()
    out, lse = tfkernels.flash_attention(q, k, v, return_lse=True, **kwargs)
    assert (out[~sees] == 0).all() and torch.isneginf(lse[~sees]).all() and torch.isfinite(lse[sees]).all()
    check_parity(q, k, v, **kwargs)

    sinks = _sinks(2, torch_device).requires_grad_()
    out, lse = tfkernels.flash_attention(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    assert (out[~sees] == 0).all()
    assert torch.equal(lse[1], sinks.detach().view(2, 1).expand(2, 30))  # batch 1 sees no key at all
    grad_lse = torch.zeros_like(lse)
    grad_lse[1] = torch.randn(2, 30, device=torch_device)
    (grad_sinks,) = torch.autograd.grad(lse, [sinks], grad_lse)
    torch.testing.assert_close(grad_sinks, grad_lse[1].sum(-1), rtol=1e-5, atol=1e-5)
    check_parity(q, k, v, sinks, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_reaches_only_the_rows_that_see_it(device, where, value):
    name, torch_device = device
    q, k, v = _inputs((1, 2, 1, 40, 40, 16), _dtype_for(name), torch_device)
    bad = 20
    q[..., 3].abs_()  # an Inf in k gives +inf scores (NaN rows), not -inf ones (probability 0)
    (k if where == "k" else v)[0, 0, bad, 3] = value
    window = (3, 2)
    # The softcap would turn an infinite score finite (c * tanh(inf) = c): only with NaN.
    softcap = 10.0 if math.isnan(value) else 0.0
    out = tfkernels.flash_attention(q, k, v, window_size=window, softcap=softcap)
    i = torch.arange(40)
    sees_bad = (bad >= i - window[0]) & (bad <= i + window[1])
    for h in range(2):
        assert torch.equal(~torch.isfinite(out[0, h].cpu()).all(-1), sees_bad)
    ref = reference.flash_attention(*(t.cpu().double() for t in (q, k, v)), window_size=window, softcap=softcap)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(ref))


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_size=(-2, 0)), r"window_size must be a pair of ints \(left, right\) >= -1"),
        (dict(window_size=(1,)), r"window_size must be a pair of ints"),
        (dict(window_size=(1.5, 2)), r"window_size must be a pair of ints"),
        (dict(window_size=5), r"window_size must be a pair of ints"),
        (dict(softcap=-1.0), r"softcap must be a finite number >= 0 \(0 = off\), got -1.0"),
        (dict(softcap=float("inf")), r"softcap must be a finite number >= 0"),
        (dict(softcap=float("nan")), r"softcap must be a finite number >= 0"),
        (dict(sinks=torch.zeros(5)), r"sinks must have shape \[H\] = \[4\] \(q.shape\[1\]\), got \[5\]"),
        (dict(sinks=torch.zeros(1, 4)), r"sinks must have shape \[H\] = \[4\]"),
        (dict(sinks=torch.zeros(4, dtype=torch.int64)), r"sinks must be a floating-point tensor \[H\], got torch.int64"),
        (dict(sinks=torch.zeros(4, device="meta")), r"sinks must be on q's device \(cpu\), got meta"),
        (dict(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), r"dropout_p must be a number in \[0, 1\)"),
    ],
    ids=["window_below_-1", "window_not_pair", "window_float", "window_int", "softcap_negative", "softcap_inf",
         "softcap_nan", "sinks_length", "sinks_2d", "sinks_int", "sinks_device", "dropout_1", "dropout_negative"],
)
def test_bad_arguments(kwargs, match):
    q, k, v = _inputs((2, 4, 2, 5, 6, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        tfkernels.flash_attention(q, k, v, **kwargs)


def test_bad_op_arguments():
    """The op's own checks (C++), reached by direct calls that skip the wrapper."""
    q, k, v = _inputs((2, 4, 2, 5, 6, 8), torch.float32, "cpu")
    state = _rng_state(0, "cpu")

    def fwd(window=(-1, -1), softcap=0.0, sinks=None, p=0.0, rng=None):
        return _ops.flash_attention_fwd(q, k, v, False, "top_left", None, None, False, *window, softcap, sinks, p, rng)

    cases = [
        (dict(window=(-3, 0)), r"window_size must be a pair of ints >= -1 \(-1 = unbounded\), got \(-3, 0\)"),
        (dict(softcap=-2.0), r"softcap must be a finite number >= 0 \(0 = off\), got -2"),
        (dict(sinks=torch.zeros(4, dtype=torch.float64)), r"sinks must be float32 .* got Double"),
        (dict(sinks=torch.zeros(3)), r"sinks must be a 1-D tensor \[H\] with H = 4 \(q.shape\[1\]\), got 1-D \[3\]"),
        (dict(sinks=torch.zeros(8)[::2]), r"sinks must be contiguous"),
        (dict(p=1.0, rng=state), r"dropout_p must be in \[0, 1\), got 1"),
        (dict(p=0.5), r"rng_state \(int64 \[2\]\) is required when dropout_p > 0, got None"),
        (dict(p=0.5, rng=state.int()), r"rng_state must be an int64 tensor \[2\] \(seed, offset\), got Int"),
        (dict(p=0.5, rng=torch.zeros(3, dtype=torch.int64)), r"rng_state must be an int64 tensor \[2\]"),
    ]
    fwd(sinks=torch.zeros(4), p=0.5, rng=state)  # the good call works
    for kwargs, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(**kwargs)


# ------------------------------------------------------------------------------ opcheck, compile, autocast

def _variant_args(dtype=torch.float32):
    q, k, v = _inputs((2, 4, 2, 11, 9, 16), dtype, "cpu")
    lens = torch.tensor([5, 9], dtype=torch.int32)
    return [
        (q, k, v, True, "bottom_right", None, lens, False, 3, 1, 2.0, _sinks(4, "cpu"), 0.0, None),
        (q, k, v, False, "top_left", 0.3, None, True, -1, 2, 0.0, None, 0.25, _rng_state(0, "cpu")),
    ]


@pytest.mark.parametrize("case", range(2))
def test_opcheck(case):
    q, k, v, *attrs = _variant_args()[case]
    if attrs[8] is not None:
        attrs[8].requires_grad_()
    torch.library.opcheck(_ops.flash_attention_fwd.default, (q.requires_grad_(), k.requires_grad_(),
                                                             v.requires_grad_(), *attrs))
    # The backward op has no autograd formula of its own: its inputs must not require grad.
    attrs = [a.detach() if isinstance(a, torch.Tensor) else a for a in attrs]
    out, lse = _ops.flash_attention_fwd(q.detach(), k.detach(), v.detach(), *attrs)
    torch.library.opcheck(_ops.flash_attention_bwd.default,
                          (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out, lse,
                           *attrs))
    torch.library.opcheck(_ops._dropout_mask.default, (_rng_state(2, "cpu"), 2, 3, 5, 7, 0.3))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compile_fullgraph(dropout_p):
    q, k, v = (t.requires_grad_() for t in _inputs((1, 4, 2, 33, 47, 16), torch.float32, "cpu"))
    sinks = _sinks(4, "cpu").requires_grad_()

    def attention(q, k, v, sinks):
        return tfkernels.flash_attention(q, k, v, window_size=(8, 2), softcap=3.0, sinks=sinks, dropout_p=dropout_p,
                                         is_causal=True, causal_alignment="bottom_right")

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(got.sum(), [q, k, v, sinks])
    torch.manual_seed(3)
    expected = attention(q, k, v, sinks)
    expected_grads = torch.autograd.grad(expected.sum(), [q, k, v, sinks])
    if dropout_p == 0:  # with dropout the compiled graph draws its rng_state its own way
        torch.testing.assert_close(got, expected)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)
    else:
        assert got.shape == expected.shape and all(torch.isfinite(g).all() for g in grads)


def test_autocast_keeps_sinks_float32():
    q, k, v = _inputs((1, 4, 2, 17, 23, 32), torch.float32, "cpu")
    sinks = _sinks(4, "cpu").requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tfkernels.flash_attention(q, k, v, sinks=sinks, softcap=5.0, window_size=(4, 4))
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out.float().sum(), [sinks])
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    expected = reference.flash_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(),
                                         sinks=sinks.detach().double(), softcap=5.0, window_size=(4, 4))
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_sinks_gradient_in_callers_dtype():
    q, k, v = _inputs((1, 2, 1, 9, 9, 8), torch.float64, "cpu")
    sinks = _sinks(2, "cpu").double().requires_grad_()
    out = tfkernels.flash_attention(q, k, v, sinks=sinks)
    (grad,) = torch.autograd.grad(out.sum() + 0 * sinks.sum(), [sinks])
    assert grad.dtype == torch.float64


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(4, 0), (0, 5)], ids=["no_keys", "no_queries"])
def test_empty_sizes_with_sinks(seqlen_q, seqlen_k):
    """No key: every row's lse is its sink and d sink sums grad_lse; no query: nothing flows.
    The upstream gradients come from .sum() (expanded, stride 0), as autograd hands them over."""
    q, k, v = (t.requires_grad_() for t in _inputs((2, 2, 1, seqlen_q, seqlen_k, 8), torch.float64, "cpu"))
    sinks = _sinks(2, "cpu").double().requires_grad_()
    out, lse = tfkernels.flash_attention(q, k, v, sinks=sinks, window_size=(1, 0), softcap=3.0, dropout_p=0.2,
                                         return_lse=True)
    assert (out == 0).all()
    assert torch.equal(lse, sinks.detach().float().view(1, 2, 1).expand(2, 2, seqlen_q))
    grads = torch.autograd.grad(out.sum() + lse.sum(), [q, k, v, sinks])
    for g, t in zip(grads[:3], (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()
    torch.testing.assert_close(grads[3], torch.full((2,), 2.0 * seqlen_q, dtype=torch.float64))


# --------------------------------------------------------------------------- every variant x both dQ modes

@quick
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [FP16_FULL_GRID, torch.bfloat16, torch.float32], ids=str)
def test_variants_both_dq_modes(cuda_device, dtype, deterministic):
    """Window + causal + seqlens_k, softcap, sinks and dropout at once through both dQ
    paths (16-bit: fp32 atomics or the dQ kernel; fp32: its own kernels), against the
    reference with the same dropout mask; deterministic=True is bitwise reproducible,
    the sink gradient included."""
    q = torch.randn(2, 4, 77, 64, device=cuda_device, dtype=dtype)
    k, v = (torch.randn(2, 2, 129, 64, device=cuda_device, dtype=dtype) for _ in range(2))
    sinks = _sinks(4, cuda_device)
    kwargs = dict(window_size=(40, 7), is_causal=True, causal_alignment="bottom_right", softcap=2.5, dropout_p=0.2,
                  seqlens_k=torch.tensor([129, 50], device=cuda_device), deterministic=deterministic)
    check_parity(q, k, v, sinks, seed=4, **kwargs)
    if deterministic:
        runs = []
        for _ in range(2):
            leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
            gen = torch.Generator(cuda_device).manual_seed(4)
            out = tfkernels.flash_attention(*leaves[:3], sinks=leaves[3], generator=gen, **kwargs)
            runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
