#!/usr/bin/env bash
# One short check of the CUDA paths on a machine with a GPU and no network; at most 5 minutes.
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]        (default ./.whl)
#
# 1. nvidia-smi (before)
# 2. installs what the image lacks (open_clip_torch, ray[tune], optuna, ...) from WHEELS_DIR only:
#    pip --no-index --find-links, the installed torch (and torchvision) pinned so that pip never replaces
#    them; nothing when everything imports already. Wheel list: benchmarks/README.md.
# 3. the CUDA-relevant tests: tests/test_reference.py and tests/test_members.py (their cuda tests run
#    here) and tests/test_models.py
# 4. python -m benchmarks.bench_trial --device cuda (reference vs fast path, blocks 1 and 6, bf16 autocast)
# 5. members per second side by side vs one at a time, four processes at once (0.25 GPU per trial),
#    DTD-shaped RN50 with 6 blocks, groups of 1 and 12 (benchmarks/bench_members.py)
# 6. a study of four trials at 0.25 GPU each through launch.py (benchmarks/bench_study.py)
# 7. nvidia-smi (after)
# Logs go to $OUT (when set) or ./gpu_check_out: one file per step and summary.txt. Exit status: the
# number of failed steps (0 = all passed).
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU at smoke sizes (to test this script without a GPU).
set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh [WHEELS_DIR]   (a folder of wheels; default ./.whl)"
case "${1:-}" in
  -h|--help) echo "$usage"; exit 0 ;;
esac
if [ $# -gt 1 ]; then echo "$usage" >&2; exit 2; fi

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
WHEELS=${1:-./.whl}
LOGS=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-290}   # seconds for everything; each step gets at most what is left
START=$(date +%s)
mkdir -p "$LOGS" || exit 2
SUMMARY=$LOGS/summary.txt
: > "$SUMMARY"

export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TQDM_DISABLE=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}   # rsnl, tune, launch.py from this checkout
RAY_TMPDIR=$(mktemp -d /tmp/rsnl-gpu-check-ray.XXXXXX) || exit 2
export RAY_TMPDIR

failed=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and the time left, output to NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 10 ]; then
    note "SKIP $name: out of time (budget ${BUDGET}s)"; failed=$((failed + 1)); return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  tail -n 30 "$LOGS/$name.log"
  if [ $rc -eq 0 ]; then
    note "PASS $name (${dt}s)"
  else
    [ $rc -eq 124 ] && note "FAIL $name: timed out after ${limit}s" || note "FAIL $name: exit $rc (${dt}s)"
    failed=$((failed + 1))
  fi
  return $rc
}

note "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), wheels: $WHEELS, logs: $LOGS"
nvidia-smi > "$LOGS/nvidia-smi-before.txt" 2>&1 || note "nvidia-smi failed (no driver?)"
head -n 15 "$LOGS/nvidia-smi-before.txt"

# --- install what is missing, from the wheels folder only ------------------------------------------
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"open_clip": "open_clip_torch", "ray": "ray[tune]", "optuna": "optuna", "sklearn": "scikit-learn",
        "pandas": "pandas", "yaml": "pyyaml", "tqdm": "tqdm", "tensorboard": "tensorboard",
        "matplotlib": "matplotlib", "pytest": "pytest", "torchvision": "torchvision", "pyarrow": "pyarrow"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
  note "dry run: CPU, smoke sizes"
  TRIAL_ARGS=(--device cpu --smoke)
  STUDY_ARGS=(--device cpu --cpus-per-trial 0.5 --trials 2 --epochs 2)
  MEMBERS_ARGS=(--smoke --procs 2)
else
  TRIAL_ARGS=(--device cuda --workers 4 --fast-epochs 2 --ref-steps 2 --ref-select-batches 2 --text-reps 3
              --cache-images 128)
  STUDY_ARGS=(--device cuda --gpus-per-trial 0.25 --trials 4 --epochs 5)
  MEMBERS_ARGS=(--workload dtd --device cuda --procs 4 --groups 1 12 --dtd-blocks 6 --dtd-epochs 1 --repeats 1)
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "FAIL torch: no CUDA-enabled torch here ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1))"
  exit 1
fi
if [ -n "$missing" ]; then
  if [ ! -d "$WHEELS" ]; then
    note "FAIL install: missing $missing and no wheels folder $WHEELS"; exit 1
  fi
  "$PY" - > "$LOGS/constraints.txt" <<'EOF'
import importlib.metadata as md
for dist in ("torch", "torchvision"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
EOF
  read -r -a packages <<< "$missing"   # an array: "ray[tune]" must not be a glob pattern
  step install 150 "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$LOGS/constraints.txt" "${packages[@]}" \
    || { note "install failed: see $LOGS/install.log"; exit 1; }
else
  note "install: nothing missing"
fi

# --- checks --------------------------------------------------------------------------------------
step tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_reference.py tests/test_members.py tests/test_models.py
step bench_trial 70 "$PY" -m benchmarks.bench_trial "${TRIAL_ARGS[@]}"
step bench_members 70 "$PY" -m benchmarks.bench_members "${MEMBERS_ARGS[@]}"
step bench_study 60 "$PY" -m benchmarks.bench_study "${STUDY_ARGS[@]}"

nvidia-smi > "$LOGS/nvidia-smi-after.txt" 2>&1
head -n 15 "$LOGS/nvidia-smi-after.txt"
rm -rf "$RAY_TMPDIR"
note "# done in $(( $(date +%s) - START ))s, $failed failed step(s)"
grep -h "^ratio=\|per-epoch ratio\|ratios:\|trials/hour\|ray overhead\|Ray overhead\|members/s" "$LOGS"/bench_*.log 2>/dev/null \
  | tee -a "$SUMMARY"
exit "$failed"
