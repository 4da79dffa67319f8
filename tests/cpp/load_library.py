"""ctest `python_load_library`: the CMake-built libbatchkl.so loads into Python
with torch.ops.load_library (without the batchkl_ext package) and its ops match
torch.nn.functional.kl_div.

    python tests/cpp/load_library.py /path/to/libbatchkl.so
"""
import sys
import warnings

import torch
import torch.nn.functional as F


def main(path):
    warnings.filterwarnings("ignore", message="reduction: 'mean' divides")  # F.kl_div's own notice
    torch.ops.load_library(path)
    torch.manual_seed(0)
    x = torch.randn(6, 50, dtype=torch.float64).log_softmax(-1).requires_grad_()
    t = torch.randn(6, 50, dtype=torch.float64).softmax(-1)
    failures = []
    devices = ["cpu"]
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("batchkl::kl", "CUDA"):
        devices.append("cuda")
    for device in devices:
        xd, td = x.detach().to(device).requires_grad_(), t.to(device)
        for reduction in ("none", "sum", "mean", "batchmean"):
            got = torch.ops.batchkl.kl(xd, td, reduction, False)
            want = F.kl_div(x, t, reduction=reduction)
            if not torch.allclose(got.cpu(), want, rtol=1e-10, atol=1e-12):
                failures.append(f"{device} {reduction}: {got} != {want}")
        loss = torch.ops.batchkl.kl(xd, td, "batchmean")  # schema defaults: log_target=False
        (grad,) = torch.autograd.grad(loss, xd)
        if not torch.allclose(grad.cpu(), -t / 6, rtol=1e-10, atol=1e-12):
            failures.append(f"{device} batchmean gradient")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print(f"load_library: {path} loaded; checked on {', '.join(devices)}: "
          f"{'FAILED' if failures else 'ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
