"""Run the benchmark suites and write the report: `python bench/run.py` (what
`make bench` and `python -m tfkernels.bench` run).

    python bench/run.py                     # this machine's device (CUDA when visible)
    python bench/run.py --device cpu --quick
    python bench/run.py --compare OLD.json NEW.json
    python bench/run.py --report bench/results/nvidia-h200/results.json
    python bench/run.py -- -k "tfkernels or sdpa"     # extra pytest arguments

Runs bench/test_bench_*.py (pytest-benchmark) one suite per process, so a crash in
one suite still leaves the others' results; merges their JSON into
bench/results/<device>/results.json (the previous one moves to raw/), then
report.py writes README.md and the PNG charts there and the tables are printed.

On the CPU the providers of a row take their calls in turn (bench/timing.py),
and the suites run twice by default (--passes 2), the second pass in reverse
order, each case keeping its faster pass: a shared VM's speed drifts by up to 2x
over minutes. Both passes' medians stay in the JSON.
It imports the tfkernels package only inside the suites, so the peers are still
measured when the extension failed to build (tools/device_check.sh relies on that).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report
import settings

BENCH_DIR = Path(__file__).resolve().parent
# The suites (cases.SUITE names each op's), in the order they run.
SUITES = {"attention": "test_bench_attention.py", "attention_variants": "test_bench_attention_variants.py",
          "attention_varlen": "test_bench_attention_varlen.py",
          "qkv": "test_bench_qkv.py", "mlp": "test_bench_mlp.py"}
# Shares of a --time-budget: each suite may use its share of what is left when it starts.
BUDGET_WEIGHTS = {"attention": 0.35, "attention_variants": 0.1, "attention_varlen": 0.1, "qkv": 0.2, "mlp": 0.25}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="the trimmed grid (what tools/device_check.sh runs)")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    parser.add_argument("--compile", choices=["headline", "all", "none"],
                        help="shapes torch.compile runs on (default headline: compiling costs 5-20 s a case)")
    parser.add_argument("--out", help="output folder (default: bench/results/<device-slug>/)")
    parser.add_argument("--charts", default="per-direction", choices=["per-direction", "per-family", "none"],
                        help="one PNG per op family and direction (default), one per family, or none")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="skip the cases that would start after this many seconds")
    parser.add_argument("--note", help="a line for the report's header (what was measured, e.g. which branches)")
    parser.add_argument("--passes", type=int, metavar="N",
                        help="run every suite N times, every other pass in reverse order, and keep each case's "
                             "fastest (default: 2 on the CPU, 1 on CUDA)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two saved runs and exit")
    parser.add_argument("--report", metavar="JSON", help="only render the report of a saved run")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.report:
        out = args.out or os.path.dirname(os.path.abspath(args.report))
        _text, files = report.write_report(args.report, out, args.charts)
        run = report.load(args.report)
        print(report.markdown(run, files, with_images=False))
        print(report.headline(run))
        print(f"report: {os.path.join(out, 'README.md')}")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tfkernels.bench: --device cuda but torch sees no CUDA device")
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"tfkernels.bench: unknown suite(s) {sorted(unknown)}; choose from {list(SUITES)}")

    env = dict(os.environ)
    env["TFKERNELS_BENCH_DEVICE"] = device
    env["TFKERNELS_BENCH_GRID"] = "quick" if args.quick else "full"
    if args.compile:
        env["TFKERNELS_BENCH_COMPILE"] = args.compile
    if args.note:
        env["TFKERNELS_BENCH_NOTE"] = args.note
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Prefer the tfkernels of this checkout over another install.
    root = BENCH_DIR.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])

    out_dir = Path(args.out) if args.out else BENCH_DIR / "results" / settings.device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"tfkernels.bench: {settings.device_name(device)} ({device}), grid "
          f"{env['TFKERNELS_BENCH_GRID']}, suites {','.join(suites)} -> {out_dir}", flush=True)

    passes = args.passes or (2 if device == "cpu" else 1)
    if passes < 1:
        raise SystemExit(f"tfkernels.bench: --passes must be at least 1, got {passes}")
    started = time.time()
    end = started + args.time_budget if args.time_budget else None
    crashed, failed_suites, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="tfk-bench-") as tmp:
        for index in range(passes):
            env["TFKERNELS_BENCH_ORDER"] = "reverse" if index % 2 else "forward"
            if passes > 1:
                print(f"\n##### pass {index + 1} of {passes} ({env['TFKERNELS_BENCH_ORDER']} order)", flush=True)
            pass_end = None if end is None else time.time() + (end - time.time()) / (passes - index)
            parts = run_pass(suites, env, Path(tmp) / f"pass{index}", pass_end, crashed, failed_suites, args.pytest_args)
            runs.append(merge(parts, crashed))
        merged = best_of_passes([r for r in runs if r is not None])
        if merged is None:
            print("tfkernels.bench: no suite produced results", file=sys.stderr)
            return 2
        merged["tfkernels"]["env"]["passes"] = passes
        results = out_dir / "results.json"
        if results.exists():
            keep = out_dir / "raw" / f"results-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(results.stat().st_mtime))}.json"
            keep.parent.mkdir(exist_ok=True)
            shutil.move(str(results), keep)
            print(f"tfkernels.bench: previous results moved to {keep}")
        with open(results, "w") as f:
            json.dump(merged, f, indent=1)
    text, files = report.write_report(str(results), str(out_dir), args.charts)
    print()
    print(report.markdown(report.load(str(results)), files, with_images=False))
    print(f"tfkernels.bench: {time.time() - started:.0f} s; wrote {results}, {out_dir / 'README.md'}"
          + (f" and {len(files)} charts" if files else ""))
    run = report.load(str(results))
    print()
    print(report.headline(run))
    if crashed or run["failed"] or failed_suites:
        print(f"tfkernels.bench: {len(run['failed'])} case(s) failed"
              + (f", crashed suites: {', '.join(c['suite'] for c in crashed)}" if crashed else ""), file=sys.stderr)
        return 1
    return 0


def run_pass(suites, env, tmp, end, crashed, failed_suites, pytest_args):
    """Every suite once, each in its own pytest process; returns their JSONs (and
    appends to `crashed` and `failed_suites`). `end`: when this pass's time is up."""
    tmp.mkdir(parents=True, exist_ok=True)
    root = BENCH_DIR.parent
    parts = []
    for i, suite in enumerate(suites):
        part = tmp / f"{suite}.json"
        if end is not None:
            weights = [BUDGET_WEIGHTS[s] for s in suites[i:]]
            share = (end - time.time()) * weights[0] / sum(weights)
            env["TFKERNELS_BENCH_DEADLINE"] = str(time.time() + max(share, 0.0))
        cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR / SUITES[suite]), "-v", "-p", "no:cacheprovider",
               "--rootdir", str(root), "--benchmark-json", str(part), "--benchmark-quiet",
               "--benchmark-disable-gc", "--no-header", "-o", "console_output_style=count", *pytest_args]
        print(f"\n=== {suite}: {' '.join(cmd[2:4])} ...", flush=True)
        records = tmp / f"{suite}.records.json"
        env["TFKERNELS_BENCH_RECORDS"] = str(records)
        code = subprocess.call(cmd, cwd=root, env=env)
        if code < 0 or code not in (0, 1, 5):
            why = f"exit {code}" if code >= 0 else f"killed by signal {-code}"
            crashed.append({"suite": suite, "why": why})
            print(f"tfkernels.bench: suite {suite} crashed ({why}); continuing", flush=True)
        elif code == 1:
            failed_suites.append(suite)
        if part.is_file():
            with open(part) as f:
                parts.append(json.load(f))
        elif records.is_file():  # every case skipped: no pytest-benchmark JSON, but the reasons
            with open(records) as f:
                parts.append({"benchmarks": [], "datetime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                              "tfkernels": json.load(f)})
    return parts


def best_of_passes(runs):
    """One run from several passes' merged JSONs: each case (by its test name) keeps the
    pass with the lowest median, and records every pass's median in extra_info
    ("pass_medians_s") and which pass it kept ("pass"). A case skipped in one pass and
    measured in another counts as measured; failures from any pass are kept."""
    if not runs:
        return None
    if len(runs) == 1:
        return runs[0]
    best, medians = {}, {}
    for index, run in enumerate(runs):
        for bench in run.get("benchmarks", []):
            name = bench["fullname"]
            medians.setdefault(name, []).append(bench["stats"]["median"])
            if name not in best or bench["stats"]["median"] < best[name][1]["stats"]["median"]:
                best[name] = (index, bench)
    benchmarks = []
    for name, (index, bench) in best.items():
        bench = dict(bench, extra_info={**bench.get("extra_info", {}), "pass": index, "pass_medians_s": medians[name]})
        benchmarks.append(bench)
    measured = {_case_key(b["extra_info"]) for b in benchmarks}
    merged = dict(runs[0], benchmarks=benchmarks)
    tfk = dict(runs[0]["tfkernels"])
    tfk["env"] = dict(tfk["env"])
    loads = [x for r in runs for x in (r["tfkernels"]["env"].get("loadavg") or [])]
    if loads:
        tfk["env"]["loadavg"] = [min(loads), max(loads)]
    tfk["skipped"] = _unique([s for r in runs for s in r["tfkernels"]["skipped"] if _case_key(s) not in measured])
    tfk["failed"] = _unique([s for r in runs for s in r["tfkernels"]["failed"]])
    tfk["crashed"] = runs[-1]["tfkernels"].get("crashed", [])
    merged["tfkernels"] = tfk
    return merged


def _case_key(info):
    return tuple(info.get(k) for k in ("op", "direction", "provider", "dtype", "shape_label"))


def _unique(records):
    seen, out = set(), []
    for record in records:
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def merge(parts, crashed):
    """One JSON from the suites' pytest-benchmark JSONs."""
    if not parts:
        return None
    merged = dict(parts[0])
    merged["benchmarks"] = [b for p in parts for b in p.get("benchmarks", [])]
    tfk = dict(parts[0].get("tfkernels", {}))
    tfk["env"] = dict(tfk.get("env", {}))
    loads = [x for p in parts for x in (p.get("tfkernels", {}).get("env", {}).get("loadavg") or []) if x is not None]
    if loads:
        tfk["env"]["loadavg"] = [min(loads), max(loads)]
    tfk["skipped"] = [s for p in parts for s in p.get("tfkernels", {}).get("skipped", [])]
    tfk["failed"] = [s for p in parts for s in p.get("tfkernels", {}).get("failed", [])]
    tfk["crashed"] = crashed
    merged["tfkernels"] = tfk
    return merged


if __name__ == "__main__":
    sys.exit(main())
