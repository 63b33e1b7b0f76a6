import os

# Kernels allocate outputs NaN-filled under this flag (csrc/alloc.cpp), so an
# element a kernel forgets to write fails the comparison. Set before the
# extension is loaded.
os.environ.setdefault("TFKERNELS_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data per test, reproducible from the test's id.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
