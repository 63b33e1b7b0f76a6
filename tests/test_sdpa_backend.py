"""tfkernels as torch's SDPA flash backend (tfkernels.sdpa_backend).

On the CPU: F.scaled_dot_product_attention with the backend active against the same
call with torch's kernels (restored), forward and backward, and the profiler showing
which kernels ran. The CUDA adapters run here too, through the dispatcher, registered
under the CPU key for the CUDA-only aten ops (those have no CPU kernel of their own);
the real CUDA runs are the `cuda`-marked tests at the end.
"""
import contextlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn import attention

import tfkernels
from tfkernels import reference, sdpa_backend

from .utils import assert_close_float64, assert_flash_rule

pytestmark = pytest.mark.skipif(not sdpa_backend.is_available(), reason="torch has no flash-attention registry")

OUR_FWD, OUR_BWD = "tfkernels::flash_attention_fwd", "tfkernels::flash_attention_bwd"


@pytest.fixture(autouse=True)
def _torch_kernels_around_each_test(monkeypatch):
    monkeypatch.setattr(sdpa_backend, "_warned", set())  # every test sees its own first warnings
    if attention.current_flash_attention_impl() is not None:
        attention.restore_flash_attention_impl()
    yield
    if attention.current_flash_attention_impl() is not None:
        attention.restore_flash_attention_impl()


