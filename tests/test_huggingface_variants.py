"""Hugging Face models that use the attention variants, on the "tfkernels" backend.

Tiny random Mistral (sliding window), Gemma 2 (sliding window every other layer,
logit softcap) and GPT-OSS (sliding window every other layer, attention sinks
`s_aux`) against "eager" (and "sdpa" where transformers supports it: Gemma 2 and
GPT-OSS refuse SDPA), and BERT trained with attention dropout. Every test counts the
kernel calls and fails if the plain-PyTorch fallback runs (left padding runs the packed
kernel, cached decoding the KV-cache kernel). Nothing is downloaded;
without transformers these tests skip.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tfkernels  # noqa: E402
from tfkernels import _masks  # noqa: E402
from tfkernels.integrations import huggingface as tfk_hf  # noqa: E402

from .utils import assert_close_float64, float64_softmax, hf_forward_backward  # noqa: E402

VOCAB = 97
WINDOW = 4  # shorter than the sequences below, so the band mask matters
SEQLEN = 11


def _config(kind):
    common = dict(vocab_size=VOCAB, initializer_range=0.2, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, sliding_window=WINDOW,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "mistral":
        return transformers.MistralConfig(**common)
    if kind == "gemma2":
        # A cap of 0.5 bends the scores (|s| is around 1 here): ignoring it changes the answer.
        return transformers.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=0.5,
                                         final_logit_softcapping=None, **common)
    return transformers.GptOssConfig(head_dim=8, num_local_experts=4, num_experts_per_tok=2, **common)


def _models(kind, impls, auto=transformers.AutoModel):
    config = _config(kind)
    # GPT-OSS's default experts run torch._grouped_mm, which has no float64.
    extra = dict(experts_implementation="eager") if kind == "gpt_oss" else {}
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        # A config of its own: from_config records the implementation in the config it is given.
        model = auto.from_config(copy.deepcopy(config), attn_implementation=impl, **extra).to(torch.float64).eval()
        assert model.config._attn_implementation == impl
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        elif kind == "gpt_oss":
            # Sinks far from 0, so that dropping them changes the answer, and exact in float32: the
            # kernel takes sinks as float32 (tfkernels.flash_attention casts them).
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("sinks"):
                        p.copy_((torch.randn_like(p) * 2).float())
        models[impl] = model
    return models


def _impls(kind):
    return ("eager", "sdpa", "tfkernels") if kind == "mistral" else ("eager", "tfkernels")


class KernelCalls:
    """Counts the kernel calls (flash_attention, and flash_attention_varlen for left
    padding and flash_attention_with_kvcache for cached decoding) with the variant
    arguments they got, and makes the integration's plain-PyTorch fallback an error."""

    KERNELS = ("flash_attention", "flash_attention_varlen", "flash_attention_with_kvcache")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.KERNELS:
            kernel = getattr(tfkernels.ops, name)

            def counting(*args, _kernel=kernel, _name=name, **kwargs):
                call = {key: kwargs.get(key) for key in ("window_size", "softcap", "sinks", "dropout_p")}
                self.calls.append(dict(call, kernel=_name))
                return _kernel(*args, **kwargs)

            monkeypatch.setattr(tfkernels.ops, name, counting)

        def no_fallback(*args, **kwargs):
            raise AssertionError("the plain-PyTorch fallback ran instead of the kernel")

        monkeypatch.setattr(tfk_hf, "attention_with_bias", no_fallback)

    def of(self, kernel):
        return [c for c in self.calls if c["kernel"] == kernel]

    def windowed(self):
        return sum(1 for c in self.calls if c["window_size"] not in (None, (-1, -1)))


