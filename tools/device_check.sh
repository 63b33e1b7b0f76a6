#!/usr/bin/env bash
# One-call GPU check: build, CUDA tests, compute-sanitizer, benchmarks + report.
#
#   bash tools/device_check.sh OUTDIR      (bench/device_check.sh runs this too)
#
# Made for a GPU machine whose time is scarce (under 10 minutes on an H100/H200
# with 16 cores). Writes at most 8 files into OUTDIR:
#   build.log    the extension build (for this machine's torch and card), timed
#   tests.log    `pytest tests -m cuda` (less context parallel), context parallel (its own
#                step: NCCL processes), then compute-sanitizer memcheck and racecheck
#   bench.log    the benchmark run's progress and tables
#   results.json, README.md, attention.png, qkv.png, mlp.png   the benchmark report
# and prints a summary table last. Exits non-zero when the build, the tests, a
# sanitizer or the benchmark step fails, and the summary says which; the steps
# after a failure still run where they can tell something.
#
# Environment:
#   CHECK_BUDGET_S        seconds for the whole script (default 540); the benchmark
#                         gets what the earlier steps leave, less a margin
#   TORCH_CUDA_ARCH_LIST  default 9.0a (Hopper); MAX_JOBS default: all cores
#   BENCH_ARGS            arguments for the benchmark runner (default:
#                         "--device cuda --quick --charts per-family"; "--device cuda
#                         --charts per-family" for the full grid, which needs more time)
#   PYTHON                the interpreter (default python3, else python)
#   DRY_RUN=1             print the build/test/sanitizer commands instead of running
#                         them; FAKE_FAIL=build,tests,cp,memcheck,racecheck makes those
#                         fake steps fail; the benchmark step runs BENCH_ARGS for real
#                         (default in a dry run: a small CPU subset). For testing this
#                         script on a machine without a GPU.
set -u -o pipefail

OUT=${1:?usage: bash tools/device_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${CHECK_BUDGET_S:-540}
DRY_RUN=${DRY_RUN:-0}
FAKE_FAIL=${FAKE_FAIL:-}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
if [ "$DRY_RUN" = 1 ]; then
  BENCH_ARGS=${BENCH_ARGS:-"--device cpu --quick --suites mlp --compile none --charts per-family -- -k bias_gelu"}
else
  BENCH_ARGS=${BENCH_ARGS:-"--device cuda --quick --charts per-family"}
fi

# Only this script's own outputs are cleared, so a rerun into the same folder stays within 8 files.
rm -f "$OUT"/build.log "$OUT"/tests.log "$OUT"/bench.log "$OUT"/check.log "$OUT"/results.json "$OUT"/README.md \
      "$OUT"/attention*.png "$OUT"/qkv*.png "$OUT"/mlp*.png
rm -rf "$OUT"/raw

NAMES=(); STATUS=(); SECS=(); NOTES=(); FAILURES=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

record() {  # name status seconds note
  NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4")
  case "$2" in FAIL|TIMEOUT|MISSING) FAILURES+=("$1");; esac
  printf '[device_check] %-10s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME LOG TIMEOUT_S CMD...: runs CMD (or fakes it in a dry run), appends to LOG,
# sets STEP_RC. Status and note are left to the caller.
run_step() {
  local name=$1 log=$2 limit=$3; shift 3
  {
    echo "=== $name: $*"
    echo "=== started $(date -u '+%H:%M:%S') UTC, limit ${limit}s"
  } >>"$log"
  local t0; t0=$(date +%s)
  if [ "$DRY_RUN" = 1 ] && [ "$name" != bench ]; then
    echo "[dry-run] would run: $*" >>"$log"
    case ",$FAKE_FAIL," in *",$name,"*) STEP_RC=1;; *) STEP_RC=0;; esac
  else
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    STEP_RC=$?
  fi
  STEP_SECS=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $STEP_RC after ${STEP_SECS}s" >>"$log"
  echo >>"$log"
}

status_of() {  # rc -> PASS / TIMEOUT / FAIL
  case "$1" in 0) echo PASS;; 124|137) echo TIMEOUT;; *) echo FAIL;; esac
}