def _ops_run(fn):
    """(fn's result, names of the operators that ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


def _sdpa_fwd_bwd(q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype=torch.float32, device="cpu"):
    q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype, device=device)
    grad = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype, device=device)
    return q, k, v, grad


def _high(t):
    return t.double() if t.device.type == "cpu" else t.float()


def _compare_active_with_restored(q, k, v, grad, **kwargs):
    """SDPA with our kernels against SDPA with torch's: float64 tightly, lower precisions by
    FlashAttention's rule (torch's kernel in the high precision is the reference, torch's in
    the low one the yardstick). Returns the ops that ran with the backend active."""
    with tfkernels.use_as_sdpa_backend():
        ours, ran = _ops_run(lambda: _sdpa_fwd_bwd(q, k, v, grad, **kwargs))
    torch_low = _sdpa_fwd_bwd(q, k, v, grad, **kwargs)
    torch_high = _sdpa_fwd_bwd(*map(_high, (q, k, v, grad)), **kwargs)
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), ours, torch_high, torch_low):
        if a.dtype == torch.float64:
            assert_close_float64(a, hi, name)
        else:
            # float32 gradients: 4x, as in test_attention.py (the kernel recomputes P from a
            # rounded lse, with other summation orders, in the yardstick's own precision).
            # fp32 gradients: the CPU attention rule (4x), and 4 ulps of slack for rows
            # that see one key, where torch's dense backward is exact (P = 1) and a
            # kernel recomputing P from lse is off by an ulp or two.
            grad32 = a.dtype == torch.float32 and name != "out"
            assert_flash_rule(a, hi, lo, name, factor=4.0 if grad32 else 2.0, eps_ulps=4 if grad32 else 1)
    return ran


# --------------------------------------------------------------------------- registration and switching

def test_import_registers_and_activates_nothing():
    assert "tfkernels" in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() is None
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 16)
    _, ran = _ops_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert OUR_FWD not in ran


def test_activate_runs_ours_and_restore_runs_torchs():
    q, k, v, grad = _inputs(2, 4, 2, 17, 23, 40)
    before = _sdpa_fwd_bwd(q, k, v, grad, is_causal=True, enable_gqa=True)

    attention.activate_flash_attention_impl("tfkernels")
    assert attention.current_flash_attention_impl() == "tfkernels"
    active, ran = _ops_run(lambda: _sdpa_fwd_bwd(q, k, v, grad, is_causal=True, enable_gqa=True))
    assert {OUR_FWD, OUR_BWD} <= ran

    attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
    after, ran = _ops_run(lambda: _sdpa_fwd_bwd(q, k, v, grad, is_causal=True, enable_gqa=True))
    assert not ran & {OUR_FWD, OUR_BWD}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ran  # torch's kernels again
    for a, b, c in zip(before, active, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)  # restored means torch's own kernel, bit for bit


def test_context_manager_restores_the_previous_state():
    q, k, v, _ = _inputs(1, 2, 2, 9, 9, 16)
    with tfkernels.use_as_sdpa_backend():
        assert attention.current_flash_attention_impl() == "tfkernels"
        with tfkernels.use_as_sdpa_backend():  # nested: still ours inside, still ours after
            pass
        assert attention.current_flash_attention_impl() == "tfkernels"
        _, ran = _ops_run(lambda: F.scaled_dot_product_attention(q, k, v))
        assert OUR_FWD in ran
    assert attention.current_flash_attention_impl() is None
    _, ran = _ops_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert OUR_FWD not in ran

    with pytest.raises(KeyError), tfkernels.use_as_sdpa_backend():
        raise KeyError("leaves through an exception")
    assert attention.current_flash_attention_impl() is None


def test_context_manager_gives_back_another_provider():
    removed = []

    class Handle:
        def remove(self):
            removed.append(True)

    attention.register_flash_attention_impl("tfkernels-test-provider", register_fn=Handle)
    attention.activate_flash_attention_impl("tfkernels-test-provider")
    with tfkernels.use_as_sdpa_backend():
        assert removed == [True] and attention.current_flash_attention_impl() == "tfkernels"
    assert attention.current_flash_attention_impl() == "tfkernels-test-provider"


def test_register_is_skipped_quietly_without_the_registry(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sdpa_backend.register() is False
    with pytest.raises(RuntimeError, match="needs torch.nn.attention.register_flash_attention_impl"):
        with tfkernels.use_as_sdpa_backend():
            pass


# --------------------------------------------------------------------------- CPU: ours against torch's

SEQLENS = [(1, 17), (17, 17), (17, 113), (113, 17), (113, 113)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [40, 64, 80])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_sdpa_cpu_grid(seqlen_q, seqlen_k, head_dim, causal, gqa, dtype):
    q, k, v, grad = _inputs(2, 4, 2 if gqa else 4, seqlen_q, seqlen_k, head_dim, dtype)
    ran = _compare_active_with_restored(q, k, v, grad, is_causal=causal, enable_gqa=gqa)
    assert {OUR_FWD, OUR_BWD} <= ran


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_sdpa_cpu_other_dtypes(dtype):
    q, k, v, grad = _inputs(2, 6, 3, 33, 47, 24, dtype)
    assert {OUR_FWD, OUR_BWD} <= _compare_active_with_restored(q, k, v, grad, is_causal=True, enable_gqa=True)


def test_sdpa_cpu_3d_and_strided_inputs():
    q, k, v, grad = _inputs(1, 3, 3, 19, 29, 32)
    assert OUR_FWD in _compare_active_with_restored(q[0], k[0], v[0], grad[0], is_causal=True)  # 3-D
    # [B,S,H,D] memory seen as [B,H,S,D], as models produce it: strided, last dim contiguous
    q, k, v, grad = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 4, 4, 21, 21, 48))
    assert OUR_FWD in _compare_active_with_restored(q, k, v, grad, scale=0.3)


def test_sdpa_cpu_calls_that_never_reach_the_flash_op():
    # SDPA on the CPU sends these to its math path before any flash op: nothing to serve, nothing to warn.
    q, k, v, _ = _inputs(1, 2, 2, 9, 9, 16)
    strided_q = torch.randn(1, 2, 16, 9).transpose(-1, -2)  # last dim not contiguous
    with tfkernels.use_as_sdpa_backend(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
                     lambda: F.scaled_dot_product_attention(strided_q, k, v)):
            _, ran = _ops_run(call)
            assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in ran and OUR_FWD not in ran
            assert "aten::_scaled_dot_product_attention_math" in ran


def _padding_mask(lens, seqlen_k):
    return torch.arange(seqlen_k)[None, :] < lens[:, None]  # [B, Sk], True = attend


@pytest.mark.parametrize("form", ["bool-keys", "bool-full", "float-full", "bool-causal-padding", "bool-tril"])
def test_sdpa_cpu_masks_the_kernel_expresses(form):
    batch, seqlen_q, seqlen_k = 3, 13, 13
    q, k, v, grad = _inputs(batch, 4, 4, seqlen_q, seqlen_k, 40, torch.float64)
    keys = _padding_mask(torch.tensor([13, 6, 1]), seqlen_k)
    causal = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril()
    mask = {
        "bool-keys": keys[:, None, None, :],                                       # [B,1,1,Sk]
        "bool-full": keys[:, None, None, :].expand(batch, 4, seqlen_q, seqlen_k),  # [B,H,Sq,Sk]
        "float-full": torch.zeros(batch, 1, seqlen_q, seqlen_k, dtype=torch.float64).masked_fill(
            ~keys[:, None, None, :], float("-inf")),
        "bool-causal-padding": keys[:, None, None, :] & causal,
        "bool-tril": causal,                                                       # [Sq,Sk]
    }[form]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served: no fallback warning
        ran = _compare_active_with_restored(q, k, v, grad, attn_mask=mask)
    assert {OUR_FWD, OUR_BWD} <= ran


def test_sdpa_cpu_masks_in_inference_mode():
    # Inference tensors have no version counter, which the mask-plan cache otherwise reads.
    with torch.inference_mode():
        q, k, v, _ = _inputs(2, 2, 2, 6, 6, 16)
        mask = _padding_mask(torch.tensor([6, 3]), 6)[:, None, None, :]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with tfkernels.use_as_sdpa_backend():
            got, ran = _ops_run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert OUR_FWD in ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sdpa_cpu_mask_with_rows_that_see_no_key():
    # A batch element with no valid key: torch returns 0 there, and so do we.
    q, k, v, grad = _inputs(2, 2, 2, 7, 9, 16, torch.float64)
    mask = _padding_mask(torch.tensor([9, 0]), 9)[:, None, None, :]
    assert OUR_FWD in _compare_active_with_restored(q, k, v, grad, attn_mask=mask)


def _warned_fallback(q, k, v, grad, match, **kwargs):
    """Runs SDPA active and restored: asserts one fallback warning, torch's result, and that ours did not run."""
    sdpa_backend._warned.clear()
    with tfkernels.use_as_sdpa_backend():
        with pytest.warns(RuntimeWarning, match=match) as record:
            ours, ran = _ops_run(lambda: _sdpa_fwd_bwd(q, k, v, grad, **kwargs))
            _sdpa_fwd_bwd(q, k, v, grad, **kwargs)  # the second call stays quiet
    assert len([w for w in record if "tfkernels SDPA backend" in str(w.message)]) == 1
    assert OUR_FWD not in ran and OUR_BWD not in ran
    for a, b in zip(ours, _sdpa_fwd_bwd(q, k, v, grad, **kwargs)):
        assert torch.equal(a, b)


