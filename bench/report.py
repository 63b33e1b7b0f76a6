"""Benchmark JSON (pytest-benchmark's, with the suite's `tfkernels` key) -> Markdown
tables and PNG bar charts; and a comparison of two saved runs.

    python bench/report.py RESULTS.json [--out DIR] [--charts per-direction|per-family|none]
    python bench/report.py --compare OLD.json NEW.json

Needs only the standard library and matplotlib (for the charts), not torch, so a
saved run can be rendered anywhere.
"""
import argparse
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict

PROVIDER_ORDER = ["tfkernels", "tfkernels-padded", "tfkernels-nosplit", "sdpa", "sdpa-flash", "sdpa-cudnn",
                  "sdpa-efficient", "sdpa-math", "sdpa-mask", "sdpa-padded", "torch-varlen", "cublaslt", "eager",
                  "compile", "flex", "gemm-only", "kv-read", "gemm-ceiling"]
CEILINGS = {"gemm-only", "kv-read", "gemm-ceiling"}  # cases.BOUND_PROVIDERS: drawn hatched, never peers
COLORS = {
    "tfkernels": "#d62728", "sdpa": "#1f77b4", "sdpa-flash": "#1f77b4", "sdpa-cudnn": "#17becf",
    "sdpa-efficient": "#9467bd", "sdpa-math": "#8c564b", "cublaslt": "#2ca02c", "eager": "#7f7f7f",
    "compile": "#ff7f0e", "gemm-only": "#c7c7c7", "sdpa-mask": "#aec7e8", "flex": "#e377c2",
    "tfkernels-padded": "#ff9896", "tfkernels-nosplit": "#ff9896", "sdpa-padded": "#aec7e8", "torch-varlen": "#9467bd",
    "kv-read": "#c7c7c7", "gemm-ceiling": "#c7c7c7",
}
FAMILY_ORDER = ["attention", "qkv", "mlp"]
# Each op's family (section and charts), in report order: a copy of bench/cases.py's
# FAMILY, which needs torch (tests/test_report.py checks that they agree).
OP_FAMILY = {"attention": "attention", "gemm": "attention", "attention_window": "attention",
             "attention_softcap": "attention", "attention_varlen": "attention", "attention_decode": "attention",
             "fused_qkv": "qkv", "linear_gelu": "mlp", "fused_mlp": "mlp", "bias_gelu": "mlp"}
OP_ORDER = list(OP_FAMILY)
# The GEMM ceiling's op (torch.mm alone, cases.py): shown as a line under the attention
# forward table, not as a table or a chart of its own.
CEILING_OP = "gemm"
CEILING_AIM = 0.6  # attention forward at 60% of the GEMM ceiling (issue 14)
# Issue 14's CPU goals: tfkernels' throughput over the best of the goal's peers in the
# same run, at every shape of each (op, direction, dtype) group: (goal, peers). The
# tables and the headline still take every peer.
#   attention: SDPA's CPU flash kernel (stretch goal 1.25x);
#   the fused GEMM ops: their unfused PyTorch equivalent, eager and torch.compile;
#   bias_gelu: eager (it moves half eager's bytes; torch.compile fuses it too).
UNFUSED = ("eager", "compile")
CPU_GOALS = {"attention": (1.1, ("sdpa",)), "fused_qkv": (1.1, UNFUSED), "linear_gelu": (1.1, UNFUSED),
             "fused_mlp": (1.1, UNFUSED), "bias_gelu": (1.5, ("eager",))}
SLOW_CALL_S = 10  # bench/timing.py's SLOW_CALL_S: a CPU call slower than this is timed over one round
FAMILY_TITLES = {"attention": "Attention (flash_attention)", "qkv": "QKV projection (fused_qkv)",
                 "mlp": "MLP family (linear_gelu, fused_mlp, bias_gelu)"}
DIRECTION_TITLES = {"fwd": "forward", "fwd+bwd": "forward + backward"}
DIRECTION_FILES = {"fwd": "fwd", "fwd+bwd": "fwdbwd"}
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}


# --------------------------------------------------------------------------- loading

