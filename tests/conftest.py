import os

# Kernels allocate outputs NaN-filled under this flag (csrc/alloc.cpp), so an
# element a kernel forgets to write fails the comparison. Set before the
# extension is loaded.
os.environ.setdefault("TFKERNELS_POISON_OUTPUTS", "1")

import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from tests.devices import cuda_device, device  # noqa: E402,F401 (fixtures: "cuda" and "emu"; also "cpu")
except ImportError:  # this file run outside the repository (tests/test_conftest.py copies it)
    pass


def seed_for(nodeid):
    """The test's seed: a stable hash of its id (not hash(), which Python salts per process)."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data per test, the same in every run, so a failure replays.
    seed = seed_for(request.node.nodeid)
    request.node.tfkernels_seed = seed
    torch.manual_seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "tfkernels_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("tfkernels seed", f"torch.manual_seed({seed}) (from zlib.crc32 of the test id; "
                                                  "rerunning this test uses it again)"))


def pytest_sessionfinish(session):
    # A pytest-xdist worker leaves its emulated-device counters for the controller.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    emu_device = sys.modules.get("tests.emu_device")  # only when a test used the emulated device
    if worker and emu_device is not None:
        emu_device.save_worker_stats(worker)


def pytest_terminal_summary(terminalreporter):
    if getattr(terminalreporter.config.option, "numprocesses", None):  # the controller of pytest-xdist workers
        from tests import emu_device

        emu_device.report_stats(terminalreporter, from_workers=True)
        return
    emu_device = sys.modules.get("tests.emu_device")  # only when a test used the emulated device
    if emu_device is not None:
        emu_device.report_stats(terminalreporter)


def pytest_collection_modifyitems(config, items):
    # The emulated device runs the quick grid (cases marked emu_quick) unless
    # TFKERNELS_EMU_GRID=full: every case is ~1000x slower than on a GPU.
    # A parameter marked emu_full (a near-duplicate of a quick case, e.g. fp16 where
    # bf16 takes the same path) leaves an emu_quick test's quick grid. Cases marked
    # gpu_only (sizes that take minutes under emulation) never run on the emulated device.
    full = os.environ.get("TFKERNELS_EMU_GRID", "quick") == "full"

    def in_quick_grid(item):
        return "emu_quick" in item.keywords and "emu_full" not in item.keywords

    def emu_dropped(item):
        return "emu" in item.keywords and ("gpu_only" in item.keywords or not (full or in_quick_grid(item)))

    kept, dropped = [], []
    for item in items:
        (dropped if emu_dropped(item) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
