"""The benchmark suite and the distillation example run, and the README's results are the committed JSON.

These check that the tools work and tell the truth about what they measured;
they time nothing themselves (speed is the benchmark's business, not a test's).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from bench import distill, kl, report  # noqa: E402
from bench.cases import CASES  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    argv = ["--device", "cpu", "--quick", "--cases", "logits_kl", "none", "--sweeps", "V", "N",
            "--repeats", "1", "--out", str(out)]
    assert kl.main(argv) == 0
    return out, json.loads(out.read_text())


def test_quick_run_measures_every_configuration(quick_run):
    _, data = quick_run
    rows = data["results"]
    configs = kl.plan(torch.device("cpu"), True, ["logits_kl", "none"], list(kl.MODES), ["V", "N"])
    assert len(rows) == 3 * len(configs)  # batchkl, eager, compile for each
    assert {(r["case"], r["mode"]) for r in rows if r["sweep"] == "base"} == {
        (c, m) for c in ("logits_kl", "none") for m in ("fwd", "fwd+bwd")}
    assert {r["sweep"] for r in rows} == {"base", "V", "N"}
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["agrees_with_reference"], r  # every implementation computed the same loss and gradient
        assert (r["rel_err_grad"] is None) == (r["mode"] == "fwd")
        assert math.isclose(r["gbps"], r["min_bytes"] / r["median_ms"] / 1e6)
        if r["impl"] != "batchkl":
            ours = next(o for o in rows if o["impl"] == "batchkl" and
                        all(o[k] == r[k] for k in ("case", "mode", "sweep", "shape", "dtype")))
            assert math.isclose(r["batchkl_speedup"], r["median_ms"] / ours["median_ms"])
    assert data["copy_bandwidth"]["gbps"] > 0
    assert all(r["pct_copy_bw"] > 0 for r in rows)
    # Queued timings are for GPUs: off on the CPU unless asked for.
    assert data["settings"]["queued"] is None and "queued_gbps" not in data["copy_bandwidth"]
    assert not any(k.startswith("queued") or k == "batchkl_queued_speedup" for r in rows for k in r)
    m = data["machine"]
    assert m["torch_version"] == torch.__version__ and m["cpu_model"] and m["git_commit"] is not None
    assert data["settings"]["liger"].startswith("Liger-Kernel skipped")


def test_sweeps_hold_their_fixed_dimension():
    for device in ("cpu", "cuda"):
        configs = kl.plan(torch.device(device), False, list(CASES), list(kl.MODES), ["V", "N"])
        sweep = kl.SWEEPS[device]
        v_shapes = {c.shape for c in configs if c.sweep == "V"}
        n_shapes = {c.shape for c in configs if c.sweep == "N"}
        assert {n * v for n, v in v_shapes} == {sweep.numel}
        assert sorted(v for _, v in v_shapes) == sorted(sweep.vocab)
        assert {v for _, v in n_shapes} == {sweep.fixed_v}
        assert sorted(n for n, _ in n_shapes) == sorted(sweep.rows)


def test_minimal_bytes():
    f32 = torch.float32
    nv4 = 4 * 10 * 100

    def cfg(case, mode):
        return kl.Config(CASES[case], (10, 100), f32, mode, "base")

    assert kl.minimal_bytes(cfg("logits_kl", "fwd")) == 2 * nv4          # read x, t
    assert kl.minimal_bytes(cfg("logits_kl", "fwd+bwd")) == 3 * nv4      # ... write the gradient
    assert kl.minimal_bytes(cfg("none", "fwd")) == 3 * nv4               # ... write the loss
    assert kl.minimal_bytes(cfg("none", "fwd+bwd")) == 5 * nv4           # ... read its upstream gradient


def test_shapes_option_replaces_the_base_shapes():
    """--shapes NxV ... --dtypes ...: those base shapes, each with every dtype, and nothing else
    (no sweeps with --sweeps alone); malformed shapes are refused with the value named."""
    args = kl.parse_args(["--device", "cpu", "--cases", "logits_kl", "batchmean", "--modes", "fwd+bwd",
                          "--sweeps", "--shapes", "64x1000", "3×7", "--dtypes", "bfloat16", "float32"])
    assert args.shapes == [(64, 1000), (3, 7)]
    base = [(shape, kl.DTYPES[d]) for shape in args.shapes for d in args.dtypes]
    configs = kl.plan(torch.device("cpu"), False, args.cases, args.modes, args.sweeps, base)
    got = [(c.case.name, c.shape, c.dtype) for c in configs]
    assert got == [(case, shape, dtype) for case in ("logits_kl", "batchmean")
                   for shape in ((64, 1000), (3, 7)) for dtype in (torch.bfloat16, torch.float32)]
    assert all(c.sweep == "base" and c.mode == "fwd+bwd" for c in configs)
    for bad in ("64x0", "64", "axb", "-1x5"):
        with pytest.raises(SystemExit):
            kl.parse_args(["--device", "cpu", "--shapes", bad])


def test_plots_and_report_from_json(quick_run, tmp_path):
    pytest.importorskip("matplotlib")  # installed by scripts/setup.sh (CI); maybe not on a lent GPU machine
    from bench import plot

    path, data = quick_run
    written = plot.plot_file(path, tmp_path)
    names = {p.name for p in written}
    assert names == {f"quick-{n}.png" for n in plot.PLOTS} | {"quick-bandwidth-base.png"}
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    text = report.report(path)
    base = [r for r in data["results"] if r["sweep"] == "base" and r["impl"] == "batchkl"]
    for r in base:
        assert f"{r['median_ms']:.3g}" in text
    assert "Sweep over V" in text and "Sweep over N" in text


def test_readme_results_are_the_committed_json():
    text = report.README.read_text()
    blocks = report.readme_blocks(text)
    assert blocks, "README.md lost its generated results block"
    for path, body in blocks:
        assert (REPO / path).is_file(), path
        assert body.strip() == report.report(Path(path)).strip(), (
            f"README's table for {path} is stale: run `python -m bench.report --readme`")
    for png in {p for p in __import__("re").findall(r"\((bench/results/plots/[^)]+\.png)\)", text)}:
        assert (REPO / png).is_file(), png


def test_distillation_example_quick():
    results = distill.main(["--quick", "--device", "cpu"])
    ours, theirs = results["batchkl"]["losses"], results["composite"]["losses"]
    assert len(ours) == len(theirs) == distill.QUICK.steps
    for a, b in zip(ours, theirs):
        assert math.isclose(a, b, rel_tol=1e-4), (ours, theirs)
    assert ours[-1] < ours[0]  # the student learns
    for r in results.values():
        assert r["ms_per_step"] > 0 and r["peak_extra_mib"] is not None


class _StandInJSD(torch.nn.Module):
    """Liger's documented LigerJSD contract, in PyTorch: forward(log_q, log_p) with student
    log-probabilities first, beta * KL(P||M) + (1 - beta) * KL(Q||M), M = beta P + (1 - beta) Q,
    summed and divided by the number of rows."""

    def __init__(self, beta=0.5):
        super().__init__()
        self.beta = beta

    def forward(self, log_q, log_p):
        q, p = log_q.exp(), log_p.exp()
        log_m = (self.beta * p + (1 - self.beta) * q).log()
        kl = torch.nn.functional.kl_div
        loss = (self.beta * kl(log_m, log_p, reduction="sum", log_target=True)
                + (1 - self.beta) * kl(log_m, log_q, reduction="sum", log_target=True))
        return loss / log_q.shape[0]


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].liger is not None])
def test_liger_baseline_wiring(case, monkeypatch):
    # Liger's kernels need CUDA; here a stand-in with its documented API (LigerKLDIVLoss is an
    # nn.KLDivLoss; LigerJSD as above) checks that the benchmark calls it with the right
    # arguments: its rows must agree with the reference like every other implementation.
    import types
    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerKLDIVLoss, fake.LigerJSD = torch.nn.KLDivLoss, _StandInJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    for mode in kl.MODES:
        cfg = kl.Config(CASES[case], (16, 300), torch.float32, mode, "base")
        rows = kl.run_config(cfg, torch.device("cpu"), warmup=2, repeats=1, liger=True)
        kl.annotate(rows, cfg, None)
        by_impl = {r["impl"]: r for r in rows}
        assert set(by_impl) == {"batchkl", "eager", "compile", "liger"}
        assert by_impl["liger"]["agrees_with_reference"], by_impl["liger"]


def test_agreement_check_flags_nan_shape_and_infinities():
    ref = torch.tensor([[1.0, 2.0], [3.0, float("inf")]])
    assert kl._max_rel_err(ref.clone(), ref) == 0.0
    bad_nan = ref.clone()
    bad_nan[0, 0] = float("nan")
    assert kl._max_rel_err(bad_nan, ref) == math.inf
    bad_inf = ref.clone()
    bad_inf[1, 1] = 5.0
    assert kl._max_rel_err(bad_inf, ref) == math.inf
    assert kl._max_rel_err(torch.tensor(float("nan")), torch.tensor(1.0)) == math.inf
    assert kl._max_rel_err(torch.ones(3), torch.tensor(1.0)) == math.inf      # shapes differ
    assert kl._max_rel_err(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) == pytest.approx(0.05)


def test_cases_batchkl_cannot_run_are_skipped_with_their_error():
    from dataclasses import replace

    def broken(x, t):
        raise RuntimeError("batchkl.kl_with_logits: no kernel for tensors on cuda\nmore text")

    case = replace(CASES["logits_kl"], batchkl_fn=broken)
    assert kl.unsupported(case, torch.device("cpu")) == "RuntimeError: batchkl.kl_with_logits: no kernel for tensors on cuda"
    assert all(kl.unsupported(c, torch.device("cpu")) is None for c in CASES.values())
    # Forward-only runs have no sweeps (the sweeps are forward + backward).
    assert {c.sweep for c in kl.plan(torch.device("cpu"), False, list(CASES), ["fwd"], ["V", "N"])} == {"base"}


def test_tune_script_runs_on_the_cpu(tmp_path):
    """scripts/tune_logits.py (a GPU tuning run) checked where there is no GPU:
    one worker process per setting, a row per shape and dtype, and losses
    that agree across settings (on the CPU the knobs change nothing)."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "tune_logits.py"), "--device", "cpu", "--shapes",
                           "8x300", "3x5000", "--dtypes", "float32", "bfloat16", "--settings", "default", "stream",
                           "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 8×300") or line.startswith("| 3×5000")]
    assert len(rows) == 4 and all(row.endswith("| 0.0e+00 |") for row in rows), proc.stdout
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"default", "stream"} and data["copy_bandwidth"] > 0
    assert [(r["N"], r["V"], r["dtype"]) for r in data["results"]["stream"]] == [
        (8, 300, "float32"), (8, 300, "bfloat16"), (3, 5000, "float32"), (3, 5000, "bfloat16")]
    assert all(r["ms"] > 0 and r["bytes"] == 3 * r["N"] * r["V"] * (4 if r["dtype"] == "float32" else 2)
               for r in data["results"]["default"])


