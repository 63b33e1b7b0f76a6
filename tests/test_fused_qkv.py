"""fused_qkv / fused_qkv_bwd on the CPU against tfkernels.reference: outputs and every gradient."""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_close_float64, assert_flash_rule

ops = torch.ops.tfkernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (batch, seqlen, embed, heads, kv_heads, head_dim, bias, outputs in the loss). Every value of
# S in {1, 17, 113, 1000}, E in {40, 64, 768}, (H, Hkv) in {(12,12), (6,2), (9,3)} and
# D in {8, 40, 64, 80} appears; with and without bias; some cases leave outputs out of the loss.
CASES = [
    (2, 1, 40, 12, 12, 8, True, "qkv"),
    (2, 17, 64, 6, 2, 40, False, "qk"),
    (1, 113, 768, 9, 3, 64, True, "v"),
    (1, 1000, 64, 6, 2, 80, True, "qkv"),
    (3, 17, 768, 12, 12, 64, False, "kv"),
    (2, 113, 40, 9, 3, 80, True, "q"),
]


def _inputs(batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype):
    rows = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(batch, seqlen, embed, dtype=dtype)
    w = (torch.randn(rows, embed) / embed**0.5).to(dtype)
    b = torch.randn(rows, dtype=dtype) if bias else None
    return x, w, b


