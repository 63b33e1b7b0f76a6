"""The packing property of flash_attention_varlen, on every device (cpu, emu, cuda):
varlen over a packed batch equals the per-sequence dense calls of the padded op
(flash_attention_fwd / _bwd, what tfkernels.flash_attention runs) on the same data,
forward (out, lse) and backward (dq, dk, dv, dsinks).

On the CUDA kernels (emu, cuda) both sides run the same kernel math over the same
tiles (a packed sequence's tiles start at its own row 0, as a dense call's do), so
out, lse, dk, dv and the deterministic dq must be bitwise equal; the default dq
sums fp32 atomics in another order (1 ulp of the dtype), dsinks sums the rows of
all sequences at once (a few fp32 ulps). On the CPU two different kernels meet
(the packed one and the padded one): a few ulps of the dtype.

Parity with tfkernels.reference is tests/test_attention_varlen.py's job; this file
checks that packing changes nothing: offsets, per-sequence lengths and masks,
lse [H, total_q], the dropout counters (sequence, head, row, key), and that
no element is left unwritten (outputs start NaN-poisoned, conftest).

The emulated device runs the cases marked emu_quick (totals <= ~256 rows); lengths
300 and 1000 run on cpu and cuda only (gpu_only). Until a device has a varlen
kernel its cases skip, naming the missing kernel.
"""
import itertools

import pytest
import torch

from . import devices
from .attention_cases import gpu_only, quick

_ops = torch.ops.tfkernels
HALF = [torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------ helpers

def _call(op_name, *args):
    """The op, or a skip naming the kernel a device does not have yet."""
    try:
        return getattr(_ops, op_name)(*args)
    except NotImplementedError as e:
        first = str(e).strip().split("\n")[0].split(". ")[0]
        pytest.skip(f"no {op_name} kernel on this device yet: {first}")


def _cu(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _packed(lens, heads, head_dim, dtype, device):
    return torch.randn(sum(lens), heads, head_dim, dtype=dtype, device=device)


def _dense(t, start, end):
    """Rows [start, end) of a packed [total, H, D] tensor as a [1, H, L, D] view."""
    return t[start:end].permute(1, 0, 2).unsqueeze(0)


def _variant_args(kw, sinks):
    """The ops' variant arguments: window_left, window_right, softcap, sinks, dropout_p, rng_state."""
    left, right = kw.get("window", (-1, -1))
    return (left, right, kw.get("softcap", 0.0), sinks, kw.get("dropout_p", 0.0), kw.get("rng_state"))


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8) if a.numel() else a,
                                              b.contiguous().view(torch.uint8) if b.numel() else b)


