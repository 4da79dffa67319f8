"""Quick CUDA self-check of torch.ops.batchkl.kl and kl_with_logits, also the
workload run under compute-sanitizer (memcheck / racecheck): every mode,
dtype and layout family once, and for kl_with_logits every launch shape (a
warp per row, a CTA per row staged in shared memory or streamed, a cluster
of CTAs per row), compared with a float64 CPU reference. Exits non-zero on
any mismatch.

  python scripts/cuda_check.py [--small]
  python scripts/cuda_check.py --prefetch [--small]   # BATCHKL_LOGITS_PREFETCH=1's double-buffered rows
"""
import argparse
import itertools
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

import batchkl_ext  # noqa: F401

warnings.simplefilter("ignore")
DEV = "cuda"  # --device cpu runs the same checks on the CPU kernels (to check this script)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]  # --dtypes
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def ref(x, t, reduction, log_target):
    x, t = x.double().cpu(), t.double().cpu()
    p = t.exp() if log_target else t
    zero = (t == float("-inf")) if log_target else (t == 0)
    lp = t if log_target else t.log()
    el = torch.where(zero, torch.zeros_like(p), p * (lp - x))
    if reduction == "none":
        return el
    if reduction == "row":
        return el.sum(-1)
    if reduction == "sum":
        return el.sum()
    if reduction == "mean":
        return el.mean()
    return el.sum() / x.shape[0]


def rel_err(out, ref):
    """Norm-relative error of `out` against the float64 `ref` rounded to out's
    dtype: what a perfect kernel of that precision returns (float16 gradients
    of 'mean' underflow, a float16 'sum' can overflow: so does the truth).
    Differences of a few of the dtype's smallest subnormals are forgiven: a
    float16 gradient that is already subnormal before the backward scales it
    by the upstream gradient is rounded twice, as PyTorch's own is. NaN in
    `ref` (the float64 reference's gradient where the target is exactly 0,
    undefined there) is not compared."""
    a = out.detach().double().cpu()
    b = ref.detach().to(out.dtype).double().cpu()
    keep = ~b.isnan()
    a, b = a[keep], b[keep]
    if not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        return float("inf")
    a, b = a[~a.isinf()], b[~b.isinf()]
    info = torch.finfo(out.dtype)
    forgiven = 16 * info.smallest_normal * info.eps
    diff = ((a - b).abs() - forgiven).clamp_min(0)
    return (diff.norm() / b.norm().clamp_min(1e-30)).item()


def layouts(n, v, dtype, log_target):
    def make(shape):
        x = torch.randn(*shape, device=DEV, dtype=torch.float32).log_softmax(-1).to(dtype)
        t = torch.randn(*shape, device=DEV, dtype=torch.float32)
        t = (t.log_softmax(-1) if log_target else t.softmax(-1)).to(dtype)
        return x, t
    x, t = make((n, v))
    yield "contiguous", x, t
    x, t = make((n, v + 1))
    yield "misaligned", x[:, 1:], t[:, 1:]
    x, t = make((n, 2 * v))
    yield "strided", x[:, ::2], t[:, ::2]
    x, t = make((n, v))
    yield "expanded", x, t[:1].expand(n, v)
    x, t = make((v, n))
    yield "transposed", x.t(), t.t()


def ref_logits(x, t, beta, temperature, mask):
    """Per-row divergence of softmax(t / T) (P) and softmax(x / T) (Q) in float64, 0 where p = 0 or q = 0."""
    lq = torch.log_softmax(x.double().cpu() / temperature, -1)
    lp = torch.log_softmax(t.double().cpu() / temperature, -1)

    def kl(la, lb):
        return torch.where(la == float("-inf"), torch.zeros_like(la), la.exp() * (la - lb)).sum(-1)

    if beta == 0:
        rows = kl(lp, lq)
    elif beta == 1:
        rows = kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
        rows = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    if mask is not None:
        rows = torch.where(mask.cpu(), rows, torch.zeros_like(rows))
    return rows


