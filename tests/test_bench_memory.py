"""The benchmark's memory budget: a reference computed in row chunks, and each implementation
run only where it fits, so that batchkl is measured at shapes its baselines cannot hold.

A GPU is not needed: the free memory is forced (``kl.free_bytes`` patched), and the same
code path that decides on a GPU runs here on the CPU.
"""
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from bench import kl, report  # noqa: E402
from bench.cases import CASES, SCALAR  # noqa: E402
# LigerJSD's contract in PyTorch: Liger is CUDA-only, stood in for on the CPU.
from test_bench import _StandInJSD  # noqa: E402

CPU = torch.device("cpu")
SKIP_MESSAGE = re.compile(r"needs ~[0-9.e+-]+ GiB, [0-9.e+-]+ GiB free")


def _whole_eager(case, inp):
    """The reference as one eager computation over every row (what reference() computed before chunking)."""
    low = inp.x.dtype in (torch.float16, torch.bfloat16)
    x = (inp.x.detach().float() if low else inp.x.detach().clone()).requires_grad_(inp.grad)
    t = inp.t.float() if low else inp.t
    up = inp.upstream.float() if low and inp.upstream is not None else inp.upstream
    loss = case.torch_fn(x, t)
    if inp.grad:
        loss.backward(up)
    return loss.detach(), x.grad


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_reference_is_the_whole_eager_computation(case):
    """10 rows in chunks of 3 (the last one short): the same loss and gradient as one eager pass,
    to float rounding, for each reduction (a row mean weights each chunk by its share of the rows)."""
    c = CASES[case]
    assert (c.over_rows is not None) == (c.output == SCALAR), "a scalar loss must say how it combines its rows"
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for mode in kl.MODES:
            inp = kl.make_inputs(kl.Config(c, (10, 37), dtype, mode, kl.BASE_SWEEP), CPU)
            want_loss, want_grad = _whole_eager(c, inp)
            loss, grad = kl.reference(c, inp, chunk_rows=3)
            torch.testing.assert_close(loss, want_loss, msg=lambda m: f"{case} {dtype} {mode} loss: {m}")
            if mode == kl.FWD:
                assert grad is None and want_grad is None
            else:
                torch.testing.assert_close(grad, want_grad, msg=lambda m: f"{case} {dtype} {mode} grad: {m}")
            # A shape that fits one chunk is computed exactly as before.
            loss1, grad1 = kl.reference(c, inp)
            assert torch.equal(loss1, want_loss) and (grad1 is None or torch.equal(grad1, want_grad))


def test_reference_chunks_are_bounded_at_the_largest_shapes():
    for case in CASES.values():
        for dtype in (torch.bfloat16, torch.float32):
            rows = kl.reference_chunk_rows(case, (4096, 256000), dtype)
            assert 1 < rows < 4096
            assert rows * 256000 * 4 * (case.eager_temporaries + 3) <= kl.REF_CHUNK_BYTES


def test_batchkl_fits_every_case_at_the_largest_shapes_on_an_h100():
    """The free memory of the H100 run that skipped logits_jsd at 4096x256000 outright:
    batchkl now fits every configuration, and so do the baselines that can."""
    free = int(78.6 * 2**30)
    configs = kl.plan(torch.device("cuda"), False, list(CASES), list(kl.MODES), [])
    assert any(c.shape == (4096, 256000) and c.case.name == "logits_jsd" for c in configs)
    for cfg in configs:
        assert "batchkl" not in kl.too_big(cfg, list(kl.IMPLS), free), cfg.label
    for dtype in (torch.bfloat16, torch.float32):
        cfg = kl.Config(CASES["logits_jsd"], (4096, 256000), dtype, kl.FWD_BWD, kl.BASE_SWEEP)
        assert kl.too_big(cfg, ["batchkl", "compile", "liger"], free) == {}
        assert kl.need_bytes(cfg, "batchkl") < kl.need_bytes(cfg, "liger") < kl.need_bytes(cfg, "eager")


def test_the_cpu_never_skips():
    assert kl.free_bytes(CPU) is None
    cfg = kl.Config(CASES["logits_jsd"], (2**20, 2**20), torch.float32, kl.FWD_BWD, kl.BASE_SWEEP)
    assert kl.too_big(cfg, list(kl.IMPLS), None) == {}


