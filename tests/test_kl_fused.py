"""The fused design (one launch forward, scaling-only backward), its in-place
shortcut, 64-bit offsets, and the fast 16-bit exp's edge range."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import batchkl_ext

from conftest import REDUCTIONS, kl_op, make_logprobs, make_target

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


def _op_names(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "row"])
@pytest.mark.parametrize("grad_output_one", [True, False], ids=["g1", "g"])
def test_forward_writes_grads_backward_only_scales(reduction, grad_output_one):
    x = make_logprobs((16, 300)).requires_grad_()
    t = make_target((16, 300), False).requires_grad_()
    fwd = {}

    def forward():
        fwd["loss"] = kl_op(x, t, reduction, False)

    names = _op_names(forward)
    assert names.count("batchkl::kl_fused") == 1, names
    loss = fwd["loss"]
    g = torch.ones_like(loss) if grad_output_one else torch.rand_like(loss) + 0.5
    names = _op_names(lambda: loss.backward(g))
    # No kernel over the inputs in the backward: no fused op again, nothing
    # elementwise of the KL itself (log, exp, xlogy, ...).
    assert not [n for n in names if n.startswith("batchkl::kl_fused") or n.startswith("batchkl::kl_none")], names
    assert not [n for n in names if n in ("aten::log", "aten::exp", "aten::xlogy", "aten::sub")], names
    assert "batchkl::kl_scale_" in names, names  # the in-place scaling of the saved gradients
    expected_gx = -t.detach() * (g.unsqueeze(-1) if reduction == "row" else g)
    if reduction == "mean":
        expected_gx = expected_gx / x.numel()
    elif reduction == "batchmean":
        expected_gx = expected_gx / x.shape[0]
    torch.testing.assert_close(x.grad, expected_gx)


def test_grad_output_one_skips_the_multiply_on_cpu():
    x = make_logprobs((16, 300)).requires_grad_()
    t = make_target((16, 300), False)
    loss = kl_op(x, t, "batchmean", False)
    names = _op_names(loss.backward)
    assert not [n for n in names if n.startswith("aten::mul")], names


def test_retain_graph_keeps_the_saved_gradient_intact():
    x = make_logprobs((8, 50)).requires_grad_()
    t = make_target((8, 50), False)
    loss = kl_op(x, t, "sum", False)
    (g1,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 5, x)
    torch.testing.assert_close(g1 / 3, g2 / 5)
    torch.testing.assert_close(g2, -5 * t)


def test_saved_tensor_hooks_see_an_unchanged_gradient():
    # A pack hook may keep a reference to what autograd saves: the in-place
    # scaling must not change it behind the hook's back.
    x = make_logprobs((8, 50)).requires_grad_()
    t = make_target((8, 50), False)
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = kl_op(x, t, "sum", False)
    snapshot = [k.clone() for k in kept]
    (loss * 2).backward()
    for before, after in zip(snapshot, kept):
        assert torch.equal(before, after)
    torch.testing.assert_close(x.grad, -2 * t)


# Activation checkpointing around the loss (the chunked-distillation idiom:
# the lm_head matmul and the loss of a chunk of tokens recomputed in
# backward). Re-entrant: the forward runs without grad (the loss alone) and
# again inside backward; non-re-entrant: saved-tensor hooks see the fused
# gradients, so backward scales out of place. Either way the gradients are
# bitwise those without checkpointing.
CHECKPOINTED = {
    "kl_batchmean": lambda z, t: batchkl_ext.kl_div(z.log_softmax(-1), t.softmax(-1), reduction="batchmean"),
    "kl_row": lambda z, t: kl_op(z.log_softmax(-1), t.softmax(-1), "row", False).sum(),
    "jsd_with_logits": lambda z, t: batchkl_ext.jsd_with_logits(z, t, beta=0.3, temperature=0.8),
    "kl_with_logits_none": lambda z, t: batchkl_ext.kl_div_with_logits(z, t, reduction="none").sum(),
}
COMPOSITE = {
    "kl_batchmean": lambda z, t: F.kl_div(z.log_softmax(-1), t.softmax(-1), reduction="batchmean"),
    "kl_row": lambda z, t: F.kl_div(z.log_softmax(-1), t.softmax(-1), reduction="sum"),
    "jsd_with_logits": None,
    "kl_with_logits_none": lambda z, t: F.kl_div(z.log_softmax(-1), t.log_softmax(-1), reduction="sum",
                                                 log_target=True),
}


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_gives_the_same_gradients(name, use_reentrant):
    h0 = torch.randn(6, 8, dtype=torch.float64)
    w0 = torch.randn(8, 11, dtype=torch.float64)
    teacher = torch.randn(6, 11, dtype=torch.float64)

    def run(loss_fn, checkpointed):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        chunk = lambda a, b: loss_fn(a @ b, teacher)
        loss = checkpoint(chunk, h, w, use_reentrant=use_reentrant) if checkpointed else chunk(h, w)
        (loss * 0.7).backward()
        return loss.detach(), h.grad, w.grad

    plain = run(CHECKPOINTED[name], False)
    for want, got, what in zip(plain, run(CHECKPOINTED[name], True), ("loss", "grad h", "grad w")):
        assert torch.equal(want, got), f"{what}: checkpointed differs from plain by {(want - got).abs().max()}"
    if COMPOSITE[name] is not None:
        for want, got in zip(run(COMPOSITE[name], False), plain):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_exp_underflow_range_matches_torch(dtype, device):
    # log-targets between -104 and ln(FLT_MIN) have float32-denormal
    # probabilities; with input -inf the term is +inf in PyTorch (NaN only
    # where the probability itself underflows to 0) and must be the same in
    # every lane, body or tail of the SIMD loop.
    V = 40
    t = torch.linspace(-104.0, -86.0, V).to(dtype)
    for x_value in (-math.inf, -50.0):
        x = torch.full((3, V), x_value, dtype=dtype)
        x, tt = x.to(device), t.to(device).expand(3, V)
        ours = kl_op(x, tt, "none", True).float().cpu()
        theirs = F.kl_div(x.float(), tt.float(), reduction="none", log_target=True).cpu()
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.isinf(), theirs.isinf())
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite].to(dtype).float(), atol=1e-37, rtol=1e-2)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_none_backward_of_the_input_alone_does_not_read_the_input(device, dtype, log_target):
    """reduction='none', only the input requiring grad: the backward skips the
    input (its gradient, -t or -exp(t) times grad_output, does not depend on
    it). The gradient is bitwise the same whatever the input holds (NaN and
    +-inf included) and, for probability targets, bitwise PyTorch's."""
    x = make_logprobs((37, 1001), dtype).to(device)
    t = make_target((37, 1001), log_target, dtype).to(device)
    g = torch.randn(37, 1001, dtype=dtype, device=device)
    wild = torch.full_like(x, float("nan"))
    wild[::3] = float("inf")
    wild[1::3] = -float("inf")
    grads = []
    for inp in (x, wild):
        leaf = inp.clone().requires_grad_()
        kl_op(leaf, t, "none", log_target).backward(g)
        grads.append(leaf.grad)
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    assert torch.equal(grads[0], grads[1])
    assert not grads[0].isnan().any()
    ref = x.clone().requires_grad_()
    F.kl_div(ref, t, reduction="none", log_target=log_target).backward(g)
    if log_target:  # exp(t): the two exps may differ by an ulp
        torch.testing.assert_close(grads[0], ref.grad)
    else:
        assert torch.equal(grads[0], ref.grad)