def load(path):
    with open(path) as f:
        data = json.load(f)
    extra = data.get("tfkernels", {})
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "op" not in info or "value" not in info:
            continue
        info["median_s"] = bench["stats"]["median"]
        info["name"] = bench.get("name", "")
        rows.append(info)
    env = dict(extra.get("env", {}))
    if not env:
        machine = data.get("machine_info", {})
        env = {"device_name": (rows[0]["device_name"] if rows else machine.get("node", "?")),
               "torch": rows[0].get("torch", "?") if rows else "?"}
    env.setdefault("date", data.get("datetime", ""))
    commit = data.get("commit_info", {}) or {}
    return {"env": env, "rows": rows, "skipped": extra.get("skipped", []), "failed": extra.get("failed", []),
            "crashed": extra.get("crashed", []), "commit": commit, "path": path}


def _key(r):
    return (r["op"], r["direction"], r["provider"], r["dtype"], r["shape_label"])


def _shape_sort(r):
    shape = r.get("shape", {})
    return (DTYPE_ORDER.get(r["dtype"], 9), shape.get("D", 0), bool(shape.get("causal", False)),
            shape.get("d", shape.get("K", shape.get("N", 0))), shape.get("S", 0), r["shape_label"])


def _providers(names):
    known = [p for p in PROVIDER_ORDER if p in names]
    return known + sorted(set(names) - set(known))


# --------------------------------------------------------------------------- tables

def _unit_scale(unit, values):
    if unit == "TFLOP/s" and values and max(values) < 1.0:
        return "GFLOP/s", 1e3
    return unit, 1.0


