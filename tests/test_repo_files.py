"""The repository's own files: the documents they cite exist, and nothing names one machine's paths."""
import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

def _tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an unpacked sdist): the tracked files are unknown")
    files = {}
    for name in filter(None, names):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:4096]:
            files[name] = path.read_text(errors="replace")
    return files


def test_cited_documents_exist():
    files = _tracked_text_files()
    basenames = {pathlib.PurePosixPath(name).name for name in files}
    files.pop("tests/test_repo_files.py")  # names documents as data, not as citations
    missing = [(name, doc) for name, text in files.items()
               for doc in sorted(set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text)))
               if doc not in basenames]
    assert not missing, f"files cite documents that are not in the repository: {missing}"


def test_markdown_links_resolve():
    broken = []
    for name, text in _tracked_text_files().items():
        if not name.endswith(".md"):
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (ROOT / name).parent.joinpath(target).exists():
                broken.append((name, target))
    assert not broken, f"markdown links to missing files: {broken}"


def test_architecture_document_is_linked_from_the_readme():
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
    assert "](docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()


def test_no_machine_specific_paths():
    # Home folders and this project's work folders differ on every machine.
    pattern = re.compile(r"(?<![\w.])/(?:work|home|root|Users)/[\w.-]+")
    found = [(name, m.group(0)) for name, text in _tracked_text_files().items() for m in pattern.finditer(text)]
    assert not found, f"machine-specific paths committed: {found}"


def test_bench_holds_only_benchmarks_and_their_report():
    # The GPU validation scripts live in tools/; bench/device_check.sh is a shim that runs
    # tools/device_check.sh, kept because session briefs name that path.
    allowed = re.compile(r"bench/(results/.*|test_bench_\w+\.py|providers(_\w+)?\.py"
                         r"|(conftest|settings|cases|timing|report|run)\.py|device_check\.sh)")
    strays = [name for name in _tracked_text_files() if name.startswith("bench/") and not allowed.fullmatch(name)]
    assert not strays, f"bench/ holds only the benchmarks, their runner and report: move {strays}"
    shim = (ROOT / "bench" / "device_check.sh").read_text().splitlines()
    assert len(shim) <= 3 and shim[-1].startswith("exec ") and "tools/device_check.sh" in shim[-1], shim


def test_injected_faults_still_apply():
    """tools/emu_fault_injection.py replaces exact kernel text; a kernel edit that removes
    that text would turn a fault into 'does not apply' long after the edit."""
    spec = importlib.util.spec_from_file_location("emu_fault_injection", ROOT / "tools" / "emu_fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, path, original, *_ in module.FAULTS:
        assert original in (ROOT / path).read_text(), f"fault {name!r}: its text is no longer in {path}"
