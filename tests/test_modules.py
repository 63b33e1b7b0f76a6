"""tfkernels.nn modules against the plain-PyTorch blocks they replace, with copied weights."""
import pytest
import torch
from torch import nn

import tfkernels
from tfkernels import reference
from tfkernels.nn import FusedMLP, FusedQKV, SelfAttention

from .utils import assert_close_float64, assert_flash_rule

DT = torch.float64


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _assert_grads_match(fused, plain, rename=lambda n: n):
    fused_grads, plain_grads = _grads(fused), _grads(plain)
    assert fused_grads, "no parameters received gradients"
    for name, grad in fused_grads.items():
        assert_close_float64(grad, plain_grads[rename(name)], name=f"grad {name}")


@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 4, True), (6, 2, False), (3, 1, True)])
def test_fused_qkv_module_matches_linear_and_split(heads, kv_heads, bias):
    embed, batch, seqlen = 48, 2, 17
    fused = FusedQKV(embed, heads, kv_heads, bias=bias, dtype=DT)
    linear = nn.Linear(embed, fused.weight.shape[0], bias=bias, dtype=DT)
    linear.load_state_dict(fused.state_dict())
    x = torch.randn(batch, seqlen, embed, dtype=DT)
    q, k, v = fused(x)
    head_dim = embed // heads
    ref = linear(x).view(batch, seqlen, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    assert_close_float64(q, ref[:, :heads], "q")
    assert_close_float64(k, ref[:, heads:heads + kv_heads], "k")
    assert_close_float64(v, ref[:, heads + kv_heads:], "v")
    (q.square().sum() + (k * 1.5).sum() + v.sin().sum()).backward()
    ref_q, ref_k, ref_v = ref.split([heads, kv_heads, kv_heads], dim=1)
    (ref_q.square().sum() + (ref_k * 1.5).sum() + ref_v.sin().sum()).backward()
    _assert_grads_match(fused, linear)


def _mha_and_fused(embed, heads, bias, is_causal):
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True, dtype=DT)
    fused = SelfAttention(embed, heads, bias=bias, is_causal=is_causal, dtype=DT)
    fused.load_state_dict(mha.state_dict())  # same keys: a drop-in replacement
    return mha, fused


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seqlen", [1, 17, 113])
def test_self_attention_matches_multihead_attention(is_causal, bias, seqlen):
    embed, heads, batch = 64, 4, 2
    mha, fused = _mha_and_fused(embed, heads, bias, is_causal)
    x = torch.randn(batch, seqlen, embed, dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1) if is_causal else None
    out = fused(x)
    ref, _ = mha(x_ref, x_ref, x_ref, need_weights=False, attn_mask=mask)
    assert_close_float64(out, ref, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert_close_float64(x.grad, x_ref.grad, "grad x")
    _assert_grads_match(fused, mha)


def test_self_attention_key_padding_matches_multihead_attention():
    embed, heads, batch, seqlen = 32, 4, 3, 19
    mha, fused = _mha_and_fused(embed, heads, True, False)
    seqlens = torch.tensor([19, 7, 1])
    padding = torch.arange(seqlen)[None, :] >= seqlens[:, None]  # True = ignore, as MHA wants
    x = torch.randn(batch, seqlen, embed, dtype=DT)
    out = fused(x, seqlens)
    ref, _ = mha(x, x, x, need_weights=False, key_padding_mask=padding)
    assert_close_float64(out, ref, "output")


def test_self_attention_gqa_matches_reference_composition():
    embed, heads, kv_heads, batch, seqlen = 48, 6, 2, 2, 23
    fused = SelfAttention(embed, heads, num_kv_heads=kv_heads, is_causal=True, dtype=DT)
    x = torch.randn(batch, seqlen, embed, dtype=DT)
    q, k, v = reference.fused_qkv(x, fused.in_proj_weight, fused.in_proj_bias, num_heads=heads,
                                  num_kv_heads=kv_heads)
    attn = reference.flash_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seqlen, embed)
    assert_close_float64(fused(x), fused.out_proj(attn), "output")


