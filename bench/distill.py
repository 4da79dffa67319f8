"""A runnable distillation example: a tiny student learns from a tiny teacher, with batchkl and without.

    python -m bench.distill [--quick] [--device cpu|cuda] [--steps N]

Both models are built in code (no downloads): an embedding, one hidden layer
and a vocabulary-sized head, a language model's last layer in miniature. The
same student, from the same initial weights on the same token batches, is
trained twice under ``torch.compile(fullgraph=True)``: once with
``batchkl_ext.kl_div_with_logits`` and once with the composite PyTorch
formula ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True)``.
The two loss curves must agree (same math); what differs is the time and the
memory of a training step, which the example prints.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchkl_ext

from .measure import peak_extra_mib


@dataclass(frozen=True)
class Setup:
    vocab: int
    student_dim: int
    teacher_dim: int
    batch: int
    seq: int
    steps: int
    temperature: float = 2.0
    lr: float = 1e-2


FULL = Setup(vocab=32000, student_dim=64, teacher_dim=128, batch=8, seq=128, steps=12)
QUICK = Setup(vocab=2048, student_dim=32, teacher_dim=64, batch=4, seq=32, steps=4)


def tiny_lm(vocab: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, vocab))


def batchkl_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    # T**2 keeps the gradient's scale independent of T (Hinton et al.); batchkl
    # leaves that factor to the caller, as F.kl_div does.
    return batchkl_ext.kl_div_with_logits(student, teacher, temperature=temperature) * temperature**2


def composite_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature**2


LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {"batchkl": batchkl_loss,
                                                                  "composite": composite_loss}


def train(loss_name: str, setup: Setup, device: torch.device) -> dict:
    """Distil for ``setup.steps`` steps; the loss of each, time per step and peak memory of one."""
    torch.manual_seed(0)  # same teacher, same initial student, same batches for every loss
    teacher = tiny_lm(setup.vocab, setup.teacher_dim).to(device).requires_grad_(False)
    student = tiny_lm(setup.vocab, setup.student_dim).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=setup.lr)
    tokens = torch.randint(setup.vocab, (setup.steps + 1, setup.batch, setup.seq), device=device)
    loss_fn = LOSSES[loss_name]

    @torch.compile(fullgraph=True)
    def loss_of(batch: Tensor) -> Tensor:
        with torch.no_grad():
            t = teacher(batch)
        s = student(batch)
        # One row per token: (B*T, V), the usual layout of a distillation loss.
        return loss_fn(s.flatten(0, 1), t.flatten(0, 1), setup.temperature)

    def step(batch: Tensor) -> Tensor:
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    for i in range(setup.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(tokens[i]).item())  # .item() syncs
        times.append((time.perf_counter() - t0) * 1e3)
    # One more step, on a batch of its own, to measure memory once compiled.
    peak = peak_extra_mib(lambda: step(tokens[-1]), lambda: None, device)
    return {"losses": losses, "ms_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "first_step_ms": times[0], "peak_extra_mib": peak}


def run(setup: Setup, device: torch.device) -> dict[str, dict]:
    return {name: train(name, setup, device) for name in LOSSES}


def report(results: dict[str, dict], setup: Setup, device: torch.device) -> str:
    b, c = results["batchkl"], results["composite"]
    rows = setup.batch * setup.seq
    lines = [f"distilling a {setup.teacher_dim}-wide teacher into a {setup.student_dim}-wide student, "
             f"{rows} rows × V={setup.vocab} per step, T={setup.temperature}, on {device.type}",
             "", "| step | loss (batchkl) | loss (composite) |", "|---|---|---|"]
    lines += [f"| {i} | {x:.6f} | {y:.6f} |" for i, (x, y) in enumerate(zip(b["losses"], c["losses"]))]
    diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(b["losses"], c["losses"]))
    mem = "peak extra memory of a step" + (" (≈ RSS)" if device.type == "cpu" else "")

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f} MiB"

    lines += ["", f"largest relative difference between the curves: {diff:.2e}",
              f"time per step (median after the first, compiled): batchkl {b['ms_per_step']:.1f} ms, "
              f"composite {c['ms_per_step']:.1f} ms",
              f"{mem}: batchkl {fmt(b['peak_extra_mib'])}, composite {fmt(c['peak_extra_mib'])}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model and a few steps (what CI runs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, help="training steps (default 12, 4 with --quick)")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 2:
            p.error(f"--steps must be at least 2, got {args.steps}")
        setup = Setup(**{**setup.__dict__, "steps": args.steps})
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available")
        try:
            batchkl_loss(torch.zeros(1, 2, device=device), torch.zeros(1, 2, device=device), 1.0)
        except (RuntimeError, NotImplementedError) as e:
            p.error(f"--device cuda: batchkl cannot run this example there: {str(e).splitlines()[0]}")
    results = run(setup, device)
    print(report(results, setup, device))
    return results


if __name__ == "__main__":
    main()
