"""The MLP family: linear_gelu and fused_mlp vs eager F.linear + F.gelu, cuBLASLt's
GELU epilogue (torch._addmm_activation, CUDA), torch.compile, and the GEMMs alone (a
ceiling); bias_gelu vs eager and torch.compile in GB/s. tanh GELU throughout."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("linear_gelu"))
def test_linear_gelu(run, case):
    run(case)


@pytest.mark.parametrize("case", cases.params("fused_mlp"))
def test_fused_mlp(run, case):
    run(case)


@pytest.mark.parametrize("case", cases.params("bias_gelu"))
def test_bias_gelu(run, case):
    run(case)
