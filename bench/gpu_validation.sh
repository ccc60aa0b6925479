#!/usr/bin/env bash
# GPU validation and GPU figures (issue #26), in one call on a fresh GPU machine.
#
#   bash bench/gpu_validation.sh              # on the GPU machine; results in $OUT
#   bash bench/gpu_validation.sh --dry-run    # the same steps at tiny sizes on the CPU
#
# In the issue's order, each step under its own timeout and all of them inside
# RDIAG_GPU_BUDGET seconds (default 460: under 8 minutes on an H100):
#   1. pip install -e . (no dependencies, no build isolation; skipped in a dry run),
#      then the correctness tests: pytest -m cuda tests  -> $OUT/correctness.txt
#   2. the benchmark groups of bench/gpu_validation.py, one process each:
#      kernels, ntk, curvature, monitor, attention      -> $OUT/<group>.json
# Every group rewrites $OUT/summary.md as it goes, so a run cut short keeps what it
# measured; the whole output is in $OUT/log.txt. That is 8 files, one folder deep.
# Environment: PYTHON (default python3), OUT (default results/gpu),
# RDIAG_GPU_BUDGET, RDIAG_GPU_DRYRUN=1 (as --dry-run), RDIAG_GPU_TESTS (the
# test paths; default tests).
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=${RDIAG_GPU_DRYRUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
TOTAL=${RDIAG_GPU_BUDGET:-460}
TESTS=${RDIAG_GPU_TESTS:-tests}
mkdir -p "$OUT"
: >"$OUT/log.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

left() { echo $((TOTAL - ($(date +%s) - START))); }

# step NAME CAP CMD...: run CMD under min(CAP, time left) seconds; never stops the script.
step() {
  local name=$1 cap=$2 rest limit rc
  shift 2
  rest=$(left)
  limit=$((cap < rest ? cap : rest))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${rest}s left of ${TOTAL}s"
    return 0
  fi
  echo "== $name (limit ${limit}s, ${rest}s left) $(date -u +%H:%M:%S)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  [ "$rc" = 124 ] && echo "== $name: stopped at its limit of ${limit}s (what it wrote is kept)"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && echo "== $name: exit status $rc"
  return 0
}

# The group's own budget: its step limit less a margin to write its last row.
group() {
  local name=$1 cap=$2 rest limit
  rest=$(left)
  limit=$((cap < rest ? cap : rest))
  step "$name" "$cap" "$PY" -m bench.gpu_validation "$name" --out "$OUT" \
    --budget $((limit > 30 ? limit - 15 : limit / 2)) "${DRYFLAG[@]}"
}

echo "== environment $(date -u +%FT%TZ), dry run: $DRY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "pytest", "xdist", "pytest_benchmark", "transformers", "torchvision", "scipy"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', 'present')}")
    except ImportError as err:
        print(f"  {name} missing ({err})")
EOF

# 1. install and correctness
if [ "$DRY" = 1 ]; then
  echo "== install: skipped in a dry run (rdiag is imported from the checkout)"
else
  step install 90 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PY" -c "import rdiag; print('rdiag', rdiag.__version__, 'from', rdiag.__file__)"
# shellcheck disable=SC2086  # TESTS may name several paths
step "pytest -m cuda" 170 "$PY" -m pytest -m cuda $TESTS -q -rfEs --durations=15 \
  -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/correctness.txt"

# 2. the benchmark groups, in the issue's order
group kernels 70
group ntk 150
group curvature 50
group monitor 35
group attention 40
"$PY" -m bench.gpu_validation summary --out "$OUT" >/dev/null
echo "== done in $(($(date +%s) - START))s; results in $OUT:"
ls -l "$OUT"
echo
cat "$OUT/summary.md"