def test_sdpa_cpu_falls_back_for_masks_it_cannot_express():
    q, k, v, grad = _inputs(2, 2, 2, 11, 11, 16)
    _warned_fallback(q, k, v, grad, "not key padding", attn_mask=torch.rand(2, 1, 11, 11) > 0.5)
    _warned_fallback(q, k, v, grad, "not key padding", attn_mask=torch.randn(11, 11))  # a float bias
    left_padding = ~_padding_mask(torch.tensor([0, 4]), 11)
    _warned_fallback(q, k, v, grad, "not key padding", attn_mask=left_padding[:, None, None, :])


def test_sdpa_cpu_finfo_min_mask_with_an_empty_row_falls_back():
    # transformers blocks with finfo.min: a row that sees no key then averages every value
    # in torch, where the kernel would return 0.
    q, k, v, grad = _inputs(2, 2, 2, 5, 6, 16)
    keys = _padding_mask(torch.tensor([6, 0]), 6)[:, None, None, :]
    mask = torch.zeros(2, 1, 1, 6).masked_fill(~keys, torch.finfo(torch.float32).min)
    _warned_fallback(q, k, v, grad, "not key padding", attn_mask=mask)
    served = _padding_mask(torch.tensor([6, 2]), 6)[:, None, None, :]  # no empty row: ours runs
    mask = torch.zeros(2, 1, 1, 6).masked_fill(~served, torch.finfo(torch.float32).min)
    assert OUR_FWD in _compare_active_with_restored(q, k, v, grad, attn_mask=mask)


