"""Shared helpers for the batchkl_ext test suite.

Everything here is written from the spec, not from the implementation:

* ``ref_kl`` / ``ref_grads``: a float64 reference of the loss and of its
  gradients (zero-probability rule included), straight from the math.
* ``magnitude`` helpers: the size of the terms that make up each result, so
  tolerances scale with the rounding error a correct float implementation can
  make (sum of |terms|), not with the (possibly cancelling) result itself.
* ``assert_close_scaled``: compares against a reference with a per-dtype
  tolerance relative to those magnitudes; NaN positions must match.
* ``make_pair`` / ``apply_layout``: random log-prob inputs and targets in a
  given memory layout (contiguous, sliced, transposed, expanded, offset view).
"""
import contextlib
import math
import os
import subprocess
import sys
import warnings
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from batchkl_ext import _build_config

try:
    import batchkl_ext  # noqa: F401  (registers torch.ops.batchkl.*)
except ModuleNotFoundError:  # `pytest tests` from a checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import batchkl_ext  # noqa: F401

REDUCTIONS = ("none", "sum", "mean", "batchmean", "row")
TORCH_REDUCTIONS = ("none", "sum", "mean", "batchmean")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "sliced", "transposed", "expanded", "offset")

# Machine epsilon of each dtype (spacing at 1.0).
EPS = {dt: torch.finfo(dt).eps for dt in FLOAT_DTYPES}

# Tolerances against the float64 truth, as a multiple of the magnitude of the
# terms (sum of |terms|) plus a relative part for the final rounding to the
# output dtype and an absolute floor (fp16 subnormals).
#   mag:  error allowed per unit of term magnitude (rounding inside the kernel,
#         which works in float32 for every dtype but float64)
#   rel:  rounding of the result to the output dtype
#   abs:  absolute floor
TOL = {
    torch.float64: dict(mag=1e-13, rel=1e-14, abs=1e-300),
    torch.float32: dict(mag=5e-6, rel=2e-7, abs=1e-37),
    # Low precision: inputs are exactly representable in float32, so the
    # kernel's error is float32 error + one rounding of the result (and for
    # broadcast arguments, roundings of the summed gradient elements, which are
    # covered by the magnitude term).
    # fp16 abs: a few subnormal spacings (2^-24): a gradient is rounded once
    # when the fused kernel stores it and once more when it is multiplied by
    # grad_output (as PyTorch's own fp16 backward does).
    torch.float16: dict(mag=2 * EPS[torch.float16], rel=EPS[torch.float16], abs=2.0e-7),
    torch.bfloat16: dict(mag=2 * EPS[torch.bfloat16], rel=EPS[torch.bfloat16], abs=1e-37),
}

# Looser tolerances for comparing against PyTorch itself, whose low-precision
# kl_div rounds every intermediate (and its 'mean' backward rounds 1/numel to
# the low-precision dtype).
TORCH_TOL = {
    torch.float64: dict(mag=1e-12, rel=1e-13, abs=1e-300),
    torch.float32: dict(mag=2e-5, rel=1e-6, abs=1e-30),
    torch.float16: dict(mag=2e-2, rel=1e-2, abs=1e-6),
    torch.bfloat16: dict(mag=6e-2, rel=3e-2, abs=1e-6),
}


