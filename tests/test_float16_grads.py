"""float16 gradients of the fused ops under loss scaling (GradScaler).

The fused forward writes the gradients before grad_output is known. Divided
by the reduction's divisor there (N rows, N * V elements), most float16
gradient elements fell below float16's smallest value (6e-8) and were stored
as 0, which a GradScaler's grad_output (65536), applied in the backward,
could not undo: at 4096 x 4096 forward KL under float16 autocast, 10.3M of
16.8M gradient elements came out 0 (PyTorch's composite: 2492). float16
gradients of a scalar reduction are now those of the sum, and the backward
applies grad_output / divisor in float32 (kl.h, grads_of_sum).
"""
import pytest
import torch
import torch.nn.functional as F

import batchkl_ext
from conftest import assert_bitwise_equal, make_logprobs, make_target
from test_logits import ref_logits

SCALE = 65536.0  # torch.amp.GradScaler's initial scale
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def check_float16_grad(grad, ref64):
    """grad (float16) against the float64 gradient: within a small multiple
    of the error of rounding that gradient to float16 once (the floor; the
    fused path rounds twice: the stored gradient, then its product with
    grad_output / divisor), and almost no element flushed to 0 that float16
    holds (those left are the ones below 6e-8 before the upstream factor)."""
    assert grad.dtype == torch.float16 and grad.shape == ref64.shape
    g = grad.double().cpu()
    ref64 = ref64.cpu()
    assert torch.isfinite(g).all()

    def rel(v):
        return ((v - ref64).abs().sum() / ref64.abs().sum()).item()

    err, floor = rel(g), rel(ref64.half().double())
    lost = ((g == 0) & (ref64.half() != 0)).sum().item()
    assert err <= 2.5 * floor + 1e-4 and lost <= ref64.numel() // 100, \
        f"relative L1 error {err:.2e} (rounded once: {floor:.2e}), {lost} of {ref64.numel()} elements flushed to 0"


def logits(shape, device):
    return (2 * torch.randn(shape)).half().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fwd", "jsd", "rev"])
