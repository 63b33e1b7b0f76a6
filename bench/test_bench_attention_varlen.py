"""Packed variable-length attention at 50% padding against the padded kernel, SDPA
with a padding mask and torch's varlen_attn (forward and forward+backward); decoding
over a KV cache with and without split-KV against SDPA and the cache's read
bandwidth (forward)."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("attention_varlen"))
def test_attention_varlen(run, case):
    run(case)


@pytest.mark.parametrize("case", cases.params("attention_decode"))
def test_attention_decode(run, case):
    run(case)