def _assert_matches(actual, expected, name, ulps):
    """ulps = 0: bitwise equal. Else within ulps x the dtype's round-off at the largest
    magnitude (a bug in an offset or a mask is O(1) off)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{name}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}"
    assert not torch.isnan(actual).any(), f"{name}: NaN (an element left unwritten?)"
    if ulps == 0:
        if not _same_bits(actual, expected):
            diff = (actual.double() - expected.double()).abs().nan_to_num(0.0)
            raise AssertionError(f"{name}: not bitwise equal to the per-sequence dense calls "
                                 f"(max |diff| {float(diff.max()):.3e} at {diff.argmax().item()})")
        return
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{name}: the +-inf pattern differs"
    finite = torch.isfinite(expected)
    a, e = actual[finite].double(), expected[finite].double()
    mag = float(e.abs().max()) if e.numel() else 0.0
    tol = ulps * torch.finfo(actual.dtype).eps * max(mag, 1e-3)
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol, f"{name}: max |diff| {err:.3e} > {ulps} ulps at magnitude {mag:.3e} ({tol:.3e})"


def _tolerances(device_name, dtype, deterministic):
    """ulps per output: 0 where both sides run one kernel over the same tiles."""
    if device_name == "cpu":
        u = 4 if dtype != torch.float32 else 64
        return dict(out=u, lse=64, dq=u, dk=u, dv=u, dsinks=1000)
    atomics = dtype != torch.float32 and not deterministic  # 16-bit default mode: dq by fp32 atomicAdd
    # dsinks: one fp32 sum over every sequence's rows against a sum of per-sequence sums.
    return dict(out=0, lse=0, dq=2 if atomics else 0, dk=0, dv=0, dsinks=1000)


def _run_packed(q, k, v, cu_q, cu_k, max_q, max_k, grad_out, grad_lse, kw, sinks, deterministic):
    attrs = (kw.get("is_causal", False), kw.get("alignment", "top_left"), kw.get("scale"))
    variants = _variant_args(kw, sinks)
    out, lse = _call("flash_attention_varlen_fwd", q, k, v, cu_q, cu_k, max_q, max_k, *attrs, deterministic,
                     *variants)
    grads = _call("flash_attention_varlen_bwd", grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                  *attrs, deterministic, *variants)
    return out, lse, grads


def _run_dense(q, k, v, q_lens, k_lens, grad_out, grad_lse, kw, sinks, deterministic):
    """The padded op once per sequence (batch 1), results scattered into packed tensors."""
    attrs = (kw.get("is_causal", False), kw.get("alignment", "top_left"), kw.get("scale"))
    variants = _variant_args(kw, sinks)
    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsinks = torch.zeros(q.shape[1] if sinks is not None else 0, device=q.device)
    q0 = k0 = 0
    for lq, lk in zip(q_lens, k_lens):
        qs, ks = slice(q0, q0 + lq), slice(k0, k0 + lk)
        qb, kb, vb, gob = (_dense(t, s.start, s.stop) for t, s in ((q, qs), (k, ks), (v, ks), (grad_out, qs)))
        glb = None if grad_lse is None else grad_lse[:, qs].unsqueeze(0)
        ob, lb = _ops.flash_attention_fwd(qb, kb, vb, *attrs, None, deterministic, *variants)
        gq, gk, gv, gs = _ops.flash_attention_bwd(gob, glb, qb, kb, vb, ob, lb, *attrs, None, deterministic, *variants)
        out[qs], lse[:, qs] = ob[0].permute(1, 0, 2), lb[0]
        dq[qs], dk[ks], dv[ks] = gq[0].permute(1, 0, 2), gk[0].permute(1, 0, 2), gv[0].permute(1, 0, 2)
        if sinks is not None:
            dsinks += gs
        q0, k0 = q0 + lq, k0 + lk
    return out, lse, (dq, dk, dv, dsinks)


def check_packing(device_name, torch_device, q_lens, k_lens, dtype, head_dim, heads=2, kv_heads=2,
                  deterministic=False, with_sinks=False, with_grad_lse=True, **kw):
    q = _packed(q_lens, heads, head_dim, dtype, torch_device)
    k = _packed(k_lens, kv_heads, head_dim, dtype, torch_device)
    v = _packed(k_lens, kv_heads, head_dim, dtype, torch_device)
    cu_q, cu_k = _cu(q_lens, torch_device), _cu(k_lens, torch_device)
    sinks = (torch.randn(heads) * 1.5).to(torch_device) if with_sinks else None
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(heads, q.shape[0], device=torch_device) if with_grad_lse else None
    max_q, max_k = max(q_lens, default=0), max(k_lens, default=0)

    out, lse, (dq, dk, dv, dsinks) = _run_packed(q, k, v, cu_q, cu_k, max_q, max_k, grad_out, grad_lse, kw, sinks,
                                                 deterministic)
    assert out.is_contiguous() and lse.shape == (heads, q.shape[0]) and lse.dtype == torch.float32
    ref_out, ref_lse, (rq, rk, rv, rs) = _run_dense(q, k, v, q_lens, k_lens, grad_out, grad_lse, kw, sinks,
                                                    deterministic)
    tol = _tolerances(device_name, dtype, deterministic)
    _assert_matches(out, ref_out, "out", tol["out"])
    _assert_matches(lse, ref_lse, "lse", tol["lse"])
    _assert_matches(dq, rq, "dq", tol["dq"])
    _assert_matches(dk, rk, "dk", tol["dk"])
    _assert_matches(dv, rv, "dv", tol["dv"])
    if with_sinks:
        _assert_matches(dsinks, rs, "dsinks", tol["dsinks"])
    else:
        assert dsinks.shape == (0,)


@pytest.fixture(params=devices.ALL_DEVICES)
def dev(request):
    """(name, torch device): "cpu", "emu" (CPU tensors, CUDA kernels emulated) or "cuda"."""
    with devices.on(request.param) as torch_device:
        yield request.param, torch_device


# ------------------------------------------------------------------------------ the property
# (id, q_lens, k_lens, dtype, head_dim, heads, kv_heads, deterministic, options, marks)
_CASES = [
    # The emulated quick grid: each axis at least once, totals <= ~256 rows.
    ("fp16-d64-gqa-causal_br", [17, 0, 113, 1], [17, 5, 113, 30], torch.float16, 64, 4, 2, False,
     dict(is_causal=True, alignment="bottom_right"), quick),
    ("bf16-d40-window-softcap-sinks-det", [1, 113, 17], [1, 113, 17], torch.bfloat16, 40, 2, 2, True,
     dict(window=(20, 5), softcap=5.0, with_sinks=True), quick),
    ("fp32-d80-mqa-causal_tl-sinks", [17, 113, 0, 1], [113, 17, 1, 0], torch.float32, 80, 3, 1, False,
     dict(is_causal=True, with_sinks=True), quick),
    ("fp16-d80-full-no_grad_lse-det", [113, 0, 17], [30, 17, 113], torch.float16, 80, 2, 1, True,
     dict(with_grad_lse=False), quick),
    ("bf16-d64-window_br-causal", [17, 113], [113, 17], torch.bfloat16, 64, 2, 2, False,
     dict(is_causal=True, alignment="bottom_right", window=(16, -1)), quick),
    # Beyond the quick grid (TFKERNELS_EMU_GRID=full on emu).
    ("fp32-d40-gqa-window-det", [0, 1, 17, 113], [113, 17, 1, 0], torch.float32, 40, 4, 2, True,
     dict(window=(7, 30)), ()),
    ("fp16-d64-softcap-sinks-causal_tl", [113, 113, 1], [17, 113, 113], torch.float16, 64, 2, 2, False,
     dict(is_causal=True, softcap=2.0, with_sinks=True), ()),
    ("bf16-d80-gqa-scale-det", [17, 17, 17], [1, 0, 113], torch.bfloat16, 80, 6, 2, True,
     dict(scale=-0.3), ()),
    # Long sequences (several query and key tiles per sequence): cpu and cuda only.
    ("bf16-d64-long-causal_br", [300, 1, 1000, 0, 17], [1000, 17, 300, 113, 0], torch.bfloat16, 64, 4, 2, False,
     dict(is_causal=True, alignment="bottom_right"), gpu_only),
    ("fp16-d40-long-window-sinks-det", [1000, 300], [300, 1000], torch.float16, 40, 2, 1, True,
     dict(window=(64, 64), with_sinks=True), gpu_only),
    ("fp32-d80-long-causal_tl-softcap", [300, 17, 1000], [300, 1000, 17], torch.float32, 80, 2, 2, False,
     dict(is_causal=True, softcap=3.0), gpu_only),
]


@pytest.mark.parametrize(
    "q_lens,k_lens,dtype,head_dim,heads,kv_heads,deterministic,options",
    [pytest.param(*c[1:9], id=c[0], marks=c[9]) for c in _CASES])
def test_packed_equals_per_sequence_dense(dev, q_lens, k_lens, dtype, head_dim, heads, kv_heads, deterministic,
                                          options):
    name, torch_device = dev
    check_packing(name, torch_device, q_lens, k_lens, dtype, head_dim, heads, kv_heads, deterministic, **options)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_packed_equals_per_sequence_dense_grid(dev, alignment, dtype, deterministic):
    """Both alignments x dtypes x dQ modes on one mixed batch (full grid only on emu)."""
    name, torch_device = dev
    check_packing(name, torch_device, [17, 1, 0, 113], [113, 0, 1, 17], dtype, 64, 4, 2, deterministic,
                  is_causal=True, alignment=alignment)


# ------------------------------------------------------------------------------ dropout counters

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@quick
def test_dropout_draws_what_the_padded_op_draws(dev, dtype):
    """Dropout counters are (sequence b, head, row, key): varlen with dropout equals the
    padded op over the same sequences as batch entries (equal query lengths, key
    lengths by seqlens_k, so both see the same rows and alignment)."""
    name, torch_device = dev
    heads, kv_heads, head_dim, lq = 2, 1, 64, 17
    k_lens = [17, 0, 30, 5]
    batch, max_k = len(k_lens), max(k_lens)
    q = torch.randn(batch * lq, heads, head_dim, dtype=dtype, device=torch_device)
    k = _packed(k_lens, kv_heads, head_dim, dtype, torch_device)
    v = _packed(k_lens, kv_heads, head_dim, dtype, torch_device)
    grad_out = torch.randn_like(q)
    rng_state = torch.tensor([1234, 5678], dtype=torch.int64, device=torch_device)
    kw = dict(is_causal=True, alignment="bottom_right", dropout_p=0.3, rng_state=rng_state)
    cu_q, cu_k = _cu([lq] * batch, torch_device), _cu(k_lens, torch_device)
    out, lse, (dq, dk, dv, _) = _run_packed(q, k, v, cu_q, cu_k, lq, max_k, grad_out, None, kw, None, True)

    def pad(t):  # packed key rows -> [B, Hkv, max_k, D], random padding (never read)
        p = torch.randn(batch, max_k, *t.shape[1:], dtype=dtype, device=torch_device)
        for b, (s, n) in enumerate(zip(cu_k.tolist(), k_lens)):
            p[b, :n] = t[s:s + n]
        return p.transpose(1, 2)

    q_pad, go_pad = (t.view(batch, lq, heads, head_dim).transpose(1, 2) for t in (q, grad_out))
    k_pad, v_pad = pad(k), pad(v)
    lens = torch.tensor(k_lens, dtype=torch.int32, device=torch_device)
    attrs = (True, "bottom_right", None, lens, True, -1, -1, 0.0, None, 0.3, rng_state)
    o_pad, l_pad = _ops.flash_attention_fwd(q_pad, k_pad, v_pad, *attrs)
    gq, gk, gv, _ = _ops.flash_attention_bwd(go_pad, None, q_pad, k_pad, v_pad, o_pad, l_pad, *attrs)

    tol = _tolerances(name, dtype, True)
    _assert_matches(out, o_pad.transpose(1, 2).reshape_as(q), "out", tol["out"])
    _assert_matches(lse, l_pad.transpose(0, 1).reshape(heads, -1), "lse", tol["lse"])
    _assert_matches(dq, gq.transpose(1, 2).reshape_as(q), "dq", tol["dq"])
    dk_exp = torch.cat([gk[b, :, :n].transpose(0, 1) for b, n in enumerate(k_lens)])
    dv_exp = torch.cat([gv[b, :, :n].transpose(0, 1) for b, n in enumerate(k_lens)])
    _assert_matches(dk, dk_exp, "dk", tol["dk"])
    _assert_matches(dv, dv_exp, "dv", tol["dv"])
    # And dropout did act: without it the output differs.
    out0, _ = _call("flash_attention_varlen_fwd", q, k, v, cu_q, cu_k, lq, max_k, True, "bottom_right", None, True,
                    -1, -1, 0.0, None, 0.0, None)
    assert not torch.equal(out0, out)


# ------------------------------------------------------------------------------ layouts and sizes

@quick
def test_strided_views_and_misalignment(dev):
    """q, k, v as views of wider buffers (row strides past H * D, k and v interleaved,
    an odd storage offset that the launchers copy away), grad_out expanded: the
    result equals the contiguous call's."""
    name, torch_device = dev
    q_lens, k_lens, heads, kv_heads, d = [17, 0, 40], [9, 30, 1], 4, 2, 64
    tq, tk = sum(q_lens), sum(k_lens)
    qbuf = torch.randn(tq, heads, d + 8, dtype=torch.float16, device=torch_device)
    q = qbuf[..., 1:d + 1]  # misaligned base, row stride H * (D + 8)
    kv = torch.randn(tk, 2, kv_heads, d, dtype=torch.float16, device=torch_device)
    k, v = kv[:, 0], kv[:, 1]
    cu_q, cu_k = _cu(q_lens, torch_device), _cu(k_lens, torch_device)
    args = (cu_q, cu_k, max(q_lens), max(k_lens), True, "bottom_right", None, True, -1, -1, 0.0, None, 0.0, None)
    out, lse = _call("flash_attention_varlen_fwd", q, k, v, *args)
    out_c, lse_c = _call("flash_attention_varlen_fwd", q.contiguous(), k.contiguous(), v.contiguous(), *args)
    ulps = 0 if name != "cpu" else 4
    _assert_matches(out, out_c, "out", ulps)
    _assert_matches(lse, lse_c, "lse", ulps)
    grad_out = torch.randn(1, heads, d, dtype=torch.float16, device=torch_device).expand(tq, -1, -1)
    g = _call("flash_attention_varlen_bwd", grad_out, None, q, k, v, out, lse, *args)
    g_c = _call("flash_attention_varlen_bwd", grad_out.contiguous(), None, q.contiguous(), k.contiguous(),
                v.contiguous(), out_c, lse_c, *args)
    for name_, a, b in zip(("dq", "dk", "dv"), g[:3], g_c[:3]):
        assert a.is_contiguous()
        _assert_matches(a, b, name_, ulps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@quick
def test_empty_batches(dev, dtype):
    """B = 0, and sequences that are all empty: outputs of the right shapes, zeros, no launch past the data."""
    name, torch_device = dev
    attrs = (True, "top_left", None, False, -1, -1, 0.0, None, 0.0, None)
    for q_lens, k_lens in (([], []), ([0, 0], [0, 0]), ([0, 3], [0, 0]), ([0, 0], [4, 0])):
        q = _packed(q_lens, 2, 40, dtype, torch_device)
        k = _packed(k_lens, 1, 40, dtype, torch_device)
        v = _packed(k_lens, 1, 40, dtype, torch_device)
        cu_q, cu_k = _cu(q_lens, torch_device), _cu(k_lens, torch_device)
        mq, mk = max(q_lens, default=0), max(k_lens, default=0)
        out, lse = _call("flash_attention_varlen_fwd", q, k, v, cu_q, cu_k, mq, mk, *attrs)
        assert out.shape == q.shape and lse.shape == (2, q.shape[0])
        assert (out == 0).all() and torch.isneginf(lse).all()  # no query sees a key
        dq, dk, dv, _ = _call("flash_attention_varlen_bwd", torch.randn_like(q), None, q, k, v, out, lse, cu_q, cu_k,
                              mq, mk, *attrs)
        for g, t in ((dq, q), (dk, k), (dv, v)):
            assert g.shape == t.shape and (g == 0).all()


# ------------------------------------------------------------------------------ unvalidated cu_seqlens

@pytest.fixture
def emulated_capture(monkeypatch):
    """The emulated device acting as during CUDA graph capture: the launcher cannot read
    cu_seqlens back, so it does not check their values (csrc/emu/launcher_context.h)."""
    monkeypatch.setenv("TFKERNELS_EMU_CAPTURING", "1")
    with devices.on("emu") as torch_device:
        yield torch_device


@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.bfloat16, True),
                                                 (torch.float32, False)], ids=["fp16", "bf16-det", "fp32"])
