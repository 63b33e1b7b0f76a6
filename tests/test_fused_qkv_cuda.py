"""fused_qkv / fused_qkv_bwd on CUDA (csrc/cuda/gemm + csrc/cuda/fused_qkv.cpp).

Every test runs on a GPU ("cuda", skipped without one) and on the emulated device
("emu", tests/devices.py), except CUDA-graph capture and the sizes marked
`gpu_only` (minutes each under emulation), which need a GPU. The oracle is
tfkernels.reference.fused_qkv: fp16/bf16 follow the FlashAttention rule against the
reference on float32 copies (TF32 off) and the reference in the dtype; fp32 is
checked by relative error against a float64 reference, with TF32 on and off.
The suite sets TFKERNELS_POISON_OUTPUTS=1 (conftest), so an unwritten element
comes back NaN and fails.

The shape grid covers, rather than multiplies out, M in {1, 17, 1000, 16384},
E in {40, 64, 768, 1024, 4096}, (H, Hkv) in {(12,12), (16,4), (9,3)},
D in {40, 64, 128}, with and without bias, and every tile shape the heuristic can
pick (64x128 for M <= 64 and few tiles, 128x128, 128x256 for large problems),
plus the generic path (E or D not a multiple of 8, misaligned or strided inputs).
"""

import pytest
import torch

import tfkernels
from tfkernels import reference

from .utils import assert_flash_rule, max_abs_err, tf32_matmul



sanitize = pytest.mark.sanitize  # small cases, cheap enough for compute-sanitizer
# Problems of more than ~10^8 multiply-adds take minutes each on the emulated device.
gpu_only = pytest.mark.gpu_only
# The emulated quick grid (make test): every tile shape, the generic path, fp32, views.
quick = pytest.mark.emu_quick




def make_inputs(device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype, requires_grad=False):
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(batch, seqlen, embed, device=device, dtype=torch.float32)
    w = torch.randn(n, embed, device=device, dtype=torch.float32) / max(embed, 1) ** 0.5
    b = torch.randn(n, device=device, dtype=torch.float32) if bias else None
    out = [t.to(dtype) if t is not None else None for t in (x, w, b)]
    if requires_grad:
        for t in out:
            if t is not None:
                t.requires_grad_(True)
    return out


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def run_ref(reference, x, w, b, heads, kv_heads, dtype, grads=None):
    """The reference on copies of x, w, b in `dtype` (TF32 off); with grads, also
    (grad_x, grad_w, grad_b) through autograd."""
    xr, wr, br = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    with tf32_matmul(False):
        outs = reference.fused_qkv(xr, wr, br, num_heads=heads, num_kv_heads=kv_heads)
        if grads is None:
            return outs, None
        torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    return outs, (xr.grad, wr.grad, None if br is None else br.grad)


def check_16bit(name, actual, ref_high, ref_low):
    assert actual.dtype == ref_low.dtype, f"{name}: dtype {actual.dtype} != {ref_low.dtype}"
    assert actual.is_contiguous(), f"{name}: not contiguous"
    assert_flash_rule(actual, ref_high.to(torch.float32), ref_low, name=name)


def check_fp32(name, actual, ref64, tf32):
    assert actual.dtype == torch.float32
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    scale = max(float(ref64.abs().max()) if ref64.numel() else 1.0, 1e-6)
    rel = max_abs_err(actual, ref64) / scale
    # fp32 FMA over K <= 16384: ~1e-6 of the largest value; TF32 (10-bit mantissa): ~1e-3.
    tol = 1e-2 if tf32 else 5e-5
    assert rel <= tol, f"{name}: relative error {rel:.3e} > {tol:.0e} (tf32={tf32})"


