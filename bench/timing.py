"""Timing one case: preparing its provider, warming up, the timed loop
(pytest-benchmark's pedantic mode), and the records of skipped and failed cases
that bench/conftest.py writes into the results JSON."""
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

import cases
from cases import COMPILED_PROVIDERS, rate, work
from providers import Skip, prepare
from settings import bench_device, bench_grid, cache_bytes, compile_policy, device_name, first_line

# --------------------------------------------------------------------------- skips, failures, deadline

RECORDS = {"skipped": [], "failed": []}  # written into the JSON by conftest


def check_deadline(margin_s=0.0):
    """Skip when the case would start after the deadline, or less than margin_s before it."""
    deadline = os.environ.get("TFKERNELS_BENCH_DEADLINE")
    if deadline and time.time() + margin_s > float(deadline):
        raise Skip("time budget of this run exhausted (TFKERNELS_BENCH_DEADLINE)")


# --------------------------------------------------------------------------- timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _copies(inputs, device):
    """How many copies of the inputs to cycle so that they do not sit in cache between calls."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    return max(1, min(8, math.ceil(2 * cache_bytes(device) / max(nbytes, 1))))


class Step:
    """One timed call, cycling through input copies; on CUDA it synchronises every
    `every` calls, so a pedantic round of `every` iterations ends with the device idle."""

    def __init__(self, prepared, case, device):
        self.fn = prepared.fn
        self.device = device
        first = prepared.make_inputs()
        self.inputs = [first] + [prepared.make_inputs() for _ in range(_copies(first, device) - 1)]
        self.backward = case.direction == "fwd+bwd"
        self.grad_outputs = None
        if self.backward:
            for inp in self.inputs:
                for i in prepared.grad_index:
                    inp[i].requires_grad_(True)
            self.leaves = [tuple(inp[i] for i in prepared.grad_index) for inp in self.inputs]
        self.index = 0
        self.calls = 0
        self.every = 1

    def run_once(self):
        inp = self.inputs[self.index]
        out = self.fn(*inp)
        if self.backward:
            outs = _flatten(out)
            if self.grad_outputs is None:
                self.grad_outputs = [torch.randn_like(o) for o in outs]
            grads = torch.autograd.grad(outs, self.leaves[self.index], self.grad_outputs)
            out = (*outs, *grads)
        self.index = (self.index + 1) % len(self.inputs)
        return out

    def __call__(self):
        self.run_once()
        self.calls += 1
        if self.device == "cuda" and self.calls % self.every == 0:
            torch.cuda.synchronize()


# On the CPU a call slower than this is timed over one round: torch's bf16 GEMMs through
# oneDNN on a CPU without native bf16 take 20-75 s a call (an eager linear's backward),
# and three rounds of them would cost minutes a case. The report lists such cases.
SLOW_CALL_S = 10.0


def _timing_plan(device, grid):
    # (seconds per round on CUDA, total seconds per case, min rounds, max rounds)
    if device == "cuda":
        return 0.01, (0.25 if grid == "quick" else 0.5), 5, 50
    return 0.0, (0.6 if grid == "quick" else 1.5), 3, 10


def run_case(benchmark, case, request=None):
    """Prepare, warm up, time with benchmark.pedantic, and record extra_info.

    On the CPU the case is timed with the other providers of its row, calls taken in
    turn (see _time_row); elsewhere alone. Raises pytest.skip for providers the
    device lacks; lets real failures fail the test.
    """
    import pytest

    device = bench_device()
    samples = None
    try:
        benchmark.group = f"{case.op} {case.direction} {case.dtype} {case.shape_label}"
        if _interleaved(case, device):
            timed = _row_outcome(case, device, rounds_cap=1 if benchmark.disabled else None)
            samples, rounds, iterations, copies = timed.samples, len(timed.samples), 1, timed.copies
            # pytest-benchmark's own record of this test; conftest puts the samples' statistics in the JSON.
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        else:
            prepared = _prepare_checked(case, device)
            with prepared.context():
                step = Step(prepared, case, device)
                per_call = _warm_up_and_estimate(step, case, prepared)
                round_s, case_s, min_rounds, max_rounds = _timing_plan(device, bench_grid())
                iterations = max(1, min(1000, round(round_s / per_call))) if round_s else 1
                rounds = int(max(min_rounds, min(max_rounds, case_s // (per_call * iterations))))
                if device == "cpu" and per_call > SLOW_CALL_S:
                    rounds = 1
                step.every = iterations
                step.calls = 0
                copies = len(step.inputs)
                benchmark.pedantic(step, rounds=rounds, iterations=iterations,
                                   warmup_rounds=1 if device == "cuda" else 0)
    except Skip as why:
        _record_skip(case, str(why))
        pytest.skip(str(why))
    except torch.OutOfMemoryError as err:
        _free(device)
        _record_skip(case, f"out of memory: {first_line(err, 120)}")
        pytest.skip(f"out of memory: {first_line(err, 120)}")
    except Exception as err:
        RECORDS["failed"].append({**case.meta(), "error": f"{type(err).__name__}: {first_line(err)}"})
        if device == "cuda" and ("CUDA error" in str(err) or type(err).__name__ == "AcceleratorError"):
            _BROKEN_CONTEXT.append(case.id)  # errors such as an illegal address are sticky: later cases would fail too
        raise
    finally:
        step = prepared = None  # noqa: F841 - release the inputs before the next case
        _free(device)

    if benchmark.stats is None:  # --benchmark-disable: the calls ran once, untimed (a smoke run)
        return
    median = statistics.median(samples) if samples else benchmark.stats.stats.median
    value, unit = rate(case, median)
    amount, _ = work(case)
    info = benchmark.extra_info
    info.update(case.meta())
    info.update({"value": value, "unit": unit, "work": amount, "median_s": median, "rounds": rounds,
                 "iterations": iterations, "input_copies": copies})
    if samples:
        info["samples_s"] = samples  # conftest makes the JSON's stats from these
    info.update(_env_short(device))
    info["tflops" if unit == "TFLOP/s" else "gbps"] = value
    if request is not None:
        request.node.user_properties.append(("tfk_result", f"{_fmt_rate(value, unit)}  {median * 1e3:.3f} ms"))


def _prepare_checked(case, device):
    """case's Prepared, or Skip when the run leaves it out (time budget, compile policy, a broken context)."""
    compiles = case.provider in COMPILED_PROVIDERS
    check_deadline(45.0 if compiles else 0.0)  # compiling alone can take most of a minute
    if _BROKEN_CONTEXT:
        raise Skip(f"CUDA context unusable after the error in {_BROKEN_CONTEXT[0]} (next suite starts afresh)")
    if compiles and not compile_allowed(case):
        if compile_policy() == "none":
            raise Skip("torch.compile left out of this run (TFKERNELS_BENCH_COMPILE=none / --compile none)")
        raise Skip("torch.compile runs on the headline shapes only (compiling takes 5-20 s a case; "
                   "--compile all for every shape)")
    return prepare(case, device)