def check_logits(small):
    """kl_with_logits against float64: per-row values, and the gradients of
    the per-row values weighted by w."""
    # Short rows run 1 to 32 lanes per row by their length and dtype (37: one
    # to four, 100: two to eight, 512: eight to 32), several rows per warp;
    # 16-bit rows up to 4096 on a warp too (--small: 4096, a whole warp's row
    # of 16 packs a lane in 16-bit dtypes, a CTA's in the others).
    shapes = [(5, 37), (37, 512), (3, 4096), (2, 5000), (2, 40000)] if small else [
        (64, 37), (40, 100), (67, 512), (9, 2048), (5, 2049), (9, 4096), (5, 4097), (7, 5000), (3, 40000),
        (3, 128256), (2, 256000)]
    checks = failures = 0
    for dtype in DTYPES:
        for n, v in shapes:
            x = (torch.randn(n, v + 1, device=DEV) * 3).to(dtype)
            t = (torch.randn(n, v + 1, device=DEV) * 3).to(dtype)
            for layout in ("contiguous", "misaligned"):
                xs, ts = (x[:, :v].contiguous(), t[:, :v].contiguous()) if layout == "contiguous" else (x[:, 1:], t[:, 1:])
                mask = torch.arange(n, device=DEV) % 3 != 1
                for beta in (0.0, 0.5, 1.0):
                    # Both gradients; the student's alone (distillation's
                    # case, the forward KL's lean sweep), for the KLs.
                    for m, grad_t in ((None, True), (mask, True), (None, False), (mask, False)):
                        if not grad_t and beta == 0.5:
                            continue
                        xg = xs.detach().clone().requires_grad_()
                        tg = ts.detach().clone().requires_grad_(grad_t)
                        out = torch.ops.batchkl.kl_with_logits(xg, tg, beta, 2.0, "none", m)
                        w = torch.randn_like(out)
                        (out * w).sum().backward()
                        xr = xs.detach().cpu().double().requires_grad_()
                        tr = ts.detach().cpu().double().requires_grad_()
                        r = ref_logits(xr, tr, beta, 2.0, m)
                        (r * w.cpu().double()).sum().backward()
                        errs = [rel_err(out, r), rel_err(xg.grad, xr.grad)]
                        if grad_t:
                            errs.append(rel_err(tg.grad, tr.grad))
                        checks += 1
                        if not all(e <= 2 * TOL[dtype] for e in errs):
                            failures += 1
                            print(f"FAIL kl_with_logits {dtype} {n}x{v} {layout} beta={beta} "
                                  f"mask={m is not None} grad_target={grad_t}: rel err loss/gx/gt = {errs}")
    # Determinism and batch invariance of the per-row values and gradients.
    x = torch.randn(16, 40000, device=DEV)
    t = torch.randn(16, 40000, device=DEV)
    for beta in (0.0, 0.5):
        a = torch.ops.batchkl.kl_with_logits_fused(x, t, beta, 1.0, "none", None, None, False, True, True)
        b = torch.ops.batchkl.kl_with_logits_fused(x, t, beta, 1.0, "none", None, None, False, True, True)
        c = torch.ops.batchkl.kl_with_logits_fused(x[5:6], t[5:6], beta, 1.0, "none", None, None, False, True, True)
        s1 = torch.ops.batchkl.kl_with_logits(x, t, beta, 1.0, "sum")
        s2 = torch.ops.batchkl.kl_with_logits(x, t, beta, 1.0, "sum")
        for name, ok in ((f"logits beta={beta} deterministic", all(torch.equal(u, v) for u, v in zip(a, b))),
                         (f"logits beta={beta} batch-invariant", all(torch.equal(u[5:6], v) for u, v in zip(a, c))),
                         (f"logits beta={beta} sum deterministic", torch.equal(s1, s2))):
            checks += 1
            if not ok:
                failures += 1
                print("FAIL", name)
    return checks, failures


