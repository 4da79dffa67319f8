"""The public API: batchkl_ext.kl_div / KLDivLoss as drop-ins for
F.kl_div / nn.KLDivLoss (signature, legacy arguments, warnings), error
handling, no side effects."""
import copy
import inspect
import itertools
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import batchkl_ext
from conftest import (REDUCTIONS, TORCH_REDUCTIONS, UNSUPPORTED_DEVICE, assert_bitwise_equal, assert_close_scaled, kl_op, leaf,
                      make_pair, ref_kl)

MEAN_WARNING = r"reduction: 'mean' divides the total loss by both the batch size and the support size"


def _record(fn):
    """Run fn, return (result, [(category, message), ...])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [(w.category, str(w.message)) for w in caught]


def _record_full(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, list(caught)


# --------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------

def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_kl_div_signature_matches_torch():
    assert _params(batchkl_ext.kl_div) == _params(F.kl_div)


def test_kldivloss_signature_matches_torch():
    assert _params(batchkl_ext.KLDivLoss.__init__) == _params(nn.KLDivLoss.__init__)
    assert _params(batchkl_ext.KLDivLoss.forward) == _params(nn.KLDivLoss.forward)


def test_op_schema_defaults():
    x, t = make_pair((3, 8), torch.float64, False)
    assert_bitwise_equal(torch.ops.batchkl.kl(x, t), kl_op(x, t, "mean", False))
    assert_bitwise_equal(torch.ops.batchkl.kl(x, t, reduction="row"), kl_op(x, t, "row", False))
    assert_bitwise_equal(torch.ops.batchkl.kl(x, t.log(), log_target=True), kl_op(x, t.log(), "mean", True))
    schema = str(torch.ops.batchkl.kl.default._schema)
    assert 'str reduction="mean"' in schema and "bool log_target=False" in schema


def test_kl_div_keyword_and_positional_arguments():
    x, t = make_pair((3, 8), torch.float64, True)
    a = batchkl_ext.kl_div(x, t, None, None, "sum", True)
    b = batchkl_ext.kl_div(input=x, target=t, reduction="sum", log_target=True)
    e = F.kl_div(input=x, target=t, reduction="sum", log_target=True)
    assert_bitwise_equal(a, b)
    torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# legacy size_average / reduce, warnings
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS + ("row",))
@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_legacy_arguments_and_warnings_match_torch(size_average, reduce, reduction, log_target):
    if reduction == "row" and size_average is None and reduce is None:
        pytest.skip("'row' is not a torch reduction (covered elsewhere)")
    x, t = make_pair((4, 9), torch.float64, log_target)
    kw = dict(size_average=size_average, reduce=reduce, reduction=reduction, log_target=log_target)
    ours, ours_w = _record(lambda: batchkl_ext.kl_div(x, t, **kw))
    theirs, theirs_w = _record(lambda: F.kl_div(x, t, **kw))
    assert ours is not None
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours_w == theirs_w


@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
def test_legacy_arguments_gradients(size_average, reduce):
    x, t = make_pair((4, 9), torch.float64, False)
    outs = []
    for fn in (batchkl_ext.kl_div, F.kl_div):
        xa, ta = leaf(x), leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = fn(xa, ta, size_average=size_average, reduce=reduce)
        loss.sum().backward()
        outs.append((xa.grad, ta.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_mean_warning_same_as_torch():
    x, t = make_pair((4, 9), torch.float32, False)
    ours, ours_w = _record_full(lambda: batchkl_ext.kl_div(x, t))           # default reduction='mean'
    theirs, theirs_w = _record_full(lambda: F.kl_div(x, t))
    assert [(w.category, str(w.message)) for w in ours_w] == [(w.category, str(w.message)) for w in theirs_w]
    assert len(ours_w) == 1 and ours_w[0].category is UserWarning
    assert str(ours_w[0].message).startswith(MEAN_WARNING[:40].replace("\\", ""))
    # stacklevel: attributed to the caller, as F.kl_div's
    assert ours_w[0].filename == theirs_w[0].filename == __file__
    _, explicit = _record(lambda: batchkl_ext.kl_div(x, t, reduction="mean"))
    assert explicit == [(w.category, str(w.message)) for w in theirs_w]
    with pytest.warns(UserWarning, match=MEAN_WARNING):
        batchkl_ext.kl_div(x, t, reduction="mean", log_target=False)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "row"])
def test_no_warning_for_other_reductions(reduction):
    x, t = make_pair((4, 9), torch.float32, False)
    _, caught = _record(lambda: batchkl_ext.kl_div(x, t, reduction=reduction))
    assert caught == []
    xa, ta = leaf(x), leaf(t)
    _, caught = _record(lambda: batchkl_ext.kl_div(xa, ta, reduction=reduction).sum().backward())
    assert caught == []


# --------------------------------------------------------------------------
# KLDivLoss
# --------------------------------------------------------------------------

@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS)
def test_kldivloss_drop_in(reduction, log_target):
    x, t = make_pair((5, 3, 17), torch.float32, log_target, layout="transposed")
    ours_m = batchkl_ext.KLDivLoss(reduction=reduction, log_target=log_target)
    theirs_m = nn.KLDivLoss(reduction=reduction, log_target=log_target)
    assert isinstance(ours_m, nn.Module) and isinstance(ours_m, nn.modules.loss._Loss)
    assert ours_m.reduction == theirs_m.reduction and ours_m.log_target == theirs_m.log_target
    assert ours_m.state_dict() == {} == theirs_m.state_dict()
    assert list(ours_m.parameters()) == [] and list(ours_m.buffers()) == []
    assert repr(ours_m) == repr(theirs_m)
    results = []
    w = torch.randn(x.shape) if reduction == "none" else torch.randn(())
    for m in (ours_m, theirs_m):
        xa, ta = leaf(x), leaf(t)
        out, caught = _record(lambda: m(xa, ta))
        (out * w).sum().backward()
        results.append((out.detach(), xa.grad, ta.grad, caught))
    (o1, gx1, gt1, w1), (o2, gx2, gt2, w2) = results
    assert o1.shape == o2.shape and o1.dtype == o2.dtype
    torch.testing.assert_close(o1, o2, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gt1, gt2, rtol=2e-5, atol=1e-5)
    assert w1 == w2  # the 'mean' warning, or nothing


@pytest.mark.parametrize("size_average,reduce", [(True, None), (False, None), (None, False), (False, True)])
def test_kldivloss_legacy_constructor(size_average, reduce):
    x, t = make_pair((4, 9), torch.float64, False)
    ours_m, ours_w = _record(lambda: batchkl_ext.KLDivLoss(size_average=size_average, reduce=reduce))
    theirs_m, theirs_w = _record(lambda: nn.KLDivLoss(size_average=size_average, reduce=reduce))
    assert ours_w == theirs_w and len(ours_w) == 1
    assert ours_m.reduction == theirs_m.reduction
    a, aw = _record(lambda: ours_m(x, t))
    b, bw = _record(lambda: theirs_m(x, t))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert aw == bw


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_kldivloss_row(log_target):
    x, t = make_pair((6, 4, 33), torch.float64, log_target)
    m = batchkl_ext.KLDivLoss(reduction="row", log_target=log_target)
    out, caught = _record(lambda: m(x, t))
    assert caught == []
    assert out.shape == (6, 4)
    exp, mag = ref_kl(x, t, "row", log_target)
    assert_close_scaled(out, exp, mag)


def test_kldivloss_default_and_module_behaviour():
    m = batchkl_ext.KLDivLoss()
    assert m.reduction == "mean" and m.log_target is False
    x, t = make_pair((4, 9), torch.float64, False)
    with pytest.warns(UserWarning, match=MEAN_WARNING):
        a = m(x, t)
    with pytest.warns(UserWarning, match=MEAN_WARNING):
        b = nn.KLDivLoss()(x, t)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Plain module behaviour: copy, pickle, train/eval, dtype moves, as a submodule.
    m2 = batchkl_ext.KLDivLoss(reduction="batchmean", log_target=True)
    for clone in (copy.deepcopy(m2), pickle.loads(pickle.dumps(m2))):
        assert clone.reduction == "batchmean" and clone.log_target is True
        assert_bitwise_equal(clone(x, t.log()), m2(x, t.log()))
    m2.eval().double().train()
    seq = nn.ModuleDict({"loss": m2})
    assert_bitwise_equal(seq["loss"](x, t.log()), kl_op(x, t.log(), "batchmean", True))


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def _quiet(fn):
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=MEAN_WARNING)
            return fn(*args, **kwargs)
    return call


def _callers():
    """Each front door, called the same way (the 'mean' warning silenced)."""
    return {k: _quiet(v) for k, v in _raw_callers().items()}


def _raw_callers():
    return {
        "op": lambda x, t, reduction="sum", log_target=False: torch.ops.batchkl.kl(x, t, reduction, log_target),
        "kl_div": lambda x, t, reduction="sum", log_target=False: batchkl_ext.kl_div(
            x, t, reduction=reduction, log_target=log_target),
        "module": lambda x, t, reduction="sum", log_target=False: batchkl_ext.KLDivLoss(
            reduction=reduction, log_target=log_target)(x, t),
    }


CALLERS = ["op", "kl_div", "module"]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("caller", CALLERS)
def test_error_shapes_do_not_broadcast(caller, reduction, requires_grad):
    fn = _callers()[caller]
    x = torch.randn(3, 4, requires_grad=requires_grad)
    t = torch.rand(3, 5)
    with pytest.raises((ValueError, RuntimeError)):
        fn(x, t, reduction)
    with pytest.raises((ValueError, RuntimeError)):
        fn(torch.randn(2, 3, 4), torch.rand(3, 3, 4), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_error_shapes_message_names_arguments(reduction):
    with pytest.raises((ValueError, RuntimeError)) as info:
        kl_op(torch.randn(3, 4), torch.rand(3, 5), reduction, False)
    assert "input" in str(info.value) and "target" in str(info.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_error_shapes_message_names_arguments_meta(reduction):
    with pytest.raises((ValueError, RuntimeError)) as info:
        kl_op(torch.randn(3, 4, device="meta"), torch.rand(3, 5, device="meta"), reduction, False)
    assert "input" in str(info.value) and "target" in str(info.value)


@pytest.mark.parametrize("bad", ["avg", "Mean", "", "elementwise_mean", "batch_mean", "rows"])
@pytest.mark.parametrize("caller", CALLERS)
def test_error_unknown_reduction(caller, bad):
    if bad == "elementwise_mean" and caller != "op":
        pytest.skip("PyTorch's deprecated alias of 'mean': the front doors take it as F.kl_div does "
                    "(tests/test_front_doors.py); the op rejects it")
    fn = _callers()[caller]
    x, t = make_pair((3, 4), torch.float32, False)
    with pytest.raises(ValueError, match="reduction") as info:
        fn(x, t, bad)
    assert repr(bad) in str(info.value) or bad in str(info.value)
    with pytest.raises(ValueError, match="reduction"):
        fn(leaf(x), t, bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64],
                         ids=str)
@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("caller", CALLERS)
def test_error_non_float_dtype(caller, which, dtype):
    fn = _callers()[caller]
    x, t = make_pair((3, 4), torch.float32, False)
    bad = torch.ones(3, 4).to(dtype)
    args = (bad, t) if which == "input" else (x, bad)
    with pytest.raises(TypeError, match=which):
        fn(*args, "sum")
    # also when the other argument requires grad (the autograd path checks too)
    args = (bad, leaf(t)) if which == "input" else (leaf(x), bad)
    with pytest.raises(TypeError, match=which):
        fn(*args, "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("caller", CALLERS)
def test_error_two_devices(caller, which, reduction):
    fn = _callers()[caller]
    x, t = make_pair((3, 4), torch.float32, False)
    if which == "input":
        x = x.to("meta")
    else:
        t = t.to("meta")
    with pytest.raises(RuntimeError, match="device"):
        fn(x, t, reduction)
    with pytest.raises(RuntimeError, match="device"):
        fn(leaf(x) if which == "target" else x, leaf(t) if which == "input" else t, reduction)


@pytest.mark.parametrize("caller", CALLERS)
def test_error_row_on_zero_dim(caller):
    fn = _callers()[caller]
    with pytest.raises(ValueError, match="row"):
        fn(torch.tensor(-1.0), torch.tensor(0.5), "row")
    with pytest.raises(ValueError, match="row"):
        fn(torch.tensor(-1.0, requires_grad=True), torch.tensor(0.5), "row")
    # 0-dim with a 1-D partner is fine: one distribution.
    out = fn(torch.tensor(-1.0), torch.tensor([0.25, 0.75]), "row")
    assert out.shape == ()


def test_error_front_door_argument_types():
    x, t = make_pair((3, 4), torch.float32, False)
    with pytest.raises(TypeError):
        batchkl_ext.kl_div(x.tolist(), t)
    with pytest.raises(TypeError):
        batchkl_ext.kl_div(x, t.numpy())
    with pytest.raises((TypeError, ValueError), match="reduction"):
        batchkl_ext.kl_div(x, t, reduction=None)


def test_errors_do_not_print(capfd):
    x, t = make_pair((3, 4), torch.float32, False)
    for args in [(x, t.int(), "sum"), (x, t, "avg"), (x, torch.rand(3, 5), "sum"), (torch.tensor(1.0),
                                                                                   torch.tensor(1.0), "row")]:
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            kl_op(*args, False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------
# no side effects, never None, never prints
# --------------------------------------------------------------------------

@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_not_modified_and_nothing_printed(reduction, log_target, capfd):
    for layout in ("contiguous", "transposed", "expanded"):
        x, t = make_pair((4, 50), torch.float32, log_target, layout)
        x0, t0 = x.clone(), t.clone()
        xa, ta = leaf(x), leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = batchkl_ext.kl_div(xa, ta, reduction=reduction, log_target=log_target)
        assert out is not None and isinstance(out, torch.Tensor)
        w = torch.randn(out.shape)
        (out * w).sum().backward()
        for name, before, after in (("input", x0, xa), ("target", t0, ta)):
            assert_bitwise_equal(after, before, f"{name} modified")
        assert xa.grad is not None and ta.grad is not None
        # the gradients are not aliases of the inputs or of each other
        assert xa.grad.data_ptr() not in (xa.data_ptr(), ta.data_ptr(), ta.grad.data_ptr())
        # the op itself, without autograd
        out2 = kl_op(x, t, reduction, log_target)
        assert out2 is not None
        assert_bitwise_equal(x, x0)
        assert_bitwise_equal(t, t0)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "row"])
def test_repeated_backward_with_retain_graph(reduction):
    # The fused gradients are saved in the forward: a second backward through the
    # same graph must give the same answer (nothing consumed or scaled in place).
    x, t = make_pair((5, 40), torch.float64, True)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, reduction, True)
    g1 = torch.full(loss.shape, 3.0, dtype=torch.float64)
    g2 = torch.randn(loss.shape, dtype=torch.float64)
    loss.backward(g1, retain_graph=True)
    first = (xa.grad.clone(), ta.grad.clone())
    loss.backward(g2, retain_graph=True)
    loss.backward(torch.ones_like(g1))
    xb, tb = leaf(x), leaf(t)
    ref_loss = kl_op(xb, tb, reduction, True)
    ref_loss.backward(g1 + g2 + 1, retain_graph=True)
    torch.testing.assert_close((xa.grad, ta.grad), (xb.grad, tb.grad), rtol=1e-12, atol=1e-12)
    xc, tc = leaf(x), leaf(t)
    kl_op(xc, tc, reduction, True).backward(g1)
    torch.testing.assert_close(first, (xc.grad, tc.grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "row", "batchmean"])
def test_grad_output_with_ones_and_non_ones(reduction):
    # Upstream gradients that are exactly 1 in some rows and not in others.
    x, t = make_pair((6, 30), torch.float32, False)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, reduction, False)
    if reduction == "row":
        g = torch.tensor([1.0, 2.0, 1.0, -0.5, 1.0, 0.0])
    else:
        g = torch.tensor(1.0)
    torch.autograd.grad(loss, (xa, ta), g, retain_graph=True)  # a first pass (retained)
    gx, gt = torch.autograd.grad(loss, (xa, ta), g)
    xb, tb = leaf(x), leaf(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = F.kl_div(xb, tb, reduction="none").sum(-1) if reduction == "row" else F.kl_div(xb, tb, reduction=reduction)
    ex, et = torch.autograd.grad(e, (xb, tb), g)
    torch.testing.assert_close((gx, gt), (ex, et), rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_across_calls():
    x, t = make_pair((4, 20), torch.float64, False)
    xa, ta = leaf(x), leaf(t)
    for _ in range(3):
        kl_op(xa, ta, "sum", False).backward()
    xb, tb = leaf(x), leaf(t)
    (3 * F.kl_div(xb, tb, reduction="sum")).backward()
    torch.testing.assert_close((xa.grad, ta.grad), (xb.grad, tb.grad), rtol=1e-12, atol=1e-12)


def test_no_grad_and_inference_mode():
    x, t = make_pair((4, 20), torch.float32, False)
    xa, ta = leaf(x), leaf(t)
    with torch.no_grad():
        a = kl_op(xa, ta, "sum", False)
    assert not a.requires_grad
    with torch.inference_mode():
        b = kl_op(x, t, "row", False)
    assert_bitwise_equal(a, kl_op(x, t, "sum", False))
    assert_bitwise_equal(b, kl_op(x, t, "row", False))


def test_deterministic_algorithms_mode():
    # The op is deterministic by construction: it must not be refused (or
    # warn) under torch.use_deterministic_algorithms(True).
    x, t = make_pair((4, 20), torch.float32, False)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for reduction in REDUCTIONS:
            xa, ta = leaf(x), leaf(t)
            out, caught = _record(lambda: kl_op(xa, ta, reduction, False))
            out.sum().backward()
            assert caught == []
    finally:
        torch.use_deterministic_algorithms(before)


def test_devices_without_a_kernel_get_an_error_naming_the_device():
    # XPU, MPS, PrivateUse1, ... have no batchkl kernel and fall through to the
    # catch-all CompositeExplicitAutograd kernel; no such device exists here,
    # so call that kernel directly (it names whatever device it was given).
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    x = torch.randn(3, 4).log_softmax(-1)
    t = torch.rand(3, 4)
    calls = [
        (torch.ops.batchkl.kl.default, (x, t, "sum", False)),
        (torch.ops.batchkl.kl_fused.default, (x, t, "sum", False, True, False)),
        (torch.ops.batchkl.kl_none_backward.default, (torch.ones(3, 4), x, t, False, True, True)),
        (torch.ops.batchkl.kl_scale_.default, (torch.ones(3, 4), torch.tensor(2.0))),
    ]
    for op, args in calls:
        with pytest.raises(RuntimeError, match=r"batchkl.kl: " + UNSUPPORTED_DEVICE + r", got tensors on cpu"):
            op.redispatch(keys, *args)


# TorchScript (deprecated, still in legacy models): a scripted model holding
# KLDivLoss, as it may hold nn.KLDivLoss. Until 2026-11-29 scripting failed
# on kl_div's Python ("import statements aren't supported").
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_torchscript_model_holding_the_module(reduction, log_target, tmp_path):
    class Head(nn.Module):
        def __init__(self, crit):
            super().__init__()
            self.proj = nn.Linear(6, 9, dtype=torch.float64)
            self.crit = crit

        def forward(self, h, t):
            return self.crit(self.proj(h).log_softmax(-1), t)

    torch.manual_seed(0)
    model = Head(batchkl_ext.KLDivLoss(reduction=reduction, log_target=log_target))
    scripted = torch.jit.script(model)
    h = torch.randn(4, 6, dtype=torch.float64)
    t = torch.randn(4, 9, dtype=torch.float64)
    t = t.log_softmax(-1) if log_target else t.softmax(-1)
    want, caught = _record(lambda: model(h, t))
    got, caught_scripted = _record(lambda: scripted(h, t))
    assert_bitwise_equal(got, want)
    assert [m for _, m in caught_scripted] == [m for _, m in caught]      # 'mean' warns in both
    w = torch.rand(want.shape, dtype=torch.float64)
    g_want = torch.autograd.grad((want * w).sum(), model.proj.weight)[0]
    g_got = torch.autograd.grad((got * w).sum(), scripted.proj.weight)[0]
    assert_bitwise_equal(g_got, g_want, "gradient through the scripted model")
    if reduction != "row":                                                   # nn.KLDivLoss has no 'row'
        reference = torch.jit.script(Head(nn.KLDivLoss(reduction=reduction, log_target=log_target)))
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(got, reference(h, t))
    torch.jit.save(scripted, str(tmp_path / "head.pt"))
    assert_bitwise_equal(torch.jit.load(str(tmp_path / "head.pt"))(h, t), want, "saved and loaded")
    traced = torch.jit.trace(model, (h, t), check_trace=False)
    assert_bitwise_equal(traced(h, t), want, "traced")