def _fmt(value):
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(run, op, direction):
    """Markdown lines for one op and direction, or [] when it has no cases."""
    if op == CEILING_OP:
        return gemm_ceiling_lines(run) + [""] if direction == "fwd" and _has_ceiling(run) else []
    rows = [r for r in run["rows"] if r["op"] == op and r["direction"] == direction]
    skipped = [s for s in run["skipped"] if s["op"] == op and s["direction"] == direction]
    failed = [s for s in run["failed"] if s["op"] == op and s["direction"] == direction]
    if not (rows or skipped or failed):
        return []
    providers = _providers({r["provider"] for r in rows + skipped + failed})
    shapes = OrderedDict()
    for r in sorted(rows + skipped + failed, key=_shape_sort):
        shapes.setdefault((r["dtype"], r["shape_label"]), {})
    values = {}
    for r in rows:
        values[(r["dtype"], r["shape_label"], r["provider"])] = r
    status = {}
    for s in skipped:
        status[(s["dtype"], s["shape_label"], s["provider"])] = "–"
    for s in failed:
        status[(s["dtype"], s["shape_label"], s["provider"])] = "FAIL"
    unit = rows[0]["unit"] if rows else ("GB/s" if op in ("bias_gelu", "attention_decode") else "TFLOP/s")
    shown_unit, scale = _unit_scale(unit, [r["value"] for r in rows])
    header = ["shape", "dtype"] + [f"`{p}`" for p in providers] + ["tfkernels / best peer"]
    lines = [f"**{op}, {DIRECTION_TITLES[direction]}** ({shown_unit}, higher is better)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for dtype, label in shapes:
        cells = [label, dtype]
        for p in providers:
            r = values.get((dtype, label, p))
            cell = _fmt(r["value"] * scale) if r else status.get((dtype, label, p), "")
            if r and p == "tfkernels":
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append(_ratio_cell(values, dtype, label, providers))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = _skip_notes(skipped, failed) + _single_round_notes(rows)
    if notes:
        lines += notes + [""]
    return lines


def _ratio_cell(values, dtype, label, providers):
    mine = values.get((dtype, label, "tfkernels"))
    peers = [values[(dtype, label, p)] for p in providers
             if (dtype, label, p) in values and values[(dtype, label, p)].get("peer", p != "tfkernels")]
    if not mine or not peers:
        return "–"
    best = max(peers, key=lambda r: r["value"])
    return f"{mine['value'] / best['value']:.2f}x vs {best['provider']}"


def _skip_notes(skipped, failed):
    groups = defaultdict(int)
    for s in skipped:
        groups[(s["provider"], "skipped", s["reason"])] += 1
    for s in failed:
        groups[(s["provider"], "FAILED", s.get("error", "?"))] += 1
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    out = []
    for (provider, kind, reason), n in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        out.append(f"- `{provider}` {kind} ({n} case{'s' if n > 1 else ''}): {reason}")
    return out


def _single_round_notes(rows):
    """The cases timed over one round (bench/timing.py: a CPU call slower than SLOW_CALL_S)."""
    slow = defaultdict(list)
    for r in rows:
        if r.get("rounds") == 1:
            slow[r["provider"]].append(f"{r['dtype']} {r['shape_label']}")
    return [f"- `{p}` timed over one round ({len(shapes)} case{'s' if len(shapes) > 1 else ''}: {', '.join(shapes)}): "
            f"its call took over {SLOW_CALL_S} s, so the figure is one call's time" for p, shapes in
            sorted(slow.items(), key=lambda kv: PROVIDER_ORDER.index(kv[0]) if kv[0] in PROVIDER_ORDER else 99)]


# --------------------------------------------------------------------------- goals and the GEMM ceiling

def _is_cpu(run):
    return run["env"].get("device") == "cpu"


def gemm_ceilings(run):
    """{dtype: (throughput, unit)} of the GEMM ceiling rows. On the CPU, bf16's ceiling is the
    faster of torch.mm in bf16 and in fp32: a CPU without native bf16 computes in fp32 at best."""
    best = {}
    for r in run["rows"]:
        if r["op"] == CEILING_OP and r["value"] > best.get(r["dtype"], (0.0, ""))[0]:
            best[r["dtype"]] = (r["value"], r["unit"])
    if _is_cpu(run) and "fp32" in best and best["fp32"][0] > best.get("bf16", (0.0, ""))[0]:
        best["bf16"] = best["fp32"]
    return dict(sorted(best.items(), key=lambda kv: DTYPE_ORDER.get(kv[0], 9)))


def _has_ceiling(run):
    return any(r["op"] == CEILING_OP for r in run["rows"] + run["skipped"] + run["failed"])


def gemm_ceiling_lines(run):
    """Two lines: the GEMM ceiling per dtype, and tfkernels' attention forward at its best
    non-causal shape as a fraction of it; then why a ceiling case was skipped or failed."""
    notes = _skip_notes([s for s in run["skipped"] if s["op"] == CEILING_OP],
                        [s for s in run["failed"] if s["op"] == CEILING_OP])
    ceilings = gemm_ceilings(run)
    if not ceilings:
        return ["gemm-ceiling: not measured"] + notes
    gemm_rows = [r for r in run["rows"] if r["op"] == CEILING_OP]
    unit, scale = _unit_scale("TFLOP/s", [v for v, _ in ceilings.values()])
    how = "torch.mm 2048^3"
    if _is_cpu(run) and "bf16" in ceilings:
        native = [r["value"] for r in gemm_rows if r["dtype"] == "bf16"]
        how += ("; bf16: the faster of torch.mm in bf16" + (f" ({_fmt(native[0] * scale)} {unit})" if native else "")
                + " and in fp32, as a CPU without native bf16 computes in fp32 at best")
    first = "gemm-ceiling: " + ", ".join(f"{d} {_fmt(v * scale)} {unit}" for d, (v, _) in ceilings.items())
    reached = []
    for dtype, (ceiling, _) in ceilings.items():
        mine = [r for r in run["rows"] if (r["op"], r["direction"], r["provider"], r["dtype"]) ==
                ("attention", "fwd", "tfkernels", dtype) and not r.get("shape", {}).get("causal")]
        if mine:
            best = max(mine, key=lambda r: r["value"])
            reached.append(f"{best['value'] / ceiling:.0%} in {dtype} ({best['shape_label']})")
    second = ("attention forward (tfkernels, best non-causal shape) / gemm-ceiling: " + ", ".join(reached)
              + f"; aim {CEILING_AIM:.0%}") if reached else "attention forward: no tfkernels row to compare"
    return [f"{first} ({how})", second] + notes + _single_round_notes(gemm_rows)


def goal_lines(run):
    """One line per (op, direction, dtype) group of CPU_GOALS: the smallest ratio of tfkernels
    to the best of the goal's peers over the group's shapes (and that shape), its goal, and
    whether it is met."""
    groups = OrderedDict()
    for r in sorted(run["rows"] + run["skipped"] + run["failed"],
                    key=lambda r: (OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else 99, r["direction"],
                                   DTYPE_ORDER.get(r["dtype"], 9))):
        if r["op"] in CPU_GOALS:
            groups.setdefault((r["op"], r["direction"], r["dtype"]), set()).add(r["shape_label"])
    lines = []
    for (op, direction, dtype), labels in groups.items():
        goal, goal_peers = CPU_GOALS[op]
        ratios = {}
        for label in labels:
            here = [r for r in run["rows"] if (r["op"], r["direction"], r["dtype"], r["shape_label"]) ==
                    (op, direction, dtype, label)]
            mine = [r["value"] for r in here if r["provider"] == "tfkernels"]
            peers = [r["value"] for r in here if r.get("peer") and r["provider"] in goal_peers]
            if mine and peers:
                ratios[label] = mine[0] / max(peers)
        text = f"{op} {direction} {dtype} vs {'/'.join(goal_peers)}: "
        if ratios:
            worst = min(ratios, key=ratios.get)
            text += (f"{ratios[worst]:.2f}x at worst ({worst}), goal {goal}x: "
                     + ("met" if ratios[worst] >= goal else "not met"))
        else:
            text += f"no ratio (tfkernels or every peer unmeasured), goal {goal}x: not measured"
        if ratios and len(ratios) < len(labels):
            text += f" ({len(labels) - len(ratios)} of {len(labels)} shapes without a ratio)"
        lines.append(text)
    return lines


def _present_ops(run):
    ops = {r["op"] for r in run["rows"] + run["skipped"] + run["failed"]}
    return [op for op in OP_ORDER if op in ops] + sorted(ops - set(OP_ORDER))


def _family(op):
    return OP_FAMILY.get(op, "mlp")


def header_lines(run):
    env = run["env"]
    commit = run.get("commit") or {}
    lines = [f"# tfkernels benchmarks: {env.get('device_name', '?')}", ""]
    facts = [("device", env.get("device_name", "?")), ("torch", env.get("torch", "?"))]
    if env.get("cuda"):
        facts.append(("CUDA", env["cuda"]))
    if env.get("cudnn"):
        facts.append(("cuDNN", env["cudnn"]))
    if env.get("device") == "cpu":
        facts.append(("CPU threads", str(env.get("threads", "?"))))
        if env.get("loadavg"):
            facts.append(("load average (1 min)", f"{min(env['loadavg']):.1f}-{max(env['loadavg']):.1f}"))
    if env.get("passes", 1) > 1:
        facts.append(("passes", f"{env['passes']}, each case's fastest (every other pass in reverse order)"))
    facts.append(("date", env.get("date", "?")))
    if commit.get("id"):
        facts.append(("commit", commit["id"][:10] + (" (dirty)" if commit.get("dirty") else "")))
    facts.append(("grid", f"{env.get('grid', '?')}, torch.compile on {env.get('compile', '?')} shapes, "
                          f"GELU {env.get('gelu', 'tanh')}"))
    lines.append(" | ".join(f"{k}: **{v}**" if k == "device" else f"{k}: {v}" for k, v in facts))
    lines.append("")
    if env.get("note"):
        lines += [f"Note: {env['note']}", ""]
    if _is_cpu(run) and goal_lines(run):
        lines += ["Goals (issue 14; tfkernels / the best of the goal's peers, the worst shape of each group):", ""]
        lines += [f"- {line}" for line in goal_lines(run)] + [""]
    n_ok, n_skip, n_fail = len(run["rows"]), len(run["skipped"]), len(run["failed"])
    summary = f"{n_ok} cases measured, {n_skip} skipped (reasons under each table), {n_fail} failed"
    if run.get("crashed"):
        summary += "; suites that crashed: " + ", ".join(f"{c['suite']} ({c['why']})" for c in run["crashed"])
    lines += [summary + ".", ""]
    threads = env.get("threads") or 1
    if env.get("device") == "cpu" and env.get("loadavg") and max(env["loadavg"]) > threads + 0.5:
        lines += [f"Note: the machine was busy with other work during this run (load average up to "
                  f"{max(env['loadavg']):.1f} on {threads} threads), so the CPU numbers are low and noisy; "
                  "compare providers within a row, and rerun on an idle machine for absolute figures.", ""]
    return lines


READING = """Each table: one row per shape, the throughput of each provider (TFLOP/s, GFLOP/s
or GB/s from the median time; higher is better) and tfkernels' ratio to the
fastest peer (above 1.00x: tfkernels is faster). Attention FLOPs are
4·B·H·S²·D forward, halved when causal, and 3.5x that forward+backward; a GEMM
op counts 2·M·N·K per GEMM forward and 3x that forward+backward; bias_gelu counts
the bytes it must move. attention_varlen counts the unpadded tokens' FLOPs only;
attention_decode counts the K/V bytes one decoding step reads. `gemm-only` runs the
GEMM(s) without the fused work and `kv-read` reads the KV cache once without
attending: ceilings to read the kernels against, never peers (so is `gemm-ceiling`,
torch.mm alone at 2048^3, the line under the attention forward table); `tfkernels-padded`
and `tfkernels-nosplit` are our own kernel run the other way, shown for
comparison and not counted as peers either. "–": skipped, with
the reason below the table."""


def markdown(run, chart_files=None, with_images=True):
    lines = header_lines(run)
    lines += [READING, ""]
    chart_files = chart_files or {}
    for family in FAMILY_ORDER:
        ops = [op for op in _present_ops(run) if _family(op) == family]
        if not ops:
            continue
        lines += [f"## {FAMILY_TITLES[family]}", ""]
        for direction in ("fwd", "fwd+bwd"):
            for op in ops:
                lines += table(run, op, direction)
            chart = chart_files.get((family, direction))
            if with_images and chart:
                lines += [f"![{family} {direction}]({chart})", ""]
        chart = chart_files.get((family, None))
        if with_images and chart:
            lines += [f"![{family}]({chart})", ""]
    return "\n".join(lines).rstrip() + "\n"


def headline(run):
    """Short text: tfkernels vs the best peer at each op's headline shapes (or every shape if none)."""
    lines = ["== headline: tfkernels vs the best peer (median throughput)"]
    rows = run["rows"]
    marked = [r for r in rows + run["skipped"] + run["failed"] if r.get("headline")]
    keys = OrderedDict()
    for r in sorted([r for r in marked or rows if r["op"] != CEILING_OP], key=lambda r: (OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else 99,
                                                   r["direction"], _shape_sort(r))):
        keys.setdefault((r["op"], r["direction"], r["dtype"], r["shape_label"]), None)
    for op, direction, dtype, label in keys:
        here = [r for r in rows if (r["op"], r["direction"], r["dtype"], r["shape_label"]) == (op, direction, dtype,
                                                                                               label)]
        mine = next((r for r in here if r["provider"] == "tfkernels"), None)
        peers = [r for r in here if r.get("peer")]
        best = max(peers, key=lambda r: r["value"]) if peers else None
        unit = (mine or best or {"unit": ""})["unit"]
        unit, scale = _unit_scale(unit, [r["value"] for r in (mine, best) if r])
        text = f"{op} {direction} {dtype} {label}: tfkernels "
        text += f"{_fmt(mine['value'] * scale)}" if mine else "n/a"
        text += f", best peer {best['provider']} {_fmt(best['value'] * scale)}" if best else ", no peer"
        text += f" {unit}"
        if mine and best:
            text += f" ({mine['value'] / best['value']:.2f}x)"
        lines.append(text)
    if _is_cpu(run):  # issue 14's goals are CPU goals
        goals = goal_lines(run)
        if goals:
            lines += ["== goals (issue 14): tfkernels / the best of the goal's peers, the worst shape of each group"] + goals
        if _has_ceiling(run):
            lines += gemm_ceiling_lines(run)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- charts

def _panel_of(r):
    s = r.get("shape", {})
    if r["op"] == "attention":
        mode = "causal" if s.get("causal") else "non-causal"
        return (f"attention {r['dtype']}, D={s.get('D')}, {mode}", f"S={s.get('S')}\nB{s.get('B')} H{s.get('H')}")
    if r["op"] == "fused_qkv":
        return (f"fused_qkv {r['dtype']}, M={s.get('B', 1) * s.get('S', 0)}", f"d={s.get('d')}\nH{s.get('H')} "
                                                                              f"D{s.get('D')}")
    if r["op"] == "linear_gelu":
        return (f"linear_gelu {r['dtype']}, M={s.get('M')}", f"K={s.get('K')}\nN={s.get('N')}")
    if r["op"] == "fused_mlp":
        return (f"fused_mlp {r['dtype']}, M={s.get('M')}", f"d={s.get('d')}\nff={s.get('ff')}")
    if r["op"] == "bias_gelu":
        return (f"bias_gelu {r['dtype']}, M={s.get('M')}", f"N={s.get('N')}")
    return (f"{r['op']} {r['dtype']}", r["shape_label"])


def _panels(run, family, direction):
    rows = [r for r in run["rows"] if _family(r["op"]) == family and r["direction"] == direction
            and r["op"] != CEILING_OP]
    rows.sort(key=lambda r: (OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else 99, _shape_sort(r)))
    panels = OrderedDict()
    for r in rows:
        title, group = _panel_of(r)
        panels.setdefault(title, OrderedDict()).setdefault(group, {})[r["provider"]] = r
    # tfkernels keeps its slot where it was skipped or failed, so the chart shows it missing.
    for status, records in (("n/a", run["skipped"]), ("FAIL", run["failed"])):
        for r in records:
            if r["provider"] != "tfkernels" or _family(r["op"]) != family or r["direction"] != direction:
                continue
            title, group = _panel_of(r)
            if title in panels:
                panels[title].setdefault(group, {}).setdefault("tfkernels", {**r, "value": None, "status": status})
    return panels


def _draw_panel(ax, title, groups, direction_title):
    import numpy as np

    providers = _providers({p for g in groups.values() for p in g})
    measured = [r for g in groups.values() for r in g.values() if r.get("value") is not None]
    unit = measured[0]["unit"]
    shown_unit, scale = _unit_scale(unit, [r["value"] for r in measured])
    n = len(providers)
    width = 0.8 / n
    x = np.arange(len(groups))
    top = max(r["value"] * scale for r in measured)
    vertical = n * len(groups) > 12
    for i, p in enumerate(providers):
        offs = x - 0.4 + width * (i + 0.5)
        vals = [(groups[g][p].get("value") or 0.0) * scale if p in groups[g] else 0.0 for g in groups]
        marks = [groups[g][p].get("status", "n/a") if p in groups[g] else "n/a" for g in groups]
        bars = ax.bar(offs, vals, width * 0.92, label=p, color=COLORS.get(p, "#bcbd22"),
                      hatch="//" if p in CEILINGS else None, edgecolor="white" if p not in CEILINGS else "#7f7f7f",
                      linewidth=0.5)
        for bar, v, mark in zip(bars, vals, marks):
            if v <= 0:
                ax.text(bar.get_x() + bar.get_width() / 2, top * 0.01, mark, ha="center", va="bottom",
                        fontsize=7, color=COLORS.get(p, "#999999") if p == "tfkernels" else "#999999",
                        rotation=90)
                continue
            ax.text(bar.get_x() + bar.get_width() / 2, v + top * 0.01, _fmt(v), ha="center", va="bottom",
                    fontsize=7 if vertical else 8, rotation=90 if vertical else 0,
                    fontweight="bold" if p == "tfkernels" else "normal")
    ax.set_xticks(x)
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel(shown_unit)
    ax.set_ylim(0, top * (1.25 if vertical else 1.15))
    ax.set_title(f"{title} — {direction_title}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    return providers


def _figure(run, family, directions, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_sets = [(d, _panels(run, family, d)) for d in directions]
    panel_sets = [(d, p) for d, p in panel_sets if p]
    if not panel_sets:
        return False
    all_panels = [(d, title, groups) for d, panels in panel_sets for title, groups in panels.items()]
    max_bars = max(len(groups) * len({p for g in groups.values() for p in g}) for _, _, groups in all_panels)
    ncols = 1 if max_bars > 24 or len(all_panels) == 1 else 2
    nrows = math.ceil(len(all_panels) / ncols)
    panel_w = min(16.0, max(6.0, 0.32 * max_bars + 2.0)) if ncols == 1 else max(6.5, 0.3 * max_bars + 2.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, 3.6 * nrows + 0.9), squeeze=False)
    seen = []
    for ax, (direction, title, groups) in zip(axes.flat, all_panels):
        for p in _draw_panel(ax, title, groups, DIRECTION_TITLES[direction]):
            if p not in seen:
                seen.append(p)
    for ax in list(axes.flat)[len(all_panels):]:
        ax.axis("off")
    env = run["env"]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS.get(p, "#bcbd22"), hatch="//" if p in CEILINGS else None)
               for p in _providers(seen)]
    height = 3.6 * nrows + 0.9
    fig.suptitle(f"{FAMILY_TITLES[family]} on {env.get('device_name', '?')} — torch {env.get('torch', '?')}"
                 + (f", CUDA {env['cuda']}" if env.get("cuda") else ""), y=1.0 - 0.05 / height, fontsize=12)
    fig.legend(handles, _providers(seen), loc="upper center", ncol=min(len(seen), 8), frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.3 / height))
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.6 / height))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def charts(run, out_dir, mode="per-direction"):
    """Write PNGs; returns {(family, direction or None): filename}."""
    files = {}
    if mode == "none":
        return files
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: matplotlib is not installed; no charts", file=sys.stderr)
        return files
    for family in FAMILY_ORDER:
        if mode == "per-family":
            name = f"{family}.png"
            if _figure(run, family, ["fwd", "fwd+bwd"], os.path.join(out_dir, name)):
                files[(family, None)] = name
        else:
            for direction in ("fwd", "fwd+bwd"):
                name = f"{family}-{DIRECTION_FILES[direction]}.png"
                if _figure(run, family, [direction], os.path.join(out_dir, name)):
                    files[(family, direction)] = name
    return files


