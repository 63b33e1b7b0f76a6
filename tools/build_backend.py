"""PEP 517 build backend: setuptools, plus what a compiled torch extension needs.

tfkernels._C links against one torch's C++ library, so it must be built against
the very torch that will import it. Under build isolation (plain `pip install .`)
pip builds in a temporary environment whose packages come from the build
requirements, not from the environment being installed into. So, before the
build environment is filled, this backend asks the interpreter being installed
into which torch it has, and requires exactly that version:

- pip runs every hook in a subprocess of the target interpreter: `sys.executable`
  here is the interpreter pip itself runs under (the venv's `bin/python`), with
  only its site-packages hidden by PYTHONPATH and PYTHONNOUSERSITE. The same
  interpreter started without those two variables sees the packages the built
  wheel will import. (`/proc/<ppid>/exe`, pip's process, names the base
  interpreter a venv links to, not the venv: it would miss the venv's torch.)
- With no torch there (a fresh venv), the pin in requirements/torch.txt is built
  against; the wheel then requires it and pip installs it alongside.
- setup.py makes the wheel require `torch==<the version built against>`, so pip
  never pairs the extension with another torch.

Front ends that build in a venv of their own (`python -m build`, uv) hide the
target from this backend: they get the pin, and the pin in the wheel's metadata
still keeps the pair consistent.

With `--no-build-isolation` the torch already installed is used as is.

The checks a build cannot do without (a C++ compiler, Python's headers, a
valid TFKERNELS_CUDA) run first, so a machine that lacks one fails within
seconds with the fix named, not minutes later in the compiler.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (re-exported hooks)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

ROOT = Path(__file__).resolve().parent.parent
PINNED_TORCH_FILE = ROOT / "requirements" / "torch.txt"
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")


class BuildPrerequisiteMissing(SystemExit):
    """Ends the hook with a message and no traceback (pip prints the hook's output)."""

    def __init__(self, message):
        super().__init__(f"\ntfkernels cannot be built here: {message}\n")


def pinned_torch():
    """The `torch==X` line of requirements/torch.txt."""
    for line in PINNED_TORCH_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("torch"):
            return line
    raise BuildPrerequisiteMissing(f"{PINNED_TORCH_FILE} names no torch version")


def installed_torch_version(python):
    """The torch version installed for `python` as it runs outside pip's build environment, or None."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    code = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = proc.stdout.strip()
    return version if proc.returncode == 0 and version else None


def torch_requirement(python=None):
    """(requirement, why): the torch to build against."""
    python = python or sys.executable
    version = installed_torch_version(python)
    if version:
        return f"torch=={version}", f"the torch installed for {python}"
    return pinned_torch(), f"{python} has no torch: the pinned one ({PINNED_TORCH_FILE.relative_to(ROOT)})"


def check_prerequisites():
    """Fail now, naming the fix, when the build would fail later for want of a tool."""
    flag = os.environ.get("TFKERNELS_CUDA")
    if flag not in (None, "0", "1"):
        raise BuildPrerequisiteMissing(f"TFKERNELS_CUDA must be 0 or 1, got {flag!r}.")
    compiler = shlex.split(os.environ.get("CXX") or "c++") or ["c++"]
    if shutil.which(compiler[0]) is None:
        raise BuildPrerequisiteMissing(
            f"no C++ compiler: `{compiler[0]}` is not on PATH (set CXX to use another one). Install one, e.g. "
            "`apt-get install g++` (Debian/Ubuntu) or `dnf install gcc-c++` (Fedora/RHEL), then rerun.")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise BuildPrerequisiteMissing(
            f"no Python headers: {headers} is missing. Install them, e.g. `apt-get install python{version}-dev` "
            f"(Debian/Ubuntu) or `dnf install python{version}-devel` (Fedora/RHEL), then rerun.")


def _requires_with_torch(setuptools_hook, config_settings):
    check_prerequisites()  # before setuptools runs setup.py: the first thing pip shows is the fix
    requirement, why = torch_requirement()
    print(f"tfkernels: building against {requirement} ({why})", file=sys.stderr)
    return list(setuptools_hook(config_settings)) + [requirement]


def get_requires_for_build_wheel(config_settings=None):
    return _requires_with_torch(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires_with_torch(_setuptools.get_requires_for_build_editable, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_prerequisites()  # again: --no-build-isolation skips the get_requires hooks
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check_prerequisites()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
