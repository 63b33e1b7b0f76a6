"""Checks of the benchmark machinery in bench/ (no timing): FLOP counts, the case grids,
report tables and ratios, charts, --compare, the runner's JSON merge and the
`python -m tfkernels.bench` launcher.

    python -m pytest tests/test_report.py -q
"""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# bench/'s modules import each other by name, as `pytest bench` and `python bench/run.py`
# (bench/ first on sys.path) run them; the same here, only while importing them.
with pytest.MonkeyPatch.context() as _patch:
    _patch.syspath_prepend(str(BENCH))
    cases = importlib.import_module("cases")
    report = importlib.import_module("report")
    runner = importlib.import_module("run")


def test_attention_flops_follow_design():
    shape = (("B", 2), ("H", 4), ("S", 128), ("D", 64), ("causal", False))
    fwd = cases.Case("attention", "fwd", "sdpa", "bf16", shape)
    assert cases.work(fwd) == (4 * 2 * 4 * 128 * 128 * 64, "TFLOP/s")
    causal = cases.Case("attention", "fwd+bwd", "sdpa", "bf16", shape[:-1] + (("causal", True),))
    assert cases.work(causal)[0] == 4 * 2 * 4 * 128 * 128 * 64 // 2 * 7 // 2


def test_gemm_and_bytes_counts():
    mlp = cases.Case("fused_mlp", "fwd", "eager", "fp32", (("M", 8), ("d", 4), ("ff", 16)))
    assert cases.work(mlp)[0] == 2 * 2 * 8 * 4 * 16
    qkv = cases.Case("fused_qkv", "fwd+bwd", "eager", "fp32", (("B", 2), ("S", 4), ("d", 8), ("H", 1), ("D", 8)))
    assert cases.work(qkv)[0] == 3 * 2 * 8 * 8 * 24
    bg = cases.Case("bias_gelu", "fwd", "eager", "bf16", (("M", 8), ("N", 16)))
    assert cases.work(bg) == ((2 * 8 * 16 + 16) * 2, "GB/s")


def test_window_counts_the_pairs_its_band_sees():
    for s, w in ((1, 4), (5, 2), (17, 17), (113, 16)):
        visible = sum(1 for i in range(s) for j in range(s) if i - w < j <= i)
        assert cases.window_pairs(s, w) == visible
    shape = (("B", 2), ("H", 3), ("S", 113), ("D", 40), ("W", 16))
    window = cases.Case("attention_window", "fwd+bwd", "sdpa-mask", "fp32", shape)
    assert cases.work(window) == (4 * 2 * 3 * cases.window_pairs(113, 16) * 40 * 7 // 2, "TFLOP/s")
    softcap = cases.Case("attention_softcap", "fwd", "eager", "fp32", (("B", 1), ("H", 2), ("S", 17), ("D", 80),
                                                                         ("causal", False)))
    assert cases.work(softcap) == (4 * 2 * 17 * 17 * 80, "TFLOP/s")


def test_suites_providers_and_report_families_agree():
    assert set(cases.SUITE) == set(cases.FAMILY) == set(cases.PROVIDERS)
    suites = set(cases.SUITE.values())
    assert suites == set(runner.SUITES) == set(runner.BUDGET_WEIGHTS)
    for suite, test_file in runner.SUITES.items():
        assert test_file == f"test_bench_{suite}.py" and (BENCH / test_file).is_file()
        assert (BENCH / f"providers_{suite}.py").is_file()
    assert report.OP_FAMILY == cases.FAMILY and set(cases.FAMILY.values()) == set(report.FAMILY_ORDER)
    assert {report._family("attention_window"), report._family("attention_softcap")} == {"attention"}


@pytest.mark.parametrize("device,grid", [("cpu", "full"), ("cpu", "quick"), ("cuda", "full"), ("cuda", "quick")])
def test_grids(device, grid):
    for op in cases.PROVIDERS:
        grid_cases = cases.cases(op, device, grid)
        assert grid_cases and len({c.id for c in grid_cases}) == len(grid_cases)
        assert any(c.headline for c in grid_cases)
        names = {c.provider for c in grid_cases}
        # Every op meets a peer that plain PyTorch offers (eager code, or SDPA where a model calls it).
        assert "tfkernels" in names and names & {"eager", "sdpa", "sdpa-padded"}
        if op == "attention":
            assert ("sdpa-cudnn" in names) == (device == "cuda") and ("sdpa" in names) == (device == "cpu")
    full_attention = cases.cases("attention", "cuda", "full")
    assert {c.dims["S"] for c in full_attention} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c.dims["B"] * c.dims["S"] == 16384 and c.dims["H"] * c.dims["D"] == 2048 for c in full_attention)


