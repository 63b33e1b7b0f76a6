"""A test of the tests: injects known bugs, one at a time, into a copy of the CUDA
sources and checks that the emulated grid fails on each.

    python tools/emu_fault_injection.py [--keep] [--only NAME]

For every fault: copy the repository (with its emulator build, so only the
touched kernels recompile), apply the fault by an exact text replacement, build
the emulated device, run the selected emulated tests, and expect them to FAIL.
Exits non-zero if any fault goes undetected or does not apply. Needs a built
tfkernels._C and `make emu` (and `make emu-asan` for the out-of-bounds fault).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FWD = "csrc/cuda/flash/flash_fwd_kernel.h"
TILE = "csrc/cuda/flash/flash_tile.h"
GEMM = "csrc/cuda/gemm/mainloop_tc.cuh"
FWD_TESTS = "tests/test_attention.py::test_head_dims[emu-forward-64-torch.bfloat16]"

# name, file, original text, faulty text, variant, tests (pytest node ids), what should catch it
FAULTS = [
    ("deleted __syncthreads", FWD,
     "      cuda::cp_async_wait<0>();\n      __syncthreads();\n",
     "      cuda::cp_async_wait<0>();\n",
     "race", [FWD_TESTS], "race detector / schedule comparison"),
    ("cp.async wait one group too few", FWD,
     "    cuda::cp_async_wait<1>();\n    __syncthreads();\n",
     "    cuda::cp_async_wait<2>();\n    __syncthreads();\n",
     "race", [FWD_TESTS], "poisoned cp.async destinations"),
    ("fragment index off by one", FWD,
     "    const int kb_col = 8 * ((lane / 8) % 2);\n",
     "    const int kb_col = 8 * ((lane / 8) % 2) + 1;\n",
     "race", [FWD_TESTS], "ldmatrix alignment / wrong result"),
    ("load one row past the end", TILE,
     "        const bool ok = grow < row_limit && c * 8 < head_dim;\n",
     "        const bool ok = grow <= row_limit && c * 8 < head_dim;\n",
     "asan", [FWD_TESTS], "AddressSanitizer (global out of bounds)"),
    ("missing mask on the last tile", FWD,
     "      const bool need_mask = !mask.all_visible(m0w, m0w + 16, n0, n0 + kBlockN);\n",
     "      const bool need_mask = false;\n",
     "race", [FWD_TESTS], "wrong result against the reference"),
    ("deleted __syncthreads in the GEMM epilogue", GEMM,
     "  __syncthreads();  // the pipeline smem is now free for the C tile\n",
     "",
     "race", ["tests/test_qkv.py", "-k", "emu"], "race detector / schedule comparison"),
]


def copy_tree(dst):
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "bench")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True, copy_function=shutil.copy2)


def run_fault(fault, python, keep):
    name, path, original, faulty, variant, tests, catcher = fault
    work = tempfile.mkdtemp(prefix="tfk-fault-")
    try:
        copy_tree(os.path.join(work, "repo"))
        repo = os.path.join(work, "repo")
        target = os.path.join(repo, path)
        text = open(target).read()
        if text.count(original) != 1:
            return "NOT APPLIED", f"the original text occurs {text.count(original)} times in {path}"
        open(target, "w").write(text.replace(original, faulty))
        env = dict(os.environ, TFKERNELS_EMU_REQUIRED="1", TFKERNELS_EMU_GRID="full", TFKERNELS_EMU_VARIANT=variant)
        build = subprocess.run([python, "csrc/emu/build.py", "--variant", variant], cwd=repo, env=env,
                               capture_output=True, text=True)
        if build.returncode != 0:
            return "BUILD FAILED", build.stderr[-2000:]
        if variant == "asan":
            libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout
            libstdcxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout
            # libstdc++ too: its __cxa_throw must be there when AddressSanitizer intercepts it.
            env["LD_PRELOAD"] = libasan.strip() + " " + libstdcxx.strip()
            env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
        run = subprocess.run([python, "-m", "pytest", "-x", "-q", "--capture=sys", "-p", "no:cacheprovider"] + tests, cwd=repo,
                             env=env, capture_output=True, text=True)
        out = run.stdout + run.stderr
        if run.returncode == 0:
            return "MISSED", out[-1500:]
        if "no tests ran" in out or run.returncode in (4, 5):
            return "NO TESTS", out[-1500:]
        return "CAUGHT", _first_failure_line(out)
    finally:
        if keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _first_failure_line(out):
    """The line that says what caught the fault: the emulator's or AddressSanitizer's
    report, else pytest's first `E ` line."""
    lines = out.splitlines()
    for keys in (("tfkernels emu:", "AddressSanitizer:"), ("E   ",)):
        for line in lines:
            if any(key in line for key in keys):
                return line.strip()[:300]
    return lines[-1][:300] if lines else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the faulty copies")
    parser.add_argument("--only", help="run only the fault whose name contains this")
    args = parser.parse_args()
    python = sys.executable
    failed = 0
    for fault in FAULTS:
        if args.only and args.only not in fault[0]:
            continue
        t0 = time.time()
        verdict, detail = run_fault(fault, python, args.keep)
        print(f"{verdict:12s} {fault[0]} ({fault[5]}; expected: {fault[6]}) [{time.time() - t0:.0f} s]")
        print(f"             {detail}")
        failed += verdict != "CAUGHT"
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
