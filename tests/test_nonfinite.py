"""NaN and Inf inputs propagate as in the reference, on every device.

The rule (README, Semantics): a query row that sees a non-finite score gets what
the reference's softmax gives (NaN output and lse for a NaN or +inf score, or for
visible scores that are all -inf); Inf/NaN in v reaches exactly the rows that see
that key; a key a row cannot see (seqlens_k, causal mask) keeps its values out of
that row, forward and backward; a row that sees no key gives 0 and lse = -inf.

Every case compares the kernel with tfkernels.reference run in float64 on the CPU
from the same inputs: the NaN / +inf / -inf pattern of out, lse, dq, dk and dv
must be identical, and the finite entries must match by the usual rules (float64
tightly, lower precisions by the FlashAttention rule against the reference run in
the inputs' dtype). The GEMM ops get the same pattern check for NaN.

Devices come from DEVICES below: one entry per device, with the pytest marks
that gate it and whether it has float64 kernels.
"""
import math
from typing import NamedTuple

import pytest
import torch

import tfkernels
from tfkernels import reference

from . import emu_device
from .utils import assert_flash_rule


class Device(NamedTuple):
    id: str            # the test id
    name: str          # torch device the inputs are put on
    marks: tuple       # pytest marks (e.g. skip without the hardware)
    float64: bool      # whether the kernels run in float64 there


# The devices every test here runs on. A new device is one more entry. "emu" runs
# the CUDA kernels on CPU tensors under the emulated device (tests/emu_device.py).
DEVICES = [
    Device("cpu", "cpu", (), True),
    Device("cuda", "cuda", (pytest.mark.cuda,), False),
    Device("emu", "cpu", (pytest.mark.emu, pytest.mark.emu_quick), False),
]

_cuda_kernels = False  # True while the emulated CUDA kernels serve the CPU tensors


@pytest.fixture(autouse=True)
def _emulated_kernels(request):
    global _cuda_kernels
    if "emu" not in request.keywords:
        yield
        return
    with emu_device.active():
        _cuda_kernels = True
        try:
            yield
        finally:
            _cuda_kernels = False


def _device_params():
    return [pytest.param(d.name, marks=d.marks, id=d.id) for d in DEVICES]


def _device_dtype_params(dtypes):
    return [pytest.param(d.name, dtype, marks=d.marks, id=f"{d.id}-{str(dtype).split('.')[-1]}")
            for d in DEVICES for dtype in dtypes if dtype != torch.float64 or d.float64]


ATTENTION_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
NAN, INF = float("nan"), float("inf")

# ------------------------------------------------------------------------ comparison


def _assert_same_pattern(actual, expected, name):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, e = test(actual), test(expected)
        if not torch.equal(a, e):
            where = (a != e).nonzero()[0].tolist()
            raise AssertionError(f"{name}: {what} pattern differs from the reference ({int(a.sum())} vs "
                                 f"{int(e.sum())} entries; first difference at {where}: "
                                 f"{actual[tuple(where)].item()} vs reference {expected[tuple(where)].item()})")


def _assert_matches(actual, ref_high, ref_low, name, factor=2.0):
    """Same non-finite pattern as the float64 reference; finite entries by the usual rule."""
    _assert_same_pattern(actual, ref_high, name)
    actual, ref_high = actual.detach().cpu(), ref_high.detach().cpu()
    finite = torch.isfinite(ref_high)
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual[finite], ref_high[finite], rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")
        return
    ref_low = ref_low.detach().cpu()
    finite &= torch.isfinite(ref_low)
    assert_flash_rule(actual[finite], ref_high[finite], ref_low[finite], name, factor)


# ------------------------------------------------------------------------ attention

B, H, HKV, SEQ, D = 2, 4, 2, 37, 16
BAD = 20  # the row (q) or key (k, v) that holds the bad element; kv head 1, batch 0, dim 5
# Masks: (is_causal, alignment, seqlen_q, seqlens_k). 'hide' lengths put the bad key
# out of reach of every row of batch 0; causal top_left hides it from rows < BAD.
MASKS = {
    "full": (False, "top_left", SEQ, None),
    "causal": (True, "top_left", SEQ, None),
    "causal-empty-rows": (True, "bottom_right", SEQ + 8, None),  # the first 8 rows see no key
    "seqlens-hide": (False, "top_left", SEQ, [BAD, SEQ - 3]),
    "seqlens-see": (False, "top_left", SEQ, [BAD + 5, SEQ - 3]),
    "causal-seqlens-hide": (True, "bottom_right", SEQ, [BAD - 2, SEQ]),
}


