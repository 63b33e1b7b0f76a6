"""fused_qkv vs F.linear + split + view/permute/contiguous (eager), torch.compile of
it, and the GEMM alone (a ceiling, not a peer); forward and forward+backward."""
import pytest

import cases


@pytest.mark.parametrize("case", cases.params("fused_qkv"))
def test_fused_qkv(run, case):
    run(case)
