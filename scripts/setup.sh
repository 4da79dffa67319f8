#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch and the
# build tools, then builds batchkl (CUDA kernels included when nvcc and a CUDA
# build of torch are present; BATCHKL_CUDA=1 makes that a requirement).
#
#   TORCH_SPEC   the torch to install (default torch==2.14.1; torch==2.13.0 is a CPU-only build)
#   VENV         where the environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" setuptools wheel
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" ninja pybind11 pytest numpy expecttest hypothesis matplotlib

# MAX_JOBS: torch's ninja build would otherwise start one nvcc per core and
# more; two at a time is what a 2-core, 24 GiB machine takes comfortably.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import batchkl_ext, batchkl_ext._build_config as c; print(f'batchkl built: CUDA kernels={c.CUDA}, CPU SIMD={c.CPU_SIMD}')"
