"""Providers of the attention variants (issue 15); their cases and FLOP counts are
in cases.py.

- attention_window: tfkernels (window_size=(W-1, 0)) skips the tiles outside the
  band; SDPA gets the same band as an explicit boolean mask (it computes all S^2
  scores); flex_attention gets it as a block mask and skips empty blocks (compiled);
  eager masks the full score matrix.
- attention_softcap: Gemma 2's logit softcap against the eager code a model writes
  (scores, c * tanh(s / c), softmax, PV) and torch.compile of it.
"""
import math

import torch
import torch.nn.functional as F

from cases import SOFTCAP, element_size
from providers import Prepared, Skip, maybe_compile, randn, tfkernels_ops
from providers_attention import check_score_bytes, eager_attention
from settings import first_line


def _band(s, w, device):
    """True where query i sees key j: j <= i and j > i - W."""
    i = torch.arange(s, device=device).view(-1, 1)
    j = torch.arange(s, device=device).view(1, -1)
    return (j <= i) & (j > i - w)


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
        raise Skip(f"flex_attention block mask failed on {device}: {first_line(err)}") from err
    compiled = maybe_compile(flex_attention, "compile")
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _prepare_window(case, device, make):
    s, w, scale = case.dims["S"], case.dims["W"], 1.0 / math.sqrt(case.dims["D"])
    p = case.provider
    if p == "tfkernels":
        tfk = tfkernels_ops()
        return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, is_causal=True, window_size=(w - 1, 0)), make,
                        (0, 1, 2))
    if p == "sdpa-mask":
        visible = _band(s, w, device)
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible), make, (0, 1, 2))
    if p == "flex":
        return Prepared(_flex(s, w, device), make, (0, 1, 2), compiled=True)
    if p == "eager":
        hidden = ~_band(s, w, device)
        return Prepared(lambda q, k, v: eager_attention(q, k, v, hidden, scale), make, (0, 1, 2))
    raise ValueError(f"unknown attention_window provider {p}")


def _prepare_softcap(case, device, make):
    scale = 1.0 / math.sqrt(case.dims["D"])
    p = case.provider
    if p == "tfkernels":
        tfk = tfkernels_ops()
        return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, softcap=SOFTCAP), make, (0, 1, 2))
    if p in ("eager", "compile"):
        fn = maybe_compile(lambda q, k, v: _softcapped_eager(q, k, v, scale), p)
        return Prepared(fn, make, (0, 1, 2), compiled=p == "compile")
    raise ValueError(f"unknown attention_softcap provider {p}")


def prepare(case, device):
    d = case.dims
    b, h, s, hd = d["B"], d["H"], d["S"], d["D"]
    if case.provider in ("eager", "compile"):  # they materialise the score matrix
        check_score_bytes(b * h * s * s * element_size(case.dtype), device)

    def make():
        return tuple(randn((b, h, s, hd), case.dtype, device) for _ in range(3))

    if case.op == "attention_window":
        return _prepare_window(case, device, make)
    return _prepare_softcap(case, device, make)
