"""PNG plots of a benchmark run, made from its JSON alone (so they can be regenerated at any time).

    python -m bench.plot bench/results/FILE.json [...] [--out-dir DIR]

For each file: time and achieved bandwidth against V (the V sweep, N·V held
fixed) and peak memory and time against N (the N sweep, V held fixed), one
panel per case and dtype, one line per implementation; and the base shapes'
achieved bandwidth as a share of the measured copy bandwidth (bars, one
panel per case and mode, one bar per implementation). Written next to the
JSON as ``plots/<file stem>-<what>.png`` unless ``--out-dir`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402

from .report import describe  # noqa: E402

IMPL_STYLE = {"batchkl": dict(color="C3", marker="o", lw=2.2), "eager": dict(color="C0", marker="s"),
              "compile": dict(color="C2", marker="^"), "liger": dict(color="C4", marker="D")}

# (sweep, x axis, metric, y label, log y)
PLOTS = {
    "time-vs-V": ("V", 1, "median_ms", "median time (ms)", True),
    "bandwidth-vs-V": ("V", 1, "gbps", "achieved GB/s over minimal bytes", False),
    "memory-vs-N": ("N", 0, "peak_extra_mib", "peak extra memory (MiB)", True),
    "time-vs-N": ("N", 0, "median_ms", "median time (ms)", True),
}


def _panels(rows: list[dict], sweep: str) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("sweep") == sweep and "median_ms" in r:
            out.setdefault((r["case"], r["dtype"]), []).append(r)
    return out


def bandwidth_series(rows: list[dict]) -> list[tuple[str, str]]:
    """The bars of a base-bandwidth panel, as (implementation, figure): each
    implementation's synchronized calls, and batchkl's queued ones beside
    them where the run timed them (bench.kl's --queued)."""
    series = [(i, "pct_copy_bw") for i in IMPL_STYLE if any(r["impl"] == i for r in rows)]
    if any(r["impl"] == "batchkl" and r.get("queued_pct_copy_bw") is not None for r in rows):
        series.insert(1, ("batchkl", "queued_pct_copy_bw"))
    return series


def _base_bandwidth(data: dict, target: Path) -> bool:
    """Bars of each implementation's bandwidth over the minimal bytes, in % of
    the run's copy bandwidth, per base shape; False when there is nothing to plot."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in data["results"]:
        if r.get("sweep") == "base" and r.get("pct_copy_bw") is not None:
            panels.setdefault((r["case"], r["mode"]), []).append(r)
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for ax, ((case, mode), rows) in zip(axes[:, 0], panels.items()):
        labels = list(dict.fromkeys(f"{r['shape'][0]}×{r['shape'][1]}\n{r['dtype']}" for r in rows))
        series = bandwidth_series(rows)
        width = 0.8 / len(series)
        for k, (impl, key) in enumerate(series):
            pct = {f"{r['shape'][0]}×{r['shape'][1]}\n{r['dtype']}": r[key] for r in rows
                   if r["impl"] == impl and r.get(key) is not None}
            xs = [i + (k - (len(series) - 1) / 2) * width for i, lab in enumerate(labels) if lab in pct]
            queued = key == "queued_pct_copy_bw"
            ax.bar(xs, [pct[lab] for lab in labels if lab in pct], width, label=impl + (" (queued)" if queued else ""),
                   color="none" if queued else IMPL_STYLE[impl]["color"], edgecolor=IMPL_STYLE[impl]["color"],
                   hatch="//" if queued else None)
        ax.axhline(85, color="grey", ls="--", lw=1, label="85 %")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set(ylabel="% of copy bandwidth", title=f"{case}, {mode}: bandwidth over the minimal bytes")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(series) + 1)
    fig.suptitle(textwrap.fill(describe(data), 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return True


def plot_file(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Every plot the file has data for; returns the paths written."""
    data = json.loads(path.read_text())
    out_dir = out_dir or path.parent / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    target = out_dir / f"{path.stem}-bandwidth-base.png"
    if _base_bandwidth(data, target):
        written.append(target)
    for name, (sweep, axis, metric, ylabel, logy) in PLOTS.items():
        panels = _panels(data["results"], sweep)
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(max(5.6 * len(panels), 7), 4.6), squeeze=False)
        for ax, ((case, dtype), rows) in zip(axes[0], panels.items()):
            for impl, style in IMPL_STYLE.items():
                # A log axis cannot show 0 (a peak below the RSS resolution).
                pts = sorted((r["shape"][axis], r[metric]) for r in rows
                             if r["impl"] == impl and r.get(metric) is not None and (r[metric] > 0 or not logy))
                if pts:
                    ax.plot(*zip(*pts), label=impl, **style)
            if metric == "gbps" and data.get("copy_bandwidth"):
                ax.axhline(data["copy_bandwidth"]["gbps"], color="grey", ls="--", lw=1, label="copy_ bandwidth")
            shape = rows[0]["shape"]
            fixed = f"N·V = {shape[0] * shape[1]:,}" if sweep == "V" else f"V = {shape[1]:,}"
            ax.set(xscale="log", xlabel="V (row length)" if sweep == "V" else "N (rows)", ylabel=ylabel,
                   title=f"{case}, {dtype}, fwd+bwd, {fixed}")
            if logy:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(textwrap.fill(describe(data), 110), fontsize=8)
        fig.tight_layout()
        target = out_dir / f"{path.stem}-{name}.png"
        fig.savefig(target, dpi=90)
        plt.close(fig)
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, help="where the PNGs go (default: plots/ beside each JSON)")
    args = parser.parse_args(argv)
    for path in args.json:
        for target in plot_file(path, args.out_dir):
            print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
