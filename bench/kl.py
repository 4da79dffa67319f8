"""Benchmark of batchkl's losses against PyTorch eager and ``torch.compile``.

Cases: the drop-in ``kl_div`` ('batchmean', 'row') and the distillation ops
``kl_div_with_logits`` / ``jsd_with_logits`` ('logits_kl', 'logits_jsd'),
each against the same loss written in plain PyTorch.

Usage (from the repository root)::

    python -m bench [--device cpu|cuda] [--quick] [--out PATH.json] [--repeats N]
                    [--warmup N] [--cases batchmean row]

Every figure is one training step of the loss alone: the loss computed, then
``.backward()`` producing ``input.grad``. That is the work batchkl fuses (its
forward computes loss and gradient in one pass, its backward only scales), so
timing forward alone would flatter it and timing backward alone would be
meaningless.

The three implementations of a case run in the same process on the same
tensors, so they see the same machine state. A Markdown table goes to stdout
and every measured figure, with a description of the machine, to a JSON file
(default ``bench/results/<device-name-slug>-<date>[-quick].json``).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import batchkl_ext

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
GIB = 2**30
SEED = 0

LossFn = Callable[[Tensor, Tensor], Tensor]
Shape = tuple[int, int]


# --- what is measured -------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One loss, written once with batchkl and once with plain PyTorch.

    ``torch_fn`` serves both as the eager baseline and, wrapped in
    ``torch.compile``, as the compiled one, so the two baselines are the same
    expression by construction.
    """

    name: str
    title: str
    batchkl_fn: LossFn
    torch_fn: LossFn
    log_target: bool   # target given as log-probabilities, else probabilities
    row_weights: bool  # per-row loss: backward from (loss * w).sum(), w fixed per row
    logits: bool = False  # input and target are raw logits (the distillation ops)


def _batchmean_batchkl(x: Tensor, t: Tensor) -> Tensor:
    return batchkl_ext.kl_div(x, t, reduction="batchmean", log_target=True)


def _batchmean_torch(x: Tensor, t: Tensor) -> Tensor:
    return F.kl_div(x, t, reduction="batchmean", log_target=True)


def _row_batchkl(x: Tensor, t: Tensor) -> Tensor:
    return batchkl_ext.kl_div(x, t, reduction="row")


def _row_torch(x: Tensor, t: Tensor) -> Tensor:
    return F.kl_div(x, t, reduction="none").sum(-1)


def _logits_kl_batchkl(x: Tensor, t: Tensor) -> Tensor:
    return batchkl_ext.kl_div_with_logits(x, t, reduction="batchmean")


