"""What was built: build_info() tells the truth about the loaded extension, and
every op schema has the kernels this build promises."""
import os
import re
import pathlib

import pytest
import torch

import tfkernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _schema_names():
    """Op names declared in csrc/ops.cpp (the single source of schemas)."""
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    names = re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\(', text)
    assert names, "no m.def(...) found in csrc/ops.cpp"
    return names


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tfkernels::{op}", key)


def test_build_info_fields():
    info = tfkernels.build_info()
    assert set(info) >= {"torch_version", "torch_version_now", "cuda", "cuda_version", "cuda_archs"}
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)


def test_build_info_torch_version_matches_running_torch():
    info = tfkernels.build_info()
    assert info["torch_version"] == torch.__version__, (
        f"tfkernels._C was built against torch {info['torch_version']} but torch {torch.__version__} is running; "
        "rebuild with `pip install --no-build-isolation -e .`")
    assert info["torch_version_now"] == torch.__version__


def test_build_info_cuda_is_consistent_with_registered_kernels():
    info = tfkernels.build_info()
    has_cuda_kernel = _has_kernel("bias_gelu", "CUDA")
    assert has_cuda_kernel == info["cuda"], (
        f"build_info()['cuda'] is {info['cuda']} but tfkernels::bias_gelu "
        f"{'has' if has_cuda_kernel else 'has no'} CUDA kernel")
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must list the architectures it compiled"
        for arch in info["cuda_archs"]:
            assert re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", arch), f"odd architecture {arch!r}"
        assert info["cuda_version"], "a CUDA build must report its CUDA version"
        assert info["cuda_version"] == torch.version.cuda
    else:
        assert info["cuda_archs"] == []


def test_every_schema_is_declared_once():
    names = _schema_names()
    assert len(names) == len(set(names)), f"duplicate schemas in csrc/ops.cpp: {names}"
    for name in names:
        assert hasattr(torch.ops.tfkernels, name), f"tfkernels::{name} is not registered"


@pytest.mark.parametrize("op", [n for n in _schema_names() if not n.startswith("_")])
def test_every_op_has_a_cpu_kernel(op):
    # Underscored ops are test-only probes of the CUDA primitives (no CPU kernel).
    assert _has_kernel(op, "CPU"), f"tfkernels::{op} has no CPU kernel (csrc/cpu/ must register one)"


def _cmake_library():
    """The CMake-built library, if `make cmake-test` built one."""
    build = pathlib.Path(os.environ.get("TFKERNELS_CMAKE_BUILD_DIR", ROOT / "build" / "cmake"))
    for name in ("libtfkernels_ops.so", "libtfkernels_ops.dylib", "tfkernels_ops.dll"):
        if (build / name).exists():
            return build / name
    return None


def test_cmake_library_loads_with_torch_ops_load_library():
    """Optional: the library that CMake builds for C++ users also loads into Python.

    It registers the same op names as tfkernels._C, which is already imported here,
    so it runs in a fresh interpreter that does not import tfkernels.
    """
    path = _cmake_library()
    if path is None:
        pytest.skip("no CMake build (run `make cmake-test` first)")
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        f"torch.ops.load_library({str(path)!r})\n"
        "op = torch.ops.tfkernels.bias_gelu\n"
        "if torch._C._dispatch_has_kernel_for_dispatch_key('tfkernels::bias_gelu', 'CPU'):\n"
        "    x, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)\n"
        "    torch.testing.assert_close(op(x, b, 'none'), F.gelu(x + b))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"loading {path} failed:\n{result.stdout}\n{result.stderr}"
