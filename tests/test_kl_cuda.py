"""CUDA backend of torch.ops.batchkl.kl: parity with the float64 truth, the
CPU kernel and F.kl_div; layouts the 16-byte vector path cannot take;
determinism and batch invariance; streams; opcheck; torch.compile; errors."""
import math
import warnings

import pytest
import torch

import batchkl_ext
from conftest import (FLOAT_DTYPES, REDUCTIONS, apply_layout, assert_bitwise_equal, assert_close_scaled,
                      assert_cuda_memory_flat, assert_same_under_deterministic_algorithms, busy_side_stream,
                      run_in_fresh_process, run_python,
                      check_against_reference, kl_op, leaf, make_logprobs, make_target, ref_grads, ref_kl,
                      run_and_grad, torch_kl)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


@pytest.fixture(autouse=True)
def _sync():
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_pair(shape, dtype, log_target, layout="contiguous", t_layout=None):
    """Inputs made on the CPU (same generator as the CPU tests), then laid out on the GPU."""
    x = make_logprobs(shape, dtype).to(DEV)
    t = make_target(shape, log_target, dtype).to(DEV)
    return _layout(x, layout), _layout(t, t_layout or layout)


def _layout(t, layout):
    if layout == "misaligned":
        # x_big[..., 1:]: every row starts 1 element off a 16-byte boundary
        # (with V = 1001 the rows are not multiples of 16 bytes either).
        big = torch.full((*t.shape[:-1], t.shape[-1] + 1), float("nan"), dtype=t.dtype, device=t.device)
        view = big[..., 1:]
        view.copy_(t)
        return view
    return apply_layout(t, layout)


def test_cuda_kernels_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("batchkl::kl", "CUDA"), \
        "batchkl_ext was built without its CUDA kernels"


CUDA_LAYOUTS = ["contiguous", "misaligned", "sliced", "transposed", "expanded", "offset"]


