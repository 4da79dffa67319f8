"""Autograd around both ops beyond first derivatives.

Second derivatives are not implemented (the first derivatives come out of
the fused forward kernel, not out of differentiable ops), so differentiating
a returned gradient must raise a clear error on every path that reaches it:
a gradient penalty with other terms beside it, a parameter upstream of the
logits, a grad_output that requires grad. (Until 2026-11-29 the error node
was a leaf, which torch.autograd.grad skipped whenever the other terms gave
it something to differentiate: a gradient penalty's derivative came back
without the penalty's part, silently.) First-order gradients taken with
create_graph=True stay what they are without it.

torch.func: vmap works (PyTorch's fallback, one call per sample), gradients
of its result included; grad, vjp and jacrev raise PyTorch's error for C++
autograd Functions, which functorch cannot transform (the ops' autograd is
one so that libtorch users get gradients too).

Forward-mode AD has no formula: a tangent on an argument is an error."""
import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F

import batchkl_ext
from conftest import assert_bitwise_equal

MESSAGE = r"batchkl\.(kl|kl_with_logits): second derivatives \(double backward\) are not supported"


def _kl(x, t, reduction):
    return torch.ops.batchkl.kl(x, t, reduction, False)


def _jsd(x, t, reduction):
    return batchkl_ext.jsd_with_logits(x, t, beta=0.3, temperature=0.7, reduction=reduction)


def _forward_kl(x, t, reduction):
    return batchkl_ext.kl_div_with_logits(x, t, reduction=reduction)


# (name, loss, how its input is made from raw scores, reductions)
OPS = [
    ("kl", _kl, lambda s: s.log_softmax(-1), ["none", "sum", "mean", "batchmean", "row"]),
    ("jsd_with_logits", _jsd, lambda s: s, ["none", "sum", "mean", "batchmean"]),
    ("kl_div_with_logits", _forward_kl, lambda s: s, ["none", "batchmean"]),
]
CASES = [(name, fn, prep, r) for name, fn, prep, reds in OPS for r in reds]
IDS = [f"{name}-{r}" for name, _, _, r in CASES]


def _target(name, shape):
    t = torch.randn(shape, dtype=torch.float64)
    return t.softmax(-1) if name == "kl" else t


def _scalar(loss):
    return loss.sum() if loss.dim() > 0 else loss


@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
@pytest.mark.parametrize("wrt", ["input", "target"])
def test_gradient_penalty_with_other_terms_raises(name, fn, prep, reduction, wrt):
    """penalty = |dL/dx|^2 + <x, t>: its derivative w.r.t. t (or x) has a
    part through dL/dx, which batchkl cannot give; the <x, t> term alone must
    not come back as the answer."""
    x = prep(torch.randn(3, 6, dtype=torch.float64)).detach().requires_grad_()
    t = _target(name, (3, 6)).requires_grad_()
    gx, = torch.autograd.grad(_scalar(fn(x, t, reduction)), x, create_graph=True)
    penalty = gx.pow(2).sum() + (x * t).sum()
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(penalty, t if wrt == "target" else x)


