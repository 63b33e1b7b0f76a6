"""The QKV family: fused_qkv / fused_qkv_bwd against tfkernels.reference, on every device.

Devices (tests/devices.py): a test that takes `device` runs on the CPU, on the
emulated CUDA device ("emu") and on a GPU ("cuda", skipped without one); `cuda_device`
only on the last two (CUDA-only paths: tile shapes, fp32 with TF32, the large grid);
a test with neither runs on the CPU only (float64, which the CUDA kernels lack). The
emulated device runs the cases marked `emu_quick` unless TFKERNELS_EMU_GRID=full;
`gpu_only` cases (minutes each under emulation) run on a GPU only; `sanitize` marks
the small ones compute-sanitizer runs.

The oracle is tfkernels.reference.fused_qkv. The CPU grid compares float64 tightly
and the other dtypes by the FlashAttention rule against float64; the CUDA-style
checks (tests/gemm_checks.py) compare fp16/bf16 by that rule against float32 (TF32
off) and fp32 by relative error against float64, TF32 on and off. Outputs are
NaN-poisoned (conftest), so an unwritten element fails.

The CUDA grid covers, rather than multiplies out, M in {1, 17, 1000, 16384},
E in {40, 64, 768, 1024, 4096}, (H, Hkv) in {(12,12), (16,4), (9,3)},
D in {40, 64, 128}, with and without bias, and every tile shape the heuristic can
pick (64x128 for M <= 64 and few tiles, 128x128, 128x256 for large problems),
plus the generic path (E or D not a multiple of 8, misaligned or strided inputs).
"""
import pytest
import torch

import tfkernels
from tfkernels import reference

from .gemm_checks import (ALL_DTYPES, CPU_DTYPES, HALF_DTYPES, KERNELS, TF32, check_16bit, check_by_dtype, check_fp32,
                          compare_16bit, force_gemm16, gpu_only, leaf, quick, rejects, run_reference, sanitize)
from .utils import assert_close_float64, assert_flash_rule, tf32_matmul

ops = torch.ops.tfkernels
GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")


def make_inputs(device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype, requires_grad=False):
    """x [B, S, E], weight [(H + 2 Hkv) D, E] (scaled to keep outputs O(1)), bias or None."""
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


def run_ref(x, w, b, heads, kv_heads, dtype, grads=None):
    """The reference on copies of x, w, b in `dtype` (TF32 off): ((q, k, v), grads or None)."""
    return run_reference(reference.fused_qkv, (x, w, b), dtype, grads, num_heads=heads, num_kv_heads=kv_heads)


# ============================================================================= the CPU grid

# (batch, seqlen, embed, heads, kv_heads, head_dim, bias, outputs in the loss). Every value of
# S in {1, 17, 113, 1000}, E in {40, 64, 768}, (H, Hkv) in {(12,12), (6,2), (9,3)} and
# D in {8, 40, 64, 80} appears; with and without bias; some cases leave outputs out of the loss.
CPU_CASES = [
    (2, 1, 40, 12, 12, 8, True, "qkv"),
    (2, 17, 64, 6, 2, 40, False, "qk"),
    (1, 113, 768, 9, 3, 64, True, "v"),
    (1, 1000, 64, 6, 2, 80, True, "qkv"),
    (3, 17, 768, 12, 12, 64, False, "kv"),
    (2, 113, 40, 9, 3, 80, True, "q"),
]