def test_sdpa_cpu_falls_back_for_head_dims_over_256():
    q, k, v, grad = _inputs(1, 2, 2, 9, 9, 300)
    _warned_fallback(q, k, v, grad, "head dim 300")


def test_cpu_op_called_with_dropout_behaves_as_torchs():
    # SDPA sends dropout to its math path; a direct call of the op gets torch's kernel (and its error).
    q, k, v, _ = _inputs(1, 2, 2, 9, 9, 16)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with pytest.raises(RuntimeError) as torch_error:
        op(q, k, v, 0.5)
    with tfkernels.use_as_sdpa_backend(), pytest.warns(RuntimeWarning, match="dropout_p=0.5"):
        with pytest.raises(RuntimeError) as our_error:
            op(q, k, v, 0.5)
    assert str(our_error.value) == str(torch_error.value)


def test_cpu_op_contract_matches_torchs():
    """Dtypes, shapes and strides of every output, as torch's kernel (and meta kernel) give them."""
    for dtype in (torch.float64, torch.bfloat16):
        q, k, v, grad = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 4, 2, 9, 12, 40, dtype))
        fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        expected = fwd(q, k, v, is_causal=True)
        expected_grads = bwd(grad, q, k, v, *expected, 0.0, True)
        with tfkernels.use_as_sdpa_backend():
            ours = fwd(q, k, v, is_causal=True)
            our_grads = bwd(grad, q, k, v, *ours, 0.0, True)
        for a, b in zip(ours + our_grads, expected + expected_grads):
            assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())


def test_sdpa_cpu_under_autocast():
    q, k, v, grad = _inputs(2, 4, 4, 17, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with tfkernels.use_as_sdpa_backend():
            ours, ran = _ops_run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert OUR_FWD in ran and ours.dtype == torch.bfloat16
    high = F.scaled_dot_product_attention(*map(_high, (q, k, v)), is_causal=True)
    assert_flash_rule(ours, high, torch_out)


# --------------------------------------------------------------------------- torch.compile

class _TinyAttention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, seqlen, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seqlen, dim))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_with_the_backend_active(backend):
    torch._dynamo.reset()
    model = _TinyAttention()
    x, grad = torch.randn(2, 19, 32), torch.randn(2, 19, 32)

    def step(fn):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.backward(grad)
        return out.detach(), xx.grad, [p.grad.clone() for p in model.parameters()]

    expected = step(model)  # eager, torch's kernels
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with tfkernels.use_as_sdpa_backend():
        got, ran = _ops_run(lambda: step(compiled))
    assert {OUR_FWD, OUR_BWD} <= ran
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], expected[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The same compiled model after restore runs torch's kernels again.
    _, ran = _ops_run(lambda: step(compiled))
    assert OUR_FWD not in ran


# --------------------------------------------------------------------------- the CUDA adapters, run on the CPU

@contextlib.contextmanager
def _cuda_adapters_on_cpu():
    """The CUDA ops' adapters registered for CPU tensors (these ops have no CPU kernel), so the
    dispatcher, autograd formulas and return conversions run here exactly as on a GPU."""
    library = torch.library.Library("aten", "IMPL")
    try:
        yield sdpa_backend.install(library, {"CPU": sdpa_backend._OVERRIDES["CUDA"]})
    finally:
        library._destroy()


def _ref_fwd_bwd(q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = reference.flash_attention(q, k, v, return_lse=True, **kwargs)
    out.backward(grad)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 17), (17, 113), (113, 17)])
