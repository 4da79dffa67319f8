"""CUDA backend of torch.ops.batchkl.kl_with_logits: values and gradients
against the float64 reference and the CPU kernel for every launch shape the
kernel has (a warp per row up to V = 2048, 16-bit rows up to 4096; a CTA per row; on Hopper a
cluster of CTAs per row; rows staged in shared memory or, where they do not
fit, streamed twice), layouts, masks, num_items_in_batch, special values,
determinism, batch invariance, streams, memory, autocast, opcheck and
torch.compile. The kernel's logic also runs without a GPU in
tests/cpp/test_logits_emulated.cpp."""
import math
import re

import pytest
import torch

import batchkl_ext
from conftest import (assert_bitwise_equal, assert_close_scaled, assert_same_under_deterministic_algorithms,
                      assert_cuda_memory_flat, busy_side_stream, run_in_fresh_process, run_python)
from test_logits import (DT_ID, LOGIT_REDUCTIONS, TOL, _layout, check_batch_invariance, check_logits, huge_logits,
                         lowest_value_rows, make_logits, make_mask, op, ref_logits, run_op)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# 37, 2048: a warp per row; 2049: a CTA per row (16-bit: a warp); 4096,
# 4097: the last 16-bit row on a warp and the first on a CTA; 5000: a CTA per
# row; 40000 (2 x 160 KB): a cluster of CTAs per row on Hopper, one streamed
# CTA elsewhere.
VOCABS = (37, 2048, 2049, 4096, 4097, 5000, 40000)


@pytest.fixture(autouse=True)
def _sync():
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def on_cuda(fn=op, mask=None, num_items=None, **kw):
    """fn on CUDA copies of CPU leaves (autograd carries the gradients back),
    with the mask and num_items_in_batch on the GPU too."""
    def f(a, b):
        m = None if mask is None else mask.to(DEV)
        n = num_items
        if n is not None:
            n = (n if isinstance(n, torch.Tensor) else torch.tensor(float(n))).to(DEV)
        return fn(a.to(DEV), b.to(DEV), mask=m, num_items_in_batch=n, **kw).cpu()
    return f


def check_cuda(x, t, *, beta=0.0, temperature=1.0, reduction="batchmean", mask=None, num_items=None,
               grad_target=True, compare_torch=None):
    """The CUDA result against the float64 reference (check_logits) and
    against the CPU kernel."""
    kw = dict(beta=beta, temperature=temperature, reduction=reduction)
    got = check_logits(x, t, **kw, mask=mask, num_items=num_items, grad_target=grad_target,
                       fn=on_cuda(mask=mask, num_items=num_items, **kw), compare_torch=compare_torch)
    nt = None if num_items is None else torch.tensor(float(num_items))
    w = torch.ones(x.shape[:-1], dtype=torch.result_type(x, t)) if reduction == "none" and nt is None else None
    cpu = run_op(lambda a, b: op(a, b, **kw, mask=mask, num_items_in_batch=nt), x, t, grad_target=grad_target, w=w)
    ref = ref_logits(x, t, **kw, mask=mask, num_items=None if nt is None else float(nt), w=w)
    rd = torch.result_type(x, t)
    loss_cuda = op(x.to(DEV), t.to(DEV), **kw, mask=None if mask is None else mask.to(DEV),
                   num_items_in_batch=None if nt is None else nt.to(DEV)).cpu()
    assert_close_scaled(loss_cuda, cpu[0].double(), ref.loss_mag, tol=TOL[rd], what="loss vs CPU kernel")
    return got


def test_cuda_logits_kernels_registered():
    for name in ("batchkl::kl_with_logits", "batchkl::kl_with_logits_fused"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), \
            "batchkl_ext was built without its CUDA kernels"


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_cuda_matches_reference(dtype, beta, reduction, V):
    rows = 9 if V <= 5000 else 3
    x, t = make_logits((rows, V), dtype), make_logits((rows, V), dtype)
    check_cuda(x, t, beta=beta, temperature=2.0 if V == 37 else 1.0, reduction=reduction)


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (3, 128256)), (torch.bfloat16, (2, 256000)),
                                         (torch.float32, (2, 256000)), (torch.float32, (1, 1000003))],
                         ids=["bf16-128k", "bf16-256k", "f32-256k-streamed", "f32-1M"])
def test_cuda_large_vocab(dtype, shape, beta):
    x, t = make_logits(shape, dtype), make_logits(shape, dtype)
    check_cuda(x, t, beta=beta, reduction="none")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("base", [1e9, -2e10, 1e30, -3e38, 3.38e38])
