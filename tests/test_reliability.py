"""Reliability (SPEC.md section 3): every bad input gets a clear error naming
the argument, what was expected and what was received, raised by the C++ op
(so libtorch users get it too) and mirrored by the fake kernel; nothing is
printed; inputs are never modified; the NaN / inf policy against PyTorch;
determinism under torch.use_deterministic_algorithms; memory stays flat over
thousands of calls; several Python threads at once give the serial results
bitwise; more than 2**31 elements (opt-in: `huge` marker).

Both ops: torch.ops.batchkl.kl and torch.ops.batchkl.kl_with_logits."""
import gc
import math
import os
import re
import threading
import traceback

import pytest
import torch

import batchkl_ext
from conftest import (UNSUPPORTED_DEVICE, apply_layout, assert_bitwise_equal, assert_close_scaled,
                      assert_same_under_deterministic_algorithms, kl_op, leaf, make_pair)
from test_logits import LOGIT_REDUCTIONS, TOL as LOGITS_TOL, make_logits, make_mask, op as logits_op, ref_logits, \
    run_op, torch_composite

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------
# errors: argument, expected, received; from C++; nothing printed
# --------------------------------------------------------------------------

def _shape(*dims):
    """A shape as C++ ([3, 5]) or the fake kernel ((3, 5)) prints it."""
    inner = ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "")
    return r"[\[(]" + re.escape(inner).replace(",", ",?") + r"[\])]"


def _number(v):
    """A float as C++ (1.5, 0, -1, inf, nan) or Python (0.0, -1.0) prints it."""
    if math.isnan(v) or math.isinf(v):
        return "got -?" + str(v)
    return "got " + re.escape(f"{v:g}") + r"(\.0)?\b"


def _check_error(fn, exc, patterns, origin):
    """fn() raises exactly `exc` whose message matches every pattern; origin
    'cpp': raised inside the dispatcher (the op's TORCH_CHECK, no Python frame
    of batchkl_ext below it); 'fake': by the fake kernel (batchkl_ext/ops.py)."""
    with pytest.raises(Exception) as info:
        fn()
    e = info.value
    assert type(e) is exc, f"{type(e).__name__} (not {exc.__name__}): {e}"
    msg = str(e)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in the message: {msg}"
    last = traceback.extract_tb(e.__traceback__)[-1].filename
    if origin == "cpp":
        assert last.endswith(os.path.join("torch", "_ops.py")), f"raised in Python ({last}), not by the C++ op"
    else:
        assert last.endswith(os.path.join("batchkl_ext", "ops.py")), last


def _kl_bad_inputs():
    x, t = make_pair((3, 4), torch.float32, False)
    floating = ["floating-point", "float32, float64, float16 or bfloat16"]
    return {  # name: (input, target, reduction, exception, patterns)
        "shape": (x, torch.rand(3, 5), "sum", ValueError,
                  ["'input'", "'target'", _shape(3, 4), _shape(3, 5), "do not broadcast"]),
        "shape_leading": (torch.randn(2, 3, 4), torch.rand(3, 3, 4), "row", ValueError,
                          ["'input'", "'target'", _shape(2, 3, 4), _shape(3, 3, 4), "do not broadcast"]),
        "reduction": (x, t, "avg", ValueError,
                      ["argument 'reduction'", "'none', 'sum', 'mean', 'batchmean', 'row'", "got 'avg'"]),
        "int_input": (x.long(), t, "sum", TypeError, ["argument 'input'", *floating, "got (Long|torch.int64)"]),
        "int_target": (x, t.int(), "none", TypeError, ["argument 'target'", *floating, "got (Int|torch.int32)"]),
        "bool_target": (x, t > 0.2, "row", TypeError, ["argument 'target'", *floating, "got (Bool|torch.bool)"]),
        "row_0d": (torch.tensor(-1.0), torch.tensor(0.5), "row", ValueError,
                   ["reduction='row'", "at least one dimension", r"input of shape (\[\]|\(\))"]),
    }