def check_prefetch(small):
    """The distillation case under BATCHKL_LOGITS_PREFETCH=1, the forward KL's
    and, with BATCHKL_LOGITS_LEAN=3, JSD's and reverse KL's (both set by main
    before the first launch: the knobs are read once per process), with more
    rows than the clusters that fit at once, so that most rows come by bulk
    copy during the row before: against float64, and each of a few rows
    computed alone (its CTA's first row), bitwise."""
    # 5000: a CTA per row in 16-bit dtypes, two in float32, three in float64;
    # 32000: clusters of 4 (16-bit), 8 (float32) or 16 (float64); 40003:
    # rows off 16 bytes (staged through registers between rows that come by
    # bulk copy), clusters of 5 and 10; float64 over 16 stages: the default plan.
    # --small: a CTA per row, and clusters of 3 with a partial last pack (bfloat16).
    shapes = [(400, 5000), (50, 20002)] if small else [(1200, 5000), (700, 32000), (500, 40003)]
    checks = failures = 0
    for dtype, beta in itertools.product(DTYPES, (0.0, 0.5, 1.0)):
        for n, v in shapes:
            x = (torch.randn(n, v, device=DEV) * 3).to(dtype)
            t = (torch.randn(n, v, device=DEV) * 3).to(dtype)
            mask = torch.arange(n, device=DEV) % 7 != 3

            def per_row(a, b, m=None):
                a = a.detach().clone().requires_grad_()
                out = torch.ops.batchkl.kl_with_logits(a, b, beta, 1.0, "none", m)
                out.sum().backward()
                return out.detach(), a.grad

            full = per_row(x, t, mask)
            xr = x.cpu().double().requires_grad_()
            r = ref_logits(xr, t.cpu().double(), beta, 1.0, mask.cpu())
            r.sum().backward()
            checks += 1
            errs = [rel_err(full[0], r), rel_err(full[1], xr.grad)]
            if not all(e <= 2 * TOL[dtype] for e in errs):
                failures += 1
                print(f"FAIL prefetch {dtype} beta={beta} {n}x{v}: rel err loss/gx = {errs}")
            for i in (n // 2, n - 3, n - 2, n - 1):  # from the tail: copied in by the row before
                if i % 7 == 3:
                    continue
                alone = per_row(x[i:i + 1], t[i:i + 1])
                checks += 1
                if not (torch.equal(alone[0][0], full[0][i]) and torch.equal(alone[1][0], full[1][i])):
                    failures += 1
                    print(f"FAIL prefetch {dtype} beta={beta} {n}x{v}: row {i} alone is not bitwise the row in "
                          "its batch")
    return checks, failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes (for compute-sanitizer)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to check this script")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "float64", "bfloat16", "float16"],
                    help="only these dtypes (default all four; racecheck is slow)")
    ap.add_argument("--prefetch", action="store_true",
                    help="only kl_with_logits' distillation cases under BATCHKL_LOGITS_PREFETCH=1 (and LEAN=3)")
    args = ap.parse_args()
    global DEV, DTYPES
    DEV = args.device
    if args.dtypes:
        DTYPES = [getattr(torch, d) for d in args.dtypes]
    if args.prefetch:
        os.environ["BATCHKL_LOGITS_PREFETCH"] = "1"
        os.environ["BATCHKL_LOGITS_LEAN"] = "3"
        checks, failures = check_prefetch(args.small)
        print(f"cuda_check --prefetch: {checks - failures} passed, {failures} failed")
        return 1 if failures else 0
    shapes = [(3, 37), (5, 1), (2, 9000)] if args.small else [(64, 1000), (7, 37), (4, 33000), (1024, 3), (2, 256000)]
    failures = 0
    checks = 0
    for dtype in DTYPES:
        for log_target in (False, True):
            for n, v in shapes:
                for name, x, t in layouts(n, v, dtype, log_target):
                    for reduction in ("none", "sum", "mean", "batchmean", "row"):
                        xg = x.detach().clone().requires_grad_()
                        tg = t.detach().clone().requires_grad_()
                        out = torch.ops.batchkl.kl(xg, tg, reduction, log_target)
                        w = torch.randn_like(out)
                        (out * w).sum().backward()
                        xr = x.detach().cpu().double().requires_grad_()
                        tr = t.detach().cpu().double().requires_grad_()
                        r = ref(xr, tr, reduction, log_target)
                        (r * w.cpu().double()).sum().backward()
                        errs = [rel_err(out, r), rel_err(xg.grad, xr.grad), rel_err(tg.grad, tr.grad)]
                        checks += 1
                        if not all(e <= TOL[dtype] for e in errs):
                            failures += 1
                            print(f"FAIL {dtype} log_target={log_target} {n}x{v} {name} {reduction}: "
                                  f"rel err loss/gx/gt = {errs}")
    # Determinism and batch invariance of 'row'.
    x = torch.randn(512, 40000, device=DEV).log_softmax(-1)
    t = torch.randn(512, 40000, device=DEV).softmax(-1)
    a = torch.ops.batchkl.kl(x, t, "row", False)
    b = torch.ops.batchkl.kl(x, t, "row", False)
    c = torch.ops.batchkl.kl(x[100:101], t[100:101], "row", False)
    s1 = torch.ops.batchkl.kl(x, t, "sum", False)
    s2 = torch.ops.batchkl.kl(x, t, "sum", False)
    for name, ok in (("row deterministic", torch.equal(a, b)), ("row batch-invariant", torch.equal(a[100:101], c)),
                     ("sum deterministic", torch.equal(s1, s2))):
        checks += 1
        if not ok:
            failures += 1
            print("FAIL", name)
    # The drop-in agrees with F.kl_div on CUDA.
    checks += 1
    if rel_err(batchkl_ext.kl_div(x, t, reduction="batchmean"), F.kl_div(x.double(), t.double(), reduction="batchmean")) > 1e-5:
        failures += 1
        print("FAIL kl_div vs F.kl_div")
    c, f = check_logits(args.small)
    checks += c
    failures += f
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_check: {checks - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
