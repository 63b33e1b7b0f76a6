import os

# Kernels allocate outputs NaN-filled under this flag (csrc/alloc.cpp), so an
# element a kernel forgets to write fails the comparison. Set before the
# extension is loaded.
os.environ.setdefault("TFKERNELS_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.devices import cuda_device  # noqa: E402,F401 (fixture: the CUDA kernels on "cuda" and "emu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data per test, reproducible from the test's id.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    yield


def pytest_collection_modifyitems(config, items):
    # The emulated device runs the quick grid (cases marked emu_quick) unless
    # TFKERNELS_EMU_GRID=full: every case is ~1000x slower than on a GPU.
    if os.environ.get("TFKERNELS_EMU_GRID", "quick") != "full":
        kept, dropped = [], []
        for item in items:
            (dropped if "emu" in item.keywords and "emu_quick" not in item.keywords else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
