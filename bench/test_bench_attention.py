"""flash_attention vs SDPA (every backend the device has), eager softmax(QK^T)V and
torch.compile of it; forward and forward+backward."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("attention"))
def test_attention(run, case):
    run(case)
