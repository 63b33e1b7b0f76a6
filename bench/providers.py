"""What the benchmark suite measures: cases (op x direction x provider x shape x
dtype), the providers' callables, FLOP/byte counts, and the timing loop.

Shared by bench/conftest.py, the test_bench_*.py suites, and
`python -m tfkernels.bench` (which imports it by path for the device slug).

Settings come from the environment, so that `python -m tfkernels.bench` and a
plain `pytest bench/` agree:

    TFKERNELS_BENCH_DEVICE    cpu | cuda (default: cuda when visible)
    TFKERNELS_BENCH_GRID      full | quick (default full; quick is the trimmed
                              grid device_check.sh runs)
    TFKERNELS_BENCH_COMPILE   headline | all | none: shapes that torch.compile
                              runs on (default headline: compiling takes 5-20 s
                              per case)
    TFKERNELS_BENCH_DEADLINE  unix time after which remaining cases skip
"""
import contextlib
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- settings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIRECTIONS = ("fwd", "fwd+bwd")
FAMILY = {"attention": "attention", "fused_qkv": "qkv", "linear_gelu": "mlp", "fused_mlp": "mlp",
          "bias_gelu": "mlp", "attention_window": "attention", "attention_softcap": "attention"}
GELU = "tanh"  # every GELU provider uses the tanh form, so cuBLASLt's epilogue compares like for like

# Provider order (tables, chart colours). "bound" providers do less work than the op
# (the GEMM alone) and are shown as a ceiling, never counted as a peer.
PROVIDERS = {
    "attention": ["tfkernels", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "eager",
                  "compile"],
    "fused_qkv": ["tfkernels", "eager", "compile", "gemm-only"],
    "linear_gelu": ["tfkernels", "eager", "cublaslt", "compile", "gemm-only"],
    "fused_mlp": ["tfkernels", "eager", "cublaslt", "compile", "gemm-only"],
    "bias_gelu": ["tfkernels", "eager", "compile"],
}
BOUND_PROVIDERS = {"gemm-only"}


def bench_device():
    dev = os.environ.get("TFKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"TFKERNELS_BENCH_DEVICE must be cpu or cuda, got {dev!r}")
    return dev


def bench_grid():
    grid = os.environ.get("TFKERNELS_BENCH_GRID", "full")
    if grid not in ("full", "quick"):
        raise ValueError(f"TFKERNELS_BENCH_GRID must be full or quick, got {grid!r}")
    return grid


def compile_policy():
    policy = os.environ.get("TFKERNELS_BENCH_COMPILE", "headline")
    if policy not in ("headline", "all", "none"):
        raise ValueError(f"TFKERNELS_BENCH_COMPILE must be headline, all or none, got {policy!r}")
    return policy


_LOAD_AT_IMPORT = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

# --------------------------------------------------------------------------- device identity

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device):
    """bench/results/<slug>/: nvidia-h200, cpu-amd-epyc-2c."""
    if device == "cuda":
        return slugify(torch.cuda.get_device_name())
    model = re.sub(r"\b(\d+-core processor|processor|cpu @.*|\(r\)|\(tm\))", " ", cpu_model().lower())
    return f"cpu-{slugify(model)}-{os.cpu_count()}c"