@pytest.mark.emu
@quick
def test_unvalidated_cu_seqlens_are_clamped(emulated_capture, dtype, deterministic):
    """Bad cu_seqlens (negative, decreasing, past the total) that capture lets through:
    the kernels clamp each sequence to [0, total] (start) and [start, total] (end), so
    they address only the tensors' rows; here that leaves sequences q [0, 17) with k
    [0, 30) and q [17, 40) with k [30, 50), which must equal the dense calls on them.
    Out-of-bounds accesses themselves are what the asan variant
    (TFKERNELS_EMU_VARIANT=asan) and compute-sanitizer on a GPU would report."""
    torch_device = emulated_capture
    heads, kv_heads, d = 4, 2, 64
    q = torch.randn(40, heads, d, dtype=dtype, device=torch_device)
    k = torch.randn(50, kv_heads, d, dtype=dtype, device=torch_device)
    v = torch.randn_like(k)
    cu_q = torch.tensor([-5, 17, 17, 99, -3], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 30, 1000, 7], dtype=torch.int32)
    grad_out = torch.randn_like(q)
    kw = dict(is_causal=True, alignment="bottom_right")
    out, lse, (dq, dk, dv, _) = _run_packed(q, k, v, cu_q, cu_k, 23, 30, grad_out, None, kw, None, deterministic)
    ref_out, ref_lse, (rq, rk, rv, _) = _run_dense(q, k, v, [17, 23], [30, 20], grad_out, None, kw, None,
                                                   deterministic)
    tol = _tolerances("emu", dtype, deterministic)
    for name, a, b in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        _assert_matches(a, b, name, tol[name])


# ------------------------------------------------------------------------------ CUDA only

@pytest.mark.cuda
def test_cuda_graph_capture():
    """Inside capture cu_seqlens are not read back (no sync): the kernels take them
    from the device, so new lengths in the same buffers replay correctly."""
    heads, d, dtype = 4, 64, torch.bfloat16
    q = torch.randn(200, heads, d, device="cuda", dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cu = _cu([50, 0, 150], "cuda")
    args = (cu, cu, 150, 150, True, "bottom_right", None, False, -1, -1, 0.0, None, 0.0, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _ops.flash_attention_varlen_fwd(q, k, v, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = _ops.flash_attention_varlen_fwd(q, k, v, *args)
    for lens in ([50, 0, 150], [1, 149, 50]):
        cu.copy_(_cu(lens, "cuda"))
        graph.replay()
        out_e, lse_e = _ops.flash_attention_varlen_fwd(q, k, v, *args)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