@pytest.mark.huge
@pytest.mark.parametrize("device", DEVICES)
def test_more_than_2_pow_31_elements(device):
    # 2**21 + 1 rows of 1024 bf16 values (4 GiB): the last rows start past
    # element 2**31, so their offsets only fit in 64 bits.
    rows, cols = 2**21 + 1, 1024
    if device == "cuda" and torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs about 12 GiB of free GPU memory")
    x = torch.full((rows, cols), -7.0, dtype=torch.bfloat16, device=device)
    x[-1] = -3.0
    t = torch.full((cols,), 1.0 / cols, dtype=torch.bfloat16, device=device)
    assert x.numel() > 2**31
    per_row = kl_op(x, t, "row", False)
    p = float(t[0])
    assert per_row.shape == (rows,)
    torch.testing.assert_close(per_row[0].item(), cols * p * (math.log(p) + 7.0), rtol=1e-2, atol=0)
    torch.testing.assert_close(per_row[-1].item(), cols * p * (math.log(p) + 3.0), rtol=1e-2, atol=0)
    torch.testing.assert_close(per_row[-2].item(), per_row[0].item(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["kl_row", "kl_batchmean", "logits_none", "logits_autocast"])
def test_backward_scaling_touches_no_full_size_temporary_on_cpu(op, dtype):
    """grad_output != 1 (per row or scalar, in the gradient's dtype or, under
    autocast, float32): the CPU scales the saved gradient in place with no
    N x V multiply, cast or copy, and the result is the product rounded once."""
    shape = (24, 257)
    x = make_logprobs(shape).to(dtype).requires_grad_()
    t = make_target(shape, True).to(dtype)
    if op == "kl_row":
        loss = kl_op(x, t, "row", True)
    elif op == "kl_batchmean":
        loss = kl_op(x, t, "batchmean", True)
    elif op == "logits_none":
        loss = torch.ops.batchkl.kl_with_logits(x, t, 0.3, 1.0, "none")
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.ops.batchkl.kl_with_logits(x, t, 0.0, 2.0, "batchmean")
        assert loss.dtype == torch.float32
    g = torch.rand_like(loss) + 0.5
    saved = torch.autograd.grad(loss, x, torch.ones_like(loss), retain_graph=True)[0].float()
    factor = g.float()
    if dtype == torch.float16 and op in ("kl_batchmean", "logits_autocast"):
        # float16 gradients of a scalar reduction are stored as those of the
        # sum (kl.h, grads_of_sum): the product is with grad_output times the
        # forward's 1 / divisor, that factor in float32.
        xd = x.detach()
        fused = (torch.ops.batchkl.kl_fused(xd, t, "batchmean", True, True, False) if op == "kl_batchmean" else
                 torch.ops.batchkl.kl_with_logits_fused(xd, t, 0.0, 2.0, "batchmean", None, None, False, True,
                                                        False, torch.float32))
        saved, factor = fused[1].float(), g.float() * fused[3]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward(g)
    full = [e.name for e in prof.events()
            if any(list(s) == list(shape) for s in e.input_shapes or [] if isinstance(s, (list, tuple)))
            and e.name in ("aten::mul", "aten::mul_", "aten::_to_copy", "aten::copy_", "aten::clone",
                           "aten::empty_like", "aten::empty_strided", "aten::add", "aten::sum")]
    assert not full, full
    expected = saved * (factor.unsqueeze(-1) if loss.dim() else factor)
    torch.testing.assert_close(x.grad, expected.to(dtype), rtol=0, atol=0)
