"""Copies the CUDA sources for the emulated device, rewriting the three pieces of
CUDA syntax that no macro can express, and nothing else:

    kernel<<<grid, block, smem, stream>>>(args)  ->  kernel / ::tfkernels::emu::LaunchConfig(__FILE__, __LINE__, grid, block, smem, stream)(args)
    extern __shared__ T name[];                  ->  T* const name = TFK_EMU_DYNAMIC_SMEM(T);
    __shared__ T name[A][B];                     ->  auto& name = TFK_EMU_STATIC_SMEM(align, T[A][B]);

Lines keep their numbers and a #line directive names the original file, so
compiler messages and emulator reports point into csrc/cuda/. Files are written
only when their text changes, so ninja rebuilds only what changed.

    python rewrite_sources.py SRC_ROOT OUT_ROOT    # SRC_ROOT = csrc, rewrites SRC_ROOT/cuda/**
"""
import os
import re
import sys

LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)
DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
STATIC_SMEM = re.compile(
    r"__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([\w:<>]+(?:\s+[\w:<>]+)*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
EXTENSIONS = (".cu", ".cuh", ".h")


def rewrite(text):
    text = LAUNCH.sub(lambda m: " / ::tfkernels::emu::LaunchConfig(__FILE__, __LINE__, " + m.group(1) + ")", text)
    text = DYNAMIC_SMEM.sub(lambda m: f"{m.group(1)}* const {m.group(2)} = TFK_EMU_DYNAMIC_SMEM({m.group(1)});", text)
    text = STATIC_SMEM.sub(
        lambda m: f"auto& {m.group(3)} = TFK_EMU_STATIC_SMEM({m.group(1) or 16}, {m.group(2)}{m.group(4)});", text)
    return text


def output_name(rel):
    # .cu files become .cu.cpp so that the host compiler (not nvcc) builds them.
    return rel + ".cpp" if rel.endswith(".cu") else rel


def main(src_root, out_root):
    written = []
    for folder, _, files in os.walk(os.path.join(src_root, "cuda")):
        for name in sorted(files):
            if not name.endswith(EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, src_root)
            with open(path) as f:
                text = f.read()
            # The #line path is relative to the repository root (the folder above
            # SRC_ROOT), so that a copy of the tree rewrites to the same text.
            shown = os.path.relpath(path, os.path.dirname(os.path.abspath(src_root)))
            new = f'#line 1 "{shown}"\n' + rewrite(text)
            if "<<<" in new or ">>>" in new:
                sys.exit(f"{path}: a kernel launch the rewrite did not understand")
            out = os.path.join(out_root, output_name(rel))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if not os.path.exists(out) or open(out).read() != new:
                with open(out, "w") as f:
                    f.write(new)
            written.append(out)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for path in main(sys.argv[1], sys.argv[2]):
        print(path)
