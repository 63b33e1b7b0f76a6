"""fused_qkv vs F.linear + split + view/permute/contiguous (eager), torch.compile of
it, and the GEMM alone (a ceiling, not a peer); forward and forward+backward."""
import pytest

import providers


@pytest.mark.parametrize("case", providers.params("fused_qkv"))
def test_fused_qkv(run, case):
    run(case)
