"""The build's record of itself (batchkl_ext/_build_config.py, written by
setup.py) and scripts/sources_digest.py, which decides whether an extension
built elsewhere (scripts/prebuild_gpu.sh) may stand in for a build of this tree."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from batchkl_ext import _build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sources_digest.py")
_spec = importlib.util.spec_from_file_location("sources_digest", SCRIPT)
sources_digest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources_digest)


def test_build_config_records_the_build():
    record = {k: v for k, v in vars(_build_config).items() if k.isupper()}
    assert set(record) == {"CUDA", "CPU_SIMD", "CUDA_ARCHS", "TORCH", "SOURCES"}, (
        f"{record}: a build from before setup.py recorded all of these; rebuild the extension")
    assert isinstance(record["CUDA"], bool)
    assert record["CPU_SIMD"] in ("avx512", "avx2", "default")
    assert record["TORCH"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", record["SOURCES"] or ""), record["SOURCES"]
    if record["CUDA"]:
        assert isinstance(record["CUDA_ARCHS"], str) and record["CUDA_ARCHS"], record["CUDA_ARCHS"]
    else:
        assert record["CUDA_ARCHS"] is None


@pytest.fixture
def tree(tmp_path):
    """A small stand-in for the repository: setup.py and a csrc/ with a subfolder."""
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "csrc" / "kl.h").write_text("int a;\n")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("int b;\n")
    (tmp_path / "README.md").write_text("not a source\n")
    (tmp_path / "csrc" / ".kl.h.swp").write_text("editor state\n")
    (tmp_path / "csrc" / "kl.h~").write_text("a backup\n")
    return tmp_path


def test_digest_follows_every_source_and_nothing_else(tree):
    base = sources_digest.digest(str(tree))
    assert sources_digest.digest(str(tree)) == base
    for scratch in ("README.md", "csrc/.kl.h.swp", "csrc/kl.h~"):
        (tree / scratch).write_text("changed\n")
        assert sources_digest.digest(str(tree)) == base, scratch
    changes = [
        lambda: (tree / "csrc" / "cuda" / "k.cu").write_text("int c;\n"),
        lambda: (tree / "setup.py").write_text("setup(x=1)\n"),
        lambda: (tree / "csrc" / "cuda" / "k.cu").rename(tree / "csrc" / "cuda" / "k2.cu"),
        lambda: (tree / "csrc" / "new.h").write_text(""),
    ]
    seen = {base}
    for change in changes:
        change()
        now = sources_digest.digest(str(tree))
        assert now not in seen
        seen.add(now)


def test_matches_accepts_only_this_trees_digest(tmp_path):
    config = tmp_path / "_build_config.py"
    run = lambda: subprocess.run([sys.executable, SCRIPT, "--matches", str(config)],  # noqa: E731
                                 capture_output=True, text=True, timeout=60)
    config.write_text(f"CUDA = True\nSOURCES = {sources_digest.digest()!r}\n")
    assert run().returncode == 0
    config.write_text("CUDA = True\nSOURCES = '" + "0" * 64 + "'\n")
    res = run()
    assert res.returncode == 1 and "built from other sources" in res.stderr
    config.write_text("CUDA = True\n")  # a build from before SOURCES was recorded
    assert run().returncode == 1
    printed = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert printed.stdout.strip() == sources_digest.digest()
