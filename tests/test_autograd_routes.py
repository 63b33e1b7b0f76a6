"""The two autograd routes of the differentiable ops (tfkernels/ops.py, _register_autograd).

In plain eager mode the public wrappers go through a torch.autograd.Function built from
the same setup and backward as the formula registered on the op, which is what
torch.compile, torch.func, autocast and direct torch.ops callers use. Both routes must
give the same outputs and gradients bit for bit, and each must be taken where it should.
CPU, fp32, fresh random data per case.
"""
import pytest
import torch

import tfkernels
from tfkernels import ops

FUNCTION_ROUTE = "_functionBackward"  # grad_fn of the eager autograd.Function
REGISTERED_ROUTE = "GeneratedBackwardFor_tfkernels_"  # grad_fn of torch.library.register_autograd


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).requires_grad_()


def _attention():
    q, k, v = _leaf(2, 4, 17, 40), _leaf(2, 2, 23, 40), _leaf(2, 2, 23, 40)
    sinks = _leaf(4)

    def run(q, k, v, sinks):
        out, lse = tfkernels.flash_attention(q, k, v, is_causal=True, causal_alignment="bottom_right", sinks=sinks,
                                             return_lse=True)
        return out, lse

    return run, (q, k, v, sinks)


def _varlen():
    q, k, v = _leaf(30, 4, 40), _leaf(30, 2, 40), _leaf(30, 2, 40)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)

    def run(q, k, v):
        return tfkernels.flash_attention_varlen(q, k, v, cu, cu, 17, 17, is_causal=True, return_lse=True)

    return run, (q, k, v)


def _qkv():
    x, w, b = _leaf(2, 17, 64), _leaf(3 * 64, 64, scale=0.125), _leaf(3 * 64, scale=0.1)

    def run(x, w, b):
        q, _, v = tfkernels.fused_qkv(x, w, b, num_heads=4)  # k unused: its gradient arrives as None
        return q, v

    return run, (x, w, b)


def _bias_gelu():
    return (lambda x, b: tfkernels.bias_gelu(x, b, approximate="tanh")), (_leaf(17, 80), _leaf(80))


def _linear_gelu():
    return tfkernels.linear_gelu, (_leaf(17, 40), _leaf(80, 40, scale=0.15), _leaf(80))


def _fused_mlp():
    return tfkernels.fused_mlp, (_leaf(17, 40), _leaf(80, 40, scale=0.15), _leaf(80), _leaf(40, 80, scale=0.1),
                                 _leaf(40))


CASES = {"flash_attention": _attention, "flash_attention_varlen": _varlen, "fused_qkv": _qkv,
         "bias_gelu": _bias_gelu, "linear_gelu": _linear_gelu, "fused_mlp": _fused_mlp}


def _outputs_and_grads(run, inputs):
    outs = run(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, inputs)
    return [type(o.grad_fn).__name__ for o in outs], [o.detach() for o in outs], grads


@pytest.mark.parametrize("case", CASES)
def test_routes_agree_bitwise(case, monkeypatch):
    run, inputs = CASES[case]()
    routes, outs, grads = _outputs_and_grads(run, inputs)
    assert all(FUNCTION_ROUTE in r for r in routes), routes
    monkeypatch.setattr(ops, "_plain_eager_grad", lambda args: False)
    routes_reg, outs_reg, grads_reg = _outputs_and_grads(run, inputs)
    assert all(r.startswith(REGISTERED_ROUTE) for r in routes_reg), routes_reg
    for a, b in zip(outs + list(grads), outs_reg + list(grads_reg)):
        assert torch.equal(a, b)
    assert all(g.abs().sum() > 0 for g in grads)  # every input got a gradient


def test_registered_route_under_autocast():
    q = _leaf(1, 2, 17, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tfkernels.flash_attention(q, q, q)
    assert out.dtype == torch.bfloat16
    assert type(out.grad_fn).__name__ != "_flash_attention_fwd_functionBackward"
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_no_graph_without_grad():
    x, b = torch.randn(5, 8), torch.randn(8, requires_grad=True)
    with torch.no_grad():
        assert tfkernels.bias_gelu(x, b).grad_fn is None
    assert tfkernels.bias_gelu(x, b.detach()).grad_fn is None