# (batch, seqlen, E, H, Hkv, D, bias). M = batch * seqlen.
SHAPES = [
    pytest.param(1, 1, 64, 12, 12, 64, True, id="M1-E64-h12-d64-bias", marks=sanitize),
    pytest.param(1, 17, 40, 9, 3, 40, False, id="M17-E40-h9kv3-d40", marks=[sanitize, quick]),
    pytest.param(1, 17, 4096, 16, 4, 128, True, id="M17-E4096-h16kv4-d128-bias", marks=gpu_only),
    pytest.param(2, 500, 768, 12, 12, 64, True, id="M1000-E768-h12-d64-bias", marks=gpu_only),
    pytest.param(2, 500, 1024, 16, 4, 128, False, id="M1000-E1024-h16kv4-d128", marks=gpu_only),
    pytest.param(2, 500, 64, 9, 3, 40, True, id="M1000-E64-h9kv3-d40-bias"),
    pytest.param(1, 1000, 4096, 12, 12, 128, True, id="M1000-E4096-h12-d128-bias", marks=gpu_only),
    pytest.param(4, 4096, 1024, 16, 4, 64, True, id="M16384-E1024-h16kv4-d64-bias", marks=gpu_only),
    pytest.param(4, 4096, 768, 12, 12, 64, False, id="M16384-E768-h12-d64", marks=gpu_only),
    pytest.param(4, 4096, 40, 9, 3, 40, True, id="M16384-E40-h9kv3-d40-bias", marks=gpu_only),
    # Generic (scalar) path: E or D not a multiple of 8.
    pytest.param(3, 7, 37, 4, 2, 20, True, id="generic-E37-d20-bias", marks=[sanitize, quick]),
    pytest.param(2, 33, 40, 6, 2, 20, False, id="generic-E40-d20"),
    pytest.param(1, 130, 100, 3, 1, 24, True, id="generic-E100-d24-bias"),
]

FP32_SHAPES = [
    pytest.param(1, 17, 40, 9, 3, 40, True, id="M17-E40-h9kv3-d40-bias", marks=[sanitize, quick]),
    pytest.param(2, 500, 768, 12, 12, 64, False, id="M1000-E768-h12-d64", marks=gpu_only),
    pytest.param(1, 1000, 1024, 16, 4, 128, True, id="M1000-E1024-h16kv4-d128-bias", marks=gpu_only),
    pytest.param(4, 4096, 1024, 16, 4, 64, True, id="M16384-E1024-h16kv4-d64-bias", marks=gpu_only),
    pytest.param(3, 7, 37, 4, 2, 20, True, id="E37-d20-bias", marks=[sanitize, quick]),
]

HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", SHAPES)
def test_forward_16bit(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    assert q.shape == (batch, heads, seqlen, head_dim)
    assert k.shape == v.shape == (batch, kv_heads, seqlen, head_dim)
    high, _ = run_ref(reference, x, w, b, heads, kv_heads, torch.float32)
    low, _ = run_ref(reference, x, w, b, heads, kv_heads, dtype)
    for name, a, h, l in zip("qkv", (q, k, v), high, low):
        check_16bit(name, a, h, l)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", SHAPES)
def test_backward_16bit(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype, requires_grad=True)
    outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    _, high = run_ref(reference, x, w, b, heads, kv_heads, torch.float32, grads)
    _, low = run_ref(reference, x, w, b, heads, kv_heads, dtype, grads)
    actual = (x.grad, w.grad, None if b is None else b.grad)
    for name, a, h, l in zip(("grad_x", "grad_weight", "grad_bias"), actual, high, low):
        if h is None:
            assert a is None, f"{name}: expected None without a bias"
            continue
        check_16bit(name, a, h, l)


# Quick grid: every tile in fp16 (bf16 through the same template runs in the small cases).
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16", marks=quick),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("tile", ["128x256", "128x128", "64x128"])
def test_every_tile_shape(cuda_device, tile, dtype, monkeypatch):
    """Each tensor-core tile shape, forced, on a problem with edges in M, N and K
    (M = 300, N = 280, K = 200 = 3 x 64 + 8) in the forward and both backward GEMMs
    (which have no 128x256 shape: it falls back to 128x128)."""
    monkeypatch.setenv("TFKERNELS_GEMM_TILE", tile)
    batch, seqlen, embed, heads, kv_heads, head_dim = 2, 150, 200, 5, 1, 40
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, True, dtype,
                          requires_grad=True)
    outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    high_out, high = run_ref(reference, x, w, b, heads, kv_heads, torch.float32, grads)
    low_out, low = run_ref(reference, x, w, b, heads, kv_heads, dtype, grads)
    for name, a, h, l in zip("qkv", outs, high_out, low_out):
        check_16bit(name, a.detach(), h.detach(), l.detach())
    for name, a, h, l in zip(("grad_x", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad), high, low):
        check_16bit(name, a, h, l)


