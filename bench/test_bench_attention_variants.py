"""Attention variants: a causal sliding window (S 8192, W 1024) against SDPA with the
band as an explicit mask, eager and flex_attention with a block mask; the softcap
against the eager code and torch.compile of it; forward and forward+backward."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("attention_window"))
def test_attention_window(run, case):
    run(case)


@pytest.mark.parametrize("case", cases.params("attention_softcap"))
def test_attention_softcap(run, case):
    run(case)