@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
def test_parameter_upstream_of_the_input_raises(name, fn, prep, reduction):
    """logits = h @ W: the second differentiation reaches batchkl's gradient
    through the matmul's backward, w.r.t. h."""
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = _target(name, (3, 6))
    gw, = torch.autograd.grad(_scalar(fn(prep(h @ w), t, reduction)), w, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(gw.pow(2).sum() + h.sum(), h)


@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
def test_grad_output_that_requires_grad_raises(name, fn, prep, reduction):
    """The double-backward trick (a grad_output v that requires grad, then
    d(v . J)/dv) goes through batchkl's gradient too."""
    x = prep(torch.randn(3, 6, dtype=torch.float64)).detach().requires_grad_()
    t = _target(name, (3, 6))
    loss = fn(x, t, reduction)
    v = torch.rand(loss.shape, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad(loss, x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(gx.sum() + v.sum(), v)


# (PyTorch warns of the reference cycle any backward(create_graph=True) makes.)
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
def test_backward_through_the_gradient_raises(name, fn, prep, reduction):
    x = prep(torch.randn(3, 6, dtype=torch.float64)).detach().requires_grad_()
    t = _target(name, (3, 6)).requires_grad_()
    _scalar(fn(x, t, reduction)).backward(create_graph=True)
    try:
        with pytest.raises(RuntimeError, match=MESSAGE):
            x.grad.pow(2).sum().backward()
    finally:
        x.grad = t.grad = None


@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
def test_create_graph_leaves_first_derivatives_and_other_terms_alone(name, fn, prep, reduction):
    """create_graph=True: the same first derivatives, bitwise, now requiring
    grad; a second differentiation that does not go through them (here of
    y**3 beside the loss) works as without batchkl."""
    x = prep(torch.randn(3, 6, dtype=torch.float64)).detach()
    t = _target(name, (3, 6))
    y = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def grads(create_graph):
        xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
        total = _scalar(fn(xa, ta, reduction)) + y.pow(3).sum()
        return torch.autograd.grad(total, (xa, ta, y), create_graph=create_graph)

    plain = grads(False)
    gx, gt, gy = grads(True)
    assert gx.requires_grad and gt.requires_grad
    assert_bitwise_equal(gx, plain[0], "grad_input")
    assert_bitwise_equal(gt, plain[1], "grad_target")
    second, = torch.autograd.grad(gy.sum(), y)
    torch.testing.assert_close(second, 6 * y.detach(), rtol=0, atol=0)


def test_first_order_gradients_match_torch_under_create_graph():
    """A sanity anchor for the cases above: F.kl_div's first derivatives,
    taken with create_graph=True, equal batchkl's."""
    x = torch.randn(4, 9, dtype=torch.float64).log_softmax(-1).requires_grad_()
    t = torch.randn(4, 9, dtype=torch.float64).softmax(-1).requires_grad_()
    ours = torch.autograd.grad(_kl(x, t, "batchmean"), (x, t), create_graph=True)
    theirs = torch.autograd.grad(F.kl_div(x, t, reduction="batchmean"), (x, t), create_graph=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
def test_vmap_equals_a_loop_values_and_gradients(name, fn, prep, reduction):
    """vmap over a batch of (3, 6) problems: bitwise the results of calling
    the op on each, and so are the gradients of a weighted sum of them."""
    x = prep(torch.randn(4, 3, 6, dtype=torch.float64)).detach()
    t = _target(name, (4, 3, 6))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    batched = torch.func.vmap(lambda a, b: fn(a, b, reduction))(xa, t)
    looped = torch.stack([fn(a, b, reduction) for a, b in zip(xb, t)])
    assert_bitwise_equal(batched, looped, "vmap result")
    w = torch.rand(looped.shape, dtype=torch.float64)
    (batched * w).sum().backward()
    (looped * w).sum().backward()
    assert_bitwise_equal(xa.grad, xb.grad, "gradient through vmap")


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
@pytest.mark.parametrize("name,fn,prep", [c[:3] for c in OPS], ids=[c[0] for c in OPS])
def test_func_gradient_transforms_raise(name, fn, prep, transform):
    x = prep(torch.randn(3, 6, dtype=torch.float64)).detach()
    t = _target(name, (3, 6))
    loss = lambda a: fn(a, t, "batchmean" if name != "kl" else "sum")
    with pytest.raises(RuntimeError, match=r"cannot use C\+\+ torch::autograd::Function with functorch"):
        if transform == "vjp":
            torch.func.vjp(loss, x)
        else:
            getattr(torch.func, transform)(loss)(x)


# --------------------------------------------------------------------------
# forward-mode AD
# --------------------------------------------------------------------------

# (forward_ad's first use scripts a helper: PyTorch's own deprecation warning.)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name,fn,prep,reduction", CASES, ids=IDS)
@pytest.mark.parametrize("which", ["input", "target"])
def test_forward_mode_ad_raises(name, fn, prep, reduction, which):
    """No forward-mode formula: a tangent on either argument is an error.
    (Until 2026-11-29 the result came back with no tangent at all, as if the
    loss did not depend on the argument.)"""
    x = prep(torch.randn(3, 6, dtype=torch.float64))
    t = _target(name, (3, 6))
    with fwad.dual_level():
        if which == "input":
            x = fwad.make_dual(x, torch.randn_like(x))
        else:
            t = fwad.make_dual(t, torch.randn_like(t))
        with pytest.raises(RuntimeError, match=r"batchkl\.(kl|kl_with_logits): forward-mode AD .* not supported"):
            fn(x, t, reduction)
