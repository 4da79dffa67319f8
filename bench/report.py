"""Markdown tables from committed benchmark JSON files (the README's tables).

    python -m bench.report bench/results/*.json
"""
import argparse
import json
from pathlib import Path

import torch

from .kl import markdown_table, summary_lines


def describe(data: dict) -> str:
    """One line naming where and with what the figures were measured."""
    m = data["machine"]
    where = m.get("gpu_name") or f"{m['cpu_model']}, {m['torch_num_threads']} threads"
    copy = data.get("copy_bandwidth")
    copy = f", device copy {copy['gbps']:.0f} GB/s" if copy else ""
    return (f"{where}; torch {m['torch_version']}, Python {m['python_version']}, "
            f"commit {m.get('git_commit') or 'unknown'}{copy}; {data['date']}")


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    device = torch.device(data["settings"]["device"])
    lines = [f"**{describe(data)}** (`{path.as_posix()}`)", "", markdown_table(data["results"], device), ""]
    lines += [f"- {line}" for line in summary_lines(data["results"])]
    if data.get("note"):
        lines += ["", f"Note: {data['note']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("\n\n".join(report(path) for path in args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
