"""What the benchmark measures: each loss written with batchkl, in plain PyTorch and with Liger-Kernel.

A case is one loss. Its PyTorch expression serves both as the eager baseline
and, wrapped in ``torch.compile``, as the compiled one, so the two baselines
are the same expression by construction. Liger-Kernel is a third baseline
where it has an equivalent (its kernels are Triton: CUDA only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import batchkl_ext

LossFn = Callable[[Tensor, Tensor], Tensor]

# What the two inputs hold: log-probabilities for both, log-probabilities and
# probabilities, or raw logits for both (the distillation ops).
LOG_PROBS, PROBS_TARGET, LOGITS = "log_probs", "probs_target", "logits"
# The shape of the loss, which decides how backward is driven: a scalar, one
# value per row, or one per element (backward then gets a fixed upstream
# gradient of that shape, as a weighted loss would).
SCALAR, PER_ROW, ELEMENTWISE = "scalar", "per_row", "elementwise"
# How a scalar loss combines its rows: their sum, or their sum divided by the
# number of rows ('batchmean'). The reference runs in row chunks and needs it
# to weight each chunk's loss and gradient.
SUM_ROWS, MEAN_ROWS = "sum", "mean"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    batchkl_fn: LossFn
    torch_fn: LossFn
    inputs: str
    output: str
    # Builds Liger's loss; None where Liger has no equivalent. A factory so
    # that Liger is imported only when it is benchmarked.
    liger: Optional[Callable[[], LossFn]] = None
    # SUM_ROWS or MEAN_ROWS for a scalar loss; None for a per-row or elementwise one.
    over_rows: Optional[str] = None
    # N x V tensors of the input's dtype each baseline holds at its peak in
    # forward + backward, gradient and elementwise loss included (eager and
    # compile measured on the CPU, Liger counted from its source and the H100
    # runs), so that on a GPU only the implementations that fit are run. The
    # eager count also sizes the reference's row chunks.
    eager_temporaries: int = 3
    compile_temporaries: int = 1
    liger_temporaries: int = 2


JSD_BETA = 0.5


def _liger_kl(reduction: str, log_target: bool, logits: bool = False) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from liger_kernel.transformers import LigerKLDIVLoss
        loss = LigerKLDIVLoss(reduction=reduction, log_target=log_target)
        if not logits:
            return loss
        # Liger's KL takes log-probabilities: the log-softmax stays PyTorch's.
        return lambda x, t: loss(F.log_softmax(x, -1), F.log_softmax(t, -1))
    return build


def _liger_jsd() -> LossFn:
    from liger_kernel.transformers import LigerJSD
    # Same convention as TRL and batchkl: beta * KL(P||M) + (1-beta) * KL(Q||M),
    # M = beta P + (1-beta) Q, summed and divided by the number of rows.
    loss = LigerJSD(beta=JSD_BETA)
    return lambda x, t: loss(F.log_softmax(x, -1), F.log_softmax(t, -1))


def _trl_jsd(x: Tensor, t: Tensor) -> Tensor:
    # TRL's GKDTrainer.generalized_jsd_loss (no mask, T = 1).
    log_q, log_p = F.log_softmax(x, -1), F.log_softmax(t, -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - JSD_BETA), log_p + math.log(JSD_BETA)]), dim=0)
    jsd = (JSD_BETA * F.kl_div(log_m, log_p, reduction="none", log_target=True)
           + (1 - JSD_BETA) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    return jsd.sum() / jsd.size(0)


def _composite_logits_kl(x: Tensor, t: Tensor, reduction: str) -> Tensor:
    return F.kl_div(F.log_softmax(x, -1), F.log_softmax(t, -1), reduction=reduction, log_target=True)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        # The drop-in op, one case per reduction family: a scalar
        # ('batchmean' with log-probability targets, 'sum' with
        # probabilities), per element ('none') and per row ('row').
        Case("batchmean", "drop-in: reduction='batchmean', log_target=True",
             lambda x, t: batchkl_ext.kl_div(x, t, reduction="batchmean", log_target=True),
             lambda x, t: F.kl_div(x, t, reduction="batchmean", log_target=True),
             LOG_PROBS, SCALAR, _liger_kl("batchmean", True), over_rows=MEAN_ROWS),
        Case("sum", "drop-in: reduction='sum', probability targets",
             lambda x, t: batchkl_ext.kl_div(x, t, reduction="sum"),
             lambda x, t: F.kl_div(x, t, reduction="sum"),
             PROBS_TARGET, SCALAR, _liger_kl("sum", False), over_rows=SUM_ROWS),
        Case("none", "drop-in: reduction='none' (elementwise), probability targets",
             lambda x, t: batchkl_ext.kl_div(x, t, reduction="none"),
             lambda x, t: F.kl_div(x, t, reduction="none"),
             # Liger: its elementwise loss in float32 (2 units in bf16), the
             # gradient, and the gradient times the upstream one.
             PROBS_TARGET, ELEMENTWISE, _liger_kl("none", False), eager_temporaries=4, compile_temporaries=2,
             liger_temporaries=4),
        Case("row", "per-row KL: reduction='row' vs F.kl_div(reduction='none').sum(-1)",
             lambda x, t: batchkl_ext.kl_div(x, t, reduction="row"),
             lambda x, t: F.kl_div(x, t, reduction="none").sum(-1),
             PROBS_TARGET, PER_ROW),
        Case("logits_kl", "kl_div_with_logits (batchmean) vs F.kl_div(log_softmax(x), log_softmax(t), log_target=True)",
             lambda x, t: batchkl_ext.kl_div_with_logits(x, t, reduction="batchmean"),
             lambda x, t: _composite_logits_kl(x, t, "batchmean"),
             LOGITS, SCALAR, _liger_kl("batchmean", True, logits=True), over_rows=MEAN_ROWS,
             eager_temporaries=5, compile_temporaries=3, liger_temporaries=4),
        Case("logits_kl_row", "kl_div_with_logits (reduction='none': per row) vs the composite formula summed per row",
             lambda x, t: batchkl_ext.kl_div_with_logits(x, t, reduction="none"),
             lambda x, t: _composite_logits_kl(x, t, "none").sum(-1),
             LOGITS, PER_ROW, eager_temporaries=5, compile_temporaries=3),
        Case("logits_jsd", f"jsd_with_logits (beta={JSD_BETA}, batchmean) vs TRL's generalized_jsd_loss formula",
             lambda x, t: batchkl_ext.jsd_with_logits(x, t, beta=JSD_BETA, reduction="batchmean"),
             # Eager measured 12.25 (float32) and 12.5 (bf16); Liger 4, plus the
             # float32 per-element loss some of its versions allocate.
             _trl_jsd, LOGITS, SCALAR, _liger_jsd, over_rows=MEAN_ROWS,
             eager_temporaries=13, compile_temporaries=8, liger_temporaries=6),
    )
}
