#!/usr/bin/env bash
# Builds the extension for the lent GPU machine ahead of time, here, into
# .prebuilt/ (git-ignored: name it in the device call's `carry`). That
# machine has torch 2.11.0+cu130 on Python 3.12 and an H100 or H200 (sm_90);
# building the CUDA kernels there costs minutes of its short device time, and
# building here against its torch also shows whether the sources compile
# against it. gpu_run.sh's build stage takes .prebuilt/ only where it was
# built from exactly these sources (scripts/sources_digest.py), for the
# machine's torch and GPU, and loads; otherwise it builds as before.
#
#   bash scripts/prebuild_gpu.sh
# Environment:
#   PYTHON312   a Python 3.12 (default: python3.12 on PATH, else pyenv's 3.12)
#   TORCH_SPEC  the machine's torch (default torch==2.11.0, a CUDA 13.0 build)
#   ARCHS       TORCH_CUDA_ARCH_LIST (default 9.0)
#   VENV        the build environment (default /tmp/batchkl-prebuild-venv; reused)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
ARCHS=${ARCHS:-9.0}
VENV=${VENV:-/tmp/batchkl-prebuild-venv}

if [[ -z "${PYTHON312:-}" ]]; then
  # A pyenv shim named python3.12 may be on PATH without running (no 3.12
  # selected): take it only if it runs, else pyenv's own 3.12.
  PYTHON312=$(command -v python3.12 || true)
  if [[ -z "$PYTHON312" ]] || ! "$PYTHON312" -c pass 2>/dev/null; then
    PYTHON312=$(ls -d "${HOME:-/root}"/.pyenv/versions/3.12*/bin/python 2>/dev/null | sort -V | tail -1 || true)
  fi
fi
[[ -n "$PYTHON312" && -x "$PYTHON312" ]] || { echo "prebuild_gpu: no Python 3.12 found (set PYTHON312)" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON312" -m venv "$VENV"
"$VENV/bin/python" -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version" \
  || { echo "prebuild_gpu: $VENV is not a Python 3.12 environment" >&2; exit 1; }
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" ninja setuptools wheel numpy

# A copy of the tree (tracked and untracked, not ignored), so that this
# build's files never mix with the working tree's own build.
work=$(mktemp -d /tmp/batchkl-prebuild.XXXX)
trap 'rm -rf "$work"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar cf -) | tar xf - -C "$work"
# avx2: the GPU machine's CPU may lack AVX-512 (the default build would take this machine's).
(cd "$work" && BATCHKL_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" BATCHKL_CPU_SIMD=avx2 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV/bin/python" setup.py build_ext --inplace > "$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
# It must load here (no GPU needed) with its CUDA kernels registered.
(cd "$work" && "$VENV/bin/python" -c "
import torch, batchkl_ext
assert torch._C._dispatch_has_kernel_for_dispatch_key('batchkl::kl_with_logits', 'CUDA')
assert torch._C._dispatch_has_kernel_for_dispatch_key('batchkl::kl', 'CUDA')
")
mkdir "$work/out"
cp "$work"/batchkl_ext/_C.*.so "$work/batchkl_ext/_build_config.py" "$work/out/"
# The host code's debug information is half the file, and a device call
# carries 64 MiB at most.
strip --strip-debug "$work"/out/_C.*.so
rm -rf "$ROOT/.prebuilt"
mv "$work/out" "$ROOT/.prebuilt"
echo "prebuild_gpu: $(ls "$ROOT"/.prebuilt/*.so) ($(du -sh "$ROOT/.prebuilt" | cut -f1)); $(grep -E '^(TORCH|CUDA_ARCHS|SOURCES)' "$ROOT/.prebuilt/_build_config.py" | tr '\n' ' ')"
