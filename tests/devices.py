"""The devices the kernels' tests run on, as pytest parametrisations.

- "cpu": the CPU kernels (fixture `device` only).
- "cuda": a real GPU (skipped without one).
- "emu": the emulated CUDA device (tests/emu_device.py): CPU tensors, the
  unmodified CUDA kernels executed on the CPU with races, bounds, alignment,
  poisoned shared memory and two schedules checked on every launch.

A test of the CUDA kernels takes the `cuda_device` fixture ("cuda", "emu"); a test
whose check is the same for every kernel takes `device` ("cpu", "cuda", "emu").
Either creates its tensors on the torch device the fixture yields ("cuda" or
"cpu"); for "emu" the fixture keeps the emulated kernels active for the whole test. `make test` runs the emulated grid's quick
subset (the cases marked `emu_quick`); TFKERNELS_EMU_GRID=full (make test-emu-full)
runs every case under emulation.
"""
import contextlib

import pytest

from . import emu_device

CUDA_DEVICES = [
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
    pytest.param("emu", marks=pytest.mark.emu, id="emu"),
]


@contextlib.contextmanager
def on(device):
    """Yields the torch device tensors go on for a CUDA-kernel device name."""
    if device == "emu":
        with emu_device.active():
            yield "cpu"
    else:
        yield device


ALL_DEVICES = [pytest.param("cpu", id="cpu")] + CUDA_DEVICES


@pytest.fixture(params=CUDA_DEVICES)
def cuda_device(request):
    with on(request.param) as torch_device:
        yield torch_device


@pytest.fixture(params=ALL_DEVICES)
def device(request):
    with on(request.param) as torch_device:
        yield torch_device
