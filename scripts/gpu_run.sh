#!/usr/bin/env bash
# The CUDA verification for a lent GPU machine (see README), in stages:
#   build     take .prebuilt/ (scripts/prebuild_gpu.sh) where it matches, else
#             build for the local GPU (sm of this GPU only: faster)
#   check     scripts/cuda_check.py: both ops, every launch shape, against float64
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck on `cuda_check.py --small`
#             (memcheck, racecheck also on `cuda_check.py --prefetch --small`)
#   test      pytest: the CUDA tests (-m cuda; PYTEST_ARGS overrides), huge tests included
#   profile   Nsight Compute of kl_with_logits at a few shapes (scripts/profile_logits.py);
#             PROFILE_SOURCE=1 adds the first shape's per-SASS-instruction counters;
#             PROFILE_REUSE="default 0" profiles every shape under both sweep orders
#   tune      kl_with_logits under each launch-shape setting (scripts/tune_logits.py with
#             TUNE_ARGS, then with TUNE2_ARGS where set; not by default)
#   bench     the CUDA benchmark (extra arguments go to `python -m bench`)
#   bash scripts/gpu_run.sh [bench args...]          # every stage
#   STAGES="build check test" bash scripts/gpu_run.sh  # some of them
# A device call runs at most 10 minutes. DEADLINE_S (seconds from the start,
# default 580) bounds the whole script: the benchmark, last, gets what is
# left (it writes its JSON after every configuration, so a cut run keeps what
# it measured). Logs and JSON go to $OUT: at most 8 files, what a lent
# machine sends back (env, build, cuda_check, checks, sanitizer, pytest, ncu,
# the benchmark's JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/batchkl-gpu}
STAGES=${STAGES:-build check sanitize test profile bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
DEADLINE_S=${DEADLINE_S:-580}
step() { echo "== $* ($(date +%T), ${SECONDS}s)"; }
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

# The extension built ahead of time (scripts/prebuild_gpu.sh, carried in
# .prebuilt/), where it was built from exactly these sources, for this
# Python, torch and GPU, and loads with its CUDA kernels; the caller builds
# otherwise. PREBUILT=0 or BATCHKL_CPU_SIMD: build. TORCH_CUDA_ARCH_LIST
# alone does not force a build: the lent machines set it (to 9.0a) for every
# command, and the GPU's own sm is checked below.
use_prebuilt() {
  if [ "${PREBUILT:-1}" = 0 ] || [ -n "${BATCHKL_CPU_SIMD:-}" ]; then
    echo "not looking at .prebuilt/: PREBUILT=0 or BATCHKL_CPU_SIMD given"; return 1
  fi
  [ -f .prebuilt/_build_config.py ] || { echo "no .prebuilt/"; return 1; }
  $PY scripts/sources_digest.py --matches .prebuilt/_build_config.py || return 1
  # Checked before anything is copied: the library's name (Python's ABI
  # tag), the torch it was built against, the GPU targets.
  so=$($PY - <<'EOF'
import os, runpy, sys, sysconfig, torch
cfg = runpy.run_path(".prebuilt/_build_config.py")
so = ".prebuilt/_C" + sysconfig.get_config_var("EXT_SUFFIX")
cap = "%d.%d" % torch.cuda.get_device_capability()
archs = [a.replace("+PTX", "") for a in (cfg["CUDA_ARCHS"] or "").split(";")]
if not os.path.isfile(so) or cfg["TORCH"] != torch.__version__ or cap not in archs:
    sys.exit(f".prebuilt/ holds {sorted(os.listdir('.prebuilt'))} for torch {cfg['TORCH']}, sm {cfg['CUDA_ARCHS']}; "
             f"here {so}, torch {torch.__version__}, sm {cap}")
print(so)
EOF
  ) || return 1
  # Whatever an earlier call on this machine left goes first, so that the
  # library imported below can only be the one copied.
  rm -f batchkl_ext/_C.*.so batchkl_ext/_build_config.py
  if cp "$so" .prebuilt/_build_config.py batchkl_ext/ && $PY - "$so" <<'EOF'
import os, sys, torch
import batchkl_ext
loaded = batchkl_ext._C.__file__
assert os.path.basename(loaded) == os.path.basename(sys.argv[1]), loaded
for op in ("kl", "kl_with_logits"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"batchkl::{op}", "CUDA"), op
EOF
  then
    return 0
  fi
  rm -f batchkl_ext/_C.*.so batchkl_ext/_build_config.py
  return 1
}

if want build; then
  step build
  if use_prebuilt > "$OUT/build.log" 2>&1; then
    echo "using the prebuilt extension in .prebuilt/" | tee -a "$OUT/build.log"
  else
    echo "building: $(tail -1 "$OUT/build.log")"
    cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} BATCHKL_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
        $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
      tail -40 "$OUT/build.log"; exit 1
    fi
  fi