@pytest.mark.parametrize("layout", CUDA_LAYOUTS)
@pytest.mark.parametrize("shape", [(5, 37), (3, 1001), (2, 3, 64), (4, 9000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_parity(reduction, log_target, dtype, shape, layout):
    x, t = cuda_pair(shape, dtype, log_target, layout)
    loss = check_against_reference(x, t, reduction, log_target, compare_cpu=True)
    assert loss.is_cuda


@pytest.mark.parametrize("t_layout", CUDA_LAYOUTS)
@pytest.mark.parametrize("x_layout", CUDA_LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_mixed_layouts(reduction, x_layout, t_layout):
    x, t = cuda_pair((6, 1001), torch.float32, True, x_layout, t_layout)
    check_against_reference(x, t, reduction, True, compare_cpu=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 256000), (65536, 7), (100, 1), (1,), (1, 1), (3, 1, 1, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_shapes(shape, reduction, log_target, dtype):
    x, t = cuda_pair(shape, dtype, log_target)
    check_against_reference(x, t, reduction, log_target, compare_cpu=True)


@pytest.mark.parametrize("shapes", [((64, 1001), (1001,)), ((64, 1001), (64, 1)), ((8, 1, 300), (5, 300)),
                                    ((), (16, 33)), ((16, 33), ())], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_broadcasting(shapes, dtype, reduction):
    xs, ts = shapes
    x = make_logprobs(xs, dtype).to(DEV)
    t = make_target(ts, False, dtype).to(DEV)
    check_against_reference(x, t, reduction, False, compare_cpu=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_mixed_dtypes(reduction):
    for xd, td in [(torch.float16, torch.float32), (torch.bfloat16, torch.float16), (torch.float64, torch.float32)]:
        x = make_logprobs((8, 301), xd).to(DEV)
        t = make_target((8, 301), True, td).to(DEV)
        assert check_against_reference(x, t, reduction, True, compare_cpu=True).dtype == torch.result_type(x, t)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_permuted_and_many_dims(reduction, log_target):
    x = make_logprobs((5, 4, 3, 2 * 29)).to(DEV).permute(2, 0, 1, 3)[..., ::2]
    t = make_target((3, 5, 29, 4), log_target).to(DEV).permute(0, 1, 3, 2)
    check_against_reference(x, t, reduction, log_target, compare_cpu=True)
    shape = (2,) * 7 + (3,)
    store = torch.full(tuple(2 * s for s in shape), float("nan"), device=DEV)
    xv = store[(slice(None, None, 2),) * 8]
    xv.copy_(make_logprobs(shape).to(DEV))
    tv = make_target(shape, log_target).to(DEV)
    check_against_reference(xv, tv, reduction, log_target, compare_cpu=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_zero_probability_and_nan(reduction, log_target, dtype):
    V = 1001
    x = make_logprobs((6, V), torch.float64)
    t = make_target((6, V), False, torch.float64)
    zero = torch.rand(6, V) < 0.3
    zero[0] = True
    t[zero] = 0.0
    x[1][zero[1]] = -math.inf
    x[2][zero[2]] = math.nan
    zero[4, 7] = zero[5, 100] = False
    t[4, 7] = 0.25
    x[4, 7] = math.nan                  # NaN input where p > 0: propagates
    t[5, 100] = math.nan                # NaN target: not a zero probability, propagates
    if log_target:
        t = t.log()
    for layout in ("contiguous", "misaligned"):
        xd = _layout(x.to(dtype).to(DEV), layout)
        td = _layout(t.to(dtype).to(DEV), layout)
        exp, mag = ref_kl(xd, td, reduction, log_target)
        w = torch.randn(exp.shape, dtype=dtype, device=DEV) if reduction in ("none", "row") else None
        loss, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), xd, td, reduction, w)
        assert_close_scaled(loss, exp, mag, dtype, what="loss")
        (rgx, mgx), (rgt, mgt) = ref_grads(xd, td, reduction, log_target, w)
        assert_close_scaled(gx, rgx, mgx, dtype, what="grad_input")
        assert_close_scaled(gt, rgt, mgt, dtype, what="grad_target")
        zd = zero.to(DEV)
        assert (gx[zd] == 0).all() and (gt[zd] == 0).all()
        if reduction == "none":
            assert (loss[zd] == 0).all()
        if reduction == "row":
            assert loss[0].item() == 0.0


@pytest.mark.parametrize("shapes", [((0,), (0,)), ((0, 5), (0, 5)), ((5, 0), (5, 0)), ((2, 0, 3), (2, 0, 3)),
                                    ((0, 7), (7,))], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_empty(shapes, reduction):
    xs, ts = shapes
    bshape = torch.broadcast_shapes(xs, ts)
    if reduction == "row" and bshape[-1] == 0 and math.prod(bshape[:-1]) > 1:
        pytest.skip("run in a subprocess by test_cuda_row_backward_empty_rows_subprocess (it once crashed)")
    x = leaf(torch.randn(xs, device=DEV))
    t = leaf(torch.rand(ts, device=DEV))
    loss = kl_op(x, t, reduction, False)
    expected = torch_kl(x.detach(), t.detach(), reduction, False)
    assert loss.shape == expected.shape and loss.device == x.device
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    gx, gt = torch.autograd.grad(torch.nan_to_num(loss.sum()), (x, t))
    assert gx.shape == x.shape and gt.shape == t.shape


def test_cuda_row_backward_empty_rows_subprocess():
    """reduction='row' backward with an empty distribution dim, (N, 0) with
    N > 1. Run in a subprocess: it once killed the process (segfault) on CUDA
    while the CPU raised from kl_scale_."""
    code = ("import torch, batchkl_ext\n"
            "x = torch.randn(5, 0, device='cuda', requires_grad=True)\n"
            "t = torch.rand(5, 0, device='cuda')\n"
            "torch.ops.batchkl.kl(x, t, 'row', False).sum().backward()\n"
            "torch.cuda.synchronize()\n"
            "assert x.grad.shape == (5, 0)\n")
    run_python(code, "'row' backward of (5, 0) on CUDA")


# --------------------------------------------------------------------------
# determinism and batch invariance
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(512, 1001), (8, 256000), (65536, 7)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_deterministic(shape, reduction, dtype):
    x, t = cuda_pair(shape, dtype, False)
    w = torch.randn(x.shape if reduction == "none" else x.shape[:-1], dtype=dtype, device=DEV)
    w = w if reduction in ("none", "row") else None
    runs = [run_and_grad(lambda a, b: kl_op(a, b, reduction, False), x, t, reduction, w) for _ in range(4)]
    for other in runs[1:]:
        for a, b, what in zip(runs[0], other, ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("V", [7, 37, 1001, 1024, 20000, 256000])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_cuda_row_batch_invariance(V, log_target, dtype):
    """A row's 'row' result is bitwise the same alone or at any position of
    any batch (rows of odd length start at every possible alignment)."""
    rx = make_logprobs((V,), dtype).to(DEV)
    rt = make_target((V,), log_target, dtype).to(DEV)
    alone = kl_op(rx, rt, "row", log_target)
    assert_bitwise_equal(kl_op(rx[None], rt[None], "row", log_target)[0], alone, "(1, V)")
    for n in (2, 5, 33):
        bx = make_logprobs((n, V), dtype).to(DEV)
        bt = make_target((n, V), log_target, dtype).to(DEV)
        for pos in sorted(p for p in {0, 1, 2, 3, n // 2, n - 1} if p < n):
            bx2, bt2 = bx.clone(), bt.clone()
            bx2[pos] = rx
            bt2[pos] = rt
            out = kl_op(bx2, bt2, "row", log_target)
            assert_bitwise_equal(out[pos], alone, f"row {pos} of {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_cuda_row_many_rows_of_several_tiles(dtype):
    """'row' where the last CTA adds up the tile sums of more than 1024 rows
    of two tiles each (each of its 256 threads four rows at a time, so rows
    r, r + 256, r + 512, r + 768, then r + 1024): every row's value and
    gradients against float64 and the CPU kernel, and a row at each of those
    offsets bitwise as when computed alone."""
    x, t = cuda_pair((1100, 9000), dtype, False)
    out = check_against_reference(x, t, "row", False, compare_cpu=True)
    for r in (0, 255, 256, 600, 768, 1023, 1024, 1099):
        assert_bitwise_equal(kl_op(x[r:r + 1], t[r:r + 1], "row", False)[0], out[r], f"row {r}")


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "row"])
def test_cuda_fused_gradients_batch_invariant(reduction):
    V = 1001
    rx = make_logprobs((1, V)).to(DEV)
    rt = make_target((1, V), False).to(DEV)
    _, gx1, gt1 = run_and_grad(lambda a, b: kl_op(a, b, "row", False), rx, rt, "row", torch.ones(1, device=DEV))
    bx = make_logprobs((9, V)).to(DEV)
    bt = make_target((9, V), False).to(DEV)
    bx[3], bt[3] = rx[0], rt[0]
    _, gx, gt = run_and_grad(lambda a, b: kl_op(a, b, "row", False), bx, bt, "row", torch.ones(9, device=DEV))
    assert_bitwise_equal(gx[3], gx1[0])
    assert_bitwise_equal(gt[3], gt1[0])


# --------------------------------------------------------------------------
# streams, devices
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_uses_current_stream(reduction):
    """Everything issued on a side stream that is busy: if any kernel ran on
    another stream it would read the inputs before they are written."""
    shape = (64, 4099)
    src_x = make_logprobs(shape).to(DEV)
    src_t = make_target(shape, False).to(DEV)
    w = torch.randn(shape if reduction == "none" else shape[:-1], device=DEV)
    x = torch.zeros(shape, device=DEV)
    t = torch.zeros(shape, device=DEV)
    with busy_side_stream():
        x.copy_(src_x)
        t.copy_(src_t)
        xa, ta = leaf(x), leaf(t)
        loss = kl_op(xa, ta, reduction, False)
        obj = (loss * w).sum() if reduction in ("none", "row") else loss
        gx, gt = torch.autograd.grad(obj, (xa, ta))
        out = (loss.detach().clone(), gx.clone(), gt.clone())
    exp, mag = ref_kl(src_x, src_t, reduction, False)
    assert_close_scaled(out[0], exp, mag, what="loss on side stream")
    (rgx, mgx), (rgt, mgt) = ref_grads(src_x, src_t, reduction, False,
                                       w if reduction in ("none", "row") else None)
    assert_close_scaled(out[1], rgx, mgx, what="grad_input on side stream")
    assert_close_scaled(out[2], rgt, mgt, what="grad_target on side stream")
    torch.cuda.synchronize()


def _weights(reduction, shape):
    """A fixed upstream gradient (not 1) for 'none' / 'row', None otherwise."""
    if reduction not in ("none", "row"):
        return None
    shape = shape if reduction == "none" else shape[:-1]
    return (torch.arange(math.prod(shape), device=DEV) % 3 + 0.5).reshape(shape)


def _fwd_bwd(x, t, reduction, log_target):
    return run_and_grad(lambda a, b: kl_op(a, b, reduction, log_target), x, t, reduction,
                        _weights(reduction, torch.broadcast_shapes(x.shape, t.shape)))


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
def test_cuda_several_streams_at_once(log_target):
    """One job per side stream (each held busy first, so that their kernels
    overlap), launched interleaved, three times over: every loss and gradient
    is bitwise what the default stream gives."""
    jobs = [(*cuda_pair((32, 4099), dtype, log_target), reduction)
            for dtype, reduction in ((torch.float32, "batchmean"), (torch.bfloat16, "row"), (torch.float32, "none"),
                                     (torch.float16, "sum"), (torch.float64, "mean"))]
    serial = [_fwd_bwd(x, t, r, log_target) for x, t, r in jobs]
    streams = [torch.cuda.Stream() for _ in jobs]
    for _ in range(3):
        results = []
        for stream, (x, t, r) in zip(streams, jobs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda._sleep(2_000_000)
                results.append(_fwd_bwd(x, t, r, log_target))
        for stream in streams:
            stream.synchronize()
        for k, (got, want) in enumerate(zip(results, serial)):
            for a, b, what in zip(got, want, ("loss", "grad_input", "grad_target")):
                assert_bitwise_equal(a, b, f"{what} of job {k} on a side stream")


def test_cuda_deterministic_algorithms_mode():
    """Not refused and no warning under torch.use_deterministic_algorithms(True),
    and bitwise the same results as without it."""
    x, t = cuda_pair((64, 4099), torch.float32, False)
    xb, tb = cuda_pair((8, 3, 1001), torch.bfloat16, True, layout="transposed")
    cases = [(x, t, r, False) for r in REDUCTIONS] + [(xb, tb, r, True) for r in REDUCTIONS]
    def run_all():
        out = [_fwd_bwd(*c) for c in cases]
        torch.cuda.synchronize()
        return out

    assert_same_under_deterministic_algorithms(run_all)


def test_cuda_memory_flat_over_thousands_of_calls():
    """3000 forward + backward calls (every reduction, both log_target): the
    allocated device memory is back to exactly where it was, and no call
    peaks higher than the first. In a fresh process: run after other tests in
    a pytest-xdist worker, the peak once came out 250 KiB higher (2026-11-26,
    H200) while the allocated memory was back exactly."""
    run_in_fresh_process("test_kl_cuda", "check_memory_flat")


def check_memory_flat():
    pairs = [cuda_pair((64, 1001), torch.float32, False), cuda_pair((16, 3, 257), torch.bfloat16, True)]

    def step():
        for (x, t), log_target in zip(pairs, (False, True)):
            for reduction in ("batchmean", "row", "none"):
                _fwd_bwd(x, t, reduction, log_target)

    assert_cuda_memory_flat(step, warmup=20, calls=500)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device():
    x, t = cuda_pair((8, 1001), torch.float32, False)
    x1, t1 = x.to("cuda:1"), t.to("cuda:1")
    with torch.cuda.device(0):
        for reduction in REDUCTIONS:
            out = kl_op(x1, t1, reduction, False)
            assert out.device == x1.device
            torch.testing.assert_close(out.cpu(), kl_op(x, t, reduction, False).cpu(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_error_two_devices(which, reduction):
    x, t = cuda_pair((4, 9), torch.float32, False)
    if which == "input":
        t = t.cpu()
    else:
        x = x.cpu()
    with pytest.raises(RuntimeError, match="device"):
        kl_op(x, t, reduction, False)
    with pytest.raises(RuntimeError, match="device"):
        kl_op(leaf(x), leaf(t), reduction, False)
    with pytest.raises(RuntimeError, match="device"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batchkl_ext.kl_div(x, t, reduction="sum")


def test_cuda_error_cpu_scalar_tensor():
    # Unlike elementwise ops, batchkl does not accept a CPU 0-dim tensor with a CUDA one.
    x, _ = cuda_pair((4, 9), torch.float32, False)
    with pytest.raises(RuntimeError, match="device"):
        kl_op(x, torch.tensor(0.5), "sum", False)


# --------------------------------------------------------------------------
# in-place gradient scaling on CUDA
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "batchmean", "row"])
def test_cuda_grad_output_scaling(reduction):
    x, t = cuda_pair((6, 1001), torch.float32, True)
    xa, ta = leaf(x), leaf(t)
    loss = kl_op(xa, ta, reduction, True)
    g = torch.tensor([1.0, 2.0, 1.0, -0.5, 1.0, 0.0], device=DEV) if reduction == "row" else \
        torch.tensor(3.0, device=DEV)
    g1 = torch.autograd.grad(loss, (xa, ta), g, retain_graph=True)
    g2 = torch.autograd.grad(loss, (xa, ta), g)        # graph freed: may scale in place
    (rgx, mgx), (rgt, mgt) = ref_grads(x, t, reduction, True, g.cpu() if reduction == "row" else 3.0)
    for gx, gt in (g1, g2):
        assert_close_scaled(gx, rgx, mgx)
        assert_close_scaled(gt, rgt, mgt)


# --------------------------------------------------------------------------
# opcheck, torch.compile
# --------------------------------------------------------------------------

@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "logt"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_opcheck(reduction, log_target):
    for layout in ("contiguous", "misaligned"):
        x, t = cuda_pair((4, 33), torch.float32, log_target, layout)
        torch.library.opcheck(torch.ops.batchkl.kl.default, (leaf(x), leaf(t), reduction, log_target))
    x, t = cuda_pair((4, 33), torch.bfloat16, log_target)
    torch.library.opcheck(torch.ops.batchkl.kl_fused.default, (x, t, reduction, log_target, True, True))


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_cuda_compile(dynamic):
    torch._dynamo.reset()

    def fn(x, t):
        a = batchkl_ext.kl_div(x, t, reduction="batchmean", log_target=True)
        b = torch.ops.batchkl.kl(x, t, "row", True)
        c = torch.ops.batchkl.kl(x, t.exp(), "none", False)
        return a + b.sum() + c.square().sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for n in (4, 7, 12):
        x, t = cuda_pair((n, 1001), torch.float32, True)
        res = []
        for f in (fn, compiled):
            xa, ta = leaf(x), leaf(t)
            out = f(xa, ta)
            out.backward()
            res.append((out.detach(), xa.grad, ta.grad))
        torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_cuda_kldivloss_module():
    x, t = cuda_pair((16, 1001), torch.float32, True)
    for reduction in ("batchmean", "sum", "none"):
        ours = batchkl_ext.KLDivLoss(reduction=reduction, log_target=True)(x, t)
        theirs = torch.nn.KLDivLoss(reduction=reduction, log_target=True)(x, t)
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
