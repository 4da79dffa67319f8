#!/usr/bin/env bash
# Configure + build + test the CMake (libtorch) build of batchkl.
#
#   scripts/cmake_build_test.sh [BUILD_DIR] [extra cmake -D args...]
#
# BUILD_DIR defaults to /tmp/batchkl-cmake (keep it outside the repository).
# Environment:
#   BATCHKL_CUDA=1 / 0   build the CUDA kernels or not (default: when torch is a CUDA
#                        build and a CUDA toolkit with nvcc is found)
#   PYTHON               the Python with torch (default: python, else python3)
#   JOBS                 build parallelism (default 2)
#   CUDA_HOME            the CUDA toolkit (default: found as setup.py does)
#   BATCHKL_CPU_SIMD, CMAKE_CUDA_ARCHITECTURES / TORCH_CUDA_ARCH_LIST: see CMakeLists.txt
#   CONSUMER=0           skip installing the build and building tests/cpp/consumer against it
# Takes care of the quirks of a CUDA torch wheel + a system toolkit: the real
# toolkit behind a wrapper nvcc, libnvrtc and missing headers from the wheel's
# nvidia/cu* folders (CMakeLists.txt also finds these itself).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-/tmp/batchkl-cmake}"
shift || true
JOBS="${JOBS:-2}"

log() { printf '[cmake_build_test] %s\n' "$*"; }
die() { printf '[cmake_build_test] ERROR: %s\n' "$*" >&2; exit 1; }

command -v cmake >/dev/null 2>&1 || die "cmake (>= 3.25) is not on PATH: install it (apt-get install cmake, or pip install cmake)"

case "$(cd "$(dirname "$BUILD_DIR")" 2>/dev/null && pwd)/" in
  "$ROOT"/*) die "build dir $BUILD_DIR is inside the repository; use one outside it" ;;
esac

# --- Python / torch -----------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
  for cand in python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then
      PYTHON="$(command -v "$cand")"; break
    fi
  done
fi
[[ -n "${PYTHON:-}" ]] || die "no python with torch found (set PYTHON or activate the venv)"
# One per line: cmake prefix, site-packages, torch version, CUDA version of torch ("" if CPU build).
TORCH_INFO="$("$PYTHON" - <<'EOF'
import os, torch
print(torch.utils.cmake_prefix_path)
print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))
print(torch.__version__)
print(torch.version.cuda or "")
EOF
)" || die "$PYTHON could not import torch"
{ read -r TORCH_CMAKE_PREFIX; read -r SITE_PACKAGES; read -r TORCH_VERSION; read -r TORCH_CUDA || true; } <<<"$TORCH_INFO"
log "python: $PYTHON (torch $TORCH_VERSION${TORCH_CUDA:+, CUDA $TORCH_CUDA})"

# --- CUDA toolkit, found as setup.py's _find_cuda_home() does ------------------
is_toolkit() { [[ -n "$1" && -f "$1/bin/nvcc" ]] && { [[ -d "$1/lib64" ]] || [[ -f "$1/include/cuda_runtime.h" ]]; }; }
find_cuda_home() {
  local cands=("${CUDA_HOME:-}" "${CUDA_PATH:-}") nvcc real word
  if nvcc="$(command -v nvcc 2>/dev/null)"; then
    real="$(readlink -f "$nvcc")"
    cands+=("$(dirname "$(dirname "$real")")")
    # A wrapper script (`exec /path/to/toolkit/bin/nvcc "$@"`): the toolkit it names.
    while IFS= read -r word; do
      cands+=("$(dirname "$(dirname "$word")")")
    done < <(head -c 4096 "$real" 2>/dev/null | grep -aoE "[^[:space:]\"';]*/bin/nvcc" || true)
  fi
  cands+=(/usr/local/cuda)
  local d
  while IFS= read -r d; do cands+=("$d"); done < <(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV)
  for d in "${cands[@]}"; do
    if is_toolkit "$d"; then readlink -f "$d"; return 0; fi
  done
  return 1
}
CUDA_ROOT="$(find_cuda_home || true)"

case "${BATCHKL_CUDA:-auto}" in
  1) [[ -n "$TORCH_CUDA" ]] || die "BATCHKL_CUDA=1 but torch $TORCH_VERSION is not a CUDA build"
     [[ -n "$CUDA_ROOT" ]] || die "BATCHKL_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME"
     WITH_CUDA=ON ;;
  0) WITH_CUDA=OFF ;;
  auto) if [[ -n "$TORCH_CUDA" && -n "$CUDA_ROOT" ]]; then WITH_CUDA=ON; else WITH_CUDA=OFF; fi ;;
  *) die "BATCHKL_CUDA must be 0 or 1, got '${BATCHKL_CUDA}'" ;;
