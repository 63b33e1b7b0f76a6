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
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

# bench/'s modules import each other by name, as `pytest bench` and `python bench/run.py`
# (bench/ first on sys.path) run them; the same here, only while importing them.
with pytest.MonkeyPatch.context() as _patch:
    _patch.syspath_prepend(str(BENCH))
    cases = importlib.import_module("cases")
    report = importlib.import_module("report")
    runner = importlib.import_module("run")
    timing = importlib.import_module("timing")


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
    gemm = cases.Case("gemm", "fwd", "gemm-ceiling", "fp32", (("M", 8), ("N", 16), ("K", 4)))
    assert cases.work(gemm) == (2 * 8 * 16 * 4, "TFLOP/s") and not gemm.peer and gemm.meta()["bound"]


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
    assert report.CEILINGS == cases.BOUND_PROVIDERS and report.SLOW_CALL_S == timing.SLOW_CALL_S
    assert set(report.CPU_GOALS) <= set(cases.FAMILY)
    assert {report._family("attention_window"), report._family("attention_softcap")} == {"attention"}


@pytest.mark.parametrize("device,grid", [("cpu", "full"), ("cpu", "quick"), ("cuda", "full"), ("cuda", "quick")])
def test_grids(device, grid):
    for op in cases.PROVIDERS:
        grid_cases = cases.cases(op, device, grid)
        assert grid_cases and len({c.id for c in grid_cases}) == len(grid_cases)
        if op == "gemm":  # the ceiling: bound, never a peer, in each dtype attention runs in
            assert {c.provider for c in grid_cases} <= cases.BOUND_PROVIDERS
            assert {c.dtype for c in grid_cases} == {c.dtype for c in cases.cases("attention", device, grid)}
            continue
        assert any(c.headline for c in grid_cases)
        names = {c.provider for c in grid_cases}
        # Every op meets a peer that plain PyTorch offers (eager code, or SDPA where a model calls it).
        assert "tfkernels" in names and names & {"eager", "sdpa", "sdpa-padded"}
        if op == "attention":
            assert ("sdpa-cudnn" in names) == (device == "cuda") and ("sdpa" in names) == (device == "cpu")
    if device == "cpu" and grid == "full":  # issue 14: the CPU goals' dtypes and head dims
        for op in ("fused_qkv", "linear_gelu", "fused_mlp"):
            assert {c.dtype for c in cases.cases(op, device, grid)} == {"fp32", "bf16"}
        attention = cases.cases("attention", device, grid)
        assert {(c.dtype, c.dims["D"], c.dims["S"], c.dims["causal"]) for c in attention} == {
            (t, d, s, causal) for t in ("fp32", "bf16") for d in (64, 128) for s in (512, 2048)
            for causal in (False, True)}
        assert {c.shape_label for c in attention if c.headline} == {"B1 H8 S2048 D64 non-causal"}
    full_attention = cases.cases("attention", "cuda", "full")
    assert {c.dims["S"] for c in full_attention} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c.dims["B"] * c.dims["S"] == 16384 and c.dims["H"] * c.dims["D"] == 2048 for c in full_attention)


def _row(op, provider, value, label="S1", dtype="bf16", direction="fwd", unit="TFLOP/s", shape=None, **extra):
    info = {"op": op, "family": report._family(op), "direction": direction, "provider": provider, "dtype": dtype,
            "shape": shape or {"S": 1}, "shape_label": label, "peer": provider not in report.CEILINGS | {"tfkernels"},
            "headline": True, "value": value, "unit": unit, **extra}
    return {"name": f"{provider}-{label}", "stats": {"median": 1.0 / value}, "extra_info": info}


def _write(path, rows, skipped=(), device="cuda"):
    data = {"benchmarks": rows, "datetime": "2026-11-27T00:00:00",
            "tfkernels": {"env": {"device": device, "device_name": f"Test {device}", "torch": "2.x",
                                  "cuda": "13.0" if device == "cuda" else ""},
                          "skipped": list(skipped), "failed": []}}
    path.write_text(json.dumps(data))
    return str(path)


