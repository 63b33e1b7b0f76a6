"""Benchmark cases and providers of the attention variants (issue 15), on top of
providers.py's Case, timing loop and records:

- attention_window: a causal sliding window (Mistral's: each query sees itself and
  the W - 1 keys before it), S 8192, W 1024. tfkernels (window_size=(W-1, 0)) skips
  the tiles outside the band; SDPA gets the same band as an explicit boolean mask
  (it computes all S^2 scores); flex_attention gets it as a block mask and skips
  empty blocks (compiled; on the CPU where inductor runs).
- attention_softcap: Gemma 2's logit softcap (c = 50) against the eager code a
  model writes (scores, c * tanh(s / c), softmax, PV) and torch.compile of it.

Rates count the work a band needs: 4 * B * H * D * (visible query-key pairs)
forward, 3.5x that forward+backward, the same for every provider (so SDPA's
full-matrix work shows as a lower rate).
"""
import math

import torch

import providers
from providers import Case, Prepared, Skip

OPS = ("attention_window", "attention_softcap")
FAMILY = {op: "attention" for op in OPS}
PROVIDERS = {
    "attention_window": ["tfkernels", "sdpa-mask", "flex", "eager"],
    "attention_softcap": ["tfkernels", "eager", "compile"],
}
SOFTCAP = 50.0


def _shapes(op, device, grid):
    """(dtype, shape, headline)."""
    out = []
    for dtype in ("bf16", "fp32") if device == "cuda" else ("fp32", "bf16"):
        if op == "attention_window":
            shape = (("B", 1), ("H", 8 if device == "cpu" else 16), ("S", 8192), ("D", 64 if device == "cpu" else 128),
                     ("W", 1024))
        else:
            s = 2048 if device == "cpu" else 4096
            shape = (("B", 1 if device == "cpu" else 4), ("H", 8 if device == "cpu" else 16), ("S", s),
                     ("D", 64 if device == "cpu" else 128), ("causal", False))
        out.append((dtype, shape, dtype == "fp32"))
    return out


def cases(op, device=None, grid=None):
    device = device or providers.bench_device()
    grid = grid or providers.bench_grid()
    return [Case(op, direction, provider, dtype, shape, headline)
            for direction in providers.DIRECTIONS
            for dtype, shape, headline in _shapes(op, device, grid)
            for provider in PROVIDERS[op]]


def params(op):
    import pytest

    ordered = sorted(cases(op), key=lambda c: c.provider in ("compile", "flex"))
    return [pytest.param(c, id=c.id) for c in ordered]


def _window_pairs(s, w):
    """Visible (query, key) pairs of a causal window of W keys: sum_i min(i + 1, W)."""
    full = max(0, s - w)
    return full * w + min(s, w) * (min(s, w) + 1) // 2


def work(case):
    d = case.dims
    pairs = _window_pairs(d["S"], d["W"]) if case.op == "attention_window" else d["S"] * d["S"]
    flops = 4 * d["B"] * d["H"] * d["D"] * pairs
    return (flops * 7 // 2 if case.direction == "fwd+bwd" else flops), "TFLOP/s"


def _band(s, w, device):
    i = torch.arange(s, device=device).view(-1, 1)
    j = torch.arange(s, device=device).view(1, -1)
    return (j <= i) & (j > i - w)  # True = visible


def _softcapped_eager(q, k, v, scale):
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _flex(s, w, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Skip(f"flex_attention unavailable in torch {torch.__version__}") from err

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - w)

    try:
        block_mask = create_block_mask(sliding, None, None, s, s, device=device)
    except Exception as err:  # noqa: BLE001
        raise Skip(f"flex_attention block mask failed on {device}: {providers.first_line(err)}") from err
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def prepare(case, device):
    d = case.dims
    b, h, s, hd = d["B"], d["H"], d["S"], d["D"]
    scale = 1.0 / math.sqrt(hd)

    def make():
        return tuple(providers._randn((b, h, s, hd), case.dtype, device) for _ in range(3))

    p = case.provider
    score_bytes = b * h * s * s * providers._elsize(case.dtype)
    if case.op == "attention_window":
        w = d["W"]
        if p == "tfkernels":
            tfk = providers._tfkernels()
            fn = lambda q, k, v: tfk.flash_attention(q, k, v, is_causal=True, window_size=(w - 1, 0))  # noqa: E731
            return Prepared(fn, make, (0, 1, 2))
        if p == "sdpa-mask":
            mask = _band(s, w, device)
            fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa
            return Prepared(fn, make, (0, 1, 2))
        if p == "flex":
            return Prepared(_flex(s, w, device), make, (0, 1, 2), compiled=True)
        if p == "eager":
            if score_bytes > providers._score_limit(device):
                raise Skip(providers._score_skip(score_bytes, device))
            hidden = ~_band(s, w, device)
            return Prepared(lambda q, k, v: providers.eager_attention(q, k, v, hidden, scale), make, (0, 1, 2))
    else:
        if p == "tfkernels":
            tfk = providers._tfkernels()
            return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, softcap=SOFTCAP), make, (0, 1, 2))
        if p in ("eager", "compile"):
            if score_bytes > providers._score_limit(device):
                raise Skip(providers._score_skip(score_bytes, device))
            fn = providers._maybe_compile(lambda q, k, v: _softcapped_eager(q, k, v, scale), p)
            return Prepared(fn, make, (0, 1, 2), compiled=p == "compile")
    raise ValueError(f"unknown provider {p} for {case.op}")