def _kl_callers():
    def op_grad(x, t, r):
        return kl_op(leaf(x) if x.is_floating_point() else x, leaf(t) if t.is_floating_point() else t, r, False)

    return {  # name: (call, origin)
        "op": (lambda x, t, r: kl_op(x, t, r, False), "cpp"),
        "op_autograd": (op_grad, "cpp"),
        "kl_div": (lambda x, t, r: batchkl_ext.kl_div(x, t, reduction=r), "cpp"),
        "KLDivLoss": (lambda x, t, r: batchkl_ext.KLDivLoss(reduction=r)(x, t), "cpp"),
        "fake": (lambda x, t, r: kl_op(x.to("meta"), t.to("meta"), r, False), "fake"),
    }


@pytest.mark.parametrize("caller", list(_kl_callers()))
@pytest.mark.parametrize("case", list(_kl_bad_inputs()))
def test_kl_bad_input_errors(case, caller, capfd):
    x, t, reduction, exc, patterns = _kl_bad_inputs()[case]
    call, origin = _kl_callers()[caller]
    _check_error(lambda: call(x, t, reduction), exc, ["^batchkl.kl: ", *patterns], origin)
    assert capfd.readouterr() == ("", "")


def _logits_bad_inputs():
    x, t = make_logits((3, 5)), make_logits((3, 5))
    floating = ["floating-point", "float32, float64, float16 or bfloat16"]
    ones = torch.ones
    cases = {  # name: (input, target, op keyword arguments, exception, patterns)
        "shape_vocab": (x, make_logits((3, 6)), {}, ValueError,
                        ["'input' and 'target' must have the same shape", _shape(3, 5), _shape(3, 6)]),
        "shape_rows": (x, make_logits((2, 5)), {}, ValueError,
                       ["'input' and 'target' must have the same shape", _shape(3, 5), _shape(2, 5)]),
        "shape_broadcastable": (x, make_logits((5,)), {}, ValueError,
                                ["'input' and 'target' must have the same shape", _shape(3, 5), _shape(5)]),
        "0d": (torch.tensor(1.0), torch.tensor(2.0), {}, ValueError,
               ["'input' and 'target'", "at least one dimension", r"got shape (\[\]|\(\))"]),
        "reduction": (x, t, dict(reduction="avg"), ValueError,
                      ["argument 'reduction'", "'none', 'sum', 'mean', 'batchmean'", "got 'avg'"]),
        "reduction_row": (x, t, dict(reduction="row"), ValueError,
                          ["argument 'reduction'", "'none', 'sum', 'mean', 'batchmean'", "got 'row'"]),
        "int_input": (x.long(), t, {}, TypeError, ["argument 'input'", *floating, "got (Long|torch.int64)"]),
        "int_target": (x, t.to(torch.int32), {}, TypeError,
                       ["argument 'target'", *floating, "got (Int|torch.int32)"]),
        "mask_shape": (x, t, dict(mask=ones(4, dtype=torch.bool)), ValueError,
                       ["argument 'mask'", "row shape " + _shape(3), r"input\.shape\[:-1\]", "got " + _shape(4)]),
        "mask_elementwise": (x, t, dict(mask=ones(3, 5, dtype=torch.bool)), ValueError,
                             ["argument 'mask'", "row shape " + _shape(3), "got " + _shape(3, 5)]),
        "mask_float": (x, t, dict(mask=ones(3)), TypeError,
                       ["argument 'mask'", "bool tensor", "got (Float|torch.float32)"]),
        "mask_int": (x, t, dict(mask=ones(3, dtype=torch.long)), TypeError,
                     ["argument 'mask'", "bool tensor", "got (Long|torch.int64)"]),
        "num_items_shape": (x, t, dict(num_items_in_batch=ones(2)), ValueError,
                            ["argument 'num_items_in_batch'", "single number", _shape(2)]),
        "num_items_bool": (x, t, dict(num_items_in_batch=torch.tensor(True)), TypeError,
                           ["argument 'num_items_in_batch'", "real number", "got (Bool|torch.bool)"]),
    }
    for T in (0.0, -1.0, INF, NAN):
        cases[f"temperature={T}"] = (x, t, dict(temperature=T), ValueError,
                                     ["argument 'temperature'", "finite number > 0", _number(T)])
    for b in (-0.1, 1.5, INF, NAN):
        cases[f"beta={b}"] = (x, t, dict(beta=b), ValueError, ["argument 'beta'", r"in \[0, 1\]", _number(b)])
    return cases