fi

# One compute-sanitizer run of scripts/cuda_check.py: sanitize_run TOOL NAME ARGS...
# (its log's tail to sanitizer.log, its exit status to checks.log).
sanitize_run() {
  local tool=$1 name=$2
  shift 2
  OMP_NUM_THREADS=$CHECK_THREADS timeout ${SANITIZER_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 99 $PY scripts/cuda_check.py "$@" > /tmp/sanitizer_$name.log 2>&1
  local rc=$?
  { echo "== compute-sanitizer --tool $tool, cuda_check.py $*: exit $rc"; tail -25 /tmp/sanitizer_$name.log; } >> "$OUT/sanitizer.log"
  echo "compute-sanitizer $tool ($*): exit $rc ($(date +%T))" | tee -a "$OUT/checks.log"
}

sanitize() {
  # synccheck: shuffle masks and barriers in divergent code (short rows run
  # several rows per warp, each group shuffling under its own mask).
  for tool in memcheck racecheck synccheck; do
    # racecheck and synccheck are slow: two dtypes (one 4-byte, one 2-byte:
    # different vector widths and lane counts) unless SANITIZER_DTYPES says otherwise.
    if [ $tool = memcheck ]; then
      sanitize_run $tool $tool --small
    else
      sanitize_run $tool $tool --small --dtypes ${SANITIZER_DTYPES:-float32 bfloat16}
    fi
  done
  # BATCHKL_LOGITS_PREFETCH=1 (off by default): a bulk copy brings a CTA's
  # next row into its second stage while its threads read the first.
  for tool in memcheck racecheck; do
    sanitize_run $tool prefetch_$tool --prefetch --small --dtypes bfloat16
  done
}

# The sanitizer runs beside the self-check and the tests: all three are
# checks, not timings, and device time is what a lent GPU is short of. The
# sanitized run and the self-check share the cores for their float64
# references on the CPU (the tests take 2 threads per worker below).
CHECK_THREADS=${CHECK_THREADS:-$(( ($(nproc) + 1) / 2 ))}
if want sanitize; then
  step compute-sanitizer
  sanitize &
  sanitizer_pid=$!
fi

if want check; then
  step self-check
  OMP_NUM_THREADS=$CHECK_THREADS $PY scripts/cuda_check.py > "$OUT/cuda_check.log" 2>&1
  echo "cuda_check exit $? ($(date +%T)): $(tail -1 "$OUT/cuda_check.log")" | tee -a "$OUT/checks.log"
  grep FAIL "$OUT/cuda_check.log" | head -20
fi

if want test; then
  step pytest
  # Worker processes (pytest-xdist, where installed) share the GPU, and
  # torch.compile's work is CPU bound.
  # Each worker gets its share of the cores: 8 workers of 16 OpenMP threads
  # each on 16 cores crawl (the float64 references run on the CPU).
  workers=""
  $PY -c "import xdist" 2>/dev/null && workers="-n ${PYTEST_WORKERS:-8}"
  $PY -c "import pytest_timeout" 2>/dev/null && workers="$workers --timeout ${PYTEST_TEST_TIMEOUT:-180}"
  # -v: each result is logged as it comes, so a run cut by its time limit
  # still says which tests failed.
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} BATCHKL_HUGE_TESTS=1 timeout ${PYTEST_TIMEOUT:-400} $PY -m pytest -v -p no:cacheprovider $workers --durations=20 ${PYTEST_ARGS:--m cuda tests} \
    > "$OUT/pytest.log" 2>&1
  echo "pytest exit $? ($(date +%T))" | tee -a "$OUT/checks.log"
  grep -E "FAILED|ERROR|Timeout" "$OUT/pytest.log" | head -30
  tail -25 "$OUT/pytest.log"
