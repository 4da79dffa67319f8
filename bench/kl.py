"""Benchmark of batchkl's losses against PyTorch eager, ``torch.compile`` and Liger-Kernel.

Usage (from the repository root)::

    python -m bench [--device cpu|cuda] [--quick] [--modes fwd fwd+bwd] [--sweeps V N]
                    [--cases ...] [--out PATH.json] [--repeats N] [--warmup N] [--[no-]queued]

Every case (see bench/cases.py) runs forward alone (the loss of a model in
evaluation: inputs need no gradient) and forward + backward (a training step
of the loss alone: the loss computed, then ``.backward()`` producing
``input.grad``; that is the work batchkl fuses, its forward computing loss and
gradient in one pass). The base shapes run for every case; two sweeps show the
scaling: over V at a fixed number of elements N·V, and over N at a fixed V.

All implementations of a configuration run in the same process on the same
tensors, timed round by round (each round times each once, in a rotating
order), so a slow phase of a shared machine hits them all alike. Each call
is timed alone, from an idle device, so on a GPU its time includes the launch
latency and the host's work before the first kernel; on a GPU (``--queued``)
calls issued back to back, the host running ahead as in training, are timed
too: the figure to hold a kernel's bandwidth against. The machine's copy
bandwidth is measured first in the same run (with ``--queued``, back to back
too). On a GPU an
implementation runs only where its estimated peak memory (need_bytes) fits in
80 % of the free memory; one that does not gets a row saying so, and the
others are still measured. A Markdown table goes to stdout; every figure,
with a description of the machine, goes to a JSON file (default
``bench/results/<device-name-slug>-<date>[-quick].json``), from which
``python -m bench.report`` and ``python -m bench.plot`` make the README's
tables and plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .cases import CASES, ELEMENTWISE, LOGITS, LOG_PROBS, MEAN_ROWS, PER_ROW, SCALAR, SUM_ROWS, Case, LossFn
from .measure import (GIB, QUEUED_ROUNDS, REPO, Step, copy_bandwidth, machine_info, peak_extra_mib, queued_calls,
                      queued_ms, time_ms)
from .report import dtype_name, markdown_table, summary_lines

SEED = 0
FWD, FWD_BWD = "fwd", "fwd+bwd"
MODES = (FWD, FWD_BWD)
BASE_SWEEP, V_SWEEP, N_SWEEP = "base", "V", "N"
IMPLS = ("batchkl", "eager", "compile", "liger")
Shape = tuple[int, int]

# Base (shape, dtype) configurations, run for every case and mode. The last
# CPU one has small rows (a policy's action space, a VAE's categories), where
# per-row overhead, not the exps, decides. CUDA_EXTRA: shapes that take
# milliseconds on a GPU, not seconds.
QUICK: list[tuple[Shape, torch.dtype]] = [((128, 32000), torch.float32)]
BASE: list[tuple[Shape, torch.dtype]] = [((1024, 32000), torch.float32), ((256, 128256), torch.bfloat16),
                                         ((262144, 128), torch.float32)]
CUDA_EXTRA: list[tuple[Shape, torch.dtype]] = [
    (shape, dtype)
    for shape in ((8192, 32000), (8192, 128256), (4096, 256000), (65536, 512))
    for dtype in (torch.bfloat16, torch.float32)
]


@dataclass(frozen=True)
class Sweep:
    """Shapes of the scaling sweeps, forward + backward, for a few cases."""
    cases: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    numel: int                  # V sweep: N·V held at this
    vocab: tuple[int, ...]      # V sweep: the Vs
    fixed_v: int                # N sweep: V held at this
    rows: tuple[int, ...]       # N sweep: the Ns


SWEEPS = {
    "quick": Sweep(("logits_kl",), (torch.float32,), 2**20, (1024, 16384, 262144), 4096, (16, 64, 256)),
    "cpu": Sweep(("logits_kl", "batchmean"), (torch.float32,), 2**25,
                 (1024, 4096, 16384, 65536, 262144), 32000, (64, 256, 1024, 4096)),
    "cuda": Sweep(("logits_kl", "batchmean"), (torch.bfloat16, torch.float32), 2**28,
                  (1024, 4096, 16384, 65536, 262144), 32000, (1024, 4096, 16384, 32768)),
}

# Relative error (max |impl - ref| / max |ref|, ref: see reference()) above
# which a result is flagged: the benchmark is meaningless if the
# implementations disagree.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}

# Device memory: the reference runs in row chunks of at most this much
# temporaries; each implementation may hold this much per row besides its N x V
# tensors (row statistics, a per-row loss, its upstream gradient), generously.
REF_CHUNK_BYTES = GIB
ROW_BYTES = 64


@dataclass(frozen=True)
class Config:
    case: Case
    shape: Shape
    dtype: torch.dtype
    mode: str
    sweep: str

    @property
    def label(self) -> str:
        extra = "" if self.sweep == BASE_SWEEP else f" ({self.sweep} sweep)"
        return f"{self.case.name} {self.shape[0]}×{self.shape[1]} {dtype_name(self.dtype)} {self.mode}{extra}"

    def key(self) -> dict:
        return {"case": self.case.name, "mode": self.mode, "sweep": self.sweep,
                "shape": list(self.shape), "dtype": dtype_name(self.dtype)}


def plan(device: torch.device, quick: bool, cases: list[str], modes: list[str], sweeps: list[str],
         base: Optional[list[tuple[Shape, torch.dtype]]] = None) -> list[Config]:
    """Every configuration of this run, in the order they run (``base``: the base shapes, else the default)."""
    if base is None:
        base = QUICK if quick else BASE + (CUDA_EXTRA if device.type == "cuda" else [])
    out = [Config(CASES[c], shape, dtype, mode, BASE_SWEEP)
           for c in cases for mode in modes for shape, dtype in base]
    sweep = SWEEPS["quick" if quick else device.type]
    if FWD_BWD not in modes:  # the sweeps are forward + backward
        return out
    for name in (c for c in sweep.cases if c in cases):
        for dtype in sweep.dtypes:
            if V_SWEEP in sweeps:
                out += [Config(CASES[name], (sweep.numel // v, v), dtype, FWD_BWD, V_SWEEP) for v in sweep.vocab]
            if N_SWEEP in sweeps:
                out += [Config(CASES[name], (n, sweep.fixed_v), dtype, FWD_BWD, N_SWEEP) for n in sweep.rows]
    return out


# --- inputs -------------------------------------------------------------------

@dataclass
class Inputs:
    x: Tensor                 # input (log-probabilities or student logits)
    t: Tensor                 # target, never requires grad
    upstream: Optional[Tensor]  # gradient fed to backward for a non-scalar loss
    grad: bool                # forward + backward


def make_inputs(cfg: Config, device: torch.device) -> Inputs:
    """Random distributions from a seeded generator, never zeros.

    Generated in float32 then cast, so every dtype sees the same distributions
    (up to rounding) and bf16 rows still sum to ~1.
    """
    g = torch.Generator(device=device).manual_seed(SEED)
    shape, dtype, case = cfg.shape, cfg.dtype, cfg.case

    def randn() -> Tensor:
        return torch.randn(shape, generator=g, device=device)

    if case.inputs == LOGITS:
        # Student and teacher logits of a language model's spread.
        x, t = (2 * randn()).to(dtype), (2 * randn()).to(dtype)
    else:
        x = randn().log_softmax(-1).to(dtype)
        raw = randn()
        t = (raw.log_softmax(-1) if case.inputs == LOG_PROBS else raw.softmax(-1)).to(dtype)
        del raw
    grad = cfg.mode == FWD_BWD
    upstream = None
    if grad and case.output in (PER_ROW, ELEMENTWISE):
        # Fixed weights in [0.5, 1.5): a weighted loss, as a real caller has.
        up_shape = shape[:-1] if case.output == PER_ROW else shape
        upstream = (torch.rand(up_shape, generator=g, device=device) + 0.5).to(dtype)
    return Inputs(x.requires_grad_(grad), t, upstream, grad)


def minimal_bytes(cfg: Config) -> int:
    """Bytes any implementation must move.

    Read input and target; forward + backward also writes the gradient. An
    elementwise loss is written too, and its upstream gradient read.
    """
    units = 2
    if cfg.case.output == ELEMENTWISE:
        units += 2 if cfg.mode == FWD_BWD else 1
    if cfg.mode == FWD_BWD:
        units += 1
    return units * cfg.shape[0] * cfg.shape[1] * cfg.dtype.itemsize


# --- one configuration -------------------------------------------------------

def make_step(loss_fn: LossFn, inp: Inputs) -> Step:
    """One forward (+ backward); returns the detached loss for the agreement check."""
    def step() -> Tensor:
        loss = loss_fn(inp.x, inp.t)
        if inp.grad:
            loss.backward(inp.upstream)
        return loss.detach()
    return step


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def _max_rel_err(out: Tensor, ref: Tensor, chunk_rows: int = 1024) -> float:
    """max |out - ref| / max |ref| over the finite reference entries, row chunk by row chunk
    to bound the float32 temporaries; inf where the shapes differ or where out is not finite
    exactly where ref is not (a NaN is an error, never a zero)."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = _as_rows(out), _as_rows(ref)
    err = scale = 0.0
    for i in range(0, ref.shape[0], chunk_rows):
        o, r = out[i:i + chunk_rows].float(), ref[i:i + chunk_rows].float()
        fin = r.isfinite()
        same_specials = torch.equal(o.isnan(), r.isnan()) and torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()])
        if not same_specials or not o[fin].isfinite().all():
            return math.inf
        if fin.any():
            err = max(err, (o[fin] - r[fin]).abs().max().item())
            scale = max(scale, r[fin].abs().max().item())
    return err / scale if scale else err


