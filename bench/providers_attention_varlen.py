"""Providers of packed variable-length attention and of decoding over a KV cache
(issue 16); their cases and work counts are in cases.py.

- attention_varlen: B sequences of the lengths cases.varlen_lengths gives (half of
  the padded batch is padding). tfkernels runs them packed (flash_attention_varlen,
  no padding anywhere); tfkernels-padded runs the padded batch with seqlens_k (the
  kernel skips padded keys but computes padded query rows); SDPA gets the padded
  batch with a boolean padding (and causal) mask; torch-varlen is torch's own
  torch.nn.attention.varlen.varlen_attn on the packed tensors, where it exists.
- attention_decode: one new query per sequence over a full cache, GQA 32/8.
  tfkernels is flash_attention_with_kvcache with num_splits=0 (split-KV chosen from
  the shape), tfkernels-nosplit the same with num_splits=1; SDPA gets
  q [B,H,1,D] against the cache with enable_gqa; kv-read only reads the cache
  (a float32 sum over their bytes): the bandwidth ceiling a decoding step cannot beat.
"""
import torch
import torch.nn.functional as F

from cases import varlen_lengths
from providers import Prepared, Skip, randn, tfkernels_ops
from settings import first_line


def _cu_seqlens(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(device)


def _torch_varlen(device):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise Skip(f"torch.nn.attention.varlen is not in torch {torch.__version__}") from err
    return varlen_attn


def _prepare_varlen(case, device):
    d = case.dims
    b, h, s, hd, causal = d["B"], d["H"], d["S"], d["D"], d["causal"]
    lengths = varlen_lengths(s, b)
    total, longest = sum(lengths), max(lengths)
    p = case.provider

    def packed():
        return tuple(randn((total, h, hd), case.dtype, device) for _ in range(3))

    def padded():
        return tuple(randn((b, h, s, hd), case.dtype, device) for _ in range(3))

    if p == "tfkernels":
        tfk = tfkernels_ops()
        cu = _cu_seqlens(lengths, device)
        return Prepared(lambda q, k, v: tfk.flash_attention_varlen(q, k, v, cu, cu, longest, longest,
                                                                   is_causal=causal), packed, (0, 1, 2))
    if p == "tfkernels-padded":
        tfk = tfkernels_ops()
        seqlens = torch.tensor(lengths, device=device)
        return Prepared(lambda q, k, v: tfk.flash_attention(q, k, v, is_causal=causal, seqlens_k=seqlens), padded,
                        (0, 1, 2))
    if p == "sdpa-padded":
        keys = torch.arange(s, device=device)
        visible = (keys[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
        if causal:
            visible = visible & torch.ones(s, s, dtype=torch.bool, device=device).tril()
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible), padded,
                        (0, 1, 2))
    if p == "torch-varlen":
        varlen_attn = _torch_varlen(device)
        cu = _cu_seqlens(lengths, device)
        window = (-1, 0) if causal else (-1, -1)

        def run(q, k, v):
            return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=window)

        try:  # torch's varlen_attn runs on CUDA only (FlashAttention inside); say so instead of failing
            run(*(t[:1] for t in packed()))
        except Exception as err:  # noqa: BLE001
            raise Skip(f"torch varlen_attn on {device}: {first_line(err)}") from err
        return Prepared(run, packed, (0, 1, 2))
    raise ValueError(f"unknown attention_varlen provider {p}")


def _prepare_decode(case, device):
    d = case.dims
    b, h, hkv, s, hd = d["B"], d["H"], d["Hkv"], d["S"], d["D"]
    p = case.provider

    def cache_layout():  # q [B,1,H,D], caches [B,S,Hkv,D]: FlashAttention's layout
        return (randn((b, 1, h, hd), case.dtype, device),) + tuple(randn((b, s, hkv, hd), case.dtype, device)
                                                                   for _ in range(2))

    if p in ("tfkernels", "tfkernels-nosplit"):
        tfk = tfkernels_ops()
        lengths = torch.full((b,), s, dtype=torch.int32, device=device)
        splits = 0 if p == "tfkernels" else 1
        return Prepared(lambda q, kc, vc: tfk.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=lengths,
                                                                           num_splits=splits), cache_layout)
    if p == "sdpa":
        def heads_first():
            return (randn((b, h, 1, hd), case.dtype, device),) + tuple(randn((b, hkv, s, hd), case.dtype, device)
                                                                       for _ in range(2))
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), heads_first)
    if p == "kv-read":
        # The caches' bytes summed as float32 words: a pure read at the memory's pace
        # (a bf16 sum would convert every element and measure the CPU instead).
        def read(q, kc, vc):
            return kc.view(torch.float32).sum(), vc.view(torch.float32).sum()

        return Prepared(read, cache_layout)
    raise ValueError(f"unknown attention_decode provider {p}")


def prepare(case, device):
    if case.op == "attention_varlen":
        return _prepare_varlen(case, device)
    return _prepare_decode(case, device)