def test_cuda_check_prefetch_runs_on_the_cpu():
    """scripts/cuda_check.py --prefetch (run on a GPU, also under
    compute-sanitizer) checked where there is no GPU: the CPU kernel passes
    its float64 and row-alone comparisons, and a failure would exit non-zero."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "scripts" / "cuda_check.py"), "--device", "cpu", "--prefetch",
                           "--small", "--dtypes", "float32", "bfloat16"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cuda_check --prefetch: 60 passed, 0 failed" in proc.stdout, proc.stdout


def test_queued_ms_times_back_to_back_calls(monkeypatch):
    from bench import measure
    clock, calls = [100.0], []

    def step():  # 2 ms of (fake) wall time per call, reset free
        calls.append("step")
        clock[0] += 0.002

    def reset():
        calls.append("reset")

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    assert measure.queued_ms(step, reset, torch.device("cpu"), 4) == pytest.approx(2.0)
    assert calls == ["reset", "step"] * 4
    for bad in (0, -1):
        with pytest.raises(ValueError, match="'calls' must be at least 1, got"):
            measure.queued_ms(step, reset, torch.device("cpu"), bad)
    assert [measure.queued_calls(r) for r in (1, 2, 15, 16, 50)] == [5, 5, 5, 5, 16]


def test_queued_run_reports_queued_figures(tmp_path):
    """--queued (the default on CUDA) asked for on the CPU: every implementation gets
    QUEUED_ROUNDS rounds, their median, the bandwidth against the queued copy bandwidth
    and batchkl's speedups so timed; the report and the plot show them."""
    from bench import plot
    from bench.measure import QUEUED_ROUNDS
    out = tmp_path / "queued.json"
    assert kl.main(["--device", "cpu", "--quick", "--cases", "batchmean", "--modes", "fwd+bwd", "--sweeps",
                    "--repeats", "2", "--queued", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    copy = data["copy_bandwidth"]
    assert len(copy["queued_rounds_ms"]) == QUEUED_ROUNDS and copy["queued_ms"] > 0
    assert math.isclose(copy["queued_gbps"], 2 * copy["bytes"] / copy["queued_ms"] / 1e6)
    assert data["settings"]["queued"].startswith(f"{QUEUED_ROUNDS} rounds of 5 calls back to back")
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"batchkl", "eager", "compile"}
    for r in rows.values():
        assert len(r["queued_rounds_ms"]) == QUEUED_ROUNDS and all(t > 0 for t in r["queued_rounds_ms"])
        assert r["queued_ms"] == sorted(r["queued_rounds_ms"])[QUEUED_ROUNDS // 2]
        assert math.isclose(r["queued_gbps"], r["min_bytes"] / r["queued_ms"] / 1e6)
        assert math.isclose(r["queued_pct_copy_bw"], 100 * r["queued_gbps"] / copy["queued_gbps"])
        assert math.isclose(r["batchkl_queued_speedup"], r["queued_ms"] / rows["batchkl"]["queued_ms"])
    text = report.report(out)
    ours = rows["batchkl"]
    assert f"{ours['queued_ms']:.3g}, {report._gbps_cell(ours['queued_gbps'], ours['queued_pct_copy_bw'])}" in text
    assert f"{rows['eager']['batchkl_queued_speedup']:.2f} / {rows['compile']['batchkl_queued_speedup']:.2f}" in text
    assert "queued speedup eager/compile" in text and f"(queued {copy['queued_gbps']:.1f})" in text
    # batchkl's queued bars beside its synchronized ones; none in a run without them.
    results = data["results"]
    assert plot.bandwidth_series(results)[:2] == [("batchkl", "pct_copy_bw"), ("batchkl", "queued_pct_copy_bw")]
    plain = [{k: v for k, v in r.items() if not k.startswith("queued")} for r in results]
    assert all(key == "pct_copy_bw" for _, key in plot.bandwidth_series(plain))
    if importlib.util.find_spec("matplotlib") is not None:
        assert [p.name for p in plot.plot_file(out, tmp_path)] == ["queued-bandwidth-base.png"]


def test_queued_rounds(monkeypatch):
    """The queued rounds: QUEUED_ROUNDS of them, queued_calls(repeats) calls each, in a
    rotating order, under error_on_recompile like the synchronized rounds; an
    implementation that fails only there keeps its other figures, with a
    "queued_error", and the others' queued speedups are then None."""
    from bench.measure import QUEUED_ROUNDS, queued_calls
    cfg = kl.Config(CASES["batchmean"], (8, 64), torch.float32, kl.FWD_BWD, kl.BASE_SWEEP)
    device = torch.device("cpu")
    inp = kl.make_inputs(cfg, device)
    ref = kl.reference(cfg.case, inp)
    steps = {impl: kl.make_step(fn, inp) for impl, fn in kl.loss_fns(cfg.case, False).items()}
    warmup, repeats, queued, seen = 2, 3, [False], []
    good, real_queued_ms = steps["batchkl"], kl.queued_ms

    def flaky():
        if queued[0]:
            raise RuntimeError("queued call failed\nsecond line")
        return good()

    steps["batchkl"] = flaky
    names = {id(step): impl for impl, step in steps.items()}

    def queued_ms(step, reset, dev, calls):
        seen.append((names[id(step)], calls, torch._dynamo.config.error_on_recompile))
        queued[0] = True
        return real_queued_ms(step, reset, dev, calls)

    monkeypatch.setattr(kl, "queued_ms", queued_ms)
    out = kl.measure(steps, inp, ref, device, warmup, repeats, queued=True)
    # batchkl fails in round 0; the two left then rotate.
    assert [impl for impl, _, _ in seen] == ["batchkl", "eager", "compile", "compile", "eager", "eager", "compile"]
    assert all(calls == queued_calls(repeats) and strict for _, calls, strict in seen)
    assert all(len(out[impl]["queued_rounds_ms"]) == QUEUED_ROUNDS for impl in ("eager", "compile"))
    assert out["batchkl"]["queued_error"] == "RuntimeError: queued call failed"
    assert "queued_ms" not in out["batchkl"] and len(out["batchkl"]["times_ms"]) == repeats
    assert out["batchkl"]["median_ms"] > 0 and "peak_extra_mib" in out["batchkl"]
    rows = [{**cfg.key(), "impl": impl, **row} for impl, row in out.items()]
    kl.annotate(rows, cfg, 10.0, 10.0)
    by = {r["impl"]: r for r in rows}
    assert by["eager"]["queued_ms"] > 0 and by["eager"]["batchkl_queued_speedup"] is None
    assert by["batchkl"]["batchkl_speedup"] == 1.0
    line = report.markdown_table(rows, "cpu").splitlines()[2]
    assert "| error | - / - |" in line