def _logits_callers():
    def front_door(x, t, **kw):
        # Only what the front doors take (beta: jsd_with_logits; probs, dtype: the op).
        if "beta" in kw:
            return batchkl_ext.jsd_with_logits(x, t, **kw)
        return batchkl_ext.kl_div_with_logits(x, t, **kw)

    return {  # name: (call, origin)
        "op": (lambda x, t, **kw: logits_op(x, t, **kw), "cpp"),
        "op_autograd": (lambda x, t, **kw: logits_op(leaf(x) if x.is_floating_point() else x, t, **kw), "cpp"),
        "front_door": (front_door, "cpp"),
        "fake": (lambda x, t, **kw: logits_op(x.to("meta"), t.to("meta"),
                                              **{k: v.to("meta") if isinstance(v, torch.Tensor) else v
                                                 for k, v in kw.items()}), "fake"),
    }


@pytest.mark.parametrize("caller", list(_logits_callers()))
@pytest.mark.parametrize("case", list(_logits_bad_inputs()))
def test_kl_with_logits_bad_input_errors(case, caller, capfd):
    x, t, kw, exc, patterns = _logits_bad_inputs()[case]
    call, origin = _logits_callers()[caller]
    _check_error(lambda: call(x, t, **kw), exc, ["^batchkl.kl_with_logits: ", *patterns], origin)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("n", [0, -3, 0.0, -1e-9, NAN])
@pytest.mark.parametrize("front_door", ["kl_div_with_logits", "jsd_with_logits"])
def test_front_door_num_items_in_batch_must_be_positive(front_door, n, capfd):
    x, t = make_logits((3, 5)), make_logits((3, 5))
    fd = getattr(batchkl_ext, front_door)
    with pytest.raises(ValueError) as info:
        fd(x, t, num_items_in_batch=n)
    msg = str(info.value)
    assert "'num_items_in_batch'" in msg and "> 0" in msg and re.search(_number(float(n)), msg), msg
    assert capfd.readouterr() == ("", "")


CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _cpu_kernel(op, *args):
    """Call the op's CPU kernel itself (C++) with arguments on other devices:
    the only way to reach its device checks on a machine with one device."""
    return op.default.redispatch(CPU_KEYS, *args)


@pytest.mark.parametrize("which", ["input", "target"])
def test_two_devices_error_from_cpp_and_fake_kernel(which, capfd):
    x, t = make_pair((3, 4), torch.float32, False)
    xl, tl = make_logits((3, 4)), make_logits((3, 4))
    if which == "input":
        x, xl = x.to("meta"), xl.to("meta")
        got = "got input on meta and target on cpu"
    else:
        t, tl = t.to("meta"), tl.to("meta")
        got = "got input on cpu and target on meta"
    cases = [
        (lambda: _cpu_kernel(torch.ops.batchkl.kl, x, t, "sum", False), "batchkl.kl", "cpp"),
        (lambda: _cpu_kernel(torch.ops.batchkl.kl_with_logits, xl, tl, 0.0, 1.0, "batchmean", None, None, False,
                             None), "batchkl.kl_with_logits", "cpp"),
        (lambda: batchkl_ext.kl_div(x, t, reduction="sum"), "batchkl.kl", "fake"),
        (lambda: batchkl_ext.jsd_with_logits(xl, tl), "batchkl.kl_with_logits", "fake"),
    ]
    for fn, name, origin in cases:
        _check_error(fn, RuntimeError, [f"^{name}: 'input' and 'target' must be on the same device", got], origin)
    assert capfd.readouterr() == ("", "")


