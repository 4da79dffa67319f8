"""One kl_with_logits forward (+ its fused gradient) of a benchmark shape, run
twice: the workload for Nsight Compute (`ncu --launch-skip 1 --launch-count 1`
profiles the second, warm launch).

  python scripts/profile_logits.py N V dtype [beta]
"""
import sys

import torch

import batchkl_ext  # noqa: F401


def main() -> int:
    n, v, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
    beta = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (2 * torch.randn(n, v, device="cuda", generator=g)).to(dtype).requires_grad_()
    t = (2 * torch.randn(n, v, device="cuda", generator=g)).to(dtype)
    for _ in range(2):
        loss = torch.ops.batchkl.kl_with_logits(x, t, beta, 1.0, "batchmean", None)
        loss.backward()
        x.grad = None
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