def _warm_up_and_estimate(step, case, prepared):
    """The first call (checked for non-finite output), then the seconds per call."""
    start = time.perf_counter()
    first = _warm_up(step, case, prepared)
    warm_up_s = time.perf_counter() - start
    _check_finite(first, case)
    del first
    return _estimate(step, step.device, None if prepared.compiled else warm_up_s)


# --------------------------------------------------------------------------- rows timed together (CPU)

# A shared VM's speed drifts over seconds, not only minutes: a 7 ms attention call
# timed for 40 s on the 2-core Zen 4 VM had 200-call medians from 6.6 to 8.0 ms (p10
# 6.7, p90 7.5). Timed one after the other, two providers of a row meet different
# moments of that drift, and their ratio moved by 0.1-0.2x between runs. On the CPU
# the providers of a row therefore take their calls in turn, in one loop (the order
# reversed every other round), so every ratio compares calls made at the same time.
# Under a time budget the compiled providers are left to their own tests (they run
# last in the suite, for the budget to drop them first).

SELECTED_IDS = None  # the case ids this pytest session runs (conftest, after -k); None = all
INTERLEAVED_MAX_ROUNDS = 20
_ROWS = {}  # row key -> {provider: Timed, or the exception its preparation or a call raised}


@dataclass
class Timed:
    samples: list  # seconds per call
    copies: int  # input copies cycled


def _interleaved(case, device):
    if device != "cpu" or os.environ.get("TFKERNELS_BENCH_INTERLEAVE", "1") == "0":
        return False
    return not (case.provider in COMPILED_PROVIDERS and os.environ.get("TFKERNELS_BENCH_DEADLINE"))


def row_key(case):
    return case.op, case.direction, case.dtype, case.shape_label


