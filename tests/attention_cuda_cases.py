"""What the CUDA attention tests (forward and backward) share: the grid and the input makers.

Makers take the torch device first ("cuda", or "cpu" for the emulated device).
"""
import pytest
import torch

from .utils import tf32_matmul

HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
# (is_causal, causal_alignment)
MASKS = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]
MASK_IDS = ["full", "causal_tl", "causal_br"]


@pytest.fixture(autouse=True)
def no_tf32():
    # The float32 oracle must be real fp32 (and the fp32 kernels never use TF32).
    with tf32_matmul(False):
        yield


def make_qkv(device, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, layout="bhsd"):
    """Random q, k, v on `device`; layout "bshd" gives [B,H,S,D] views of [B,S,H,D] storage."""
    def make(h, s):
        if layout == "bshd":
            return torch.randn(batch, s, h, head_dim, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, h, s, head_dim, device=device, dtype=dtype)

    return make(heads, seqlen_q), make(kv_heads, seqlen_k), make(kv_heads, seqlen_k)


def misaligned_qkv(device, dtype, batch=2, heads=3, seqlen=90, head_dim=64):
    """q, k, v whose base pointers are off by one element and whose row strides are
    not a multiple of 16 bytes (the launchers copy these to keep the 16-byte path)."""
    buf = torch.randn(batch, heads, seqlen, head_dim + 3, device=device, dtype=dtype)
    q = buf[..., 1:head_dim + 1]
    kbuf = torch.randn(batch, heads, seqlen * (head_dim + 1) + 1, device=device, dtype=dtype)
    k = kbuf[..., 1:].view(batch, heads, seqlen, head_dim + 1)[..., :head_dim]
    v = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    assert q.data_ptr() % 16 != 0 and k.stride(2) == head_dim + 1
    return q, k, v