def _padded_batch(padding, batch=3):
    ids = torch.randint(3, VOCAB, (batch, SEQLEN))
    mask = torch.ones(batch, SEQLEN, dtype=torch.long)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 2:] = 0
    return ids, (None if padding == "none" else mask), mask.bool()


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_outputs_and_gradients_match_eager_and_sdpa(kind, padding, monkeypatch):
    models = _models(kind, _impls(kind))
    ids, mask, valid = _padded_batch(padding)
    weights = torch.randn(*ids.shape, 48, dtype=torch.float64)
    results = {impl: hf_forward_backward(model, ids, mask, valid, weights)
               for impl, model in models.items() if impl != "tfkernels"}
    calls = KernelCalls(monkeypatch)
    out, grads = hf_forward_backward(models["tfkernels"], ids, mask, valid, weights)
    layers = models["tfkernels"].config.num_hidden_layers
    assert len(calls.calls) == layers
    sliding = sum(t == "sliding_attention" for t in getattr(models["tfkernels"].config, "layer_types", None)
                  or ["sliding_attention"] * layers)
    assert calls.windowed() == sliding >= 1  # the band reached the kernel as a window
    if kind == "gemma2":
        assert all(c["softcap"] == 0.5 for c in calls.calls)
    if kind == "gpt_oss":
        assert all(c["sinks"] is not None for c in calls.calls)
        assert any(name.endswith("sinks") for name in grads)
    assert len(grads) > 10
    for impl, (ref, ref_grads) in results.items():
        assert_close_float64(out[valid], ref[valid], f"last_hidden_state vs {impl}")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            if name.endswith("sinks"):  # the kernel's sink gradient is float32 [H]
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            else:
                assert_close_float64(g, ref_grads[name], f"grad {name} vs {impl}")


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_left_padding_runs_varlen_with_softcap_and_sinks(kind, monkeypatch):
    # Left padding runs the packed kernel (flash_attention_varlen) on the valid rows, with the variants.
    models = _models(kind, ("eager", "tfkernels"))
    ids, mask, valid = _padded_batch("right")
    mask, valid = mask.flip(1), valid.flip(1)
    weights = torch.randn(*ids.shape, 48, dtype=torch.float64)
    calls = KernelCalls(monkeypatch)
    out, grads = hf_forward_backward(models["tfkernels"], ids, mask, valid, weights)
    varlen = calls.of("flash_attention_varlen")
    assert len(varlen) == models["tfkernels"].config.num_hidden_layers
    if kind == "gemma2":
        assert all(c["softcap"] == 0.5 for c in varlen)
    else:
        assert all(c["sinks"] is not None for c in varlen)
    assert sum(1 for c in varlen if c["window_size"] not in (None, (-1, -1))) >= 1
    ref, ref_grads = hf_forward_backward(models["eager"], ids, mask, valid, weights)
    assert_close_float64(out[valid], ref[valid], "last_hidden_state vs eager")
    for name, g in grads.items():
        if name.endswith("sinks"):  # the kernel's sink gradient is float32 [H]
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert_close_float64(g, ref_grads[name], f"grad {name} vs eager")


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_cached_greedy_generation_matches_eager(kind, monkeypatch):
    # Prompt and output both longer than the window: the prefill needs the band and
    # decoding runs against the sliding-window cache.
    models = _models(kind, ("eager", "tfkernels"), auto=transformers.AutoModelForCausalLM)
    ids = torch.randint(3, VOCAB, (2, WINDOW + 3))
    with float64_softmax():
        expected = models["eager"].generate(ids, max_new_tokens=2 * WINDOW, do_sample=False,
                                            min_new_tokens=2 * WINDOW)
    calls = KernelCalls(monkeypatch)
    tokens = models["tfkernels"].generate(ids, max_new_tokens=2 * WINDOW, do_sample=False, min_new_tokens=2 * WINDOW)
    assert tokens.shape[1] == ids.shape[1] + 2 * WINDOW
    assert torch.equal(tokens, expected)
    layers = models["tfkernels"].config.num_hidden_layers
    assert len(calls.calls) == 2 * WINDOW * layers
    # The prefill on flash_attention, each later token on the KV-cache kernel.
    assert len(calls.of("flash_attention_with_kvcache")) == (2 * WINDOW - 1) * layers


def _bert(dropout):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=dropout, initializer_range=0.2, num_labels=3)
    models = {}
    for impl in ("eager", "tfkernels"):
        torch.manual_seed(0)
        models[impl] = transformers.BertForSequenceClassification._from_config(
            config, attn_implementation=impl).to(torch.float64).train()
    models["tfkernels"].load_state_dict(models["eager"].state_dict())
    return models


def _train(model, ids, mask, labels, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _classification_batch():
    ids, mask, _ = _padded_batch("right", batch=6)
    return ids, mask, torch.randint(0, 3, (6,))


def test_bert_trains_with_attention_dropout(monkeypatch):
    model = _bert(0.1)["tfkernels"]
    ids, mask, labels = _classification_batch()
    calls = KernelCalls(monkeypatch)
    losses = _train(model, ids, mask, labels, steps=12)
    assert all(c["dropout_p"] == pytest.approx(0.1) for c in calls.calls) and len(calls.calls) == 12 * 2
    assert losses[-1] < 0.5 * losses[0], losses
    # Attention dropout (the only dropout here) acts in training and not in eval.
    with torch.no_grad():
        first, second = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
        assert not torch.allclose(first, second)
        model.eval()
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    assert calls.calls[-1]["dropout_p"] == 0.0


def test_bert_training_without_dropout_matches_eager(monkeypatch):
    models = _bert(0.0)
    ids, mask, labels = _classification_batch()
    expected = _train(models["eager"], ids, mask, labels, steps=5)
    calls = KernelCalls(monkeypatch)
    losses = _train(models["tfkernels"], ids, mask, labels, steps=5)
    assert len(calls.calls) == 5 * 2
    assert_close_float64(torch.tensor(losses), torch.tensor(expected), "losses")
    for (name, p), q in zip(models["tfkernels"].named_parameters(), models["eager"].parameters()):
        assert_close_float64(p.detach(), q.detach(), f"trained {name}")


def test_sliding_window_masks_become_kernel_windows():
    from tfkernels._masks import kernel_plan

    window, batch, seqlen = 3, 2, 9
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    band = (j <= i) & (j > i - window)  # transformers' sliding-window causal mask
    lens = torch.tensor([9, 5])
    padded = (band[None] & (j < lens[:, None, None]))[:, None]
    plan = kernel_plan(padded, batch, seqlen, seqlen, True, window)
    assert plan[:2] == (True, "top_left") and plan.window_size == (2, 2) and plan.seqlens_k.tolist() == [9, 5]
    assert kernel_plan(padded, batch, seqlen, seqlen, True) is None  # without the hint, no reading fits
    # Decoding past the window: the first keys are hidden from the one query, yet none is padding.
    decode = torch.zeros(1, 1, 1, seqlen, dtype=torch.bool)
    decode[..., -window:] = True
    plan = kernel_plan(decode, 1, 1, seqlen, True, window)
    assert plan.seqlens_k is None and plan.window_size == (2, 2) and plan[:2] == (True, "bottom_right")
    assert kernel_plan(band[None, None] & (j != 4), 1, seqlen, seqlen, True, window) is None  # a hole
    maskless = tfk_hf._maskless_plan(False, 1, seqlen, window)
    assert maskless == (False, "bottom_right", None, (2, 2))
    expected = tfkernels.reference.attention_mask(1, seqlen, is_causal=maskless.is_causal, window_size=(2, 2),
                                                  causal_alignment=maskless.causal_alignment)
    assert torch.equal(expected, decode)