def _logits_kl_torch(x: Tensor, t: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(x, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)


JSD_BETA = 0.5


def _logits_jsd_batchkl(x: Tensor, t: Tensor) -> Tensor:
    return batchkl_ext.jsd_with_logits(x, t, beta=JSD_BETA, reduction="batchmean")


def _logits_jsd_torch(x: Tensor, t: Tensor) -> Tensor:
    # TRL's GKDTrainer.generalized_jsd_loss (no mask, T = 1).
    log_q, log_p = F.log_softmax(x, -1), F.log_softmax(t, -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - JSD_BETA), log_p + math.log(JSD_BETA)]), dim=0)
    jsd = (JSD_BETA * F.kl_div(log_m, log_p, reduction="none", log_target=True)
           + (1 - JSD_BETA) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    return jsd.sum() / jsd.size(0)


CASES = {
    c.name: c
    for c in (
        Case("batchmean", "drop-in: reduction='batchmean', log_target=True",
             _batchmean_batchkl, _batchmean_torch, log_target=True, row_weights=False),
        Case("row", "per-row KL: reduction='row' vs F.kl_div(reduction='none').sum(-1)",
             _row_batchkl, _row_torch, log_target=False, row_weights=True),
        Case("logits_kl", "kl_div_with_logits (batchmean) vs F.kl_div(log_softmax(x), log_softmax(t), log_target=True)",
             _logits_kl_batchkl, _logits_kl_torch, log_target=True, row_weights=False, logits=True),
        Case("logits_jsd", f"jsd_with_logits (beta={JSD_BETA}, batchmean) vs TRL's generalized_jsd_loss formula",
             _logits_jsd_batchkl, _logits_jsd_torch, log_target=True, row_weights=False, logits=True),
    )
}

IMPLS = ("batchkl", "eager", "compile")  # batchkl first: the others' speedups divide by it

# (shape, dtype) configurations. QUICK is the smoke test; BASE runs everywhere;
# CUDA_EXTRA only on a GPU, where these sizes take milliseconds, not seconds.
QUICK: list[tuple[Shape, torch.dtype]] = [((128, 32000), torch.float32), ((32, 128256), torch.bfloat16)]
# The last one: small rows (as a policy's action space or a VAE's categories),
# where per-row overhead, not the exps, decides.
BASE: list[tuple[Shape, torch.dtype]] = [((1024, 32000), torch.float32), ((256, 128256), torch.bfloat16),
                                         ((262144, 128), torch.float32)]
CUDA_EXTRA: list[tuple[Shape, torch.dtype]] = [
    (shape, dtype)
    for shape in ((8192, 32000), (8192, 128256), (4096, 256000), (65536, 512))
    for dtype in (torch.bfloat16, torch.float32)
]

# Relative error (max |impl - ref| / max |ref|, ref: see reference()) above
# which a result is flagged: the benchmark is meaningless if the
# implementations disagree.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def configs(device: torch.device, quick: bool) -> list[tuple[Shape, torch.dtype]]:
    """The (shape, dtype) list for this run."""
    if quick:
        return QUICK
    return BASE + (CUDA_EXTRA if device.type == "cuda" else [])


# --- inputs -------------------------------------------------------------------

@dataclass
class Inputs:
    x: Tensor                 # log-probabilities, requires grad
    t: Tensor                 # log-probabilities or probabilities, no grad
    w: Optional[Tensor]       # per-row weights for the 'row' case


def make_inputs(case: Case, shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Random distributions from a seeded generator, never zeros.

    Generated in float32 then cast, so every dtype sees the same distributions
    (up to rounding) and bf16 rows still sum to ~1.
    """
    g = torch.Generator(device=device).manual_seed(SEED)

    def randn() -> Tensor:
        return torch.randn(shape, generator=g, device=device)

    if case.logits:
        # Student and teacher logits of a language model's spread.
        x = (2 * randn()).to(dtype).requires_grad_()
        t = (2 * randn()).to(dtype)
        return Inputs(x, t, None)
    x = randn().log_softmax(-1).to(dtype).requires_grad_()
    raw = randn()
    t = (raw.log_softmax(-1) if case.log_target else raw.softmax(-1)).to(dtype)
    del raw
    w = None
    if case.row_weights:
        w = (torch.rand(shape[:-1], generator=g, device=device) + 0.5).to(dtype)
    return Inputs(x, t, w)


def estimate_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Rough peak device memory of one configuration, to skip what does not fit.

    x, t, x.grad and the kept reference gradient, plus up to ~4 eager
    temporaries of the same size (exp(t), t - x, their product; exp(t) * g in
    backward), plus the float32 tensors input generation goes through.
    """
    numel = shape[0] * shape[1]
    elsize = torch.empty((), dtype=dtype).element_size()
    return numel * (8 * elsize + 8)


def minimal_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes any implementation must move: read input and target, write the gradient."""
    return 3 * shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


# --- timing -------------------------------------------------------------------

Step = Callable[[], Tensor]


def make_step(loss_fn: LossFn, inp: Inputs) -> Step:
    """One forward + backward; returns the (detached) loss for the agreement check."""
    def step() -> Tensor:
        loss = loss_fn(inp.x, inp.t)
        (loss if inp.w is None else (loss * inp.w).sum()).backward()
        return loss.detach()
    return step


def _time_cpu(step: Step) -> float:
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _time_cuda(step: Step) -> float:
    # Synchronize first so each iteration starts on an idle GPU and its time
    # includes the launch overhead, as in a real training step.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(step: Step, reset: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``step``, in ms, ``reset`` run untimed before each.

    The one timing function of the benchmark: the copy-bandwidth probe and
    every case go through it.
    """
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    times = []
    for _ in range(repeats):
        reset()
        times.append(timer(step))
    return times


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
        _malloc_trim()
        self._base = self._peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(self._peak, self._rss()) - self._base


def _malloc_trim() -> None:
    """Give freed heap back to the OS so it is not hidden in the RSS baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(step: Step, reset: Callable[[], None], device: torch.device) -> Optional[float]:
    """Memory one forward + backward adds on top of what is already allocated, in MiB.

    Includes the gradient it leaves behind. Exact on CUDA (caching-allocator
    statistics); on CPU an approximate RSS measurement (see RssSampler).
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


def copy_bandwidth(device: torch.device, repeats: int, nbytes: int = 2 * GIB) -> dict:
    """Device-to-device ``copy_`` bandwidth (bytes read + written per second).

    The practical ceiling for a memory-bound kernel such as batchkl, against
    which its achieved bandwidth is reported.
    """
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = time_ms(lambda: dst.copy_(src), lambda: None, device, repeats)
    ms = statistics.median(times)
    return {"bytes": nbytes, "median_ms": ms, "times_ms": times, "gbps": 2 * nbytes / ms / 1e6}


# --- one configuration -------------------------------------------------------

def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def _max_rel_err(out: Tensor, ref: Tensor, chunk_rows: int = 1024) -> float:
    """max |out - ref| / max |ref|, row chunk by row chunk to bound the float32 temporaries."""
    out, ref = _as_rows(out), _as_rows(ref)
    err = scale = 0.0
    for i in range(0, ref.shape[0], chunk_rows):
        o, r = out[i:i + chunk_rows].float(), ref[i:i + chunk_rows].float()
        err = max(err, (o - r).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return err / scale if scale else err


def _loss_fns(case: Case) -> dict[str, LossFn]:
    """The three implementations of a case; compiled afresh for every configuration.

    ``dynamic=False`` and a fresh dynamo cache per configuration give each
    shape its own static graph, as a training run with a fixed shape gets,
    instead of a dynamic-shape graph after the second shape.
    """
    torch._dynamo.reset()
    return {
        "batchkl": case.batchkl_fn,
        "eager": case.torch_fn,
        "compile": torch.compile(case.torch_fn, fullgraph=True, dynamic=False),
    }


def measure_impl(step: Step, inp: Inputs, ref: tuple[Tensor, Tensor], device: torch.device,
                 warmup: int, repeats: int) -> dict:
    """Warm up (torch.compile compiles forward and backward here), check, time, measure memory."""
    def reset() -> None:
        inp.x.grad = None

    for _ in range(warmup):
        reset()
        step()
    reset()
    loss = step()
    errs = {"rel_err_loss": _max_rel_err(loss, ref[0]), "rel_err_grad": _max_rel_err(inp.x.grad, ref[1])}
    del loss
    # Any recompilation past this point would be timed: make it an error instead.
    with torch._dynamo.config.patch(error_on_recompile=True):
        times = time_ms(step, reset, device, repeats)
        peak = peak_extra_mib(step, reset, device)
    reset()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": times, "peak_extra_mib": peak, **errs}


def reference(case: Case, inp: Inputs) -> tuple[Tensor, Tensor]:
    """Loss and input gradient to check every implementation against.

    Eager PyTorch on the same inputs, in float32 for 16-bit inputs: a
    16-bit composite formula rounds every intermediate, so it is not the
    yardstick for a kernel that accumulates in float32 (all implementations
    are flagged against the same reference).
    """
    low = inp.x.dtype in (torch.float16, torch.bfloat16)
    x = inp.x.detach().float().requires_grad_() if low else inp.x
    t = inp.t.float() if low else inp.t
    w = inp.w.float() if low and inp.w is not None else inp.w
    step = make_step(case.torch_fn, Inputs(x, t, w))
    loss = step()
    grad = x.grad
    x.grad = None
    inp.x.grad = None
    return loss, grad


def run_config(case: Case, shape: Shape, dtype: torch.dtype, device: torch.device,
               warmup: int, repeats: int) -> list[dict]:
    """All implementations of one case at one shape and dtype: one result row each."""
    inp = make_inputs(case, shape, dtype, device)
    fns = _loss_fns(case)
    ref = reference(case, inp)

    rows = []
    for impl, fn in fns.items():
        row = {"case": case.name, "shape": list(shape), "dtype": _dtype_name(dtype), "impl": impl}
        try:
            row.update(measure_impl(make_step(fn, inp), inp, ref, device, warmup, repeats))
        except Exception as e:  # one broken implementation must not lose the others' figures
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        rows.append(row)
    torch._dynamo.reset()
    return rows


def annotate(rows: list[dict], shape: Shape, dtype: torch.dtype, copy_gbps: Optional[float]) -> None:
    """Add the derived figures: batchkl's speedup over each impl, bandwidths, agreement flag."""
    ours = next((r for r in rows if r["impl"] == "batchkl" and "median_ms" in r), None)
    nbytes = minimal_bytes(shape, dtype)
    for r in rows:
        if "median_ms" not in r:
            continue
        r["batchkl_speedup"] = r["median_ms"] / ours["median_ms"] if ours else None
        r["min_bytes"] = nbytes
        r["gbps"] = nbytes / r["median_ms"] / 1e6
        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps if copy_gbps else None
        tol = TOLERANCE.get(dtype, 1e-2)
        r["agrees_with_reference"] = r["rel_err_loss"] <= tol and r["rel_err_grad"] <= tol


def fits(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether a configuration fits comfortably (80 % of free memory) on the device."""
    if device.type != "cuda":
        return True, ""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    need = estimate_bytes(shape, dtype)
    if need <= 0.8 * free:
        return True, ""
    return False, f"needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"


# --- machine description ----------------------------------------------------

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


def machine_info(device: torch.device) -> dict:
    """Everything needed to tell two result files apart or reproduce one."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "batchkl_version": getattr(batchkl_ext, "__version__", None),
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


def _slug(name: str) -> str:
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def default_out(info: dict, device: torch.device, quick: bool) -> Path:
    """bench/results/<device-name-slug>-<date>[-quick].json; quick runs never overwrite full ones."""
    name = info["gpu_name"] if device.type == "cuda" else info["cpu_model"]
    stem = f"{_slug(name)}-{datetime.date.today().isoformat()}" + ("-quick" if quick else "")
    return REPO / "bench" / "results" / f"{stem}.json"


# --- report -------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict], device: torch.device) -> str:
    cuda = device.type == "cuda"
    header = ["case", "shape", "dtype", "impl", "median ms", "batchkl speedup",
              "peak extra MiB" + ("" if cuda else " (≈ RSS)")]
    header += ["GB/s", "% copy BW"] if cuda else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["case"], "×".join(map(str, r["shape"])), r["dtype"], r["impl"]]
        if "error" in r:
            cells += [f"error: {r['error'][:80]}"] + [""] * (len(header) - len(cells) - 1)
        elif "skipped" in r:
            cells += [f"skipped: {r['skipped']}"] + [""] * (len(header) - len(cells) - 1)
        else:
            agrees = r.get("agrees_with_reference", r.get("agrees_with_eager"))  # (older files: vs eager)
            flag = "" if agrees is not False else " (!)"
            speedup = None if r["impl"] == "batchkl" else r["batchkl_speedup"]
            speedup = "-" if speedup is None else f"{speedup:.2f}×"
            cells += [_fmt(r["median_ms"], ".3f") + flag, speedup, _fmt(r["peak_extra_mib"], ".1f")]
            if cuda:
                cells += [_fmt(r["gbps"], ".0f"), _fmt(r["pct_copy_bw"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per configuration: batchkl's speedup over eager and torch.compile."""
    out = []
    for key in dict.fromkeys((r["case"], tuple(r["shape"]), r["dtype"]) for r in rows):
        group = {r["impl"]: r for r in rows if (r["case"], tuple(r["shape"]), r["dtype"]) == key}

        def speedup(impl: str) -> str:
            value = group.get(impl, {}).get("batchkl_speedup")
            return "n/a" if value is None else f"{value:.2f}×"

        label = f"{key[0]} {'×'.join(map(str, key[1]))} {key[2]}"
        out.append(f"{label}: batchkl is {speedup('eager')} eager, {speedup('compile')} torch.compile")
    return out


# --- main ---------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smallest configuration only, few repeats")
    p.add_argument("--out", type=Path, metavar="PATH.json", help="JSON output (default bench/results/<device-slug>-<date>[-quick].json)")
    p.add_argument("--repeats", type=int,
                   help="timed iterations per measurement (default 50 on cuda, 10 on cpu, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (at least 2)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if args.device == "cuda" else 10)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.warmup < 2:
        p.error("--warmup must be at least 2 (the first iteration compiles)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    out_path = args.out or default_out(info, device, args.quick)

    copy = copy_bandwidth(device, args.repeats) if device.type == "cuda" else None
    if copy:
        print(f"device-to-device copy: {copy['gbps']:.0f} GB/s ({copy['bytes'] / GIB:.0f} GiB, read + write)")

    rows: list[dict] = []
    for case in (CASES[name] for name in args.cases):
        for shape, dtype in configs(device, args.quick):
            ok, why = fits(shape, dtype, device)
            if not ok:
                rows += [{"case": case.name, "shape": list(shape), "dtype": _dtype_name(dtype),
                          "impl": impl, "skipped": why} for impl in IMPLS]
                continue
            print(f"running {case.name} {shape[0]}×{shape[1]} {_dtype_name(dtype)} ...", file=sys.stderr, flush=True)
            config_rows = run_config(case, shape, dtype, device, args.warmup, args.repeats)
            annotate(config_rows, shape, dtype, copy["gbps"] if copy else None)
            rows += config_rows

    print()
    print(markdown_table(rows, device))
    print()
    summaries = summary_lines([r for r in rows if "skipped" not in r])
    print("\n".join(summaries))
    if any(r.get("agrees_with_reference") is False for r in rows):
        print("(!) marks results whose loss or gradient differs from the reference (eager PyTorch, in float32 for "
              "16-bit inputs) beyond tolerance; see the JSON.")

    result = {
        "machine": info,
        "settings": {"device": args.device, "quick": args.quick, "repeats": args.repeats,
                     "warmup": args.warmup, "cases": {c: CASES[c].title for c in args.cases},
                     "seed": SEED, "tolerance": {_dtype_name(k): v for k, v in TOLERANCE.items()},
                     "timing": "median wall time of one forward + backward"
                               + (" (cuda events, synchronized)" if device.type == "cuda" else " (perf_counter)"),
                     "peak_memory": "cuda max_memory_allocated minus allocated before the step"
                                    if device.type == "cuda" else
                                    "approximate: peak RSS growth sampled from /proc/self/statm"},
        "copy_bandwidth": copy,
        "results": rows,
        "summary": summaries,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    return 0
