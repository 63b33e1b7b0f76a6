"""What the benchmarks measure: the cases (op x direction x provider x dtype x shape)
of each device's grid, and the work (FLOPs or bytes) each call does."""
import os
from dataclasses import dataclass

import torch

from settings import DTYPES, bench_device, bench_grid

DIRECTIONS = ("fwd", "fwd+bwd")
# The op family of each benchmarked op: its section and charts in the report
# (bench/report.py keeps a torch-free copy, OP_FAMILY).
FAMILY = {"attention": "attention", "attention_window": "attention", "attention_softcap": "attention",
          "attention_varlen": "attention", "attention_decode": "attention", "fused_qkv": "qkv", "linear_gelu": "mlp", "fused_mlp": "mlp", "bias_gelu": "mlp",
          "gemm": "attention"}
# The suite of each op: its test file (test_bench_<suite>.py), its provider module
# (providers_<suite>.py) and its name in bench/run.py's SUITES. The attention variants
# are a suite of their own (a --suites choice, a budget share) charted with attention.
SUITE = {"attention": "attention", "attention_window": "attention_variants",
         "attention_softcap": "attention_variants", "attention_varlen": "attention_varlen",
         "attention_decode": "attention_varlen", "fused_qkv": "qkv", "linear_gelu": "mlp", "fused_mlp": "mlp",
         "bias_gelu": "mlp", "gemm": "attention"}

# Provider order (tables, chart colours). "bound" providers do less work than the op
# (the GEMM alone) and are shown as a ceiling, never counted as a peer.
PROVIDERS = {
    "attention": ["tfkernels", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "eager",
                  "compile"],
    "fused_qkv": ["tfkernels", "eager", "compile", "gemm-only"],
    "linear_gelu": ["tfkernels", "eager", "cublaslt", "compile", "gemm-only"],
    "fused_mlp": ["tfkernels", "eager", "cublaslt", "compile", "gemm-only"],
    "bias_gelu": ["tfkernels", "eager", "compile"],
    # sdpa-mask: SDPA given the window as a boolean mask (it computes every score);
    # flex: flex_attention with the window as a block mask (compiled, skips empty blocks).
    "attention_window": ["tfkernels", "sdpa-mask", "eager", "flex"],
    "attention_softcap": ["tfkernels", "eager", "compile"],
    # Packed sequences at 50% padding: the varlen kernel against the padded kernel
    # (seqlens_k), SDPA with a padding mask, and torch's own varlen_attn (CUDA).
    "attention_varlen": ["tfkernels", "tfkernels-padded", "sdpa-padded", "torch-varlen"],
    # One new query over a KV cache: split-KV (num_splits=0) against one block per
    # (batch, head) and SDPA; kv-read is a read of the cache's bytes alone (a ceiling).
    "attention_decode": ["tfkernels", "tfkernels-nosplit", "sdpa", "kv-read"],
    # The machine's GEMM throughput (torch.mm, 2048^3), measured in the attention suite:
    # the ceiling that the report reads attention's forward throughput against (issue 14).
    "gemm": ["gemm-ceiling"],
}
BOUND_PROVIDERS = {"gemm-only", "kv-read", "gemm-ceiling"}
# Ops timed in one direction only (inference ops, the GEMM ceiling).
OP_DIRECTIONS = {"attention_decode": ("fwd",), "gemm": ("fwd",)}
# Providers that torch.compile their code: they follow the compile policy (and run last under a time budget).
COMPILED_PROVIDERS = {"compile", "flex"}
SOFTCAP = 50.0  # Gemma 2's attention logit softcap


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
        # "tfkernels-<how>" is our own kernel run another way (padded, unsplit): shown
        # for comparison, never the peer a ratio is taken against.
        return not self.provider.startswith("tfkernels") and self.provider not in BOUND_PROVIDERS

    def meta(self):
        return {"op": self.op, "family": FAMILY[self.op], "direction": self.direction, "provider": self.provider,
                "dtype": self.dtype, "shape": self.dims, "shape_label": self.shape_label, "peer": self.peer,
                "bound": self.provider in BOUND_PROVIDERS, "headline": self.headline}


# --------------------------------------------------------------------------- grids

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
        head_dims = (64, 128) if grid == "full" else (64,)
        for dtype in dtypes:
            for head_dim in head_dims:
                for causal in ((False, True) if grid == "full" else (False,)):
                    for s in seqlens:
                        shape = (("B", 1), ("H", 8), ("S", s), ("D", head_dim), ("causal", causal))
                        out.append((dtype, shape, s == 2048 and head_dim == 64 and not causal))
    return out


def _variant_shapes(op, device, grid):
    """(dtype, shape, headline) for attention_window (Mistral's causal sliding window:
    each query sees itself and the W - 1 keys before it) and attention_softcap.
    The quick grid keeps the headline dtype only."""
    dtypes = ["bf16", "fp32"] if device == "cuda" else ["fp32", "bf16"]
    if grid == "quick":
        dtypes = dtypes[:1]
    heads, head_dim = (16, 128) if device == "cuda" else (8, 64)
    if op == "attention_window":
        shape = (("B", 1), ("H", heads), ("S", 8192), ("D", head_dim), ("W", 1024))
    else:
        shape = ((("B", 4), ("H", heads), ("S", 4096)) if device == "cuda" else (("B", 1), ("H", heads), ("S", 2048)))
        shape += (("D", head_dim), ("causal", False))
    return [(dtype, shape, dtype == dtypes[0]) for dtype in dtypes]


