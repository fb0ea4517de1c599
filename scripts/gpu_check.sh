#!/usr/bin/env bash
# Validate fimfast on a GPU in one command (sized for 8 minutes on one H100; not yet timed there):
#
#   bash scripts/gpu_check.sh [--dry-run] [--no-build] [--no-tests] [--out FILE]
#
# 1. build   fimfast._C with its CUDA kernels in place (FIMFAST_BUILD_CUDA=1, for this GPU's
#            architecture), unless the loaded extension already has them;
# 2. tests   the GPU lane: tests/ops (cuda and triton backends against the torch reference on the
#            GPU, every op and dtype) and tests/test_gpu_e2e.py (whole models on CUDA against the
#            float64 oracle, the automatic backend choice, sync-free steps of every estimator);
# 3. ops     benchmarks/bench_ops.py --device cuda: every backend, achieved bandwidth as a
#            fraction of the GPU's peak and the roofline time;
# 4. suite   benchmarks/gpu_check.py: Fisher steps of the suite workloads (a), (d), (e), (g) and a
#            50k-vocabulary LM with lm_head, as ratios to a training step; measured vs expected.
# Results: benchmarks/results/gpu_<device>_<date>.json (ops_cuda_<device>_<date>.json and the test
# report gpu_<device>_<date>_tests.xml beside it). Exit status non-zero when a GPU test failed.
#
# --dry-run runs every step end to end on the CPU at tiny sizes, without building and without
# writing into benchmarks/results/ (a temporary directory, or --out): it keeps the script honest
# on machines without a GPU. Python: $PYTHON, else .venv/bin/python, else python3. It needs a CUDA
# build of torch (docs/gpu.md) and, for the build, nvcc matching torch.version.cuda.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0 BUILD=1 TESTS=1 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-tests) TESTS=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # triton compiles for the GPU here (the CPU tests set it)
t0=$SECONDS
step() { echo "== [$((SECONDS - t0)) s] $*"; }
day="$(date -u +%F)"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  OUT="${OUT:-$WORK/gpu_dryrun_$day.json}"
  OPS="$WORK/ops_dryrun_$day.json"
else
  DEV=cuda
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_check.sh: torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)')); use --dry-run on a CPU" >&2
    exit 1
  }
  name="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')"
  OUT="${OUT:-$ROOT/benchmarks/results/gpu_${name}_$day.json}"
  OPS="$(dirname "$OUT")/ops_cuda_${name}_$day.json"
fi
step "gpu_check: device=$DEV python=$PY out=$OUT"
"$PY" -c 'import torch, fimfast; print("torch", torch.__version__, "cuda", torch.version.cuda, "fimfast", fimfast.__version__)'

if [ "$DRY" = 0 ] && [ "$BUILD" = 1 ]; then
  if "$PY" -c 'import sys; from fimfast import _ext; sys.exit(0 if _ext.has_cuda() else 1)' 2>/dev/null; then
    step "build: fimfast._C already has its CUDA kernels"
  else
    arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    step "build: fimfast._C with CUDA kernels for sm_${arch/./} (in place)"
    FIMFAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace
    "$PY" -c 'import sys; from fimfast import _ext; ok, why = _ext.load(); print(why); sys.exit(0 if _ext.has_cuda() else 1)' || {
      echo "gpu_check.sh: fimfast._C has no CUDA kernels after the build (see above)" >&2; exit 1; }
  fi
else
  step "build: skipped"
fi

if [ "$TESTS" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    step "tests: tests/test_gpu_e2e.py (skipped without CUDA)"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_e2e.py
  else
    step "tests: GPU lane (tests/ops, tests/test_gpu_e2e.py)"
    # a failing test does not stop the timings; the script exits non-zero at the end
    "$PY" -m pytest -q -p no:cacheprovider --junitxml="${OUT%.json}_tests.xml" \
      tests/ops tests/test_gpu_e2e.py || TESTS_FAILED=1
  fi
else
  step "tests: skipped"
fi

step "ops: benchmarks/bench_ops.py --device $DEV"
if [ "$DRY" = 1 ]; then
  "$PY" benchmarks/bench_ops.py --device cpu --tiny --wall-only --budget 0.1 --out "$OPS"
else
  "$PY" benchmarks/bench_ops.py --device cuda --budget 1.5 --out "$OPS"
fi

step "suite: Fisher steps as ratios to a training step; ops vs roofline"
if [ "$DRY" = 1 ]; then
  "$PY" -m benchmarks.gpu_check --dry-run --ops-json "$OPS" --out "$OUT"
else
  "$PY" -m benchmarks.gpu_check --device cuda --ops-json "$OPS" --out "$OUT"
fi
step "done: $OUT"
if [ "${TESTS_FAILED:-0}" = 1 ]; then
  echo "gpu_check.sh: GPU tests failed (see above and ${OUT%.json}_tests.xml)" >&2
  exit 1
fi
