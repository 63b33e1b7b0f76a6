"""bias_gelu, linear_gelu and fused_mlp (forward and backward ops) on the CPU against
tfkernels.reference: outputs and every gradient, both GELU forms, odd shapes."""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_close_float64, assert_flash_rule

ops = torch.ops.tfkernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
APPROX = ["none", "tanh"]


def _run(fn, tensors, grad_out, dtype=None, **kwargs):
    """Forward + backward on copies of `tensors` (None stays None), in `dtype` if given."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def _check(fn, ref_fn, tensors, grad_out, names, dtype, **kwargs):
    actual = _run(fn, tensors, grad_out, **kwargs)
    expected = _run(ref_fn, tensors, grad_out, torch.float64, **kwargs)
    low = _run(ref_fn, tensors, grad_out, **kwargs) if dtype != torch.float64 else expected
    for name, a, e, lo in zip(names, actual, expected, low):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == e.shape, name
        if dtype == torch.float64:
            assert_close_float64(a, e, name=name)
        else:
            assert_flash_rule(a, e, lo, name=name)


# ----------------------------------------------------------------------------- bias_gelu

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(1, 40), (17, 97), (113, 256), (3, 17, 64)], ids=str)
def test_bias_gelu_matches_reference(shape, approximate, dtype):
    x = (2 * torch.randn(shape)).to(dtype)
    bias = torch.randn(shape[-1], dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    _check(tfkernels.bias_gelu, reference.bias_gelu, [x, bias], grad, ["out", "grad_x", "grad_bias"], dtype,
           approximate=approximate)


def test_bias_gelu_covers_wide_range():
    # Tails of the vectorised erf/exp: large |x| where GELU saturates to x or 0.
    x = torch.linspace(-30, 30, 4001, dtype=torch.float32).view(1, -1)
    bias = torch.zeros(x.shape[-1])
    for approximate in APPROX:
        out = tfkernels.bias_gelu(x, bias, approximate=approximate)
        ref = reference.bias_gelu(x.double(), bias.double(), approximate=approximate)
        assert_flash_rule(out, ref, reference.bias_gelu(x, bias, approximate=approximate), name=approximate)
        gx, gb = ops.bias_gelu_bwd(torch.ones_like(x), x, bias, approximate)
        xd = x.double().requires_grad_()
        torch.nn.functional.gelu(xd, approximate=approximate).sum().backward()
        xf = x.clone().requires_grad_()
        torch.nn.functional.gelu(xf, approximate=approximate).sum().backward()
        assert_flash_rule(gx, xd.grad, xf.grad, name=f"grad {approximate}")


# ----------------------------------------------------------------------------- linear_gelu

# (leading dims, d_model, d_ff): rows 1, 17, 113; d_model 40, 64, 256; d_ff 4x and odd.
LINEAR_CASES = [((1,), 40, 160), ((17,), 64, 97), ((113,), 256, 1024), ((3, 17), 40, 97), ((2, 9), 64, 256)]


def _linear_inputs(lead, d_in, d_out, bias, dtype):
    x = torch.randn(*lead, d_in, dtype=dtype)
    w = (torch.randn(d_out, d_in) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_linear_gelu_matches_reference(case, bias, approximate, dtype):
    lead, d_model, d_ff = case
    x, w, b = _linear_inputs(lead, d_model, d_ff, bias, dtype)
    grad = torch.randn(*lead, d_ff, dtype=dtype)
    _check(tfkernels.linear_gelu, reference.linear_gelu, [x, w, b], grad, ["out", "grad_x", "grad_weight", "grad_bias"],
           dtype, approximate=approximate)


# ----------------------------------------------------------------------------- fused_mlp

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [(True, True), (False, False), (True, False)], ids=["b1b2", "nobias", "b1"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}")
def test_fused_mlp_matches_reference(case, bias, approximate, dtype):
    lead, d_model, d_ff = case
    x, w1, b1 = _linear_inputs(lead, d_model, d_ff, bias[0], dtype)
    w2 = (torch.randn(d_model, d_ff) / d_ff**0.5).to(dtype)
    b2 = torch.randn(d_model, dtype=dtype) if bias[1] else None
    grad = torch.randn(*lead, d_model, dtype=dtype)
    _check(tfkernels.fused_mlp, reference.fused_mlp, [x, w1, b1, w2, b2], grad,
           ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], dtype, approximate=approximate)


def test_fused_mlp_large_rows_cross_blocks():
    # More rows and hidden units than one block of the CPU kernel (512 rows, 256 hidden).
    x, w1, b1 = _linear_inputs((1100,), 48, 600, True, torch.float64)
    w2 = torch.randn(40, 600, dtype=torch.float64) / 25
    b2 = torch.randn(40, dtype=torch.float64)
    grad = torch.randn(1100, 40, dtype=torch.float64)
    _check(tfkernels.fused_mlp, reference.fused_mlp, [x, w1, b1, w2, b2], grad,
           ["out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], torch.float64, approximate="tanh")


# ----------------------------------------------------------------------------- backward ops directly

@pytest.mark.parametrize("approximate", APPROX)
def test_backward_ops_return_all_bias_grads(approximate):
    dt = torch.float64
    x, w, _ = _linear_inputs((2, 5), 8, 12, False, dt)
    pre = torch.nn.functional.linear(x, w)
    g = torch.randn(2, 5, 12, dtype=dt)
    gx, gw, gb = ops.linear_gelu_bwd(g, x, w, pre, approximate)
    dpre = g * torch.ops.aten.gelu_backward(torch.ones_like(pre), pre, approximate=approximate)
    assert_close_float64(gb, dpre.sum((0, 1)), "grad_bias")
    w2 = torch.randn(6, 12, dtype=dt)
    g2 = torch.randn(2, 5, 6, dtype=dt)
    outs = ops.fused_mlp_bwd(g2, x, w, w2, pre, approximate)
    assert [tuple(t.shape) for t in outs] == [(2, 5, 8), (12, 8), (12,), (6, 12), (6,)]
    assert_close_float64(outs[4], g2.sum((0, 1)), "grad_b2")


# ----------------------------------------------------------------------------- save_pre

def test_save_pre_only_with_grad():
    x, w, b = _linear_inputs((4, 7), 16, 40, True, torch.float32)
    w2 = torch.randn(16, 40)
    for run in (lambda: ops.linear_gelu(x, w, b, "none", False), lambda: ops.fused_mlp(x, w, b, w2, None, "none", False)):
        out, pre = run()
        assert pre.shape == (0,) and pre.untyped_storage().nbytes() == 0
    out, pre = ops.linear_gelu(x, w, b, "tanh", True)
    assert_flash_rule(pre, torch.nn.functional.linear(x.double(), w.double(), b.double()),
                      torch.nn.functional.linear(x, w, b), name="pre")
    out, pre = ops.fused_mlp(x, w, b, w2, None, "none", True)
    assert pre.shape == (4, 7, 40)
    assert_flash_rule(pre, torch.nn.functional.linear(x.double(), w.double(), b.double()),
                      torch.nn.functional.linear(x, w, b), name="pre")


def test_public_api_saves_pre_only_when_needed():
    x, w, b = _linear_inputs((3, 5), 16, 24, True, torch.float32)
    w2 = torch.randn(16, 24)
    with torch.no_grad():
        y = tfkernels.linear_gelu(x, w.requires_grad_(), b)
        assert y.grad_fn is None
    y = tfkernels.linear_gelu(x, w, b)
    saved = [t for t in y.grad_fn.saved_tensors if t.shape == (3, 5, 24)]
    assert saved, "the pre-activation must be saved for the backward"
    y.sum().backward()
    assert w.grad is not None
    z = tfkernels.fused_mlp(x, w, b, w2.requires_grad_(), None)
    z.sum().backward()
    assert w2.grad is not None


# ----------------------------------------------------------------------------- gradcheck and opcheck

@pytest.mark.parametrize("approximate", APPROX)
def test_gradcheck(approximate):
    dt = torch.float64
    x, w, b = (t.requires_grad_() for t in _linear_inputs((2, 3), 5, 7, True, dt))
    w2 = (torch.randn(4, 7, dtype=dt) / 3).requires_grad_()
    b2 = torch.randn(4, dtype=dt, requires_grad=True)
    xb = torch.randn(2, 3, 7, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, b_: tfkernels.bias_gelu(x_, b_, approximate=approximate), (xb, b))
    assert torch.autograd.gradcheck(lambda *a: tfkernels.linear_gelu(*a, approximate=approximate), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: tfkernels.fused_mlp(*a, approximate=approximate), (x, w, b, w2, b2))
    assert torch.autograd.gradcheck(lambda x_, w_, v_: tfkernels.fused_mlp(x_, w_, None, v_, None,
                                                                           approximate=approximate), (x, w, w2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x, w, b = _linear_inputs((2, 3), 8, 12, True, dtype)
    w2, b2 = torch.randn(8, 12, dtype=dtype), torch.randn(8, dtype=dtype)
    pre = torch.nn.functional.linear(x, w, b)
    g12, g8 = torch.randn(2, 3, 12, dtype=dtype), torch.randn(2, 3, 8, dtype=dtype)
    torch.library.opcheck(ops.bias_gelu.default, (pre, b, "none"))
    torch.library.opcheck(ops.bias_gelu_bwd.default, (g12, pre, b, "tanh"))
    for save_pre in (True, False):
        torch.library.opcheck(ops.linear_gelu.default, (x, w, b, "tanh", save_pre))
        torch.library.opcheck(ops.fused_mlp.default, (x, w, b, w2, b2, "none", save_pre))
    torch.library.opcheck(ops.linear_gelu.default, (x, w, None, "none", True))
    torch.library.opcheck(ops.fused_mlp.default, (x, w, None, w2, None, "tanh", True))
    torch.library.opcheck(ops.linear_gelu_bwd.default, (g12, x, w, pre, "none"))
    torch.library.opcheck(ops.fused_mlp_bwd.default, (g8, x, w, w2, pre, "tanh"))


def test_opcheck_autograd():
    dt = torch.float64
    x, w, b = (t.requires_grad_() for t in _linear_inputs((2, 3), 8, 12, True, dt))
    w2 = torch.randn(8, 12, dtype=dt, requires_grad=True)
    torch.library.opcheck(ops.bias_gelu.default, (torch.randn(2, 12, dtype=dt, requires_grad=True), b, "tanh"))
    torch.library.opcheck(ops.linear_gelu.default, (x, w, b, "none", True))
    torch.library.opcheck(ops.fused_mlp.default, (x, w, b, w2, None, "tanh", True))


# ----------------------------------------------------------------------------- bad input

def _bg_args():
    return torch.randn(3, 8), torch.randn(8)


def _lin_args():
    x, w, b = _linear_inputs((3,), 8, 12, True, torch.float32)
    return x, w, b


def _mlp_args():
    x, w1, b1 = _lin_args()
    return x, w1, b1, torch.randn(6, 12), torch.randn(6)


@pytest.mark.parametrize("make,match", [
    (lambda x, b: (x.int(), b, "none"), r"x must have dtype"),
    (lambda x, b: (x, b.double(), "none"), r"bias must have the dtype of x"),
    (lambda x, b: (x, b[:-1], "none"), r"bias\.shape\[0\]"),
    (lambda x, b: (x, b[None], "none"), r"bias must be a 1-D tensor"),
    (lambda x, b: (x, b, "erf"), r"approximate must be"),
    (lambda x, b: (x[0, 0], b, "none"), r"x must have at least 1 dimension"),
])
def test_bias_gelu_rejects_bad_input(make, match):
    with pytest.raises(RuntimeError, match=match):
        ops.bias_gelu(*make(*_bg_args()))


def test_bias_gelu_bwd_rejects_bad_grad():
    x, b = _bg_args()
    with pytest.raises(RuntimeError, match=r"grad_out must have the leading dims of x"):
        ops.bias_gelu_bwd(torch.randn(4, 8), x, b, "none")
    with pytest.raises(RuntimeError, match=r"grad_out must have the dtype of x"):
        ops.bias_gelu_bwd(torch.randn(3, 8, dtype=torch.float64), x, b, "none")


@pytest.mark.parametrize("make,match", [
    (lambda x, w, b: (x.to(torch.int64), w, b, "none", False), r"x must have dtype"),
    (lambda x, w, b: (x, w[None], b, "none", False), r"weight must be a 2-D tensor"),
    (lambda x, w, b: (x, w.half(), b, "none", False), r"weight must have the dtype of x"),
    (lambda x, w, b: (x, w[:, :-1], b, "none", False), r"weight\.shape\[1\]"),
    (lambda x, w, b: (x, w, b[:-1], "none", False), r"bias must be a 1-D tensor \[12\]"),
    (lambda x, w, b: (x, w, b.double(), "none", False), r"bias must have the dtype of x"),
    (lambda x, w, b: (x, w, b, "fast", False), r"approximate must be"),
])
def test_linear_gelu_rejects_bad_input(make, match):
    with pytest.raises(RuntimeError, match=match):
        ops.linear_gelu(*make(*_lin_args()))


def test_linear_gelu_bwd_rejects_bad_input():
    x, w, _ = _lin_args()
    g, pre = torch.randn(3, 12), torch.randn(3, 12)
    with pytest.raises(RuntimeError, match=r"grad_out must have the leading dims of x"):
        ops.linear_gelu_bwd(torch.randn(3, 11), x, w, pre, "none")
    with pytest.raises(RuntimeError, match=r"pre must have the leading dims of x"):
        ops.linear_gelu_bwd(g, x, w, torch.randn(2, 12), "none")
    with pytest.raises(RuntimeError, match=r"pre must have the dtype of x"):
        ops.linear_gelu_bwd(g, x, w, pre.double(), "none")
    with pytest.raises(RuntimeError, match=r"approximate must be"):
        ops.linear_gelu_bwd(g, x, w, pre, "")


@pytest.mark.parametrize("make,match", [
    (lambda x, w1, b1, w2, b2: (x.bool(), w1, b1, w2, b2), r"x must have dtype"),
    (lambda x, w1, b1, w2, b2: (x, w1.double(), b1, w2, b2), r"w1 must have the dtype of x"),
    (lambda x, w1, b1, w2, b2: (x, w1[:, :-1], b1, w2, b2), r"w1\.shape\[1\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1[:-1], w2, b2), r"b1 must be a 1-D tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2[None], b2), r"w2 must be a 2-D tensor"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2.double(), b2), r"w2 must have the dtype of x"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2[:, :-1], b2), r"w2\.shape\[1\] \(F, as w1\.shape\[0\]\)"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[:-1]), r"b2 must be a 1-D tensor \[6\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2.half()), r"b2 must have the dtype of x"),
])
def test_fused_mlp_rejects_bad_input(make, match):
    with pytest.raises(RuntimeError, match=match):
        ops.fused_mlp(*make(*_mlp_args()), "none", False)


def test_fused_mlp_rejects_bad_approximate_and_grads():
    x, w1, b1, w2, b2 = _mlp_args()
    with pytest.raises(RuntimeError, match=r"approximate must be"):
        ops.fused_mlp(x, w1, b1, w2, b2, "tanh ", False)
    pre = torch.randn(3, 12)
    with pytest.raises(RuntimeError, match=r"grad_out must have the leading dims of x"):
        ops.fused_mlp_bwd(torch.randn(3, 12), x, w1, w2, pre, "none")
    with pytest.raises(RuntimeError, match=r"pre must have the leading dims of x"):
        ops.fused_mlp_bwd(torch.randn(3, 6), x, w1, w2, torch.randn(3, 6), "none")


@pytest.mark.cuda
def test_gelu_ops_reject_mixed_devices():
    x, w, b = _lin_args()
    with pytest.raises(RuntimeError, match=r"(weight|x) must be on the device"):
        ops.linear_gelu(x, w.cuda(), b, "none", False)
    with pytest.raises(RuntimeError, match=r"(bias|x) must be on the device"):
        ops.bias_gelu(x, b.cuda()[:8], "none")
    x, w1, b1, w2, b2 = _mlp_args()
    with pytest.raises(RuntimeError, match=r"(w2|x) must be on the device"):
        ops.fused_mlp(x, w1, b1, w2.cuda(), b2, "none", False)
