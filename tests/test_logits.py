"""The distillation ops: torch.ops.batchkl.kl_with_logits and its front doors
kl_div_with_logits / jsd_with_logits / kl_divergence (SPEC.md sections 2, 3).

Written from the spec. References, all in float64 from the same (rounded)
inputs, with gradients from torch.autograd.grad:

* ``ref_logits``: TRL's GKDTrainer.generalized_jsd_loss rewritten with the
  zero-probability rule (an entry with probability 0 contributes 0, never
  NaN, also where student and teacher are both -inf), mask select and
  num_items_in_batch, plus the magnitude of the terms (for tolerances).
* ``trl_generalized_jsd_loss``: TRL's function literally (no zero rule), to
  check that ``ref_logits`` and the op agree with it where it is finite.
* the PyTorch composite F.kl_div(log_softmax(x/T), log_softmax(t/T), log_target=True).
"""
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import batchkl_ext
from conftest import (EPS, TORCH_TOL, apply_layout, assert_bitwise_equal, assert_close_scaled, leaf)

NEG_INF = float("-inf")
LOGIT_REDUCTIONS = ("none", "sum", "mean", "batchmean")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DT_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}

# Tolerances against the float64 reference: `mag` per unit of term magnitude
# (the kernel works in float32 for every dtype but float64), `rel` for the
# roundings of the result to the output dtype (a gradient is rounded when the
# forward stores it and again when backward scales it), `abs` floor (fp16
# subnormals; float32 underflow of exp).
TOL = {
    torch.float64: dict(mag=2e-15, rel=1e-15, abs=1e-300),
    torch.float32: dict(mag=1e-6, rel=4e-7, abs=1e-30),
    torch.float16: dict(mag=1e-5, rel=2 * EPS[torch.float16], abs=2e-7),
    torch.bfloat16: dict(mag=1e-5, rel=2 * EPS[torch.bfloat16], abs=1e-30),
}


def _coarser(*dtypes):
    return max(dtypes, key=lambda d: EPS[d])


def op(x, t, **kw):
    return torch.ops.batchkl.kl_with_logits(x, t, **kw)


# --------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------

def _kl_terms(la, lb, floor=NEG_INF):
    """exp(la) * (la - lb) elementwise, 0 where la <= floor (-inf: where the
    probability is exactly 0); autograd-safe."""
    zero = la <= floor
    z = torch.zeros_like(la)
    las = torch.where(zero, z, la)
    lbs = torch.where(zero, z, lb)
    return torch.where(zero, z, las.exp() * (las - lbs))


def _mixture(lq, lp, beta):
    """log(beta * P + (1 - beta) * Q) as TRL computes it (logsumexp of the
    stacked, shifted log-probs), -inf where both are -inf; autograd-safe."""
    both = (lq == NEG_INF) & (lp == NEG_INF)
    z = torch.zeros_like(lq)
    lqs, lps = torch.where(both, z, lq), torch.where(both, z, lp)
    lm = torch.logsumexp(torch.stack([lqs + math.log1p(-beta), lps + math.log(beta)]), dim=0)
    return torch.where(both, torch.full_like(lm, NEG_INF), lm)


def _jsd_elem(lq, lp, beta, floor=NEG_INF):
    if beta == 0:
        return _kl_terms(lp, lq, floor), None
    if beta == 1:
        return _kl_terms(lq, lp, floor), None
    lm = _mixture(lq, lp, beta)
    return beta * _kl_terms(lp, lm, floor) + (1 - beta) * _kl_terms(lq, lm, floor), lm


def _row_shift(v):
    """The largest finite value of each row (0 for a row with none), detached."""
    v = v.detach()
    if v.shape[-1] == 0:  # rows of no columns
        return torch.zeros(v.shape[:-1] + (1,), dtype=v.dtype)
    m = torch.where(torch.isfinite(v), v, torch.full_like(v, NEG_INF)).amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _fin_abs(v):
    return torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v))


class Ref:
    pass


def ref_logits(x, t, *, beta=0.0, temperature=1.0, reduction="batchmean", mask=None, num_items=None,
               w=None, gscale=1.0, prob_floor=NEG_INF):
    """float64 reference of kl_with_logits: loss, gradients of the objective
    (loss * gscale for a scalar result, (loss * w).sum() for per-row results)
    w.r.t. input and target, and the magnitudes of all three. prob_floor: a
    log-probability at or below which a probability counts as 0 (where it
    underflows in the kernel's working precision)."""
    T = float(temperature)
    x64 = x.detach().to(torch.float64).requires_grad_()
    t64 = t.detach().to(torch.float64).requires_grad_()
    V = x.shape[-1]
    keep = None
    xs, ts = x64, t64
    if mask is not None:
        keep = mask.detach().to(torch.bool)
        k = keep.unsqueeze(-1)
        # Excluded rows are replaced by zeros: whatever they hold (NaN, -inf)
        # gives no value and no gradient.
        xs = torch.where(k, x64, torch.zeros_like(x64))
        ts = torch.where(k, t64, torch.zeros_like(t64))
    # Each row shifted by its largest finite logit before the scaling by 1 / T
    # (softmax does not see a shift): the float64 reference then keeps the
    # digits of the logits' differences whatever their size (x / T of logits
    # around 1e30 is rounded to 1e14), as the kernels must (test_huge_logits).
    xs, ts = xs - _row_shift(xs), ts - _row_shift(ts)
    lq = F.log_softmax(xs / T, dim=-1)
    lp = F.log_softmax(ts / T, dim=-1)
    elem, lm = _jsd_elem(lq, lp, beta, prob_floor)
    if keep is not None:
        elem = torch.where(keep.unsqueeze(-1), elem, torch.zeros_like(elem))
    rows = elem.sum(-1)
    per_row = num_items is None and reduction == "none"
    if num_items is not None:
        div = float(num_items)
    elif reduction == "none":
        div = None
    elif reduction == "sum":
        div = 1.0
    elif reduction == "mean":
        div = (max(float(keep.sum()), 1.0) if keep is not None else float(rows.numel())) * V
    elif reduction == "batchmean":
        div = max(float(keep.sum()), 1.0) if keep is not None else float(x.shape[0])
    else:
        raise ValueError(reduction)
    if per_row:
        loss = rows
        wr = w.detach().to(torch.float64)
        obj = (loss * wr).sum()
    else:
        loss = rows.sum() / div
        wr = torch.full(rows.shape, gscale / div if div else math.inf, dtype=torch.float64)  # 0 rows: 1/0
        obj = loss * gscale
    gx, gt = torch.autograd.grad(obj, (x64, t64), allow_unused=True)
    r = Ref()
    r.loss, r.gx, r.gt = loss.detach(), gx, gt
    with torch.no_grad():
        P, Q = lp.exp(), lq.exp()
        A = (_fin_abs(lp) + _fin_abs(lq) + _fin_abs(xs / T) + _fin_abs(ts / T)
             + _fin_abs(torch.logsumexp(xs / T, -1, keepdim=True))
             + _fin_abs(torch.logsumexp(ts / T, -1, keepdim=True)) + 1)
        if lm is not None:
            A = A + _fin_abs(lm)
        emag = (P + Q) * A
        if keep is not None:
            wr = wr * keep
            emag = emag * keep.unsqueeze(-1)
        rmag = emag.sum(-1)
        r.loss_mag = rmag if per_row else rmag.sum() / div
        gmag = (wr.abs() / T).unsqueeze(-1) * (P + Q) * (A + rmag.unsqueeze(-1))
        # A probability is exp() of a difference of terms of size ~A, so it
        # carries a relative rounding error ~eps * A (the float64 reference as
        # well), and so does each gradient element: visible on tiny elements
        # of rows with logits in the thousands.
        r.gx_mag = gmag if gx is None else gmag + _fin_abs(gx) * A
        r.gt_mag = gmag if gt is None else gmag + _fin_abs(gt) * A
    return r