def varlen_lengths(seqlen, count):
    """Sequence lengths of a packed batch of `count` sequences padded to `seqlen`: evenly
    spread from seqlen / (2 count) up, so that half of the padded batch is padding."""
    return [seqlen * (2 * i + 1) // (2 * count) for i in range(count)]


def _kv_shapes(op, device, grid):
    """(dtype, shape, headline) for attention_varlen and attention_decode (Llama-style GQA:
    32 query heads over 8 KV heads, D 128, for decoding)."""
    dtypes = ["bf16"] if device == "cuda" else ["fp32", "bf16"]
    if grid == "quick":
        dtypes = dtypes[:1]
    out = []
    for dtype in dtypes:
        if op == "attention_varlen":
            shape = ((("B", 8), ("H", 16), ("S", 4096), ("D", 128)) if device == "cuda"
                     else (("B", 4), ("H", 8), ("S", 2048), ("D", 64)))
            out += [(dtype, shape + (("causal", causal),), causal and dtype == dtypes[0]) for causal in (True, False)]
            continue
        if device == "cuda":
            grid_bs = [(1, 8192), (64, 8192)] if grid == "quick" else \
                [(b, s) for b in (1, 8, 64) for s in (1024, 8192, 32768)]
        else:
            grid_bs = [(1, 4096), (8, 4096)]
        for b, s in grid_bs:
            shape = (("B", b), ("H", 32), ("Hkv", 8), ("S", s), ("D", 128))
            out.append((dtype, shape, dtype == dtypes[0] and b == 1 and s == (8192 if device == "cuda" else 4096)))
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
        # fp32 everywhere, plus bf16 for the GEMM ops in the full grid (issue 14's goals
        # cover both); bias_gelu is fp32 only.
        dtypes = ["fp32", "bf16"] if grid == "full" and op != "bias_gelu" else ["fp32"]
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


def _gemm_ceiling_shapes(device, grid):
    """(dtype, shape, headline) for the GEMM ceiling: torch.mm of two 2048 x 2048 matrices
    in each dtype of the grid's attention (the report takes the CPU's bf16 ceiling as the
    faster of its bf16 and fp32 rows: a CPU without native bf16 computes in fp32 at best)."""
    dtypes = dict.fromkeys(dtype for dtype, _, _ in _attention_shapes(device, grid))
    return [(dtype, (("M", 2048), ("N", 2048), ("K", 2048)), False) for dtype in dtypes]


def cases(op, device=None, grid=None):
    device = device or bench_device()
    grid = grid or bench_grid()
    if op == "gemm":
        shapes = _gemm_ceiling_shapes(device, grid)
    elif op == "attention":
        shapes = _attention_shapes(device, grid)
    elif op in ("attention_window", "attention_softcap"):
        shapes = _variant_shapes(op, device, grid)
    elif op in ("attention_varlen", "attention_decode"):
        shapes = _kv_shapes(op, device, grid)
    else:
        shapes = _gemm_shapes(op, device, grid)
    result = []
    for direction in OP_DIRECTIONS.get(op, DIRECTIONS):
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

    # The providers of one row (op, direction, dtype, shape) run back to back, compiled ones
    # included, so that a slow minute of a shared machine hits the whole row rather than
    # some of its providers (a CPU VM's speed drifts by up to 2x over minutes; on the CPU
    # the row's first test times all of them, their calls in turn: timing.py). Under a
    # time budget (--time-budget) the compiled cases run last in the suite instead: they
    # are what a budget that runs out leaves out.
    # A second pass (bench/run.py --passes) runs the suite in reverse order, so that a
    # provider slowed by a bad minute in one pass is likely to meet a good one in the other.
    ordered = cases(op)
    if os.environ.get("TFKERNELS_BENCH_ORDER") == "reverse":
        ordered = ordered[::-1]
    if os.environ.get("TFKERNELS_BENCH_DEADLINE"):
        ordered = sorted(ordered, key=lambda c: c.provider in COMPILED_PROVIDERS)
    return [pytest.param(c, id=c.id) for c in ordered]


# --------------------------------------------------------------------------- work counts

def element_size(dtype):
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def window_pairs(s, w):
    """Visible (query, key) pairs of a causal window of W keys: sum over rows i of min(i + 1, W)."""
    full = max(0, s - w)
    return full * w + min(s, w) * (min(s, w) + 1) // 2


def work(case):
    """(amount, unit): FLOPs for TFLOP/s, bytes for GB/s, per call.

    attention_window counts the work its band needs, for every provider, so the
    providers that compute all S^2 scores (SDPA with a mask, eager) show a lower rate;
    attention_varlen likewise counts only the unpadded tokens' work, and
    attention_decode the bytes of K and V that one decoding step must read."""
    d = case.dims
    bwd = case.direction == "fwd+bwd"
    if case.op == "gemm":  # the GEMM ceiling, forward only
        return 2 * d["M"] * d["N"] * d["K"], "TFLOP/s"
    if case.op == "attention_decode":  # the K and V bytes read
        return 2 * d["B"] * d["S"] * d["Hkv"] * d["D"] * element_size(case.dtype), "GB/s"
    if case.op == "attention_varlen":  # the work of the real (unpadded) tokens only
        pairs = sum(n * n for n in varlen_lengths(d["S"], d["B"]))
        flops = 4 * d["H"] * pairs * d["D"] // (2 if d["causal"] else 1)
        return (flops * 7 // 2 if bwd else flops), "TFLOP/s"
    if FAMILY[case.op] == "attention":
        pairs = window_pairs(d["S"], d["W"]) if case.op == "attention_window" else d["S"] * d["S"]
        flops = 4 * d["B"] * d["H"] * pairs * d["D"]
        if d.get("causal"):
            flops //= 2
        return (flops * 7 // 2 if bwd else flops), "TFLOP/s"
    if case.op == "bias_gelu":
        es = element_size(case.dtype)
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
