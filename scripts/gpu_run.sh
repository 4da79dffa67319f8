#!/usr/bin/env bash
# The CUDA verification for a lent GPU machine (see README), in stages:
#   build     build for the local GPU (sm of this GPU only: faster)
#   check     scripts/cuda_check.py: both ops, every launch shape, against float64
#   sanitize  compute-sanitizer memcheck + racecheck on `cuda_check.py --small`
#   test      pytest: the CUDA tests (-m cuda; PYTEST_ARGS overrides), huge tests included
#   bench     the CUDA benchmark (extra arguments go to `python -m bench`)
#   bash scripts/gpu_run.sh [bench args...]          # every stage
#   STAGES="build check test" bash scripts/gpu_run.sh  # some of them
# A device call runs at most 10 minutes: build+check+sanitize+test fit one,
# the benchmark (split with --cases) another. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/batchkl-gpu}
STAGES=${STAGES:-build check sanitize test bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $* ($(date +%T))"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

step environment
# Wheels carried in .whl/ (liger-kernel for the benchmark's baseline; the
# machine reaches no package index) go to a private target on the path.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" | tee -a "$OUT/env.txt"

if want build; then
  step build
  cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} BATCHKL_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
  fi
fi

if want check; then
  step self-check
  $PY scripts/cuda_check.py 2>&1 | tail -20 | tee "$OUT/checks.log"
fi

if want sanitize; then
  step compute-sanitizer
  for tool in memcheck racecheck; do
    timeout ${SANITIZER_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 99 $PY scripts/cuda_check.py --small > /tmp/sanitizer_$tool.log 2>&1
    rc=$?
    { echo "== compute-sanitizer --tool $tool: exit $rc"; tail -25 /tmp/sanitizer_$tool.log; } >> "$OUT/sanitizer.log"
    echo "compute-sanitizer $tool: exit $rc" | tee -a "$OUT/checks.log"
  done
fi

if want test; then
  step pytest
  BATCHKL_HUGE_TESTS=1 timeout ${PYTEST_TIMEOUT:-400} $PY -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:--m cuda tests} \
    > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?" | tee -a "$OUT/checks.log"
  tail -15 "$OUT/pytest.log"
fi

if want bench; then
  step benchmark
  timeout ${BENCH_TIMEOUT:-500} $PY -m bench --device cuda --out "$OUT/bench_cuda.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
