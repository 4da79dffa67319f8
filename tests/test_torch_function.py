"""The front doors honour __torch_function__, as torch.nn.functional does:
torch.fx symbolic tracing (whose Proxy is not a Tensor), Tensor subclasses
and TorchFunctionModes see batchkl_ext.kl_div (kl_div_with_logits, ...) as
one call, exactly where they would see F.kl_div. Until 2026-11-29 the front
doors' type checks refused a Proxy: torch.fx.symbolic_trace of a model
holding batchkl_ext.KLDivLoss failed where nn.KLDivLoss traces."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import batchkl_ext
from conftest import assert_bitwise_equal


def _pair(kind, shape=(4, 9)):
    """Arguments of the front door `kind`: what its input and target hold."""
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randn(shape, dtype=torch.float64)
    if kind == "kl_div":
        return x.log_softmax(-1), t.softmax(-1)
    if kind == "kl_divergence":
        return t.softmax(-1), x.softmax(-1)
    return x, t


# (front door, how it is called on (input, target) with its other arguments)
DOORS = {
    "kl_div": (batchkl_ext.kl_div, lambda f, a, b: f(a, b, reduction="batchmean")),
    "kl_div_with_logits": (batchkl_ext.kl_div_with_logits,
                           lambda f, a, b: f(a, b, temperature=2.0, reduction="none")),
    "jsd_with_logits": (batchkl_ext.jsd_with_logits, lambda f, a, b: f(a, b, beta=0.3, reduction="sum")),
    "kl_divergence": (batchkl_ext.kl_divergence, lambda f, a, b: f(a, b, kind="probs")),
}


class Logged(torch.Tensor):
    """A Tensor subclass that records every function it is passed to."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(DOORS))
@pytest.mark.parametrize("which", ["input", "target"])
def test_tensor_subclass_sees_the_front_door(name, which):
    door, call = DOORS[name]
    a, b = _pair(name)
    want = call(door, a, b)
    if which == "input":
        a = a.as_subclass(Logged)
    else:
        b = b.as_subclass(Logged)
    Logged.calls = []
    got = call(door, a, b)
    assert Logged.calls and Logged.calls[0] is door, f"first call seen: {Logged.calls[:1]}"
    assert_bitwise_equal(got.as_subclass(torch.Tensor), want)


def test_tensor_subclass_sees_kl_div_where_it_sees_f_kl_div():
    """The reference behaviour: F.kl_div hands its call to the subclass."""
    a, b = _pair("kl_div")
    Logged.calls = []
    F.kl_div(a.as_subclass(Logged), b, reduction="batchmean")
    assert Logged.calls[0] is F.kl_div
    Logged.calls = []
    batchkl_ext.kl_div(a.as_subclass(Logged), b, reduction="batchmean")
    assert Logged.calls[0] is batchkl_ext.kl_div


def test_mask_subclass_counts_as_an_argument():
    a, b = _pair("kl_div_with_logits")
    mask = torch.tensor([True, False, True, True])
    want = batchkl_ext.kl_div_with_logits(a, b, mask=mask)
    Logged.calls = []
    got = batchkl_ext.kl_div_with_logits(a, b, mask=mask.as_subclass(Logged))
    assert Logged.calls and Logged.calls[0] is batchkl_ext.kl_div_with_logits
    assert_bitwise_equal(got.as_subclass(torch.Tensor), want)


@pytest.mark.parametrize("name", list(DOORS))
def test_torch_function_mode_sees_the_front_door(name):
    door, call = DOORS[name]
    a, b = _pair(name)
    want = call(door, a, b)
    with Recorder() as mode:
        got = call(door, a, b)
    assert mode.calls and mode.calls[0] is door, f"first call seen: {mode.calls[:1]}"
    assert_bitwise_equal(got, want)


class Student(nn.Module):
    """A distillation head: a projection to the vocabulary and a loss."""

    def __init__(self, loss):
        super().__init__()
        self.proj = nn.Linear(6, 9, dtype=torch.float64)
        self.loss = loss

    def forward(self, h, teacher):
        return self.loss(self.proj(h), teacher)


class LogitsLoss(nn.Module):
    def forward(self, s, t):
        mask = t[..., 0] > -1.0
        return batchkl_ext.jsd_with_logits(s, t, beta=0.3, temperature=1.5, mask=mask)


@pytest.mark.parametrize("loss", ["KLDivLoss", "jsd_with_logits"])
def test_fx_symbolic_trace(loss):
    """The traced GraphModule calls the front door as one node and gives
    bitwise the eager results and gradients; for KLDivLoss, nn.KLDivLoss
    traces too (the drop-in must not be the one that fails)."""
    if loss == "KLDivLoss":
        class Head(nn.Module):
            def __init__(self, crit):
                super().__init__()
                self.crit = crit

            def forward(self, s, t):
                return self.crit(s.log_softmax(-1), t.softmax(-1))

        model = Student(Head(batchkl_ext.KLDivLoss(reduction="batchmean")))
        torch.fx.symbolic_trace(Student(Head(nn.KLDivLoss(reduction="batchmean"))))
        door = batchkl_ext.kl_div
    else:
        model = Student(LogitsLoss())
        door = batchkl_ext.jsd_with_logits
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert door in targets, f"call_function nodes: {targets}"

    h = torch.randn(5, 6, dtype=torch.float64)
    teacher = torch.randn(5, 9, dtype=torch.float64)
    want = model(h, teacher)
    want.backward()
    want_grad = model.proj.weight.grad.clone()
    model.zero_grad()
    got = traced(h, teacher)
    got.backward()
    assert_bitwise_equal(got, want)
    assert_bitwise_equal(traced.proj.weight.grad, want_grad, "gradient through the traced module")
