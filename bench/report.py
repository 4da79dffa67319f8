"""Markdown tables from benchmark results, and the README's results block regenerated from committed JSON.

    python -m bench.report bench/results/FILE.json [...]     # print the tables
    python -m bench.report --readme                          # rewrite README.md's results blocks

A results block in README.md is the text between
``<!-- bench-report: bench/results/FILE.json -->`` and ``<!-- bench-report-end -->``;
``--readme`` replaces each with the report of the file it names, and the
tests check that the README matches, so its tables are always the committed
figures.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- bench-report: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- bench-report-end -->)", re.S)
BASELINES = ("eager", "compile", "liger")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _key(r: dict) -> tuple:
    # Files from before forward-only runs and sweeps hold forward + backward base rows.
    return (r.get("sweep", "base"), r["case"], r.get("mode", "fwd+bwd"), tuple(r["shape"]), r["dtype"])


def group(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows of one configuration together: {config key: {impl: row}}, in run order."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(_key(r), {})[r["impl"]] = r
    return out


def _time_cell(r: Optional[dict], ours: bool) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if "skipped" in r:
        return "skipped"
    flag = " (!)" if r.get("agrees_with_reference", r.get("agrees_with_eager")) is False else ""
    cell = f"{r['median_ms']:.3g}{flag}"
    if not ours and r.get("batchkl_speedup") is not None:
        cell += f" ({r['batchkl_speedup']:.2f}×)"
    return cell


def _gbps_cell(gbps: float, pct: Optional[float]) -> str:
    return f"{gbps:.{0 if gbps >= 100 else 1}f}" + (f" ({pct:.0f}%)" if pct is not None else "")


def _queued_cell(r: dict) -> str:
    if r.get("queued_ms") is None:
        return "error" if "queued_error" in r else "-"
    return f"{r['queued_ms']:.3g}, " + _gbps_cell(r["queued_gbps"], r.get("queued_pct_copy_bw"))


def markdown_table(rows: list[dict], device=None, sweep: Optional[str] = None) -> str:
    """One line per configuration: each implementation's median time (batchkl's speedup over it),
    batchkl's bandwidth and every implementation's peak memory; where the rows have queued
    timings (bench.kl's ``--queued``), batchkl's queued time and bandwidth and its queued
    speedups too.

    ``sweep``: only that sweep's configurations ('base', 'V', 'N'); all when None.
    """
    groups = {k: g for k, g in group(rows).items() if sweep is None or k[0] == sweep}
    impls = ["batchkl", "eager", "compile"] + (["liger"] if any("liger" in g for g in groups.values()) else [])
    cuda = str(getattr(device, "type", device)) == "cuda"
    # Files without queued timings (every run before them, and CPU runs) keep their table.
    queued = any("queued_ms" in r or "queued_error" in r for g in groups.values() for r in g.values())
    header = ["case", "mode", "N×V", "dtype"] + [f"{i} ms" + ("" if i == "batchkl" else " (speedup)") for i in impls]
    header.append("batchkl GB/s (% copy)")
    if queued:
        header += ["queued: batchkl ms, GB/s (% copy)", "queued speedup " + "/".join(impls[1:])]
    header.append("peak MiB " + "/".join(impls) + ("" if cuda else " (≈ RSS)"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (sw, case, mode, shape, dtype), g in groups.items():
        label = case if sweep is not None or sw == "base" else f"{case} ({sw} sweep)"
        cells = [label, mode, "×".join(map(str, shape)), dtype]
        cells += [_time_cell(g.get(i), i == "batchkl") for i in impls]
        ours = g.get("batchkl", {})
        bw = "-" if ours.get("gbps") is None else _gbps_cell(ours["gbps"], ours.get("pct_copy_bw"))
        cells.append(bw)
        if queued:
            cells.append(_queued_cell(ours))
            cells.append(" / ".join(_fmt(g.get(i, {}).get("batchkl_queued_speedup"), ".2f") for i in impls[1:]))
        cells.append(" / ".join(_fmt(g.get(i, {}).get("peak_extra_mib"), ".0f") for i in impls))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per configuration: batchkl's speedup over each baseline."""
    out = []
    for (sw, case, mode, shape, dtype), g in group(rows).items():
        parts = [f"{g[b]['batchkl_speedup']:.2f}× {b}" for b in BASELINES
                 if g.get(b, {}).get("batchkl_speedup") is not None]
        if not parts:
            continue
        where = "" if sw == "base" else f" ({sw} sweep)"
        out.append(f"{case} {mode} {'×'.join(map(str, shape))} {dtype}{where}: batchkl is " + ", ".join(parts))
    return out


def describe(data: dict) -> str:
    """One line naming where and with what the figures were measured."""
    m = data["machine"]
    where = m.get("gpu_name") or f"{m['cpu_model']}, {m['torch_num_threads']} threads"
    copy = data.get("copy_bandwidth")
    if copy:
        queued = f" (queued {copy['queued_gbps']:.1f})" if copy.get("queued_gbps") else ""
        copy = f", copy bandwidth {copy['gbps']:.1f} GB/s{queued}"
    else:
        copy = ""
    liger = m.get("liger_kernel_version")
    liger = f", Liger-Kernel {liger}" if liger and data["settings"].get("liger") == "benchmarked" else ""
    # A run from a tree with local changes says so: the commit alone would
    # name code that was not the code measured.
    dirty = " with local changes" if m.get("git_dirty") else ""
    return (f"{where}; torch {m['torch_version']}{liger}, Python {m['python_version']}, "
            f"commit {m.get('git_commit') or 'unknown'}{dirty}{copy}; {data['date']}")


def report(path: Path) -> str:
    data = json.loads((REPO / path).read_text() if not path.is_absolute() else path.read_text())
    rows = data["results"]
    lines = [f"**{describe(data)}** (`{path.as_posix()}`)", ""]
    sweeps = [s for s in ("base", "V", "N") if any(r.get("sweep", "base") == s for r in rows)]
    titles = {"base": None, "V": "Sweep over V at a fixed N·V", "N": "Sweep over N at a fixed V"}
    for s in sweeps:
        if titles[s]:
            lines += ["", f"*{titles[s]}:*", ""]
        lines.append(markdown_table(rows, data["settings"]["device"], sweep=s))
    if any(r.get("agrees_with_reference", r.get("agrees_with_eager")) is False for r in rows):
        lines += ["", "(!): loss or gradient off the reference (eager PyTorch, in float32 for 16-bit inputs) "
                      "beyond tolerance."]
    if data["settings"].get("liger") not in (None, "benchmarked"):
        lines += ["", data["settings"]["liger"] + "."]
    if data.get("note"):
        lines += ["", f"Note: {data['note']}"]
    return "\n".join(lines)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(named file, current body) of every results block in the README text."""
    return [(m["path"], m["body"]) for m in BLOCK.finditer(text)]


def update_readme(readme: Path = README) -> int:
    """Rewrite every results block of the README from the file it names; returns how many."""
    text = readme.read_text()
    new, count = BLOCK.subn(lambda m: m[1] + report(Path(m["path"])) + "\n" + m[4], text)
    readme.write_text(new)
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path)
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's results blocks")
    args = parser.parse_args(argv)
    if args.readme:
        print(f"rewrote {update_readme()} results block(s) in {README.name}")
    if args.json:
        print("\n\n".join(report(path) for path in args.json))
    if not args.readme and not args.json:
        parser.error("name a results JSON file, or pass --readme")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