def _attention_inputs(device, dtype, seqlen_q, where, value):
    q = torch.randn(B, H, seqlen_q, D)
    k = torch.randn(B, HKV, SEQ, D)
    v = torch.randn(B, HKV, SEQ, D)
    bad = {"q": q, "k": k, "v": v}[where]
    # q: a query head of kv head 1 (GQA group 2, 3); k, v: kv head 1.
    bad[0, 1 if where != "q" else 3, BAD, 5] = value
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _fwd_bwd(fn, q, k, v, grad_out, grad_lse, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad([out, lse], [q, k, v], [grad_out, grad_lse])
    return [out, lse, *grads]


def _check_attention(q, k, v, **kwargs):
    """Kernel on q's device; both references on the CPU (float64, and the inputs' dtype
    as the flash rule's yardstick), so a device only has to run the op itself."""
    device, dtype = q.device, q.dtype
    grad_out = torch.randn(q.shape).to(dtype)
    seqlens_k = kwargs.get("seqlens_k")
    kw_cpu = dict(kwargs, seqlens_k=None if seqlens_k is None else seqlens_k.cpu())
    mask = reference.attention_mask(q.shape[2], k.shape[2], batch=q.shape[0],
                                    is_causal=kwargs.get("is_causal", False),
                                    causal_alignment=kwargs.get("causal_alignment", "top_left"),
                                    seqlens_k=kw_cpu["seqlens_k"])
    sees_a_key = mask.any(-1).expand(q.shape[:3])
    grad_lse = torch.randn(q.shape[:3]) * sees_a_key

    got = _fwd_bwd(tfkernels.flash_attention, q, k, v, grad_out.to(device), grad_lse.to(device), **kwargs)
    got = [t.detach().cpu() for t in got]
    cpu = [t.detach().cpu() for t in (q, k, v)]
    high = _fwd_bwd(reference.flash_attention, *(t.double() for t in cpu), grad_out.double(), grad_lse, **kw_cpu)
    # The low-precision yardstick of the flash rule (float64 is compared tightly instead).
    low = high if dtype == torch.float64 else _fwd_bwd(reference.flash_attention, *cpu, grad_out, grad_lse, **kw_cpu)

    # Rows that see no key: exactly 0 and lse -inf, whatever the other rows hold.
    out, lse = got[0].detach(), got[1].detach()
    assert (out[~sees_a_key] == 0).all() and torch.isneginf(lse[~sees_a_key]).all()
    assert not torch.isneginf(lse[sees_a_key]).any(), "lse -inf is only for rows that see no key"
    for name, g, hi, lo in zip(("output", "lse", "dq", "dk", "dv"), got, high, low):
        if name == "lse":
            hi, lo = hi.float(), lo.float()  # the schema's lse is float32
        # fp32: the CPU suite allows 4x for gradients (the kernel takes Delta from O, the
        # autograd reference sums P dP; see test_attention._dense_flash_backward),
        # the CUDA fp32 suite 8x (hardware exp2, other summation orders).
        factor = 2.0
        if dtype == torch.float32:
            factor = 8.0 if device.type != "cpu" or _cuda_kernels else 4.0 if name.startswith("d") else 2.0
        _assert_matches(g, hi, lo, name, factor)
    return got, high


@pytest.mark.parametrize("device,dtype", _device_dtype_params(ATTENTION_DTYPES))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_one_bad_element(where, value, mask, device, dtype):
    is_causal, alignment, seqlen_q, lens = MASKS[mask]
    q, k, v = _attention_inputs(device, dtype, seqlen_q, where, value)
    seqlens_k = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    got, high = _check_attention(q, k, v, is_causal=is_causal, causal_alignment=alignment, seqlens_k=seqlens_k)
    # The case is what its name says: the bad value reaches some result exactly when
    # some row sees it (a bad query row always sees keys here).
    out, lse, *grads = high
    reaches_a_result = any((~torch.isfinite(t)).any() for t in (out, *grads)) or torch.isnan(lse).any()
    assert reaches_a_result == (where == "q" or not mask.endswith("hide"))


@pytest.mark.parametrize("device,dtype", _device_dtype_params(ATTENTION_DTYPES))
def test_attention_nan_in_a_row_that_sees_no_key(device, dtype):
    """A NaN query in a row that sees no key: that row stays 0 / -inf with zero dq,
    and nothing of it reaches dk, dv."""
    q, k, v = _attention_inputs(device, dtype, SEQ + 8, "q", NAN)
    q[0, 3, :8] = NAN  # rows 0..7 see no key under bottom_right with Sq = Sk + 8
    q[0, 3, BAD] = torch.randn(D).to(device=device, dtype=dtype)
    got, _ = _check_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert all(torch.isfinite(t).all() for t in got[2:])
    assert (got[2][0, 3, :8] == 0).all()


@pytest.mark.parametrize("device,dtype", _device_dtype_params(ATTENTION_DTYPES))
def test_attention_minus_inf_scores_before_finite_ones(device, dtype):
    """Scores that are -inf over a whole leading key tile (550 keys; the CPU
    forward's tile is 512), finite after it: the online softmax must give those
    keys probability 0, not NaN, and the rows stay finite. Causal (top_left), every
    row sees only -inf scores: NaN output and lse NaN."""
    seqlen_k = 600
    q = torch.randn(1, 2, 9, D)
    k = torch.randn(1, 1, seqlen_k, D)
    v = torch.randn(1, 1, seqlen_k, D)
    q[..., 0] = -q[..., 0].abs() - 0.5  # score = q0 * inf = -inf for every key with k[..., 0] = +inf
    k[:, :, :550, 0] = INF
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    got, _ = _check_attention(q, k, v)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    got, _ = _check_attention(q, k, v, is_causal=True)
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all(), "rows that see only -inf scores: NaN"


@pytest.mark.parametrize("device", _device_params())
def test_attention_garbage_padding_never_reaches_the_output(device):
    """Padding past seqlens_k full of NaN and Inf (k and v): every output, lse and
    gradient stays finite and equal to the reference."""
    q, k, v = _attention_inputs(device, torch.float32, SEQ, "k", 1.0)
    lens = torch.tensor([11, 30], dtype=torch.int32, device=device)
    for t in (k, v):
        t[0, :, 11::2] = NAN
        t[0, :, 12::2] = INF
        t[1, :, 30:] = -INF
    for is_causal in (False, True):
        got, _ = _check_attention(q, k, v, is_causal=is_causal, seqlens_k=lens)
        assert all(torch.isfinite(t).all() for t in got)


def test_reference_row_groups_agree_with_the_dense_product():
    """The reference takes one masked product over all keys when q, k, v are finite
    and computes rows grouped by their visible keys otherwise. A NaN in a padding key
    nobody sees switches paths without changing the answer: both must agree."""
    q, k, v = _attention_inputs("cpu", torch.float64, SEQ, "k", 1.0)
    lens = torch.tensor([SEQ - 4, SEQ - 9])
    grad_out, grad_lse = torch.randn(q.shape), torch.randn(q.shape[:3])
    for is_causal in (False, True):
        kw = dict(is_causal=is_causal, causal_alignment="bottom_right", seqlens_k=lens)
        dense = _fwd_bwd(reference.flash_attention, q, k, v, grad_out, grad_lse, **kw)
        k_padded = k.clone()
        k_padded[:, :, -1] = NAN
        grouped = _fwd_bwd(reference.flash_attention, q, k_padded, v, grad_out, grad_lse, **kw)
        for name, a, b in zip(("output", "lse", "dq", "dk"), dense, grouped):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
        # dk of the padding key: 0 from the dense product, and 0 (not NaN) where it is never used.
        assert (grouped[3][:, :, -1] == 0).all()


# ------------------------------------------------------------------------ GEMM ops

GEMM_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _gemm_check(fn, ref_fn, tensors, device, dtype, **kwargs):
    """Forward and every gradient: same NaN pattern as the float64 reference, finite parts
    by the usual rules. The op runs on `device`, the references on the CPU."""
    inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    out = fn(*inputs, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = [torch.randn(o.shape).to(device=device, dtype=dtype) for o in outs]
    got = [*outs, *torch.autograd.grad(outs, inputs, grads_out)]

    def run_ref(ts, gs):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        r = ref_fn(*ts, **kwargs)
        r = r if isinstance(r, tuple) else (r,)
        return [*r, *torch.autograd.grad(r, ts, gs)]

    high = run_ref([t.detach().cpu().double() for t in inputs], [g.cpu().double() for g in grads_out])
    low = run_ref([t.detach().cpu() for t in inputs], [g.cpu() for g in grads_out])
    assert any(torch.isnan(t).any() for t in high), "the case must put a NaN somewhere"
    for i, (g, hi, lo) in enumerate(zip(got, high, low)):
        _assert_matches(g, hi, lo, f"result {i}")


def _with_nan(t, index):
    t = t.clone()
    t[index] = NAN
    return t


@pytest.mark.parametrize("device,dtype", _device_dtype_params(GEMM_DTYPES))
@pytest.mark.parametrize("where", ["x", "weight", "bias"])
def test_fused_qkv_nan(where, device, dtype):
    heads, kv_heads, head_dim, embed = 4, 2, 8, 24
    x = torch.randn(2, 5, embed)
    w = torch.randn((heads + 2 * kv_heads) * head_dim, embed) / math.sqrt(embed)
    b = torch.randn(w.shape[0])
    x, w, b = [_with_nan(t, idx) if name == where else t
               for t, name, idx in ((x, "x", (1, 2, 7)), (w, "weight", (40, 3)), (b, "bias", 50))]
    _gemm_check(tfkernels.fused_qkv, reference.fused_qkv, [x, w, b], device, dtype,
                num_heads=heads, num_kv_heads=kv_heads)


@pytest.mark.parametrize("device,dtype", _device_dtype_params(GEMM_DTYPES))
@pytest.mark.parametrize("where,approximate", [("x", "none"), ("weight", "tanh"), ("bias", "none")])
def test_linear_gelu_nan(where, approximate, device, dtype):
    x, w, b = torch.randn(3, 7, 24), torch.randn(40, 24) / 5, torch.randn(40)
    x, w, b = [_with_nan(t, idx) if name == where else t
               for t, name, idx in ((x, "x", (2, 1, 5)), (w, "weight", (9, 4)), (b, "bias", 13))]
    _gemm_check(tfkernels.linear_gelu, reference.linear_gelu, [x, w, b], device, dtype, approximate=approximate)


@pytest.mark.parametrize("device,dtype", _device_dtype_params(GEMM_DTYPES))
@pytest.mark.parametrize("where,approximate",
                         [("x", "tanh"), ("w1", "none"), ("b1", "tanh"), ("w2", "none"), ("b2", "tanh")])
def test_fused_mlp_nan(where, approximate, device, dtype):
    d, d_ff = 24, 48
    tensors = {"x": torch.randn(3, 7, d), "w1": torch.randn(d_ff, d) / 5, "b1": torch.randn(d_ff),
               "w2": torch.randn(d, d_ff) / 7, "b2": torch.randn(d)}
    index = {"x": (1, 3, 2), "w1": (10, 4), "b1": 30, "w2": (5, 17), "b2": 6}
    tensors[where] = _with_nan(tensors[where], index[where])
    _gemm_check(tfkernels.fused_mlp, reference.fused_mlp, list(tensors.values()), device, dtype,
                approximate=approximate)


# The CPU only: the case is oneDNN's. The emulated CUDA kernels kept the NaN pattern
# here too, but their fp32 bias gradient of the 17 x 33 case sat at the edge of the
# tolerance rule (3.2e-6 against 2.8e-6); test_fused_mlp_nan covers them.
@pytest.mark.parametrize("device,dtype", [p for p in _device_dtype_params([torch.float32, torch.bfloat16])
                                          if p.id.startswith("cpu-")])
@pytest.mark.parametrize("embed,hidden", [(17, 33), (34, 38)])
@pytest.mark.parametrize("op", ["fused_qkv", "linear_gelu", "fused_mlp"])
def test_nan_first_in_a_row_of_a_partial_block(op, embed, hidden, device, dtype):
    """Reduction lengths that are not whole 32-element blocks (embed, hidden; 41 tokens)
    with a NaN as the first element of a token's row: only that token's outputs and
    gradients are NaN. torch's oneDNN AMX GEMM reads such a row's last block past its
    end, which put the NaN into the row before as well (from 32 rows on; csrc/cpu/blas.h's
    whole_blocks_reduction16)."""
    x = _with_nan(torch.randn(1, 41, embed), (0, 6, 0))
    if op == "fused_qkv":
        w = torch.randn(3 * 2 * 8, embed) / 4
        _gemm_check(tfkernels.fused_qkv, reference.fused_qkv, [x, w, torch.randn(w.shape[0])], device, dtype,
                    num_heads=2)
    elif op == "linear_gelu":
        _gemm_check(tfkernels.linear_gelu, reference.linear_gelu,
                    [x, torch.randn(hidden, embed) / 4, torch.randn(hidden)], device, dtype)
    else:
        _gemm_check(tfkernels.fused_mlp, reference.fused_mlp,
                    [x, torch.randn(hidden, embed) / 4, torch.randn(hidden), torch.randn(embed, hidden) / 6,
                     torch.randn(embed)], device, dtype)


@pytest.mark.parametrize("device,dtype", _device_dtype_params(GEMM_DTYPES))
@pytest.mark.parametrize("where,approximate", [("x", "none"), ("x", "tanh"), ("bias", "tanh")])
def test_bias_gelu_nan(where, approximate, device, dtype):
    x, b = torch.randn(6, 40), torch.randn(40)
    x, b = [_with_nan(t, idx) if name == where else t for t, name, idx in ((x, "x", (4, 9)), (b, "bias", 21))]
    _gemm_check(tfkernels.bias_gelu, reference.bias_gelu, [x, b], device, dtype, approximate=approximate)