def environment(device):
    env = {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": (torch.version.cuda or "") if device == "cuda" else "",
        "torch_cuda": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "grid": bench_grid(),
        "compile": compile_policy(),
        "gelu": GELU,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if os.environ.get("TFKERNELS_BENCH_NOTE"):
        env["note"] = os.environ["TFKERNELS_BENCH_NOTE"]
    if hasattr(os, "getloadavg"):
        # Other work on the machine skews CPU timings: keep the 1-minute load at start and end.
        env["loadavg"] = [_LOAD_AT_IMPORT, round(os.getloadavg()[0], 2)]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["sms"] = props.multi_processor_count
        env["cudnn"] = str(torch.backends.cudnn.version() or "")
    try:
        import tfkernels

        env["tfkernels_build"] = tfkernels.build_info()
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        env["tfkernels_build"] = f"import failed: {first_line(err)}"
    return env


def cache_bytes(device):
    """The last-level cache that a repeated input would stay in (L2 on a GPU, L3 on a CPU)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or (32 << 20)


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    op: str
    direction: str
    provider: str
    dtype: str
    shape: tuple  # ((name, value), ...) in display order
    headline: bool = False

    @property
    def dims(self):
        return dict(self.shape)

    @property
    def shape_label(self):
        parts = []
        for name, value in self.shape:
            if name == "causal":
                parts.append("causal" if value else "non-causal")
            else:
                parts.append(f"{name}{value}")
        return " ".join(parts)

    @property
    def id(self):
        return f"{self.direction}-{self.provider}-{self.dtype}-{self.shape_label.replace(' ', '-')}"

    @property
    def peer(self):
        return self.provider != "tfkernels" and self.provider not in BOUND_PROVIDERS

    def meta(self):
        return {"op": self.op, "family": FAMILY[self.op], "direction": self.direction, "provider": self.provider,
                "dtype": self.dtype, "shape": self.dims, "shape_label": self.shape_label, "peer": self.peer,
                "bound": self.provider in BOUND_PROVIDERS, "headline": self.headline}


def _attention_shapes(device, grid):
    """(dtype, shape, headline) for attention."""
    out = []
    if device == "cuda":
        dtypes = ["bf16", "fp16"] if grid == "full" else ["bf16"]
        seqlens = [512, 1024, 2048, 4096, 8192, 16384] if grid == "full" else [512, 2048, 8192]
        for dtype in dtypes:
            for head_dim in (64, 128):
                for causal in (False, True):
                    for s in seqlens:
                        shape = (("B", 16384 // s), ("H", 2048 // head_dim), ("S", s), ("D", head_dim),
                                 ("causal", causal))
                        headline = dtype == "bf16" and head_dim == 128 and s == 2048 and not causal
                        out.append((dtype, shape, headline))
    else:
        dtypes = ["fp32", "bf16"]
        seqlens = [512, 2048] if grid == "full" else [2048]
        for dtype in dtypes:
            for causal in ((False, True) if grid == "full" else (False,)):
                for s in seqlens:
                    shape = (("B", 1), ("H", 8), ("S", s), ("D", 64), ("causal", causal))
                    out.append((dtype, shape, s == 2048 and not causal))
    return out


def _gemm_shapes(op, device, grid):
    """(dtype, shape, headline) for fused_qkv, linear_gelu, fused_mlp, bias_gelu."""
    if device == "cuda":
        tokens, dtypes = 16384, ["bf16"]
        if grid == "full":
            widths = [1024, 2048, 4096]
        else:
            widths = [1024, 4096] if op == "fused_qkv" else [2048]
        headline_width = 1024 if op == "fused_qkv" else 2048
    else:
        tokens, widths, headline_width = 2048, [1024], 1024
        # fp32 everywhere, plus bf16 for linear_gelu (the CPU aim: linear_gelu vs eager).
        dtypes = ["fp32", "bf16"] if grid == "full" and op == "linear_gelu" else ["fp32"]
    out = []
    for dtype in dtypes:
        for d in widths:
            if op == "fused_qkv":
                seqlen = min(tokens, 2048)
                shape = (("B", tokens // seqlen), ("S", seqlen), ("d", d), ("H", d // 64), ("D", 64))
            elif op == "bias_gelu":
                shape = (("M", tokens), ("N", 4 * d))
            elif op == "linear_gelu":
                shape = (("M", tokens), ("K", d), ("N", 4 * d))
            else:
                shape = (("M", tokens), ("d", d), ("ff", 4 * d))
            out.append((dtype, shape, d == headline_width))
    return out


def cases(op, device=None, grid=None):
    device = device or bench_device()
    grid = grid or bench_grid()
    shapes = _attention_shapes(device, grid) if op == "attention" else _gemm_shapes(op, device, grid)
    result = []
    for direction in DIRECTIONS:
        for dtype, shape, headline in shapes:
            for provider in provider_list(op, device):
                result.append(Case(op, direction, provider, dtype, shape, headline))
    return result


def provider_list(op, device):
    names = PROVIDERS[op]
    if op == "attention":
        cuda_backends = {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"}
        # The CPU has one SDPA path (the default); on CUDA each backend is forced in turn.
        names = [n for n in names if (n in cuda_backends) == (device == "cuda") or n not in cuda_backends | {"sdpa"}]
    return names


def params(op):
    """pytest.param list for a suite file."""
    import pytest

    # torch.compile cases run last in each suite: when a time budget runs out, they are what is left out.
    ordered = sorted(cases(op), key=lambda c: c.provider == "compile")
    return [pytest.param(c, id=c.id) for c in ordered]


# --------------------------------------------------------------------------- work counts

def _elsize(dtype):
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def work(case):
    """(amount, unit): FLOPs for TFLOP/s, bytes for GB/s, per call."""
    if case.op in ("attention_window", "attention_softcap"):  # bench/providers_attention_variants.py
        import providers_attention_variants

        return providers_attention_variants.work(case)
    d = case.dims
    bwd = case.direction == "fwd+bwd"
    if case.op == "attention":
        flops = 4 * d["B"] * d["H"] * d["S"] * d["S"] * d["D"]
        if d["causal"]:
            flops //= 2
        return (flops * 7 // 2 if bwd else flops), "TFLOP/s"
    if case.op == "bias_gelu":
        es = _elsize(case.dtype)
        mn, n = d["M"] * d["N"], d["N"]
        # fwd reads x, bias and writes y; bwd reads dy, x, bias and writes dx, dbias.
        return ((5 * mn + 3 * n) * es if bwd else (2 * mn + n) * es), "GB/s"
    if case.op == "fused_qkv":
        tokens, width = d["B"] * d["S"], d["d"]
        flops = 2 * tokens * width * 3 * width
    elif case.op == "linear_gelu":
        flops = 2 * d["M"] * d["K"] * d["N"]
    else:  # fused_mlp: two GEMMs
        flops = 2 * 2 * d["M"] * d["d"] * d["ff"]
    return (3 * flops if bwd else flops), "TFLOP/s"  # backward: grad input + grad weight


def rate(case, seconds):
    amount, unit = work(case)
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    return amount / seconds / scale, unit


# --------------------------------------------------------------------------- skips, failures, deadline

RECORDS = {"skipped": [], "failed": []}  # written into the JSON by conftest


class Skip(Exception):
    """A provider the device lacks, or a case this run leaves out: skipped with its reason."""


def first_line(err, limit=200):
    text = str(err).strip().splitlines()
    text = text[0] if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_deadline(margin_s=0.0):
    """Skip when the case would start after the deadline, or less than margin_s before it."""
    deadline = os.environ.get("TFKERNELS_BENCH_DEADLINE")
    if deadline and time.time() + margin_s > float(deadline):
        raise Skip("time budget of this run exhausted (TFKERNELS_BENCH_DEADLINE)")


# --------------------------------------------------------------------------- providers

def _randn(shape, dtype, device, scale=1.0):
    t = torch.randn(shape, dtype=torch.float32, device=device)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(DTYPES[dtype])


def _score_limit(device):
    return (4 << 30) if device == "cuda" else (1 << 30)


@dataclass
class Prepared:
    """A provider ready to time: fn(*inputs) -> tensor or tuple of tensors."""
    fn: object
    make_inputs: object  # () -> tuple of tensors (fresh copy)
    grad_index: tuple = ()  # which inputs get gradients in fwd+bwd
    context: object = field(default=contextlib.nullcontext)
    compiled: bool = False


def _tfkernels():
    try:
        import tfkernels
    except Exception as err:  # noqa: BLE001
        raise Skip(f"tfkernels failed to import: {first_line(err)}") from err
    return tfkernels


def _sdpa_context(provider):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[provider]
    return lambda: sdpa_kernel(backend)


def eager_attention(q, k, v, mask, scale):
    """The attention a user writes by hand: softmax(q k^T * scale) v."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _prepare_attention(case, device):
    d = case.dims
    b, h, s, hd, causal = d["B"], d["H"], d["S"], d["D"], d["causal"]
    scale = 1.0 / math.sqrt(hd)

    def make():
        return tuple(_randn((b, h, s, hd), case.dtype, device) for _ in range(3))

    p = case.provider
    if p == "tfkernels":
        tfk = _tfkernels()
        return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, is_causal=causal), make, (0, 1, 2))
    if p.startswith("sdpa"):
        if p in ("sdpa-math",) and b * h * s * s * _elsize(case.dtype) > _score_limit(device):
            raise Skip(_score_skip(b * h * s * s * _elsize(case.dtype), device))
        ctx = _sdpa_context(p) if p != "sdpa" else contextlib.nullcontext
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), make, (0, 1, 2),
                        context=ctx)
    if p in ("eager", "compile"):
        score_bytes = b * h * s * s * _elsize(case.dtype)
        if score_bytes > _score_limit(device):
            raise Skip(_score_skip(score_bytes, device))
        mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1) if causal else None
        fn = lambda q, k, v: eager_attention(q, k, v, mask, scale)  # noqa: E731
        return Prepared(_maybe_compile(fn, p), make, (0, 1, 2), compiled=p == "compile")
    raise ValueError(f"unknown attention provider {p}")


