"""pytest-benchmark suite setup: settings, per-case result lines, and the extra
JSON keys (environment, skipped and failed cases) that bench/report.py reads.

Run through `python -m tfkernels.bench` (which also writes the report), or
directly: `pytest bench/ --benchmark-json=out.json` (settings: see settings.py).
"""
import json
import os

# Benchmarks time the kernels, not the NaN-poisoning of outputs that the tests turn on.
os.environ["TFKERNELS_POISON_OUTPUTS"] = "0"

import pytest  # noqa: E402
from pytest_benchmark.stats import Stats  # noqa: E402

import settings  # noqa: E402
import timing  # noqa: E402


def pytest_report_header(config):
    device = settings.bench_device()
    return (f"tfkernels bench: device {settings.device_name(device)} ({device}), grid {settings.bench_grid()}, "
            f"torch.compile on {settings.compile_policy()} shapes")


def pytest_collection_finish(session):
    # The CPU times a row's providers together (timing.py): only those this session runs (-k).
    timing.SELECTED_IDS = {item.callspec.params["case"].id for item in session.items
                           if hasattr(item, "callspec") and "case" in item.callspec.params}


def pytest_report_teststatus(report, config):
    # Verbose lines show the measured rate instead of PASSED.
    if report.when == "call" and report.passed:
        for key, value in report.user_properties:
            if key == "tfk_result":
                return "passed", ".", (value, {"green": True})
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        return "skipped", "s", (f"skipped: {reason[:110]}", {"yellow": True})
    return None


def _records():
    return {
        "env": settings.environment(settings.bench_device()),
        "skipped": timing.RECORDS["skipped"],
        "failed": timing.RECORDS["failed"],
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["tfkernels"] = _records()
    # A case timed with its row (timing.py) ran pedantic on a no-op: its statistics are its samples'.
    for bench in output_json.get("benchmarks", []):
        samples = bench.get("extra_info", {}).get("samples_s")
        if samples:
            stats = Stats()
            for seconds in samples:
                stats.update(seconds)
            bench["stats"] = {**bench.get("stats", {}), **stats.as_dict(), "iterations": 1}
            if "data" in bench["stats"]:  # --benchmark-save-data
                bench["stats"]["data"] = list(samples)


def pytest_sessionfinish(session, exitstatus):
    # pytest-benchmark writes no JSON when every case skipped: keep the reasons anyway.
    path = os.environ.get("TFKERNELS_BENCH_RECORDS")
    if path:
        with open(path, "w") as f:
            json.dump(_records(), f)


@pytest.fixture
def run(benchmark, request):
    """run(case): time one case (skips with its reason where the provider is missing)."""
    return lambda case: timing.run_case(benchmark, case, request)
