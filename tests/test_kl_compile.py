"""torch.library.opcheck, torch.compile and torch.export of batchkl ops.

Most torch.compile checks use the "aot_eager" backend (AOTAutograd + fake
tensors, no code generation: fast); a few use the default Inductor backend
end to end."""
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import batchkl_ext
from conftest import REDUCTIONS, leaf, make_logprobs, make_pair, make_target

pytestmark = pytest.mark.compile

MEAN_WARNING = r"reduction: 'mean' divides"


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------

REQUIRES_GRAD = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("rg", REQUIRES_GRAD, ids=["nograd", "grad_x", "grad_t", "grad_both"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_kl(reduction, log_target, rg):
    x, t = make_pair((4, 13), torch.float32, log_target)
    torch.library.opcheck(torch.ops.batchkl.kl.default, (leaf(x, rg[0]), leaf(t, rg[1]), reduction, log_target))


@pytest.mark.parametrize("case", ["bcast", "transposed", "x_transposed", "t_transposed", "sliced", "mixed_dtype",
                                  "3d", "1d", "0d"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_kl_layouts(reduction, case):
    if case == "bcast":
        x, t = make_logprobs((3, 1, 9)), make_target((4, 9), False)
    elif case == "transposed":
        x, t = make_pair((5, 7), torch.float32, False, "transposed")
    elif case in ("x_transposed", "t_transposed"):
        # one argument permuted: the fake kernel must predict the real output layout
        x, t = make_pair((5, 7), torch.float32, False, x_layout="transposed" if case == "x_transposed" else
                         "contiguous", t_layout="transposed" if case == "t_transposed" else "contiguous")
    elif case == "sliced":
        x, t = make_pair((5, 7), torch.float64, False, "sliced")
    elif case == "mixed_dtype":
        x, t = make_logprobs((5, 7), torch.float16), make_target((5, 7), False, torch.float32)
    elif case == "3d":
        x, t = make_pair((2, 3, 7), torch.bfloat16, False)
    elif case == "1d":
        x, t = make_pair((7,), torch.float32, False)
    else:
        if reduction == "row":
            pytest.skip("'row' of 0-dim tensors is an error")
        x, t = make_logprobs(()), make_target((), False)
    torch.library.opcheck(torch.ops.batchkl.kl.default, (leaf(x), leaf(t), reduction, False))


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_internal_ops(reduction, log_target):
    x, t = make_logprobs((4, 1, 11)), make_target((3, 11), log_target)
    for gi, gt in [(True, True), (True, False), (False, False)]:
        torch.library.opcheck(torch.ops.batchkl.kl_fused.default, (x, t, reduction, log_target, gi, gt))
    if reduction == "none":
        g = torch.randn(4, 3, 11)
        for gi, gt in [(True, True), (False, True)]:
            torch.library.opcheck(torch.ops.batchkl.kl_none_backward.default, (g, x, t, log_target, gi, gt))


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------

def _eager_and_compiled(fn, compiled, x, t, w):
    """Run fn eagerly and compiled on fresh leaves; return both (loss, gx, gt)."""
    results = []
    for f in (fn, compiled):
        xa, ta = leaf(x), leaf(t)
        out = f(xa, ta)
        (out * w).sum().backward()
        results.append((out.detach(), xa.grad, ta.grad))
    return results


def _assert_match(results, rtol=1e-5, atol=1e-6):
    (e, egx, egt), (c, cgx, cgt) = results
    assert c.shape == e.shape and c.dtype == e.dtype
    torch.testing.assert_close(c, e, rtol=rtol, atol=atol)
    torch.testing.assert_close(cgx, egx, rtol=rtol, atol=atol)
    torch.testing.assert_close(cgt, egt, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph_aot_eager(reduction, log_target, dynamic):
    def via_op(x, t):
        return torch.ops.batchkl.kl(x, t, reduction, log_target)

    def via_front_door(x, t):
        return batchkl_ext.kl_div(x, t, reduction=reduction, log_target=log_target) * 2.0

    for fn in (via_op, via_front_door):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
        for n in (3, 5, 8):   # new batch sizes: recompiles when static, reuses the graph when dynamic
            x, t = make_pair((n, 17), torch.float32, log_target)
            w = torch.randn(n) if reduction == "row" else torch.randn(n, 17) if reduction == "none" else torch.randn(())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=MEAN_WARNING)
                _assert_match(_eager_and_compiled(fn, compiled, x, t, w))
        if dynamic:
            assert counter.frame_count == 1, "dynamic=True should not recompile for new batch sizes"
        else:
            assert counter.frame_count >= 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_front_door_mean(dynamic):
    def fn(x, t):
        return batchkl_ext.kl_div(x, t)   # default reduction='mean' (warns)

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x, t = make_pair((4, 17), torch.float32, False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MEAN_WARNING)
        _assert_match(_eager_and_compiled(fn, compiled, x, t, torch.randn(())))


def test_compile_front_door_mean_with_graph_breaks():
    # Without fullgraph the 'mean' front door must still compile and match.
    def fn(x, t):
        return batchkl_ext.kl_div(x, t)

    compiled = torch.compile(fn, backend="aot_eager")
    x, t = make_pair((4, 17), torch.float32, False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MEAN_WARNING)
        _assert_match(_eager_and_compiled(fn, compiled, x, t, torch.randn(())))


@pytest.mark.parametrize("requires", ["x", "t"])
def test_compile_one_argument_requires_grad(requires):
    def fn(x, t):
        return torch.ops.batchkl.kl(x, t, "batchmean", True) + torch.ops.batchkl.kl(x, t, "row", True).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, t = make_pair((6, 21), torch.float32, True)
    xa, ta = leaf(x, requires == "x"), leaf(t, requires == "t")
    xb, tb = leaf(x, requires == "x"), leaf(t, requires == "t")
    compiled(xa, ta).backward()
    fn(xb, tb).backward()
    got = xa.grad if requires == "x" else ta.grad
    exp = xb.grad if requires == "x" else tb.grad
    torch.testing.assert_close(got, exp)
    assert (ta.grad if requires == "x" else xa.grad) is None


def _mixed_fn(x, t):
    # Several reductions and both front doors in one graph, plus surrounding ops.
    lx = torch.log_softmax(x * 1.5, dim=-1)
    a = batchkl_ext.kl_div(lx, t, reduction="batchmean", log_target=True)
    b = torch.ops.batchkl.kl(lx, t, "row", True)
    c = torch.ops.batchkl.kl(lx, t.exp(), "none", False)
    return a + (b * torch.arange(b.shape[0], dtype=b.dtype)).sum() + c.square().mean()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor_forward_backward(dynamic):
    compiled = torch.compile(_mixed_fn, fullgraph=True, dynamic=dynamic)
    for n in (4, 7) if dynamic else (4,):
        x = torch.randn(n, 45)
        t = make_target((n, 45), True)
        _assert_match(_eager_and_compiled(_mixed_fn, compiled, x, t, torch.tensor(1.0)), rtol=1e-5, atol=1e-5)


def test_compile_inductor_module():
    loss_fn = batchkl_ext.KLDivLoss(reduction="row", log_target=False)
    model = torch.nn.Linear(16, 10)

    def step(a, t):
        return loss_fn(torch.log_softmax(model(a), -1), t).mean()

    compiled = torch.compile(step, fullgraph=True)
    a = torch.randn(8, 16)
    t = make_target((8, 10), False)
    e = step(a, t)
    ge = torch.autograd.grad(e, list(model.parameters()))
    c = compiled(a, t)
    gc = torch.autograd.grad(c, list(model.parameters()))
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self, **loss_kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(12, 9)
        self.loss = batchkl_ext.KLDivLoss(**loss_kwargs)

    def forward(self, a, target):
        return self.loss(torch.log_softmax(self.proj(a), dim=-1), target)


def _batchkl_targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function" and "batchkl" in str(n.target)]


@pytest.mark.parametrize("kwargs", [dict(reduction="batchmean", log_target=True), dict(reduction="row"),
                                    dict(reduction="none", log_target=True), dict(reduction="sum")],
                         ids=["batchmean_logt", "row", "none_logt", "sum"])
def test_export(kwargs):
    m = _Head(**kwargs).eval()
    log_target = kwargs.get("log_target", False)
    a = torch.randn(5, 12)
    t = make_target((5, 9), log_target)
    ep = torch.export.export(m, (a, t))
    assert torch.ops.batchkl.kl.default in _batchkl_targets(ep)
    for aa, tt in [(a, t), (torch.randn(5, 12), make_target((5, 9), log_target))]:
        torch.testing.assert_close(ep.module()(aa, tt), m(aa, tt), rtol=1e-6, atol=1e-7)


def test_export_dynamic_batch():
    m = _Head(reduction="batchmean", log_target=True).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    a = torch.randn(4, 12)
    t = make_target((4, 9), True)
    ep = torch.export.export(m, (a, t), dynamic_shapes=({0: batch}, {0: batch}))
    assert torch.ops.batchkl.kl.default in _batchkl_targets(ep)
    for n in (2, 4, 11):
        aa, tt = torch.randn(n, 12), make_target((n, 9), True)
        torch.testing.assert_close(ep.module()(aa, tt), m(aa, tt), rtol=1e-6, atol=1e-7)


def test_export_row_dynamic_and_roundtrip(tmp_path):
    m = _Head(reduction="row").eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    a = torch.randn(6, 12)
    t = make_target((6, 9), False)
    ep = torch.export.export(m, (a, t), dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path / "kl_row.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert torch.ops.batchkl.kl.default in _batchkl_targets(loaded)
    aa, tt = torch.randn(9, 12), make_target((9, 9), False)
    out = loaded.module()(aa, tt)
    assert out.shape == (9,)
    torch.testing.assert_close(out, m(aa, tt), rtol=1e-6, atol=1e-7)


def test_export_run_decompositions_keeps_the_op():
    # The catch-all kernel must not make export decompose (and so call) it.
    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = batchkl_ext.KLDivLoss(reduction="batchmean", log_target=True)

        def forward(self, x, t):
            return self.loss(x, t)

    x = torch.randn(3, 7).log_softmax(-1)
    t = torch.randn(3, 7).log_softmax(-1)
    ep = torch.export.export(Loss(), (x, t)).run_decompositions()
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.batchkl.kl.default in targets
    torch.testing.assert_close(ep.module()(x, t), Loss()(x, t))


def test_aot_inductor_package_runs_both_ops(tmp_path):
    """Deployment through torch.export and AOTInductor: the compiled package
    calls both ops (their C++ kernels, through the dispatcher) with a dynamic
    batch and gives the eager results."""
    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)

        def forward(self, h, teacher):
            s = self.proj(h)
            return (batchkl_ext.jsd_with_logits(s, teacher, beta=0.3, reduction="none")
                    + torch.ops.batchkl.kl(s.log_softmax(-1), teacher.softmax(-1), "row", False))

    m = Distill().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    h, teacher = torch.randn(5, 8), torch.randn(5, 16)
    ep = torch.export.export(m, (h, teacher), dynamic_shapes=({0: batch}, {0: batch}))
    assert {torch.ops.batchkl.kl.default, torch.ops.batchkl.kl_with_logits.default} <= set(_batchkl_targets(ep))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "distill.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for n in (5, 11):
        hh, tt = torch.randn(n, 8), torch.randn(n, 16)
        with torch.no_grad():
            torch.testing.assert_close(runner(hh, tt), m(hh, tt), rtol=1e-5, atol=1e-6)