def test_sdpa_flash_op_contract_on_cpu(seqlen_q, seqlen_k, causal):
    q, k, v, grad = _inputs(2, 4, 2, seqlen_q, seqlen_k, 40, torch.float64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with _cuda_adapters_on_cpu():
        out, lse, cum_q, cum_k, max_q, max_k, rng, offset, debug = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, is_causal=causal)
        out.backward(grad)
    assert (cum_q, cum_k, max_q, max_k) == (None, None, seqlen_q, seqlen_k)
    assert (rng.dtype, rng.shape, offset.dtype, offset.shape) == (torch.uint64, (2,), torch.uint64, ())
    assert debug.numel() == 0 and lse.dtype == torch.float32 and lse.shape == (2, 4, seqlen_q)
    # FlashAttention's causal mask is bottom-right aligned.
    ref = _ref_fwd_bwd(q, k, v, grad, is_causal=causal, causal_alignment="bottom_right")
    assert_close_float64(out, ref[0], "out")
    torch.testing.assert_close(lse, ref[1].float(), rtol=1e-6, atol=1e-6)
    for name, g, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref[2:]):
        assert_close_float64(g, r, name)


def test_flash_forward_op_contract_on_cpu():
    q, k, v, grad = _inputs(2, 4, 1, 9, 23, 80, torch.float64)  # MQA
    q_, k_, v_, grad_ = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, grad))  # [B,S,H,D]
    with _cuda_adapters_on_cpu():
        # window (-1, 0) is FlashAttention's causal mask
        out, lse, rng, offset, debug = torch.ops.aten._flash_attention_forward(
            q_, k_, v_, None, None, 9, 23, 0.0, False, False, window_size_left=-1, window_size_right=0)
        out.backward(grad_)
        seqused = torch.tensor([23, 5], dtype=torch.int32)
        out_used, lse_used, *_ = torch.ops.aten._flash_attention_forward(
            q_, k_, v_, None, None, 9, 23, 0.0, False, False, seqused_k=seqused)
        inplace = torch.full_like(q_, float("nan")).detach()
        lse_inplace = torch.ops.aten._flash_attention_forward_no_dropout_inplace(
            inplace, q_.detach(), k_.detach(), v_.detach(), None, None, 9, 23, 0.0, True, False)
    assert out.shape == q_.shape and out.stride() == q_.stride() and lse.shape == (2, 4, 9)
    assert (rng.dtype, offset.dtype, debug.numel()) == (torch.uint64, torch.uint64, 0)
    ref = _ref_fwd_bwd(q, k, v, grad, is_causal=True, causal_alignment="bottom_right")
    assert_close_float64(out.transpose(1, 2), ref[0], "out")
    assert_close_float64(inplace.transpose(1, 2), ref[0], "out (inplace)")
    torch.testing.assert_close(lse_inplace, lse)
    for name, g, r in zip(("dq", "dk", "dv"), (q_.grad, k_.grad, v_.grad), ref[2:]):
        assert g.is_contiguous()  # torch's meta kernel: empty_like of the contiguous [B,S,H,D] input
        assert_close_float64(g.transpose(1, 2), r, name)
    ref_used = reference.flash_attention(q, k, v, seqlens_k=seqused.long(), return_lse=True)
    assert_close_float64(out_used.transpose(1, 2), ref_used[0], "out (seqused_k)")
    torch.testing.assert_close(lse_used, ref_used[1].float())


def test_flash_forward_op_window_and_dropout_on_cpu():
    """Sliding windows and dropout reach the kernel; the dropout rng state travels in the
    philox-seed slot (uint64 [2]) to the backward, which regenerates the same mask."""
    q, k, v, grad = _inputs(2, 4, 2, 21, 37, 40, torch.float64)
    q_, k_, v_, grad_ = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, grad))
    with _cuda_adapters_on_cpu():
        out, lse, rng, offset, debug = torch.ops.aten._flash_attention_forward(
            q_, k_, v_, None, None, 21, 37, 0.3, True, False, window_size_left=5, window_size_right=0)
        out.backward(grad_)
    assert (rng.dtype, rng.shape, offset.dtype, offset.shape) == (torch.uint64, (2,), torch.uint64, ())
    mask = torch.ops.tfkernels._dropout_mask(rng.view(torch.int64), 2, 4, 21, 37, 0.3)
    assert 0 < int(mask.sum()) < mask.numel()
    ref = _ref_fwd_bwd(q, k, v, grad, is_causal=True, causal_alignment="bottom_right", window_size=(5, 0),
                       dropout_p=0.3, dropout_mask=mask)
    assert_close_float64(out.transpose(1, 2), ref[0], "out")
    torch.testing.assert_close(lse, ref[1].float(), rtol=1e-6, atol=1e-6)
    for name, g, r in zip(("dq", "dk", "dv"), (q_.grad, k_.grad, v_.grad), ref[2:]):
        assert_close_float64(g.transpose(1, 2), r, name)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_op_dropout_on_cpu(causal):
    q, k, v, grad = _inputs(2, 4, 2, 17, 17, 40, torch.float64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with _cuda_adapters_on_cpu():
        out, lse, *_, rng, offset, debug = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p=0.2, is_causal=causal)
        out.backward(grad)
    mask = torch.ops.tfkernels._dropout_mask(rng.view(torch.int64), 2, 4, 17, 17, 0.2)
    ref = _ref_fwd_bwd(q, k, v, grad, is_causal=causal, causal_alignment="bottom_right", dropout_p=0.2,
                       dropout_mask=mask)
    assert_close_float64(out, ref[0], "out")
    for name, g, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref[2:]):
        assert_close_float64(g, r, name)


