"""flash_attention vs SDPA (every backend the device has), eager softmax(QK^T)V and
torch.compile of it; forward and forward+backward. First the GEMM ceiling (torch.mm
2048^3 per dtype), which the report reads attention's forward throughput against."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("gemm"))
def test_gemm_ceiling(run, case):
    run(case)


@pytest.mark.parametrize("case", cases.params("attention"))
def test_attention(run, case):
    run(case)
