"""The "tfkernels" attention backend for Hugging Face transformers against "eager" and "sdpa".

Small randomly initialised BERT, GPT-2 and Llama (GQA) models built from configs in
code (nothing is downloaded). transformers is optional: without it these tests skip.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tfkernels import _masks  # noqa: E402
from tfkernels.integrations import huggingface as tfk_hf  # noqa: E402

from .utils import assert_close_float64, assert_flash_rule, float64_softmax, hf_forward_backward  # noqa: E402

VOCAB = 97


def _config(kind, **overrides):
    common = dict(vocab_size=VOCAB, initializer_range=0.2)  # large enough that attention is far from uniform
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **common)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
    else:
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                       **common)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _models(kind, impls=("eager", "sdpa", "tfkernels"), dtype=torch.float64, auto=transformers.AutoModel, **cfg):
    config = _config(kind, **cfg)
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        # A config of its own: from_config records the implementation in the config it is given,
        # so a shared one would make every model run the last implementation.
        model = auto.from_config(copy.deepcopy(config), attn_implementation=impl).to(dtype).eval()
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[impl] = model
    assert {impl: m.config._attn_implementation for impl, m in models.items()} == {impl: impl for impl in models}
    return models


def _batch(padding, batch=3, seqlen=12):
    ids = torch.randint(0, VOCAB, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    elif padding == "left":
        mask[1, :5] = 0
    return ids, (None if padding == "none" else mask), mask.bool()


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_outputs_and_gradients_match_eager_and_sdpa(kind, padding):
    models = _models(kind)
    ids, mask, valid = _batch(padding)
    weights = torch.randn(*ids.shape, models["eager"].config.hidden_size, dtype=torch.float64)
    _masks._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the masks must run on the kernel, not the fallback
        results = {impl: hf_forward_backward(model, ids, mask, valid, weights) for impl, model in models.items()}
    out, grads = results["tfkernels"]
    assert len(grads) > 10
    for impl in ("eager", "sdpa"):
        ref, ref_grads = results[impl]
        assert_close_float64(out[valid], ref[valid], f"last_hidden_state vs {impl}")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert_close_float64(g, ref_grads[name], f"grad {name} vs {impl}")


class _Calls:
    """Counts the calls of some tfkernels.ops functions (the integration looks them up there)."""

    def __init__(self, monkeypatch, *names):
        from tfkernels import ops

        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(ops, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(ops, name, counted)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_left_padding_runs_the_varlen_kernel(kind, monkeypatch):
    models = _models(kind, impls=("eager", "tfkernels"))
    ids, mask, valid = _batch("left")
    weights = torch.randn(*ids.shape, models["eager"].config.hidden_size, dtype=torch.float64)
    calls = _Calls(monkeypatch, "flash_attention_varlen")
    _masks._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        out, grads = hf_forward_backward(models["tfkernels"], ids, mask, valid, weights)
    ref, ref_grads = hf_forward_backward(models["eager"], ids, mask, valid, weights)
    assert calls.counts["flash_attention_varlen"] == models["eager"].config.num_hidden_layers
    assert_close_float64(out[valid], ref[valid], "last_hidden_state")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close_float64(g, ref_grads[name], f"grad {name}")


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_separate_sequences(how, monkeypatch):
    # A padding-free batch (DataCollatorWithFlattening): three sequences in one row. Each
    # sequence's hidden states must equal those of the sequence run alone.
    model = _models("llama", impls=("tfkernels",))["tfkernels"]
    lengths = [5, 1, 7]
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kwargs = dict(position_ids=position_ids)
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    calls = _Calls(monkeypatch, "flash_attention_varlen", "flash_attention")
    _masks._warned.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        packed = model(input_ids=torch.cat(seqs, dim=1), **kwargs).last_hidden_state[0]
        assert calls.counts["flash_attention_varlen"] == model.config.num_hidden_layers
        alone = torch.cat([model(input_ids=s).last_hidden_state[0] for s in seqs])
    assert_close_float64(packed, alone, "packed vs separate")
    # The packing changes the answer: the causal mask over the whole row would not match.
    with torch.no_grad():
        whole = model(input_ids=torch.cat(seqs, dim=1)).last_hidden_state[0]
    assert not torch.allclose(whole[5:], alone[5:], atol=1e-3)


def test_varlen_plans_of_masks():
    batch, seqlen = 3, 6
    starts = torch.tensor([0, 2, 5])
    valid = torch.arange(seqlen)[None, :] >= starts[:, None]  # left padding
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    both = (causal[None] & valid[:, None, :])[:, None]
    plan = _masks.varlen_plan(both, batch, seqlen, seqlen, True)
    assert plan.is_causal and plan.cu_seqlens_q.tolist() == [0, 6, 10, 11] == plan.cu_seqlens_k.tolist()
    assert plan.q_index.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 17] == plan.k_index.tolist()
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (6, 6)
    # Full attention over the valid keys: every query row (padded ones too) is a sequence's query.
    full = valid[:, None, None, :].expand(batch, 1, seqlen, seqlen)
    plan = _masks.varlen_plan(full, batch, seqlen, seqlen, False)
    assert not plan.is_causal and plan.cu_seqlens_q.tolist() == [0, 6, 12, 18]
    assert plan.cu_seqlens_k.tolist() == [0, 6, 10, 11]
    # Decoding one token after left padding: bottom-right over the valid keys.
    decode = valid[:, None, None, :]  # one query row over all keys
    plan = _masks.varlen_plan(decode, batch, 1, seqlen, True)
    assert (plan.is_causal, plan.causal_alignment) == (True, "bottom_right")
    holes = valid.clone()
    holes[0, 3] = False  # a hole inside a sequence is not a packing
    assert _masks.varlen_plan((causal[None] & holes[:, None, :])[:, None], batch, seqlen, seqlen, True) is None
    # Position ids that restart mark packed sequences; a mask must agree with them.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    plan = _masks.varlen_plan(None, 1, seqlen, seqlen, True, position_ids=position_ids)
    assert plan.cu_seqlens_q.tolist() == [0, 3, 5, 6] and plan.is_causal
    assert _masks.varlen_plan(causal[None, None], 1, seqlen, seqlen, True, position_ids=position_ids) is None


def test_cached_generation_with_left_padding_matches_eager(monkeypatch):
    models = _models("llama", impls=("eager", "tfkernels"), auto=transformers.AutoModelForCausalLM)
    ids = torch.randint(1, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    calls = _Calls(monkeypatch, "flash_attention_varlen", "flash_attention_with_kvcache")
    _masks._warned.clear()
    with float64_softmax(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tokens = {impl: model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
                  for impl, model in models.items()}
    assert torch.equal(tokens["tfkernels"], tokens["eager"])
    assert calls.counts["flash_attention_varlen"] > 0


def test_masks_become_seqlens_and_causal_flags():
    batch, seqlen = 3, 6
    lens = torch.tensor([6, 4, 1])
    padding = torch.arange(seqlen)[None, :] < lens[:, None]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    both = (causal[None] & padding[:, None, :])[:, None]
    plan = _masks.kernel_plan(both, batch, seqlen, seqlen, True)
    assert plan[:2] == (True, "top_left") and plan[2].tolist() == [6, 4, 1]
    plan = _masks.kernel_plan(padding[:, None, None, :].expand(batch, 1, seqlen, seqlen), batch, seqlen, seqlen, False)
    assert plan[:2] == (False, "top_left") and plan[2].tolist() == [6, 4, 1]
    additive = torch.zeros(batch, 1, seqlen, seqlen).masked_fill(~both, torch.finfo(torch.float32).min)
    assert _masks.kernel_plan(additive, batch, seqlen, seqlen, True)[:2] == (True, "top_left")
    decode = torch.ones(seqlen, seqlen + 3, dtype=torch.bool).tril(3)[None, None]  # queries at the end of the cache
    assert _masks.kernel_plan(decode, 1, seqlen, seqlen + 3, True)[:2] == (True, "bottom_right")
    assert _masks.kernel_plan(~both, batch, seqlen, seqlen, True) is None  # not a padding pattern
    assert _masks.kernel_plan(additive * 0.5 + 1.0, batch, seqlen, seqlen, True) is None  # a float bias


def test_cached_greedy_generation_matches_eager(monkeypatch):
    models = _models("llama", impls=("eager", "tfkernels"), auto=transformers.AutoModelForCausalLM)
    ids = torch.randint(1, VOCAB, (2, 5))
    calls = _Calls(monkeypatch, "flash_attention_with_kvcache")
    with float64_softmax():
        tokens = {impl: model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
                  for impl, model in models.items()}
    assert torch.equal(tokens["tfkernels"], tokens["eager"])
    # Each of the 5 decoding steps runs the KV-cache kernel in every layer.
    assert calls.counts["flash_attention_with_kvcache"] == 5 * models["eager"].config.num_hidden_layers


def test_bfloat16_llama_follows_the_flash_rule():
    models = _models("llama", impls=("eager", "tfkernels"), dtype=torch.bfloat16)
    high = _models("llama", impls=("eager", "tfkernels"), dtype=torch.float64)["eager"]
    ids, mask, valid = _batch("right")
    with torch.no_grad():
        out = models["tfkernels"](input_ids=ids, attention_mask=mask).last_hidden_state
        low = models["eager"](input_ids=ids, attention_mask=mask).last_hidden_state
        ref = high(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert_flash_rule(out[valid], ref[valid], low[valid], "last_hidden_state")


def test_registered_under_its_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["tfkernels"] is tfk_hf.attention_forward
    assert "tfkernels" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("padding", ["none", "right"])
def test_t5_relative_position_bias_matches_eager(padding):
    # T5 passes its learned relative position bias as `position_bias`: the encoder's is
    # added to full attention, the decoder's to causal self-attention (cross-attention
    # gets a zero bias). The kernel has no bias input, so every one of these runs the
    # fallback, and must match eager.
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, initializer_factor=4.0, decoder_start_token_id=0)
    models = {}
    for impl in ("eager", "tfkernels"):
        torch.manual_seed(0)
        models[impl] = transformers.T5Model._from_config(config, attn_implementation=impl).double().eval()
    models["tfkernels"].load_state_dict(models["eager"].state_dict())
    with torch.no_grad():
        bias = models["eager"].encoder.block[0].layer[0].SelfAttention.compute_bias(12, 12)
    assert float(bias.std()) > 0.1  # a real bias, far from zero: dropping it changes the answer
    ids, mask, valid = _batch(padding)
    decoder_ids = torch.randint(0, VOCAB, (ids.shape[0], 9))
    weights = torch.randn(*decoder_ids.shape, config.d_model, dtype=torch.float64)
    results = {}
    _masks._warned.clear()
    for impl, model in models.items():
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hidden = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).last_hidden_state
        if impl == "tfkernels":
            assert sum("no position bias" in str(w.message) for w in caught) == 1  # said once, not per layer
        (hidden * weights).sum().backward()
        results[impl] = hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (out, grads), (ref, ref_grads) = results["tfkernels"], results["eager"]
    assert_close_float64(out, ref, "T5 decoder last_hidden_state")
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in grads
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close_float64(g, ref_grads[name], f"grad {name}")