def trl_generalized_jsd_loss(student_logits, teacher_logits, mask=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    """TRL's GKDTrainer.generalized_jsd_loss, literally (labels != -100 given as `mask`)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if mask is not None:
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if mask is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


def torch_composite(x, t, temperature=1.0, reduction="batchmean"):
    """F.kl_div of the log-softmaxes; 'none' summed per row."""
    lq = F.log_softmax(x / temperature, -1)
    lp = F.log_softmax(t / temperature, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reduction == "none":
            return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
        return F.kl_div(lq, lp, reduction=reduction, log_target=True)


# --------------------------------------------------------------------------
# inputs and the full check of one call
# --------------------------------------------------------------------------

def make_logits(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def make_mask(rows_shape, kind):
    if kind is None:
        return None
    if kind == "all_true":
        return torch.ones(rows_shape, dtype=torch.bool)
    if kind == "all_false":
        return torch.zeros(rows_shape, dtype=torch.bool)
    m = torch.rand(rows_shape) < 0.6
    if m.dim() and m.numel() > 1:
        m.view(-1)[0], m.view(-1)[-1] = True, False   # at least one kept and one dropped row
    return m


def run_op(fn, x, t, *, grad_target=True, w=None, gscale=1.0):
    """loss = fn(x, t) on fresh leaves; the objective is loss * gscale (scalar)
    or (loss * w).sum() (per row). Returns loss, grad_x, grad_t (or None)."""
    xl = leaf(x)
    tl = leaf(t, grad_target)
    loss = fn(xl, tl)
    obj = (loss * w).sum() if w is not None else loss * gscale
    grads = torch.autograd.grad(obj, (xl, tl) if grad_target else (xl,))
    return loss.detach(), grads[0], grads[1] if grad_target else None


def check_logits(x, t, *, beta=0.0, temperature=1.0, reduction="batchmean", mask=None, num_items=None,
                 fn=None, grad_target=True, compare_torch=None):
    """Value, dtype, shape and both gradients of one call against ref_logits
    (and, for beta=0 without mask/num_items, against PyTorch's composite where it is finite)."""
    rdtype = torch.result_type(x, t)
    per_row = num_items is None and reduction == "none"
    row_shape = x.shape[:-1]
    w = torch.randn(row_shape, dtype=torch.float64).to(rdtype) if per_row else None
    gscale = 3.0
    if fn is None:
        nt = None if num_items is None else (num_items if isinstance(num_items, torch.Tensor)
                                             else torch.tensor(float(num_items)))

        def fn(a, b):
            return op(a, b, beta=beta, temperature=temperature, reduction=reduction, mask=mask,
                      num_items_in_batch=nt)
    loss, gx, gt = run_op(fn, x, t, grad_target=grad_target, w=w, gscale=gscale)
    ni = None if num_items is None else float(num_items)
    ref = ref_logits(x, t, beta=beta, temperature=temperature, reduction=reduction, mask=mask, num_items=ni,
                     w=w, gscale=gscale)
    what = f"beta={beta} T={temperature} {reduction} mask={mask is not None} n={num_items} {rdtype}"
    assert loss.dtype == rdtype, what
    assert loss.shape == ref.loss.shape, what
    assert_close_scaled(loss, ref.loss, ref.loss_mag, tol=TOL[rdtype], what="loss " + what)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_close_scaled(gx, ref.gx, ref.gx_mag, tol=TOL[_coarser(rdtype, x.dtype)], what="grad_input " + what)
    if grad_target:
        assert gt.dtype == t.dtype and gt.shape == t.shape
        assert_close_scaled(gt, ref.gt, ref.gt_mag, tol=TOL[_coarser(rdtype, t.dtype)], what="grad_target " + what)
    if mask is not None:
        dropped = ~mask.bool()
        assert (gx[dropped] == 0).all(), "excluded rows must get exactly 0 gradient (input)"
        if grad_target:
            assert (gt[dropped] == 0).all(), "excluded rows must get exactly 0 gradient (target)"
        if per_row:
            assert (loss[dropped] == 0).all()
    if compare_torch is None:
        compare_torch = beta == 0 and mask is None and num_items is None
    if compare_torch:
        tl, tgx, tgt = run_op(lambda a, b: torch_composite(a, b, temperature, reduction), x, t,
                              grad_target=grad_target, w=w, gscale=gscale)
        ttol = TOL[rdtype] if rdtype == torch.float64 else TORCH_TOL[_coarser(rdtype, x.dtype, t.dtype)]
        fin = torch.isfinite(tl)
        if fin.all():
            assert_close_scaled(loss, tl.double(), ref.loss_mag, tol=ttol, what="loss vs torch " + what)
            assert_close_scaled(gx, tgx.double(), ref.gx_mag, tol=ttol, what="grad_input vs torch " + what)
            if grad_target:
                assert_close_scaled(gt, tgt.double(), ref.gt_mag, tol=ttol, what="grad_target vs torch " + what)
        elif per_row:
            assert_close_scaled(loss[fin], tl[fin].double(), ref.loss_mag[fin], tol=ttol, what="loss vs torch")
    return loss, gx, gt


# --------------------------------------------------------------------------
# values and gradients against the references
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 19)], ids=["NV", "BTV"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_matches_reference(dtype, beta, temperature, reduction, shape):
    x, t = make_logits(shape, dtype), make_logits(shape, dtype)
    check_logits(x, t, beta=beta, temperature=temperature, reduction=reduction)


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 19), (37,)], ids=["NV", "BTV", "V"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_kl_div_with_logits_equals_torch_composite(dtype, temperature, reduction, shape):
    # 'sum'/'mean'/'batchmean' equal F.kl_div(log_softmax(x/T), log_softmax(t/T), log_target=True)
    # (batchmean divides by input.size(0): B for (B, T, V), V for a 1-D input).
    x, t = make_logits(shape, dtype), make_logits(shape, dtype)
    check_logits(x, t, temperature=temperature, reduction=reduction, compare_torch=True,
                 fn=lambda a, b: batchkl_ext.kl_div_with_logits(a, b, temperature=temperature, reduction=reduction))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_matches_trl_generalized_jsd_loss(beta, reduction, temperature, masked):
    """jsd_with_logits (float64) against TRL's function on (B, T, V) logits,
    values and gradients; 'none' is per row here, elementwise (and
    mask-selected) there, and TRL's unmasked 'batchmean' is per token (B*T)."""
    x, t = make_logits((2, 6, 23), torch.float64), make_logits((2, 6, 23), torch.float64)
    mask = make_mask((2, 6), "random") if masked else None
    w = torch.randn(2, 6, dtype=torch.float64)
    xa, ta, xb, tb = leaf(x), leaf(t), leaf(x), leaf(t)
    ours = batchkl_ext.jsd_with_logits(xa, ta, beta=beta, temperature=temperature, reduction=reduction, mask=mask)
    theirs = trl_generalized_jsd_loss(xb, tb, mask, beta=beta, temperature=temperature, reduction=reduction)
    if reduction == "none":
        theirs = theirs.sum(-1)
        wk = w[mask] if masked else w
        (ours * w).sum().backward()
        (theirs * wk).sum().backward()
        ours = ours[mask] if masked else ours
    else:
        ours.backward()
        theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-11, atol=1e-13)
    # and the reference used elsewhere agrees with TRL too
    ref = ref_logits(x, t, beta=beta, temperature=temperature, reduction=reduction, mask=mask, w=w)
    r = ref.loss[mask] if masked and reduction == "none" else ref.loss
    if reduction == "batchmean" and not masked:
        r = r * x.shape[0] / (x.shape[0] * x.shape[1])   # ref_logits follows F.kl_div: / B
    torch.testing.assert_close(r, theirs.detach(), rtol=1e-12, atol=1e-13)


def test_front_doors_equal_the_op():
    x, t = make_logits((3, 4, 29)), make_logits((3, 4, 29))
    mask = make_mask((3, 4), "random")
    for red in LOGIT_REDUCTIONS:
        assert_bitwise_equal(batchkl_ext.kl_div_with_logits(x, t, temperature=2.0, reduction=red, mask=mask),
                             op(x, t, beta=0.0, temperature=2.0, reduction=red, mask=mask))
        assert_bitwise_equal(batchkl_ext.jsd_with_logits(x, t, temperature=0.5, reduction=red, mask=mask),
                             op(x, t, beta=0.5, temperature=0.5, reduction=red, mask=mask))
        # unmasked batchmean of (B, T, V): per token (TRL), the op's num_items_in_batch = B * T
        per_token = torch.tensor(12.0, dtype=torch.float64) if red == "batchmean" else None
        assert_bitwise_equal(batchkl_ext.jsd_with_logits(x, t, beta=0.2, reduction=red),
                             op(x, t, beta=0.2, reduction=red, num_items_in_batch=per_token))
    # defaults: batchmean, T=1, beta=0 (op) / 0.5 (jsd)
    assert_bitwise_equal(batchkl_ext.kl_div_with_logits(x, t), op(x, t, beta=0.0, temperature=1.0, reduction="batchmean"))
    assert_bitwise_equal(torch.ops.batchkl.kl_with_logits(x, t), op(x, t, beta=0.0, reduction="batchmean"))
    assert_bitwise_equal(batchkl_ext.jsd_with_logits(x, t),
                         op(x, t, beta=0.5, num_items_in_batch=torch.tensor(12.0, dtype=torch.float64)))
    assert_bitwise_equal(torch.ops.batchkl.kl_with_logits(x, t, 0.3, 2.0, "sum", mask, None, False),
                         op(x, t, beta=0.3, temperature=2.0, reduction="sum", mask=mask))