fi

if want sanitize; then
  wait $sanitizer_pid
fi

# Nsight Compute on the warm launch of kl_with_logits at a few benchmark
# shapes (PROFILE_SHAPES: "N V dtype" triples separated by commas).
if want profile; then
  step profile
  IFS=, read -ra shapes <<< "${PROFILE_SHAPES:-8192 128256 bfloat16,4096 256000 float32,65536 512 bfloat16}"
  # What the warps wait on, per issued instruction (barrier, long scoreboard,
  # ...): the sections print only the total, and the 2026-11-26 runs left
  # open whether the staged kernel waits on its cluster barriers or on memory.
  stalls=""
  for r in barrier membar long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle \
           dispatch_stall not_selected selected no_instruction sleeping drain branch_resolving misc; do
    stalls="$stalls${stalls:+,}smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
  done
  ncu_run() {
    timeout ${PROFILE_TIMEOUT:-60} ncu --clock-control none --kernel-name regex:logits_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats \
      "$@" $PY scripts/profile_logits.py $shape >> "$OUT/ncu.txt" 2>&1
  }
  # PROFILE_REUSE="default 0": every shape again under BATCHKL_LOGITS_REUSE=0,
  # so that the sections' L2 hit rate and DRAM bytes compare the streamed
  # rows' alternating sweeps (the default) with the plain order.
  for reuse in ${PROFILE_REUSE:-default}; do
    if [ "$reuse" = default ]; then unset BATCHKL_LOGITS_REUSE; else export BATCHKL_LOGITS_REUSE=$reuse; fi
    for shape in "${shapes[@]}"; do
      echo "== ncu: $shape (BATCHKL_LOGITS_REUSE: $reuse)" >> "$OUT/ncu.txt"
      # Without the stall metrics if this ncu does not know one of them.
      ncu_run --metrics "$stalls" || { echo "== ncu: $shape, again without the stall metrics" >> "$OUT/ncu.txt"; ncu_run; }
      echo "ncu $shape (reuse $reuse): exit $?" | tee -a "$OUT/checks.log"
    done
  done
  unset BATCHKL_LOGITS_REUSE
  # PROFILE_SOURCE=1: the first shape again with per-instruction counters
  # (executed instructions and stall samples of every SASS instruction), as
  # CSV, xz-compressed: where the instructions per element go, the loops'
  # against the once-per-row code's, which the sections' totals cannot say.
  if [ "${PROFILE_SOURCE:-0}" = 1 ]; then
    shape=${shapes[0]}
    rm -f /tmp/batchkl-source.ncu-rep
    timeout ${PROFILE_TIMEOUT:-60} ncu --clock-control none --kernel-name regex:logits_kernel --launch-skip 1 \
      --launch-count 1 --section SourceCounters --section WarpStateStats -o /tmp/batchkl-source \
      $PY scripts/profile_logits.py $shape >> "$OUT/ncu.txt" 2>&1 \
      && ncu --import /tmp/batchkl-source.ncu-rep --page source --csv --print-source sass 2>>"$OUT/ncu.txt" \
        | xz -6 > "$OUT/ncu-source.csv.xz"
    echo "ncu source counters $shape: exit $?" | tee -a "$OUT/checks.log"
  fi
fi

# The launcher's tuning knobs side by side (its table goes to checks.log).
if want tune; then
  step tune
  timeout ${TUNE_TIMEOUT:-150} $PY scripts/tune_logits.py ${TUNE_ARGS:-} 2>&1 | tee -a "$OUT/checks.log"
  # A second set in the same stage (another --beta: the forward KL's knobs
  # and JSD's take different divergences).
  if [ -n "${TUNE2_ARGS:-}" ]; then
    timeout ${TUNE_TIMEOUT:-150} $PY scripts/tune_logits.py $TUNE2_ARGS 2>&1 | tee -a "$OUT/checks.log"
  fi
fi

if want bench; then
  step benchmark
  left=$((DEADLINE_S - (SECONDS - T0)))
  if [ "$left" -lt 30 ]; then echo "benchmark skipped: ${left}s left of DEADLINE_S"; exit 0; fi
  timeout ${BENCH_TIMEOUT:-$left} $PY -m bench --device cuda --out "$OUT/bench_cuda.json" "$@" 2>&1 | tail -60
fi