@pytest.mark.parametrize("V", [40, 5000, 40000])
def test_cuda_huge_logits(V, base, dtype, beta):
    """Logits from 1e9 to float32's largest value (test_logits.test_huge_logits)
    on each launch shape, at T = 0.7 and, below 1e38, at three times float32's
    spacing there: the distances from the row's max taken before the scaling."""
    x, t, spacing = huge_logits(base, V, dtype)
    for temperature in (0.7,) if abs(base) > 1e38 else (0.7, 3 * spacing):
        for grad_target in (True, False):  # the distillation kernel where beta = 0 and the teacher needs none
            # (PyTorch's composite scales the logits first: not a reference here.)
            _, gx, gt = check_cuda(x, t, beta=beta, temperature=temperature, reduction="none",
                                   grad_target=grad_target, compare_torch=False)
            assert torch.isfinite(gx).all() and (gt is None or torch.isfinite(gt).all())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("V", [40, 5000, 40000])
def test_cuda_rows_of_the_lowest_value_are_uniform(V, dtype, beta):
    """A row of finfo.min (padding) beside ordinary logits: a uniform
    distribution at any temperature. (The kernel's forward and reverse KL took
    their log-ratio from y - x and the two rows' maxes: here a difference of
    about 3.4e38 whose rounding, 2e31, was the result.)"""
    x, t = lowest_value_rows(V, dtype)
    for temperature in (0.5, 1.0, 2.0):
        for grad_target in (True, False):
            _, gx, gt = check_cuda(x, t, beta=beta, temperature=temperature, reduction="none",
                                   grad_target=grad_target, compare_torch=False)
            assert torch.isfinite(gx).all() and (gt is None or torch.isfinite(gt).all())


def _on_device(view):
    """The same view (sizes, strides, storage offset, and the rest of its
    storage) on the GPU: the whole storage goes over, so expanded views stay
    expanded."""
    flat = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage())
    return flat.to(DEV).as_strided(view.size(), view.stride(), view.storage_offset())


@pytest.mark.parametrize("V", [40, 3001, 40000])
@pytest.mark.parametrize("t_kind", ["same", "contiguous", "expanded"])
@pytest.mark.parametrize("x_kind", ["sliced_leading", "last_strided", "sliced_last", "offset", "expanded"])
def test_cuda_layouts_bitwise(x_kind, t_kind, V):
    """Any layout gives the bits of the contiguous call (the 16-byte and the
    element-wise paths sum in the same order), and the reference values."""
    x0, t0 = make_logits((2, 3, V)), make_logits((2, 3, V))
    x_cpu = _layout(x0, x_kind)
    t_cpu = t0 if t_kind == "contiguous" else _layout(t0, x_kind if t_kind == "same" else "expanded")
    x, t = _on_device(x_cpu), _on_device(t_cpu)
    assert x.stride() == x_cpu.stride() and t.stride() == t_cpu.stride()
    w = torch.randn(2, 3, device=DEV)
    f = lambda a, b: op(a, b, beta=0.3, temperature=2.0, reduction="none")  # noqa: E731
    for a, b, name in zip(run_op(f, x, t, w=w), run_op(f, x.contiguous(), t.contiguous(), w=w),
                          ("loss", "grad_input", "grad_target")):
        assert_bitwise_equal(a, b, name)
    check_cuda(x_cpu.contiguous(), t_cpu.contiguous(), beta=0.3, temperature=2.0, reduction="batchmean")


def test_cuda_misaligned_rows():
    """Rows that start off a 16-byte boundary (x_big[:, 1:], V odd)."""
    for V in (1001, 5001, 40001):
        big_x, big_t = make_logits((4, V + 1)), make_logits((4, V + 1))
        x, t = big_x[:, 1:], big_t[:, 1:]
        xd, td = big_x.to(DEV)[:, 1:], big_t.to(DEV)[:, 1:]
        w = torch.randn(4, device=DEV)
        f = lambda a, b: op(a, b, beta=0.5, reduction="none")  # noqa: E731
        for a, b, name in zip(run_op(f, xd, td, w=w), run_op(f, xd.contiguous(), td.contiguous(), w=w),
                              ("loss", "grad_input", "grad_target")):
            assert_bitwise_equal(a, b, f"{name} V={V}")
        check_cuda(x.contiguous(), t.contiguous(), beta=0.5, reduction="none")


@pytest.mark.parametrize("V", [100, 5000, 40000])
@pytest.mark.parametrize("mask_kind", ["random", "all_false"])
@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cuda_mask(beta, reduction, mask_kind, V):
    x, t = make_logits((6, V)), make_logits((6, V))
    check_cuda(x, t, beta=beta, reduction=reduction, mask=make_mask((6,), mask_kind))