@pytest.mark.parametrize("tf32", [pytest.param(False, id="tf32-off"), pytest.param(True, id="tf32-on")])
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", FP32_SHAPES)
def test_fp32(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, tf32):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, torch.float32,
                          requires_grad=True)
    with tf32_matmul(tf32):
        outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
        grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
    ref_outs, ref_grads = run_ref(reference, x, w, b, heads, kv_heads, torch.float64, grads)
    for name, a, r in zip("qkv", outs, ref_outs):
        check_fp32(name, a.detach(), r, tf32)
    actual = (x.grad, w.grad, None if b is None else b.grad)
    for name, a, r in zip(("grad_x", "grad_weight", "grad_bias"), actual, ref_grads):
        if r is not None:
            check_fp32(name, a, r, tf32)


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES + [pytest.param(torch.float32, id="fp32")])
def test_strided_and_misaligned_inputs(cuda_device, dtype):
    """x as a column slice (rows of stride E + 8, read in place), as a transposed view
    (the launcher copies it), a weight view with a padded row stride, and an x whose
    data pointer is off 16-byte alignment (generic path)."""
    batch, seqlen, embed, heads, kv_heads, head_dim = 3, 19, 64, 6, 2, 16
    n = (heads + 2 * kv_heads) * head_dim
    x_t = torch.randn(seqlen, batch, embed, device=cuda_device).to(dtype).transpose(0, 1)  # [B, S, E], strided
    w_pad = (torch.randn(n, embed + 8, device=cuda_device) / embed**0.5).to(dtype)[:, :embed]
    b = torch.randn(n, device=cuda_device).to(dtype)
    flat = torch.randn(batch * seqlen * embed + 1, device=cuda_device).to(dtype)
    x_mis = flat[1:].view(batch, seqlen, embed)
    x_pad = torch.randn(batch, seqlen, embed + 8, device=cuda_device).to(dtype)[..., :embed]
    for x in (x_pad, x_t, x_mis):
        outs = tfkernels.fused_qkv(x, w_pad, b, num_heads=heads, num_kv_heads=kv_heads)
        if dtype == torch.float32:
            ref, _ = run_ref(reference, x, w_pad, b, heads, kv_heads, torch.float64)
            for name, a, r in zip("qkv", outs, ref):
                check_fp32(name, a, r, tf32=torch.backends.cuda.matmul.allow_tf32)
        else:
            high, _ = run_ref(reference, x, w_pad, b, heads, kv_heads, torch.float32)
            low, _ = run_ref(reference, x, w_pad, b, heads, kv_heads, dtype)
            for name, a, h, l in zip("qkv", outs, high, low):
                check_16bit(name, a, h, l)