def _reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference_row_bytes(case: Case, v: int, dtype: torch.dtype) -> int:
    """Memory one row of a reference chunk takes: its eager temporaries and its copies of x,
    t and the upstream gradient, in the reference dtype."""
    return v * _reference_dtype(dtype).itemsize * (case.eager_temporaries + 3)


def reference_chunk_rows(case: Case, shape: Shape, dtype: torch.dtype) -> int:
    """Rows per chunk of the reference, so that a chunk stays under REF_CHUNK_BYTES."""
    return max(1, REF_CHUNK_BYTES // _reference_row_bytes(case, shape[-1], dtype))


def _chunk_weight(case: Case, rows: int, total: int) -> float:
    """What a chunk's loss counts for in the whole loss: a row-mean chunk is a mean over its own rows."""
    if case.output != SCALAR or case.over_rows == SUM_ROWS:
        return 1.0
    if case.over_rows == MEAN_ROWS:
        return rows / total
    raise ValueError(f"case {case.name}: a scalar loss needs over_rows (SUM_ROWS or MEAN_ROWS) to be chunked")


def _reference_rows(case: Case, inp: Inputs, rows: slice, weight: float) -> tuple[Tensor, Optional[Tensor]]:
    dtype = _reference_dtype(inp.x.dtype)
    x = inp.x.detach()[rows].to(dtype).requires_grad_(inp.grad)
    up = inp.upstream[rows].to(dtype) if inp.upstream is not None else None
    loss = case.torch_fn(x, inp.t[rows].to(dtype))
    if weight != 1.0:
        loss = loss * weight
    if inp.grad:
        loss.backward(up)
    return loss.detach(), x.grad


def reference(case: Case, inp: Inputs, chunk_rows: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Loss and input gradient to check every implementation against.

    Eager PyTorch on the same inputs, in float32 for 16-bit inputs: a
    16-bit composite formula rounds every intermediate, so it is not the
    yardstick for a kernel that accumulates in float32 (all implementations
    are flagged against the same reference). Computed ``chunk_rows`` rows at
    a time (default: reference_chunk_rows) so that its memory stays bounded
    whatever the shape: a shape batchkl handles must not be skipped for want
    of room for the eager temporaries of its yardstick.
    """
    n, dtype, device = inp.x.shape[0], _reference_dtype(inp.x.dtype), inp.x.device
    chunk_rows = chunk_rows or reference_chunk_rows(case, tuple(inp.x.shape), inp.x.dtype)
    # Filled chunk by chunk: no list of chunks to concatenate into a second copy.
    shape = {SCALAR: (), PER_ROW: inp.x.shape[:-1], ELEMENTWISE: inp.x.shape}[case.output]
    loss = torch.zeros(shape, dtype=dtype, device=device)
    grad = torch.empty(inp.x.shape, dtype=dtype, device=device) if inp.grad else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk_loss, chunk_grad = _reference_rows(case, inp, rows, _chunk_weight(case, min(chunk_rows, n - start), n))
        if case.output == SCALAR:
            loss += chunk_loss
        else:
            loss[rows] = chunk_loss
        if grad is not None:
            grad[rows] = chunk_grad
    return loss, grad


def loss_fns(case: Case, liger: bool) -> dict[str, LossFn]:
    """The implementations of a case; compiled afresh for every configuration.

    ``dynamic=False`` and a fresh dynamo cache per configuration give each
    shape its own static graph, as a training run with a fixed shape gets,
    instead of a dynamic-shape graph after the second shape.
    """
    torch._dynamo.reset()
    fns = {"batchkl": case.batchkl_fn, "eager": case.torch_fn,
           "compile": torch.compile(case.torch_fn, fullgraph=True, dynamic=False)}
    if liger and case.liger is not None:
        fns["liger"] = case.liger()
    return fns


def _warm_and_check(step: Step, reset: Callable[[], None], inp: Inputs, ref: tuple[Tensor, Optional[Tensor]],
                    warmup: int) -> dict:
    """Warm up (torch.compile compiles here), then compare one result with the reference."""
    for _ in range(warmup):
        reset()
        step()
    reset()
    loss = step()
    errs = {"rel_err_loss": _max_rel_err(loss, ref[0]),
            "rel_err_grad": _max_rel_err(inp.x.grad, ref[1]) if ref[1] is not None else None}
    reset()
    return errs


def measure(steps: dict[str, Step], inp: Inputs, ref: tuple[Tensor, Optional[Tensor]], device: torch.device,
            warmup: int, repeats: int, queued: bool = False) -> dict[str, dict]:
    """Warm up and check each implementation, then time them round by round, then measure memory.

    Timing is interleaved: each round times every implementation once, the
    order rotating from round to round, so a slow phase of a shared machine
    lands on all of them instead of on whichever happened to be running.
    An implementation that fails gets an "error" instead of figures.
    ``queued``: then QUEUED_ROUNDS rounds of queued_calls(repeats) calls back
    to back each (measure.queued_ms), in the same rotating order; the median
    round's time per call is "queued_ms" (an implementation that fails there
    keeps its other figures and gets a "queued_error").
    """
    def reset() -> None:
        inp.x.grad = None

    out: dict[str, dict] = {}
    for impl, step in steps.items():
        try:
            out[impl] = _warm_and_check(step, reset, inp, ref, warmup)
        except Exception as e:  # one broken implementation must not lose the others' figures
            out[impl] = {"error": _one_line(e)}
    times: dict[str, list[float]] = {impl: [] for impl in steps if "error" not in out[impl]}

    def fail(impl: str, e: Exception) -> None:
        out[impl] = {"error": _one_line(e)}

    # Any recompilation past this point would be timed: make it an error instead.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _rounds(times, repeats, lambda impl: time_ms(steps[impl], reset, device, 1)[0], fail)
        for impl, t in times.items():
            out[impl].update({"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "times_ms": t,
                              "peak_extra_mib": peak_extra_mib(steps[impl], reset, device)})
        if queued:
            def queued_fail(impl: str, e: Exception) -> None:
                out[impl]["queued_error"] = _one_line(e)

            rounds: dict[str, list[float]] = {impl: [] for impl in times}
            calls = queued_calls(repeats)
            _rounds(rounds, QUEUED_ROUNDS, lambda impl: queued_ms(steps[impl], reset, device, calls), queued_fail)
            for impl, r in rounds.items():
                out[impl].update({"queued_ms": statistics.median(r), "queued_rounds_ms": r})
    reset()
    return out


def _rounds(series: dict[str, list[float]], count: int, time_one: Callable[[str], float],
            fail: Callable[[str, Exception], None]) -> None:
    """``count`` rounds, each timing every implementation of ``series`` once
    (``time_one``), the order rotating from round to round; an implementation
    that raises is handed to ``fail`` and dropped from ``series``."""
    for k in range(count):
        live = list(series)
        if not live:
            return
        for impl in live[k % len(live):] + live[:k % len(live)]:
            try:
                series[impl].append(time_one(impl))
            except Exception as e:
                fail(impl, e)
                del series[impl]


def _measure_config(cfg: Config, fns: dict[str, LossFn], device: torch.device, warmup: int,
                    repeats: int, queued: bool = False) -> dict[str, dict]:
    try:
        inp = make_inputs(cfg, device)
        ref = reference(cfg.case, inp)
    except Exception as e:  # e.g. out of memory: the run goes on with the next configuration
        failed = {impl: {"error": f"inputs or reference: {_one_line(e)}"} for impl in fns}
    else:
        return measure({impl: make_step(fn, inp) for impl, fn in fns.items()}, inp, ref, device, warmup, repeats,
                       queued)
    if device.type == "cuda":  # here, where the exception no longer holds the tensors
        torch.cuda.empty_cache()
    return failed


def run_config(cfg: Config, device: torch.device, warmup: int, repeats: int, liger: bool,
               queued: bool = False) -> list[dict]:
    """All implementations of one configuration: one result row each, measured, failed or
    skipped (an implementation that would not fit in the device's free memory)."""
    rows: dict[str, dict] = {}
    try:
        fns = loss_fns(cfg.case, liger)
    except Exception as e:  # Liger present but broken: the others still run
        fns = loss_fns(cfg.case, False)
        rows["liger"] = {"error": _one_line(e)}
    skipped = too_big(cfg, list(fns), free_bytes(device))
    rows.update({impl: {"skipped": why} for impl, why in skipped.items()})
    live = {impl: fn for impl, fn in fns.items() if impl not in skipped}
    if live:
        rows.update(_measure_config(cfg, live, device, warmup, repeats, queued))
    torch._dynamo.reset()
    return [{**cfg.key(), "impl": impl, **rows[impl]} for impl in IMPLS if impl in rows]


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def annotate(rows: list[dict], cfg: Config, copy_gbps: Optional[float],
             copy_queued_gbps: Optional[float] = None) -> None:
    """Add the derived figures: batchkl's speedup over each impl, bandwidths, agreement flag;
    for queued timings (measure's ``queued``) the same against the queued copy bandwidth."""
    ours = next((r for r in rows if r["impl"] == "batchkl" and "median_ms" in r), None)
    nbytes = minimal_bytes(cfg)
    tol = TOLERANCE.get(cfg.dtype, 1e-2)
    for r in rows:
        if "median_ms" not in r:
            continue
        r["min_bytes"] = nbytes
        r["agrees_with_reference"] = r["rel_err_loss"] <= tol and (r["rel_err_grad"] or 0.0) <= tol
        # (time key, copy bandwidth, prefix of the derived keys)
        for key, copy, prefix in (("median_ms", copy_gbps, ""), ("queued_ms", copy_queued_gbps, "queued_")):
            if key not in r:
                continue
            r[f"batchkl_{prefix}speedup"] = r[key] / ours[key] if ours and key in ours else None
            r[f"{prefix}gbps"] = nbytes / r[key] / 1e6
            r[f"{prefix}pct_copy_bw"] = 100 * r[f"{prefix}gbps"] / copy if copy else None


def _units(cfg: Config, impl: str) -> int:
    """N x V tensors of the input's dtype an implementation holds at its peak (see Case)."""
    case = cfg.case
    if impl == "batchkl":
        # The gradient and an elementwise loss, plus one gradient more: backward
        # scales it by grad_output in place only when the graph is freed.
        return (cfg.mode == FWD_BWD) + (case.output == ELEMENTWISE) + 1
    return {"eager": case.eager_temporaries, "compile": case.compile_temporaries,
            "liger": case.liger_temporaries}[impl]


def _shared_bytes(cfg: Config) -> int:
    """What stays allocated while every implementation runs: x, t, the upstream
    gradient, the reference's gradient and elementwise loss, per-row odds and ends."""
    nv, elsize = cfg.shape[0] * cfg.shape[1], cfg.dtype.itemsize
    ref_elsize = _reference_dtype(cfg.dtype).itemsize
    grad, elementwise = cfg.mode == FWD_BWD, cfg.case.output == ELEMENTWISE
    tensors = 2 * elsize + grad * ref_elsize + elementwise * ref_elsize + (grad and elementwise) * elsize
    return nv * tensors + cfg.shape[0] * ROW_BYTES


def _setup_bytes(cfg: Config) -> int:
    """Peak before any implementation runs: input generation (two float32 N x V
    tensors in flight) or the reference (one row chunk of its temporaries)."""
    n, v = cfg.shape
    generation = n * v * (2 * cfg.dtype.itemsize + 8)
    chunk_rows = min(n, reference_chunk_rows(cfg.case, cfg.shape, cfg.dtype))
    return max(generation, _shared_bytes(cfg) + chunk_rows * _reference_row_bytes(cfg.case, v, cfg.dtype))


def need_bytes(cfg: Config, impl: str) -> int:
    """Rough peak device memory of one configuration while ``impl`` runs (or while its inputs are made)."""
    own = _units(cfg, impl) * cfg.shape[0] * cfg.shape[1] * cfg.dtype.itemsize + cfg.shape[0] * ROW_BYTES
    return max(_setup_bytes(cfg), _shared_bytes(cfg) + own)


def free_bytes(device: torch.device) -> Optional[int]:
    """Free device memory now; None on the CPU, where the benchmark runs whatever it is given."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free


def too_big(cfg: Config, impls: list[str], free: Optional[int]) -> dict[str, str]:
    """The implementations that do not fit comfortably (80 % of ``free`` bytes), each with why."""
    if free is None:
        return {}
    return {impl: f"needs ~{need / GIB:.3g} GiB, {free / GIB:.3g} GiB free"
            for impl in impls if (need := need_bytes(cfg, impl)) > 0.8 * free}


def unsupported(case: Case, device: torch.device) -> Optional[str]:
    """None when batchkl runs the case on the device, else its error (one line).

    A case whose op has no kernel on the device (a build without CUDA
    kernels) is skipped there, with this line, rather than timing only the
    baselines.
    """
    inp = make_inputs(Config(case, (2, 8), torch.float32, FWD, BASE_SWEEP), device)
    try:
        case.batchkl_fn(inp.x, inp.t)
    except Exception as e:
        return _one_line(e)
    return None


def liger_status(device: torch.device) -> Optional[str]:
    """None when Liger-Kernel is benchmarked, else why it is not (one line for the output)."""
    if device.type != "cuda":
        return "Liger-Kernel skipped: its kernels are Triton, CUDA only"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return f"Liger-Kernel skipped: not installed (pip install liger-kernel): {e}"
    return None


# --- progress -------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: a redrawn line on a terminal, a line per step otherwise."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.width, self.done = total, width, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        eta = f", ~{_duration(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {_duration(elapsed)}{eta} · {label}"
        if self.tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        self.show("done")
        if self.tty:
            print(file=sys.stderr)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# --- main ---------------------------------------------------------------------

def _slug(name: str) -> str:
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def default_out(info: dict, device: torch.device, quick: bool) -> Path:
    """bench/results/<device-name-slug>-<date>[-quick][-runK].json, never an existing file."""
    name = info["gpu_name"] if device.type == "cuda" else info["cpu_model"]
    stem = f"{_slug(name)}-{datetime.date.today().isoformat()}" + ("-quick" if quick else "")
    results = REPO / "bench" / "results"
    path, k = results / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = results / f"{stem}-run{k}.json"
    return path


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _shape(text: str) -> Shape:
    m = re.fullmatch(r"(\d+)[x×](\d+)", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape NxV of positive integers (e.g. 8192x32000), got {text!r}")
    return int(m[1]), int(m[2])


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repeats: a smoke run (under two minutes on a 2-core CPU)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--sweeps", nargs="*", choices=(V_SWEEP, N_SWEEP), default=[V_SWEEP, N_SWEEP],
                   help="scaling sweeps to run (none: pass the flag alone)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="NxV",
                   help="base shapes instead of the default ones (each with every --dtypes)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"],
                   help="dtypes of the --shapes (default bfloat16 float32)")
    p.add_argument("--out", type=Path, metavar="PATH.json",
                   help="JSON output (default bench/results/<device-slug>-<date>[-quick].json)")
    p.add_argument("--repeats", type=int,
                   help="timed iterations per measurement (default 50 on cuda, 10 on cpu, 3 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 3, 2 with --quick; at least 2)")
    p.add_argument("--queued", action=argparse.BooleanOptionalAction,
                   help="also time calls issued back to back (the host running ahead, as in training), "
                        f"{QUEUED_ROUNDS} rounds of max(5, --repeats / {QUEUED_ROUNDS}) calls; default: on cuda, "
                        "off on cpu (where calls are synchronous: it would time them again, with warm caches)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if args.device == "cuda" else 10)
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.queued is None:
        args.queued = args.device == "cuda"
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 2:
        p.error(f"--warmup must be at least 2 (the first iteration compiles), got {args.warmup}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the suite; 0 when every batchkl configuration that ran measured, 1 otherwise."""
    args = parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    out_path = args.out or default_out(info, device, args.quick)

    liger_skip = liger_status(device)
    print(liger_skip or f"Liger-Kernel {info['liger_kernel_version']}: benchmarked where it has an equivalent")
    skipped_cases = {c: why for c in args.cases if (why := unsupported(CASES[c], device))}
    for c, why in skipped_cases.items():
        print(f"case {c} skipped: batchkl cannot run it on {device.type}: {why}")
    copy = copy_bandwidth(device, args.repeats, args.queued)
    queued_copy = f"; queued {copy['queued_gbps']:.1f} GB/s" if args.queued else ""
    print(f"{device.type} copy_ bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] / GIB:.1f} GiB, read + write)"
          + queued_copy)

    cases = [c for c in args.cases if c not in skipped_cases]
    base = [(shape, DTYPES[d]) for shape in args.shapes for d in args.dtypes] if args.shapes else None
    configs = plan(device, args.quick, cases, args.modes, args.sweeps, base)
    settings = {"device": args.device, "quick": args.quick, "repeats": args.repeats,
                "warmup": args.warmup, "modes": args.modes, "sweeps": args.sweeps,
                "shapes": [[list(shape), dtype_name(dtype)] for shape, dtype in base] if base else "default",
                "cases": {c: CASES[c].title for c in args.cases}, "skipped_cases": skipped_cases,
                "liger": liger_skip or "benchmarked",
                "seed": SEED, "tolerance": {dtype_name(k): v for k, v in TOLERANCE.items()},
                "timing": "median wall time of one call, the implementations timed round by round in a rotating order"
                          + (" (cuda events, synchronized)" if device.type == "cuda" else " (perf_counter)"),
                "queued": f"{QUEUED_ROUNDS} rounds of {queued_calls(args.repeats)} calls back to back (the host "
                          "running ahead), rotating order; queued_ms: the median round's time per call"
                          if args.queued else None,
                "peak_memory": "cuda max_memory_allocated minus allocated before the step"
                               if device.type == "cuda" else
                               "approximate: peak RSS growth sampled from /proc/self/statm",
                "bandwidth": "minimal bytes (read input and target, write the gradient; elementwise loss: "
                             "write it, read its upstream gradient) / median time"}
    rows: list[dict] = []

    def write(complete: bool) -> None:
        # Written after every configuration, so a run cut short (a time
        # limit, a crash) keeps what it measured; "complete" says which.
        result = {"machine": info, "settings": settings, "copy_bandwidth": copy, "results": rows,
                  "summary": summary_lines(rows), "complete": complete,
                  "date": datetime.datetime.now().isoformat(timespec="seconds")}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    progress = Progress(len(configs))
    for cfg in configs:
        progress.show(cfg.label)
        config_rows = run_config(cfg, device, args.warmup, args.repeats, liger_skip is None, args.queued)
        annotate(config_rows, cfg, copy["gbps"], copy.get("queued_gbps"))
        rows += config_rows
        write(complete=False)
        progress.step()
    progress.close()
    write(complete=True)

    print()
    print(markdown_table(rows, device))
    print()
    print("\n".join(summary_lines(rows)))
    if any(r.get("agrees_with_reference") is False for r in rows):
        print("(!) marks results whose loss or gradient differs from the reference (eager PyTorch, in float32 for "
              "16-bit inputs) beyond tolerance; see the JSON.")
    print(f"\nwrote {out_path}")
    failed = [r for r in rows if r["impl"] == "batchkl" and ("error" in r or r.get("agrees_with_reference") is False)]
    for r in failed:
        print(f"batchkl failed: {r['case']} {r['mode']} {r['shape']} {r['dtype']}: "
              f"{r.get('error', 'disagrees with the reference')}", file=sys.stderr)
    return 1 if failed else 0
