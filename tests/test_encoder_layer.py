"""tfkernels.nn.TransformerEncoderLayer and convert() against torch.nn with copied weights."""
import copy
import warnings

import pytest
import torch
from torch import nn

import tfkernels
from tfkernels import _masks
from tfkernels.nn import ConvertReport, TransformerEncoderLayer, convert

from .utils import assert_close_float64, assert_flash_rule

D_MODEL, HEADS, D_FF = 32, 4, 56


def _torch_stack(dtype=torch.float64, num_layers=2, **layer_kwargs):
    layer_kwargs = {"dim_feedforward": D_FF, **layer_kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." for norm_first etc.
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dtype=dtype, **layer_kwargs)
        stack = nn.TransformerEncoder(layer, num_layers)
    for p in stack.parameters():  # distinct, non-trivial weights per layer (biases start at 0)
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)
    return stack.eval()


def _converted(stack):
    fused = copy.deepcopy(stack)
    report = convert(fused)
    assert len(report.swapped) == len(stack.layers) and not report.left_alone, str(report)
    assert all(isinstance(layer, TransformerEncoderLayer) for layer in fused.layers)
    return fused


def _inputs(batch_first, dtype, batch=3, seqlen=13):
    shape = (batch, seqlen, D_MODEL) if batch_first else (seqlen, batch, D_MODEL)
    return torch.randn(shape, dtype=dtype)


def _mask_kwargs(mode, batch, seqlen, dtype):
    lens = torch.tensor([seqlen, seqlen - 5, 1][:batch])
    padding = torch.arange(seqlen)[None, :] >= lens[:, None]  # True = ignore, as torch wants
    causal = nn.Transformer.generate_square_subsequent_mask(seqlen, dtype=dtype)
    kwargs = {
        "none": {},
        "padding": {"src_key_padding_mask": padding},
        "causal": {"mask": causal, "is_causal": True},
        "causal_detected": {"mask": causal},  # nn.TransformerEncoder detects that the mask is causal
        "padding_causal": {"mask": causal, "src_key_padding_mask": padding.to(dtype).masked_fill(padding, -torch.inf)},
    }[mode]
    valid = ~padding if "src_key_padding_mask" in kwargs else torch.ones_like(padding)
    return kwargs, valid


def _valid(t, valid, batch_first):
    """Rows of t at non-padded positions (padded query rows are meaningless)."""
    return t[valid] if batch_first else t.transpose(0, 1)[valid]


def _run(stack, x, grad, kwargs):
    x = x.detach().clone().requires_grad_()
    out = stack(x, **kwargs)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in stack.named_parameters()}


