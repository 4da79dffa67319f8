"""The build's record of itself (batchkl_ext/_build_config.py, written by
setup.py) and scripts/sources_digest.py, which decides whether an extension
built elsewhere (scripts/prebuild_gpu.sh) may stand in for a build of this tree."""
import os
import re
import subprocess
import sys

import pytest
import torch

from batchkl_ext import _build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sources_digest.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sources_digest  # noqa: E402


def test_build_config_records_the_build():
    assert isinstance(_build_config.CUDA, bool)
    assert _build_config.CPU_SIMD in ("avx512", "avx2", "default")
    assert _build_config.TORCH == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", _build_config.SOURCES), _build_config.SOURCES
    if _build_config.CUDA:
        assert re.fullmatch(r"[0-9.;+PTX ]+", _build_config.CUDA_ARCHS), _build_config.CUDA_ARCHS
    else:
        assert _build_config.CUDA_ARCHS is None


@pytest.fixture
def tree(tmp_path):
    """A small stand-in for the repository: setup.py and a csrc/ with a subfolder."""
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "csrc" / "kl.h").write_text("int a;\n")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("int b;\n")
    (tmp_path / "README.md").write_text("not a source\n")
    return tmp_path


def test_digest_follows_every_source_and_nothing_else(tree):
    base = sources_digest.digest(str(tree))
    assert sources_digest.digest(str(tree)) == base
    (tree / "README.md").write_text("changed\n")
    assert sources_digest.digest(str(tree)) == base
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