def _score_skip(nbytes, device):
    return (f"would materialise a {nbytes / 2**30:.1f} GiB score matrix per call "
            f"(limit {_score_limit(device) >> 30} GiB on {device})")


def _maybe_compile(fn, provider):
    if provider != "compile":
        return fn
    torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no dynamic-shape guesses
    return torch.compile(fn, dynamic=False)


def _prepare_linear(case, device):
    d = case.dims
    op, p = case.op, case.provider
    if op == "fused_qkv":
        b, s, width, heads = d["B"], d["S"], d["d"], d["H"]

        def make():
            return (_randn((b, s, width), case.dtype, device), _randn((3 * width, width), case.dtype, device,
                                                                      width**-0.5),
                    _randn((3 * width,), case.dtype, device, 0.1))

        if p == "tfkernels":
            tfk = _tfkernels()
            fn = lambda x, w, bias: tfk.fused_qkv(x, w, bias, num_heads=heads)  # noqa: E731
        elif p in ("eager", "compile"):
            from tfkernels import reference

            fn = _maybe_compile(lambda x, w, bias: reference.fused_qkv(x, w, bias, num_heads=heads), p)
        elif p == "gemm-only":
            fn = F.linear
        else:
            raise ValueError(p)
        return Prepared(fn, make, (0, 1, 2), compiled=p == "compile")

    if op == "bias_gelu":
        m, n = d["M"], d["N"]

        def make():
            return _randn((m, n), case.dtype, device), _randn((n,), case.dtype, device, 0.1)

        if p == "tfkernels":
            tfk = _tfkernels()
            fn = lambda x, bias: tfk.bias_gelu(x, bias, approximate=GELU)  # noqa: E731
        elif p in ("eager", "compile"):
            fn = _maybe_compile(lambda x, bias: F.gelu(x + bias, approximate=GELU), p)
        else:
            raise ValueError(p)
        return Prepared(fn, make, (0, 1), compiled=p == "compile")

    if op == "linear_gelu":
        m, k, n = d["M"], d["K"], d["N"]

        def make():
            return (_randn((m, k), case.dtype, device), _randn((n, k), case.dtype, device, k**-0.5),
                    _randn((n,), case.dtype, device, 0.1))

        if p == "tfkernels":
            tfk = _tfkernels()
            fn = lambda x, w, bias: tfk.linear_gelu(x, w, bias, approximate=GELU)  # noqa: E731
        elif p in ("eager", "compile"):
            fn = _maybe_compile(lambda x, w, bias: F.gelu(F.linear(x, w, bias), approximate=GELU), p)
        elif p == "cublaslt":
            _need_cublaslt(case, device)
            fn = lambda x, w, bias: torch._addmm_activation(bias, x, w.t(), use_gelu=True)  # noqa: E731
        elif p == "gemm-only":
            fn = F.linear
        else:
            raise ValueError(p)
        return Prepared(fn, make, (0, 1, 2), compiled=p == "compile")

    if op == "fused_mlp":
        m, width, ff = d["M"], d["d"], d["ff"]

        def make():
            return (_randn((m, width), case.dtype, device), _randn((ff, width), case.dtype, device, width**-0.5),
                    _randn((ff,), case.dtype, device, 0.1), _randn((width, ff), case.dtype, device, ff**-0.5),
                    _randn((width,), case.dtype, device, 0.1))

        if p == "tfkernels":
            tfk = _tfkernels()
            fn = lambda x, w1, b1, w2, b2: tfk.fused_mlp(x, w1, b1, w2, b2, approximate=GELU)  # noqa: E731
        elif p in ("eager", "compile"):
            fn = _maybe_compile(
                lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1), approximate=GELU), w2, b2), p)
        elif p == "cublaslt":
            _need_cublaslt(case, device)
            fn = lambda x, w1, b1, w2, b2: torch.addmm(  # noqa: E731
                b2, torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2.t())
        elif p == "gemm-only":
            fn = lambda x, w1, b1, w2, b2: F.linear(F.linear(x, w1, b1), w2, b2)  # noqa: E731
        else:
            raise ValueError(p)
        return Prepared(fn, make, (0, 1, 2, 3, 4), compiled=p == "compile")
    raise ValueError(f"unknown op {op}")