def test_flash_forward_op_declines_what_it_cannot_serve():
    q, k, v, _ = (t.transpose(1, 2).contiguous() for t in _inputs(1, 2, 2, 8, 8, 32))
    cu_seqlens = torch.tensor([0, 8], dtype=torch.int32)
    cases = [
        (dict(cum_seq_q=cu_seqlens, cum_seq_k=cu_seqlens.long()), "cum_seq_k torch.int64"),
        (dict(cum_seq_q=cu_seqlens, cum_seq_k=cu_seqlens, seqused_k=torch.tensor([8], dtype=torch.int32)),
         "seqused_k with packed"),
        (dict(alibi_slopes=torch.ones(2)), "alibi"),
    ]
    for change, match in cases:
        args = dict(cum_seq_q=None, cum_seq_k=None, dropout_p=0.0)
        args.update(change)
        packed = args["cum_seq_q"] is not None
        qq, kk, vv = (t[0] for t in (q, k, v)) if packed else (q, k, v)
        with _cuda_adapters_on_cpu(), pytest.raises(NotImplementedError, match=match):
            # No CPU kernel of torch's to fall back to here; on CUDA, torch's FlashAttention-2 runs.
            torch.ops.aten._flash_attention_forward(qq, kk, vv, args.pop("cum_seq_q"), args.pop("cum_seq_k"), 8, 8,
                                                    args.pop("dropout_p"), False, False, **args)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_forward_op_packed_sequences_on_cpu(causal):
    """torch's varlen form of the op (cum_seq_q/k, [T,H,D]; what varlen_attn calls) runs
    flash_attention_varlen: out, lse [H,T] and gradients, with a window and dropout."""
    lens_q, lens_k = [5, 0, 17, 1], [9, 3, 17, 4]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 40, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 40, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 40, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(q)
    with _cuda_adapters_on_cpu():
        out, lse, rng, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.25, causal, False, window_size_left=6,
            window_size_right=-1 if causal else 2)
        out.backward(grad)
    assert out.shape == q.shape and lse.shape == (4, sum(lens_q))
    window = (6, -1 if causal else 2)
    # The mask the kernel drew: sequence b's corner of the padded op's mask for batch entry b.
    mask = torch.ops.tfkernels._dropout_mask(rng.view(torch.int64), 4, 4, max(lens_q), max(lens_k), 0.25)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention_varlen(q2, k2, v2, cu_q, cu_k, is_causal=causal,
                                              causal_alignment="bottom_right", window_size=window, dropout_p=0.25,
                                              dropout_mask=mask)
    ref.backward(grad)
    assert_close_float64(out, ref.detach(), "out")
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    for name, g, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert_close_float64(g, r, name)


# --------------------------------------------------------------------------- merge_attention

