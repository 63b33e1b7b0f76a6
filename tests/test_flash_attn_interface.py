"""tfkernels.flash_attn_interface: FlashAttention's entry points ([B,S,H,D] layout,
bottom-right causal) on tfkernels' kernels, on every device; and torch's own
varlen_attn against flash_attention_varlen where torch has it (CUDA)."""
import inspect

import pytest
import torch

import tfkernels
from tfkernels import flash_attn_interface as fai
from tfkernels import reference

from .utils import assert_flash_rule

# FlashAttention 2.8's parameter names, in order: code calling these by keyword or position runs unchanged.
SIGNATURES = {
    "flash_attn_func": ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                        "alibi_slopes", "deterministic", "return_attn_probs"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                               "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
                               "deterministic", "return_attn_probs", "block_table"],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                                "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal",
                                "window_size", "softcap", "rotary_interleaved", "alibi_slopes", "num_splits",
                                "return_softmax_lse"],
}


def test_signatures_are_flash_attn_s():
    for name, params in SIGNATURES.items():
        assert list(inspect.signature(getattr(fai, name)).parameters) == params, name


def _check(actual, reference_fn, inputs, name):
    """The flash rule against the reference run in float64 and in float32 on the same inputs."""
    high = reference_fn(*(t.double() if t.is_floating_point() else t for t in inputs))
    low = reference_fn(*inputs)
    for i, (a, h, lo) in enumerate(zip(actual, high, low)):
        assert_flash_rule(a, h, lo, f"{name}[{i}]")


@pytest.mark.emu_quick
def test_flash_attn_func_is_bottom_right_attention_in_bshd(device):
    q = torch.randn(2, 5, 4, 40, device=device)
    k, v = torch.randn(2, 9, 2, 40, device=device), torch.randn(2, 9, 2, 40, device=device)
    for causal in (False, True):
        out, lse, probs = fai.flash_attn_func(q, k, v, causal=causal, window_size=(3, 1), return_attn_probs=True)
        assert out.shape == q.shape and probs is None

        def ref(q, k, v):
            out, lse = reference.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal, causal_alignment="bottom_right",
                                                 window_size=(3, 1), return_lse=True)
            return out.transpose(1, 2), lse

        _check((out, lse), ref, (q, k, v), f"flash_attn_func causal={causal}")
    qkv = torch.stack([q, q, q], dim=2)
    assert torch.equal(fai.flash_attn_qkvpacked_func(qkv, causal=True), fai.flash_attn_func(q, q, q, causal=True))


@pytest.mark.emu_quick
def test_varlen_and_kvcache_entry_points(device):
    dev = device
    if True:
        lengths = [3, 0, 17]
        cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32, device=dev)
        q = torch.randn(20, 4, 64, device=dev)
        k, v = torch.randn(20, 2, 64, device=dev), torch.randn(20, 2, 64, device=dev)
        out, lse, _ = fai.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                                 return_attn_probs=True)
        assert lse.shape == (4, 20)
        _check((out, lse), lambda q, k, v: reference.attention_varlen(q, k, v, cu, cu, is_causal=True,
                                                                      causal_alignment="bottom_right",
                                                                      return_lse=True), (q, k, v), "varlen")

        k_cache = torch.randn(2, 32, 2, 64, device=dev)
        v_cache = torch.randn(2, 32, 2, 64, device=dev)
        seqlens = torch.tensor([5, 20], dtype=torch.int32, device=dev)
        qd = torch.randn(2, 1, 4, 64, device=dev)
        new_k, new_v = torch.randn(2, 1, 2, 64, device=dev), torch.randn(2, 1, 2, 64, device=dev)
        inputs = (qd, k_cache.clone(), v_cache.clone(), new_k, new_v)
        got = fai.flash_attn_with_kvcache(qd, k_cache, v_cache, new_k, new_v, cache_seqlens=seqlens, causal=True)
        _check((got,), lambda q, kc, vc, k, v: reference.attention_with_kvcache(q, kc, vc, k=k, v=v,
                                                                                 cache_seqlens=seqlens,
                                                                                 is_causal=True)[:1],
               inputs, "kvcache")
        assert torch.equal(k_cache[1, 20], new_k[1, 0]) and torch.equal(v_cache[0, 5], new_v[0, 0])


def test_unsupported_arguments_raise():
    q = torch.randn(1, 3, 2, 32)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fai.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match="cache_batch_idx"):
        fai.flash_attn_with_kvcache(q, q, q, cache_seqlens=1, cache_batch_idx=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        fai.flash_attn_with_kvcache(q, q, q, k=q, v=q)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn runs on CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_varlen_attn(causal):
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    lengths = [1, 17, 300, 113]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ours = tfkernels.flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), is_causal=causal,
                                           causal_alignment="bottom_right")
    theirs = varlen.varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0) if causal else (-1, -1))
    ref = reference.attention_varlen(q.double(), k.double(), v.double(), cu, cu, is_causal=causal,
                                     causal_alignment="bottom_right")
    # Both are bf16 flash kernels: ours within twice torch's own error against the float64 reference.
    assert_flash_rule(ours, ref, theirs, "tfkernels vs torch varlen_attn")