@pytest.fixture
def small_chunks(monkeypatch):
    # Tiny shapes need tiny reference chunks, else the reference's own
    # temporaries, not the implementation's, decide what fits.
    monkeypatch.setattr(kl, "REF_CHUNK_BYTES", 4 * 300 * 4 * 16)


def _force_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(kl, "free_bytes", lambda device: free)


@pytest.mark.parametrize("fits", [("batchkl",), ("batchkl", "liger", "compile")])
def test_impls_that_do_not_fit_are_skipped_and_the_others_measured(fits, monkeypatch, small_chunks):
    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerKLDIVLoss, fake.LigerJSD = torch.nn.KLDivLoss, _StandInJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    cfg = kl.Config(CASES["logits_jsd"], (64, 300), torch.float32, kl.FWD_BWD, kl.BASE_SWEEP)
    need = {impl: kl.need_bytes(cfg, impl) for impl in kl.IMPLS}
    assert need["batchkl"] < need["liger"] < need["compile"] < need["eager"], need
    free = math.ceil(max(need[i] for i in fits) / 0.8)
    _force_free(monkeypatch, free)

    rows = kl.run_config(cfg, CPU, warmup=2, repeats=1, liger=True)
    kl.annotate(rows, cfg, copy_gbps=10.0)
    by_impl = {r["impl"]: r for r in rows}
    assert list(by_impl) == list(kl.IMPLS)
    for impl, r in by_impl.items():
        assert all(r[k] == v for k, v in cfg.key().items())
        if impl in fits:
            assert "skipped" not in r and "error" not in r, r
            assert r["median_ms"] > 0 and r["agrees_with_reference"] and r["pct_copy_bw"] > 0, r
        else:
            assert set(r) == set(cfg.key()) | {"impl", "skipped"}, r
            assert SKIP_MESSAGE.fullmatch(r["skipped"]), r["skipped"]
    assert by_impl["batchkl"]["batchkl_speedup"] == 1.0

    table = report.markdown_table(rows, "cuda")
    cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    for impl in kl.IMPLS:
        cell = cells[next(k for k, h in enumerate(header) if h.startswith(f"{impl} ms"))]
        if impl not in fits:
            assert cell == "skipped"
        elif impl != "batchkl":
            assert cell.endswith("×)"), cell  # a speedup, against a measured baseline only
    peaks = cells[-1].split(" / ")
    assert [p == "-" for p in peaks] == [impl not in fits for impl in kl.IMPLS], cells[-1]
    summary = report.summary_lines(rows)
    if fits == ("batchkl",):
        assert summary == []
    else:
        assert len(summary) == 1 and "× compile" in summary[0] and "× liger" in summary[0]
        assert "eager" not in summary[0]


def test_main_with_little_free_memory(monkeypatch, small_chunks, tmp_path):
    """The whole run, JSON to report and plots, with eager and compile skipped and batchkl measured."""
    cfg = kl.Config(CASES["logits_jsd"], (64, 300), torch.float32, kl.FWD_BWD, kl.BASE_SWEEP)
    _force_free(monkeypatch, math.ceil(kl.need_bytes(cfg, "batchkl") / 0.8))
    out = tmp_path / "little.json"
    argv = ["--device", "cpu", "--cases", "logits_jsd", "--modes", "fwd+bwd", "--sweeps", "--shapes", "64x300",
            "--dtypes", "float32", "--repeats", "1", "--warmup", "2", "--out", str(out)]
    assert kl.main(argv) == 0
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"batchkl", "eager", "compile"}
    assert rows["batchkl"]["agrees_with_reference"] and rows["batchkl"]["pct_copy_bw"] > 0
    for impl in ("eager", "compile"):
        assert SKIP_MESSAGE.fullmatch(rows[impl]["skipped"]) and "median_ms" not in rows[impl]
    assert data["summary"] == [] and data["complete"]
    text = report.report(out)
    assert f"{rows['batchkl']['median_ms']:.3g} | skipped | skipped |" in text
    pytest.importorskip("matplotlib")
    from bench import plot
    assert [p.name for p in plot.plot_file(out, tmp_path)] == ["little-bandwidth-base.png"]
