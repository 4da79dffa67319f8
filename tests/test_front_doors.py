"""The Python front doors (batchkl_ext/ops.py) where they add behaviour of
their own on top of the ops: jsd_with_logits' per-row 'batchmean' (1-D, 3-D,
4-D input; under torch.export, torch.jit.trace and torch.compile), the legacy
size_average / reduce flags and reduction='elementwise_mean' of kl_div /
KLDivLoss (eager warnings as F.kl_div's, torch.compile, TorchScript), and the
errors for arguments of the wrong type.

Fresh random inputs each test; references are PyTorch (F.kl_div,
nn.KLDivLoss) or TRL's generalized JSD written in float64, gradients from
torch.autograd.
"""
import fractions
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import batchkl_ext
from conftest import assert_bitwise_equal, leaf, make_pair

ELEMENTWISE_MEAN_WARNING = "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."


def _logits(shape, dtype=torch.float32):
    return (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)


def _jsd_rows64(x, t, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss per row, in float64."""
    lq = F.log_softmax(x.double() / temperature, -1)
    lp = F.log_softmax(t.double() / temperature, -1)
    if beta == 0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1:
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), 0)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def _jsd_batchmean64(x, t, beta, temperature):
    """TRL's unmasked 'batchmean': the mean over rows (tokens)."""
    rows = _jsd_rows64(x, t, beta, temperature)
    return rows.sum() / max(rows.numel(), 1) if rows.numel() else rows.sum() / 0.0


def _loss_and_grads(fn, x, t):
    xl, tl = leaf(x), leaf(t)
    loss = fn(xl, tl)
    gx, gt = torch.autograd.grad(loss * 1.5, (xl, tl))
    return loss.detach(), gx, gt


def _assert_same_as(reference, fn, x, t, what):
    """fn's loss and gradients bitwise reference's; returns the loss."""
    got, ggx, ggt = _loss_and_grads(fn, x, t)
    want, wgx, wgt = _loss_and_grads(reference, x, t)
    assert_bitwise_equal(got, want, what)
    assert_bitwise_equal(ggx, wgx, what + " grad input")
    assert_bitwise_equal(ggt, wgt, what + " grad target")
    return got


def _check_against_trl(x, t, beta, temperature, fn, rtol):
    loss, gx, gt = _loss_and_grads(fn, x, t)
    ref, rgx, rgt = _loss_and_grads(lambda a, b: _jsd_batchmean64(a, b, beta, temperature), x.double(), t.double())
    assert loss.shape == () and loss.dtype == x.dtype
    assert gx.shape == x.shape and gt.shape == t.shape
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(gt.double(), rgt, rtol=rtol, atol=1e-7)
    return loss, gx, gt


# --------------------------------------------------------------------------
# jsd_with_logits: 'batchmean' is the mean over rows, whatever the rank
# --------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_jsd_one_row_batchmean_is_that_row(beta, dtype):
    """A (V,) input is one distribution pair: 'batchmean' divides by 1 row
    (it divided by V), as the same row given as (1, V), as (1, 1, V), with
    mask=torch.tensor(True), and as TRL's formula."""
    V = int(torch.randint(2, 300, ()))
    s, t = _logits((V,), dtype), _logits((V,), dtype)
    T = float(torch.empty(()).uniform_(0.5, 2.0))
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    loss, gx, gt = _check_against_trl(s, t, beta, T, lambda a, b: batchkl_ext.jsd_with_logits(a, b, beta=beta,
                                                                                              temperature=T), rtol)
    assert_bitwise_equal(loss, batchkl_ext.jsd_with_logits(s, t, beta=beta, temperature=T, reduction="sum"))
    for variant in (lambda a, b: batchkl_ext.jsd_with_logits(a[None], b[None], beta=beta, temperature=T),
                    lambda a, b: batchkl_ext.jsd_with_logits(a[None, None], b[None, None], beta=beta, temperature=T),
                    lambda a, b: batchkl_ext.jsd_with_logits(a, b, beta=beta, temperature=T,
                                                             mask=torch.tensor(True))):
        vl, vgx, vgt = _loss_and_grads(variant, s, t)
        assert_bitwise_equal(vl, loss, "1-row variant")
        assert_bitwise_equal(vgx, gx, "1-row variant grad input")
        assert_bitwise_equal(vgt, gt, "1-row variant grad target")


@pytest.mark.parametrize("shape", [(2, 3, 4, 17), (3, 1, 2, 2, 5), (4, 6, 9)], ids=["4d", "5d", "3d"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8])
def test_jsd_batchmean_divides_by_all_rows(shape, beta):
    """(..., V) with any number of leading dims: the sum over rows / numel / V
    (TRL would divide a 4-D input by B * H), values and both gradients."""
    x, t = _logits(shape), _logits(shape)
    _check_against_trl(x, t, beta, 1.3, lambda a, b: batchkl_ext.jsd_with_logits(a, b, beta=beta, temperature=1.3),
                       2e-5)


def test_jsd_batchmean_empty():
    """Rows of no columns are still rows: (2, 3, 0) gives 0 / 6 = 0, as
    (6, 0) does (it gave 0 / 0 = NaN); no rows at all gives NaN (0 / 0), as
    TRL's formula and F.kl_div do."""
    for shape in ((2, 3, 0), (6, 0), (0,)):
        x, t = _logits(shape), _logits(shape)
        loss, gx, gt = _loss_and_grads(batchkl_ext.jsd_with_logits, x, t)
        assert loss.item() == 0.0 and gx.shape == x.shape and gt.shape == t.shape, shape
    for shape in ((0, 3, 5), (2, 0, 5)):
        x, t = _logits(shape), _logits(shape)
        assert math.isnan(batchkl_ext.jsd_with_logits(x, t).item()), shape


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [o.numel() for o in outs if isinstance(o, torch.Tensor)]))
        if "batchkl" in str(func):
            self.operands = [(a.data_ptr(), a.shape, a.stride()) for a in args[:2]]
        return out


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced", "expanded"])
@pytest.mark.parametrize("rank", [1, 3, 4])
def test_jsd_batchmean_makes_no_copy_and_equals_the_op(layout, rank):
    """The front door adds nothing of size N x V: the op reads the logits in
    their own layout (a permuted batch cannot be viewed as (N, V) and must not
    be copied to be), its result and gradients (values, shapes, strides) are
    bitwise the op's with num_items_in_batch = the number of rows."""
    V = 23
    shape = {1: (V,), 3: (3, 4, V), 4: (2, 3, 2, V)}[rank]

    def make():
        if layout == "permuted" and rank > 1:
            return _logits(shape[:-1][::-1] + (V,)).permute(*range(rank - 2, -1, -1), rank - 1)
        if layout == "sliced":
            return _logits(shape[:-1] + (V + 5,))[..., 2:V + 2]
        if layout == "expanded" and rank > 1:
            return _logits((1,) + shape[1:]).expand(shape)
        return _logits(shape)

    x, t = make(), make()
    assert x.shape == shape
    rows = math.prod(shape[:-1])
    xl, tl = leaf(x), leaf(t)
    with _OpLog() as log:
        loss = batchkl_ext.jsd_with_logits(xl, tl, beta=0.4)
    # What the front door runs besides the op makes numbers (the row count),
    # nothing of the logits' size; the op is called once, on the logits as given.
    assert all(n == 1 for name, sizes in log.calls if "batchkl" not in name for n in sizes), log.calls
    assert [name for name, _ in log.calls if "batchkl" in name] == ["batchkl.kl_with_logits_fused.default"]
    assert log.operands == [(a.data_ptr(), a.shape, a.stride()) for a in (xl, tl)]
    gx, gt = torch.autograd.grad(loss, (xl, tl))
    xo, to = leaf(x), leaf(t)
    want = torch.ops.batchkl.kl_with_logits(xo, to, 0.4, 1.0, "batchmean", None,
                                            torch.tensor(float(rows), dtype=torch.float64))
    wgx, wgt = torch.autograd.grad(want, (xo, to))
    assert_bitwise_equal(loss, want)
    for g, w in ((gx, wgx), (gt, wgt)):
        assert_bitwise_equal(g, w)
        assert g.stride() == w.stride()
    torch.testing.assert_close(loss.double(), _jsd_batchmean64(x, t, 0.4, 1.0), rtol=2e-5, atol=1e-7)


