"""tfkernels modules inside the PyTorch ecosystem: torch.compile, autocast, DDP, CUDA graphs."""
import copy
import os

import pytest
import torch
from torch import nn

import tfkernels  # noqa: F401
from tfkernels.nn import FusedMLP, SelfAttention, TransformerEncoderLayer

from .distributed import run_processes
from .utils import assert_close_float64, assert_flash_rule

D_MODEL, HEADS, D_FF = 32, 4, 64


def _layer(dtype=torch.float32, device="cpu", **kwargs):
    kwargs = {"activation": "gelu", "batch_first": True, "dropout": 0.0, **kwargs}
    return TransformerEncoderLayer(D_MODEL, HEADS, D_FF, device=device, dtype=dtype, **kwargs)


def _fwd_bwd(fn, x, grad, **kwargs):
    x = x.detach().clone().requires_grad_()
    out = fn(x, **kwargs)
    out.backward(grad)
    return out.detach(), x.grad


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("norm_first", [False, True])
def test_compile_fullgraph_aot_eager_encoder_layer(norm_first):
    torch._dynamo.reset()
    layer = _layer(norm_first=norm_first)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, lens = torch.randn(3, 11, D_MODEL), torch.tensor([11, 6, 2])
    grad = torch.randn_like(x)
    for kwargs in [{"is_causal": True}, {"seqlens": lens}]:
        ref, ref_dx = _fwd_bwd(layer, x, grad, **kwargs)
        ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        layer.zero_grad()
        out, dx = _fwd_bwd(compiled, x, grad, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-5, msg=f"grad {n}")
        layer.zero_grad()