# ---------------------------------------------------------------------------- 0. environment
{
  echo "device_check on $(hostname) at $(date -u '+%Y-%m-%d %H:%M:%S') UTC, budget ${BUDGET}s, dry run: $DRY_RUN"
  echo "repo: $ROOT ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git')$(git diff --quiet 2>/dev/null || echo ', dirty'))"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1; else echo "nvidia-smi: not found"; fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU visible: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
missing = [m for m in ("pytest", "pytest_benchmark", "matplotlib", "numpy") if importlib.util.find_spec(m) is None]
print("python modules missing: " + (", ".join(missing) if missing else "none"))
EOF
  echo
} >>"$OUT/build.log"

# ---------------------------------------------------------------------------- 1. build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
run_step build "$OUT/build.log" "$(( $(left) > 330 ? 300 : $(left) - 30 ))" \
  env TFKERNELS_CUDA=1 "$PY" setup.py build_ext --inplace
BUILD_OK=0
if [ "$STEP_RC" = 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    BUILD_OK=1; record build PASS "$STEP_SECS" "dry run"
  else
    info=$("$PY" -c "import tfkernels; i = tfkernels.build_info(); print(i['cuda'], ','.join(i['cuda_archs']))" 2>>"$OUT/build.log")
    echo "build_info: cuda archs: $info" >>"$OUT/build.log"
    case "$info" in
      True*) BUILD_OK=1; record build PASS "$STEP_SECS" "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs";;
      *) record build FAIL "$STEP_SECS" "built, but without CUDA kernels (build_info: ${info:-import failed})";;
    esac
  fi
else
  record build "$(status_of "$STEP_RC")" "$STEP_SECS" "exit $STEP_RC, see build.log (last error: $(grep -iE 'error' "$OUT/build.log" | tail -1 | cut -c1-80))"
fi

# ---------------------------------------------------------------------------- 2. CUDA tests
if [ "$BUILD_OK" = 1 ]; then
  run_step tests "$OUT/tests.log" "$(( $(left) > 200 ? 150 : $(left) / 2 ))" \
    "$PY" -m pytest tests -m cuda -k "not context_parallel" -q -p no:cacheprovider -rfE
  case "$STEP_RC" in
    0) record tests PASS "$STEP_SECS" "$(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1 | tr -d '=' | xargs)";;
    5) record tests NONE "$STEP_SECS" "no test carries the cuda marker";;
    *) record tests "$(status_of "$STEP_RC")" "$STEP_SECS" \
         "exit $STEP_RC: $(grep -E '[0-9]+ (passed|failed)|error' "$OUT/tests.log" | tail -1 | tr -d '=' | xargs | cut -c1-90)";;
  esac
else
  record tests SKIP 0 "build failed"
fi

# ---------------------------------------------------------------------------- 2b. context parallel
# torch's context_parallel over our kernels (tests/test_distributed.py): NCCL processes, one per
# GPU (world size 1 on a single GPU, also 2 when there are two), with its own time limit so that
# a hung collective cannot eat the sanitizer and benchmark time.
if [ "$BUILD_OK" != 1 ]; then
  record cp SKIP 0 "build failed"
elif [ "$(left)" -lt 150 ]; then
  record cp TIMEOUT 0 "no time left in the budget"
else
  run_step cp "$OUT/tests.log" "$(( $(left) > 300 ? 90 : $(left) / 4 ))" \
    "$PY" -m pytest tests/test_distributed.py -m cuda -k context_parallel -q -p no:cacheprovider -rfEs
  case "$STEP_RC" in
    0) record cp PASS "$STEP_SECS" "$(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/tests.log" | tail -1 | tr -d '=' | xargs)";;
    *) record cp "$(status_of "$STEP_RC")" "$STEP_SECS" \
         "exit $STEP_RC: $(grep -E '[0-9]+ (passed|failed)|Error' "$OUT/tests.log" | tail -1 | tr -d '=' | xargs | cut -c1-90)";;
  esac
fi

