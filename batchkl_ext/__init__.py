"""batchkl: fused KL divergence between batches of distributions.

Importing this package loads the compiled library, which registers
``torch.ops.batchkl.kl``; the front doors below call it.
"""
import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.batchkl.*)
from . import ops  # noqa: F401  (registers the fake kernels)
from .ops import KLDivLoss, kl_div

__all__ = ["kl_div", "KLDivLoss"]
__version__ = "0.1.0"
