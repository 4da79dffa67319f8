"""How the benchmark measures: wall time, peak memory, the machine's copy bandwidth, and what machine it is."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import batchkl_ext

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
GIB = 2**30

Step = Callable[[], Tensor]
# Rounds of back-to-back calls (queued_ms) per implementation; the median is reported.
QUEUED_ROUNDS = 3


# --- time -----------------------------------------------------------------------

def _time_cpu(step: Step) -> float:
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _time_cuda(step: Step, lead: Optional[Step] = None) -> float:
    # Synchronize first so each iteration starts on an idle GPU and its time
    # includes the launch overhead, as in a real training step. `lead` runs
    # after that, before the span opens: the span then starts with the GPU
    # busy (queued_ms).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if lead is not None:
        lead()
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(step: Step, reset: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``step``, in ms, ``reset`` run untimed before each.

    The one timing function of the benchmark for calls timed alone: the
    copy-bandwidth probe and every case go through it (queued_ms times calls
    back to back).
    """
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    times = []
    for _ in range(repeats):
        reset()
        times.append(timer(step))
    return times


def queued_calls(repeats: int) -> int:
    """Calls per queued round for a run of ``repeats`` timed repeats: the
    rounds together about as many calls as the timed repeats, at least 5."""
    return max(5, repeats // QUEUED_ROUNDS)


def queued_ms(step: Step, reset: Callable[[], None], device: torch.device, calls: int) -> float:
    """Mean time per call of ``calls`` calls of ``step`` issued back to back, in ms.

    ``reset`` runs between the calls, inside the timed span: it must be host
    work only (dropping a gradient), as in a training loop. On a GPU the host
    then runs ahead of the device, as it does in training, so a call costs
    the larger of its host time and its device time: the figure to hold a
    kernel's bandwidth against, where time_ms's synchronized call adds the
    launch latency and the host's time before the first kernel (a fixed
    0.1-0.2 ms that weighs on sub-millisecond calls). One call more is issued
    before the span opens, so that the first timed call, too, finds the GPU
    busy. (A baseline that waits for the GPU inside a call, such as
    Liger-Kernel's JSD backward, which compares its upstream gradient with 1
    through torch.equal, cannot run ahead: that wait is its own.) On the CPU
    every call runs to its end before the next starts: this times the calls
    again, with the caches warm. Either way a call may find what the one
    before it left in a cache (a GPU's L2, the CPU's L3) where the tensors
    fit in it, as time_ms's rounds, which run the other implementations in
    between, do not.
    """
    if calls < 1:
        raise ValueError(f"queued_ms: 'calls' must be at least 1, got {calls}")

    def run(n: int) -> None:
        for _ in range(n):
            reset()
            step()

    if device.type == "cuda":
        return _time_cuda(lambda: run(calls), lead=lambda: run(1)) / calls
    return _time_cpu(lambda: run(calls)) / calls


def copy_bandwidth(device: torch.device, repeats: int, queued: bool = False) -> dict:
    """The machine's ``copy_`` bandwidth (bytes read + written per second), measured now.

    The practical ceiling for a memory-bound kernel such as batchkl, against
    which its achieved bandwidth is reported. The destination is written once
    before timing, so this is the bandwidth of memory already mapped: on CPU a
    loss that returns a fresh gradient also pays the page faults of mapping
    it, which this figure does not include.
    """
    nbytes = 2 * GIB if device.type == "cuda" else 512 * MIB
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = time_ms(lambda: dst.copy_(src), lambda: None, device, max(repeats, 5))
    ms = statistics.median(times)
    out = {"bytes": nbytes, "median_ms": ms, "times_ms": times, "gbps": 2 * nbytes / ms / 1e6,
           "threads": torch.get_num_threads() if device.type == "cpu" else None}
    if queued:
        # The same copy back to back: the ceiling for the queued figures.
        rounds = [queued_ms(lambda: dst.copy_(src), lambda: None, device, queued_calls(repeats))
                  for _ in range(QUEUED_ROUNDS)]
        q = statistics.median(rounds)
        out.update({"queued_ms": q, "queued_rounds_ms": rounds, "queued_gbps": 2 * nbytes / q / 1e6})
    return out


# --- memory ---------------------------------------------------------------------

class RssSampler:
    """Peak resident-set growth of the process while the ``with`` block runs.

    ``resource.getrusage`` only gives the process-lifetime high-water mark, so
    a thread polls ``/proc/self/statm`` instead. Approximate: a peak shorter
    than the polling interval can be missed, and memory the allocator keeps
    resident after a free is not seen as growth (``malloc_trim`` before the
    baseline limits that).
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, interval_s: float = 2e-4):
        self.interval_s = interval_s
        self.peak_extra: Optional[int] = None
        self._stop = threading.Event()

    @classmethod
    def available(cls) -> bool:
        return os.path.exists("/proc/self/statm")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._PAGE

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        malloc_trim()
        self._base = self._peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(self._peak, self._rss()) - self._base


def malloc_trim() -> None:
    """Give freed heap back to the OS so it is not hidden in the RSS baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(step: Step, reset: Callable[[], None], device: torch.device) -> Optional[float]:
    """Memory one call of ``step`` adds on top of what is already allocated, in MiB.

    Includes what it leaves behind (the gradient, an elementwise loss). Exact
    on CUDA (caching-allocator statistics); on CPU an approximate RSS
    measurement (see RssSampler).
    """
    reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    if not RssSampler.available():
        return None
    with RssSampler() as sampler:
        step()
    return sampler.peak_extra / MIB


# --- the machine ----------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to tell two result files apart or reproduce one."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "batchkl_version": getattr(batchkl_ext, "__version__", None),
        "liger_kernel_version": package_version("liger-kernel"),
        "triton_version": package_version("triton"),
    }
    try:
        from batchkl_ext import _build_config
        info["batchkl_build"] = {k: v for k, v in vars(_build_config).items() if k.isupper()}
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = props.total_memory / GIB
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info