@pytest.mark.parametrize("ni", [7, torch.tensor(7), torch.tensor(7.5, dtype=torch.float64)], ids=["int", "i64", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_cuda_num_items_in_batch(reduction, masked, ni):
    x, t = make_logits((6, 3000)), make_logits((6, 3000))
    check_cuda(x, t, beta=0.5, reduction=reduction, mask=make_mask((6,), "random") if masked else None,
               num_items=ni)


def test_cuda_num_items_on_device_does_not_sync():
    """num_items_in_batch on the GPU or as a Python number, and a mask: no
    host synchronisation (a number is read on the host, never copied over)."""
    x = make_logits((8, 5000)).to(DEV).requires_grad_()
    t = make_logits((8, 5000)).to(DEV)
    mask = (torch.arange(8, device=DEV) % 3) != 0
    n = torch.tensor(123, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = batchkl_ext.jsd_with_logits(x, t, beta=0.5, mask=mask, num_items_in_batch=n)
        loss2 = batchkl_ext.kl_div_with_logits(x, t, mask=mask, reduction="batchmean")
        loss3 = batchkl_ext.kl_div_with_logits(x, t, num_items_in_batch=77)
        (loss + loss2 + loss3).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("V", [33, 12000, 40000])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_cuda_special_values_like_cpu(dtype, beta, V):
    """-inf entries (probability 0: 0, never NaN), a NaN row, a +inf logit
    and a row of -inf only (NaN, as PyTorch), a masked NaN row (0), and a
    JSD mixture that is subnormal (beta = 0.5 times a teacher probability
    of 1.67e-38 where the student's is 0; the SFU's log would make it
    -inf): as the CPU kernel gives them."""
    inf = float("inf")
    x, t = make_logits((6, V), torch.float64), make_logits((6, V), torch.float64)
    x[:, 1] = -inf
    t[:, 2] = -inf
    x[:, 4] = t[:, 4] = -inf
    x[1, V // 2] = float("nan")
    t[2, -1] = inf
    x[3] = -inf
    x[4, 5] = t[4, 5] = -inf
    t[4, 5] = torch.logsumexp(t[4], 0) + math.log(1.67e-38)
    x, t = x.to(dtype), t.to(dtype)
    for mask, red in ((None, "none"), (torch.tensor([True, False, True, True, True, False]), "batchmean")):
        kw = dict(beta=beta, reduction=red, mask=mask)
        w = torch.ones(6, dtype=dtype) if red == "none" else None
        cpu = run_op(lambda a, b: op(a, b, **kw), x, t, w=w)
        gpu = run_op(on_cuda(**kw), x, t, w=w)
        for a, b, name in zip(gpu, cpu, ("loss", "grad_input", "grad_target")):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=2e-2 if dtype == torch.bfloat16 else 2e-5,
                                       atol=1e-5, msg=lambda m: f"{name} {red}: {m}")


@pytest.mark.parametrize("V", [50, 9000])
@pytest.mark.parametrize("beta", [0.5, 1e-3])
def test_cuda_jsd_probs_mode(beta, V):
    """probs=True JSD in float32 with zeros, a teacher probability of 1e-40
    where the student's is 0 (its gradient divides its term by it, so no
    floor on m may touch it), and a NaN (its row NaN). Against float64 where
    a probability is positive, a gradient's magnitude divided by it (as
    test_op_probs_mode_jsd_tiny_probabilities on the CPU): the GPU takes its
    logs otherwise than the CPU kernel, and at beta = 1e-3 a gradient is the
    difference of two logs of order 8 that differ by 1e-3, so the two kernels
    are both off float64 by about 1e-3 relative and need not agree with each
    other to float32's last bits. Where a probability is 0, and in the NaN
    row, as the CPU kernel gives them."""
    qc = torch.rand(5, V, dtype=torch.float64) + 0.1
    pc = torch.rand(5, V, dtype=torch.float64) + 0.1
    qc[:, 3] = 0.0
    pc[:, 3] = 1e-40 * pc.sum(-1)
    pc[:, 7] = 0.0
    qc[2, V // 2] = float("nan")
    qc, pc = qc.float().double(), pc.float().double()  # the float32 values, exactly
    w = torch.randn(5).double()
    kw = dict(beta=beta, reduction="none", probs=True)
    cpu = run_op(lambda a, b: op(a, b, **kw), qc.float(), pc.float(), w=w.float())
    gpu = run_op(lambda a, b: op(a.to(DEV), b.to(DEV), **kw).cpu(), qc.float(), pc.float(), w=w.float())
    rows = [0, 1, 3, 4]
    r = ref_logits(qc[rows].log(), pc[rows].log(), beta=beta, reduction="none", w=w[rows])
    tol = TOL[torch.float32]
    assert_close_scaled(gpu[0][rows], r.loss, r.loss_mag, tol=tol, what="loss")
    for g, c, probs, want, mag, name in ((gpu[1], cpu[1], qc, r.gx, r.gx_mag, "grad_input"),
                                         (gpu[2], cpu[2], pc, r.gt, r.gt_mag, "grad_target")):
        g, c, probs = g[rows], c[rows], probs[rows]
        pos = probs > 0
        assert_close_scaled(g[pos], (want / probs)[pos], (mag / probs)[pos], tol=tol, what=name)
        # A floor on m would be off by the order of the gradient itself here.
        torch.testing.assert_close(g[~pos], c[~pos], rtol=1e-2, atol=1e-5 * c.abs().max().item(),
                                   msg=lambda m: f"{name} at a probability of 0: {m}")
    for a, b, name in zip(gpu, cpu, ("loss", "grad_input", "grad_target")):
        assert a[2].isnan().all() and b[2].isnan().all(), f"{name}: the NaN row"


@pytest.mark.parametrize("shape,dim", [((7, 30), -1), ((30, 7), 0), ((3, 5000, 2), 1), ((2, 40000), -1)],
                         ids=["rows", "dim0", "strided", "long"])
@pytest.mark.parametrize("kind", ["probs", "log_probs", "logits"])
def test_cuda_kl_divergence(kind, shape, dim):
    """batchkl_ext.kl_divergence on CUDA (probs mode of the kernel included):
    values and gradients as the CPU kernel gives them."""
    if kind == "probs":
        p = torch.rand(shape, dtype=torch.float64) * (torch.rand(shape) < 0.8)  # counts with exact zeros
        q = torch.rand(shape, dtype=torch.float64) + 0.01
    elif kind == "log_probs":
        p = torch.log_softmax(make_logits(shape, torch.float64), dim)
        q = torch.log_softmax(make_logits(shape, torch.float64), dim)
    else:
        p, q = make_logits(shape, torch.float64), make_logits(shape, torch.float64)
    p, q = p.float(), q.float()
    w = torch.randn(torch.Size(n for i, n in enumerate(shape) if i != dim % len(shape)))

    def f(a, b):
        return batchkl_ext.kl_divergence(a, b, kind=kind, dim=dim)

    want = run_op(f, p, q, w=w)
    got = run_op(lambda a, b: f(a.to(DEV), b.to(DEV)).cpu(), p, q, w=w)
    for a, b, name in zip(got, want, ("kl", "grad p", "grad q")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("V", [512, 5000, 40000])
def test_cuda_deterministic(V):
    x, t = make_logits((16, V)).to(DEV), make_logits((16, V)).to(DEV)
    mask = make_mask((16,), "random").to(DEV)

    def run():
        out = []
        for red in ("none", "sum", "batchmean"):
            for beta in (0.0, 0.5, 1.0):
                w = torch.ones(16, device=DEV) if red == "none" else None
                out.append(run_op(lambda a, b: op(a, b, beta=beta, reduction=red, mask=mask), x, t, w=w))
        return out

    first = run()
    for p, q in zip(first, run()):
        for a, b in zip(p, q):
            assert_bitwise_equal(a, b, "second run")
    assert_same_under_deterministic_algorithms(run)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype,V", [(torch.float32, 1000), (torch.bfloat16, 1000), (torch.float32, 5000),
                                     (torch.float32, 40000), (torch.bfloat16, 128256)],
                         ids=["f32-1000", "bf16-1000", "f32-5000", "f32-40000", "bf16-128256"])
def test_cuda_batch_invariance(dtype, V, beta):
    """A row's per-row value and gradient rows: the same bits alone, as a 1-D
    input, in a shuffled batch of another shape, and with other rows masked."""
    x, t = make_logits((12, V), dtype).to(DEV), make_logits((12, V), dtype).to(DEV)
    check_batch_invariance(x, t, beta, shuffled_shape=(3, 4))


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("V", [512, 5000, 40000])
def test_cuda_uses_current_stream(V, reduction):
    """Everything (the zeroed ticket, the kept-row count, the kernel) goes to
    the current stream: issued on a busy side stream, a kernel on any other
    stream would read the inputs before they are written."""
    src_x, src_t = make_logits((16, V)), make_logits((16, V))
    mask_cpu = make_mask((16,), "random")
    x = torch.zeros(16, V, device=DEV)
    t = torch.zeros(16, V, device=DEV)
    mask = torch.zeros(16, dtype=torch.bool, device=DEV)
    with busy_side_stream():
        x.copy_(src_x)
        t.copy_(src_t)
        mask.copy_(mask_cpu)
        w = torch.ones(16, device=DEV) if reduction == "none" else None
        got = run_op(lambda a, b: op(a, b, beta=0.5, reduction=reduction, mask=mask), x, t, w=w)
        got = [g.clone() for g in got]
    want = run_op(lambda a, b: op(a, b, beta=0.5, reduction=reduction, mask=mask_cpu), src_x, src_t,
                  w=None if w is None else w.cpu())
    for a, b, name in zip(got, want, ("loss", "grad_input", "grad_target")):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.cuda.synchronize()


def test_cuda_several_streams_at_once():
    """Calls on several streams at once (each on its stream's queue) give the
    results of serial calls."""
    x, t = make_logits((64, 5000)).to(DEV), make_logits((64, 5000)).to(DEV)
    serial = [run_op(lambda a, b: op(a, b, beta=beta, reduction="sum"), x, t) for beta in (0.0, 0.5, 1.0)]
    streams = [torch.cuda.Stream() for _ in range(3)]
    torch.cuda.synchronize()
    results = []
    for s, beta in zip(streams, (0.0, 0.5, 1.0)):
        with torch.cuda.stream(s):
            results.append(run_op(lambda a, b: op(a, b, beta=beta, reduction="sum"), x, t))
    torch.cuda.synchronize()
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b, "stream vs serial")


@pytest.mark.parametrize("V", [512, 32000])
def test_cuda_peak_memory_inputs_plus_one_gradient(V):
    """Forward + backward allocate one gradient (N x V) and O(rows) more,
    where the composite formula holds several N x V temporaries."""
    N = 1024
    x = make_logits((N, V), torch.bfloat16).to(DEV).requires_grad_()
    t = make_logits((N, V), torch.bfloat16).to(DEV)
    grad_bytes = x.numel() * x.element_size()
    for beta in (0.0, 0.5):
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        op(x, t, beta=beta, reduction="batchmean").backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= grad_bytes + 64 * N + 2**20, f"beta={beta}: {extra} bytes, one gradient is {grad_bytes}"


def test_cuda_memory_flat_over_thousands_of_calls():
    """2000 forward + backward calls (JSD with a mask): the allocated device
    memory is back to exactly where it was and no call peaks higher than the
    first. In a fresh process, as test_kl_cuda's: the allocator's peak is
    process-wide."""
    run_in_fresh_process("test_logits_cuda", "check_memory_flat")


def check_memory_flat():
    x = make_logits((64, 3000)).to(DEV).requires_grad_()
    t = make_logits((64, 3000)).to(DEV).requires_grad_()
    mask = make_mask((64,), "random").to(DEV)

    def step():
        loss = op(x, t, beta=0.5, reduction="batchmean", mask=mask)
        loss.backward()
        x.grad = t.grad = None

    assert_cuda_memory_flat(step, warmup=50, calls=2000)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
def test_cuda_autocast(amp_dtype):
    """Under CUDA autocast the loss comes out in float32 (the composite
    formula's dtype there) from the 16-bit logits as they are; gradients in
    the logits' dtype."""
    x = make_logits((8, 3000), amp_dtype).to(DEV).requires_grad_()
    t = make_logits((8, 3000), amp_dtype).to(DEV)
    with torch.autocast("cuda", dtype=amp_dtype):
        loss = batchkl_ext.kl_div_with_logits(x, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == amp_dtype
    want = op(x.detach(), t, reduction="batchmean", dtype=torch.float32)
    assert_bitwise_equal(loss.detach(), want, "autocast vs dtype=float32")


@pytest.mark.parametrize("reduction", LOGIT_REDUCTIONS)
def test_cuda_opcheck(reduction):
    x = make_logits((4, 3000)).to(DEV).requires_grad_()
    t = make_logits((4, 3000)).to(DEV).requires_grad_()
    mask = torch.tensor([True, False, True, True], device=DEV)
    torch.library.opcheck(torch.ops.batchkl.kl_with_logits.default,
                          (x, t, 0.5, 2.0, reduction, mask, None, False, None))
    torch.library.opcheck(torch.ops.batchkl.kl_with_logits_fused.default,
                          (x.detach(), t.detach(), 0.0, 1.0, reduction, None, None, False, True, True, None))


@pytest.mark.compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_cuda_compile(dynamic):
    def loss_fn(s, te, m):
        return batchkl_ext.jsd_with_logits(s, te, beta=0.5, mask=m) + batchkl_ext.kl_div_with_logits(s, te)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic)
    for V in (3000, 5000):
        x = make_logits((6, V)).to(DEV).requires_grad_()
        t = make_logits((6, V)).to(DEV)
        m = torch.tensor([True, True, False, True, False, True], device=DEV)
        eager = loss_fn(x, t, m)
        (ge,) = torch.autograd.grad(eager, x)
        got = compiled(x, t, m)
        (gc,) = torch.autograd.grad(got, x)
        assert_bitwise_equal(got, eager, "compiled loss")
        assert_bitwise_equal(gc, ge, "compiled grad")


@pytest.mark.parametrize("knobs", [{"BATCHKL_LOGITS_STAGE": "0"}, {"BATCHKL_LOGITS_STAGE": "1"},
                                   {"BATCHKL_LOGITS_SLICE_KIB": "16"},
                                   {"BATCHKL_LOGITS_SLICE_KIB": "256"}, {"BATCHKL_LOGITS_ROW_LANES": "1"},
                                   {"BATCHKL_LOGITS_ROW_LANES": "32"}, {"BATCHKL_LOGITS_LEAN": "0"},
                                   {"BATCHKL_LOGITS_LEAN": "1"}, {"BATCHKL_LOGITS_LEAN": "3"},
                                   {"BATCHKL_LOGITS_SHARE": "0"},
                                   {"BATCHKL_LOGITS_MERGE": "1"},
                                   {"BATCHKL_LOGITS_MERGE": "1", "BATCHKL_LOGITS_LEAN": "1"},
                                   {"BATCHKL_LOGITS_DISTILL_STREAM": "0"}, {"BATCHKL_LOGITS_REUSE": "0"},
                                   {"BATCHKL_LOGITS_REUSE": "1"},
                                   {"BATCHKL_LOGITS_REUSE": "0", "BATCHKL_LOGITS_STAGE": "0"},
                                   {"BATCHKL_LOGITS_PREFETCH": "1"},
                                   {"BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_SLICE_KIB": "128"},
                                   {"BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_LEAN": "3"},
                                   {"BATCHKL_LOGITS_KEEP": "2"},
                                   {"BATCHKL_LOGITS_KEEP": "2", "BATCHKL_LOGITS_LEAN": "3",
                                    "BATCHKL_LOGITS_PREFETCH": "1"},
                                   {"BATCHKL_LOGITS_WARP_ROW_COLS": "2048"},
                                   {"BATCHKL_LOGITS_WARP_ROW_COLS": "8192"}], ids=str)
def test_tuning_knobs_change_the_launch_not_the_results(knobs):
    """The launcher's developer knobs (read once per process, hence a fresh
    one): streamed rows, slices that take more or fewer CTAs per row, and
    short rows on one lane or a whole warp each, the forward KL's general
    sweep or its lean one in the general kernel instead of the distillation
    kernel, JSD and reverse KL in distillation kernels of their own
    (BATCHKL_LOGITS_LEAN=3; bitwise the default's: see
    test_three_sweep_distillation_kernels_give_the_default_bits), a
    cluster's loss all-reduced, a row's maxes and sums merged in one
    exchange, the distillation kernel's long rows staged, every sweep
    forward or alternating without cache hints, the distillation kernel's
    double-buffered twin for BATCHKL_LOGITS_PREFETCH=1 with stages of 32
    and 64 KiB, and with BATCHKL_LOGITS_LEAN=3 JSD's and reverse KL's
    (one row per cluster here: see
    test_prefetch_rows_copied_ahead_give_the_same_bits), JSD's staged
    bfloat16 rows keeping their log-ratios for the writing sweep too (as
    float16; see test_keep_knob_bfloat16_rows_as_float16), 16-bit rows of
    2049-4096 columns on CTAs again or rows of up to 8192 on warps, still give
    the float64 reference's values and gradients at every launch shape, and
    each setting is deterministic."""
    run_python("import test_logits_cuda\ntest_logits_cuda.check_under_knobs()\n", str(knobs), env=knobs)


def three_sweep_runs(path=None):
    """JSD and reverse KL from logits with the student's gradient alone at every
    launch shape (short rows, a CTA, a cluster staged, streamed rows), fixed
    inputs: the loss and gradient of each, saved to `path` when given."""
    out = {}
    for v in (512, 5000, 40003, 128256):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator(device=DEV).manual_seed(v)
            x = (torch.randn(5, v, device=DEV, generator=g) * 3).to(dtype).requires_grad_()
            t = (torch.randn(5, v, device=DEV, generator=g) * 3).to(dtype)
            for beta, red in ((0.5, "batchmean"), (0.2, "none"), (1.0, "batchmean")):
                loss = op(x, t, beta=beta, temperature=1.5, reduction=red)
                (gx,) = torch.autograd.grad(loss.sum(), x)
                out[f"{v} {dtype} {beta} {red}"] = (loss.detach().cpu(), gx.cpu())
    if path is not None:
        torch.save(out, path)
    return out


def test_three_sweep_distillation_kernels_give_the_default_bits(tmp_path):
    """BATCHKL_LOGITS_LEAN=3: JSD and reverse KL from logits where the teacher
    needs no gradient run on kernels of their own (the general sweeps without
    the target's gradient, three CTAs per SM). The same sweeps and sums in the
    same plan: bitwise the default kernels' results, at every launch shape."""
    check_three_sweep_runs_under({"BATCHKL_LOGITS_LEAN": "3"}, tmp_path)


def three_sweep_runs_under(env, tmp_path):
    """three_sweep_runs in a process with `env` set (the knobs are read once per process)."""
    path = tmp_path / "runs.pt"
    run_python(f"import test_logits_cuda\ntest_logits_cuda.three_sweep_runs({str(path)!r})\n", str(env), env=env)
    return torch.load(path)


def check_three_sweep_runs_under(env, tmp_path):
    """three_sweep_runs in a process with `env` set: bitwise this one's."""
    other = three_sweep_runs_under(env, tmp_path)
    default = three_sweep_runs()
    assert other.keys() == default.keys()
    for key, (loss, gx) in default.items():
        assert_bitwise_equal(other[key][0], loss, f"loss {key} under {env}")
        assert_bitwise_equal(other[key][1], gx, f"grad_input {key} under {env}")


def test_keep_knob_gives_the_default_bits(tmp_path):
    """BATCHKL_LOGITS_KEEP=0: JSD's staged rows recompute log2 q - log2 m in the
    writing sweep instead of reading what the totals sweep kept (the default
    keeps float32 rows', exactly, and no 16-bit row's). The same values from
    the same expressions: bitwise the default's results, at every launch
    shape, float32, bfloat16 and float16."""
    check_three_sweep_runs_under({"BATCHKL_LOGITS_KEEP": "0"}, tmp_path)


def test_keep_knob_bfloat16_rows_as_float16(tmp_path):
    """BATCHKL_LOGITS_KEEP=2: JSD's staged bfloat16 rows keep their log-ratios
    too, as float16. The loss is the totals sweep's (the same bits); the
    gradients of some staged bfloat16 rows differ from the default's in a few
    bits (which shows that the kept path ran on the device: for float32 its
    bits are the default's), all within bfloat16's tolerance of them;
    float32 and float16 rows and reverse KL, the same bits."""
    keep2 = three_sweep_runs_under({"BATCHKL_LOGITS_KEEP": "2"}, tmp_path)
    differ = []
    for key, (loss, gx) in three_sweep_runs().items():
        assert_bitwise_equal(keep2[key][0], loss, f"loss {key}")
        if "bfloat16" not in key or key.split()[2] == "1.0":
            assert_bitwise_equal(keep2[key][1], gx, f"grad_input {key}")
            continue
        torch.testing.assert_close(keep2[key][1].double(), gx.double(), rtol=1.6e-2, atol=4e-3 * gx.abs().max().item(),
                                   msg=f"grad_input {key}")
        if not torch.equal(keep2[key][1], gx):
            differ.append(key)
    assert any(k.startswith(("5000 ", "40003 ")) for k in differ), f"no staged bfloat16 row kept its log-ratios: {differ}"


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["forward", "jsd", "reverse"])
def test_prefetch_rows_copied_ahead_give_the_same_bits(beta):
    """BATCHKL_LOGITS_PREFETCH=1: the distillation kernel's rows on a grid of
    as many clusters as fit at once, each CTA's next row coming by bulk copy
    into its second stage while it computes this one; with
    BATCHKL_LOGITS_LEAN=3 JSD's and reverse KL's too (three sweeps over each
    stage). With more rows than fit, most rows come so: they must agree with
    the float64 reference and give the bits of the same row computed alone
    (its CTA's first row)."""
    env = {"BATCHKL_LOGITS_PREFETCH": "1", **({"BATCHKL_LOGITS_LEAN": "3"} if beta else {})}
    run_python(f"import test_logits_cuda\ntest_logits_cuda.check_prefetch({beta})\n", str(env), env=env)


def check_under_knobs():
    # 256000: slices of 128 KB on Hopper (staged only with BATCHKL_LOGITS_STAGE=1).
    for v in (*VOCABS, 512, 256000):
        for dtype in (torch.float32, torch.bfloat16):
            # Short rows: enough of them for several rows per warp.
            rows = 37 if v <= 4096 else 2 if v > 100000 else 3
            x, t = make_logits((rows, v), dtype), make_logits((rows, v), dtype)
            check_cuda(x, t, beta=0.0)
            check_cuda(x, t, beta=0.0, grad_target=False)  # distillation's case: the lean sweep
            check_cuda(x, t, beta=0.5, reduction="none")
            check_cuda(x, t, beta=0.5, grad_target=False)  # JSD's distillation kernel under BATCHKL_LOGITS_LEAN=3
            check_cuda(x, t, beta=1.0, grad_target=False)  # reverse KL's, likewise
            a = op(x.to(DEV), t.to(DEV), beta=0.5, reduction="none")
            assert_bitwise_equal(a, op(x.to(DEV), t.to(DEV), beta=0.5, reduction="none"))


def cuda_kernels_of(fn):
    """The names of the CUDA kernels that fn() launches (the profiler's)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def check_prefetch(beta=0.0):
    # 5000: a CTA per row (bfloat16) or two (float32); 32000: clusters of 4
    # (bfloat16) or 8 (float32); 40003: rows off 16 bytes among aligned ones
    # (staged through registers between bulk copies) in clusters of 5
    # (bfloat16) or 10 (float32: beyond the portable 8). Rows: more than the
    # clusters that fit on an H100 or H200 at once.
    for v, rows in ((5000, 1200), (32000, 700), (40003, 500)):
        for dtype in (torch.float32, torch.bfloat16):
            x, t = make_logits((rows, v), dtype), make_logits((rows, v), dtype)
            xd, td = x.to(DEV), t.to(DEV)
            # The double-buffered twin itself ran (logits_kernel<..., kDistill,
            # kAhead>), not a fallback: else the comparisons below would hold
            # for any kernel.
            names = cuda_kernels_of(lambda: op(xd, td, beta=beta, reduction="none"))
            assert any(re.search(r"logits_kernel<[^>]*true, true>", n) for n in names), \
                f"no double-buffered kernel among {names}, V={v}, {dtype}"
            mask = torch.arange(rows, device=DEV) % 7 != 3  # rows the previous row does not copy in

            def per_row(a, b, m=None):
                w = torch.ones(a.shape[:-1], dtype=dtype, device=DEV)
                return run_op(lambda p, q: op(p, q, beta=beta, reduction="none", mask=m), a, b, grad_target=False,
                              w=w)

            full, masked = per_row(xd, td), per_row(xd, td, mask)
            # Rows from the middle and the tail of the batch, which came by bulk copy,
            # against float64 (a float64 reference of every row, with the
            # composite beside it, took most of this test's time: about 100 s
            # at two threads), and the distillation step itself (batchmean)
            # on the whole batch as the CPU kernel gives it.
            idx = torch.cat([torch.arange(rows // 2, rows // 2 + 16), torch.arange(rows - 48, rows)])
            ref = ref_logits(x[idx], t[idx], beta=beta, reduction="none", w=torch.ones(len(idx), dtype=dtype))
            assert_close_scaled(full[0][idx.to(DEV)].cpu(), ref.loss, ref.loss_mag, tol=TOL[dtype],
                                what=f"rows double-buffered: loss, V={v}")
            assert_close_scaled(full[1][idx.to(DEV)].cpu(), ref.gx, ref.gx_mag, tol=TOL[dtype],
                                what=f"rows double-buffered: grad_input, V={v}")
            got = run_op(lambda p, q: op(p.to(DEV), q.to(DEV), beta=beta).cpu(), x, t, grad_target=False)
            cpu = run_op(lambda p, q: op(p, q, beta=beta), x, t, grad_target=False)
            # The GPU's exp2 against the CPU's exp: about 1e-6 of a
            # probability (its exponent's rounding), which q - p can cancel
            # down to; a bfloat16 gradient's rounding may then go the other
            # way. A row copied in wrong is off by the order of the largest.
            # (JSD and reverse KL, not yet run on a GPU with these inputs:
            # ten times the forward KL's measured margin.)
            rtol = (1e-5 if dtype == torch.float32 else 1e-2) * (10 if beta else 1)
            torch.testing.assert_close(got[0], cpu[0], rtol=rtol, atol=0, msg=lambda m: f"batchmean loss, V={v}: {m}")
            atol = 1e-5 * (10 if beta else 1) * cpu[1].abs().max().item()
            torch.testing.assert_close(got[1], cpu[1], rtol=rtol, atol=atol,
                                       msg=lambda m: f"batchmean grad_input, V={v}: {m}")
            assert_bitwise_equal(per_row(xd, td)[1], full[1], "deterministic")
            for k, name in ((0, "loss"), (1, "grad_input")):
                # Every kept row, those after a dropped one (not copied in) too.
                assert_bitwise_equal(masked[k][mask], full[k][mask], f"{name} with rows masked, V={v}")
                assert not masked[k][~mask].any(), f"{name} of dropped rows, V={v}"
            # Rows from the tail: each copied in by its CTA's previous row.
            for i in (rows // 2, rows - 3, rows - 2, rows - 1):
                alone = per_row(xd[i:i + 1], td[i:i + 1])
                for k, name in ((0, "loss"), (1, "grad_input")):
                    assert_bitwise_equal(alone[k][0], full[k][i], f"{name} alone vs batch, V={v}, row {i}")


@pytest.mark.parametrize("knobs,message", [({"BATCHKL_LOGITS_STAGE": "no"}, "BATCHKL_LOGITS_STAGE: expected 0 or 1"),
                                           ({"BATCHKL_LOGITS_SLICE_KIB": "64k"}, "BATCHKL_LOGITS_SLICE_KIB: expected"),
                                           ({"BATCHKL_LOGITS_ROW_LANES": "3"},
                                            "BATCHKL_LOGITS_ROW_LANES: expected 1, 2, 4, 8, 16 or 32, got '3'"),
                                           ({"BATCHKL_LOGITS_LEAN": "yes"}, "BATCHKL_LOGITS_LEAN: expected 0, 1, 2 or 3"),
                                           ({"BATCHKL_LOGITS_SHARE": "2"}, "BATCHKL_LOGITS_SHARE: expected 0 or 1"),
                                           ({"BATCHKL_LOGITS_MERGE": "on"},
                                            "BATCHKL_LOGITS_MERGE: expected 0 or 1, got 'on'"),
                                           ({"BATCHKL_LOGITS_DISTILL_STREAM": ""},
                                            "BATCHKL_LOGITS_DISTILL_STREAM: expected 0 or 1, got ''"),
                                           ({"BATCHKL_LOGITS_REUSE": "3"},
                                            "BATCHKL_LOGITS_REUSE: expected 0, 1 or 2, got '3'"),
                                           ({"BATCHKL_LOGITS_PREFETCH": "yes"},
                                            "BATCHKL_LOGITS_PREFETCH: expected 0 or 1, got 'yes'"),
                                           ({"BATCHKL_LOGITS_WARP_ROW_COLS": "0"},
                                            "BATCHKL_LOGITS_WARP_ROW_COLS: expected a whole number of columns from 1 "
                                            "to 1048576, got '0'")],
                         ids=["stage", "slice", "lanes", "lean", "share", "merge", "distill_stream", "reuse",
                              "prefetch", "warp_row_cols"])
def test_a_bad_tuning_knob_is_an_error_naming_it(knobs, message):
    code = ("import torch, pytest, batchkl_ext\n"
            "x = torch.randn(2, 5000, device='cuda')\n"
            f"with pytest.raises(RuntimeError, match={message!r}):\n"
            "    torch.ops.batchkl.kl_with_logits(x, x, 0.0, 1.0, 'batchmean', None)\n")
    run_python(code, str(knobs), env=knobs)
