"""Under torch.autocast the op behaves as F.kl_div does there: it runs in
float32 (16-bit inputs cast up, float64 untouched)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import batchkl_ext
from conftest import make_logprobs, make_target

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("input_dtype", ["autocast", "float32", "float64"])
@pytest.mark.parametrize("device,amp_dtype", CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in CASES])
def test_autocast_matches_kl_div(device, amp_dtype, input_dtype, reduction):
    dtype = {"autocast": amp_dtype, "float32": torch.float32, "float64": torch.float64}[input_dtype]
    x = make_logprobs((6, 50)).to(device, dtype)
    t = make_target((6, 50), True).to(device, dtype)
    grads = []
    outs = []
    for fn in (batchkl_ext.kl_div, F.kl_div):
        xa = x.clone().requires_grad_()
        with warnings.catch_warnings(), torch.autocast(device, dtype=amp_dtype):
            warnings.simplefilter("ignore")  # the 'mean' warning
            out = fn(xa, t, reduction=reduction, log_target=True)
        out.sum().backward()
        outs.append(out)
        grads.append(xa.grad)
    ours, theirs = outs
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert grads[0].dtype == grads[1].dtype == dtype
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grads[0], grads[1])


def test_autocast_row_runs_in_float32():
    x = make_logprobs((6, 50)).bfloat16()
    t = make_target((6, 50), False).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_row = torch.ops.batchkl.kl(x, t, "row", False)
    assert per_row.dtype == torch.float32
    torch.testing.assert_close(per_row, F.kl_div(x.float(), t.float(), reduction="none").sum(-1))