def _need_cublaslt(case, device):
    if device != "cuda":
        raise Skip("cuBLASLt GELU epilogue is CUDA-only (on the CPU torch._addmm_activation is addmm + gelu)")
    if case.direction == "fwd+bwd":
        raise Skip("torch._addmm_activation has no autograd formula (forward only)")


def prepare(case, device):
    if case.op in ("attention_window", "attention_softcap"):
        import providers_attention_variants

        return providers_attention_variants.prepare(case, device)
    if case.op == "attention":
        return _prepare_attention(case, device)
    return _prepare_linear(case, device)


# --------------------------------------------------------------------------- timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _copies(inputs, device):
    """How many copies of the inputs to cycle so that they do not sit in cache between calls."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    return max(1, min(8, math.ceil(2 * cache_bytes(device) / max(nbytes, 1))))


class Step:
    """One timed call, cycling through input copies; on CUDA it synchronises every
    `every` calls, so a pedantic round of `every` iterations ends with the device idle."""

    def __init__(self, prepared, case, device):
        self.fn = prepared.fn
        self.device = device
        first = prepared.make_inputs()
        self.inputs = [first] + [prepared.make_inputs() for _ in range(_copies(first, device) - 1)]
        self.backward = case.direction == "fwd+bwd"
        self.grad_outputs = None
        if self.backward:
            for inp in self.inputs:
                for i in prepared.grad_index:
                    inp[i].requires_grad_(True)
            self.leaves = [tuple(inp[i] for i in prepared.grad_index) for inp in self.inputs]
        self.index = 0
        self.calls = 0
        self.every = 1

    def run_once(self):
        inp = self.inputs[self.index]
        out = self.fn(*inp)
        if self.backward:
            outs = _flatten(out)
            if self.grad_outputs is None:
                self.grad_outputs = [torch.randn_like(o) for o in outs]
            grads = torch.autograd.grad(outs, self.leaves[self.index], self.grad_outputs)
            out = (*outs, *grads)
        self.index = (self.index + 1) % len(self.inputs)
        return out

    def __call__(self):
        self.run_once()
        self.calls += 1
        if self.device == "cuda" and self.calls % self.every == 0:
            torch.cuda.synchronize()


def _timing_plan(device, grid):
    # (seconds per round on CUDA, total seconds per case, min rounds, max rounds)
    if device == "cuda":
        return 0.01, (0.25 if grid == "quick" else 0.5), 5, 50
    return 0.0, (0.6 if grid == "quick" else 1.5), 3, 10


def run_case(benchmark, case, request=None):
    """Prepare, warm up, time with benchmark.pedantic, and record extra_info.

    Raises pytest.skip for providers the device lacks; lets real failures fail the test.
    """
    import pytest

    device = bench_device()
    try:
        check_deadline(45.0 if case.provider == "compile" else 0.0)  # compiling alone can take most of a minute
        if _BROKEN_CONTEXT:
            raise Skip(f"CUDA context unusable after the error in {_BROKEN_CONTEXT[0]} (next suite starts afresh)")
        if case.provider == "compile" and not compile_allowed(case):
            if compile_policy() == "none":
                raise Skip("torch.compile left out of this run (TFKERNELS_BENCH_COMPILE=none / --compile none)")
            raise Skip("torch.compile runs on the headline shapes only (compiling takes 5-20 s a case; "
                       "--compile all for every shape)")
        prepared = prepare(case, device)
        with prepared.context():
            step = Step(prepared, case, device)
            start = time.perf_counter()
            first = _warm_up(step, case, prepared)
            warm_up_s = time.perf_counter() - start
            _check_finite(first, case)
            del first
            per_call = _estimate(step, device, None if prepared.compiled else warm_up_s)
            round_s, case_s, min_rounds, max_rounds = _timing_plan(device, bench_grid())
            iterations = max(1, min(1000, round(round_s / per_call))) if round_s else 1
            rounds = int(max(min_rounds, min(max_rounds, case_s // (per_call * iterations))))
            step.every = iterations
            step.calls = 0
            copies = len(step.inputs)
            benchmark.group = f"{case.op} {case.direction} {case.dtype} {case.shape_label}"
            benchmark.pedantic(step, rounds=rounds, iterations=iterations,
                               warmup_rounds=1 if device == "cuda" else 0)
    except Skip as why:
        _record_skip(case, str(why))
        pytest.skip(str(why))
    except torch.OutOfMemoryError as err:
        _free(device)
        _record_skip(case, f"out of memory: {first_line(err, 120)}")
        pytest.skip(f"out of memory: {first_line(err, 120)}")
    except Exception as err:
        RECORDS["failed"].append({**case.meta(), "error": f"{type(err).__name__}: {first_line(err)}"})
        if device == "cuda" and ("CUDA error" in str(err) or type(err).__name__ == "AcceleratorError"):
            _BROKEN_CONTEXT.append(case.id)  # errors such as an illegal address are sticky: later cases would fail too
        raise
    finally:
        step = prepared = None  # noqa: F841 - release the inputs before the next case
        _free(device)

    median = benchmark.stats.stats.median
    value, unit = rate(case, median)
    amount, _ = work(case)
    info = benchmark.extra_info
    info.update(case.meta())
    info.update({"value": value, "unit": unit, "work": amount, "median_s": median, "rounds": rounds,
                 "iterations": iterations, "input_copies": copies})
    info.update(_env_short(device))
    info["tflops" if unit == "TFLOP/s" else "gbps"] = value
    if request is not None:
        request.node.user_properties.append(("tfk_result", f"{_fmt_rate(value, unit)}  {median * 1e3:.3f} ms"))


_ENV_SHORT = {}
_BROKEN_CONTEXT = []


def _env_short(device):
    if device not in _ENV_SHORT:
        _ENV_SHORT[device] = {"device_name": device_name(device), "torch": torch.__version__,
                              "cuda": (torch.version.cuda or "") if device == "cuda" else ""}
    return _ENV_SHORT[device]


def _fmt_rate(value, unit):
    if unit == "TFLOP/s" and value < 1:
        return f"{value * 1e3:.1f} GFLOP/s"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def compile_allowed(case):
    """Headline shapes; on the CPU only their fp32 ones (inductor's CPU bf16 compile is slow)."""
    policy = compile_policy()
    if policy == "headline" and bench_device() == "cpu":
        return case.headline and case.dtype == "fp32"
    return policy == "all" or (policy == "headline" and case.headline)


def _warm_up(step, case, prepared):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step.run_once()
            _sync(step.device)
    except NotImplementedError as err:
        found = re.search(r"Could not run '([^']+)' with arguments from the '(\w+)' backend", str(err))
        if found:
            raise Skip(f"no {found.group(2)} kernel for {found.group(1)} in this build") from err
        raise Skip(f"not implemented on {step.device}: {first_line(err, 120)}") from err
    except RuntimeError as err:
        msg = str(err)
        if case.provider.startswith("sdpa") and "No available kernel" in msg:
            why = "; ".join(first_line(w.message, 140) for w in caught if "kernel" in str(w.message).lower())
            raise Skip(f"{case.provider} backend unavailable here: {why or first_line(err)}") from err
        if case.provider == "tfkernels" and ("no kernel" in msg.lower() or "not implemented" in msg.lower()):
            raise Skip(f"no tfkernels kernel for this case: {first_line(err)}") from err
        if prepared.compiled:
            raise Skip(f"torch.compile failed: {first_line(err)}") from err
        raise
    except Exception as err:
        if prepared.compiled and not isinstance(err, torch.OutOfMemoryError):
            raise Skip(f"torch.compile failed: {type(err).__name__}: {first_line(err)}") from err
        raise
    return out


def _check_finite(out, case):
    for i, t in enumerate(_flatten(out)):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise AssertionError(f"{case.provider} produced non-finite values in output {i} of {case.op} "
                                 f"{case.direction} {case.dtype} {case.shape_label}")


def _estimate(step, device, warm_up_s=None):
    """Seconds per call, to choose rounds and iterations (not part of the results): the
    warm-up call's time on the CPU when nothing was compiled in it, else 1-3 more calls."""
    if warm_up_s is not None and device == "cpu":
        return max(warm_up_s, 1e-7)
    n, start = 0, time.perf_counter()
    while True:
        step.run_once()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed > 0.05 or n >= 3:
            return max(elapsed / n, 1e-7)


def _record_skip(case, reason):
    RECORDS["skipped"].append({**case.meta(), "reason": reason})


def _free(device):
    if device == "cuda":
        torch.cuda.empty_cache()