# Property-based tests (tests/test_fuzz.py): a fixed, derandomized profile for
# CI and a larger random one, picked with BATCHKL_FUZZ_PROFILE=thorough.
# No example database: a failure prints the example and its reproduce blob.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings

    _HYP_COMMON = dict(deadline=None, database=None, print_blob=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _hyp_settings.register_profile("ci", max_examples=400, derandomize=True, **_HYP_COMMON)
    _hyp_settings.register_profile("thorough", max_examples=5000, derandomize=False, **_HYP_COMMON)
    _hyp_settings.load_profile(os.environ.get("BATCHKL_FUZZ_PROFILE", "ci"))
except ModuleNotFoundError:  # hypothesis not installed: tests/test_fuzz.py skips itself
    pass

HUGE_ENV = "BATCHKL_HUGE_TESTS"

# What an op says on a device it has no kernel for; a build without CUDA
# kernels says so instead of promising CUDA.
UNSUPPORTED_DEVICE = (r"only CPU and CUDA tensors are supported" if _build_config.CUDA
                      else r"only CPU tensors are supported \(this build of batchkl has no CUDA kernels\)")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile / torch.export tests (a few seconds each)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", f"huge: needs many GiB of memory; runs only with {HUGE_ENV}=1 or -m huge")


def pytest_collection_modifyitems(config, items):
    """`huge` tests are opt-in: skipped unless BATCHKL_HUGE_TESTS=1 or the -m
    expression names them."""
    if os.environ.get(HUGE_ENV) == "1" or "huge" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason=f"opt-in: set {HUGE_ENV}=1 or run with -m huge")
    for item in items:
        if "huge" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Fresh (but reproducible per test) random inputs; restore the thread count."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("BATCHKL_TEST_RANDOM_SEED") else 1234
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_mean_warning():
    """Silence the reduction='mean' UserWarning inside a test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"reduction: 'mean' divides")
        yield


def kl_op(x, t, reduction, log_target):
    """torch.ops.batchkl.kl: no warnings, positional arguments."""
    return torch.ops.batchkl.kl(x, t, reduction, log_target)


def torch_kl(x, t, reduction, log_target):
    """PyTorch's answer; 'row' is F.kl_div('none').sum(-1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reduction == "row":
            return F.kl_div(x, t, reduction="none", log_target=log_target).sum(-1)
        return F.kl_div(x, t, reduction=reduction, log_target=log_target)


# --------------------------------------------------------------------------
# float64 reference, from the math in the spec
# --------------------------------------------------------------------------

def _terms(x, t, log_target):
    """Broadcast float64 pieces: x, p, log p, zero mask."""
    x = x.detach().cpu().to(torch.float64)
    t = t.detach().cpu().to(torch.float64)
    x, t = torch.broadcast_tensors(x, t)
    if log_target:
        p = torch.exp(t)
        logp = t
        zero = t == -math.inf
    else:
        p = t
        with torch.no_grad():
            logp = torch.log(t)
        zero = t == 0
    return x, p, logp, zero


def ref_pointwise(x, t, log_target):
    """Elementwise loss (float64, broadcast shape) and its term magnitude."""
    xb, p, logp, zero = _terms(x, t, log_target)
    loss = torch.where(zero, torch.zeros_like(p), p * (logp - xb))
    mag = torch.where(zero, torch.zeros_like(p), p.abs() * (logp.abs() + xb.abs()))
    return loss, mag


def reduction_divisor(x, t, reduction):
    shape = torch.broadcast_shapes(x.shape, t.shape)
    if reduction == "mean":
        return float(math.prod(shape))
    if reduction == "batchmean" and x.dim() > 0:
        return float(x.shape[0])
    return 1.0


def _reduce(v, reduction, divisor):
    if reduction == "none":
        return v
    if reduction == "row":
        return v.sum(-1)
    return v.sum() / divisor


def ref_kl(x, t, reduction, log_target):
    """(loss, magnitude) in float64 for any reduction."""
    loss, mag = ref_pointwise(x, t, log_target)
    d = reduction_divisor(x, t, reduction)
    return _reduce(loss, reduction, d), _reduce(mag, reduction, d)


def ref_grads(x, t, reduction, log_target, grad_out=None):
    """float64 gradients of the loss w.r.t. x and t (summed to their shapes)
    and their magnitudes. grad_out: the upstream gradient for 'none' / 'row'
    (a tensor of the loss's shape), or a scalar for the other reductions."""
    xb, p, logp, zero = _terms(x, t, log_target)
    shape = xb.shape
    if reduction in ("none", "row"):
        g = grad_out.detach().cpu().to(torch.float64)
        if reduction == "row":
            g = g.unsqueeze(-1)
        g = g.expand(shape)
    else:
        g = torch.full(shape, float(1.0 if grad_out is None else grad_out), dtype=torch.float64)
        g = g / reduction_divisor(x, t, reduction)
    z = torch.zeros_like(p)
    gx = torch.where(zero, z, -p) * g
    mx = torch.where(zero, z, p.abs()) * g.abs()
    if log_target:
        gt = torch.where(zero, z, p * (logp - xb + 1)) * g
        mt = torch.where(zero, z, p.abs() * (logp.abs() + xb.abs() + 1)) * g.abs()
    else:
        gt = torch.where(zero, z, logp + 1 - xb) * g
        mt = torch.where(zero, z, logp.abs() + 1 + xb.abs()) * g.abs()
    return (gx.sum_to_size(x.shape), mx.sum_to_size(x.shape)), (gt.sum_to_size(t.shape), mt.sum_to_size(t.shape))


