"""batchkl: fused KL divergence between batches of distributions.

Importing this package loads the compiled library, which registers
``torch.ops.batchkl.kl`` and ``torch.ops.batchkl.kl_with_logits``; the
front doors below call them.
"""
import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.batchkl.*)
from . import ops  # noqa: F401  (registers the fake kernels)
from .ops import KLDivLoss, jsd_with_logits, kl_div, kl_div_with_logits, kl_divergence

__all__ = ["kl_div", "KLDivLoss", "kl_div_with_logits", "jsd_with_logits", "kl_divergence"]
__version__ = "0.1.0"