def test_front_door_signatures():
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    E = inspect.Parameter.empty
    assert params(batchkl_ext.kl_div_with_logits) == [
        ("input", P, E), ("target", P, E), ("temperature", K, 1.0), ("reduction", K, "batchmean"),
        ("mask", K, None), ("num_items_in_batch", K, None)]
    assert params(batchkl_ext.jsd_with_logits) == [
        ("input", P, E), ("target", P, E), ("beta", K, 0.5), ("temperature", K, 1.0), ("reduction", K, "batchmean"),
        ("mask", K, None), ("num_items_in_batch", K, None)]
    assert params(batchkl_ext.kl_divergence) == [("p", P, E), ("q", P, E), ("kind", K, "probs"), ("dim", K, -1)]
    for name in ("kl_div_with_logits", "jsd_with_logits", "kl_divergence"):
        assert name in batchkl_ext.__all__


@pytest.mark.parametrize("V", [1, 2, 3, 7, 8, 16, 17, 31, 64, 257, 1000, 4099])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_vocab_sizes(dtype, beta, V):
    x, t = make_logits((3, V), dtype), make_logits((3, V), dtype)
    check_logits(x, t, beta=beta, temperature=0.7, reduction="none")
    check_logits(x, t, beta=beta, temperature=1.0, reduction="batchmean")


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (3, 0)], ids=["0xV", "Bx0xV", "Nx0"])
def test_empty(shape):
    """Empty batches (and an empty vocabulary) give what PyTorch's composite gives."""
    x, t = make_logits(shape), make_logits(shape)
    for red in LOGIT_REDUCTIONS:
        xl, tl = leaf(x), leaf(t)
        ours = op(xl, tl, reduction=red)
        theirs = torch_composite(x, t, reduction=red)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        gx, gt = torch.autograd.grad(ours.sum(), (xl, tl))
        assert gx.shape == x.shape and gt.shape == t.shape
        if x.numel() == 0:
            continue
        assert (gx == 0).all() and (gt == 0).all()


def test_vocab_size_one_is_zero():
    x, t = make_logits((4, 1)), make_logits((4, 1))
    loss, gx, gt = run_op(lambda a, b: op(a, b, reduction="none"), x, t, w=torch.ones(4))
    assert torch.equal(loss, torch.zeros(4)) and torch.equal(gx, torch.zeros(4, 1)) and torch.equal(gt, torch.zeros(4, 1))


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(4, 131072), (2, 262144)], ids=["4x128k", "2x256k"])
def test_large_vocab(shape, beta):
    x, t = make_logits(shape), make_logits(shape)
    check_logits(x, t, beta=beta, temperature=2.0, reduction="batchmean")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.bfloat16, 60.0), (torch.float16, 60.0)],
                         ids=["f32-1e4", "bf16-60", "f16-60"])
def test_large_magnitude_logits(dtype, scale, beta):
    x = (torch.rand(6, 300, dtype=torch.float64) * 2 - 1) * scale
    t = (torch.rand(6, 300, dtype=torch.float64) * 2 - 1) * scale
    x[0, :5] = scale
    t[0, :5] = -scale
    x, t = x.to(dtype), t.to(dtype)
    for red in ("none", "sum"):
        loss, gx, gt = check_logits(x, t, beta=beta, reduction=red, compare_torch=False)
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()
    # against PyTorch loosely (float32 composite where it is finite)
    if beta == 0:
        ours = op(x, t, reduction="none").double()
        theirs = torch_composite(x.float(), t.float(), reduction="none").double()
        fin = torch.isfinite(theirs)
        torch.testing.assert_close(ours[fin], theirs[fin], rtol=2e-2, atol=scale * 1e-3)


def huge_logits(base, V, dtype, rows=6):
    """Rows of logits around `base` (from 1e9 to float32's largest value):
    base plus small multiples of float32's spacing there, so that several
    entries of a row carry probability at a temperature of that spacing; an
    entry of the other sign (rows 1, 3); the teacher's rows 4-5 around
    -base / 2, so that a log-ratio near 0 is a difference of two values of
    about 1.5 base. Returned as (student, teacher, spacing)."""
    spacing = 2.0 ** (math.floor(math.log2(abs(base))) - 23)
    x = base + spacing * torch.randint(-12, 1, (rows, V), dtype=torch.float64)
    t = base + spacing * torch.randint(-12, 1, (rows, V), dtype=torch.float64)
    t[4:] = -base / 2 + spacing / 2 * torch.randint(-24, 1, (rows - 4, V), dtype=torch.float64)
    for v in (x, t):
        v[1, V // 2] = -base
        v[3, -1] = -math.copysign(3.38e38, base)
    return x.clamp(-3.38e38, 3.38e38).to(dtype), t.clamp(-3.38e38, 3.38e38).to(dtype), spacing


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("base", [1e9, -2e10, 1e30, -3e38, 3.38e38])
@pytest.mark.parametrize("T", ["0.7", "1", "3 spacings"])
def test_huge_logits(T, base, dtype, beta):
    """Finite logits of any size: the kernels take a logit's distance from its
    row's max before they scale it by 1 / T, so the result keeps the digits of
    the logits' differences (tolerances relative to those, ref_logits), where
    x / T carried the rounding of the logit itself (float32, 1e9 at T = 0.7:
    a JSD of -56) and overflowed near float32's largest value (NaN rows)."""
    x, t, spacing = huge_logits(base, 40, dtype)
    temperature = {"0.7": 0.7, "1": 1.0, "3 spacings": 3 * spacing}[T]
    if abs(base) > 1e38 and temperature > 1:
        # Logits of a row more than float32's largest value apart: the lower
        # one's log-probability is -inf in float32 (README, Reliability).
        pytest.skip("log-probabilities beyond float32's range")
    for red in ("none", "sum"):
        loss, gx, gt = check_logits(x, t, beta=beta, temperature=temperature, reduction=red, compare_torch=False)
        assert torch.isfinite(gx).all() and torch.isfinite(gt).all()


def lowest_value_rows(V, dtype):
    """Rows filled with the dtype's lowest value, a common padding or masking
    value (torch.finfo(dtype).min): the teacher's row 1, the student's row 2,
    both in row 3, beside logits of ordinary size. Such a row is a uniform
    distribution, at any temperature."""
    x, t = make_logits((4, V), dtype), make_logits((4, V), dtype)
    low = torch.finfo(dtype).min
    t[1] = low
    x[2] = low
    x[3] = low
    t[3] = low
    return x, t


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_rows_of_the_lowest_value_are_uniform(T, dtype, beta):
    """Until 2026-11-28 the CPU kernel scaled logits by 1 / T before taking
    their distance from the max: at T = 0.5 a float32 row of finfo.min
    overflowed to -inf, and its divergence came out NaN (forward KL, JSD) or
    -inf (reverse KL)."""
    x, t = lowest_value_rows(33, dtype)
    loss, gx, gt = check_logits(x, t, beta=beta, temperature=T, reduction="none", compare_torch=False)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("V", [512, 32000])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_of_identical_rows_is_zero_to_rounding(beta, V):
    """JSD(P, P) = 0: float32 gives the rounding of log p - log m alone, at
    most the relative error of the exp that gives p and q (about 20 ulp,
    2.4e-6; a few 1e-7 per row seen, gradients a few 1e-8), not an error of
    the formula."""
    x = (3 * torch.randn(8, V)).requires_grad_()
    loss = batchkl_ext.jsd_with_logits(x, x.detach().clone(), beta=beta, reduction="none")
    loss.sum().backward()
    assert loss.abs().max() <= 3e-6, loss.abs().max()
    assert x.grad.abs().max() <= 3e-6, x.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DT_ID.get)
