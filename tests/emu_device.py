"""The emulated CUDA device (csrc/emu/) as the tests use it.

`active()` routes every tfkernels op that has a CUDA kernel to that kernel, run
on the CPU under the emulator: inside it, `tfkernels.flash_attention(q, k, v)`
on CPU tensors (autograd, modules and all) executes the unmodified CUDA kernels.
Each call runs under two extreme schedules (lowest warp first, highest warp
first; TFKERNELS_EMU_SCHEDULES overrides the list) and their outputs must agree
bitwise: a missing barrier shows up as a difference even where the access is a
plain shared-memory load or store. The race detector, the shared-memory bounds
and alignment checks and the poisoning run inside every launch.

The library is built by `make emu` (python csrc/emu/build.py). Without it the
"emu" device is skipped, unless TFKERNELS_EMU_REQUIRED=1 (make test, CI), which
makes a missing build an error.
"""
import contextlib
import glob
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT = os.environ.get("TFKERNELS_EMU_VARIANT", "race")
LIBRARY = os.path.join(ROOT, "build", "emu", VARIANT, "libtfkernels_emu.so")

# Every op with a CUDA kernel, and the outputs that atomics may reorder (compared
# with a tolerance across schedules instead of bitwise): the non-deterministic
# flash backward accumulates dq with fp32 atomicAdd.
OPS = ["flash_attention_fwd", "flash_attention_bwd", "flash_attention_varlen_fwd", "flash_attention_varlen_bwd",
       "flash_attention_kvcache", "fused_qkv", "fused_qkv_bwd", "bias_gelu", "bias_gelu_bwd", "linear_gelu",
       "linear_gelu_bwd", "fused_mlp", "fused_mlp_bwd", "_dropout_mask"]


# The backwards' `deterministic` argument (q is argument 2 of both).
_BWD_DETERMINISTIC = {"flash_attention_bwd": 11, "flash_attention_varlen_bwd": 14}


def _atomic_outputs(name, args):
    # dq (and, should the kernel sum it with atomics, grad_sinks) of the default backward.
    index = _BWD_DETERMINISTIC.get(name)
    if index is not None and not args[index] and args[2].dtype != torch.float32:
        return {0, 3}
    return set()


_loaded = None


def load():
    """Loads the emulator library once; returns None (and why) when it is not built."""
    global _loaded
    if _loaded is None:
        if not os.path.exists(LIBRARY):
            _loaded = (False, f"the emulated device is not built ({LIBRARY} missing): run `make emu`")
        else:
            torch.ops.load_library(LIBRARY)
            _loaded = (True, "")
    return _loaded


def require():
    ok, why = load()
    if not ok:
        if os.environ.get("TFKERNELS_EMU_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)


def schedules():
    return [s for s in os.environ.get("TFKERNELS_EMU_SCHEDULES", "lowest,highest").split(",") if s]


@contextlib.contextmanager
def schedule(name):
    old = os.environ.get("TFKERNELS_EMU_SCHEDULE")
    os.environ["TFKERNELS_EMU_SCHEDULE"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["TFKERNELS_EMU_SCHEDULE"]
        else:
            os.environ["TFKERNELS_EMU_SCHEDULE"] = old


def _bits(t):
    """A view of t's bytes for bitwise comparison (NaN payloads included)."""
    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.numel() else t


def _same(a, b, name, index, exact):
    if a is None or b is None:
        return a is b
    if exact:
        return torch.equal(_bits(a), _bits(b))
    return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3, equal_nan=True)


def _run_compared(name):
    emu_op = getattr(torch.ops.tfkernels_emu, name)

    def kernel(*args):
        results = []
        for s in schedules():
            with schedule(s):
                out = emu_op(*args)
            results.append(out if isinstance(out, (tuple, list)) else (out,))
        atomic = _atomic_outputs(name, args)
        for s, other in zip(schedules()[1:], results[1:]):
            for i, (a, b) in enumerate(zip(results[0], other)):
                if not _same(a, b, name, i, exact=i not in atomic):
                    raise AssertionError(
                        f"tfkernels emu: {name} output {i} differs between schedules {schedules()[0]!r} and {s!r}: "
                        "a missing __syncthreads/__syncwarp or a race the detector did not see")
        first = results[0]
        return first if len(first) > 1 else first[0]

    return kernel


@contextlib.contextmanager
def active():
    """Runs the tfkernels ops' CPU dispatch through the emulated CUDA kernels."""
    require()
    lib = torch.library.Library("tfkernels", "IMPL")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            for name in OPS:
                lib.impl(name, _run_compared(name), "CPU")
        yield
    finally:
        lib._destroy()


def stats():
    """Per-kernel counters since the last reset: a list of dicts (see csrc/emu/stats.cpp)."""
    require()
    lines = torch.ops.tfkernels_emu.emu_stats().strip().split("\n")
    keys = lines[0].split("\t")
    return [dict(zip(keys, line.split("\t"))) for line in lines[1:]]


def _stats_path(worker=None):
    name = "kernel_stats.tsv" if worker is None else f"kernel_stats.{worker}.tsv"
    return os.path.join(os.path.dirname(LIBRARY), name)


def save_worker_stats(worker):
    """Under pytest-xdist: a worker's counters into kernel_stats.<worker>.tsv, for
    the controller's report_stats to sum."""
    if _loaded and _loaded[0]:
        with open(_stats_path(worker), "w") as f:
            f.write(torch.ops.tfkernels_emu.emu_stats())


def _summed_worker_stats():
    """Rows of every worker's file, summed per kernel (the files are removed)."""
    folder = os.path.dirname(LIBRARY)
    paths = sorted(glob.glob(os.path.join(folder, "kernel_stats.*.tsv"))) if os.path.isdir(folder) else []
    keys, rows = None, {}
    for path in paths:
        with open(path) as f:
            lines = f.read().strip().split("\n")
        os.remove(path)
        keys = lines[0].split("\t")
        for line in lines[1:]:
            row = dict(zip(keys, line.split("\t")))
            into = rows.setdefault(row["kernel"], dict.fromkeys(keys, 0) | {"kernel": row["kernel"]})
            for key in keys:
                if key != "kernel":
                    into[key] = int(into[key]) + int(row[key])
    return keys, list(rows.values())


def report_stats(terminalreporter, from_workers=False):
    """At the end of a run that used the emulated device: the per-kernel counters
    (launches, blocks, ldmatrix bank conflicts) into build/emu/<variant>/kernel_stats.tsv
    and one summary line. `from_workers`: sum what the pytest-xdist workers saved."""
    if from_workers:
        keys, rows = _summed_worker_stats()
        if not rows:
            return
        text = "\t".join(keys) + "\n" + "".join("\t".join(str(r[k]) for k in keys) + "\n" for r in rows)
    elif _loaded and _loaded[0]:
        text = torch.ops.tfkernels_emu.emu_stats()
        rows = stats()
    else:
        return
    path = _stats_path()
    with open(path, "w") as f:
        f.write(text)
    conflicts = sum(int(r["ldmatrix_conflicts"]) for r in rows)
    matrices = sum(int(r["ldmatrix_matrices"]) for r in rows)
    terminalreporter.write_line(
        f"emulated device: {len(rows)} kernels, {sum(int(r['launches']) for r in rows)} launches, "
        f"{matrices} ldmatrix matrices with {conflicts} extra bank-conflict wavefronts (per kernel: {path})")
