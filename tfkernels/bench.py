"""`python -m tfkernels.bench`: the benchmark runner of a source checkout (`make bench`).

The benchmark suites, their runner and the report live in the repository's bench/
folder, which a wheel does not contain: this finds the checkout this package was
imported from (an editable install or the repository root) and runs its
bench/run.py, passing the arguments on (see `python -m tfkernels.bench --help`).
From an installed wheel it says so and exits.
"""
import subprocess
import sys
from pathlib import Path

_RUNNER = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def main(argv=None):
    if not _RUNNER.is_file():
        sys.exit("tfkernels.bench: the benchmarks are not part of an installed tfkernels (looked for "
                 f"{_RUNNER}). They run from a source checkout: clone the repository and run `make bench`, "
                 "or `python bench/run.py` in it.")
    return subprocess.call([sys.executable, str(_RUNNER), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
