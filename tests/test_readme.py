"""The ```python code blocks of README.md run as written (CPU)."""
import os
import re
import warnings

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    if not os.path.exists(README):
        return []
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```(?:python|py)[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = _python_blocks()


@pytest.mark.skipif(not BLOCKS, reason="README.md has no python code blocks")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block(index, capsys):
    code = BLOCKS[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