def _row(op, provider, value, label="S1", dtype="bf16", direction="fwd", unit="TFLOP/s"):
    info = {"op": op, "family": report._family(op), "direction": direction, "provider": provider, "dtype": dtype,
            "shape": {"S": 1}, "shape_label": label, "peer": provider not in ("tfkernels", "gemm-only"),
            "headline": True, "value": value, "unit": unit}
    return {"name": f"{provider}-{label}", "stats": {"median": 1.0 / value}, "extra_info": info}


def _write(path, rows, skipped=()):
    data = {"benchmarks": rows, "datetime": "2026-11-27T00:00:00",
            "tfkernels": {"env": {"device": "cuda", "device_name": "Test GPU", "torch": "2.x", "cuda": "13.0"},
                          "skipped": list(skipped), "failed": []}}
    path.write_text(json.dumps(data))
    return str(path)


def test_table_ratio_skips_and_charts(tmp_path):
    rows = [_row("attention", "tfkernels", 300.0), _row("attention", "sdpa-flash", 250.0),
            _row("attention", "sdpa-cudnn", 400.0), _row("attention", "eager", 30.0)]
    skipped = [{**rows[0]["extra_info"], "provider": "compile", "peer": True, "reason": "headline shapes only"}]
    path = _write(tmp_path / "r.json", rows, skipped)
    text, files = report.write_report(path, str(tmp_path), "per-direction")
    assert "| S1 | bf16 | **300** | 250 | 400 | 30.0 | – | 0.75x vs sdpa-cudnn |" in text
    assert "`compile` skipped (1 case): headline shapes only" in text
    assert files == {("attention", "fwd"): "attention-fwd.png"}
    assert (tmp_path / "attention-fwd.png").stat().st_size > 1000
    assert "tfkernels 300, best peer sdpa-cudnn 400 TFLOP/s (0.75x)" in report.headline(report.load(path))


def test_gemm_only_is_not_a_peer_and_small_values_switch_units(tmp_path):
    rows = [_row("linear_gelu", "tfkernels", 0.05), _row("linear_gelu", "eager", 0.04),
            _row("linear_gelu", "gemm-only", 0.06)]
    text = report.markdown(report.load(_write(tmp_path / "r.json", rows)))
    assert "GFLOP/s" in text and "1.25x vs eager" in text


def test_compare(tmp_path):
    old = _write(tmp_path / "old.json", [_row("attention", "tfkernels", 100.0), _row("attention", "eager", 10.0)])
    new = _write(tmp_path / "new.json", [_row("attention", "tfkernels", 200.0), _row("attention", "eager", 10.0)])
    text = report.compare(old, new)
    assert "| attention | fwd | tfkernels | bf16 | S1 | 100 TFLOP/s | 200 TFLOP/s | 2.00x ▲ |" in text
    assert "| attention | eager | 1 | 1.00x |" in text


def test_runner_merge():
    parts = [{"benchmarks": [1], "tfkernels": {"env": {"loadavg": [1.0, 2.0]}, "skipped": [{"a": 1}], "failed": []}},
             {"benchmarks": [2, 3], "tfkernels": {"env": {"loadavg": [0.5, 3.0]}, "skipped": [], "failed": [{"b": 2}]}}]
    merged = runner.merge(parts, [{"suite": "mlp", "why": "killed by signal 11"}])
    assert merged["benchmarks"] == [1, 2, 3]
    assert merged["tfkernels"]["skipped"] == [{"a": 1}] and merged["tfkernels"]["failed"] == [{"b": 2}]
    assert merged["tfkernels"]["env"]["loadavg"] == [0.5, 3.0]
    assert runner.merge([], []) is None


def test_launcher_runs_the_checkouts_runner():
    # -m tfkernels.bench hands its arguments to bench/run.py (here: its --help).
    out = subprocess.run([sys.executable, "-m", "tfkernels.bench", "--help"], cwd=BENCH.parent, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage: python bench/run.py" in out.stdout, out.stderr


def test_launcher_outside_a_checkout_says_so(tmp_path):
    # The launcher as a wheel installs it: a tfkernels/ folder with no bench/ beside it.
    (tmp_path / "tfkernels").mkdir()
    (tmp_path / "tfkernels" / "bench.py").write_text((BENCH.parent / "tfkernels" / "bench.py").read_text())
    code = f"import runpy; runpy.run_path({str(tmp_path / 'tfkernels' / 'bench.py')!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "not part of an installed tfkernels" in out.stderr and "make bench" in out.stderr
