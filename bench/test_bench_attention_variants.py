"""Attention variants: a causal sliding window (S 8192, W 1024) against SDPA with the
band as an explicit mask, flex_attention with a block mask and eager; the softcap
against the eager code and torch.compile of it; forward and forward+backward."""
import pytest

import providers_attention_variants as variants


@pytest.mark.parametrize("case", variants.params("attention_window"))
def test_attention_window(run, case):
    run(case)


@pytest.mark.parametrize("case", variants.params("attention_softcap"))
def test_attention_softcap(run, case):
    run(case)