@pytest.mark.parametrize("V", [33, 12000])
@pytest.mark.parametrize("beta,p", [(0.5, 1.67e-38), (1e-3, 1e-36)])
def test_jsd_subnormal_mixture(beta, p, dtype, V):
    """From logits, where the student's probability is 0 and the teacher's p,
    the mixture m = beta p is subnormal in float32, where LogitsTerm floors
    it for its log: finite, and as the float64 reference gives it. (The
    CPU's log takes subnormals, so whether the floor is there shows only
    where the log is the SFU's: in the emulated kernel's special values and
    on a GPU.)"""
    x, t = make_logits((4, V), torch.float64), make_logits((4, V), torch.float64)
    x[:, 5] = t[:, 5] = NEG_INF
    t[:, 5] = torch.logsumexp(t, dim=-1) + math.log(p)
    for red in ("none", "sum"):
        loss, gx, gt = check_logits(x.to(dtype), t.to(dtype), beta=beta, reduction=red)
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()


# --------------------------------------------------------------------------
# mask, num_items_in_batch
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", ["random", "all_true", "all_false"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DT_ID.get)
def test_mask(dtype, beta, reduction, mask_kind):
    shape = (3, 5, 21)
    x, t = make_logits(shape, dtype), make_logits(shape, dtype)
    mask = make_mask(shape[:-1], mask_kind)
    loss, gx, gt = check_logits(x, t, beta=beta, temperature=2.0, reduction=reduction, mask=mask)
    if mask_kind == "all_false":
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gt, torch.zeros_like(gt))
    if mask_kind == "all_true":
        # the same as no mask, except that batchmean divides by the number of rows (B*T, not B)
        nomask = op(x, t, beta=beta, temperature=2.0, reduction=reduction)
        if reduction == "batchmean":
            torch.testing.assert_close((loss * 15).double(), (nomask * 3).double(),
                                       rtol=2 * EPS[dtype], atol=0)
        else:
            torch.testing.assert_close(loss, nomask, rtol=2 * EPS[dtype], atol=0)


def test_batchmean_conventions_without_mask():
    """(B, T, V) without a mask: kl_div_with_logits divides by B (F.kl_div's
    batchmean), jsd_with_logits by the B*T rows (TRL's); 2-D inputs agree."""
    x, t = make_logits((3, 5, 11), torch.float64), make_logits((3, 5, 11), torch.float64)
    for beta in (0.0, 0.4):
        total = op(x, t, beta=beta, reduction="sum")
        torch.testing.assert_close(batchkl_ext.jsd_with_logits(x, t, beta=beta), total / 15, rtol=1e-14, atol=0)
        torch.testing.assert_close(op(x, t, beta=beta), total / 3, rtol=1e-14, atol=0)
    torch.testing.assert_close(batchkl_ext.kl_div_with_logits(x, t), op(x, t, reduction="sum") / 3, rtol=1e-14, atol=0)
    x2, t2 = x.reshape(15, 11), t.reshape(15, 11)
    assert_bitwise_equal(batchkl_ext.jsd_with_logits(x2, t2, beta=0.0), batchkl_ext.kl_div_with_logits(x2, t2))


