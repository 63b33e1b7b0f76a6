"""Builds the emulated-device test library: the unmodified CUDA kernels and their
torch-facing launchers, compiled by the host compiler against csrc/emu/, as one
shared library that registers the launchers under the op namespace
`tfkernels_emu` (CPU tensors in, CPU tensors out). Never part of tfkernels._C.

    python csrc/emu/build.py [--variant race|asan] [--jobs N] [--verbose]

Variants (each in build/emu/<variant>/, rebuilt incrementally by ninja):
  race  (default) kernel code instrumented with gcc's -fsanitize=thread, whose
        hooks the engine implements itself (csrc/emu/memory.cpp): every plain
        load and store of a kernel is checked for shared-memory races, bounds and
        natural alignment. No ThreadSanitizer runtime is involved.
  asan  everything built with AddressSanitizer, for out-of-bounds global memory;
        the library must be loaded into a process started with libasan preloaded
        (tests/emu_device.py prints the command).
Prints the path of the built library.
"""
import argparse
import glob
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ROOT = os.path.dirname(CSRC)
sys.path.insert(0, HERE)
import rewrite_sources  # noqa: E402

LIBRARY_NAME = "libtfkernels_emu.so"
# The torch headers every launcher includes, parsed once into a precompiled header
# that the launchers are compiled with (-include): 5-6 s a launcher instead of 16.
TORCH_PCH = "torch_pch.h"
TORCH_PCH_HEADERS = ("ATen/core/Tensor.h", "torch/library.h", "ATen/ops/empty.h", "ATen/ops/zeros.h")


def torch_flags():
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    return includes + [abi], [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch"]


def ninja_binary():
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return "ninja"


def write_ninja(build_dir, variant, kernel_sources, launcher_sources, runtime_sources):
    """build.ninja with paths relative to the build folder, so that a copy of the
    tree (tools/emu_fault_injection.py) rebuilds only what it changed."""
    torch_cflags, torch_ldflags = torch_flags()

    def rel(path):
        return os.path.relpath(path, build_dir)

    src_dir = os.path.join(ROOT, "build", "emu", "src")
    common = ["-fPIC", "-DTFKERNELS_EMULATE", "-Wno-attributes", f"-I{rel(src_dir)}", f"-I{rel(HERE)}/include",
              f"-I{rel(CSRC)}"]
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if variant == "asan" else []
    kernel_flags = ["-std=c++17", "-O1"] + common + (sanitize or ["-fsanitize=thread"])
    launcher_flags = ["-std=c++20", "-O1"] + common + torch_cflags + sanitize
    write_if_changed(os.path.join(build_dir, TORCH_PCH), "".join(f"#include <{h}>\n" for h in TORCH_PCH_HEADERS))
    runtime_flags = ["-std=c++17", "-O2", "-g"] + common + sanitize
    ldflags = ["-shared"] + sanitize + torch_ldflags

    lines = [
        f"cxx = {os.environ.get('CXX', 'c++')}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule pch",
        "  command = $cxx -MMD -MF $out.d $flags -x c++-header $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = PCH $in",
        "rule link",
        "  command = $cxx $in -o $out.tmp $ldflags && mv -f $out.tmp $out",
        "  description = LINK $out",
    ]

    def flag_line(flags):
        return f"  flags = {' '.join(shlex.quote(f) for f in flags)}"

    # gcc takes TORCH_PCH.gch for `-include TORCH_PCH` when the flags match (else it
    # parses the header, and -Winvalid-pch says so).
    lines += [f"build {TORCH_PCH}.gch: pch {TORCH_PCH}", flag_line(launcher_flags)]
    with_pch = launcher_flags + ["-include", TORCH_PCH, "-Winvalid-pch"]
    objects = []
    for group, flags, implicit in ((kernel_sources, kernel_flags, ""),
                                   (launcher_sources, with_pch, f" | {TORCH_PCH}.gch"),
                                   (runtime_sources, runtime_flags, "")):
        for src in group:
            obj = os.path.join("obj", os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: cxx {rel(src)}{implicit}")
            lines.append(flag_line(flags))
    lines.append(f"build {LIBRARY_NAME}: link {' '.join(objects)}")
    lines.append(f"  ldflags = {' '.join(shlex.quote(f) for f in ldflags)}")
    lines.append(f"default {LIBRARY_NAME}")
    write_if_changed(os.path.join(build_dir, "build.ninja"), "\n".join(lines) + "\n")
    return os.path.join(build_dir, LIBRARY_NAME)


def write_if_changed(path, text):
    """Leaves an unchanged file alone, so that ninja rebuilds nothing for it."""
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def build(variant="race", jobs=None, verbose=False):
    """Builds (incrementally) and returns the path of the library."""
    if variant not in ("race", "asan"):
        raise ValueError(f"variant must be 'race' or 'asan', got {variant!r}")
    src_dir = os.path.join(ROOT, "build", "emu", "src")
    rewritten = rewrite_sources.main(CSRC, src_dir)
    kernel_sources = sorted(p for p in rewritten if p.endswith(".cu.cpp"))
    launcher_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))) + [
        os.path.join(CSRC, name)
        for name in ("ops.cpp", "args.cpp", "alloc.cpp", "kvcache_args.cpp", "cpu/warm_buffers.cpp", "cpu/cpu_caps.cpp")
    ] + [os.path.join(HERE, "ops_emu.cpp")]
    runtime_sources = [os.path.join(HERE, name) for name in ("engine.cpp", "memory.cpp", "fiber.cpp", "stats.cpp")]
    build_dir = os.path.join(ROOT, "build", "emu", variant)
    os.makedirs(os.path.join(build_dir, "obj"), exist_ok=True)
    library = write_ninja(build_dir, variant, kernel_sources, launcher_sources, runtime_sources)
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
    cmd = [ninja_binary(), "-C", build_dir, "-j", str(jobs)] + (["-v"] if verbose else [])
    result = subprocess.run(cmd, capture_output=not verbose, text=True)
    if result.returncode != 0:
        sys.stderr.write((result.stdout or "") + (result.stderr or ""))
        raise RuntimeError(f"building the emulated device failed (ninja exit {result.returncode})")
    return library


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="race", choices=["race", "asan"])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(build(args.variant, args.jobs, args.verbose))


if __name__ == "__main__":
    main()