def test_mask_and_num_items_on_another_device_error_from_cpp():
    x, t = make_logits((3, 4)), make_logits((3, 4))
    m = torch.ones(3, dtype=torch.bool, device="meta")
    _check_error(lambda: _cpu_kernel(torch.ops.batchkl.kl_with_logits, x, t, 0.0, 1.0, "sum", m, None, False, None),
                 RuntimeError, ["argument 'mask'", "must be on cpu", "got meta"], "cpp")
    n = torch.tensor(4.0, device="meta")
    _check_error(lambda: _cpu_kernel(torch.ops.batchkl.kl_with_logits, x, t, 0.0, 1.0, "sum", None, n, False, None),
                 RuntimeError, ["argument 'num_items_in_batch'", "on the CPU or on cpu", "got meta"], "cpp")


def test_kl_with_logits_devices_without_a_kernel_name_the_device():
    # Devices without a kl_with_logits kernel (all but the CPU and, when built
    # with it, CUDA) land in the catch-all (CompositeExplicitAutograd) kernel,
    # called directly here.
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    x, t = make_logits((3, 4)), make_logits((3, 4))
    for op, args in [(torch.ops.batchkl.kl_with_logits.default, (x, t, 0.0, 1.0, "sum", None, None, False, None)),
                     (torch.ops.batchkl.kl_with_logits_fused.default,
                      (x, t, 0.0, 1.0, "sum", None, None, False, True, True, None))]:
        with pytest.raises(RuntimeError, match=r"batchkl.kl_with_logits: " + UNSUPPORTED_DEVICE + ", got tensors on cpu"):
            op.redispatch(keys, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_kl_with_logits_on_cuda_names_the_device(requires_grad):
    x = make_logits((3, 4)).cuda().requires_grad_(requires_grad)
    t = make_logits((3, 4)).cuda()
    with pytest.raises(RuntimeError, match=r"batchkl.kl_with_logits: no kernel for tensors on cuda"):
        batchkl_ext.kl_div_with_logits(x, t)


# --------------------------------------------------------------------------
# inputs never modified, never None (kl_with_logits; kl: test_kl_api.py)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_kl_with_logits_inputs_not_modified(reduction, masked, capfd):
    for layout in ("contiguous", "transposed", "expanded", "offset"):
        for dtype in (torch.float32, torch.bfloat16):
            x = apply_layout(make_logits((4, 3, 40), dtype), layout)
            t = apply_layout(make_logits((4, 3, 40), dtype), layout)
            mask = make_mask((4, 3), "random") if masked else None
            n = torch.tensor(7.0)
            before = [v.clone() for v in (x, t, n)] + ([mask.clone()] if masked else [])
            xl, tl = leaf(x), leaf(t)
            for kw in (dict(beta=0.0), dict(beta=0.4, temperature=2.0), dict(beta=1.0, num_items_in_batch=n)):
                out = logits_op(xl, tl, reduction=reduction, mask=mask, **kw)
                assert isinstance(out, torch.Tensor)
                (out * torch.rand_like(out)).sum().backward()
            assert xl.grad is not None and tl.grad is not None
            assert xl.grad.data_ptr() not in (xl.data_ptr(), tl.data_ptr(), tl.grad.data_ptr())
            for fd in (batchkl_ext.kl_div_with_logits, batchkl_ext.jsd_with_logits):
                assert isinstance(fd(x, t, reduction=reduction, mask=mask, num_items_in_batch=n), torch.Tensor)
            assert isinstance(batchkl_ext.kl_divergence(x.exp(), t.exp()), torch.Tensor)
            after = [xl, tl, n] + ([mask] if masked else [])
            for name, b, a in zip(("input", "target", "num_items_in_batch", "mask"), before, after):
                assert_bitwise_equal(a, b, f"{name} modified ({layout}, {dtype})")
    assert capfd.readouterr() == ("", "")


# --------------------------------------------------------------------------
# NaN / inf policy, against PyTorch
# --------------------------------------------------------------------------

def _policy_rows(dtype):
    """Rows of (student, teacher) logits, one per policy case."""
    V = 37
    x, t = make_logits((8, V), dtype), make_logits((8, V), dtype)
    x[1, 5] = NAN                      # NaN in the student
    t[2, 0] = NAN                      # NaN in the teacher
    x[3, 7] = INF                      # +inf logit (student)
    t[4, 9] = INF                      # +inf logit (teacher)
    x[5], t[5] = -INF, -INF            # a kept row with no distribution
    x[6, :10], t[6, :10] = -INF, -INF  # masked vocabulary entries: legal, finite
    x[7, 3] = -INF                     # student probability 0 where the teacher's is not
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nan_inf_policy_matches_pytorch(dtype):
    """Per-row results and gradient rows: NaN where PyTorch's composite
    formula is NaN, except for the -inf entries the zero-probability rule
    covers (row 6: PyTorch NaN, batchkl finite); +inf where it is +inf; a
    masked-out row is 0 with 0 gradients whatever it holds."""
    x, t = _policy_rows(dtype)
    w = torch.ones(8, dtype=dtype)
    loss, gx, gt = run_op(lambda a, b: logits_op(a, b, reduction="none"), x, t, w=w)
    ref, rgx, rgt = run_op(lambda a, b: torch_composite(a, b, reduction="none"), x, t, w=w)
    nan_rows = [1, 2, 3, 4, 5]
    assert torch.isnan(loss).nonzero().flatten().tolist() == nan_rows
    assert torch.isnan(ref).nonzero().flatten().tolist() == nan_rows + [6], "PyTorch: NaN also for row 6"
    assert loss[7] == INF and ref[7] == INF
    assert torch.isfinite(loss[[0, 6]]).all()
    for g, name in ((gx, "grad_input"), (gt, "grad_target")):
        assert torch.isnan(g[nan_rows]).all(), f"{name}: a NaN row has NaN gradients"
        assert torch.isfinite(g[[0, 6]]).all(), name
    for g, r in ((gx, rgx), (gt, rgt)):
        assert torch.isnan(r[[1, 2, 3, 4, 5]]).all()     # the same in PyTorch
    assert (gx[6, :10] == 0).all() and (gt[6, :10] == 0).all()
    # scalar reductions: NaN if any kept row is NaN; a mask makes them finite again
    for red in ("sum", "mean", "batchmean"):
        assert torch.isnan(logits_op(x, t, reduction=red))
        keep = torch.tensor([True, False, False, False, False, False, True, False])
        out, mgx, mgt = run_op(lambda a, b: logits_op(a, b, reduction=red, mask=keep), x, t)
        assert torch.isfinite(out) and torch.isfinite(mgx).all() and torch.isfinite(mgt).all()
        assert (mgx[~keep] == 0).all() and (mgt[~keep] == 0).all()
    # the drop-in: NaN in, NaN out; +inf input gives -inf as PyTorch; t = 0 gives 0 (the rule)
    xi = torch.tensor([[NAN, -1.0, -1.0], [INF, -1.0, -1.0], [-INF, -1.0, -1.0]], dtype=dtype)
    ti = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]], dtype=dtype)
    rows = kl_op(xi, ti, "row", False)
    theirs = torch.nn.functional.kl_div(xi, ti, reduction="none").sum(-1)
    assert torch.isnan(rows[0]) and torch.isnan(theirs[0])
    assert rows[1] == theirs[1] == -INF
    assert torch.isfinite(rows[2]) and torch.isnan(theirs[2])    # the zero-probability rule


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------

