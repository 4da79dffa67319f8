"""Times kl_with_logits forward + backward on a GPU under each setting of the
CUDA launcher's tuning knobs (BATCHKL_LOGITS_SLICE_KIB, BATCHKL_LOGITS_STAGE,
BATCHKL_LOGITS_ROW_LANES, ...; see csrc/cuda/kl_logits_cuda.cu), one process per
setting, against the device-to-device copy bandwidth measured in the same
run: which launch shape
should be the default. A lent GPU's short session runs this in about a
minute; the benchmark (`python -m bench`) is the reference measurement.

  python scripts/tune_logits.py [--shapes 8192x32000 ...] [--dtypes bfloat16 float32]
                                [--settings default stream slice32 ...] [--beta 0.0] [--json PATH]

Prints one table: milliseconds (median of --repeats) and the bandwidth over
the minimal bytes (both inputs read once, the gradient written once) as a
percentage of copy bandwidth, per shape and setting, with each setting's
loss (they must agree to float rounding: a setting changes the order of the
sums, not the result).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# The benchmark's measuring code (bench/measure.py) lives at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {
    "default": {},
    "stream": {"BATCHKL_LOGITS_STAGE": "0"},  # every sweep reads global memory
    # Staged wherever the slice fits, also where one CTA then fills an SM
    # (the default before 2026-11-26).
    "stage_all": {"BATCHKL_LOGITS_STAGE": "1"},
    "slice32": {"BATCHKL_LOGITS_SLICE_KIB": "32"},  # more, smaller CTAs per row
    # Fewer, larger ones, staged (one CTA per SM), as measured on 2026-11-26.
    "slice128": {"BATCHKL_LOGITS_SLICE_KIB": "128", "BATCHKL_LOGITS_STAGE": "1"},
    # Streamed with larger slices: fewer CTAs per row, more elements per
    # thread, the second read served by L2 while the rows in flight fit there
    # (H100: 8192x128256 bfloat16 at 128 KiB is about 33 MB in flight).
    # Larger slices at two CTAs per SM (what the registers allow anyway):
    # 8192x128256 bfloat16 in 6 or 5 CTAs per row instead of 8.
    "slice96": {"BATCHKL_LOGITS_SLICE_KIB": "96"},
    "slice104": {"BATCHKL_LOGITS_SLICE_KIB": "104"},
    "stream128": {"BATCHKL_LOGITS_STAGE": "0", "BATCHKL_LOGITS_SLICE_KIB": "128"},
    # Every row streamed in slices of up to 256 KiB: the plan the
    # distillation kernel's streaming rule gives the rows it streams.
    "stream256": {"BATCHKL_LOGITS_STAGE": "0", "BATCHKL_LOGITS_SLICE_KIB": "256"},
    # The forward KL's general sweep instead of its lean one; a cluster's row
    # loss all-reduced instead of added up in rank 0; both (as before 2026-11-27).
    # With --beta 0.5: JSD's general sweeps instead of its lean ones
    # (RowWork::jsd_step, 2026-11-29, not yet timed).
    "nolean": {"BATCHKL_LOGITS_LEAN": "0"},
    # The lean sweeps in the general kernel (two CTAs per SM) instead of the
    # distillation kernel (three; the default since 2026-11-27).
    "lean_general": {"BATCHKL_LOGITS_LEAN": "1"},
    "noshare": {"BATCHKL_LOGITS_SHARE": "0"},
    "neither": {"BATCHKL_LOGITS_LEAN": "0", "BATCHKL_LOGITS_SHARE": "0"},
    # A row's maxes and sums in one exchange instead of two: off by default
    # (see LaunchKnobs::merge for the H200's timings).
    "merge": {"BATCHKL_LOGITS_MERGE": "1"},
    # The distillation kernel's long rows planned as the general kernel's
    # (staged 64 KiB slices), as before 2026-11-27's streaming rule.
    "nostream": {"BATCHKL_LOGITS_DISTILL_STREAM": "0"},
    # Streamed rows: every sweep forward (the order measured up to
    # 2026-11-27; an evict-normal cache policy), and alternating with it:
    # the default alternates, evict-first.
    "reuse0": {"BATCHKL_LOGITS_REUSE": "0"},
    "reuse1": {"BATCHKL_LOGITS_REUSE": "1"},
    # Streamed in more, smaller slices than the distillation kernel's 256
    # KiB: fewer packs in flight between a pack's two reads (more of them
    # found in L2), more CTAs per row.
    "stream192": {"BATCHKL_LOGITS_STAGE": "0", "BATCHKL_LOGITS_SLICE_KIB": "192"},
    # The distillation kernel's rows double-buffered (the kAhead kernel,
    # 2026-11-29, not yet timed): as many clusters as fit at once, each CTA's
    # next row coming by bulk copy into its second stage while it computes
    # this one, in clusters of up to 16. Stages of 32 KiB (three CTAs per
    # SM; bfloat16 8192x32000 in clusters of 4, 128256 in 16), 48 KiB (two;
    # bfloat16 32000 in 3, 128256 in 11) or 64 KiB (one; bfloat16 32000 in
    # 2, 128256 in 8, 256000 and float32 128256 in 16). Longer rows keep the
    # default plan. (Its first version, each thread copying its packs of
    # the next row into one stage during its last read, was slower: H200,
    # 2026-11-27, staged bfloat16 8192x32000 0.672 -> 0.846 ms.)
    "prefetch": {"BATCHKL_LOGITS_PREFETCH": "1"},
    "prefetch96": {"BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_SLICE_KIB": "96"},
    "prefetch128": {"BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_SLICE_KIB": "128"},
    # JSD (--beta 0.5) and reverse KL (--beta 1) from logits in distillation
    # kernels of their own: their general sweeps without the target's
    # gradient, 80 registers, three CTAs per SM (LaunchKnobs::lean; not yet
    # measured on a GPU, 2026-11-29).
    "jsd_distill": {"BATCHKL_LOGITS_LEAN": "3"},
    # The same kernels on double-buffered rows (their kAhead twins, the
    # forward KL's "prefetch" design; not yet measured, 2026-11-29): JSD's
    # staged rows take eight SFU operations per element over three sweeps,
    # so HBM idles longer than the forward KL's while they compute.
    "jsd_prefetch": {"BATCHKL_LOGITS_LEAN": "3", "BATCHKL_LOGITS_PREFETCH": "1"},
    "jsd_prefetch96": {"BATCHKL_LOGITS_LEAN": "3", "BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_SLICE_KIB": "96"},
    "jsd_prefetch128": {"BATCHKL_LOGITS_LEAN": "3", "BATCHKL_LOGITS_PREFETCH": "1",
                        "BATCHKL_LOGITS_SLICE_KIB": "128"},
    # JSD (--beta 0.5) on staged rows: the writing sweep from the log-ratios
    # that the totals sweep kept in shared memory (LaunchKnobs::keep,
    # 2026-11-29, not yet timed): six SFU operations per element, not eight.
    # The default keeps float32's (exact); keep0 none, keep2 bfloat16's too
    # (as float16). Rows the plan streams (bfloat16 4096x256000 by default)
    # keep nothing: stage_all_keep2 stages them.
    "keep0": {"BATCHKL_LOGITS_KEEP": "0"},
    "keep2": {"BATCHKL_LOGITS_KEEP": "2"},
    "stage_all_keep2": {"BATCHKL_LOGITS_KEEP": "2", "BATCHKL_LOGITS_STAGE": "1"},
    "jsd_prefetch_keep2": {"BATCHKL_LOGITS_LEAN": "3", "BATCHKL_LOGITS_PREFETCH": "1", "BATCHKL_LOGITS_KEEP": "2"},
    # The longest row on a warp: 2048 columns for every dtype (the plan
    # before 2026-11-29), or longer (the default: 2048, 16-bit rows 4096,
    # inferred from neighbouring shapes, not yet timed at 2049-4096). The
    # default SHAPES have no such rows: --shapes 16384x4096 16384x3000 32768x2048.
    "warp2048": {"BATCHKL_LOGITS_WARP_ROW_COLS": "2048"},
    "warp4096": {"BATCHKL_LOGITS_WARP_ROW_COLS": "4096"},
    "warp8192": {"BATCHKL_LOGITS_WARP_ROW_COLS": "8192"},
    "lanes32": {"BATCHKL_LOGITS_ROW_LANES": "32"},  # a whole warp per short row (before 2026-11-26)
    "lanes4": {"BATCHKL_LOGITS_ROW_LANES": "4"},  # fewer lanes per short row than the default at 512
}
SHAPES = ["8192x32000", "8192x128256", "4096x256000", "65536x512"]


def shape(text: str) -> tuple[int, int]:
    n, _, v = text.partition("x")
    if not (n.isdigit() and v.isdigit() and int(n) > 0 and int(v) > 0):
        raise argparse.ArgumentTypeError(f"expected a shape NxV of positive integers, got {text!r}")
    return int(n), int(v)


def time_shape(n: int, v: int, name: str, args: argparse.Namespace) -> dict:
    """Forward + backward of one shape and dtype: the median time and the loss."""
    import torch

    import batchkl_ext  # noqa: F401  (registers torch.ops.batchkl)

    dtype = getattr(torch, name)
    g = torch.Generator(device=args.device).manual_seed(0)
    x = (2 * torch.randn(n, v, device=args.device, generator=g)).to(dtype).requires_grad_()
    t = (2 * torch.randn(n, v, device=args.device, generator=g)).to(dtype)
    losses = []

    def step():
        x.grad = None
        value = torch.ops.batchkl.kl_with_logits(x, t, args.beta, 1.0, "batchmean", None)
        value.backward()
        losses.append(value)

    # The benchmark's own timer (bench/measure.py), so that the percentages
    # below are of the copy bandwidth the benchmark reports.
    from bench.measure import time_ms

    times = time_ms(step, lambda: None, torch.device(args.device), args.repeats + 3)[3:]
    # The same calls queued back to back (the host runs ahead, as in a
    # training loop): the GPU's time per call without the host's launch
    # latency, which dominates the synchronized time of a small call.
    queued = None
    if args.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.repeats):
            step()
        end.record()
        end.synchronize()
        queued = start.elapsed_time(end) / args.repeats
    return {"N": n, "V": v, "dtype": name, "ms": statistics.median(times), "queued_ms": queued,
            "loss": losses[-1].item(), "bytes": 3 * n * v * x.element_size()}


def worker(args: argparse.Namespace) -> int:
    """One setting (from the environment): every shape and dtype, as JSON on stdout."""
    import torch

    out = []
    for n, v in args.shapes:
        for name in args.dtypes:
            out.append(time_shape(n, v, name, args))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[shape(s) for s in SHAPES], metavar="NxV")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--beta", type=float, default=0.0, help="0: forward KL (the default), else GKD's JSD")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="knobs set under every setting (a setting's own value wins), e.g. an extension built "
                        "with another default")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: check the script where there is no GPU (the knobs then change nothing)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_logits.py: needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu checks the script")
    from bench.measure import copy_bandwidth

    bandwidth = 1e9 * copy_bandwidth(torch.device(args.device), 20)["gbps"]
    argv = [sys.executable, __file__, "--worker", "--device", args.device, "--beta", str(args.beta),
            "--repeats", str(args.repeats),
            "--shapes", *[f"{n}x{v}" for n, v in args.shapes], "--dtypes", *args.dtypes]
    results = {}
    for name in args.settings:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHKL_LOGITS_")}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("BATCHKL_"):
                raise SystemExit(f"tune_logits.py: --env expects BATCHKL_...=VALUE, got {item!r}")
            env[key] = value
        env.update(SETTINGS[name])
        run = subprocess.run(argv, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"setting {name}: exit {run.returncode}\n{run.stderr[-2000:]}")
            continue
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])

    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; kl_with_logits beta={args.beta}, forward + backward;"
          f" ms (% of copy bandwidth over the minimal bytes): the median of {args.repeats} synchronized calls,"
          f" then / the mean of {args.repeats} calls queued back to back")
    names = list(results)
    print("| N×V | dtype | " + " | ".join(names) + " | losses agree |")
    print("|---|---|" + "---|" * (len(names) + 1))

    def cell(ms, nbytes):
        return "-" if ms is None else f"{ms:.3g} ({100 * nbytes / (ms / 1e3) / bandwidth:.0f}%)"

    if names:
        for k, row in enumerate(results[names[0]]):
            cells, losses = [], []
            for name in names:
                r = results[name][k]
                cells.append(f"{cell(r['ms'], r['bytes'])} / {cell(r.get('queued_ms'), r['bytes'])}")
                losses.append(r["loss"])
            spread = (max(losses) - min(losses)) / max(abs(losses[0]), 1e-30)
            print(f"| {row['N']}×{row['V']} | {row['dtype']} | " + " | ".join(cells) + f" | {spread:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"copy_bandwidth": bandwidth, "beta": args.beta, "results": results}, indent=1))
    return 0 if len(results) == len(args.settings) else 1


if __name__ == "__main__":
    sys.exit(main())
