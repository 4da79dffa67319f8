"""Builds batchkl_ext._C with torch.utils.cpp_extension.

CUDA kernels are compiled when a CUDA build of torch and nvcc are both present.
Environment:
  BATCHKL_CUDA=1 / 0        force the CUDA kernels on / off (default: auto)
  BATCHKL_CPU_SIMD=avx512 / avx2 / default   CPU vector ISA (default: the widest this CPU has;
                            the build is for this machine's CPU, as torch.compile's code is)
  TORCH_CUDA_ARCH_LIST      GPU targets (default "8.0;9.0+PTX")
  CUDA_HOME                 the CUDA toolkit (found from nvcc when unset)
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit folder (the one holding lib64/ or include/cuda_runtime.h).

    torch guesses it as the parent of the `nvcc` on PATH, which is wrong when
    that nvcc is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc).
    """
    def is_toolkit(path):
        return path and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
            os.path.isdir(os.path.join(path, "lib64")) or
            os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: `exec /path/to/toolkit/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if is_toolkit(path):
            return os.path.realpath(path)
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads it once.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("BATCHKL_CUDA")
    if forced is not None:
        if forced == "1" and (torch.version.cuda is None or _cuda_home is None):
            sys.exit("BATCHKL_CUDA=1 but torch is not a CUDA build or no CUDA toolkit (nvcc) was found")
        return forced == "1"
    return torch.version.cuda is not None and _cuda_home is not None


def _native_simd():
    """The widest vector ISA of this CPU that ATen's Vectorized implements."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return "default"
    flags = set(line.split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def _extra_cuda_includes():
    """Headers the system toolkit may lack (cusparse.h, ...) ship in torch's pip wheels."""
    spec = importlib.util.find_spec("nvidia")
    found = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [p for p in found if os.path.isdir(p)]


def _sources_digest():
    """scripts/sources_digest.py's digest of the sources (None where scripts/ is absent)."""
    path = os.path.join(ROOT, "scripts", "sources_digest.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("batchkl_sources_digest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digest(ROOT)


def _extension():
    use_cuda = _want_cuda()
    simd = os.environ.get("BATCHKL_CPU_SIMD") or _native_simd()
    if simd not in ("avx512", "avx2", "default"):
        sys.exit(f"BATCHKL_CPU_SIMD must be avx512, avx2 or default, got {simd!r}")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that runs serially
    # unless the including code is compiled with OpenMP; libgomp itself is the
    # one torch already loaded.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    # ATen's Vectorized picks its implementation from these macros, with
    # SLEEF's vectorised exp/log, which libtorch_cpu exports for both ISAs.
    if simd == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    elif simd == "avx512":
        cxx += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    config = os.path.join(ROOT, "batchkl_ext", "_build_config.py")
    with open(config, "w") as f:
        f.write("# Written by setup.py: how the extension in this folder was built.\n")
        f.write(f"CUDA = {use_cuda!r}\nCPU_SIMD = {simd!r}\n")
        f.write(f"CUDA_ARCHS = {os.environ['TORCH_CUDA_ARCH_LIST'] if use_cuda else None!r}\n")
        f.write(f"TORCH = {torch.__version__!r}\nSOURCES = {_sources_digest()!r}\n")
    # The record, written just now, is a dependency, so setuptools never skips
    # the build as up to date: it compares only the .cpp/.cu files' times with
    # the library's, missing a header or a setting that changed. ninja then
    # recompiles what did change (it tracks headers and command lines) and
    # the library is relinked, so it always matches the record.
    depends = [config]
    if not use_cuda:
        return CppExtension("batchkl_ext._C", sources, depends=depends, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # --threads=0: nvcc compiles the GPU targets side by side, one per core
    # (each kl_logits_kernel_<dtype>.cu takes a minute or more per target).
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "--threads=0", "-DBATCHKL_WITH_CUDA"]
    return CUDAExtension(
        "batchkl_ext._C", sources, depends=depends,
        include_dirs=_extra_cuda_includes(),
        extra_compile_args={"cxx": cxx + ["-DBATCHKL_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link)


setup(
    name="batchkl",
    version="0.1.0",
    description="Fused KL divergence between batches of distributions for PyTorch (CPU and CUDA)",
    packages=find_packages(include=["batchkl_ext", "batchkl_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch"],
)
