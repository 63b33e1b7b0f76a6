"""Checks of the benchmark machinery itself (no timing): FLOP counts, the case grids,
report tables and ratios, charts, --compare, and the runner's JSON merge.

    python -m pytest bench/test_report.py -q
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest

import providers
import report

BENCH = Path(__file__).resolve().parent


def test_attention_flops_follow_design():
    shape = (("B", 2), ("H", 4), ("S", 128), ("D", 64), ("causal", False))
    fwd = providers.Case("attention", "fwd", "sdpa", "bf16", shape)
    assert providers.work(fwd) == (4 * 2 * 4 * 128 * 128 * 64, "TFLOP/s")
    causal = providers.Case("attention", "fwd+bwd", "sdpa", "bf16", shape[:-1] + (("causal", True),))
    assert providers.work(causal)[0] == 4 * 2 * 4 * 128 * 128 * 64 // 2 * 7 // 2


def test_gemm_and_bytes_counts():
    mlp = providers.Case("fused_mlp", "fwd", "eager", "fp32", (("M", 8), ("d", 4), ("ff", 16)))
    assert providers.work(mlp)[0] == 2 * 2 * 8 * 4 * 16
    qkv = providers.Case("fused_qkv", "fwd+bwd", "eager", "fp32", (("B", 2), ("S", 4), ("d", 8), ("H", 1), ("D", 8)))
    assert providers.work(qkv)[0] == 3 * 2 * 8 * 8 * 24
    bg = providers.Case("bias_gelu", "fwd", "eager", "bf16", (("M", 8), ("N", 16)))
    assert providers.work(bg) == ((2 * 8 * 16 + 16) * 2, "GB/s")


@pytest.mark.parametrize("device,grid", [("cpu", "full"), ("cpu", "quick"), ("cuda", "full"), ("cuda", "quick")])
def test_grids(device, grid):
    for op in providers.PROVIDERS:
        cases = providers.cases(op, device, grid)
        assert cases and len({c.id for c in cases}) == len(cases)
        assert any(c.headline for c in cases)
        names = {c.provider for c in cases}
        assert "tfkernels" in names and "eager" in names
        if op == "attention":
            assert ("sdpa-cudnn" in names) == (device == "cuda") and ("sdpa" in names) == (device == "cpu")
    full_attention = providers.cases("attention", "cuda", "full")
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
    spec = importlib.util.spec_from_file_location("tfk_bench_runner", BENCH.parent / "tfkernels" / "bench.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    parts = [{"benchmarks": [1], "tfkernels": {"env": {"loadavg": [1.0, 2.0]}, "skipped": [{"a": 1}], "failed": []}},
             {"benchmarks": [2, 3], "tfkernels": {"env": {"loadavg": [0.5, 3.0]}, "skipped": [], "failed": [{"b": 2}]}}]
    merged = runner.merge(parts, [{"suite": "mlp", "why": "killed by signal 11"}])
    assert merged["benchmarks"] == [1, 2, 3]
    assert merged["tfkernels"]["skipped"] == [{"a": 1}] and merged["tfkernels"]["failed"] == [{"b": 2}]
    assert merged["tfkernels"]["env"]["loadavg"] == [0.5, 3.0]
    assert runner.merge([], []) is None
    assert os.path.isdir(runner.find_bench_dir())