esac

ARGS=(-S "$ROOT" -B "$BUILD_DIR"
      -DCMAKE_BUILD_TYPE=Release
      -DCMAKE_PREFIX_PATH="$TORCH_CMAKE_PREFIX"
      -DBATCHKL_WITH_CUDA="$WITH_CUDA"
      -DBATCHKL_PYTHON_EXECUTABLE="$PYTHON")
GENERATOR="Unix Makefiles"
command -v ninja >/dev/null 2>&1 && GENERATOR=Ninja
ARGS+=(-G "$GENERATOR")
if command -v ccache >/dev/null 2>&1; then
  ARGS+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
# What find_package(Torch) of a CUDA wheel needs: the real toolkit, and
# libnvrtc from the wheel where a slim toolkit lacks it.
TOOLKIT_ARGS=()
if [[ -n "$TORCH_CUDA" && -n "$CUDA_ROOT" ]]; then
  TOOLKIT_ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT"
                 -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  nvrtc="$(ls "$SITE_PACKAGES"/nvidia/cu*/lib/libnvrtc.so.[0-9]* 2>/dev/null | grep -v alt | head -n1 || true)"
  [[ -z "$nvrtc" ]] && nvrtc="$(ls "$CUDA_ROOT"/lib64/libnvrtc.so "$CUDA_ROOT"/lib/libnvrtc.so 2>/dev/null | head -n1 || true)"
  [[ -n "$nvrtc" ]] && TOOLKIT_ARGS+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
if [[ "$WITH_CUDA" == ON ]]; then
  log "CUDA toolkit: $CUDA_ROOT"
  ARGS+=("${TOOLKIT_ARGS[@]}")
fi
# Reuse a build dir (incremental) only if it was configured the same way:
# another generator cannot be reused, and CUDA on/off changes what TorchConfig sets up.
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  old_gen="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")"
  old_cuda="$(sed -n 's/^BATCHKL_WITH_CUDA:BOOL=//p' "$BUILD_DIR/CMakeCache.txt")"
  old_src="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")"
  if [[ "$old_gen" != "$GENERATOR" || "$old_cuda" != "$WITH_CUDA" || "$old_src" != "$ROOT" ]]; then
    log "build dir was configured differently ($old_gen, CUDA $old_cuda, $old_src): starting it afresh"
    rm -rf "$BUILD_DIR"
  fi
fi

log "CUDA kernels: $WITH_CUDA; build dir: $BUILD_DIR; jobs: $JOBS"
t0=$SECONDS
cmake "${ARGS[@]}" "$@"
t1=$SECONDS
cmake --build "$BUILD_DIR" -j "$JOBS"
t2=$SECONDS
status=0
(cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS") || status=$?
t3=$SECONDS
log "configure $((t1 - t0))s, build $((t2 - t1))s, ctest $((t3 - t2))s (CUDA kernels: $WITH_CUDA)"
[[ $status -eq 0 ]] || die "ctest failed (exit $status)"

# The installed package as a libtorch user's project finds it
# (tests/cpp/consumer: find_package(batchkl), <batchkl/batchkl.h>, both ops
# and their gradients). CONSUMER=0 skips it.
if [[ "${CONSUMER:-1}" == 1 ]]; then
  prefix="$BUILD_DIR/install"
  rm -rf "$prefix" "$BUILD_DIR/consumer"
  cmake --install "$BUILD_DIR" --prefix "$prefix" >/dev/null
  # The installed library finds its own dependencies (libtorch*) by its RUNPATH.
  missing="$(ldd "$prefix"/lib*/libbatchkl.so | grep "not found" || true)"
  [[ -z "$missing" ]] || die "the installed libbatchkl.so does not find: $missing"
  cmake -S "$ROOT/tests/cpp/consumer" -B "$BUILD_DIR/consumer" -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$prefix;$TORCH_CMAKE_PREFIX" "${TOOLKIT_ARGS[@]}" >"$BUILD_DIR/consumer.log" 2>&1 \
    && cmake --build "$BUILD_DIR/consumer" -j "$JOBS" >>"$BUILD_DIR/consumer.log" 2>&1 \
    || { tail -n 40 "$BUILD_DIR/consumer.log" >&2; die "the consumer project did not build against the installed package"; }
  "$BUILD_DIR/consumer/consumer" || die "the consumer project failed"
  log "installed package: $prefix, consumer $(($SECONDS - t3))s"
fi
log "OK: $BUILD_DIR/libbatchkl.so"