# ---------------------------------------------------------------------------- 3. compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
for guess in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  [ -z "$SANITIZER" ] && [ -n "$guess" ] && [ -x "$guess/bin/compute-sanitizer" ] && SANITIZER=$guess/bin/compute-sanitizer
done
[ "$DRY_RUN" = 1 ] && SANITIZER=${SANITIZER:-compute-sanitizer}
# Small CUDA cases: the tests marked `sanitize`, then every op on small odd shapes, in one process.
SAN_TARGET=("$PY" tools/sanitize_smoke.py --tests)
SAN_WHAT="tests marked sanitize + tools/sanitize_smoke.py"
for tool in memcheck racecheck; do
  if [ "$BUILD_OK" != 1 ]; then
    record "$tool" SKIP 0 "build failed"
  elif [ -z "$SANITIZER" ]; then
    record "$tool" MISSING 0 "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"
  elif [ "$(left)" -lt 120 ]; then
    record "$tool" TIMEOUT 0 "no time left in the budget"
  else
    run_step "$tool" "$OUT/tests.log" "$(( $(left) > 300 ? 120 : $(left) / 3 ))" \
      "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 30 "${SAN_TARGET[@]}"
    errors=$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' <(tac "$OUT/tests.log") | cut -c1-60)
    nokernel=$(sed -n "/^=== $tool:/,\$p" "$OUT/tests.log" | grep -c 'skipped (no CUDA kernel')
    [ "$nokernel" -gt 0 ] && errors="$errors; $nokernel smoke cases had no CUDA kernel"
    case "$STEP_RC" in
      0) record "$tool" PASS "$STEP_SECS" "$SAN_WHAT; ${errors:-no summary line}";;
      86) record "$tool" FAIL "$STEP_SECS" "sanitizer found errors: ${errors:-see tests.log}";;
      *) record "$tool" "$(status_of "$STEP_RC")" "$STEP_SECS" "exit $STEP_RC ($SAN_WHAT); ${errors:-see tests.log}";;
    esac
  fi
done

# ---------------------------------------------------------------------------- 4. benchmarks + report
BENCH_LEFT=$(( $(left) - 20 ))
if [ "$BENCH_LEFT" -lt 45 ]; then
  record bench TIMEOUT 0 "no time left in the budget (${BENCH_LEFT}s)"
else
  # bench/run.py, not -m tfkernels.bench: importing the package fails when the extension did not build,
  # and the peers are worth measuring even then.
  # shellcheck disable=SC2086
  run_step bench "$OUT/bench.log" "$BENCH_LEFT" \
    "$PY" bench/run.py --out "$OUT" --time-budget "$(( BENCH_LEFT - 40 ))" $BENCH_ARGS
  measured=$(grep -m1 -E '^[0-9]+ cases measured' "$OUT/README.md" 2>/dev/null | cut -c1-90)
  case "$STEP_RC" in
    0) record bench PASS "$STEP_SECS" "${measured:-no report}";;
    1) record bench FAIL "$STEP_SECS" "cases failed or a suite crashed: ${measured:-no report}";;
    *) record bench "$(status_of "$STEP_RC")" "$STEP_SECS" "exit $STEP_RC, see bench.log";;
  esac
fi

# ---------------------------------------------------------------------------- at most 8 files
count=$(find "$OUT" -type f | wc -l)
if [ "$count" -gt 8 ]; then
  for f in build tests bench; do
    [ -f "$OUT/$f.log" ] && { echo "##### $f.log"; cat "$OUT/$f.log"; } >>"$OUT/check.log" && rm -f "$OUT/$f.log"
  done
  count=$(find "$OUT" -type f | wc -l)
  echo "[device_check] more than 8 files: logs combined into check.log"
fi
[ "$count" -gt 8 ] && echo "[device_check] WARNING: $count files in $OUT (only 8 come back): $(cd "$OUT" && find . -type f | xargs)"

# ---------------------------------------------------------------------------- summary
echo
echo "== device_check summary ($(elapsed)s of ${BUDGET}s; files in $OUT: $(cd "$OUT" && ls | xargs))"
[ -f "$OUT/bench.log" ] && sed -n '/^== headline/,/^$/p' "$OUT/bench.log"
printf '| %-9s | %-7s | %5s | %s\n' step status secs note
for i in "${!NAMES[@]}"; do
  printf '| %-9s | %-7s | %5s | %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
done
if [ "${#FAILURES[@]}" -gt 0 ]; then
  echo "device_check: FAILED: ${FAILURES[*]}"
  exit 1
fi
echo "device_check: all steps passed"
exit 0