def _run(fn, x, w, b, heads, kv_heads, used, grads, dtype=None):
    """Forward + backward of `fn` on copies of the inputs (in `dtype` if given), with
    only the outputs named in `used` in the loss."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    outs = fn(*leaves, num_heads=heads, num_kv_heads=kv_heads)
    picked = [i for i, name in enumerate("qkv") if name in used]
    torch.autograd.backward([outs[i] for i in picked], [grads[i].to(outs[i].dtype) for i in picked])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype,gemm16", CPU_DTYPES)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}_S{}_E{}_H{}_{}_D{}_{}_{}".format(
    *c[:6], "bias" if c[6] else "nobias", c[7]))
def test_fused_qkv_matches_reference(case, dtype, gemm16, monkeypatch):
    force_gemm16(monkeypatch, gemm16)
    batch, seqlen, embed, heads, kv_heads, head_dim, bias, used = case
    x, w, b = make_inputs("cpu", batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype)
    shapes = [(batch, heads, seqlen, head_dim)] + [(batch, kv_heads, seqlen, head_dim)] * 2
    grads = [torch.randn(s, dtype=dtype) for s in shapes]

    outs, dins = _run(tfkernels.fused_qkv, x, w, b, heads, kv_heads, used, grads)
    ref_outs, ref_dins = _run(reference.fused_qkv, x, w, b, heads, kv_heads, used, grads, torch.float64)
    names = ["q", "k", "v", *GRAD_NAMES]
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


@pytest.mark.parametrize("gemm16", ["onednn", "onednn-nodot", "blas"])
@pytest.mark.parametrize("batch,seqlen", [(1, 113), (2, 64)], ids=["tokens113", "tokens128"])
def test_cpu_bf16_outputs_are_exact_sums_rounded_once(gemm16, batch, seqlen, monkeypatch):
    """Small integers make every fp32 sum of the forward and backward GEMMs exact, so
    each bf16 output must be the exact value rounded once to nearest even: sums reach
    ~2000, past bf16's 8 significant bits, ties included. Catches a rounding in
    registers that truncates or mishandles ties, a bias added after rounding, and a
    GEMM that drops or repeats part of the reduction (an odd token count: the
    weight gradient's last pair padded with zeros)."""
    force_gemm16(monkeypatch, gemm16)
    gen = torch.Generator().manual_seed(7)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=gen).to(torch.bfloat16)

    embed, heads, kv_heads, head_dim = 256, 4, 2, 32
    rows = (heads + 2 * kv_heads) * head_dim
    x, w, b = ints(batch, seqlen, embed), ints(rows, embed), ints(rows)
    outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    exact = reference.fused_qkv(x.double(), w.double(), b.double(), num_heads=heads, num_kv_heads=kv_heads)
    for name, out, ref in zip("qkv", outs, exact):
        assert torch.equal(out, ref.to(torch.bfloat16)), name

    grads = [ints(*o.shape) for o in outs]
    grad_x, grad_w, grad_b = torch.ops.tfkernels.fused_qkv_bwd(*grads, x, w)
    g = torch.cat([t.double().transpose(1, 2).reshape(batch * seqlen, -1) for t in grads], dim=1)
    x2d = x.double().reshape(batch * seqlen, embed)
    for name, out, ref in (("grad_x", grad_x, (g @ w.double()).reshape(x.shape)), ("grad_w", grad_w, g.t() @ x2d),
                           ("grad_b", grad_b, g.sum(0))):
        assert torch.equal(out, ref.to(torch.bfloat16)), name


@pytest.mark.parametrize("gemm", ["sgemm", "whole"])
def test_cpu_fp32_forward_over_row_chunks(gemm, monkeypatch):
    """fp32 on MKL runs whole GEMMs over chunks of rows whose output is at most 64 MiB
    (csrc/cpu/fused_qkv.cpp, fused_qkv_fwd_whole): 8193 tokens x 2048 outputs take two
    chunks, the second partial, and a chunk boundary falls inside a sequence. The
    other CPU cases fit one chunk. ("whole": our packed fp32 tiles, where the CPU has them.)"""
    force_gemm16(monkeypatch, gemm)
    batch, seqlen, embed, heads, kv_heads, head_dim = 3, 2731, 64, 16, 8, 64
    x, w, b = make_inputs("cpu", batch, seqlen, embed, heads, kv_heads, head_dim, True, torch.float32)
    outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    refs = reference.fused_qkv(x.double(), w.double(), b.double(), num_heads=heads, num_kv_heads=kv_heads)
    for name, out, ref in zip("qkv", outs, refs):
        check_fp32(name, out, ref, tf32=False)


