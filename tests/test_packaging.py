"""Packaging: the build backend's choice of torch, its early failures, and the sdist's contents."""
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tarfile
import time
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_backend  # noqa: E402

# pip's isolated build environment hides the target's site-packages this way: a
# sitecustomize on PYTHONPATH that drops them from sys.path (PYTHONNOUSERSITE too).
_HIDE_SITE_PACKAGES = "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"


def test_backend_asks_the_target_interpreter_past_pips_isolation(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(_HIDE_SITE_PACKAGES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    hidden = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    assert hidden.returncode != 0, "the simulated build environment should hide torch"
    requirement, why = build_backend.torch_requirement(sys.executable)
    assert requirement == f"torch=={importlib.metadata.version('torch')}"
    assert sys.executable in why


def test_backend_falls_back_to_the_pin_without_torch(tmp_path):
    venv.create(tmp_path / "bare", with_pip=False)
    requirement, why = build_backend.torch_requirement(str(tmp_path / "bare" / "bin" / "python"))
    pins = (ROOT / "requirements" / "torch.txt").read_text()
    assert requirement.startswith("torch==") and requirement in pins
    assert "has no torch" in why


def _run_hook(hook, **env):
    code = f"import build_backend; print(build_backend.{hook}())"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tools"), **env})
    return proc, time.monotonic() - start


@pytest.mark.parametrize("hook", ["get_requires_for_build_wheel", "get_requires_for_build_editable"])
def test_no_compiler_fails_within_seconds_naming_the_fix(hook):
    proc, seconds = _run_hook(hook, CXX="/nonexistent/c++")
    assert proc.returncode != 0
    assert "no C++ compiler" in proc.stderr and "apt-get install g++" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 30


def test_bad_cuda_flag_fails_naming_the_values():
    proc, _ = _run_hook("get_requires_for_build_wheel", TFKERNELS_CUDA="yes")
    assert proc.returncode != 0 and "TFKERNELS_CUDA must be 0 or 1, got 'yes'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_sdist_holds_everything_a_build_needs(tmp_path):
    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                 capture_output=True, text=True, check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files an sdist must hold are unknown")
    needed = {name for name in tracked
              if name.startswith(("csrc/", "tools/", "requirements/", "tests/", "docs/"))
              or name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "MANIFEST.in")
              or (name.startswith("tfkernels/") and name.endswith(".py"))}
    code = f"import build_backend; print(build_backend.build_sdist({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tools")})
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
        pkg_info = sdist.extractfile(f"{name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    assert not needed - members, f"missing from the sdist: {sorted(needed - members)}"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))]
    assert "Requires-Dist: torch" in pkg_info  # pinned when a wheel is built from it