@sanitize
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("grad_layout", ["bshd-view", pytest.param("offset-pointer", marks=quick)])
def test_backward_op_reads_strided_grads(cuda_device, dtype, grad_layout):
    """fused_qkv_bwd reads dq, dk, dv through their strides: gradients that are
    transposed views of [B, S, H, D] (the layout attention backward often leaves),
    or that start off 16-byte alignment (generic path), give the same answer as
    contiguous ones."""
    batch, seqlen, embed, heads, kv_heads, head_dim = 2, 45, 128, 8, 2, 64
    x, w, _ = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, False, dtype)

    def grad(h):
        if grad_layout == "bshd-view":
            return torch.randn(batch, seqlen, h, head_dim, device=cuda_device).to(dtype).transpose(1, 2)
        flat = torch.randn(batch * h * seqlen * head_dim + 3, device=cuda_device).to(dtype)
        return flat[3:].view(batch, h, seqlen, head_dim)

    gq, gk, gv = grad(heads), grad(kv_heads), grad(kv_heads)
    dx, dw, db = torch.ops.tfkernels.fused_qkv_bwd(gq, gk, gv, x, w)
    dx_c, dw_c, db_c = torch.ops.tfkernels.fused_qkv_bwd(gq.contiguous(), gk.contiguous(), gv.contiguous(), x, w)
    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    bs = torch.zeros(w.shape[0], device=cuda_device, dtype=dtype, requires_grad=True)
    grads = (gq, gk, gv)
    _, high = run_ref(reference, xs, ws, bs, heads, kv_heads, torch.float32, grads)
    _, low = run_ref(reference, xs, ws, bs, heads, kv_heads, dtype, grads)
    for name, a, a_c, h, l in zip(("grad_x", "grad_weight", "grad_bias"), (dx, dw, db), (dx_c, dw_c, db_c), high, low):
        check_16bit(name, a, h, l)
        if grad_layout == "bshd-view":  # same kernel, same order of summation
            torch.testing.assert_close(a, a_c, rtol=0, atol=0)


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_from_sum(cuda_device, dtype):
    """loss = q.sum() + ...: autograd hands the op expanded gradients (all strides 0)."""
    x, w, b = make_inputs(cuda_device, 2, 21, 64, 6, 2, 32, True, dtype, requires_grad=True)

    def loss_of(q, k, v):
        return q.sum() + 2 * k.sum() + (3 * v).sum()  # expanded, expanded, materialised

    loss_of(*tfkernels.fused_qkv(x, w, b, num_heads=6, num_kv_heads=2)).backward()
    results = {}
    for ref_dtype in (torch.float32, dtype):
        xr, wr, br = (_leaf(t, ref_dtype) for t in (x, w, b))
        with tf32_matmul(False):
            loss_of(*reference.fused_qkv(xr, wr, br, num_heads=6, num_kv_heads=2)).backward()
        results[ref_dtype] = (xr.grad, wr.grad, br.grad)
    for i, name in enumerate(("grad_x", "grad_weight", "grad_bias")):
        check_16bit(name, (x.grad, w.grad, b.grad)[i], results[torch.float32][i], results[dtype][i])


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES + [pytest.param(torch.float32, id="fp32")])
def test_empty_and_degenerate(cuda_device, dtype):
    # Zero tokens: empty outputs; the backward still writes dW = 0 and db = 0.
    x, w, b = make_inputs(cuda_device, 0, 5, 64, 4, 2, 16, True, dtype, requires_grad=True)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    assert q.shape == (0, 4, 5, 16) and k.shape == (0, 2, 5, 16)
    gx, gw, gb = torch.ops.tfkernels.fused_qkv_bwd(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                                                   x.detach(), w.detach())
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
    # E = 0: the projection is the bias alone.
    x, w, b = make_inputs(cuda_device, 2, 3, 0, 4, 2, 16, True, dtype)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    ref = reference.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    for a, r in zip((q, k, v), ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@gpu_only  # the emulated device checks every launch under two schedules instead
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_deterministic(cuda_device, dtype):
    """No atomics anywhere: two runs agree bit for bit."""
    x, w, b = make_inputs(cuda_device, 2, 500, 768, 12, 12, 64, True, dtype, requires_grad=True)
    results = []
    for _ in range(2):
        for t in (x, w, b):
            t.grad = None
        outs = tfkernels.fused_qkv(x, w, b, num_heads=12, num_kv_heads=12)
        torch.manual_seed(0)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        results.append([o.detach().clone() for o in outs] + [x.grad.clone(), w.grad.clone(), b.grad.clone()])
    for a, c in zip(*results):
        assert torch.equal(a, c)


@sanitize
@pytest.mark.cuda
def test_cuda_graph_capture():
    """Forward and backward launch on the current stream with no host sync."""
    x, w, b = make_inputs("cuda", 2, 37, 128, 4, 2, 32, True, torch.float16)
    gq, gk, gv = [torch.randn(2, h, 37, 32, device="cuda", dtype=torch.float16) for h in (4, 2, 2)]
    eager = torch.ops.tfkernels.fused_qkv(x, w, b, 4, 2) + torch.ops.tfkernels.fused_qkv_bwd(gq, gk, gv, x, w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel attributes, allocator) off the capture
        torch.ops.tfkernels.fused_qkv(x, w, b, 4, 2)
        torch.ops.tfkernels.fused_qkv_bwd(gq, gk, gv, x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.tfkernels.fused_qkv(x, w, b, 4, 2) + torch.ops.tfkernels.fused_qkv_bwd(gq, gk, gv, x, w)
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)


@sanitize
@pytest.mark.parametrize("dtype", HALF_DTYPES + [pytest.param(torch.float32, id="fp32")])
def test_opcheck(cuda_device, dtype):
    x, w, b = make_inputs(cuda_device, 2, 9, 64, 4, 2, 16, True, dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.tfkernels.fused_qkv.default, (x, w, b, 4, 2))
    grads = [torch.randn(2, h, 9, 16, device=cuda_device, dtype=dtype) for h in (4, 2, 2)]
    torch.library.opcheck(torch.ops.tfkernels.fused_qkv_bwd.default, (*grads, x.detach(), w.detach()))


@quick
def test_rejects_bad_input(cuda_device):
    x, w, b = make_inputs(cuda_device, 1, 4, 64, 4, 2, 16, True, torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        tfkernels.fused_qkv(x.double(), w.double(), b.double(), num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="weight"):
        tfkernels.fused_qkv(x, w[:, :32], b, num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="bias"):
        tfkernels.fused_qkv(x, w, b[:-1], num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="grad_k"):
        q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
        torch.ops.tfkernels.fused_qkv_bwd(q, k[:, :, :2], v, x, w)