@pytest.mark.parametrize("how", ["batchmean", "mean", "sum", "masked", "num_items", "num_items_tensor"])
def test_kl_with_logits_float16_grads_under_loss_scaling(device, beta, how):
    """Under float16 autocast, loss * 65536 backward: input and target
    gradients against the float64 composite's."""
    N, V = 256, 2048
    x, t = logits((N, V), device), logits((N, V), device)
    kw = {"reduction": how if how in ("batchmean", "mean", "sum") else "batchmean"}
    if how == "masked":
        kw["mask"] = torch.rand(N, device=device) < 0.7
    elif how == "num_items":
        kw["num_items_in_batch"] = 3000
    elif how == "num_items_tensor":
        kw["num_items_in_batch"] = torch.tensor(3000, device=device)
    xl, tl = x.clone().requires_grad_(), t.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.float16):
        loss = batchkl_ext.jsd_with_logits(xl, tl, beta=beta, **kw)
    # (A 'sum' of 256 rows, times 65536, is beyond float16 whatever computes it.)
    scale = SCALE / N if how == "sum" else SCALE
    (loss * scale).backward()
    n = kw.get("num_items_in_batch")
    ref = ref_logits(x.cpu(), t.cpu(), beta=beta, reduction=kw["reduction"],
                     mask=None if "mask" not in kw else kw["mask"].cpu(),
                     num_items=None if n is None else float(n), gscale=scale)
    check_float16_grad(xl.grad, ref.gx)
    check_float16_grad(tl.grad, ref.gt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_kl_float16_grads_under_loss_scaling(device, reduction, log_target, no_mean_warning):
    """The drop-in on float16 tensors (no autocast, which runs it in
    float32), loss * 1024 backward (a float16 loss times 65536 is inf),
    against F.kl_div in float64. Stored divided, as until 2026-11-29:
    'batchmean' 23% of the input's gradient 0, 'mean' 65%."""
    shape = (512, 2048)
    x = make_logprobs(shape).half().to(device)
    t = make_target(shape, log_target).half().to(device)
    # No target probability rounded to 0, where d/dt is -inf in F.kl_div
    # (the zero-probability rule, tested elsewhere, gives 0).
    t = torch.where(t == 0, torch.full_like(t, 2.0**-24), t)
    xl, tl = x.clone().requires_grad_(), t.clone().requires_grad_()
    (batchkl_ext.kl_div(xl, tl, reduction=reduction, log_target=log_target) * 1024).backward()
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    (F.kl_div(x64, t64, reduction=reduction, log_target=log_target) * 1024).backward()
    check_float16_grad(xl.grad, x64.grad)
    check_float16_grad(tl.grad, t64.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ops_give_float16_gradients_of_the_sum_and_their_factor(device):
    """The fused ops' fourth result: 0-d float32 1 / divisor for float16
    scalar reductions (where a gradient is asked for), empty otherwise; the
    gradient times it is the gradient of the reduced loss."""
    x = make_logprobs((6, 40)).to(device)
    t = make_target((6, 40), False).to(device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xd, td = x.to(dtype), t.to(dtype)
        for reduction, divisor in (("sum", 1.0), ("mean", 240.0), ("batchmean", 6.0), ("row", None)):
            _, gi, _, gs = torch.ops.batchkl.kl_fused(xd, td, reduction, False, True, False)
            _, gi_sum, _, _ = torch.ops.batchkl.kl_fused(xd, td, "sum" if divisor else "row", False, True, False)
            if dtype == torch.float16 and divisor is not None:
                assert gs.shape == () and gs.dtype == torch.float32 and gs.item() == pytest.approx(1 / divisor)
                assert_bitwise_equal(gi, gi_sum)
            else:
                assert gs.shape == (0,) and gs.dtype == torch.float32
            _, _, _, none = torch.ops.batchkl.kl_fused(xd, td, reduction, False, False, False)
            assert none.numel() == 0  # no gradient asked for
        mask = torch.tensor([True, False, True, True, False, True], device=device)
        for kw, divisor in (({"reduction": "batchmean"}, 6.0), ({"reduction": "batchmean", "mask": mask}, 4.0),
                            ({"reduction": "mean", "mask": mask}, 160.0), ({"reduction": "none"}, None),
                            ({"reduction": "none", "num_items_in_batch": torch.tensor(7.0, device=device)}, 7.0)):
            args = (xd, td, 0.5, 2.0, kw["reduction"], kw.get("mask"), kw.get("num_items_in_batch"), False)
            _, gi, gt, gs = torch.ops.batchkl.kl_with_logits_fused(*args, True, True)
            if dtype == torch.float16 and divisor is not None:
                assert gs.shape == () and gs.dtype == torch.float32 and gs.item() == pytest.approx(1 / divisor)
                _, gi_sum, gt_sum, _ = torch.ops.batchkl.kl_with_logits_fused(
                    xd, td, 0.5, 2.0, "sum", kw.get("mask"), None, False, True, True)
                assert_bitwise_equal(gi, gi_sum)
                assert_bitwise_equal(gt, gt_sum)
            else:
                assert gs.shape == (0,) and gs.dtype == torch.float32
        for op, args in ((torch.ops.batchkl.kl_fused.default, (xd, td, "batchmean", False, True, True)),
                         (torch.ops.batchkl.kl_with_logits_fused.default,
                          (xd, td, 0.5, 2.0, "batchmean", mask, None, False, True, True))):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["retain_graph", "saved_tensor_hooks", "grad_output_float32"])
def test_float16_backward_paths_agree(device, path):
    """The backward scales the saved float16 gradient in place where it may
    and out of place where it may not (graph retained, saved-tensor hooks):
    both multiply by grad_output / divisor in float32 and round once, so the
    bits agree."""
    x, t = logits((64, 1000), device), logits((64, 1000), device)

    def grads(mode):
        xl, tl = x.clone().requires_grad_(), t.clone().requires_grad_()
        if mode == "saved_tensor_hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda v: v, lambda v: v):
                loss = batchkl_ext.kl_div_with_logits(xl, tl, reduction="mean")
        elif mode == "grad_output_float32":
            with torch.autocast(device, dtype=torch.float16):  # a float32 loss, so a float32 grad_output
                loss = batchkl_ext.kl_div_with_logits(xl, tl, reduction="mean")
            assert loss.dtype == torch.float32
        else:
            loss = batchkl_ext.kl_div_with_logits(xl, tl, reduction="mean")
        (loss * 1024).backward(retain_graph=mode == "retain_graph")
        return xl.grad, tl.grad

    plain = grads("plain")
    other = grads(path)
    assert_bitwise_equal(plain[0], other[0], "grad input")
    assert_bitwise_equal(plain[1], other[1], "grad target")


@pytest.mark.compile
def test_float16_grads_under_torch_compile():
    """The compiled backward (AOTAutograd traces the out-of-place product)
    gives the eager gradients' values."""
    x, t = logits((64, 1000), "cpu"), logits((64, 1000), "cpu")

    def step(a, b):
        with torch.autocast("cpu", dtype=torch.float16):  # a float32 loss: a float16 one times 65536 is inf
            return batchkl_ext.jsd_with_logits(a, b, beta=0.5, reduction="mean") * SCALE

    out = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xl, tl = x.clone().requires_grad_(), t.clone().requires_grad_()
        fn(xl, tl).backward()
        out.append((xl.grad, tl.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-3, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-3, atol=0)
    ref = ref_logits(x, t, beta=0.5, reduction="mean", gscale=SCALE)
    check_float16_grad(out[1][0], ref.gx)
    check_float16_grad(out[1][1], ref.gt)