def test_self_attention_dropout_runs_in_the_kernel_in_training_only():
    # The kernel's mask is reproduced from the rng state that flash_attention draws
    # (torch.randint on the default generator, as tfkernels.ops does), so the training
    # output and every gradient are compared exactly with the reference composition.
    embed, heads, batch, seqlen, p = 32, 4, 2, 17, 0.3
    fused = SelfAttention(embed, heads, dropout=p, is_causal=True, dtype=DT)
    x = torch.randn(batch, seqlen, embed, dtype=DT)
    torch.manual_seed(5)
    out = fused(x)
    torch.manual_seed(5)
    rng_state = torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64)
    keep = torch.ops.tfkernels._dropout_mask(rng_state, batch, heads, seqlen, seqlen, p)
    assert 0 < int((~keep).sum()) < keep.numel()
    weight = fused.in_proj_weight.detach().clone().requires_grad_()
    q, k, v = reference.fused_qkv(x, weight, fused.in_proj_bias.detach(), num_heads=heads)
    attn = reference.flash_attention(q, k, v, is_causal=True, dropout_p=p, dropout_mask=keep)
    ref = fused.out_proj(attn.transpose(1, 2).reshape(batch, seqlen, embed))
    assert_close_float64(out, ref, "training output")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert_close_float64(fused.in_proj_weight.grad, weight.grad, "grad in_proj_weight")
    fused.eval()
    attn = reference.flash_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seqlen, embed)
    assert_close_float64(fused(x), fused.out_proj(attn), "eval output (no dropout)")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_mlp_matches_sequential(approximate, bias):
    d_model, d_ff = 40, 97
    fused = FusedMLP(d_model, d_ff, bias=bias, approximate=approximate, dtype=DT)
    plain = nn.Sequential(nn.Linear(d_model, d_ff, bias=bias, dtype=DT), nn.GELU(approximate=approximate),
                          nn.Linear(d_ff, d_model, bias=bias, dtype=DT))
    plain[0].load_state_dict(fused.linear1.state_dict())
    plain[2].load_state_dict(fused.linear2.state_dict())
    x = torch.randn(3, 11, d_model, dtype=DT)
    out, ref = fused(x), plain(x)
    assert_close_float64(out, ref, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    _assert_grads_match(fused, plain, rename=lambda n: n.replace("linear1", "0").replace("linear2", "2"))


def test_modules_in_bfloat16_follow_the_rule():
    torch.manual_seed(0)
    embed, heads = 64, 4
    attn = SelfAttention(embed, heads, is_causal=True)
    mlp = FusedMLP(embed, 4 * embed)
    x = torch.randn(2, 33, embed)

    def block(module_attn, module_mlp, inp):
        h = inp + module_attn(inp)
        return h + module_mlp(h)

    high = block(attn.double(), mlp.double(), x.double())
    low_attn, low_mlp = SelfAttention(embed, heads, is_causal=True), FusedMLP(embed, 4 * embed)
    low_attn.load_state_dict(attn.state_dict())
    low_mlp.load_state_dict(mlp.state_dict())
    low_attn, low_mlp = low_attn.bfloat16(), low_mlp.bfloat16()
    actual = block(low_attn, low_mlp, x.bfloat16())

    def reference_block(inp):
        q, k, v = reference.fused_qkv(inp, low_attn.in_proj_weight, low_attn.in_proj_bias, num_heads=heads)
        a = reference.flash_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(inp.shape)
        h = inp + low_attn.out_proj(a)
        return h + reference.fused_mlp(h, low_mlp.linear1.weight, low_mlp.linear1.bias, low_mlp.linear2.weight,
                                       low_mlp.linear2.bias)

    assert_flash_rule(actual, high, reference_block(x.bfloat16()), "block output")


def test_compile_fullgraph_self_attention_and_mlp():
    embed, heads = 32, 4
    attn = SelfAttention(embed, heads, is_causal=True)
    mlp = FusedMLP(embed, 64)

    def block(x):
        h = x + attn(x)
        return h + mlp(h)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, embed, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    out = compiled(x)
    ref = block(x_eager)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


def test_compile_inductor_fullgraph_self_attention_and_mlp():
    embed, heads = 32, 4
    attn = SelfAttention(embed, heads, is_causal=True)
    mlp = FusedMLP(embed, 64)

    def block(x):
        h = x + attn(x)
        return h + mlp(h)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 9, embed)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


def test_module_constructor_errors_are_clear():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SelfAttention(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        FusedQKV(50, 4)
    with pytest.raises(ValueError, match="approximate"):
        FusedMLP(8, 16, approximate="fast")
    with pytest.raises(ValueError, match="dropout"):
        SelfAttention(48, 6, dropout=1.0)


def test_public_api_exports():
    for name in ["flash_attention", "fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp", "build_info"]:
        assert callable(getattr(tfkernels, name))
    for name in ["flash_attention", "fused_qkv", "bias_gelu", "linear_gelu", "fused_mlp"]:
        assert callable(getattr(tfkernels.reference, name))
    with pytest.raises(TypeError):
        tfkernels.flash_attention(*[torch.randn(1, 1, 2, 4)] * 3, True)  # options are keyword-only