@pytest.mark.parametrize("mode", ["none", "padding", "causal", "causal_detected", "padding_causal"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_stack_matches_torch_float64(batch_first, norm_first, activation, mode):
    stack = _torch_stack(batch_first=batch_first, norm_first=norm_first, activation=activation)
    fused = _converted(stack)
    x = _inputs(batch_first, torch.float64)
    kwargs, valid = _mask_kwargs(mode, x.shape[0 if batch_first else 1], x.shape[1 if batch_first else 0],
                                 torch.float64)
    grad = torch.randn_like(x)
    grad = grad * (valid if batch_first else valid.T).unsqueeze(-1)  # no gradient into padded rows
    ref, ref_dx, ref_grads = _run(stack, x, grad, kwargs)
    out, dx, grads = _run(fused, x, grad, kwargs)
    assert_close_float64(_valid(out, valid, batch_first), _valid(ref, valid, batch_first), "output")
    assert_close_float64(dx, ref_dx, "grad src")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close_float64(g, ref_grads[name], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_low_precision_follows_the_flash_rule(dtype):
    stack = _torch_stack(dtype=torch.float64, batch_first=True, activation="gelu", norm_first=True)
    x = _inputs(True, torch.float64, batch=2, seqlen=29)
    kwargs, valid = _mask_kwargs("padding_causal", 2, 29, torch.float64)
    grad = torch.randn_like(x) * valid.unsqueeze(-1)
    high, high_dx, high_grads = _run(stack, x, grad, kwargs)

    low_stack = copy.deepcopy(stack).to(dtype)
    low_kwargs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    low, low_dx, low_grads = _run(low_stack, x.to(dtype), grad.to(dtype), low_kwargs)
    fused = _converted(low_stack)
    out, dx, grads = _run(fused, x.to(dtype), grad.to(dtype), low_kwargs)

    assert_flash_rule(out[valid], high[valid], low[valid], "output")
    assert_flash_rule(dx, high_dx, low_dx, "grad src")
    for name in ["layers.0.self_attn.in_proj_weight", "layers.0.linear1.weight", "layers.1.self_attn.out_proj.bias",
                 "layers.1.linear2.weight", "layers.1.norm2.weight"]:
        assert_flash_rule(grads[name], high_grads[name], low_grads[name], f"grad {name}")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_inference_under_no_grad_where_torch_takes_its_nested_fast_path():
    stack = _torch_stack(batch_first=True, activation="gelu")
    assert stack.use_nested_tensor  # torch would hand the layers nested tensors here
    fused = _converted(stack)
    assert fused.use_nested_tensor is False
    x = _inputs(True, torch.float64)
    kwargs, valid = _mask_kwargs("padding", 3, 13, torch.float64)
    with torch.no_grad():
        ref, out = stack(x, **kwargs), fused(x, **kwargs)
    assert_close_float64(out[valid], ref[valid], "output")


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_is_interchangeable_with_torch(bias):
    kwargs = dict(activation="gelu", batch_first=True, bias=bias, dtype=torch.float64)
    ref = nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, **kwargs)
    fused = TransformerEncoderLayer(D_MODEL, HEADS, D_FF, **kwargs)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for (name, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert a.shape == b.shape, name
    fused.load_state_dict(ref.state_dict())  # strict, unchanged
    ref.load_state_dict(fused.state_dict())
    ref.eval(), fused.eval()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    with torch.enable_grad():  # keeps torch off its fused inference path; same math either way
        assert_close_float64(fused(x), ref(x.requires_grad_()), "output")


def test_unbatched_input_and_seqlens_keyword():
    ref = nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, dtype=torch.float64).eval()
    fused = TransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    x = torch.randn(7, D_MODEL, dtype=torch.float64, requires_grad=True)
    assert_close_float64(fused(x), ref(x), "unbatched output")
    xb = torch.randn(7, 3, D_MODEL, dtype=torch.float64)  # (S, B, E): batch_first=False
    lens = torch.tensor([7, 4, 2])
    padding = torch.arange(7)[None, :] >= lens[:, None]
    by_mask = fused(xb, src_key_padding_mask=padding, is_causal=True)
    by_lens = fused(xb, seqlens=lens, is_causal=True)
    assert_close_float64(by_lens.transpose(0, 1)[~padding], by_mask.transpose(0, 1)[~padding], "seqlens vs mask")
    with pytest.raises(ValueError, match="either seqlens or src_key_padding_mask"):
        fused(xb, src_key_padding_mask=padding, seqlens=lens)


def test_other_masks_fall_back_with_one_warning_and_stay_correct():
    stack = _torch_stack(batch_first=True, activation="gelu", num_layers=1)
    fused = _converted(stack)
    x = _inputs(True, torch.float64, batch=2, seqlen=9)
    left_padding = torch.tensor([[True] * 3 + [False] * 6, [False] * 9])
    band = torch.ones(9, 9, dtype=torch.bool).triu(3) | torch.ones(9, 9, dtype=torch.bool).tril(-3)  # local window
    bias = torch.randn(9, 9, dtype=torch.float64)  # an additive float mask
    _masks._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kwargs in [{"src_key_padding_mask": left_padding}, {"mask": band}, {"mask": bias},
                       {"mask": band, "src_key_padding_mask": left_padding}]:
            valid = ~kwargs.get("src_key_padding_mask", torch.zeros(2, 9, dtype=torch.bool))
            grad = torch.randn_like(x) * valid.unsqueeze(-1)
            out, dx, grads = _run(fused, x, grad, kwargs)
            ref, ref_dx, ref_grads = _run(stack, x, grad, kwargs)
            assert_close_float64(out[valid], ref[valid], f"output {list(kwargs)}")
            assert_close_float64(dx, ref_dx, f"grad src {list(kwargs)}")
            for name, g in grads.items():
                assert_close_float64(g, ref_grads[name], f"grad {name}")
            stack.zero_grad(), fused.zero_grad()
    assert sum("plain PyTorch" in str(w.message) for w in caught) == 1


def test_attention_dropout_runs_in_the_kernel_in_training_other_dropouts_match_torch(monkeypatch):
    ref = nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, dropout=0.25, activation="gelu", batch_first=True,
                                     dtype=torch.float64)
    fused = TransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    assert fused.training and fused.self_attn.dropout == 0.25
    fused.dropout.p = fused.dropout1.p = fused.dropout2.p = 0.0  # only the attention dropout acts
    dropout_ps = []
    kernel = tfkernels.ops.flash_attention
    monkeypatch.setattr(tfkernels.ops, "flash_attention",
                        lambda *a, **kw: dropout_ps.append(kw.get("dropout_p")) or kernel(*a, **kw))
    torch.manual_seed(3)
    first = fused(x)
    torch.manual_seed(3)
    assert torch.equal(fused(x), first)  # reproducible under the same seed
    assert not torch.allclose(fused(x), first)  # a fresh draw, another mask
    assert_close_float64(fused.eval()(x), ref.eval()(x), "eval output (no dropout)")
    assert dropout_ps == [0.25, 0.25, 0.25, 0.0]
    ref.train()
    # A mask outside the kernel's reach runs the plain-PyTorch path, with the dropout too.
    left_padding = torch.tensor([[True] * 3 + [False] * 8, [False] * 11])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        undropped = fused.eval()(x, src_key_padding_mask=left_padding)
        assert not torch.allclose(fused.train()(x, src_key_padding_mask=left_padding), undropped)

    # attention_dropout=0.0 keeps dropout, dropout1, dropout2 (plain nn.Dropout, where torch has them). The
    # feed-forward ones draw the same random stream as torch with attention dropout off, so they match exactly;
    # dropout1 acts on torch's MHA output, whose memory layout (not values) differs, so its mask does not.
    fused = TransformerEncoderLayer.from_torch(copy.deepcopy(ref), attention_dropout=0.0)
    assert fused.dropout.p == fused.dropout1.p == fused.dropout2.p == 0.25
    ref.self_attn.dropout = 0.0
    ref.dropout1.p = fused.dropout1.p = 0.0
    torch.manual_seed(1)
    expected = ref(x)
    torch.manual_seed(1)
    actual = fused(x)
    assert_close_float64(actual, expected, "training output with dropout")
    fused.dropout.p = fused.dropout2.p = 0.0
    fused.dropout1.p = 0.25
    assert not torch.allclose(fused(x), fused.eval()(x))  # dropout1 really is applied in training


def test_convert_report_weights_and_modes():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, batch_first=True),
                                                 2, enable_nested_tensor=False)
            self.extra = nn.ModuleDict({
                "odd": nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, norm_first=True, dtype=torch.float64),
                "kdim": nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF),
            })
            self.extra["kdim"].self_attn = nn.MultiheadAttention(D_MODEL, HEADS, kdim=16, vdim=16)
            self.decoder = nn.TransformerDecoderLayer(D_MODEL, HEADS, D_FF)
            self.mha = nn.MultiheadAttention(D_MODEL, HEADS)

    model = Model()
    model.encoder.layers[1].eval()
    model.encoder.layers[0].linear1.weight.requires_grad_(False)
    params = {name: p for name, p in model.named_parameters()}
    report = convert(model, attention_dropout=0.0)
    assert isinstance(report, ConvertReport)
    assert [name for name, _ in report.swapped] == ["encoder.layers.0", "encoder.layers.1", "extra.odd"]
    left = {name: reason for name, _, reason in report.left_alone}
    assert set(left) == {"extra.kdim", "decoder", "mha"}
    assert "kdim" in left["extra.kdim"] and "cross-attention" in left["decoder"]
    assert "encoder.layers.0" in str(report)
    # The same Parameter objects (optimizer state, requires_grad, dtype, device all kept).
    for name, p in model.named_parameters():
        assert p is params[name], name
    assert not model.encoder.layers[0].linear1.weight.requires_grad
    assert model.encoder.layers[0].training and not model.encoder.layers[1].training
    assert model.extra["odd"].self_attn.in_proj_weight.dtype == torch.float64
    assert model.extra["odd"].norm_first and model.extra["odd"].self_attn.dropout == 0.0
    assert not any(p.is_meta for p in model.parameters())
    # The converted stack runs, in training too (attention dropout set to 0 above).
    out = model.encoder(torch.randn(2, 5, D_MODEL), src_key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    out.sum().backward()
    with pytest.raises(TypeError, match="from_torch"):
        convert(nn.TransformerEncoderLayer(D_MODEL, HEADS))


def test_convert_keeps_attention_dropout_by_default():
    model = nn.Sequential(nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, dropout=0.1))
    report = convert(model)
    assert not report.notes
    assert model[0].self_attn.dropout == 0.1 and model[0].training
    model(torch.randn(4, 2, D_MODEL)).sum().backward()  # trains, attention dropout in the kernel


