"""Pick, or make, the Python environment that `make test` and `make bench` run in.

    python3 tools/dev_env.py --record build/.python [--python PY]

Writes the chosen interpreter's path to the --record file and prints one line
per step. Standard library only: it runs before anything is installed.

The choice, first match wins:
1. --python PY (make's PYTHON=PY): that interpreter. It must have torch; missing
   test tools are installed into it, saying so. PYTHON=venv means the
   checkout's .venv, whatever else is around (what CI uses).
2. An active virtualenv or conda environment with torch: used; missing test
   tools are installed into it, saying so. Without torch it is left alone.
3. The checkout's .venv, when it exists.
4. `python3` on PATH, when it has torch and every test tool (nothing is ever
   installed into it).
5. Otherwise a new .venv in the checkout.
The checkout's .venv gets requirements/torch.txt and requirements/dev.txt,
again whenever either changes (its `tfkernels-requirements.sha256` records
which it has).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
REQUIREMENTS = [ROOT / "requirements" / "torch.txt", ROOT / "requirements" / "dev.txt"]
TOOLS = REQUIREMENTS[1]
REQUIREMENTS_STAMP = VENV / "tfkernels-requirements.sha256"
MIN_VENV_PYTHON = (3, 11)  # the oldest Python the pinned tools in requirements/dev.txt support

# Runs inside a candidate interpreter: its version, its torch, which tools it lacks.
PROBE = r"""
import importlib.metadata, importlib.util, json, sys
tools = json.loads(sys.argv[1])
torch_version = None
if importlib.util.find_spec("torch") is not None:
    try:
        import torch
        torch_version = torch.__version__
    except Exception as err:  # a torch that does not import is no torch
        print(f"torch does not import: {err}", file=sys.stderr)
missing = []
for name in tools:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
print(json.dumps({"version": list(sys.version_info[:2]), "torch": torch_version, "missing": missing}))
"""


def say(message):
    print(f"==> {message}", flush=True)


def fail(message):
    sys.exit(f"==> make: {message}")


def relative(path):
    path = Path(path)
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def tool_requirements():
    """{distribution name: requirement line} from requirements/dev.txt."""
    lines = {}
    for line in TOOLS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines[re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]] = line
    return lines


def probe(python):
    """What `python` has, or None when it does not run."""
    try:
        proc = subprocess.run([str(python), "-c", PROBE, json.dumps(sorted(tool_requirements()))],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def pip_install(python, args, why):
    say(why)
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off", *args]
    if subprocess.run(cmd).returncode != 0:
        fail(f"`{' '.join(cmd)}` failed (its output is above)")


def install_missing_tools(python, where, found):
    if not found["missing"]:
        return
    wanted = tool_requirements()
    lines = [wanted[name] for name in found["missing"]]
    pip_install(python, lines, f"installing into {where}, which lacks them: {' '.join(lines)}")


def requirements_digest():
    digest = hashlib.sha256()
    for path in REQUIREMENTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def venv_base_python():
    """A Python new enough for the pinned tools to make the .venv with."""
    candidates = [sys.executable] + [shutil.which(f"python3.{minor}") for minor in range(14, MIN_VENV_PYTHON[1] - 1, -1)]
    for python in filter(None, candidates):
        found = probe(python)
        if found and tuple(found["version"]) >= MIN_VENV_PYTHON:
            return python
    need = ".".join(map(str, MIN_VENV_PYTHON))
    fail(f"the pinned test tools need Python {need} or newer, and none was found ({sys.executable} is "
         f"{sys.version_info.major}.{sys.version_info.minor}): install one, or point PYTHON= at an "
         "environment that has torch")


def own_venv():
    """The checkout's .venv, created and given the pinned requirements when needed."""
    python = VENV / "bin" / "python"
    if not python.exists():
        base = venv_base_python()
        say(f"creating {relative(VENV)} ({base} -m venv)")
        if subprocess.run([base, "-m", "venv", str(VENV)]).returncode != 0:
            fail(f"`{base} -m venv {VENV}` failed: install the venv module (e.g. apt-get install python3-venv)")
    digest = requirements_digest()
    if not REQUIREMENTS_STAMP.exists() or REQUIREMENTS_STAMP.read_text().strip() != digest:
        files = " ".join(f"-r {relative(p)}" for p in REQUIREMENTS)
        pip_install(python, [arg for p in REQUIREMENTS for arg in ("-r", str(p))],
                    f"installing the pinned torch and test tools into {relative(VENV)} (pip install {files}; "
                    "a few minutes the first time)")
        REQUIREMENTS_STAMP.write_text(digest + "\n")
    say(f"python: {relative(python)}")
    return python


def use_existing(python, where):
    """An interpreter the user chose (PYTHON= or an active environment): it must have torch."""
    found = probe(python)
    if found is None:
        fail(f"{python} does not run")
    if not found["torch"]:
        return None
    install_missing_tools(python, where, found)
    say(f"python: {python} ({where}, torch {found['torch']})")
    return python


def active_environment():
    """(prefix, description) of an activated virtualenv or conda environment, else None."""
    for variable, kind in (("VIRTUAL_ENV", "virtualenv"), ("CONDA_PREFIX", "conda environment")):
        prefix = os.environ.get(variable)
        if prefix and Path(prefix, "bin", "python").exists():
            return Path(prefix), f"the active {kind} {prefix}"
    return None


def choose(requested):
    if requested == "venv":
        return own_venv()
    if requested:
        python = shutil.which(requested) or requested
        chosen = use_existing(python, f"PYTHON={requested}")
        if chosen is None:
            fail(f"PYTHON={requested} has no torch: install it there (pip install -r requirements/torch.txt), "
                 "or leave PYTHON unset to use the checkout's .venv")
        return chosen
    active = active_environment()
    if active and active[0].resolve() != VENV.resolve():  # an activated .venv is the case below
        prefix, where = active
        chosen = use_existing(prefix / "bin" / "python", where)
        if chosen:
            return chosen
        say(f"{where} has no torch: leaving it alone")
    if (VENV / "bin" / "python").exists():
        return own_venv()
    path_python = shutil.which("python3") or shutil.which("python")
    found = probe(path_python) if path_python else None
    if found and found["torch"] and not found["missing"]:
        say(f"python: {path_python} (torch {found['torch']}, every test tool installed)")
        return Path(path_python)
    lacks = "no torch" if not (found and found["torch"]) else "no " + ", ".join(found["missing"])
    say(f"{path_python or 'python3'} has {lacks}: using a virtual environment in the checkout")
    return own_venv()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="", help="an interpreter to use, or 'venv' for the checkout's .venv")
    parser.add_argument("--record", required=True, help="file to write the chosen interpreter's path to")
    args = parser.parse_args()
    python = choose(args.python.strip())
    record = Path(args.record)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{python}\n")


if __name__ == "__main__":
    main()