# --------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------

def assert_close_scaled(actual, expected, mag, dtype=None, tol=None, what=""):
    """|actual - expected| <= mag_tol * mag + rel * |expected| + abs, NaNs at
    the same places, infinities equal. `expected` and `mag` are float64."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual)}"
    dtype = dtype or actual.dtype
    tol = tol or TOL[dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    m = mag.detach().to(torch.float64).cpu() if isinstance(mag, torch.Tensor) else torch.tensor(float(mag))
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN mismatch: {int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected "
        f"(first differing index {torch.nonzero(nan_a != nan_e)[:3].tolist()})")
    if dtype in FLOAT_DTYPES and dtype != torch.float64:
        # A true value beyond the dtype's range is +-inf in that dtype.
        cast = e.to(dtype).double()
        ovf = torch.isinf(cast) & torch.isfinite(e)
        e = torch.where(ovf, cast, e)
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities differ"
    fin = ~nan_e & ~inf_e
    err = (a - e).abs()[fin]
    bound = (tol["mag"] * m.expand_as(e) + tol["rel"] * e.abs() + tol["abs"])[fin]
    if err.numel():
        bad = err > bound
        if bad.any():
            i = int(torch.argmax((err - bound).flatten()))
            raise AssertionError(
                f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance; worst: "
                f"actual={a[fin].flatten()[i].item()!r} expected={e[fin].flatten()[i].item()!r} "
                f"err={err.flatten()[i].item():.3e} bound={bound.flatten()[i].item():.3e} (dtype {dtype})")


def run_python(code: str, what: str, timeout: float = 300, env: Optional[Dict[str, str]] = None) -> None:
    """Runs `code` in a new Python process (the repository and tests/ on its
    path, `env` added to this process's environment); fails with its stderr
    if it exits non-zero or dies."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    child = {**os.environ, **(env or {})}
    child["PYTHONPATH"] = os.pathsep.join([tests, root, child.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=child, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{what}: exit code {proc.returncode}: {proc.stderr[-3000:]}"


def run_in_fresh_process(module: str, function: str) -> None:
    """Runs tests/<module>.py's `function` in a new Python process. For checks
    of process-wide state (the CUDA allocator's peak) that the tests before
    them in a process, or pytest-xdist workers' history, would blur."""
    run_python(f"import {module}\n{module}.{function}()\n", f"{module}.{function}")


def assert_cuda_memory_flat(step, warmup: int, calls: int) -> None:
    """After `warmup` calls of step(), `calls` more leave the allocated CUDA
    memory exactly where one call left it, and peak no higher than it did.

    The backward runs on the calling thread: with autograd's CUDA worker
    thread, what that thread frees after it wakes the caller (the graph it
    ran, and what only the graph held) can still be allocated when the next
    call starts, and by how much depends on the scheduling. Under a loaded
    CPU (8 pytest workers beside compute-sanitizer) the peak then came out
    higher than the first call's twice (H200 and H100, 2026-11-26), each time
    with the allocated memory back exactly, and run alone it passed."""
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        base, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base, (torch.cuda.memory_allocated(), base)
        assert torch.cuda.max_memory_allocated() == peak, (torch.cuda.max_memory_allocated(), peak)


@contextlib.contextmanager
def busy_side_stream():
    """A CUDA side stream, current inside the block, that is kept busy (about
    0.1 s) before anything the block issues: a kernel that strays to another
    stream runs before the block's earlier work (copies of its inputs) is
    done. Synchronized on exit."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        yield side
    side.synchronize()


def assert_same_under_deterministic_algorithms(run):
    """run() (a list of result tuples) gives bitwise the same results under
    torch.use_deterministic_algorithms(True), which must neither refuse the
    ops nor warn."""
    plain = run()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            det = run()
    finally:
        torch.use_deterministic_algorithms(before)
    for p, d in zip(plain, det):
        for a, b, what in zip(p, d, ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b, what)


def assert_bitwise_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    av, bv = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    # Compare the bits (NaN == NaN, -0 != +0).
    ai = av.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[av.element_size()])
    bi = bv.view(ai.dtype)
    assert torch.equal(ai, bi), f"{what}: not bitwise equal (max |diff| {(av.double() - bv.double()).abs().max().item()})"


# --------------------------------------------------------------------------
# inputs and layouts
# --------------------------------------------------------------------------

def apply_layout(t, layout):
    """A tensor with the logical shape of `t` in the given memory layout.

    'contiguous', 'sliced' ([..., ::2] of a wider buffer), 'transposed' (last
    two dims swapped in memory; the logical last dim stays the distribution
    dim), 'offset' (x_big[1:, ..., 3:], a view at a non-zero storage offset
    with padded rows) keep the values of `t`. 'expanded' keeps only the first
    distribution (t[0, ..., 0, :]) and broadcasts it (stride 0 on every
    leading dim): compute references from the returned tensor.
    """
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "sliced":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device) \
            if t.dim() else None
        if big is None:
            return t.clone()
        big[..., ::2] = t
        out = big[..., ::2]
        assert t.shape[-1] <= 1 or t.numel() == 0 or not out.is_contiguous()
        return out
    if layout == "transposed":
        if t.dim() < 2:
            return apply_layout(t, "sliced")
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return out
    if layout == "expanded":
        if t.dim() == 0:
            return t.clone()
        base = t[(0,) * (t.dim() - 1)].clone()
        if t.dim() > 1 and t.shape[0] % 2 == 0:
            # Half of the time broadcast from (1, V) rather than (V,).
            base = base.unsqueeze(0)
        return base.expand(t.shape)
    if layout == "offset":
        if t.dim() == 0:
            return t.clone()
        pad = [1] * (t.dim() - 1) + [3]
        big = torch.full([s + p for s, p in zip(t.shape, pad)], float("nan"), dtype=t.dtype, device=t.device)
        view = big[tuple(slice(p, None) for p in pad)]
        view.copy_(t)
        assert view.storage_offset() > 0
        return view
    raise ValueError(layout)


def make_logprobs(shape, dtype=torch.float32, device="cpu", scale=2.0):
    """log-softmax of random logits over the last dim (log-probabilities)."""
    if len(shape) == 0:
        return (torch.randn((), dtype=torch.float64) * scale).clamp(max=0).to(dtype).to(device)
    logits = torch.randn(shape, dtype=torch.float64) * scale
    return torch.log_softmax(logits, dim=-1).to(dtype).to(device)


def make_target(shape, log_target, dtype=torch.float32, device="cpu", scale=2.0, positive=True):
    """Probabilities (or log-probabilities, log_target=True) of random
    distributions over the last dim. With `positive`, no probability is exactly
    0 in `dtype` (underflows are replaced by the smallest positive value)."""
    lp = make_logprobs(shape, torch.float64, "cpu", scale)
    out = (lp if log_target else lp.exp()).to(dtype)
    if positive and not log_target:
        smallest = 2.0 ** -24 if dtype == torch.float16 else torch.finfo(dtype).tiny
        out = torch.where(out > 0, out, torch.full_like(out, smallest))
    return out.to(device)


def make_pair(shape, dtype, log_target, layout="contiguous", device="cpu", target_shape=None,
              x_layout=None, t_layout=None):
    x = make_logprobs(shape, dtype, device)
    t = make_target(shape if target_shape is None else target_shape, log_target, dtype, device)
    x = apply_layout(x, x_layout or layout)
    t = apply_layout(t, t_layout or layout)
    return x, t


def leaf(t, requires_grad=True):
    """A leaf tensor with the same values *and strides* as t."""
    return t.detach().requires_grad_(requires_grad)


def run_and_grad(fn, x, t, reduction, w=None):
    """loss = fn(x, t); the scalar to differentiate is loss (scalar reductions)
    or (loss * w).sum(). Returns (loss, grad_x, grad_t)."""
    x = leaf(x)
    t = leaf(t)
    loss = fn(x, t)
    obj = loss if w is None else (loss * w).sum()
    gx, gt = torch.autograd.grad(obj, (x, t))
    return loss.detach(), gx, gt


# --------------------------------------------------------------------------
# the full check of one call
# --------------------------------------------------------------------------

def _coarser(*dtypes):
    return max(dtypes, key=lambda d: EPS[d])


def _grad_tol(x, t, arg, rdtype):
    """Tolerance of the gradient of `arg`: its precision is the coarser of
    the result dtype and its own, part by part (of float16 and bfloat16,
    float16 has the finer spacing but the higher underflow floor); a
    broadcast argument's gradient is the sum of `n` rounded elements, so the
    absolute floor grows with n."""
    tol = {k: max(TOL[rdtype][k], TOL[arg.dtype][k]) for k in TOL[rdtype]}
    n = math.prod(torch.broadcast_shapes(x.shape, t.shape)) / max(arg.numel(), 1)
    tol["abs"] *= max(1.0, n)
    return tol


def check_against_reference(x, t, reduction, log_target, *, compare_torch=True, compare_cpu=False):
    """The full check of one call: value, dtype, shape against the float64
    reference and PyTorch (same device); gradients w.r.t. both arguments
    likewise. compare_cpu: also against the CPU kernel (for CUDA inputs)."""
    rdtype = torch.result_type(x, t)
    exp_val, exp_mag = ref_kl(x, t, reduction, log_target)
    w = torch.randn(exp_val.shape, dtype=rdtype, device=x.device) if reduction in ("none", "row") else None

    loss, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), x, t, reduction, w)
    assert loss.dtype == rdtype
    assert loss.shape == exp_val.shape
    assert_close_scaled(loss, exp_val, exp_mag, rdtype, what=f"loss[{reduction}]")

    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, reduction, log_target, w)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert gt.dtype == t.dtype and gt.shape == t.shape
    assert_close_scaled(gx, rgx, mgx, tol=_grad_tol(x, t, x, rdtype), what=f"grad_input[{reduction}]")
    assert_close_scaled(gt, rgt, mgt, tol=_grad_tol(x, t, t, rdtype), what=f"grad_target[{reduction}]")
    assert loss.device == gx.device == gt.device == x.device

    if compare_cpu:
        cl, cgx, cgt = run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), x.cpu(), t.cpu(), reduction,
                                    None if w is None else w.cpu())
        # Both kernels are within TOL of the truth: within twice of each other.
        tol2 = {k: 2 * v for k, v in TOL[rdtype].items()}
        assert_close_scaled(loss, cl.double(), exp_mag, tol=tol2, what=f"loss vs cpu[{reduction}]")
        assert_close_scaled(gx, cgx.double(), mgx, tol={k: 2 * v for k, v in TOL[_coarser(rdtype, x.dtype)].items()},
                            what=f"grad_input vs cpu[{reduction}]")
        assert_close_scaled(gt, cgt.double(), mgt, tol={k: 2 * v for k, v in TOL[_coarser(rdtype, t.dtype)].items()},
                            what=f"grad_target vs cpu[{reduction}]")

    if compare_torch:
        tl, tgx, tgt = run_and_grad(lambda a, b: torch_kl(a, b, reduction, log_target), x, t, reduction, w)
        assert tl.dtype == loss.dtype and tl.shape == loss.shape
        # PyTorch computes xlogy(t, t) / exp(t) in the target's own dtype
        # before promoting: its precision is that of the coarsest argument.
        ttol = TORCH_TOL[_coarser(rdtype, x.dtype, t.dtype)]
        if torch.isinf(tl).any() and not torch.isinf(exp_val.to(rdtype)).any():
            # PyTorch's low-precision sum overflowed an intermediate (it sums
            # in the input dtype before dividing); batchkl did not.
            return loss
        assert_close_scaled(loss, tl.double(), exp_mag, tol=ttol, what=f"loss vs torch[{reduction}]")
        if not log_target and (t.abs() < torch.finfo(t.dtype).tiny).any():
            # PyTorch's low-precision xlogy backward computes grad * t / t and
            # underflows for subnormal t; gradients are checked against the
            # float64 truth above.
            return loss
        assert_close_scaled(gx, tgx.double(), mgx, tol=TORCH_TOL[_coarser(rdtype, x.dtype, t.dtype)],
                            what=f"grad_input vs torch[{reduction}]")
        assert_close_scaled(gt, tgt.double(), mgt, tol=TORCH_TOL[_coarser(rdtype, x.dtype, t.dtype)],
                            what=f"grad_target vs torch[{reduction}]")
    return loss