def test_mask_batchmean_divides_by_kept_rows():
    x, t = make_logits((2, 4, 11), torch.float64), make_logits((2, 4, 11), torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    rows = op(x, t, reduction="none")
    total = rows[mask].sum()
    torch.testing.assert_close(op(x, t, reduction="batchmean", mask=mask), total / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(op(x, t, reduction="mean", mask=mask), total / (4 * 11), rtol=1e-14, atol=0)
    torch.testing.assert_close(op(x, t, reduction="sum", mask=mask), total, rtol=1e-14, atol=0)
    torch.testing.assert_close(op(x, t, reduction="none", mask=mask), torch.where(mask, rows, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["nan", "all_neg_inf", "pos_inf", "garbage"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_mask_excludes_bad_rows(beta, reduction, bad):
    """Excluded rows give 0 and exactly 0 gradient whatever they hold; the
    result is bitwise the same as with finite values in those rows."""
    x, t = make_logits((4, 3, 33)), make_logits((4, 3, 33))
    mask = make_mask((4, 3), "random")
    drop = ~mask
    xb, tb = x.clone(), t.clone()
    fill = {"nan": float("nan"), "all_neg_inf": NEG_INF, "pos_inf": float("inf")}
    if bad == "garbage":
        xb[drop] = torch.randn_like(xb[drop]) * 100
        tb[drop] = torch.randn_like(tb[drop]) * 100
    else:
        xb[drop] = fill[bad]
        tb[drop] = fill[bad]
        i, j = drop.nonzero()[0].tolist()
        xb[i, j, 0] = 1.0   # one finite entry in one bad row
    w = torch.randn(4, 3) if reduction == "none" else None

    def f(a, b):
        return op(a, b, beta=beta, temperature=1.5, reduction=reduction, mask=mask)
    l1, gx1, gt1 = run_op(f, x, t, w=w, gscale=2.0)
    l2, gx2, gt2 = run_op(f, xb, tb, w=w, gscale=2.0)
    assert torch.isfinite(l2).all()
    assert_bitwise_equal(l2, l1, "loss")
    assert_bitwise_equal(gx2, gx1, "grad_input")
    assert_bitwise_equal(gt2, gt1, "grad_target")
    assert (gx2[drop] == 0).all() and (gt2[drop] == 0).all()
    check_logits(xb, tb, beta=beta, temperature=1.5, reduction=reduction, mask=mask)


@pytest.mark.parametrize("ni_kind", ["int", "int64_tensor", "float_tensor"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_num_items_in_batch(beta, reduction, masked, ni_kind):
    """A 0-d scalar = sum over kept rows / num_items_in_batch, whatever the reduction."""
    x, t = make_logits((2, 5, 17)), make_logits((2, 5, 17))
    mask = make_mask((2, 5), "random") if masked else None
    n = 7
    ni = {"int": n, "int64_tensor": torch.tensor(n), "float_tensor": torch.tensor(float(n))}[ni_kind]
    fd = batchkl_ext.kl_div_with_logits if beta == 0 else \
        (lambda *a, **k: batchkl_ext.jsd_with_logits(*a, beta=beta, **k))
    loss, gx, gt = check_logits(
        x, t, beta=beta, reduction=reduction, mask=mask, num_items=n,
        fn=lambda a, b: fd(a, b, temperature=2.0, reduction=reduction, mask=mask, num_items_in_batch=ni),
        temperature=2.0)
    assert loss.shape == ()
    # the op itself, with a tensor
    o = op(x, t, beta=beta, temperature=2.0, reduction=reduction, mask=mask, num_items_in_batch=torch.tensor(n))
    assert_bitwise_equal(o, loss, "op vs front door")
    s = op(x, t, beta=beta, temperature=2.0, reduction="sum", mask=mask)
    torch.testing.assert_close(loss, s / n, rtol=5e-7, atol=0)


def test_num_items_in_batch_gradient_accumulation():
    """Two micro-batches with num_items = total tokens sum to the sum-reduced loss of the whole batch / total."""
    x, t = make_logits((4, 6, 13), torch.float64), make_logits((4, 6, 13), torch.float64)
    mask = make_mask((4, 6), "random")
    total = int(mask.sum())
    full = op(x, t, reduction="sum", mask=mask) / total
    parts = sum(batchkl_ext.kl_div_with_logits(x[i:i + 2], t[i:i + 2], mask=mask[i:i + 2], num_items_in_batch=total)
                for i in (0, 2))
    torch.testing.assert_close(parts, full, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------
# -inf, NaN, +inf
# --------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["both", "teacher", "student", "both_some_rows"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DT_ID.get)
def test_neg_inf_logits(dtype, reduction, beta, where):
    """-inf logits (masked vocabulary): entries with probability 0 contribute 0, never NaN."""
    if (where == "teacher" and beta == 1.0) or (where == "student" and beta == 0.0):
        pytest.skip("probability 0 on the side the divergence divides by: +inf (tested below)")
    x, t = make_logits((4, 3, 40), dtype), make_logits((4, 3, 40), dtype)
    vocab = torch.rand(40) < 0.3
    vocab[:2] = torch.tensor([True, False])
    sel = vocab.expand(4, 3, 40).clone()
    if where == "both_some_rows":
        sel[1:3] = False
    if where in ("both", "both_some_rows", "student"):
        x[sel] = NEG_INF
    if where in ("both", "both_some_rows", "teacher"):
        t[sel] = NEG_INF
    loss, gx, gt = check_logits(x, t, beta=beta, temperature=2.0, reduction=reduction, compare_torch=False)
    assert not torch.isnan(loss).any() and not torch.isnan(gx).any() and not torch.isnan(gt).any()
    assert torch.isfinite(loss).all()
    if where in ("both", "both_some_rows"):
        assert (gx[sel] == 0).all() and (gt[sel] == 0).all()
    if beta == 0 and reduction == "none":
        # PyTorch's composite is NaN where both are -inf: compare only where it is finite.
        theirs = torch_composite(x.double(), t.double(), 2.0, "none")
        fin = torch.isfinite(theirs)
        if where == "both_some_rows":
            assert fin.any()
        atol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(loss.double()[fin], theirs[fin], rtol=4 * EPS[dtype], atol=atol)


def test_zero_student_probability_where_teacher_positive_is_inf():
    x, t = make_logits((3, 10)), make_logits((3, 10))
    x[1, 4] = NEG_INF
    loss = op(x, t, reduction="none")
    assert loss[1].item() == math.inf
    assert torch.isfinite(loss[[0, 2]]).all()
    rev = op(t, x, beta=1.0, reduction="none")   # KL(Q || P) with P = softmax(x): the same situation
    assert rev[1].item() == math.inf


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_kept_row_all_neg_inf_nan_and_inf(dtype, beta):
    x, t = make_logits((5, 12), dtype), make_logits((5, 12), dtype)
    clean = op(x, t, beta=beta, reduction="none")
    x[1] = NEG_INF
    t[1] = NEG_INF       # a kept row with no distribution: NaN
    x[2, 3] = float("nan")  # NaN propagates
    t[3, 0] = float("inf")  # +inf logit: NaN for that row
    x[4, 7] = float("inf")
    w = torch.ones(5, dtype=dtype)
    loss, gx, gt = run_op(lambda a, b: op(a, b, beta=beta, reduction="none"), x, t, w=w)
    assert torch.isnan(loss[1:]).all(), loss
    assert_bitwise_equal(loss[0], clean[0], "other rows unaffected")
    assert torch.isfinite(gx[0]).all() and torch.isfinite(gt[0]).all()
    for red in ("sum", "batchmean", "mean"):
        assert torch.isnan(op(x, t, beta=beta, reduction=red))
    # masking the bad rows makes everything finite again
    mask = torch.tensor([True, False, False, False, False])
    assert torch.isfinite(op(x, t, beta=beta, reduction="sum", mask=mask))


# --------------------------------------------------------------------------
# dtypes, autograd
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dx,dt", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                   (torch.float32, torch.float64), (torch.float16, torch.bfloat16)],
                         ids=["bf16-f32", "f16-f32", "f32-f64", "f16-bf16"])
def test_mixed_dtypes(dx, dt):
    x, t = make_logits((4, 3, 25), dx), make_logits((4, 3, 25), dt)
    for red in LOGIT_REDUCTIONS:
        check_logits(x, t, beta=0.3, temperature=2.0, reduction=red, compare_torch=False)


@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_gradient_only_where_required(reduction):
    x, t = make_logits((3, 4, 9)), make_logits((3, 4, 9))
    # target without requires_grad
    check_logits(x, t, beta=0.5, reduction=reduction, grad_target=False)
    xl, tl = leaf(x), leaf(t, False)
    loss = op(xl, tl, beta=0.5, reduction=reduction)
    loss.sum().backward()
    assert tl.grad is None and xl.grad is not None
    # target only
    xl, tl = leaf(x, False), leaf(t)
    loss = op(xl, tl, beta=0.5, reduction=reduction)
    assert loss.requires_grad
    loss.sum().backward()
    assert xl.grad is None
    ref = ref_logits(x, t, beta=0.5, reduction=reduction, w=torch.ones(3, 4))
    assert_close_scaled(tl.grad, ref.gt, ref.gt_mag, tol=TOL[torch.float32])
    # neither
    out = op(x, t, beta=0.5, reduction=reduction)
    assert not out.requires_grad


@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_grad_output_scaling_and_accumulation(reduction):
    x, t = make_logits((6, 20), torch.float64), make_logits((6, 20), torch.float64)
    xl, tl = leaf(x), leaf(t)
    loss = op(xl, tl, beta=0.3, temperature=0.5, reduction=reduction)
    w = torch.randn(loss.shape, dtype=torch.float64)
    (gx1, gt1) = torch.autograd.grad((loss * w).sum(), (xl, tl), retain_graph=True)
    (gx2, gt2) = torch.autograd.grad((loss * (2 * w)).sum(), (xl, tl))
    torch.testing.assert_close(gx2, 2 * gx1, rtol=1e-15, atol=0)
    torch.testing.assert_close(gt2, 2 * gt1, rtol=1e-15, atol=0)
    # .backward() twice accumulates
    loss = op(xl, tl, beta=0.3, temperature=0.5, reduction=reduction)
    (loss * w).sum().backward(retain_graph=True)
    (loss * w).sum().backward()
    torch.testing.assert_close(xl.grad, 2 * gx1, rtol=1e-15, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck(beta, reduction, masked):
    x = make_logits((3, 5), torch.float64, 1.0).requires_grad_()
    t = make_logits((3, 5), torch.float64, 1.0).requires_grad_()
    mask = torch.tensor([True, False, True]) if masked else None
    assert torch.autograd.gradcheck(
        lambda a, b: op(a, b, beta=beta, temperature=0.7, reduction=reduction, mask=mask), (x, t))


def test_double_backward_raises():
    xl, tl = leaf(make_logits((3, 7), torch.float64)), leaf(make_logits((3, 7), torch.float64))
    loss = op(xl, tl, beta=0.5)
    with pytest.raises(RuntimeError):
        gx, = torch.autograd.grad(loss, xl, create_graph=True)
        torch.autograd.grad(gx.sum(), xl)


@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_fused_op(reduction):
    """kl_with_logits_fused: the loss and the unscaled gradients, empties when not asked for."""
    x, t = make_logits((3, 4, 15)), make_logits((3, 4, 15))
    mask = make_mask((3, 4), "random")
    args = (x, t, 0.3, 2.0, reduction, mask, None, False)
    loss, gi, gt, gs = torch.ops.batchkl.kl_with_logits_fused(*args, True, True)
    assert gs.numel() == 0  # (float32: the gradients are scaled already)
    assert_bitwise_equal(loss, op(x, t, beta=0.3, temperature=2.0, reduction=reduction, mask=mask))
    l2, ex, et = run_op(lambda a, b: op(a, b, beta=0.3, temperature=2.0, reduction=reduction, mask=mask), x, t,
                        w=torch.ones(3, 4) if reduction == "none" else None)
    assert_bitwise_equal(gi, ex, "grad_input")
    assert_bitwise_equal(gt, et, "grad_target")
    _, gi, gt, _ = torch.ops.batchkl.kl_with_logits_fused(*args, True, False)
    assert gi.shape == x.shape and gt.numel() == 0
    _, gi, gt, _ = torch.ops.batchkl.kl_with_logits_fused(*args, False, False)
    assert gi.numel() == 0 and gt.numel() == 0


# --------------------------------------------------------------------------
# layouts, determinism, batch invariance
# --------------------------------------------------------------------------

def _layout(base, kind):
    """A view with the values of `base` (B, T, V) in another memory layout."""
    B, T, V = base.shape
    if kind == "sliced_leading":      # logits[:, :-1, :]
        big = torch.full((B, T + 1, V), float("nan"), dtype=base.dtype)
        big[:, :-1] = base
        return big[:, :-1, :]
    if kind == "last_strided":        # transposed in memory: the last dim has stride != 1
        out = base.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert out.stride(-1) != 1
        return out
    if kind == "sliced_last":
        return apply_layout(base, "sliced")
    if kind == "offset":
        return apply_layout(base, "offset")
    if kind == "expanded":            # one teacher row broadcast to every position
        return base[:1, :1].expand(B, T, V)
    raise ValueError(kind)


@pytest.mark.parametrize("t_kind", ["same", "contiguous", "expanded"])
@pytest.mark.parametrize("x_kind", ["sliced_leading", "last_strided", "sliced_last", "offset", "expanded"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_non_contiguous_inputs_bitwise(reduction, x_kind, t_kind):
    x0, t0 = make_logits((3, 6, 40)), make_logits((3, 6, 40))
    x = _layout(x0, x_kind)
    t = t0 if t_kind == "contiguous" else _layout(t0, x_kind if t_kind == "same" else "expanded")
    labels_big = torch.randint(0, 3, (3, 7))
    mask = (labels_big != 0)[:, 1:]   # non-contiguous bool mask, as labels[:, 1:] != -100
    w = torch.randn(3, 6) if reduction == "none" else None
    for m in (None, mask):
        def f(a, b):
            return op(a, b, beta=0.3, temperature=2.0, reduction=reduction, mask=m)
        l1, gx1, gt1 = run_op(f, x, t, w=w)
        l2, gx2, gt2 = run_op(f, x.contiguous(), t.contiguous(), w=w)
        assert_bitwise_equal(l1, l2, "loss")
        assert_bitwise_equal(gx1, gx2, "grad_input")
        assert_bitwise_equal(gt1, gt2, "grad_target")
    check_logits(x, t, beta=0.3, temperature=2.0, reduction=reduction, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(64, 3000), (2, 100003)], ids=["many_rows", "long_rows"])
def test_deterministic_across_runs_and_threads(shape, dtype):
    x, t = make_logits(shape, dtype), make_logits(shape, dtype)
    mask = make_mask(shape[:-1], "random") if shape[0] > 2 else None
    results = []
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        for red in ("none", "sum", "batchmean"):
            for beta in (0.0, 0.5):
                w = torch.ones(shape[:-1], dtype=dtype) if red == "none" else None
                results.append(run_op(lambda a, b: op(a, b, beta=beta, temperature=2.0, reduction=red, mask=mask),
                                      x, t, w=w))
    n = len(results) // 3
    for i in range(n):
        for j in (n + i, 2 * n + i):
            for a, b, name in zip(results[i], results[j], ("loss", "grad_input", "grad_target")):
                assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype,V", [(torch.float32, 1000), (torch.bfloat16, 1000), (torch.float32, 70001)],
                         ids=["f32-1000", "bf16-1000", "f32-70001"])
def test_batch_invariance(dtype, V, beta):
    """A row's 'none' value and gradient row are bitwise the same alone, as a
    1-D input, or anywhere in a bigger (differently shaped) batch."""
    x, t = make_logits((24, V), dtype), make_logits((24, V), dtype)
    torch.set_num_threads(2)
    check_batch_invariance(x, t, beta, shuffled_shape=(4, 6))


def check_batch_invariance(x, t, beta, shuffled_shape):
    """A row's per-row value and gradient rows of (R, V) inputs: the same bits
    alone, as a 1-D input, in a shuffled batch of `shuffled_shape` rows, and
    with other rows masked (on the inputs' device)."""
    R, V = x.shape
    dev = x.device

    def per_row(a, b, mask=None):
        w = torch.ones(a.shape[:-1], dtype=x.dtype, device=dev)
        return run_op(lambda p, q: op(p, q, beta=beta, temperature=0.5, reduction="none", mask=mask), a, b, w=w)

    full = per_row(x, t)
    perm = torch.randperm(R, device=dev)
    shuffled = per_row(x[perm].reshape(*shuffled_shape, V), t[perm].reshape(*shuffled_shape, V))
    inv = torch.argsort(perm)
    masked = per_row(x, t, mask=torch.arange(R, device=dev) % 3 != 1)
    for i in (0, 5, R - 1):
        alone = per_row(x[i:i + 1], t[i:i + 1])
        one_d = per_row(x[i], t[i])
        for k, name in enumerate(("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(alone[k][0], full[k][i], f"{name} alone vs batch, row {i}")
            assert_bitwise_equal(one_d[k], full[k][i], f"{name} 1-D vs batch, row {i}")
            assert_bitwise_equal(shuffled[k].reshape(R, *shuffled[k].shape[len(shuffled_shape):])[inv[i]],
                                 full[k][i], f"{name} shuffled batch, row {i}")
            if i % 3 != 1:
                assert_bitwise_equal(masked[k][i], full[k][i], f"{name} with other rows masked, row {i}")


# --------------------------------------------------------------------------
# kl_divergence
# --------------------------------------------------------------------------

def ref_kl_divergence(p, q, kind, dim, w):
    """float64 KL(p || q) per row along `dim` and gradients of (kl * w).sum()."""
    p64 = p.detach().double().requires_grad_()
    q64 = q.detach().double().requires_grad_()
    pm, qm = p64.movedim(dim, -1), q64.movedim(dim, -1)
    if kind == "logits":
        r = ref_logits(qm, pm, reduction="none", w=w)
        return r.loss, r.gt.movedim(-1, dim), r.gt_mag.movedim(-1, dim), r.gx.movedim(-1, dim), \
            r.gx_mag.movedim(-1, dim), r.loss_mag
    with torch.no_grad():
        zero = pm == 0 if kind == "probs" else pm == NEG_INF
    if kind == "probs":
        Sp, Sq = pm.sum(-1, keepdim=True), qm.sum(-1, keepdim=True)
        one = torch.ones_like(pm)
        lp = torch.where(zero, one, pm).log() - Sp.log()
        lq = torch.where(zero, one, qm).log() - Sq.log()
        terms = torch.where(zero, torch.zeros_like(pm), (pm / Sp) * (lp - lq))
    else:
        terms = _kl_terms(pm, qm)
    kl = terms.sum(-1)
    gp, gq = torch.autograd.grad((kl * w.double()).sum(), (p64, q64))
    with torch.no_grad():
        wa = w.double().abs().unsqueeze(-1)
        if kind == "probs":
            pn = torch.where(zero, torch.zeros_like(pm), pm / Sp)
            A = _fin_abs(lp) + _fin_abs(lq) + _fin_abs(Sp.log()) + _fin_abs(Sq.log()) + 1
            A = torch.where(zero, torch.zeros_like(A), A)
            emag = pn * A
            rmag = emag.sum(-1, keepdim=True)
            gp_mag = wa / Sp * (A + rmag + 1)
            gq_mag = wa * (pn / torch.where(qm == 0, one, qm) + 1 / Sq) * (1 + rmag)
        else:
            P = torch.where(zero, torch.zeros_like(pm), pm.exp())
            A = _fin_abs(pm) + _fin_abs(qm) + 1
            emag = P * A
            rmag = emag.sum(-1, keepdim=True)
            gp_mag = wa * P * A
            gq_mag = wa * P
    return (kl.detach(), gp, gp_mag.movedim(-1, dim), gq, gq_mag.movedim(-1, dim), rmag.squeeze(-1))


def _counts(shape, dim, zeros_ok=True):
    c = torch.randint(0 if zeros_ok else 1, 5, shape).double()
    first = [slice(None)] * len(shape)
    first[dim] = 0
    c[tuple(first)] += 1     # no all-zero row
    return c


@pytest.mark.parametrize("shape,dim", [((7, 30), -1), ((30, 7), 0), ((3, 30, 4), 1), ((3, 4, 30), 2)],
                         ids=["last", "dim0", "middle", "dim2"])
@pytest.mark.parametrize("kind", ["probs", "log_probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DT_ID.get)
def test_kl_divergence(dtype, kind, shape, dim):
    if kind == "probs":
        p = _counts(shape, dim)                  # unnormalised counts with exact zeros
        q = _counts(shape, dim, zeros_ok=False)
        q = torch.where((p == 0) & (torch.rand(shape) < 0.5), torch.zeros_like(q), q)  # 0 where p is 0: fine
    elif kind == "log_probs":
        p = F.log_softmax(make_logits(shape, torch.float64), dim) - 0.25   # not renormalised
        q = F.log_softmax(make_logits(shape, torch.float64), dim)
        p = torch.where(torch.rand(shape) < 0.2, torch.full_like(p, NEG_INF), p)   # 0 * log 0 = 0
    else:
        p, q = make_logits(shape, torch.float64), make_logits(shape, torch.float64)
    p, q = p.to(dtype), q.to(dtype)
    out_shape = torch.Size(s for i, s in enumerate(shape) if i != dim % len(shape))
    w = torch.randn(out_shape, dtype=torch.float64).to(dtype)
    pl, ql = leaf(p), leaf(q)
    kl = batchkl_ext.kl_divergence(pl, ql, kind=kind, dim=dim)
    assert kl.shape == out_shape and kl.dtype == dtype
    gp, gq = torch.autograd.grad((kl * w).sum(), (pl, ql))
    assert gp.dtype == dtype and gq.dtype == dtype and gp.shape == p.shape and gq.shape == q.shape
    rk, rgp, mgp, rgq, mgq, mk = ref_kl_divergence(p, q, kind, dim, w)
    tol = TOL[dtype]
    assert_close_scaled(kl, rk, mk, tol=tol, what=f"kl_divergence[{kind}]")
    assert not torch.isnan(gp).any() and not torch.isnan(gq).any()
    if kind == "probs":
        # d/dp at p == 0 is -inf mathematically (one-sided); only where p > 0 is compared.
        pos = p != 0
        assert_close_scaled(gp[pos], rgp[pos], mgp[pos], tol=tol, what="grad p")
    else:
        assert_close_scaled(gp, rgp, mgp, tol=tol, what="grad p")
    assert_close_scaled(gq, rgq, mgq, tol=tol, what="grad q")


def test_kl_divergence_probs_normalises_and_matches_logits():
    p = torch.rand(5, 12, dtype=torch.float64) + 0.01
    q = torch.rand(5, 12, dtype=torch.float64) + 0.01
    a = batchkl_ext.kl_divergence(p, q)
    torch.testing.assert_close(batchkl_ext.kl_divergence(3 * p, 0.5 * q), a, rtol=1e-13, atol=1e-15)
    pn, qn = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(a, (pn * (pn / qn).log()).sum(-1), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(batchkl_ext.kl_divergence(pn.log(), qn.log(), kind="log_probs"), a, rtol=1e-13,
                               atol=1e-15)
    torch.testing.assert_close(batchkl_ext.kl_divergence(p.log() + 2, q.log() - 1, kind="logits"), a, rtol=1e-13,
                               atol=1e-15)
    # p == q: zero
    assert batchkl_ext.kl_divergence(p, 2 * p).abs().max() < 1e-15


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_op_probs_mode(beta):
    """probs=True: the rows hold unnormalised probabilities (input = student Q, target = teacher P)."""
    qc = _counts((6, 20), -1, zeros_ok=False)
    pc = _counts((6, 20), -1, zeros_ok=beta != 1.0)   # reverse KL: P must be positive where Q is
    w = torch.randn(6, dtype=torch.float64)
    ql, pl = leaf(qc), leaf(pc)
    out = op(ql, pl, beta=beta, reduction="none", probs=True)
    (out * w).sum().backward()
    # the same as logits log(counts) (zero counts -> -inf logits)
    r = ref_logits(qc.log(), pc.log(), beta=beta, reduction="none", w=w)
    assert_close_scaled(out, r.loss, r.loss_mag, tol=TOL[torch.float64], what="probs loss")
    assert not torch.isnan(ql.grad).any()
    assert not torch.isnan(pl.grad[pc > 0]).any()
    # chain rule through the logits log(c): d/dc = d/dlog(c) / c
    tol = TOL[torch.float64]
    assert_close_scaled(ql.grad, r.gx / qc, r.gx_mag / qc, tol=tol, what="probs grad input")
    pos = pc > 0
    assert_close_scaled(pl.grad[pos], (r.gt / pc)[pos], (r.gt_mag / pc)[pos], tol=tol, what="probs grad target")


@pytest.mark.parametrize("beta,p", [(0.5, 1e-40), (0.5, 1.67e-38), (1e-3, 1e-36)])
def test_op_probs_mode_jsd_tiny_probabilities(beta, p):
    """probs=True in float32, where the student's probability is 0 and the
    teacher's p is subnormal or nearly (so is m = beta p): the gradient w.r.t.
    a probability divides its term by it, so it does not shrink with p, and
    a floor on m there would be off by as much as the gradient itself."""
    qc = torch.rand(4, 50, dtype=torch.float64) + 0.1
    pc = torch.rand(4, 50, dtype=torch.float64) + 0.1
    qc[:, 5] = 0.0
    pc[:, 5] = p * pc.sum(-1)
    qc, pc = qc.float().double(), pc.float().double()  # the float32 values, exactly
    w = torch.randn(4, dtype=torch.float64)
    ql, pl = leaf(qc.float()), leaf(pc.float())
    out = op(ql, pl, beta=beta, reduction="none", probs=True)
    (out * w.float()).sum().backward()
    r = ref_logits(qc.log(), pc.log(), beta=beta, reduction="none", w=w)
    tol = TOL[torch.float32]
    assert_close_scaled(out, r.loss, r.loss_mag, tol=tol, what="probs loss")
    pos = qc > 0
    assert_close_scaled(ql.grad[pos], (r.gx / qc)[pos], (r.gx_mag / qc)[pos], tol=tol, what="probs grad input")
    assert_close_scaled(pl.grad, r.gt / pc, r.gt_mag / pc, tol=tol, what="probs grad target")


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def _err_cases():
    x, t = make_logits((3, 5)), make_logits((3, 5))
    m = torch.ones(3, dtype=torch.bool)
    cases = []
    for T in (0.0, -1.0, math.inf, math.nan):
        cases.append((f"T={T}", lambda T=T: op(x, t, temperature=T), ValueError, "temperature"))
        cases.append((f"fd T={T}", lambda T=T: batchkl_ext.kl_div_with_logits(x, t, temperature=T), ValueError,
                      "temperature"))
    for b in (-0.1, 1.1, math.nan, math.inf):
        cases.append((f"beta={b}", lambda b=b: op(x, t, beta=b), ValueError, "beta"))
        cases.append((f"jsd beta={b}", lambda b=b: batchkl_ext.jsd_with_logits(x, t, beta=b), ValueError, "beta"))
    cases += [
        ("mask too long", lambda: op(x, t, mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
        ("mask element shape", lambda: op(x, t, mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask"),
        ("mask float", lambda: op(x, t, mask=torch.ones(3)), TypeError, "mask"),
        ("mask int", lambda: op(x, t, mask=torch.ones(3, dtype=torch.long)), TypeError, "mask"),
        ("fd mask float", lambda: batchkl_ext.jsd_with_logits(x, t, mask=torch.ones(3)), TypeError, "mask"),
        ("shape V", lambda: op(x, make_logits((3, 6))), ValueError, ""),
        ("shape rows", lambda: op(x, make_logits((2, 5))), ValueError, ""),
        ("int input", lambda: op(torch.ones(3, 5, dtype=torch.long), t), TypeError, "input"),
        ("int target", lambda: op(x, torch.ones(3, 5, dtype=torch.int32)), TypeError, "target"),
        ("0-dim", lambda: op(torch.tensor(1.0), torch.tensor(2.0)), ValueError, ""),
        ("reduction row", lambda: op(x, t, reduction="row"), ValueError, "reduction"),
        ("reduction bad", lambda: op(x, t, reduction="avg"), ValueError, "reduction"),
        ("fd reduction row", lambda: batchkl_ext.kl_div_with_logits(x, t, reduction="row"), ValueError, "reduction"),
        ("probs with T", lambda: op(x.exp(), t.exp(), probs=True, temperature=2.0), ValueError, ""),
        ("kind", lambda: batchkl_ext.kl_divergence(x.exp(), t.exp(), kind="bogus"), ValueError, "kind"),
        # kl_divergence's own argument names, not the op's input/target
        ("kd int p", lambda: batchkl_ext.kl_divergence(torch.ones(3, 5, dtype=torch.long), t.exp()), TypeError, "'p'"),
        ("kd int q", lambda: batchkl_ext.kl_divergence(t.exp(), torch.ones(3, 5, dtype=torch.long)), TypeError, "'q'"),
        ("kd shape", lambda: batchkl_ext.kl_divergence(t.exp(), torch.rand(3, 6)), ValueError, "'p'.*'q'"),
        ("kd 0-dim", lambda: batchkl_ext.kl_divergence(torch.tensor(1.0), torch.tensor(1.0)), ValueError, ""),
        ("num_items 0", lambda: batchkl_ext.kl_div_with_logits(x, t, num_items_in_batch=0), ValueError, ""),
        ("num_items -3", lambda: batchkl_ext.jsd_with_logits(x, t, num_items_in_batch=-3), ValueError, ""),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_err_cases())), ids=[c[0] for c in _err_cases()])
def test_errors(case):
    _, fn, exc, word = _err_cases()[case]
    with pytest.raises(exc, match=word or None):
        fn()


def test_no_output_printed(capfd):
    x, t = make_logits((3, 5)), make_logits((3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for red in LOGIT_REDUCTIONS:
            for fd in (batchkl_ext.kl_div_with_logits, batchkl_ext.jsd_with_logits):
                assert fd(leaf(x), t, reduction=red) is not None
        batchkl_ext.kl_divergence(x.exp(), t.exp())
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------
# autocast, opcheck, torch.compile
# --------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32, torch.float64], ids=DT_ID.get)
def test_autocast_cpu_bf16(in_dtype):
    x, t = make_logits((4, 3, 50), in_dtype), make_logits((4, 3, 50), in_dtype)
    xa = leaf(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batchkl_ext.jsd_with_logits(xa, t, beta=0.3, temperature=2.0)
        rows = batchkl_ext.kl_div_with_logits(x, t, reduction="none")
    expect = torch.float64 if in_dtype == torch.float64 else torch.float32
    assert out.dtype == expect and rows.dtype == expect
    out.backward()
    assert xa.grad.dtype == in_dtype
    up = expect
    torch.testing.assert_close(out, batchkl_ext.jsd_with_logits(x.to(up), t.to(up), beta=0.3, temperature=2.0))
    torch.testing.assert_close(rows, batchkl_ext.kl_div_with_logits(x.to(up), t.to(up), reduction="none"))


OPCHECK_CASES = [
    dict(),
    dict(beta=0.5, temperature=2.0, reduction="none", mask="random"),
    dict(beta=1.0, reduction="sum", mask="random", num_items_in_batch="float"),
    dict(beta=0.3, reduction="mean", temperature=0.5, num_items_in_batch="int"),
    dict(beta=0.0, reduction="batchmean", mask="random"),
    dict(reduction="none", probs=True),
]


@pytest.mark.compile
@pytest.mark.parametrize("rg", [(True, True), (True, False)], ids=["grad_both", "grad_input"])
@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(case, rg):
    kw = dict(OPCHECK_CASES[case])
    x, t = make_logits((2, 3, 11)), make_logits((2, 3, 11))
    if kw.get("probs"):
        x, t = x.exp(), t.exp()
    if kw.get("mask"):
        kw["mask"] = make_mask((2, 3), "random")
    if kw.get("num_items_in_batch"):
        kw["num_items_in_batch"] = torch.tensor(5.0) if kw["num_items_in_batch"] == "float" else torch.tensor(5)
    torch.library.opcheck(torch.ops.batchkl.kl_with_logits.default, (leaf(x, rg[0]), leaf(t, rg[1])), kw)


@pytest.mark.compile
def test_opcheck_fused():
    x, t = make_logits((2, 3, 11)), make_logits((2, 3, 11))
    mask = make_mask((2, 3), "random")
    for red, m, n, gi, gt in [("batchmean", None, None, True, True), ("none", mask, None, True, False),
                              ("sum", mask, torch.tensor(4.0), False, False)]:
        torch.library.opcheck(torch.ops.batchkl.kl_with_logits_fused.default,
                              (x, t, 0.3, 2.0, red, m, n, False, gi, gt))


def _compiled_matches(fn, compiled, args, w):
    res = []
    for f in (fn, compiled):
        x, t = leaf(args[0]), leaf(args[1])
        out = f(x, t, *args[2:])
        (out * w).sum().backward()
        res.append((out.detach(), x.grad, t.grad))
    (e, egx, egt), (c, cgx, cgt) = res
    assert c.shape == e.shape and c.dtype == e.dtype
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cgx, egx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cgt, egt, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_aot_eager(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()

    def fn(x, t, mask, n):
        a = batchkl_ext.kl_div_with_logits(x, t, temperature=2.0, mask=mask)
        b = batchkl_ext.jsd_with_logits(x, t, beta=0.3, reduction="none", mask=mask)
        c = batchkl_ext.jsd_with_logits(x * 1.5, t, num_items_in_batch=n)
        d = batchkl_ext.kl_div_with_logits(x, t.detach(), reduction="sum", num_items_in_batch=7)
        return a + (b * b).sum() + c + d

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    counts = []
    for B, T in ((2, 5), (3, 4), (4, 7)):
        x, t = make_logits((B, T, 33)), make_logits((B, T, 33))
        _compiled_matches(fn, compiled, (x, t, make_mask((B, T), "random"), torch.tensor(9)), torch.tensor(1.7))
        counts.append(counter.frame_count)
    if dynamic:
        # (the first call may call the backend twice: Dynamo restarts its
        # analysis once to specialise the float arguments)
        assert counts[0] == counts[-1], "dynamic=True should not recompile for new shapes"
    torch._dynamo.reset()


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor(dynamic):
    torch._dynamo.reset()

    def fn(x, t, mask):
        return batchkl_ext.jsd_with_logits(torch.tanh(x) * 4, t, beta=0.5, mask=mask) * 2.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for B in ((3, 5) if dynamic else (3,)):
        x, t = make_logits((B, 4, 29)), make_logits((B, 4, 29))
        _compiled_matches(fn, compiled, (x, t, make_mask((B, 4), "random")), torch.tensor(1.0))
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# review findings: each once broken or easy to break
# --------------------------------------------------------------------------

def test_many_unmergeable_dims_with_promotion():
    """7 leading dims that cannot be coalesced (more than the kernel's offset
    calculator takes) and a dtype promotion that copies the input: the op
    falls back to a contiguous copy and must still get every row right."""
    base = torch.randn(2, 2, 2, 2, 2, 2, 2, 5, dtype=torch.bfloat16)
    x = base.permute(6, 5, 4, 3, 2, 1, 0, 7)
    t = torch.randn(x.shape)
    out = op(x, t, reduction="none")
    assert out.dtype == torch.float32 and out.shape == x.shape[:-1]
    assert_bitwise_equal(out, op(x.float().contiguous(), t, reduction="none"))


def test_bad_reduction_names_this_op_and_its_choices():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError) as e:
        op(x, x, reduction="avg")
    msg = str(e.value)
    assert "kl_with_logits" in msg and "'avg'" in msg and "'row'" not in msg.split("got")[0]


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_plus_inf_logit_gives_nan_row_and_gradients(beta):
    """+inf facing a probability-0 entry: NaN for the row and its gradient
    rows (as PyTorch), never +inf loss with NaN gradients."""
    inf = float("inf")
    x = torch.tensor([[inf, 0.0, 0.0], [0.5, 0.1, -0.2]], requires_grad=True)
    t = torch.tensor([[-inf, 0.0, 0.0], [0.3, 0.2, 0.1]], requires_grad=True)
    for a, b in ((x, t), (t, x)):
        rows = op(a, b, beta=beta, reduction="none")
        assert torch.isnan(rows[0]) and torch.isfinite(rows[1])
        ga, gb = torch.autograd.grad(rows.sum(), (a, b))
        assert torch.isnan(ga[0]).all() and torch.isnan(gb[0]).all()
        assert torch.isfinite(ga[1]).all() and torch.isfinite(gb[1]).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_single_entry_rows_are_zero(beta, temperature):
    """A one-entry distribution is certain: divergence 0 up to the rounding
    of x / T (the compiler may fuse the scaling into a multiply-add), and
    exactly 0 when T is a power of two."""
    x, t = torch.randn(6, 1) * 5, torch.randn(6, 1) * 5
    xl, tl = leaf(x), leaf(t)
    rows = op(xl, tl, beta=beta, temperature=temperature, reduction="none")
    bound = 4 * EPS[torch.float32] * (x.abs() + t.abs()).squeeze(-1) / temperature
    assert (rows.abs() <= bound).all(), (rows, bound)
    if temperature in (0.5, 2.0):
        assert (rows == 0).all()
    gx, gt = torch.autograd.grad(rows.sum(), (xl, tl))
    assert (gx == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_autocast_backward_matches_float32_logits(reduction):
    """bf16 logits under autocast: float32 loss, bf16 gradients equal to the
    float32 computation's rounded once (the CPU scales in float32)."""
    x, t = make_logits((4, 3, 40), torch.bfloat16), make_logits((4, 3, 40), torch.bfloat16)
    w = torch.rand(4, 3) + 0.5
    xl = leaf(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = op(xl, t, beta=0.3, reduction=reduction)
    assert loss.dtype == torch.float32
    gx, = torch.autograd.grad((loss * w).sum() if reduction == "none" else loss * 3.0, xl)
    assert gx.dtype == torch.bfloat16
    xf = leaf(x.float())
    lf = op(xf, t.float(), beta=0.3, reduction=reduction)
    gf, = torch.autograd.grad((lf * w).sum() if reduction == "none" else lf * 3.0, xf)
    torch.testing.assert_close(gx.float(), gf, rtol=2 * EPS[torch.bfloat16], atol=1e-30)