def test_kl_with_logits_under_deterministic_algorithms():
    """Not refused, no warning, and bitwise the same results as without the mode."""
    x, t = make_logits((16, 3, 500)), make_logits((16, 3, 500))
    mask = make_mask((16, 3), "random")
    calls = [dict(beta=b, temperature=T, reduction=r, mask=m) for b in (0.0, 0.5, 1.0) for T in (1.0, 2.0)
             for r in LOGIT_REDUCTIONS for m in (None, mask)]

    def run_all():
        return [run_op(lambda a, b: logits_op(a, b, **kw), x, t,
                       w=torch.ones(16, 3) if kw["reduction"] == "none" else None) for kw in calls]

    assert_same_under_deterministic_algorithms(run_all)


# --------------------------------------------------------------------------
# memory flat over thousands of calls; several Python threads at once
# --------------------------------------------------------------------------

def _workloads():
    """Forward + backward of both ops in their main configurations; each call
    returns (loss, gradients...) as new tensors."""
    x32, t32 = make_logits((16, 1000)), make_logits((16, 1000))
    xb, tb = make_logits((4, 3, 700), torch.bfloat16), make_logits((4, 3, 700), torch.bfloat16)
    mask = make_mask((4, 3), "random")
    lp, p = make_pair((16, 1000), torch.float32, False)
    lpb, ltb = make_pair((2, 3, 800), torch.bfloat16, True, layout="transposed")
    n = torch.tensor(9)

    def grads(loss, *args):
        # an upstream gradient that is not 1 (and not random: the same every call)
        w = (torch.arange(loss.numel()) % 3 + 0.5).reshape(loss.shape).to(loss.dtype) if loss.dim() else None
        return (loss.detach(), *torch.autograd.grad(loss, args, w))

    def run(fn, *inputs):
        args = [leaf(v) for v in inputs]
        return grads(fn(*args), *args)

    return [
        lambda: run(lambda a, b: logits_op(a, b, beta=0.0, temperature=2.0), x32, t32),
        lambda: run(lambda a, b: logits_op(a, b, beta=0.5, reduction="none", mask=mask), xb, tb),
        lambda: run(lambda a, b: batchkl_ext.jsd_with_logits(a, b, beta=1.0, mask=mask, num_items_in_batch=n), xb, tb),
        lambda: run(lambda a, b: kl_op(a, b, "batchmean", False), lp, p),
        lambda: run(lambda a, b: kl_op(a, b, "row", True), lpb, ltb),
        lambda: run(lambda a, b: kl_op(a, b, "none", False), lp, p),
        lambda: run(lambda a, b: batchkl_ext.kl_divergence(a, b), p, p.flip(-1)),
    ]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc")
