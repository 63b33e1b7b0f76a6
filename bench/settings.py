"""The benchmark run's settings and the machine it runs on.

Settings come from the environment, so that `python -m tfkernels.bench` and a
plain `pytest bench/` agree:

    TFKERNELS_BENCH_DEVICE    cpu | cuda (default: cuda when visible)
    TFKERNELS_BENCH_GRID      full | quick (default full; quick is the trimmed
                              grid tools/device_check.sh runs)
    TFKERNELS_BENCH_COMPILE   headline | all | none: shapes that torch.compile
                              runs on (default headline: compiling takes 5-20 s
                              per case)
    TFKERNELS_BENCH_DEADLINE  unix time after which remaining cases skip
    TFKERNELS_BENCH_NOTE      a line for the report's header
    TFKERNELS_BENCH_ORDER     forward | reverse: the order the cases run in (bench/run.py
                              runs its second pass in reverse)
    TFKERNELS_BENCH_INTERLEAVE  0: on the CPU, time each case alone rather than with
                              its row's providers in turn (bench/timing.py)
"""
import os
import platform
import re
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GELU = "tanh"  # every GELU provider uses the tanh form, so cuBLASLt's epilogue compares like for like


def bench_device():
    dev = os.environ.get("TFKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"TFKERNELS_BENCH_DEVICE must be cpu or cuda, got {dev!r}")
    return dev


def bench_grid():
    grid = os.environ.get("TFKERNELS_BENCH_GRID", "full")
    if grid not in ("full", "quick"):
        raise ValueError(f"TFKERNELS_BENCH_GRID must be full or quick, got {grid!r}")
    return grid


def compile_policy():
    policy = os.environ.get("TFKERNELS_BENCH_COMPILE", "headline")
    if policy not in ("headline", "all", "none"):
        raise ValueError(f"TFKERNELS_BENCH_COMPILE must be headline, all or none, got {policy!r}")
    return policy


def first_line(err, limit=200):
    """The first line of an error's text, cut to `limit` characters (for skip reasons and tables)."""
    text = str(err).strip().splitlines()
    text = text[0] if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOAD_AT_IMPORT = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

# --------------------------------------------------------------------------- device identity

def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_vector_isa():
    """The widest vector ISA the CPU kernels (and oneDNN) can use: it decides which of
    them is fast (an AVX2-only CPU runs bf16 GEMMs at a fraction of the fp32 rate), so
    runs on CPUs of one model name but different ISAs are kept apart."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"),
                       ("avx2", "avx2")):
        if flag in flags:
            return name
    return platform.machine() or "cpu"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores, {cpu_vector_isa().upper()})"


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device):
    """bench/results/<slug>/: nvidia-h200, cpu-amd-epyc-2c-avx512bf16."""
    if device == "cuda":
        return slugify(torch.cuda.get_device_name())
    model = re.sub(r"\b(\d+-core processor|processor|cpu @.*|\(r\)|\(tm\))", " ", cpu_model().lower())
    return f"cpu-{slugify(model)}-{os.cpu_count()}c-{cpu_vector_isa()}"


def environment(device):
    env = {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": (torch.version.cuda or "") if device == "cuda" else "",
        "torch_cuda": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "grid": bench_grid(),
        "compile": compile_policy(),
        "gelu": GELU,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if os.environ.get("TFKERNELS_BENCH_NOTE"):
        env["note"] = os.environ["TFKERNELS_BENCH_NOTE"]
    if hasattr(os, "getloadavg"):
        # Other work on the machine skews CPU timings: keep the 1-minute load at start and end.
        env["loadavg"] = [_LOAD_AT_IMPORT, round(os.getloadavg()[0], 2)]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["sms"] = props.multi_processor_count
        env["cudnn"] = str(torch.backends.cudnn.version() or "")
    try:
        import tfkernels

        env["tfkernels_build"] = tfkernels.build_info()
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        env["tfkernels_build"] = f"import failed: {first_line(err)}"
    return env


def cache_bytes(device):
    """The last-level cache that a repeated input would stay in (L2 on a GPU, L3 on a CPU)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or (32 << 20)