def _row_key(case):
    return (case.op, case.direction, case.dtype, case.shape)


@pytest.mark.parametrize("budget", [False, True], ids=["no-budget", "time-budget"])
def test_a_rows_providers_run_back_to_back(monkeypatch, budget):
    # Without a time budget each row's providers (compiled ones included) are consecutive;
    # under one, every compiled case comes after every other case of the suite.
    monkeypatch.setenv("TFKERNELS_BENCH_DEVICE", "cpu")
    if budget:
        monkeypatch.setenv("TFKERNELS_BENCH_DEADLINE", "1e12")
    else:
        monkeypatch.delenv("TFKERNELS_BENCH_DEADLINE", raising=False)
    ordered = [p.values[0] for p in cases.params("linear_gelu")]
    compiled = [c.provider in cases.COMPILED_PROVIDERS for c in ordered]
    assert any(compiled)
    if budget:
        assert compiled == sorted(compiled)
    else:
        rows = [_row_key(c) for c in ordered]
        starts = [i for i in range(len(rows)) if i == 0 or rows[i] != rows[i - 1]]
        assert len(starts) == len(set(rows))  # no row comes back after another row began


def test_cpu_rows_take_their_calls_in_turn(monkeypatch):
    # On the CPU a row's providers are timed in one loop, one call each in turn (the order
    # reversed every other round); a provider that skips or fails does so on its own.
    import providers

    monkeypatch.setenv("TFKERNELS_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("TFKERNELS_BENCH_DEADLINE", raising=False)
    monkeypatch.delenv("TFKERNELS_BENCH_INTERLEAVE", raising=False)
    calls = []

    def fake_prepare(case, device):
        if case.provider == "eager":
            def broken(x):
                if calls.count("eager") >= 2:  # fails from its third call on
                    raise ValueError("eager broke")
                calls.append("eager")
                return x
            return providers.Prepared(fn=broken, make_inputs=lambda: (torch.ones(4),))
        return providers.Prepared(fn=lambda x: calls.append(case.provider) or x * 2,
                                  make_inputs=lambda: (torch.ones(4),))

    monkeypatch.setattr(timing, "prepare", fake_prepare)
    shape = (("M", 4), ("N", 4))
    row = [cases.Case("bias_gelu", "fwd", p, "fp32", shape) for p in ("tfkernels", "eager", "compile", "gemm-only")]
    assert all(timing._interleaved(c, "cpu") for c in row)
    outcome = timing._time_row(row, "cpu", rounds_cap=4)
    assert isinstance(outcome["compile"], timing.Skip)  # not a headline shape: compile policy
    assert isinstance(outcome["eager"], ValueError)
    assert [len(outcome[p].samples) for p in ("tfkernels", "gemm-only")] == [4, 4]
    assert all(t > 0 for p in ("tfkernels", "gemm-only") for t in outcome[p].samples)
    timed = [c for c in calls if c != "eager"][-8:]  # the four rounds, after warm-up and estimates
    assert timed == ["tfkernels", "gemm-only", "gemm-only", "tfkernels"] * 2
    monkeypatch.setenv("TFKERNELS_BENCH_DEADLINE", "1e12")  # under a budget compiled cases run alone, last
    assert not timing._interleaved(row[2], "cpu") and timing._interleaved(row[0], "cpu")
    assert not timing._interleaved(row[0], "cuda")


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


def _cpu_run(tmp_path):
    """A CPU run: attention fp32 meets 1.1x at S512 but not at S2048 (the worst shape); its bf16
    has no peer; fused_mlp bf16 fwd+bwd meets it where eager took one round; bias_gelu misses
    1.5x; the GEMM ceiling's bf16 mm is slower than its fp32 one."""
    def attention(provider, value, dtype, s, causal=False):
        label = f"B1 H8 S{s} D64 {'causal' if causal else 'non-causal'}"
        return _row("attention", provider, value, label, dtype, shape={"S": s, "D": 64, "causal": causal})

    gemm = {"M": 2048, "N": 2048, "K": 2048}
    # Eager's S512 row and compile's bias_gelu row are faster than tfkernels, but are not the
    # goal's peers (attention: SDPA; bias_gelu: eager).
    rows = [attention("tfkernels", 0.12, "fp32", 512), attention("sdpa", 0.10, "fp32", 512),
            attention("eager", 0.20, "fp32", 512), _row("bias_gelu", "compile", 20.0, "M2048 N4096", "fp32", unit="GB/s"),
            attention("tfkernels", 0.10, "fp32", 2048), attention("sdpa", 0.10, "fp32", 2048),
            attention("eager", 0.05, "fp32", 2048), attention("tfkernels", 0.16, "fp32", 2048, causal=True),
            attention("sdpa", 0.10, "fp32", 2048, causal=True), attention("tfkernels", 0.09, "bf16", 2048),
            _row("fused_mlp", "tfkernels", 0.12, "M2048 d1024 ff4096", "bf16", "fwd+bwd"),
            _row("fused_mlp", "eager", 0.0004, "M2048 d1024 ff4096", "bf16", "fwd+bwd", rounds=1),
            _row("bias_gelu", "tfkernels", 14.0, "M2048 N4096", "fp32", unit="GB/s"),
            _row("bias_gelu", "eager", 10.0, "M2048 N4096", "fp32", unit="GB/s"),
            _row("gemm", "gemm-ceiling", 0.15, "M2048 N2048 K2048", "fp32", shape=gemm),
            _row("gemm", "gemm-ceiling", 0.0004, "M2048 N2048 K2048", "bf16", shape=gemm)]
    skipped = [{**attention("sdpa", 1.0, "bf16", 2048)["extra_info"], "reason": "no peer here"}]
    return report.load(_write(tmp_path / "cpu.json", rows, skipped, device="cpu"))


def test_cpu_goals_block(tmp_path):
    run = _cpu_run(tmp_path)
    assert report.goal_lines(run) == [
        "attention fwd fp32 vs sdpa: 1.00x at worst (B1 H8 S2048 D64 non-causal), goal 1.1x: not met",
        "attention fwd bf16 vs sdpa: no ratio (tfkernels or every peer unmeasured), goal 1.1x: not measured",
        "fused_mlp fwd+bwd bf16 vs eager/compile: 300.00x at worst (M2048 d1024 ff4096), goal 1.1x: met",
        "bias_gelu fwd fp32 vs eager: 1.40x at worst (M2048 N4096), goal 1.5x: not met"]
    head = report.headline(run)
    assert "== goals (issue 14)" in head and all(line in head for line in report.goal_lines(run))
    text = report.markdown(run)
    assert "- bias_gelu fwd fp32 vs eager: 1.40x at worst (M2048 N4096), goal 1.5x: not met" in text
    # The eager row timed over one round is named under its table.
    assert "`eager` timed over one round (1 case: bf16 M2048 d1024 ff4096)" in text
    # A shape without a ratio is counted, not silently dropped.
    one_missing = dict(run, rows=[r for r in run["rows"] if r["shape_label"] != "B1 H8 S512 D64 non-causal"
                                  or r["provider"] != "tfkernels"])
    assert report.goal_lines(one_missing)[0].endswith("not met (1 of 3 shapes without a ratio)")


def test_gemm_ceiling_line(tmp_path):
    run = _cpu_run(tmp_path)
    # bf16's ceiling on the CPU is the faster of bf16 and fp32 mm; attention's best non-causal
    # fp32 shape (0.12 at S512; the causal 0.16 does not count) reaches 80% of 0.15.
    assert report.gemm_ceilings(run) == {"fp32": (0.15, "TFLOP/s"), "bf16": (0.15, "TFLOP/s")}
    first, second = report.gemm_ceiling_lines(run)  # no note: no ceiling row was timed over one round
    slow = dict(run, rows=[dict(r, rounds=1) if r["op"] == "gemm" and r["dtype"] == "bf16" else r
                           for r in run["rows"]])
    assert report.gemm_ceiling_lines(slow)[2].startswith("- `gemm-ceiling` timed over one round (1 case: bf16 M2048")
    assert first.startswith("gemm-ceiling: fp32 150 GFLOP/s, bf16 150 GFLOP/s (torch.mm 2048^3; bf16: the faster "
                            "of torch.mm in bf16 (0.40 GFLOP/s) and in fp32")
    assert second == ("attention forward (tfkernels, best non-causal shape) / gemm-ceiling: 80% in fp32 "
                      "(B1 H8 S512 D64 non-causal), 60% in bf16 (B1 H8 S2048 D64 non-causal); aim 60%")
    text = report.markdown(run)
    assert text.index("**attention, forward**") < text.index(first) < text.index("**fused_mlp")
    assert first in report.headline(run) and "| M2048 N2048 K2048 |" not in text
    # On CUDA each dtype is its own ceiling, and neither goals nor the ceiling join the headline.
    cuda = dict(run, env={**run["env"], "device": "cuda"})
    assert report.gemm_ceilings(cuda) == {"fp32": (0.15, "TFLOP/s"), "bf16": (0.0004, "TFLOP/s")}
    assert "goals" not in report.headline(cuda) and "gemm-ceiling" not in report.headline(cuda)


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


def _bench(name, median, **info):
    meta = {"op": "attention", "direction": "fwd", "provider": name.split("-")[0], "dtype": "bf16", "shape_label": "S1"}
    return {"fullname": f"bench/test_x.py::test[{name}]", "stats": {"median": median}, "extra_info": {**meta, **info}}


def test_runner_keeps_each_cases_fastest_pass():
    skip_eager = {"op": "attention", "direction": "fwd", "provider": "eager", "dtype": "bf16", "shape_label": "S1",
                  "reason": "deadline"}
    skip_sdpa = dict(skip_eager, provider="sdpa")
    first = {"benchmarks": [_bench("tfkernels-a", 2.0), _bench("sdpa-a", 1.0)],
             "tfkernels": {"env": {"loadavg": [1.0, 2.0]}, "skipped": [skip_eager, skip_sdpa],
                           "failed": [{"x": 1}], "crashed": []}}
    second = {"benchmarks": [_bench("tfkernels-a", 1.5), _bench("sdpa-a", 3.0), _bench("eager-a", 4.0)],
              "tfkernels": {"env": {"loadavg": [0.5, 1.5]}, "skipped": [], "failed": [{"x": 1}, {"y": 2}],
                            "crashed": []}}
    best = runner.best_of_passes([first, second])
    by_name = {b["fullname"]: b for b in best["benchmarks"]}
    assert by_name["bench/test_x.py::test[tfkernels-a]"]["stats"]["median"] == 1.5
    assert by_name["bench/test_x.py::test[tfkernels-a]"]["extra_info"]["pass"] == 1
    assert by_name["bench/test_x.py::test[tfkernels-a]"]["extra_info"]["pass_medians_s"] == [2.0, 1.5]
    assert by_name["bench/test_x.py::test[sdpa-a]"]["stats"]["median"] == 1.0
    assert by_name["bench/test_x.py::test[sdpa-a]"]["extra_info"]["pass"] == 0
    assert by_name["bench/test_x.py::test[eager-a]"]["extra_info"]["pass_medians_s"] == [4.0]
    # eager was measured in the second pass, so its skip in the first is dropped; sdpa's stays
    # dropped too (measured in pass 1); failures from either pass are kept once each.
    assert best["tfkernels"]["skipped"] == []
    assert best["tfkernels"]["failed"] == [{"x": 1}, {"y": 2}]
    assert best["tfkernels"]["env"]["loadavg"] == [0.5, 2.0]
    assert runner.best_of_passes([first]) is first and runner.best_of_passes([]) is None


def test_a_second_pass_runs_in_reverse(monkeypatch):
    monkeypatch.setenv("TFKERNELS_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("TFKERNELS_BENCH_DEADLINE", raising=False)
    monkeypatch.setenv("TFKERNELS_BENCH_ORDER", "forward")
    forward = [p.id for p in cases.params("fused_qkv")]
    monkeypatch.setenv("TFKERNELS_BENCH_ORDER", "reverse")
    assert [p.id for p in cases.params("fused_qkv")] == forward[::-1] and len(forward) > 1


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