def _row_outcome(case, device, rounds_cap=None):
    """case's Timed from its row's loop (run on the row's first test), or its exception raised."""
    key = row_key(case)
    if key not in _ROWS:
        row = [c for c in cases.cases(case.op, device) if row_key(c) == key and _interleaved(c, device)
               and (SELECTED_IDS is None or c.id in SELECTED_IDS or c.id == case.id)]
        _ROWS[key] = _time_row(row, device, rounds_cap)
    outcome = _ROWS[key].get(case.provider)
    if outcome is None:  # not selected when the row ran (cannot happen through pytest's collection)
        raise RuntimeError(f"{case.id} was not timed with its row")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _time_row(row, device, rounds_cap=None):
    outcome, started = {}, []
    for case in row:
        try:
            prepared = _prepare_checked(case, device)
            with prepared.context():
                step = Step(prepared, case, device)
                per_call = _warm_up_and_estimate(step, case, prepared)
            started.append((case, prepared, step, per_call))
        except Exception as err:  # noqa: BLE001 - raised again in the case's own test
            outcome[case.provider] = err
            if isinstance(err, torch.OutOfMemoryError):
                _free(device)
    if started:
        _, case_s, min_rounds, _ = _timing_plan(device, bench_grid())
        budget = case_s * len(started)  # what timing them one by one would take
        rounds = int(max(min_rounds, min(INTERLEAVED_MAX_ROUNDS, budget // sum(s[3] for s in started))))
        rounds = min(rounds, rounds_cap or rounds)
        samples = {case.provider: [] for case, *_ in started}
        for r in range(rounds):
            for case, prepared, step, per_call in (started if r % 2 == 0 else started[::-1]):
                if case.provider in outcome or (r > 0 and per_call > SLOW_CALL_S):
                    continue
                try:
                    with prepared.context():
                        start = time.perf_counter()
                        step()
                        samples[case.provider].append(time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001
                    outcome[case.provider] = err
        for case, _, step, _ in started:
            outcome.setdefault(case.provider, Timed(samples[case.provider], len(step.inputs)))
    return outcome


_ENV_SHORT = {}
_BROKEN_CONTEXT = []


def _env_short(device):
    if device not in _ENV_SHORT:
        _ENV_SHORT[device] = {"device_name": device_name(device), "torch": torch.__version__,
                              "cuda": (torch.version.cuda or "") if device == "cuda" else ""}
    return _ENV_SHORT[device]


def _fmt_rate(value, unit):
    if unit == "TFLOP/s" and value < 1:
        return f"{value * 1e3:.1f} GFLOP/s"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def compile_allowed(case):
    """For the compiled providers (torch.compile, flex): headline shapes; on the CPU only their fp32 ones
    (inductor's CPU bf16 compile is slow)."""
    policy = compile_policy()
    if policy == "headline" and bench_device() == "cpu":
        return case.headline and case.dtype == "fp32"
    return policy == "all" or (policy == "headline" and case.headline)


def _warm_up(step, case, prepared):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step.run_once()
            _sync(step.device)
    except NotImplementedError as err:
        found = re.search(r"Could not run '([^']+)' with arguments from the '(\w+)' backend", str(err))
        if found:
            raise Skip(f"no {found.group(2)} kernel for {found.group(1)} in this build") from err
        raise Skip(f"not implemented on {step.device}: {first_line(err, 120)}") from err
    except RuntimeError as err:
        msg = str(err)
        if case.provider.startswith("sdpa") and "No available kernel" in msg:
            why = "; ".join(first_line(w.message, 140) for w in caught if "kernel" in str(w.message).lower())
            raise Skip(f"{case.provider} backend unavailable here: {why or first_line(err)}") from err
        if case.provider == "tfkernels" and ("no kernel" in msg.lower() or "not implemented" in msg.lower()):
            raise Skip(f"no tfkernels kernel for this case: {first_line(err)}") from err
        if prepared.compiled:
            raise Skip(f"torch.compile failed: {first_line(err)}") from err
        raise
    except Exception as err:
        if prepared.compiled and not isinstance(err, torch.OutOfMemoryError):
            raise Skip(f"torch.compile failed: {type(err).__name__}: {first_line(err)}") from err
        raise
    return out


def _check_finite(out, case):
    for i, t in enumerate(_flatten(out)):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise AssertionError(f"{case.provider} produced non-finite values in output {i} of {case.op} "
                                 f"{case.direction} {case.dtype} {case.shape_label}")


def _estimate(step, device, warm_up_s=None):
    """Seconds per call, to choose rounds and iterations (not part of the results): on the
    CPU the warm-up call's time when nothing was compiled in it and it took over a
    second (another call would cost too much), else 1-3 more calls (a first call
    pays one-time costs: a 25 ms attention forward+backward took 0.9 s)."""
    if warm_up_s is not None and warm_up_s > 1.0 and device == "cpu":
        return warm_up_s
    n, start = 0, time.perf_counter()
    while True:
        step.run_once()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed > 0.05 or n >= 3:
            return max(elapsed / n, 1e-7)


def _record_skip(case, reason):
    RECORDS["skipped"].append({**case.meta(), "reason": reason})


def _free(device):
    if device == "cuda":
        torch.cuda.empty_cache()
