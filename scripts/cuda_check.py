"""Quick CUDA self-check of torch.ops.batchkl.kl, also the workload run under
compute-sanitizer (memcheck / racecheck): every mode, dtype and layout family
once, compared with a float64 CPU reference. Exits non-zero on any mismatch.

  python scripts/cuda_check.py [--small]
"""
import argparse
import sys
import warnings

import torch
import torch.nn.functional as F

import batchkl_ext  # noqa: F401

warnings.simplefilter("ignore")
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
    of 'mean' underflow, a float16 'sum' can overflow: so does the truth)."""
    a = out.detach().double().cpu()
    b = ref.detach().to(out.dtype).double()
    if not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        return float("inf")
    a, b = a[~a.isinf()], b[~b.isinf()]
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def layouts(n, v, dtype, log_target):
    def make(shape):
        x = torch.randn(*shape, device="cuda", dtype=torch.float32).log_softmax(-1).to(dtype)
        t = torch.randn(*shape, device="cuda", dtype=torch.float32)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes (for compute-sanitizer)")
    args = ap.parse_args()
    shapes = [(3, 37), (5, 1), (2, 9000)] if args.small else [(64, 1000), (7, 37), (4, 33000), (1024, 3), (2, 256000)]
    failures = 0
    checks = 0
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
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
    x = torch.randn(512, 40000, device="cuda").log_softmax(-1)
    t = torch.randn(512, 40000, device="cuda").softmax(-1)
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
    torch.cuda.synchronize()
    print(f"cuda_check: {checks - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
