"""Python layer of ``torch.ops.batchkl``: fake kernels and the front doors.

The kernels and the autograd formula are registered in C++ (csrc/); this
module adds what only Python can: the fake (meta) kernels that let
``torch.compile`` and ``torch.export`` trace the ops, and the drop-in
``kl_div`` / ``KLDivLoss`` API of ``torch.nn.functional.kl_div``.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss

_REDUCTIONS = ("none", "sum", "mean", "batchmean", "row")


# --- fake kernels ----------------------------------------------------------
# They mirror csrc/kl_host.cpp: output shapes, dtypes and layouts, and the
# argument errors that can be told from metadata alone.

def _check_args(input: Tensor, target: Tensor, reduction: str):
    for name, t in (("input", input), ("target", target)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"batchkl.kl: argument '{name}' must have a floating-point dtype "
                            f"(float32, float64, float16 or bfloat16), got {t.dtype}")
    if input.device != target.device:
        raise RuntimeError(f"batchkl.kl: 'input' and 'target' must be on the same device, got input on "
                           f"{input.device} and target on {target.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"batchkl.kl: argument 'reduction' must be one of 'none', 'sum', 'mean', "
                         f"'batchmean', 'row', got '{reduction}'")
    if reduction == "row" and max(input.dim(), target.dim()) == 0:
        raise ValueError("batchkl.kl: reduction='row' needs tensors with at least one dimension "
                         f"(the distribution dim), got input of shape {tuple(input.shape)} and "
                         f"target of shape {tuple(target.shape)}")
    try:
        return torch.broadcast_shapes(input.shape, target.shape), torch.result_type(input, target)
    except RuntimeError as e:
        raise ValueError(f"batchkl.kl: 'input' of shape {tuple(input.shape)} and 'target' of shape "
                         f"{tuple(target.shape)} do not broadcast: {e}") from None


def _fake_loss(input: Tensor, target: Tensor, reduction: str):
    shape, dtype = _check_args(input, target, reduction)
    if reduction == "none":
        # TensorIterator's layout for (target, input), as the real kernel uses.
        return torch.empty_like(torch.add(target, input), dtype=dtype)
    if reduction == "row":
        return input.new_empty(shape[:-1], dtype=dtype)
    return input.new_empty((), dtype=dtype)


@torch.library.register_fake("batchkl::kl")
def _kl_fake(input, target, reduction="mean", log_target=False):
    return _fake_loss(input, target, reduction)


@torch.library.register_fake("batchkl::kl_fused")
def _kl_fused_fake(input, target, reduction, log_target, grad_input, grad_target):
    loss = _fake_loss(input, target, reduction)
    shape = torch.broadcast_shapes(input.shape, target.shape)
    fused = reduction != "none"

    def grad(want):
        return input.new_empty(shape if want and fused else (0,), dtype=loss.dtype)

    return loss, grad(grad_input), grad(grad_target)


@torch.library.register_fake("batchkl::kl_none_backward")
def _kl_none_backward_fake(grad, input, target, log_target, grad_input, grad_target):
    _, dtype = _check_args(input, target, "none")

    def out(want):
        return torch.empty_like(grad, dtype=dtype) if want else grad.new_empty((0,), dtype=dtype)

    return out(grad_input), out(grad_target)


@torch.library.register_fake("batchkl::kl_scale_")
def _kl_scale_fake(grad, scale):
    return None


# --- front doors -----------------------------------------------------------

def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    # torch.nn._reduction.legacy_get_string warns exactly as F.kl_div does.
    from torch.nn import _reduction
    return _reduction.legacy_get_string(size_average, reduce)


def kl_div(input: Tensor, target: Tensor, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
           reduction: str = "mean", log_target: bool = False) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.kl_div`, plus ``reduction='row'``.

    Same signature, broadcasting, dtype promotion, results and warnings as
    ``F.kl_div``, with two deliberate differences: where the target
    probability is exactly 0 the loss and gradients are 0 (PyTorch gives NaN
    there), and ``reduction='row'`` returns the KL of each distribution
    (summed over the last dim, shape ``broadcast_shape[:-1]``).
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"batchkl_ext.kl_div: 'input' and 'target' must be tensors, got "
                        f"{type(input).__name__} and {type(target).__name__}")
    if not isinstance(reduction, str):
        raise TypeError(f"batchkl_ext.kl_div: 'reduction' must be a str, got {type(reduction).__name__}")
    if size_average is not None or reduce is not None:
        # As F.kl_div: the legacy flags pick none / mean / sum, and an explicit
        # 'batchmean' still divides that result by the batch size.
        loss = torch.ops.batchkl.kl(input, target, _legacy_reduction(size_average, reduce), bool(log_target))
        return loss / input.size(0) if reduction == "batchmean" and input.dim() != 0 else loss
    if reduction == "mean" and not torch.compiler.is_compiling():
        # Dynamo cannot trace warnings.warn (fullgraph=True would fail); the
        # warning is for eager users reading their code anyway.
        warnings.warn(
            "reduction: 'mean' divides the total loss by both the batch size and the support size."
            "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
            "'mean' will be changed to behave the same as 'batchmean' in the next major release.",
            stacklevel=2,
        )
    return torch.ops.batchkl.kl(input, target, reduction, bool(log_target))


class KLDivLoss(_Loss):
    """Drop-in for :class:`torch.nn.KLDivLoss` backed by ``torch.ops.batchkl.kl``."""

    __constants__ = ["reduction"]

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)
