"""Numerical parity of torch.ops.batchkl.kl with the float64 math and with
torch.nn.functional.kl_div: values, gradients, dtypes, shapes, layouts,
broadcasting, special values, reductions, determinism."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import batchkl_ext
from conftest import (EPS, FLOAT_DTYPES, LAYOUTS, LOW_PRECISION, REDUCTIONS, TOL, TORCH_TOL, apply_layout,
                      assert_bitwise_equal, assert_close_scaled, check_against_reference, kl_op, leaf,
                      make_logprobs, make_pair, make_target, ref_grads, ref_kl, run_and_grad, torch_kl)

SHAPES = [
    (37,),          # 1-D: one distribution
    (1,),           # V = 1
    (4, 1),         # many rows of V = 1
    (5, 37),        # V not a multiple of the SIMD width
    (16, 64),       # V a multiple of 8 / 16
    (3, 1000),
    (2, 3, 37),     # 3-D
    (2, 3, 2, 37),  # 4-D
    (3, 40000),     # rows longer than one tile
]


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def _strides_of_nontrivial_dims(t):
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


# --------------------------------------------------------------------------
# The big grid: reduction x log_target x dtype x shape x layout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity_grid(reduction, log_target, dtype, shape, layout):
    x, t = make_pair(shape, dtype, log_target, layout)
    loss = check_against_reference(x, t, reduction, log_target)
    if reduction == "none" and loss.numel() > 1:
        expected = torch_kl(x, t, "none", log_target)
        assert _strides_of_nontrivial_dims(loss) == _strides_of_nontrivial_dims(expected)


@pytest.mark.parametrize("t_layout", LAYOUTS)
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixed_layouts(reduction, log_target, x_layout, t_layout):
    x, t = make_pair((6, 67), torch.float32, log_target, x_layout=x_layout, t_layout=t_layout)
    check_against_reference(x, t, reduction, log_target)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_permuted_leading_dims(reduction, log_target):
    # Leading dims permuted in memory (not mergeable into one row index) and
    # the distribution dim strided, differently for the two arguments.
    x = make_logprobs((5, 4, 3, 2 * 29)).permute(2, 0, 1, 3)[..., ::2]   # (3, 5, 4, 29)
    t = make_target((3, 5, 29, 4), log_target).permute(0, 1, 3, 2)      # (3, 5, 4, 29)
    assert x.shape == t.shape == (3, 5, 4, 29)
    check_against_reference(x, t, reduction, log_target)


def _strided_reversed_view(values):
    """A view with the values of `values`: every dim strided by 2 and the dim
    order reversed in memory (nothing can be merged or vectorised)."""
    n = values.dim()
    store = torch.full(tuple(2 * s for s in reversed(values.shape)), float("nan"), dtype=values.dtype)
    view = store[(slice(None, None, 2),) * n].permute(*reversed(range(n)))
    assert view.shape == values.shape
    view.copy_(values)
    return view


def _strided_view(values):
    store = torch.full(tuple(2 * s for s in values.shape), float("nan"), dtype=values.dtype)
    view = store[(slice(None, None, 2),) * values.dim()]
    view.copy_(values)
    return view


@pytest.mark.parametrize("x_view", ["reversed", "same"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_many_dims_strided(reduction, log_target, x_view):
    # 8-D, every dim strided: more non-mergeable dims than the kernel's offset
    # calculator takes. 'reversed': input's dims also in reverse memory order
    # (the two layouts disagree); 'same': both strided the same way.
    shape = (2,) * 7 + (3,)
    view = _strided_reversed_view if x_view == "reversed" else _strided_view
    x = view(make_logprobs(shape))
    t = _strided_view(make_target(shape, log_target))
    check_against_reference(x, t, reduction, log_target)


@pytest.mark.parametrize("ndim", [5, 6, 7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_many_leading_dims(ndim, reduction):
    shape = (2, 3, 1, 2, 3, 2, 1)[: ndim - 1] + (11,)
    x, t = make_pair(shape, torch.float64, False, "sliced")
    check_against_reference(x, t, reduction, False)
    x, t = make_pair(shape, torch.float32, True, "transposed")
    check_against_reference(x, t, reduction, True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_zero_dim_tensors(reduction, log_target):
    x = make_logprobs(())
    t = make_target((), log_target)
    if reduction == "row":
        with pytest.raises(ValueError, match="row"):
            kl_op(x, t, reduction, log_target)
        return
    check_against_reference(x, t, reduction, log_target)


# --------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((3, 5), (3, 5)), ((2, 1, 4), (3, 4)), ((4,), (2, 4))],
                         ids=["same", "bcast", "bcast_input"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction, log_target, shapes):
    xs, ts = shapes
    x = make_logprobs(xs, torch.float64).requires_grad_()
    t = make_target(ts, log_target, torch.float64)
    if not log_target:
        t = t.clamp(min=1e-3)  # keep finite differences away from p = 0
    t = t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_op(a, b, reduction, log_target), (x, t))
    # and with respect to one argument only
    assert torch.autograd.gradcheck(lambda a: kl_op(a, t.detach(), reduction, log_target), (x,))
    assert torch.autograd.gradcheck(lambda b: kl_op(x.detach(), b, reduction, log_target), (t,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_argument_requires_grad(reduction):
    x, t = make_pair((4, 33), torch.float32, False)
    exp_val, _ = ref_kl(x, t, reduction, False)
    w = torch.randn(exp_val.shape) if reduction in ("none", "row") else None
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, reduction, False, w)
    for want_x in (True, False):
        xa, ta = leaf(x, want_x), leaf(t, not want_x)
        loss = kl_op(xa, ta, reduction, False)
        assert loss.requires_grad
        obj = loss if w is None else (loss * w).sum()
        obj.backward()
        if want_x:
            assert ta.grad is None
            assert_close_scaled(xa.grad, rgx, mgx, what="grad_input only")
        else:
            assert xa.grad is None
            assert_close_scaled(ta.grad, rgt, mgt, what="grad_target only")
    # Neither: no graph at all.
    loss = kl_op(x, t, reduction, False)
    assert not loss.requires_grad and loss.grad_fn is None


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_scalar_grad_output_scaling(reduction):
    # backward multiplies by grad_output: a non-unit upstream gradient.
    x, t = make_pair((3, 50), torch.float64, False)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, reduction, False)
    (loss.sum() * 2.5).backward()
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, "sum", False, 2.5)
    assert_close_scaled(xa.grad, rgx, mgx)
    assert_close_scaled(ta.grad, rgt, mgt)


@pytest.mark.parametrize("w_layout", ["expanded_scalar", "transposed", "sliced"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_none_backward_grad_output_layouts(w_layout, log_target):
    x, t = make_pair((7, 45), torch.float32, log_target)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, "none", log_target)
    if w_layout == "expanded_scalar":
        g = torch.tensor(1.5).expand(loss.shape)   # zero strides, as from loss.sum() * 1.5
    else:
        g = apply_layout(torch.randn(loss.shape), w_layout)
    loss.backward(g)
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, "none", log_target, g)
    assert_close_scaled(xa.grad, rgx, mgx)
    assert_close_scaled(ta.grad, rgt, mgt)


@pytest.mark.parametrize("how", ["backward", "autograd_grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_raises_or_matches_torch(reduction, how):
    """Second derivatives: either a clear error, or PyTorch's values (for
    log_target=False, d2L/dx dt = -1 per element). Never silently missing or
    zero gradients."""
    x, t = make_pair((3, 5), torch.float64, False)

    def second(fn):
        xa, ta = leaf(x), leaf(t)
        loss = fn(xa, ta)
        (gx,) = torch.autograd.grad(loss.sum(), xa, create_graph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if how == "backward":
                gx.sum().backward()
                return ta.grad
            return torch.autograd.grad(gx.sum(), ta)[0]

    expected = second(lambda a, b: torch_kl(a, b, reduction, False))
    try:
        actual = second(lambda a, b: kl_op(a, b, reduction, False))
    except RuntimeError as e:
        msg = str(e)
        if how == "backward":   # the error must say what is wrong
            assert "batchkl" in msg and ("second" in msg or "double" in msg), f"unclear error: {msg}"
        return
    assert actual is not None, "second derivative silently missing"
    torch.testing.assert_close(actual, expected)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("t_dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixed_dtypes(reduction, x_dtype, t_dtype):
    x = make_logprobs((4, 37), x_dtype)
    t = make_target((4, 37), False, t_dtype)
    assert check_against_reference(x, t, reduction, False).dtype == torch.result_type(x, t)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "row"])
@pytest.mark.parametrize("combo", [
    (torch.float16, (6, 37), torch.float64, ()),     # 0-dim float64 target does not promote
    (torch.float64, (), torch.bfloat16, (6, 37)),    # 0-dim float64 input does not promote
    (torch.bfloat16, (6, 37), torch.float16, (37,)),  # bf16 + fp16 -> float32
    (torch.float32, (6, 1), torch.float64, (6, 37)),
], ids=["f16_0d64", "0d64_bf16", "bf16_f16", "f32_f64_bcast"])
def test_mixed_dtypes_and_dims(reduction, combo):
    xd, xs, td, ts = combo
    x = make_logprobs(xs, xd)
    t = make_target(ts, True, td)
    loss = check_against_reference(x, t, reduction, True)
    assert loss.dtype == torch.result_type(x, t)


def test_low_precision_accumulates_in_float32():
    # 1 + many tiny terms: a float16/bfloat16 accumulator would lose them all.
    for dtype in LOW_PRECISION:
        n = 1 << 16
        t = torch.full((n,), 2.0 ** -10, dtype=dtype)
        x = torch.full((n,), -4.0, dtype=dtype)   # each term 2^-10 * (log 2^-10 + 4) ~ -2.9e-3
        for reduction in ("sum", "row", "mean"):
            exp, mag = ref_kl(x, t, reduction, False)
            got = kl_op(x, t, reduction, False)
            assert_close_scaled(got, exp, mag, dtype, what=f"{dtype} {reduction}")
            # A low-precision running sum would be off by far more than its rounding.
            assert abs(got.double().item() - exp.item()) <= 2 * EPS[dtype] * abs(exp.item())


# --------------------------------------------------------------------------
# broadcasting
# --------------------------------------------------------------------------

BROADCAST_SHAPES = [
    ((4, 37), (37,)),
    ((4, 37), (1, 37)),
    ((4, 37), (4, 1)),
    ((4, 1), (4, 37)),
    ((37,), (4, 37)),
    ((2, 1, 37), (3, 37)),
    ((3, 1, 5), (1, 4, 5)),
    ((), (4, 37)),
    ((4, 37), ()),
    ((1,), (6,)),
    ((6,), (1,)),
]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}".replace(" ", ""))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting(reduction, log_target, dtype, shapes):
    xs, ts = shapes
    x = make_logprobs(xs, dtype)
    t = make_target(ts, log_target, dtype)
    loss = check_against_reference(x, t, reduction, log_target)
    bshape = torch.broadcast_shapes(x.shape, t.shape)
    if reduction == "row":
        assert loss.shape == bshape[:-1]
    elif reduction == "none":
        assert loss.shape == bshape
    else:
        assert loss.shape == ()


# --------------------------------------------------------------------------
# special values
# --------------------------------------------------------------------------

def _special_pair(log_target, dtype, layout):
    """Rows mixing zero-probability targets with finite, -inf and NaN inputs,
    long enough (67 columns) to go through vector code and scalar tails."""
    V = 67
    x = make_logprobs((6, V), torch.float64)
    t = make_target((6, V), False, torch.float64)
    zero = torch.rand(6, V) < 0.3
    zero[0, :] = True                  # a row of zero probabilities only
    zero[1, 5] = True
    t = torch.where(zero, torch.zeros_like(t), t)
    x[1, 5] = -math.inf                 # t = 0, x = -inf: PyTorch gives NaN
    x[2][zero[2]] = -math.inf
    x[3][zero[3]] = math.nan            # t = 0, x = NaN: still 0 by the rule
    x[0, ::3] = -math.inf
    if log_target:
        t = torch.log(t)                # 0 -> -inf
    x = apply_layout(x.to(dtype), layout)
    t = apply_layout(t.to(dtype), layout)
    return x, t, zero


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_probability_rule(reduction, log_target, dtype, layout):
    x, t, zero = _special_pair(log_target, dtype, layout)
    exp_val, exp_mag = ref_kl(x, t, reduction, log_target)
    assert not torch.isnan(exp_val).any()
    w = torch.randn(exp_val.shape, dtype=dtype) if reduction in ("none", "row") else None
    loss, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), x, t, reduction, w)
    assert not torch.isnan(loss).any(), "zero-probability elements must not produce NaN"
    assert_close_scaled(loss, exp_val, exp_mag, dtype, what="loss")
    if reduction == "none":
        assert (loss[zero] == 0).all()
    if reduction == "row":
        assert loss[0].item() == 0.0   # the all-zero row
    assert not torch.isnan(gx).any() and not torch.isnan(gt).any()
    assert (gx[zero] == 0).all() and (gt[zero] == 0).all()
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, reduction, log_target, w)
    assert_close_scaled(gx, rgx, mgx, dtype, what="grad_input")
    assert_close_scaled(gt, rgt, mgt, dtype, what="grad_target")
    # Elsewhere: PyTorch's answer.
    tl = torch_kl(x, t, "none", log_target)
    ours = kl_op(x, t, "none", log_target)
    assert torch.isnan(tl[1, 5]), "PyTorch gives NaN for t=0, x=-inf (the case the rule fixes)"
    assert_close_scaled(ours[~zero], tl[~zero].double(), ref_kl(x, t, "none", log_target)[1][~zero],
                        tol=TORCH_TOL[dtype])


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_zero_probability_negative_zero_target(log_target):
    # -0.0 is a zero probability as well.
    x = torch.tensor([-math.inf, math.nan, -1.0, 0.0])
    t = torch.tensor([-0.0, -0.0, -0.0, -0.0])
    if log_target:
        t = torch.full((4,), -math.inf)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, "none", log_target)
    assert torch.equal(loss, torch.zeros(4))
    loss.sum().backward()
    assert torch.equal(xa.grad.abs(), torch.zeros(4)) and torch.equal(ta.grad.abs(), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_propagation(reduction, log_target, dtype):
    V = 41
    x = make_logprobs((5, V), torch.float64)
    t = make_target((5, V), log_target, torch.float64)
    x[1, 3] = math.nan          # NaN input where p > 0
    t[2, 40] = math.nan         # NaN target (not a zero probability)
    x[3, 17] = math.nan
    t[3, 17] = math.nan
    x, t = x.to(dtype), t.to(dtype)
    exp_val, exp_mag = ref_kl(x, t, reduction, log_target)
    w = torch.randn(exp_val.shape, dtype=dtype) if reduction in ("none", "row") else None
    loss, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), x, t, reduction, w)
    assert_close_scaled(loss, exp_val, exp_mag, dtype, what="loss")   # NaN positions included
    if reduction == "row":
        assert torch.isnan(loss).tolist() == [False, True, True, True, False]
    elif reduction != "none":
        assert torch.isnan(loss)
    # Same NaN pattern as PyTorch, values and gradients.
    tl, tgx, tgt = run_and_grad(lambda a, b: torch_kl(a, b, reduction, log_target), x, t, reduction, w)
    assert torch.equal(torch.isnan(loss), torch.isnan(tl))
    assert torch.equal(torch.isnan(gx), torch.isnan(tgx))
    assert torch.equal(torch.isnan(gt), torch.isnan(tgt))
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, reduction, log_target, w)
    assert_close_scaled(gx, rgx, mgx, dtype, what="grad_input")
    assert_close_scaled(gt, rgt, mgt, dtype, what="grad_target")


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_infinite_input(log_target):
    # x = -inf where p > 0 gives +inf loss, x = +inf gives -inf: as PyTorch.
    x = torch.tensor([-math.inf, math.inf, -1.0])
    t = torch.tensor([0.5, 0.25, 0.25])
    if log_target:
        t = t.log()
    ours = kl_op(x, t, "none", log_target)
    assert torch.equal(ours, torch_kl(x, t, "none", log_target))
    assert ours[0] == math.inf and ours[1] == -math.inf


# --------------------------------------------------------------------------
# 'row'
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("shape", [(8, 10), (3, 4, 257), (2, 9000)], ids=str)
def test_row_matches_categorical_kl(shape, log_target, dtype):
    p = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, -1)
    expected = kl_divergence(Categorical(probs=p), Categorical(probs=q))   # KL(p || q)
    target = p.log() if log_target else p
    got = kl_op(q.log().to(dtype), target.to(dtype), "row", log_target)
    assert got.shape == shape[:-1] and got.dtype == dtype
    _, mag = ref_kl(q.log().to(dtype), target.to(dtype), "row", log_target)
    # Categorical renormalises; the inputs here are normalised to float64
    # precision, rounding to `dtype` perturbs each term by ~eps * magnitude.
    assert_close_scaled(got, expected, mag, tol=dict(mag=4 * EPS[dtype] + TOL[dtype]["mag"], rel=0, abs=0))
    assert (got > -1e-6).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_row_matches_none_sum(layout, log_target):
    x, t = make_pair((3, 5, 300), torch.float64, log_target, layout)
    row = kl_op(x, t, "row", log_target)
    none_sum = F.kl_div(x, t, reduction="none", log_target=log_target).sum(-1)
    torch.testing.assert_close(row, none_sum, rtol=1e-12, atol=1e-12)
    # and 'row' sums to 'sum'
    torch.testing.assert_close(row.sum(), kl_op(x, t, "sum", log_target), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# empty tensors
# --------------------------------------------------------------------------

EMPTY_SHAPES = [((0,), (0,)), ((0, 5), (0, 5)), ((5, 0), (5, 0)), ((2, 0, 3), (2, 0, 3)), ((0, 0), (0, 0)),
                ((0, 5), (5,)), ((3, 0), (1, 0)), ((0, 1), (0, 7))]


@pytest.mark.parametrize("shapes", EMPTY_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}".replace(" ", ""))
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(reduction, log_target, shapes):
    xs, ts = shapes
    bshape = torch.broadcast_shapes(xs, ts)
    x = leaf(torch.randn(xs))
    t = leaf(torch.rand(ts))
    loss = kl_op(x, t, reduction, log_target)
    expected = torch_kl(x.detach(), t.detach(), reduction, log_target)
    assert loss.dtype == expected.dtype
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0.0
    elif reduction == "row":
        assert loss.shape == bshape[:-1] and (loss == 0).all()
    obj = loss.sum() if loss.dim() else loss
    if reduction == "mean":
        obj = torch.nan_to_num(obj)   # NaN * 0 gradients are fine either way; shapes are what matter
    gx, gt = torch.autograd.grad(obj, (x, t), allow_unused=False)
    assert gx.shape == x.shape and gt.shape == t.shape
    assert not torch.isnan(gx).any() and not torch.isnan(gt).any()


# --------------------------------------------------------------------------
# determinism, batch invariance, thread invariance
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_deterministic(reduction, dtype):
    x, t = make_pair((33, 9001), dtype, True)
    w = torch.randn(x.shape if reduction == "none" else x.shape[:-1], dtype=dtype)
    runs = []
    for _ in range(3):
        loss, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, reduction, True), x, t, reduction,
                                    w if reduction in ("none", "row") else None)
        runs.append((loss, gx, gt))
    for other in runs[1:]:
        for a, b, what in zip(runs[0], other, ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("V", [1, 37, 1000, 20000])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_row_batch_invariance(V, log_target, dtype):
    rx = make_logprobs((V,), dtype)
    rt = make_target((V,), log_target, dtype)
    alone = kl_op(rx, rt, "row", log_target)
    assert alone.shape == ()
    assert_bitwise_equal(kl_op(rx[None], rt[None], "row", log_target)[0], alone, "(1, V) batch")
    for n in (2, 5, 48):
        bx = make_logprobs((n, V), dtype)
        bt = make_target((n, V), log_target, dtype)
        for pos in sorted({0, n // 2, n - 1}):
            bx[pos] = rx
            bt[pos] = rt
            out = kl_op(bx, bt, "row", log_target)
            assert_bitwise_equal(out[pos], alone, f"row {pos} of {n}")
            # ... and inside a 3-D batch
            out3 = kl_op(bx.view(1, n, V).expand(2, n, V), bt.view(1, n, V), "row", log_target)
            assert_bitwise_equal(out3[1, pos], alone, f"row {pos} of (2, {n})")
            # The row's fused gradients do not depend on the batch either.
            _, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, "row", log_target), bx, bt, "row",
                                     torch.ones(n, dtype=dtype))
            _, gx1, gt1 = run_and_grad(lambda a, b: kl_op(a, b, "row", log_target), rx, rt, "row",
                                       torch.ones((), dtype=dtype))
            assert_bitwise_equal(gx[pos], gx1, "grad_input row")
            assert_bitwise_equal(gt[pos], gt1, "grad_target row")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("V", [7, 33, 50, 1000])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_none_batch_invariance(V, log_target, dtype):
    """reduction='none': a row's elementwise losses and their gradients are
    bitwise the same alone and inside a batch. The CPU kernel walks 'none'
    as one run over the whole tensor, so where its tiles' ends fall depends on
    the batch; the elements past the last full vector took the scalar
    logf / expf, which round differently from the vector functions (a row of
    50 float32 log-targets, alone and as the first of 64: elements 37 and 42
    differed, 2026-11-29)."""
    n = 64
    x = make_logprobs((n, V), dtype)
    t = make_target((n, V), log_target, dtype)
    w = torch.randn(n, V).to(dtype)

    def fn(a, b):
        return kl_op(a, b, "none", log_target)

    inside = run_and_grad(fn, x, t, "none", w)
    for pos in (0, 1, 37, n - 1):
        alone = run_and_grad(fn, x[pos].clone(), t[pos].clone(), "none", w[pos].clone())
        for a, b, what in zip(alone, inside, ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b[pos], f"{what} of row {pos} of {n}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_thread_count_invariance(reduction):
    x, t = make_pair((1024, 3000), torch.float32, False)
    w = torch.randn(x.shape if reduction == "none" else (1024,)) if reduction in ("none", "row") else None
    results = []
    for n in (1, 2, 1, 2):
        torch.set_num_threads(n)
        results.append(run_and_grad(lambda a, b: kl_op(a, b, reduction, False), x, t, reduction, w))
    for other in results[1:]:
        for a, b, what in zip(results[0], other, ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b, what)
    exp, mag = ref_kl(x, t, reduction, False)
    assert_close_scaled(results[0][0], exp, mag)


# --------------------------------------------------------------------------
# the internal ops
# --------------------------------------------------------------------------

@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_fused_direct(reduction, log_target):
    x = make_logprobs((4, 1, 29), torch.float32)
    t = make_target((3, 29), log_target, torch.float32)
    bshape = (4, 3, 29)
    exp_val, exp_mag = ref_kl(x, t, reduction, log_target)
    for want_x in (False, True):
        for want_t in (False, True):
            loss, gi, gt, gs = torch.ops.batchkl.kl_fused(x, t, reduction, log_target, want_x, want_t)
            assert_close_scaled(loss, exp_val, exp_mag)
            assert gs.dtype == torch.float32 and gs.numel() == 0  # (float32: the gradients are scaled already)
            fused = reduction != "none"
            for g, want in ((gi, want_x), (gt, want_t)):
                assert g.dtype == torch.float32
                assert g.shape == (bshape if want and fused else (0,))
            if reduction in ("none",):
                continue
            # Pre-scaled gradients in the broadcast shape (before summing to the argument shape).
            xe, te = x.expand(bshape), t.expand(bshape)
            upstream = torch.ones(bshape[:-1]) if reduction == "row" else 1.0
            (rgx, mgx), (rgt, mgt) = ref_grads(xe, te, reduction, log_target, upstream)
            if reduction == "batchmean":
                # ref_grads(xe, ...) divides by xe.size(0) == x.size(0): same divisor.
                pass
            if want_x:
                assert_close_scaled(gi, rgx, mgx, what="kl_fused grad_input")
            if want_t:
                assert_close_scaled(gt, rgt, mgt, what="kl_fused grad_target")


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_kl_none_backward_direct(log_target):
    x = make_logprobs((5, 1, 23), torch.float64)
    t = make_target((4, 23), log_target, torch.float64)
    g = torch.randn(5, 4, 23, dtype=torch.float64)
    (rgx, mgx), (rgt, mgt) = ref_grads(x.expand(5, 4, 23), t.expand(5, 4, 23), "none", log_target, g)
    for want_x in (False, True):
        for want_t in (False, True):
            gi, gt = torch.ops.batchkl.kl_none_backward(g, x, t, log_target, want_x, want_t)
            assert gi.shape == ((5, 4, 23) if want_x else (0,))
            assert gt.shape == ((5, 4, 23) if want_t else (0,))
            if want_x:
                assert_close_scaled(gi, rgx, mgx)
            if want_t:
                assert_close_scaled(gt, rgt, mgt)


def test_same_tensor_for_both_arguments():
    x = make_logprobs((3, 17), torch.float64)
    for log_target in (False, True):
        a = leaf(x if log_target else x.exp())
        loss = kl_op(a, a, "sum", log_target)
        loss.backward()
        b = leaf(x if log_target else x.exp())
        F.kl_div(b, b, reduction="sum", log_target=log_target).backward()
        torch.testing.assert_close(loss.detach(), torch.zeros((), dtype=torch.float64) if log_target else
                                   F.kl_div(b.detach(), b.detach(), reduction="sum"), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


def test_front_door_matches_op():
    x, t = make_pair((4, 21), torch.float32, True)
    for reduction in REDUCTIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = batchkl_ext.kl_div(x, t, reduction=reduction, log_target=True)
        assert_bitwise_equal(a, kl_op(x, t, reduction, True), reduction)


# --------------------------------------------------------------------------
# layout of the 'none' output
# --------------------------------------------------------------------------

def _permuted(shape, perm, values):
    """values (of `shape`) stored with dims in the order `perm` (outermost first)."""
    store = values.permute(*perm).contiguous()
    inv = [perm.index(d) for d in range(len(perm))]
    return store.permute(*inv)


STRIDE_CASES = [
    pytest.param("both_transposed", (0, 1), (1, 0), (1, 0), id="both_transposed"),
    pytest.param("x_transposed", (0, 1), (1, 0), (0, 1), id="x_transposed"),
    pytest.param("t_transposed", (0, 1), (0, 1), (1, 0), id="t_transposed"),
    pytest.param("3d_both_permuted", (0, 1, 2), (2, 0, 1), (2, 0, 1), id="3d_both_permuted"),
    pytest.param("3d_x_permuted", (0, 1, 2), (1, 2, 0), (0, 1, 2), id="3d_x_permuted"),
]


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("name,_,x_perm,t_perm", STRIDE_CASES)
def test_none_output_strides_match_torch(name, _, x_perm, t_perm, log_target):
    shape = (4, 5) if len(x_perm) == 2 else (3, 4, 5)
    x = _permuted(shape, list(x_perm), make_logprobs(shape))
    t = _permuted(shape, list(t_perm), make_target(shape, log_target))
    ours = kl_op(x, t, "none", log_target)
    theirs = torch_kl(x, t, "none", log_target)
    assert ours.stride() == theirs.stride()
    exp, mag = ref_kl(x, t, "none", log_target)
    assert_close_scaled(ours, exp, mag)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("case", ["x_expanded_t_transposed", "x_bcast_row", "t_bcast_col", "both_sliced"])
def test_none_output_strides_broadcast(case, log_target):
    if case == "x_expanded_t_transposed":
        x = make_logprobs((5,)).expand(4, 5)
        t = _permuted((4, 5), [1, 0], make_target((4, 5), log_target))
    elif case == "x_bcast_row":
        x = make_logprobs((5,))
        t = make_target((4, 5), log_target)
    elif case == "t_bcast_col":
        x = make_logprobs((4, 5))
        t = make_target((4, 1), log_target)
    else:
        x = make_logprobs((4, 10))[:, ::2]
        t = make_target((4, 10), log_target)[:, ::2]
    ours = kl_op(x, t, "none", log_target)
    theirs = torch_kl(x, t, "none", log_target)
    assert ours.stride() == theirs.stride()
    exp, mag = ref_kl(x, t, "none", log_target)
    assert_close_scaled(ours, exp, mag)