class _JSD(nn.Module):
    def forward(self, s, t):
        return batchkl_ext.jsd_with_logits(s, t, beta=0.3)


@pytest.mark.compile
def test_jsd_batchmean_export_dynamic_batch_and_sequence():
    """torch.export with dynamic batch and sequence dims: it failed ("specialized
    it to be a constant"); the exported program divides by B * T of the sizes it
    runs at, with the op's gradients."""
    V = 31
    b, s = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(_JSD(), (_logits((4, 3, V)), _logits((4, 3, V))),
                             dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    assert "batchkl.kl_with_logits" in str(ep.graph)
    for B, T in ((7, 5), (2, 9), (4, 3)):
        x, t = _logits((B, T, V)), _logits((B, T, V))
        got = _assert_same_as(_JSD(), ep.module(), x, t, f"exported at ({B}, {T})")
        torch.testing.assert_close(got.double(), _jsd_batchmean64(x, t, 0.3, 1.0), rtol=2e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jsd_batchmean_jit_trace_other_shapes():
    """torch.jit.trace records the row count from the sizes (it baked in the
    traced shape's: traced at (2, 3, V), run at (4, 5, V), the value was off
    by 20 / 6)."""
    V = 33
    traced = torch.jit.trace(lambda a, c: batchkl_ext.jsd_with_logits(a, c), (_logits((2, 3, V)), _logits((2, 3, V))))
    for shape in ((4, 5, V), (1, 7, V), (2, 3, V)):
        x, t = _logits(shape), _logits(shape)
        _assert_same_as(batchkl_ext.jsd_with_logits, traced, x, t, f"traced, run at {shape}")


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_jsd_batchmean_compile_fullgraph(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(batchkl_ext.jsd_with_logits, fullgraph=True, dynamic=dynamic, backend=counter)
    V = 19
    for shape in ((3, 4, V), (5, 2, V), (6, 7, V), (V,), (2, 2, 3, V)):
        x, t = _logits(shape), _logits(shape)
        _assert_same_as(batchkl_ext.jsd_with_logits, compiled, x, t, f"compiled at {shape}")
        if shape == (3, 4, V):
            first = counter.frame_count
        if dynamic and shape == (6, 7, V):
            assert counter.frame_count == first, "dynamic=True should not recompile for new (B, T)"
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# kl_div: legacy size_average / reduce under torch.compile
# --------------------------------------------------------------------------

_LEGACY = [c for c in itertools.product([None, True, False], repeat=2) if c != (None, None)]


@pytest.mark.compile
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("size_average,reduce", _LEGACY)
def test_legacy_flags_compile_fullgraph(size_average, reduce, reduction):
    """It failed under fullgraph=True ("torch.* op returned non-Tensor": dynamo
    took torch.nn._reduction.legacy_get_string for an op); F.kl_div compiles.
    Values and gradients equal F.kl_div's; no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    kw = dict(size_average=size_average, reduce=reduce, reduction=reduction)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b: batchkl_ext.kl_div(a, b, **kw), fullgraph=True, backend=counter)
    x, t = make_pair((4, 11), torch.float64, False)
    w = torch.randn(x.shape, dtype=torch.float64)
    res = []
    for fn in (compiled, lambda a, b: F.kl_div(a, b, **kw)):
        xl, tl = leaf(x), leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(xl, tl)
        (out * w).sum().backward() if out.dim() else (out * 1.7).backward()
        res.append((out.detach(), xl.grad, tl.grad))
    assert counter.frame_count == 1
    for a, b in zip(*res):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none", "elementwise_mean"])
@pytest.mark.parametrize("size_average,reduce", _LEGACY)
def test_legacy_flags_eager_warnings_are_torch(size_average, reduce, reduction):
    """The plain-Python legacy_get_string warns as torch's does (category and
    text), once, and gives F.kl_div's result."""
    x, t = make_pair((3, 8), torch.float64, False)
    kw = dict(size_average=size_average, reduce=reduce, reduction=reduction)
    ours, ow = _record(lambda: batchkl_ext.kl_div(x, t, **kw))
    theirs, tw = _record(lambda: F.kl_div(x, t, **kw))
    assert ow == tw and len(ow) == 1 and ow[0][0] is UserWarning
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# reduction='elementwise_mean': PyTorch's deprecated alias of 'mean'
# --------------------------------------------------------------------------

def test_elementwise_mean_warning_text_is_torch():
    with pytest.warns(UserWarning) as caught:
        torch.nn._reduction.get_enum("elementwise_mean")
    assert [str(w.message) for w in caught] == [ELEMENTWISE_MEAN_WARNING]


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("front_door", ["kl_div", "module"])
def test_elementwise_mean_is_torch_mean(front_door, log_target):
    """Accepted as F.kl_div / nn.KLDivLoss accept it (it was a ValueError):
    'mean''s value and gradients, PyTorch's deprecation warning and not the
    'mean' one, as F.kl_div."""
    x, t = make_pair((5, 3, 13), torch.float32, log_target)
    if front_door == "kl_div":
        ours_fn = lambda a, b: batchkl_ext.kl_div(a, b, reduction="elementwise_mean", log_target=log_target)  # noqa
        theirs_fn = lambda a, b: F.kl_div(a, b, reduction="elementwise_mean", log_target=log_target)  # noqa
    else:
        ours_fn = batchkl_ext.KLDivLoss(reduction="elementwise_mean", log_target=log_target)
        theirs_fn = nn.KLDivLoss(reduction="elementwise_mean", log_target=log_target)
        assert ours_fn.reduction == theirs_fn.reduction == "elementwise_mean"
    res = []
    for fn in (ours_fn, theirs_fn):
        xl, tl = leaf(x), leaf(t)
        out, caught = _record(lambda: fn(xl, tl))
        (out * 2.5).backward()
        res.append((out.detach(), xl.grad, tl.grad, caught))
    (o, gx, gt, ow), (e, egx, egt, ew) = res
    assert ow == ew == [(UserWarning, ELEMENTWISE_MEAN_WARNING)]
    assert o.shape == e.shape == () and o.dtype == e.dtype
    torch.testing.assert_close(o, e, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(gx, egx, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(gt, egt, rtol=2e-6, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_bitwise_equal(o, batchkl_ext.kl_div(x, t, reduction="mean", log_target=log_target))


def test_elementwise_mean_warning_points_at_the_caller():
    x, t = make_pair((3, 4), torch.float32, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batchkl_ext.kl_div(x, t, reduction="elementwise_mean")
    assert len(caught) == 1 and caught[0].filename == __file__


def test_elementwise_mean_op_stays_strict():
    x, t = make_pair((3, 4), torch.float32, False)
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.batchkl.kl(x, t, "elementwise_mean", False)


@pytest.mark.compile
def test_elementwise_mean_compile_fullgraph():
    torch._dynamo.reset()
    x, t = make_pair((4, 9), torch.float32, False)
    m = batchkl_ext.KLDivLoss(reduction="elementwise_mean")
    compiled = torch.compile(lambda a, b: batchkl_ext.kl_div(a, b, reduction="elementwise_mean") + m(a, b),
                             fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(x, t), 2 * F.kl_div(x, t, reduction="mean"), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_elementwise_mean_torchscript():
    """KLDivLoss's TorchScript branch: as the scripted nn.KLDivLoss, value and
    warning."""
    class Head(nn.Module):
        def __init__(self, crit):
            super().__init__()
            self.crit = crit

        def forward(self, x, t):
            return self.crit(x.log_softmax(-1), t)

    x = torch.randn(4, 7, dtype=torch.float64)
    t = torch.randn(4, 7, dtype=torch.float64).softmax(-1)
    ours = torch.jit.script(Head(batchkl_ext.KLDivLoss(reduction="elementwise_mean")))
    theirs = torch.jit.script(Head(nn.KLDivLoss(reduction="elementwise_mean")))
    got, gw = _record(lambda: ours(x, t))
    want, ww = _record(lambda: theirs(x, t))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert [m for _, m in gw] == [m for _, m in ww] == [ELEMENTWISE_MEAN_WARNING]
    assert_bitwise_equal(got, _record(lambda: Head(batchkl_ext.KLDivLoss(reduction="elementwise_mean"))(x, t))[0])


# --------------------------------------------------------------------------
# argument errors: name the argument, what was expected, what arrived
# --------------------------------------------------------------------------

def _bad_argument_cases():
    s, t = _logits((2, 3, 5)), _logits((2, 3, 5))
    p, q = s.softmax(-1), t.softmax(-1)
    B = batchkl_ext
    return [
        ("jsd beta=None", lambda: B.jsd_with_logits(s, t, beta=None), TypeError, r"'beta'.*real number.*NoneType"),
        ("jsd beta='0.5'", lambda: B.jsd_with_logits(s, t, beta="0.5"), TypeError, r"'beta'.*real number.*str"),
        ("jsd beta=True", lambda: B.jsd_with_logits(s, t, beta=True), TypeError, r"'beta'.*real number.*bool"),
        ("jsd beta=[0.5]", lambda: B.jsd_with_logits(s, t, beta=[0.5]), TypeError, r"'beta'.*real number.*list"),
        ("jsd beta=1j", lambda: B.jsd_with_logits(s, t, beta=0.5j), TypeError, r"'beta'.*real number.*complex"),
        ("jsd beta=tensor([.1,.2])", lambda: B.jsd_with_logits(s, t, beta=torch.tensor([0.1, 0.2])), ValueError,
         r"'beta'.*single number.*shape \(2,\)"),
        ("jsd beta=tensor(True)", lambda: B.jsd_with_logits(s, t, beta=torch.tensor(True)), TypeError,
         r"'beta'.*real number.*torch.bool"),
        ("jsd temperature=None", lambda: B.jsd_with_logits(s, t, temperature=None), TypeError,
         r"'temperature'.*real number.*NoneType"),
        ("kl temperature=None", lambda: B.kl_div_with_logits(s, t, temperature=None), TypeError,
         r"'temperature'.*real number.*NoneType"),
        ("kl temperature='2'", lambda: B.kl_div_with_logits(s, t, temperature="2"), TypeError,
         r"'temperature'.*real number.*str"),
        ("kl temperature=tensor([2.,1.])", lambda: B.kl_div_with_logits(s, t, temperature=torch.tensor([2., 1.])),
         ValueError, r"'temperature'.*single number.*shape \(2,\)"),
        ("kl temperature=tensor(2+0j)", lambda: B.kl_div_with_logits(s, t, temperature=torch.tensor(2 + 0j)),
         TypeError, r"'temperature'.*real number.*complex"),
        ("kd dim=None", lambda: B.kl_divergence(p, q, dim=None), TypeError, r"'dim'.*int.*NoneType"),
        ("kd dim=1.0", lambda: B.kl_divergence(p, q, dim=1.0), TypeError, r"'dim'.*int.*float"),
        ("kd dim='1'", lambda: B.kl_divergence(p, q, dim="1"), TypeError, r"'dim'.*int.*str"),
        ("kd dim=True", lambda: B.kl_divergence(p, q, dim=True), TypeError, r"'dim'.*int.*bool"),
        ("kd dim=3", lambda: B.kl_divergence(p, q, dim=3), IndexError, r"'dim'.*\[-3, 2\].*got 3"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_argument_cases())), ids=[c[0] for c in _bad_argument_cases()])
def test_bad_argument_errors_name_it(case):
    _, fn, exc, pattern = _bad_argument_cases()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_real_number_arguments_accepted():
    """ints, floats, numpy and fractions numbers, and one-element tensors give
    what the equal float gives; any int type for kl_divergence's dim."""
    s, t = _logits((3, 4, 9)), _logits((3, 4, 9))
    base_jsd = batchkl_ext.jsd_with_logits(s, t, beta=0.5, temperature=2.0)
    for beta, temperature in [(0.5, 2), (np.float64(0.5), np.float32(2.0)), (fractions.Fraction(1, 2), 2.0),
                              (torch.tensor(0.5), torch.tensor([2.0])), (torch.tensor([[0.5]]), torch.tensor(2))]:
        assert_bitwise_equal(batchkl_ext.jsd_with_logits(s, t, beta=beta, temperature=temperature), base_jsd)
    assert_bitwise_equal(batchkl_ext.jsd_with_logits(s, t, beta=1), batchkl_ext.jsd_with_logits(s, t, beta=1.0))
    assert_bitwise_equal(batchkl_ext.kl_div_with_logits(s, t, temperature=np.int64(3)),
                         batchkl_ext.kl_div_with_logits(s, t, temperature=3.0))
    p, q = s.softmax(-1), t.softmax(-1)
    base_kd = batchkl_ext.kl_divergence(p, q, dim=1)
    assert base_kd.shape == (3, 9)
    for dim in (np.int64(1), -2, np.int32(-2)):
        assert_bitwise_equal(batchkl_ext.kl_divergence(p, q, dim=dim), base_kd)


@pytest.mark.compile
def test_beta_and_temperature_as_compiled_function_arguments():
    """Floats passed into a compiled function (dynamo may keep them symbolic)
    pass the type check."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, beta, T: batchkl_ext.jsd_with_logits(a, b, beta=beta, temperature=T),
                             fullgraph=True, backend="aot_eager")
    s, t = _logits((2, 3, 11)), _logits((2, 3, 11))
    for beta, T in ((0.3, 2.0), (0.6, 0.5)):
        assert_bitwise_equal(compiled(s, t, beta, T), batchkl_ext.jsd_with_logits(s, t, beta=beta, temperature=T))
    torch._dynamo.reset()