def test_fused_qkv_backward_op_direct():
    # The backward op itself, with all three gradients, against autograd on the reference.
    batch, seqlen, embed, heads, kv_heads, head_dim = 2, 13, 40, 9, 3, 16
    x, w, _ = make_inputs("cpu", batch, seqlen, embed, heads, kv_heads, head_dim, False, torch.float64)
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
    x, w, b = make_inputs("cpu", 2, 5, 8, 3, 1, 4, bias, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*a):
        return tfkernels.fused_qkv(a[0], a[1], a[2] if bias else None, num_heads=3, num_kv_heads=1)

    assert torch.autograd.gradcheck(fn, args)


def test_fused_qkv_opcheck_autograd():
    x, w, b = make_inputs("cpu", 1, 5, 8, 2, 1, 4, True, torch.float64, requires_grad=True)
    torch.library.opcheck(ops.fused_qkv.default, (x, w, b, 2, 1))


# ============================================================================= the CUDA grid

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


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", SHAPES)
def test_forward_16bit(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    assert q.shape == (batch, heads, seqlen, head_dim)
    assert k.shape == v.shape == (batch, kv_heads, seqlen, head_dim)
    high, _ = run_ref(x, w, b, heads, kv_heads, torch.float32)
    low, _ = run_ref(x, w, b, heads, kv_heads, dtype)
    compare_16bit("qkv", (q, k, v), high, low)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", SHAPES)
def test_backward_16bit(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, dtype, requires_grad=True)
    outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    _, high = run_ref(x, w, b, heads, kv_heads, torch.float32, grads)
    _, low = run_ref(x, w, b, heads, kv_heads, dtype, grads)
    compare_16bit(GRAD_NAMES, (x.grad, w.grad, None if b is None else b.grad), high, low)


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
    high_out, high = run_ref(x, w, b, heads, kv_heads, torch.float32, grads)
    low_out, low = run_ref(x, w, b, heads, kv_heads, dtype, grads)
    compare_16bit("qkv", [o.detach() for o in outs], high_out, low_out)
    compare_16bit(GRAD_NAMES, (x.grad, w.grad, b.grad), high, low)


@pytest.mark.parametrize("tf32", TF32)
@pytest.mark.parametrize("batch,seqlen,embed,heads,kv_heads,head_dim,bias", FP32_SHAPES)
def test_fp32(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, tf32):
    x, w, b = make_inputs(cuda_device, batch, seqlen, embed, heads, kv_heads, head_dim, bias, torch.float32,
                          requires_grad=True)
    with tf32_matmul(tf32):
        outs = tfkernels.fused_qkv(x, w, b, num_heads=heads, num_kv_heads=kv_heads)
        grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
    ref_outs, ref_grads = run_ref(x, w, b, heads, kv_heads, torch.float64, grads)
    for name, a, r in zip("qkv", outs, ref_outs):
        check_fp32(name, a.detach(), r, tf32)
    for name, a, r in zip(GRAD_NAMES, (x.grad, w.grad, None if b is None else b.grad), ref_grads):
        if r is not None:
            check_fp32(name, a, r, tf32)


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
    eager = ops.fused_qkv(x, w, b, 4, 2) + ops.fused_qkv_bwd(gq, gk, gv, x, w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel attributes, allocator) off the capture
        ops.fused_qkv(x, w, b, 4, 2)
        ops.fused_qkv_bwd(gq, gk, gv, x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.fused_qkv(x, w, b, 4, 2) + ops.fused_qkv_bwd(gq, gk, gv, x, w)
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)


@quick
def test_cuda_rejects_bad_input(cuda_device):
    """The CUDA launcher's own checks."""
    x, w, b = make_inputs(cuda_device, 1, 4, 64, 4, 2, 16, True, torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        tfkernels.fused_qkv(x.double(), w.double(), b.double(), num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="weight"):
        tfkernels.fused_qkv(x, w[:, :32], b, num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="bias"):
        tfkernels.fused_qkv(x, w, b[:-1], num_heads=4, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="grad_k"):
        q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
        ops.fused_qkv_bwd(q, k[:, :, :2], v, x, w)


# ============================================================================= every device

@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_strided_and_misaligned_inputs(device, dtype):
    """x as a column slice (rows of stride E + 8, read in place), as a transposed view
    (the launcher copies it), a weight view with a padded row stride, and an x whose
    data pointer is off 16-byte alignment (generic path)."""
    batch, seqlen, embed, heads, kv_heads, head_dim = 3, 19, 64, 6, 2, 16
    n = (heads + 2 * kv_heads) * head_dim
    x_t = torch.randn(seqlen, batch, embed, device=device).to(dtype).transpose(0, 1)  # [B, S, E], strided
    w_pad = (torch.randn(n, embed + 8, device=device) / embed**0.5).to(dtype)[:, :embed]
    b = torch.randn(n, device=device).to(dtype)
    flat = torch.randn(batch * seqlen * embed + 1, device=device).to(dtype)
    x_mis = flat[1:].view(batch, seqlen, embed)
    x_pad = torch.randn(batch, seqlen, embed + 8, device=device).to(dtype)[..., :embed]
    for x in (x_pad, x_t, x_mis):
        outs = tfkernels.fused_qkv(x, w_pad, b, num_heads=heads, num_kv_heads=kv_heads)
        check_by_dtype("qkv", outs, lambda rd, x=x: run_ref(x, w_pad, b, heads, kv_heads, rd)[0], dtype)


@sanitize
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("grad_layout", ["bshd-view", pytest.param("offset-pointer", marks=quick)])
def test_backward_op_reads_strided_grads(device, dtype, grad_layout):
    """fused_qkv_bwd reads dq, dk, dv through their strides: gradients that are
    transposed views of [B, S, H, D] (the layout attention backward often leaves),
    or that start off 16-byte alignment (generic path), give the same answer as
    contiguous ones."""
    batch, seqlen, embed, heads, kv_heads, head_dim = 2, 45, 128, 8, 2, 64
    x, w, _ = make_inputs(device, batch, seqlen, embed, heads, kv_heads, head_dim, False, dtype)

    def grad(h):
        if grad_layout == "bshd-view":
            return torch.randn(batch, seqlen, h, head_dim, device=device).to(dtype).transpose(1, 2)
        flat = torch.randn(batch * h * seqlen * head_dim + 3, device=device).to(dtype)
        return flat[3:].view(batch, h, seqlen, head_dim)

    gq, gk, gv = grad(heads), grad(kv_heads), grad(kv_heads)
    dx, dw, db = ops.fused_qkv_bwd(gq, gk, gv, x, w)
    dx_c, dw_c, db_c = ops.fused_qkv_bwd(gq.contiguous(), gk.contiguous(), gv.contiguous(), x, w)
    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    bs = torch.zeros(w.shape[0], device=device, dtype=dtype, requires_grad=True)
    grads = (gq, gk, gv)
    _, high = run_ref(xs, ws, bs, heads, kv_heads, torch.float32, grads)
    _, low = run_ref(xs, ws, bs, heads, kv_heads, dtype, grads)
    for name, a, a_c, h, lo in zip(GRAD_NAMES, (dx, dw, db), (dx_c, dw_c, db_c), high, low):
        check_16bit(name, a, h, lo)
        if grad_layout == "bshd-view":  # same kernel, same order of summation
            torch.testing.assert_close(a, a_c, rtol=0, atol=0)


@sanitize
@quick
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_from_sum(device, dtype):
    """loss = q.sum() + ...: autograd hands the op expanded gradients (all strides 0)."""
    x, w, b = make_inputs(device, 2, 21, 64, 6, 2, 32, True, dtype, requires_grad=True)

    def loss_of(q, k, v):
        return q.sum() + 2 * k.sum() + (3 * v).sum()  # expanded, expanded, materialised

    loss_of(*tfkernels.fused_qkv(x, w, b, num_heads=6, num_kv_heads=2)).backward()
    results = {}
    for ref_dtype in (torch.float32, dtype):
        xr, wr, br = (leaf(t, ref_dtype) for t in (x, w, b))
        with tf32_matmul(False):
            loss_of(*reference.fused_qkv(xr, wr, br, num_heads=6, num_kv_heads=2)).backward()
        results[ref_dtype] = (xr.grad, wr.grad, br.grad)
    compare_16bit(GRAD_NAMES, (x.grad, w.grad, b.grad), results[torch.float32], results[dtype])


@sanitize
@quick
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_empty_and_degenerate(device, dtype):
    # Zero tokens: empty outputs; the backward still writes dW = 0 and db = 0.
    x, w, b = make_inputs(device, 0, 5, 64, 4, 2, 16, True, dtype, requires_grad=True)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    assert q.shape == (0, 4, 5, 16) and k.shape == (0, 2, 5, 16)
    gx, gw, gb = ops.fused_qkv_bwd(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                                   x.detach(), w.detach())
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
    # E = 0: the projection is the bias alone.
    x, w, b = make_inputs(device, 2, 3, 0, 4, 2, 16, True, dtype)
    q, k, v = tfkernels.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    ref = reference.fused_qkv(x, w, b, num_heads=4, num_kv_heads=2)
    for a, r in zip((q, k, v), ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@sanitize
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_opcheck(device, dtype):
    x, w, b = make_inputs(device, 2, 9, 64, 4, 2, 16, True, dtype, requires_grad=True)
    torch.library.opcheck(ops.fused_qkv.default, (x, w, b, 4, 2))
    torch.library.opcheck(ops.fused_qkv.default, (x.detach(), w.detach(), None, 4, 2))
    grads = [torch.randn(2, h, 9, 16, device=device, dtype=dtype) for h in (4, 2, 2)]
    torch.library.opcheck(ops.fused_qkv_bwd.default, (*grads, x.detach(), w.detach()))


# ============================================================================= bad input (CPU kernel, fake kernel)
# Each table runs on the CPU kernel and on the fake kernel (what torch.compile traces
# with): both reject the input with the same message.

def _good(dtype=torch.float32):
    return make_inputs("cpu", 2, 5, 16, 4, 2, 8, True, dtype)




@pytest.mark.parametrize("kernel", KERNELS)
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
def test_fused_qkv_rejects_bad_input(kernel, mutate, match):
    rejects(kernel, lambda: ops.fused_qkv(*mutate(*_good())), match)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("which,shape,match", [
    (0, (2, 4, 5, 7), r"grad_q must have shape"),
    (1, (2, 2, 5, 7), r"grad_k must have shape"),
    (2, (2, 2, 6, 8), r"grad_v must have shape"),
    (0, (2, 4, 5), r"grad_q must be a 4-D tensor"),
])
def test_fused_qkv_bwd_rejects_bad_grads(kernel, which, shape, match):
    def call():
        x, w, _ = _good()
        grads = [torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)]
        grads[which] = torch.randn(shape)
        return ops.fused_qkv_bwd(*grads, x, w)

    rejects(kernel, call, match)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_qkv_bwd_rejects_mixed_dtype_grad(kernel):
    def call():
        x, w, _ = _good()
        grads = [torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8, dtype=torch.float64), torch.randn(2, 2, 5, 8)]
        return ops.fused_qkv_bwd(*grads, x, w)

    rejects(kernel, call, r"grad_k must have the dtype of x")


@pytest.mark.cuda
def test_fused_qkv_rejects_mixed_devices():
    x, w, b = _good()
    # The dispatcher picks the CUDA kernel for a mix; its checks name the argument.
    with pytest.raises(RuntimeError, match=r"(weight|x) must be on the device"):
        ops.fused_qkv(x, w.cuda(), b, 4, 2)
    with pytest.raises(RuntimeError, match=r"(bias|x) must be on the device"):
        ops.fused_qkv(x, w, b.cuda(), 4, 2)