def write_report(json_path, out_dir=None, chart_mode="per-direction", md_name="README.md"):
    """Render JSON -> out_dir/README.md (+ PNGs). Returns (markdown text, chart files)."""
    run = load(json_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(out_dir, exist_ok=True)
    files = charts(run, out_dir, chart_mode)
    text = markdown(run, files)
    with open(os.path.join(out_dir, md_name), "w") as f:
        f.write(text)
    return text, files


# --------------------------------------------------------------------------- compare

def compare(old_path, new_path):
    """Markdown: per-case speed ratio new vs old (old time / new time), and geometric means."""
    old, new = load(old_path), load(new_path)
    lines = [f"# Compare: {old_path} -> {new_path}", ""]
    if old["env"].get("device_name") != new["env"].get("device_name"):
        lines += [f"Warning: different devices ({old['env'].get('device_name')} vs "
                  f"{new['env'].get('device_name')}): ratios compare machines, not code.", ""]
    olds = {_key(r): r for r in old["rows"]}
    news = {_key(r): r for r in new["rows"]}
    common = [k for k in news if k in olds]
    common.sort(key=lambda k: (OP_ORDER.index(k[0]) if k[0] in OP_ORDER else 99, k[1],
                               PROVIDER_ORDER.index(k[2]) if k[2] in PROVIDER_ORDER else 99,
                               DTYPE_ORDER.get(k[3], 9), k[4]))
    lines += ["| op | direction | provider | dtype | shape | old | new | speed new/old |",
              "|---|---|---|---|---|---:|---:|---:|"]
    by_provider = defaultdict(list)
    for k in common:
        o, n = olds[k], news[k]
        ratio = o["median_s"] / n["median_s"]
        by_provider[(k[0], k[2])].append(ratio)
        flag = " ▲" if ratio > 1.05 else (" ▼" if ratio < 0.95 else "")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {_fmt(o['value'])} {o['unit']} | "
                     f"{_fmt(n['value'])} {n['unit']} | {ratio:.2f}x{flag} |")
    lines += ["", "Geometric mean of speed new/old per op and provider:", "",
              "| op | provider | cases | geomean |", "|---|---|---:|---:|"]
    for (op, provider), ratios in sorted(by_provider.items()):
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append(f"| {op} | {provider} | {len(ratios)} | {gm:.2f}x |")
    only_old = len(set(olds) - set(news))
    only_new = len(set(news) - set(olds))
    lines += ["", f"{len(common)} cases in both runs; {only_old} only in the old run, {only_new} only in the new one."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", help="benchmark JSON to render")
    parser.add_argument("--out", help="output folder (default: the JSON's folder)")
    parser.add_argument("--charts", default="per-direction", choices=["per-direction", "per-family", "none"],
                        help="one PNG per op family and direction (default), one per family, or none")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print per-case speed ratios")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    if not args.json:
        parser.error("give a JSON to render, or --compare OLD NEW")
    text, files = write_report(args.json, args.out, args.charts)
    print(markdown(load(args.json), files, with_images=False))
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    print(f"report: wrote {os.path.join(out, 'README.md')}" + (f" and {len(files)} charts" if files else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