def test_memory_stays_flat_over_thousands_of_calls():
    """4000 forward + backward calls of both ops (seven configurations, 64 KiB
    to 250 KiB of gradients each): after a warm-up, the resident memory must
    not grow with the number of calls. Measured here: under 0.1 MiB of growth
    without a leak, 47 MiB per 1000 calls when each call's gradient is kept;
    the bound, 8 MiB over the last 3000 calls, catches any leak of 3 KiB or
    more per call."""
    work = _workloads()
    for _ in range(50):
        for f in work:
            f()
    gc.collect()
    marks = []
    for _ in range(4):
        for _ in range(1000 // len(work) + 1):
            for f in work:
                f()
        gc.collect()
        marks.append(_rss_bytes())
    growth = max(marks[1:]) - marks[0]
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 3000 calls: {marks}"


def test_several_python_threads_at_once_bitwise_equal_to_serial():
    """Four Python threads call both ops (forward + backward) concurrently,
    each in its own order, with intra-op parallelism on: every result is
    bitwise the serial one."""
    torch.set_num_threads(2)
    work = _workloads()
    serial = [f() for f in work]
    errors, start = [], threading.Barrier(4)

    def worker(k):
        try:
            start.wait()
            for it in range(100):
                for i in (range(len(work)) if (k + it) % 2 else reversed(range(len(work)))):
                    for a, b in zip(work[i](), serial[i]):
                        assert_bitwise_equal(a, b, f"thread {k} iteration {it} workload {i}")
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors[0]


# --------------------------------------------------------------------------
# 64-bit indexing: more than 2**31 elements (opt-in)
# --------------------------------------------------------------------------

def _repeat_rows(row, rows):
    """`row` repeated `rows` times, contiguous: a fill by doubling (a few
    large memcpys) rather than randn or a broadcasting copy."""
    out = torch.empty(rows, row.numel(), dtype=row.dtype)
    out[0] = row
    done = 1
    while done < rows:
        k = min(done, rows - done)
        out[done:done + k] = out[:k]
        done += k
    return out


@pytest.mark.huge
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_kl_with_logits_more_than_2_pow_31_elements(device):
    """(2**21 + 1, 1024) bfloat16 logits, 4 GiB per input: the last row starts
    at element 2**31, past what 32-bit offsets reach. Its per-row loss and gradient rows (w.r.t. input, then
    w.r.t. target) equal the float64 reference and are bitwise those of the
    row computed alone; the 'sum' of all rows equals the sum of the per-row
    values. Peak memory about 12 GiB (two inputs and one gradient)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cuda" and torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs about 16 GiB of free GPU memory")
    rows, V = 2**21 + 1, 1024
    dtype = torch.bfloat16
    base_x, base_t = make_logits((V,), dtype), make_logits((V,), dtype)
    last_x, last_t = make_logits((V,), dtype, scale=5.0), make_logits((V,), dtype, scale=5.0)
    x, t = _repeat_rows(base_x, rows), _repeat_rows(base_t, rows)
    x[-1], t[-1] = last_x, last_t
    x, t = x.to(device), t.to(device)
    assert x.numel() > 2**31 and x.stride(0) * (rows - 1) >= 2**31
    w = torch.ones(rows, dtype=dtype, device=device)
    w[-1] = 0.75

    for beta, grad_of in ((0.5, "input"), (1.0, "target")):
        kw = dict(beta=beta, temperature=2.0, reduction="none")
        leaf_ = x if grad_of == "input" else t
        leaf_.requires_grad_(True)
        per_row = logits_op(x, t, **kw)
        (grad,) = torch.autograd.grad(per_row, leaf_, w)
        leaf_.requires_grad_(False)
        per_row = per_row.detach()
        assert per_row.shape == (rows,) and grad.shape == (rows, V)
        # the last row alone, in float64 and through the op
        ref = ref_logits(last_x[None], last_t[None], w=w[-1:].cpu(), **kw)
        alone, agx, agt = run_op(lambda a, b: logits_op(a, b, **kw), last_x[None].to(device),
                                 last_t[None].to(device), w=w[-1:])
        assert_close_scaled(per_row[-1:].cpu(), ref.loss, ref.loss_mag, tol=LOGITS_TOL[dtype], what="last row")
        assert_bitwise_equal(per_row[-1:], alone, "last row vs alone")
        assert_bitwise_equal(per_row[:-1].unique(), per_row[:1], "the other rows")
        exp, mag, got_alone = (ref.gx, ref.gx_mag, agx) if grad_of == "input" else (ref.gt, ref.gt_mag, agt)
        assert_close_scaled(grad[-1:].cpu(), exp, mag, tol=LOGITS_TOL[dtype], what=f"grad_{grad_of} last row")
        assert_bitwise_equal(grad[-1:], got_alone, f"grad_{grad_of} last row vs alone")
        assert_bitwise_equal(grad[-2], grad[0], f"grad_{grad_of} row -2 vs row 0")
        del grad
    total = logits_op(x, t, beta=0.0, reduction="sum")
    rows_sum = logits_op(x, t, beta=0.0, reduction="none").double().sum()
    torch.testing.assert_close(total.double(), rows_sum, rtol=1e-5, atol=0)