def _attention_lse64(q, k, v, *, is_causal=False, causal_alignment="top_left", return_lse=True):
    """Dense attention with its lse in float64 (the kernel's and the reference's lse are
    float32 by the schema, which would bound a float64 check of the merge at ~1e-7)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = reference.attention_mask(q.shape[2], k.shape[2], batch=q.shape[0], is_causal=is_causal,
                                    causal_alignment=causal_alignment)
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite.unsqueeze(-1)) @ v, lse


def _split_keys(attention_fn, q, k, v, split, causal):
    """Attention over keys [0, split) and [split, Sk) separately (Sq == Sk when causal)."""
    first = attention_fn(q, k[:, :, :split], v[:, :, :split], is_causal=causal, return_lse=True)
    # Query i sees global key j <= i, i.e. local key j - split <= i - split: bottom-right alignment
    # over the Sk - split keys of the second part (offset Sk - split - Sq = -split when Sq == Sk).
    # Rows i < split see no key there (lse = -inf): the empty-partial case.
    second = attention_fn(q, k[:, :, split:], v[:, :, split:], is_causal=causal, causal_alignment="bottom_right",
                          return_lse=True)
    return (*first, *second)


def _merged_and_full(attention_fn, q, k, v, grad, grad_lse, split, causal):
    out, lse = tfkernels.merge_attention(*_split_keys(attention_fn, q, k, v, split, causal))
    full, full_lse = attention_fn(q, k, v, is_causal=causal, return_lse=True)
    grads = torch.autograd.grad((out * grad).sum() + (lse * grad_lse).sum(), (q, k, v))
    full_grads = torch.autograd.grad((full * grad).sum() + (full_lse * grad_lse).sum(), (q, k, v))
    return (out, lse, *grads), (full, full_lse, *full_grads)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen,split", [(17, 5), (113, 64), (2, 1)])
def test_merge_attention_equals_one_call_over_all_keys_float64(seqlen, split, causal):
    q, k, v, grad = (t.requires_grad_() for t in _inputs(2, 4, 2, seqlen, seqlen, 40, torch.float64))
    grad_lse = torch.randn(2, 4, seqlen, dtype=torch.float64)
    merged, full = _merged_and_full(_attention_lse64, q, k, v, grad, grad_lse, split, causal)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), merged, full):
        assert_close_float64(a, b, name)
    # With the kernel's partials the lse is float32, so agreement is to its rounding.
    merged, full = _merged_and_full(tfkernels.flash_attention, q, k, v, grad, grad_lse, split, causal)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), merged, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_merge_attention_low_precision(dtype):
    q, k, v, grad = _inputs(2, 4, 4, 33, 33, 64, dtype)

    def merged(q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, _ = tfkernels.merge_attention(*_split_keys(tfkernels.flash_attention, q, k, v, 20, True))
        out.backward(grad.to(q.dtype))
        return out.detach(), q.grad, k.grad, v.grad

    actual = merged(q, k, v)
    high = _ref_fwd_bwd(*map(_high, (q, k, v, grad)), is_causal=True)
    low = _ref_fwd_bwd(q, k, v, grad, is_causal=True)
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), actual, high[:1] + high[2:], low[:1] + low[2:]):
        assert a.dtype == dtype
        assert_flash_rule(a, hi, lo, name)


def test_merge_attention_empty_partials_are_exact():
    out_a, lse_a = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5)
    out_b, lse_b = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5)
    lse_b[0] = float("-inf")  # rows of b that saw no key
    out_b[0] = 0.0
    out_a.requires_grad_(), lse_a.requires_grad_(), out_b.requires_grad_(), lse_b.requires_grad_()
    out, lse = tfkernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0], out_a[0]) and torch.equal(lse[0], lse_a[0])
    # and symmetric: an empty a leaves b
    swapped, swapped_lse = tfkernels.merge_attention(out_b, lse_b, out_a, lse_a)
    assert torch.equal(swapped[0], out_a[0]) and torch.equal(swapped_lse[0], lse_a[0])
    (out.sum() + lse.sum()).backward()
    assert torch.equal(out_b.grad[0], torch.zeros_like(out_b[0])) and torch.equal(out_a.grad[0], torch.ones_like(out_a[0]))
    assert torch.equal(lse_b.grad[0], torch.zeros_like(lse_b[0]))
    assert all(torch.isfinite(t.grad).all() for t in (out_a, lse_a, out_b, lse_b))


def test_merge_attention_both_empty_and_nan():
    out_a, out_b = torch.zeros(1, 4, 8, requires_grad=True), torch.zeros(1, 4, 8, requires_grad=True)
    lse_a = torch.full((1, 4), float("-inf"), requires_grad=True)
    lse_b = torch.full((1, 4), float("-inf"), requires_grad=True)
    out, lse = tfkernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (out.sum() + lse.where(torch.isfinite(lse), 0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (out_a, lse_a, out_b, lse_b))

    out_a, lse_a = torch.randn(2, 8), torch.randn(2)
    out_b, lse_b = torch.randn(2, 8), torch.randn(2)
    out_a[0, 3] = float("nan")
    lse_b[1] = float("nan")
    out, lse = tfkernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.isnan(out[0, 3]) and torch.isfinite(out[0, :3]).all()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1])


def test_merge_attention_checks_shapes():
    out, lse = torch.randn(2, 3, 8), torch.randn(2, 3)
    with pytest.raises(ValueError, match="out_a and out_b"):
        tfkernels.merge_attention(out, lse, out[:1], lse[:1])
    with pytest.raises(ValueError, match=r"lse_b must have shape out.shape\[:-1\] = \(2, 3\), got \(2, 3, 1\)"):
        tfkernels.merge_attention(out, lse, out, lse[..., None])


# --------------------------------------------------------------------------- CUDA

CUDA_SEQLENS = [(1, 17), (17, 17), (17, 113), (113, 17), (113, 113)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
@pytest.mark.parametrize("seqlen_q,seqlen_k", CUDA_SEQLENS)
def test_sdpa_cuda_grid(seqlen_q, seqlen_k, head_dim, causal, gqa, dtype):
    if causal and seqlen_q != seqlen_k:
        pytest.skip("SDPA's flash path takes is_causal only with Sq == Sk (FlashAttention aligns it bottom-right)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, grad = _inputs(2, 4, 2 if gqa else 4, seqlen_q, seqlen_k, head_dim, dtype, "cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ran = _compare_active_with_restored(q, k, v, grad, is_causal=causal, enable_gqa=gqa)
    assert {OUR_FWD, OUR_BWD} <= ran


@pytest.mark.cuda
def test_flash_attention_forward_cuda_bottom_right_causal():
    # Direct calls (varlen_attn, context parallelism) with Sq != Sk and FlashAttention's alignment.
    q, k, v, grad = _inputs(2, 4, 2, 17, 45, 64, torch.bfloat16, "cuda")
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with tfkernels.use_as_sdpa_backend():
        (out, lse, *_), ran = _ops_run(lambda: torch.ops.aten._flash_attention_forward(
            q_, k_, v_, None, None, 17, 45, 0.0, True, False))
    assert OUR_FWD in ran
    high = reference.flash_attention(*map(_high, (q, k, v)), is_causal=True, causal_alignment="bottom_right")
    low = reference.flash_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert_flash_rule(out.transpose(1, 2), high, low)
    torch_out = torch.ops.aten._flash_attention_forward(q_, k_, v_, None, None, 17, 45, 0.0, True, False)[0]
    assert_flash_rule(out, high.transpose(1, 2), torch_out.float().to(out.dtype), "out vs torch's FA2")


@pytest.mark.cuda
def test_varlen_attn_against_flash_attention_varlen():
    flash_attention_varlen = tfkernels.flash_attention_varlen
    from torch.nn.attention.varlen import varlen_attn

    lens = [17, 1, 113, 40]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    total, heads, kv_heads, head_dim = sum(lens), 8, 2, 64
    q = torch.randn(total, heads, head_dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k = torch.randn(total, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    v = torch.randn(total, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(total, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    with tfkernels.use_as_sdpa_backend():
        out, ran = _ops_run(lambda: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max(lens), max(lens),
                                                window_size=(-1, 0), enable_gqa=True))
        out.backward(grad)
    assert any(name.startswith("tfkernels::") for name in ran)
    got = (out.detach(), q.grad, k.grad, v.grad)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = flash_attention_varlen(q2, k2, v2, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                      max_seqlen_q=max(lens), max_seqlen_k=max(lens), is_causal=True)
    expected.backward(grad)
    # The same kernels either way; dq may be summed by atomics in another order.
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (expected.detach(), q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=lambda m, n=name: f"{n}: {m}")