def _run(fn, x, w, b, heads, kv_heads, used, grads, dtype=None):
    """Forward + backward of `fn` on copies of the inputs (in `dtype` if given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    outs = fn(*leaves, num_heads=heads, num_kv_heads=kv_heads)
    picked = [i for i, name in enumerate("qkv") if name in used]
    torch.autograd.backward([outs[i] for i in picked], [grads[i].to(outs[i].dtype) for i in picked])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_E{}_H{}_{}_D{}_{}_{}".format(
    *c[:6], "bias" if c[6] else "nobias", c[7]))
def test_fused_qkv_matches_reference(case, dtype):
    batch, seqlen, embed, heads, kv_heads, head_dim, bias, used = case
    x, w, b = _inputs(batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype)
    shapes = [(batch, heads, seqlen, head_dim)] + [(batch, kv_heads, seqlen, head_dim)] * 2
    grads = [torch.randn(s, dtype=dtype) for s in shapes]

    outs, dins = _run(tfkernels.fused_qkv, x, w, b, heads, kv_heads, used, grads)
    ref_outs, ref_dins = _run(reference.fused_qkv, x, w, b, heads, kv_heads, used, grads, torch.float64)
    names = ["q", "k", "v", "grad_x", "grad_weight", "grad_bias"]
    actual, expected = outs + dins, ref_outs + ref_dins
    if dtype == torch.float64:
        for name, a, e in zip(names, actual, expected):
            if e is not None:
                assert a.dtype == dtype and a.is_contiguous(), name
                assert_close_float64(a, e, name=name)
        return
    low_outs, low_dins = _run(reference.fused_qkv, x, w, b, heads, kv_heads, used, grads)
    for name, a, e, lo in zip(names, actual, expected, low_outs + low_dins):
        if e is not None:
            assert a.dtype == dtype and a.is_contiguous(), name
            assert_flash_rule(a, e, lo, name=name)


def test_fused_qkv_backward_op_direct():
    # The backward op itself, with all three gradients, against autograd on the reference.
    batch, seqlen, embed, heads, kv_heads, head_dim = 2, 13, 40, 9, 3, 16
    x, w, _ = _inputs(batch, seqlen, embed, heads, kv_heads, head_dim, False, torch.float64)
    gq = torch.randn(batch, heads, seqlen, head_dim, dtype=torch.float64)
    gk, gv = (torch.randn(batch, kv_heads, seqlen, head_dim, dtype=torch.float64) for _ in range(2))
    gx, gw, gb = ops.fused_qkv_bwd(gq, gk, gv, x, w)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = torch.zeros(w.shape[0], dtype=torch.float64, requires_grad=True)
    outs = reference.fused_qkv(xr, wr, br, num_heads=heads, num_kv_heads=kv_heads)
    torch.autograd.backward(list(outs), [gq, gk, gv])
    assert_close_float64(gx, xr.grad, "grad_x")
    assert_close_float64(gw, wr.grad, "grad_weight")
    assert_close_float64(gb, br.grad, "grad_bias")


@pytest.mark.parametrize("bias", [True, False])
def test_fused_qkv_gradcheck(bias):
    x, w, b = _inputs(2, 5, 8, 3, 1, 4, bias, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*a):
        return tfkernels.fused_qkv(a[0], a[1], a[2] if bias else None, num_heads=3, num_kv_heads=1)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_qkv_opcheck(dtype):
    x, w, b = _inputs(2, 7, 16, 4, 2, 8, True, dtype)
    torch.library.opcheck(ops.fused_qkv.default, (x, w, b, 4, 2))
    torch.library.opcheck(ops.fused_qkv.default, (x, w, None, 4, 2))
    gq = torch.randn(2, 4, 7, 8, dtype=dtype)
    gk, gv = torch.randn(2, 2, 7, 8, dtype=dtype), torch.randn(2, 2, 7, 8, dtype=dtype)
    torch.library.opcheck(ops.fused_qkv_bwd.default, (gq, gk, gv, x, w))


def test_fused_qkv_opcheck_autograd():
    x, w, b = _inputs(1, 5, 8, 2, 1, 4, True, torch.float64)
    torch.library.opcheck(ops.fused_qkv.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2, 1))


# ----------------------------------------------------------------------------- bad input

def _good(dtype=torch.float32):
    return _inputs(2, 5, 16, 4, 2, 8, True, dtype)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, b: (x.to(torch.int32), w, b, 4, 2), r"x must have dtype"),
    (lambda x, w, b: (x[0], w, b, 4, 2), r"x must be a 3-D tensor"),
    (lambda x, w, b: (x, w[None], b, 4, 2), r"weight must be a 2-D tensor"),
    (lambda x, w, b: (x, w.double(), b, 4, 2), r"weight must have the dtype of x"),
    (lambda x, w, b: (x, w, b.double(), 4, 2), r"bias must have the dtype of x"),
    (lambda x, w, b: (x, w[:, :-1], b, 4, 2), r"weight\.shape\[1\]"),
    (lambda x, w, b: (x, w, b, 4, 3), r"num_heads \(4\) must be a multiple of num_kv_heads"),
    (lambda x, w, b: (x, w, b, 0, 1), r"num_heads must be >= 1"),
    (lambda x, w, b: (x, w[:-1], b[:-1], 4, 2), r"weight\.shape\[0\] must be \(num_heads \+ 2\*num_kv_heads\)"),
    (lambda x, w, b: (x, w, b[:-1], 4, 2), r"bias must be a 1-D tensor \[64\]"),
    (lambda x, w, b: (x, w, b[None], 4, 2), r"bias must be a 1-D tensor"),
])
def test_fused_qkv_rejects_bad_input(mutate, match):
    with pytest.raises(RuntimeError, match=match):
        ops.fused_qkv(*mutate(*_good()))


@pytest.mark.parametrize("which,shape,match", [
    (0, (2, 4, 5, 7), r"grad_q must have shape"),
    (1, (2, 2, 5, 7), r"grad_k must have shape"),
    (2, (2, 2, 6, 8), r"grad_v must have shape"),
    (0, (2, 4, 5), r"grad_q must be a 4-D tensor"),
])
def test_fused_qkv_bwd_rejects_bad_grads(which, shape, match):
    x, w, _ = _good()
    grads = [torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)]
    grads[which] = torch.randn(shape)
    with pytest.raises(RuntimeError, match=match):
        ops.fused_qkv_bwd(*grads, x, w)


def test_fused_qkv_bwd_rejects_mixed_dtype_grad():
    x, w, _ = _good()
    grads = [torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8, dtype=torch.float64), torch.randn(2, 2, 5, 8)]
    with pytest.raises(RuntimeError, match=r"grad_k must have the dtype of x"):
        ops.fused_qkv_bwd(*grads, x, w)


@pytest.mark.cuda
def test_fused_qkv_rejects_mixed_devices():
    x, w, b = _good()
    # The dispatcher picks the CUDA kernel for a mix; its checks name the argument.
    with pytest.raises(RuntimeError, match=r"(weight|x) must be on the device"):
        ops.fused_qkv(x, w.cuda(), b, 4, 2)
    with pytest.raises(RuntimeError, match=r"(bias|x) must be on the device"):
        ops.fused_qkv(x, w, b.cuda(), 4, 2)