def test_constructor_errors_are_clear():
    with pytest.raises(ValueError, match="relu/gelu"):
        TransformerEncoderLayer(D_MODEL, HEADS, activation="swish")
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoderLayer(30, 4)
    layer = TransformerEncoderLayer(D_MODEL, HEADS, D_FF, dropout=0.0)
    with pytest.raises(ValueError, match="src_key_padding_mask must have shape"):
        layer(torch.randn(5, 2, D_MODEL), src_key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    nested = torch.nested.nested_tensor([torch.randn(3, D_MODEL), torch.randn(2, D_MODEL)])
    with pytest.raises(ValueError, match="nested"):
        layer(nested)


def test_torch_transformer_encoder_built_from_the_fused_layer():
    ref = _torch_stack(batch_first=True, activation="gelu", num_layers=3)
    layer = TransformerEncoderLayer(D_MODEL, HEADS, D_FF, activation="gelu", batch_first=True, dtype=torch.float64)
    stack = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    stack.load_state_dict(ref.state_dict())  # same keys as a torch stack
    stack.eval()
    x = _inputs(True, torch.float64)
    kwargs, valid = _mask_kwargs("padding_causal", 3, 13, torch.float64)
    with torch.enable_grad():
        assert_close_float64(stack(x, **kwargs)[valid], ref(x.requires_grad_(), **kwargs)[valid], "output")