def test_compile_fullgraph_inductor_encoder_layer():
    torch._dynamo.reset()
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True)
    x, grad = torch.randn(2, 9, D_MODEL), torch.randn(2, 9, D_MODEL)
    ref, ref_dx = _fwd_bwd(layer, x, grad, is_causal=True)
    out, dx = _fwd_bwd(compiled, x, grad, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_under_autocast():
    torch._dynamo.reset()
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, grad = torch.randn(2, 9, D_MODEL), torch.randn(2, 9, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_dx = _fwd_bwd(layer, x, grad, is_causal=True)
        out, dx = _fwd_bwd(compiled, x, grad, is_causal=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, ref_dx)


def test_compile_with_padding_mask_runs_with_a_graph_break():
    # Reading a padding mask is data-dependent (it decides kernel vs fallback), so
    # fullgraph=True needs seqlens=; without fullgraph the mask still works.
    torch._dynamo.reset()
    layer = _layer()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 9, D_MODEL)
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 4])[:, None]
    torch.testing.assert_close(compiled(x, src_key_padding_mask=padding), layer(x, src_key_padding_mask=padding),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- autocast

def _autocast_case(device, amp_dtype, norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_first, device=device)
    fused = TransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    x = torch.randn(2, 17, D_MODEL, device=device)
    grad = torch.randn_like(x)
    causal = nn.Transformer.generate_square_subsequent_mask(17, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        low, low_dx = _fwd_bwd(ref, x, grad, src_mask=causal, is_causal=True)
        out, dx = _fwd_bwd(fused, x, grad, is_causal=True)
    high, high_dx = _fwd_bwd(copy.deepcopy(ref).double(), x.double(), grad.double(), src_mask=causal.double(),
                             is_causal=True)
    assert out.dtype == low.dtype and dx.dtype == torch.float32
    assert fused.self_attn.in_proj_weight.grad.dtype == torch.float32
    assert_flash_rule(out, high, low, "output")
    assert_flash_rule(dx, high_dx, low_dx, "grad src")


@pytest.mark.parametrize("norm_first", [False, True])
def test_autocast_bfloat16_cpu_encoder_layer(norm_first):
    _autocast_case("cpu", torch.bfloat16, norm_first)


def test_autocast_casts_every_op_to_the_autocast_dtype():
    x = torch.randn(2, 5, D_MODEL)
    attn, mlp = SelfAttention(D_MODEL, HEADS, is_causal=True), FusedMLP(D_MODEL, D_FF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = nn.functional.linear(x, torch.randn(D_MODEL, D_MODEL))  # bf16 activations meet float32 weights
        assert h.dtype == torch.bfloat16
        q, k, v = tfkernels.fused_qkv(x, attn.in_proj_weight, attn.in_proj_bias, num_heads=HEADS)
        outs = [q, tfkernels.flash_attention(q.float(), k.float(), v.float()), attn(h), mlp(h), mlp(x),
                tfkernels.linear_gelu(h, mlp.linear1.weight, mlp.linear1.bias),
                tfkernels.bias_gelu(h, torch.randn(D_MODEL))]
        assert all(o.dtype == torch.bfloat16 for o in outs), [o.dtype for o in outs]
        assert tfkernels.fused_mlp(x.double(), *[t.double() for t in (mlp.linear1.weight, mlp.linear1.bias,
                                   mlp.linear2.weight, mlp.linear2.bias)]).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert mlp(x).dtype == torch.float32


# --------------------------------------------------------------------------- DistributedDataParallel

def _ddp_worker(rank, world_size, workdir):
    data = torch.load(os.path.join(workdir, "inputs.pt"))
    layer = _layer(dtype=torch.float64)
    layer.load_state_dict(data["state"])
    model = nn.parallel.DistributedDataParallel(layer)
    shard = slice(rank * 2, rank * 2 + 2)
    out = model(data["x"][shard], seqlens=data["lens"][shard], is_causal=True)
    (out * data["grad"][shard]).sum().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in layer.named_parameters()}, os.path.join(workdir, "grads.pt"))


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    layer = _layer(dtype=torch.float64)
    x, grad = torch.randn(4, 10, D_MODEL, dtype=torch.float64), torch.randn(4, 10, D_MODEL, dtype=torch.float64)
    lens = torch.tensor([10, 7, 3, 10])
    torch.save({"state": layer.state_dict(), "x": x, "grad": grad, "lens": lens}, tmp_path / "inputs.pt")
    run_processes(_ddp_worker, 2, tmp_path)
    ddp_grads = torch.load(tmp_path / "grads.pt")
    # DDP averages the ranks' gradients: the single-process loss is the mean of the two shard losses.
    out = layer(x, seqlens=lens, is_causal=True)
    ((out * grad).sum() / 2).backward()
    for name, p in layer.named_parameters():
        assert_close_float64(ddp_grads[name], p.grad, f"grad {name}")


# --------------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_encoder_layer(amp_dtype):
    _autocast_case("cuda", amp_dtype, norm_first=True)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    layer = _layer(dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 64, D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lens = torch.tensor([64, 50, 17, 1], device="cuda")
    grad = torch.randn_like(x)

    def step():
        out = layer(x, seqlens=lens, is_causal=True)
        out.backward(grad)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (allocator, autotuning) outside the graph
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            lens.copy_(torch.tensor([64, 9, 33, 2], device="cuda"))
        x.grad.zero_()
        for p in layer.parameters():
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        x_ref = x.detach().clone().requires_grad_()
        ref = layer(x_ref, seqlens=lens.clone(), is_causal=True)
        ref.backward(grad)
        torch.testing.assert_close(static_out, ref)
        torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.cuda
def test_compile_reduce_overhead_cuda():
    torch._dynamo.reset()
    layer = _layer(dtype=torch.bfloat16, device="cuda").eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    lens = torch.tensor([128, 100], device="cuda")
    with torch.no_grad():
        for _ in range(3):  # the first calls record, later ones replay the CUDA graph
            x = torch.randn(2, 128, D_MODEL, device="cuda", dtype=torch.bfloat16)
            out = compiled(x, seqlens=lens, is_causal=True).clone()
            torch.testing.assert_close(out, layer(x, seqlens=lens, is_causal=True), rtol=2e-2, atol=2e-2)
