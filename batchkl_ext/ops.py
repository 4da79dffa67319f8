"""Python layer of ``torch.ops.batchkl``: fake kernels and the front doors.

The kernels and the autograd formulas are registered in C++ (csrc/); this
module adds what only Python can: the fake (meta) kernels that let
``torch.compile`` and ``torch.export`` trace the ops, the drop-in
``kl_div`` / ``KLDivLoss`` API of ``torch.nn.functional.kl_div``, and the
distillation front doors ``kl_div_with_logits`` / ``jsd_with_logits`` /
``kl_divergence``.
"""
import math
import numbers
import warnings
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss
from torch.overrides import handle_torch_function, has_torch_function_variadic

_REDUCTIONS = ("none", "sum", "mean", "batchmean", "row")


# --- fake kernels ----------------------------------------------------------
# They mirror csrc/kl_host.cpp: output shapes, dtypes and layouts, and the
# argument errors that can be told from metadata alone.

def _check_pair(op: str, input: Tensor, target: Tensor, names=("input", "target")):
    for name, t in zip(names, (input, target)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: argument '{name}' must have a floating-point dtype "
                            f"(float32, float64, float16 or bfloat16), got {t.dtype}")
    if input.device != target.device:
        raise RuntimeError(f"{op}: '{names[0]}' and '{names[1]}' must be on the same device, got "
                           f"{names[0]} on {input.device} and {names[1]} on {target.device}")


def _check_args(input: Tensor, target: Tensor, reduction: str):
    _check_pair("batchkl.kl", input, target)
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


def _fake_grad_scale(like: Tensor, dtype: torch.dtype, scalar: bool, wanted: bool) -> Tensor:
    # kl.h's grads_of_sum: float16 gradients of a scalar reduction are those
    # of the sum, and come with their factor (1 / divisor), 0-d float32.
    return like.new_empty(() if dtype == torch.float16 and scalar and wanted else (0,), dtype=torch.float32)


@torch.library.register_fake("batchkl::kl_fused")
def _kl_fused_fake(input, target, reduction, log_target, grad_input, grad_target):
    loss = _fake_loss(input, target, reduction)
    shape = torch.broadcast_shapes(input.shape, target.shape)
    fused = reduction != "none"

    def grad(want):
        return input.new_empty(shape if want and fused else (0,), dtype=loss.dtype)

    scalar = reduction not in ("none", "row")
    return (loss, grad(grad_input), grad(grad_target),
            _fake_grad_scale(input, loss.dtype, scalar, grad_input or grad_target))


@torch.library.register_fake("batchkl::kl_none_backward")
def _kl_none_backward_fake(grad, input, target, log_target, grad_input, grad_target):
    _, dtype = _check_args(input, target, "none")

    def out(want):
        return torch.empty_like(grad, dtype=dtype) if want else grad.new_empty((0,), dtype=dtype)

    return out(grad_input), out(grad_target)


@torch.library.register_fake("batchkl::kl_scale_")
def _kl_scale_fake(grad, scale):
    return None


_LOGITS_OP = "batchkl.kl_with_logits"
_LOGITS_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check_logits_args(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs, dtype):
    _check_pair(_LOGITS_OP, input, target)
    if input.dim() < 1:
        raise ValueError(f"{_LOGITS_OP}: 'input' and 'target' must have at least one dimension (the "
                         f"distribution dim), got shape {tuple(input.shape)}")
    if input.shape != target.shape:
        raise ValueError(f"{_LOGITS_OP}: 'input' and 'target' must have the same shape, got "
                         f"{tuple(input.shape)} and {tuple(target.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{_LOGITS_OP}: argument 'beta' must be in [0, 1], got {beta}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"{_LOGITS_OP}: argument 'temperature' must be a finite number > 0, got {temperature}")
    if reduction not in _LOGITS_REDUCTIONS:
        raise ValueError(f"{_LOGITS_OP}: argument 'reduction' must be one of 'none', 'sum', 'mean', "
                         f"'batchmean' ('none' gives one value per row), got '{reduction}'")
    if probs and temperature != 1.0:
        raise ValueError(f"{_LOGITS_OP}: probs=True needs temperature=1.0, got {temperature}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{_LOGITS_OP}: argument 'mask' must be a bool tensor, got {mask.dtype}")
        if mask.shape != input.shape[:-1]:
            raise ValueError(f"{_LOGITS_OP}: argument 'mask' must have the row shape "
                             f"{tuple(input.shape[:-1])} (input.shape[:-1]), got {tuple(mask.shape)}")
        if mask.device != input.device:
            raise RuntimeError(f"{_LOGITS_OP}: argument 'mask' must be on {input.device}, got {mask.device}")
    if num_items_in_batch is not None:
        n = num_items_in_batch
        if n.numel() != 1 or n.dim() > 1:
            raise ValueError(f"{_LOGITS_OP}: argument 'num_items_in_batch' must be a single number, got a "
                             f"tensor of shape {tuple(n.shape)}")
        if n.dtype.is_complex or n.dtype == torch.bool:
            raise TypeError(f"{_LOGITS_OP}: argument 'num_items_in_batch' must be a real number, got {n.dtype}")
        if n.device.type != "cpu" and n.device != input.device:
            raise RuntimeError(f"{_LOGITS_OP}: argument 'num_items_in_batch' must be on the CPU or on "
                               f"{input.device}, got {n.device}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{_LOGITS_OP}: argument 'dtype' must be a floating-point dtype, got {dtype}")
    return torch.result_type(input, target)


def _fake_logits_loss(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs, dtype):
    promoted = _check_logits_args(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs,
                                  dtype)
    shape = input.shape[:-1] if reduction == "none" and num_items_in_batch is None else ()
    return input.new_empty(shape, dtype=dtype or promoted), promoted


@torch.library.register_fake("batchkl::kl_with_logits")
def _kl_with_logits_fake(input, target, beta=0.0, temperature=1.0, reduction="batchmean", mask=None,
                         num_items_in_batch=None, probs=False, dtype=None):
    return _fake_logits_loss(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs, dtype)[0]


@torch.library.register_fake("batchkl::kl_with_logits_fused")
def _kl_with_logits_fused_fake(input, target, beta, temperature, reduction, mask, num_items_in_batch, probs,
                               grad_input, grad_target, dtype=None):
    loss, promoted = _fake_logits_loss(input, target, beta, temperature, reduction, mask, num_items_in_batch,
                                       probs, dtype)

    def grad(want):
        # Dense (contiguous) in the inputs' shape and promoted dtype, as the kernel allocates them.
        return input.new_empty(input.shape if want else (0,), dtype=promoted)

    scalar = reduction != "none" or num_items_in_batch is not None
    return (loss, grad(grad_input), grad(grad_target),
            _fake_grad_scale(input, promoted, scalar, grad_input or grad_target))


# --- front doors -----------------------------------------------------------
# Each first hands its call to __torch_function__ where an argument or a mode
# has one, as torch.nn.functional does: torch.fx's Proxy (not a Tensor) then
# records the front door as one node, and Tensor subclasses and
# TorchFunctionModes see it where they would see F.kl_div.

# F.kl_div's warnings, word for word (those of torch.nn._reduction included).
_MEAN_WARNING = ("reduction: 'mean' divides the total loss by both the batch size and the support size."
                 "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                 "'mean' will be changed to behave the same as 'batchmean' in the next major release.")
_ELEMENTWISE_MEAN_WARNING = "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."
_LEGACY_WARNING = "size_average and reduce args will be deprecated, please use reduction='{}' instead."

# Dynamo cannot trace warnings.warn in code outside torch (fullgraph=True would
# fail): under torch.compile the front doors skip their warnings, which are for
# eager users reading their code anyway.


def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """torch.nn._reduction.legacy_get_string, with its warning, in plain Python:
    dynamo takes a call to that torch.* function for an op returning a str and
    fails (fullgraph=True) or breaks the graph there."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
    if not torch.compiler.is_compiling():
        warnings.warn(_LEGACY_WARNING.format(reduction), stacklevel=3)
    return reduction


def kl_div(input: Tensor, target: Tensor, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
           reduction: str = "mean", log_target: bool = False) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.kl_div`, plus ``reduction='row'``.

    Same signature, broadcasting, dtype promotion, results and warnings as
    ``F.kl_div`` (the legacy ``size_average`` / ``reduce`` flags and the
    deprecated ``reduction='elementwise_mean'`` included; under
    ``torch.compile`` the warnings are skipped), with two deliberate
    differences: where the target
    probability is exactly 0 the loss and gradients are 0 (PyTorch gives NaN
    there), and ``reduction='row'`` returns the KL of each distribution
    (summed over the last dim, shape ``broadcast_shape[:-1]``).
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(kl_div, (input, target), input, target, size_average=size_average,
                                     reduce=reduce, reduction=reduction, log_target=log_target)
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
    if reduction == "elementwise_mean":
        # F.kl_div's (torch.nn._reduction.get_enum's) deprecated alias of
        # 'mean', with its warning and not the 'mean' one, as there.
        if not torch.compiler.is_compiling():
            warnings.warn(_ELEMENTWISE_MEAN_WARNING, stacklevel=2)
        reduction = "mean"
    elif reduction == "mean" and not torch.compiler.is_compiling():
        warnings.warn(_MEAN_WARNING, stacklevel=2)
    return torch.ops.batchkl.kl(input, target, reduction, bool(log_target))


class KLDivLoss(_Loss):
    """Drop-in for :class:`torch.nn.KLDivLoss` backed by ``torch.ops.batchkl.kl``."""

    __constants__ = ["reduction", "_mean_warning", "_elementwise_mean_warning"]
    _mean_warning = _MEAN_WARNING     # (TorchScript reads no global str)
    _elementwise_mean_warning = _ELEMENTWISE_MEAN_WARNING

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript (a scripted model holding this module, as it may
            # hold nn.KLDivLoss) compiles only this branch: kl_div's Python
            # is beyond it, the op is not. The legacy flags are already folded
            # into self.reduction by _Loss.
            reduction = self.reduction
            if reduction == "elementwise_mean":
                warnings.warn(self._elementwise_mean_warning)
                reduction = "mean"
            elif reduction == "mean":
                warnings.warn(self._mean_warning)
            return torch.ops.batchkl.kl(input, target, reduction, self.log_target)
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


# --- distillation front doors ---------------------------------------------

def _num_items_tensor(num_items_in_batch) -> Optional[Tensor]:
    """The op takes a tensor: a Python number becomes a CPU float64 scalar."""
    if num_items_in_batch is None or isinstance(num_items_in_batch, Tensor):
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"{_LOGITS_OP}: argument 'num_items_in_batch' must be an int, a float or a 0-d tensor, "
                        f"got {type(num_items_in_batch).__name__}")
    if not num_items_in_batch > 0:
        raise ValueError(f"{_LOGITS_OP}: argument 'num_items_in_batch' must be > 0, got {num_items_in_batch}")
    return torch.tensor(float(num_items_in_batch), dtype=torch.float64)


def _real_arg(fn: str, name: str, value) -> float:
    """``beta`` / ``temperature`` as the op's float: a Python real number (not
    a bool) or a one-element tensor of a real dtype; anything else is an error
    naming the argument, where float() would accept a str or fail saying
    nothing of which argument."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"batchkl_ext.{fn}: argument '{name}' must be a real number, got a tensor of dtype "
                            f"{value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"batchkl_ext.{fn}: argument '{name}' must be a single number, got a tensor of "
                             f"shape {tuple(value.shape)}")
    elif isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"batchkl_ext.{fn}: argument '{name}' must be a real number (an int, a float or a "
                        f"one-element tensor), got {type(value).__name__}"
                        + (f" {value!r}" if isinstance(value, (str, bool)) else ""))
    return float(value)


def _check_tensors(fn: str, **tensors):
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"batchkl_ext.{fn}: argument '{name}' must be a tensor, got {type(t).__name__}")


def kl_div_with_logits(input: Tensor, target: Tensor, *, temperature: float = 1.0, reduction: str = "batchmean",
                       mask: Optional[Tensor] = None,
                       num_items_in_batch: Union[int, float, Tensor, None] = None) -> Tensor:
    """KL(softmax(target / T) || softmax(input / T)) per row, fused.

    ``input`` are the student's logits and ``target`` the teacher's, both
    ``(..., V)``. For ``'sum'``, ``'mean'`` and ``'batchmean'`` the result equals
    ``F.kl_div(F.log_softmax(input / T, -1), F.log_softmax(target / T, -1),
    reduction=reduction, log_target=True)``; ``'none'`` gives one value per
    row (shape ``input.shape[:-1]``). No ``T**2`` factor is applied: multiply
    by it yourself where your recipe wants it.

    ``mask`` (bool, ``input.shape[:-1]``) drops rows: they contribute 0 loss
    and 0 gradient whatever they hold; ``'batchmean'`` then divides by the
    number of kept rows (at least 1) and ``'mean'`` by that times V.
    ``num_items_in_batch`` (a number or a 0-d tensor, e.g. the token count of
    a gradient-accumulation step) makes the result the sum over kept rows
    divided by it, whatever ``reduction`` says.

    A ``-inf`` logit (a masked vocabulary entry) has probability 0 and
    contributes 0. The log-softmax of both inputs is computed inside the
    kernel: the only N x V memory is the gradient it returns.
    """
    if has_torch_function_variadic(input, target, mask, num_items_in_batch):
        return handle_torch_function(kl_div_with_logits, (input, target, mask, num_items_in_batch), input, target,
                                     temperature=temperature, reduction=reduction, mask=mask,
                                     num_items_in_batch=num_items_in_batch)
    _check_tensors("kl_div_with_logits", input=input, target=target)
    temperature = _real_arg("kl_div_with_logits", "temperature", temperature)
    return torch.ops.batchkl.kl_with_logits(input, target, 0.0, temperature, reduction, mask,
                                            _num_items_tensor(num_items_in_batch))


def jsd_with_logits(input: Tensor, target: Tensor, *, beta: float = 0.5, temperature: float = 1.0,
                    reduction: str = "batchmean", mask: Optional[Tensor] = None,
                    num_items_in_batch: Union[int, float, Tensor, None] = None) -> Tensor:
    """The generalized Jensen-Shannon divergence of GKD, from logits, fused.

    With P = softmax(target / T) (teacher) and Q = softmax(input / T)
    (student): ``beta = 0`` is KL(P || Q), ``beta = 1`` is KL(Q || P), and in
    between ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with
    ``M = beta * P + (1 - beta) * Q`` -- the convention and results of TRL's
    ``GKDTrainer.generalized_jsd_loss`` (its ``labels != -100`` is ``mask``
    here). As there, ``'batchmean'`` is the mean over rows (tokens): the sum
    over kept rows divided by their number, with or without a mask. Without
    a mask that number is ``input.numel() / V`` whatever the rank: TRL's
    ``B * T`` for its 3-D inputs, 1 for a single ``(V,)`` row, ``B * H * T``
    for ``(B, H, T, V)`` (where TRL would divide by ``B * H``), N for
    ``(N, V)`` (where TRL would divide by N * V). ``'none'`` gives one value
    per row where TRL returns elementwise ones. ``mask`` and
    ``num_items_in_batch`` as in :func:`kl_div_with_logits`. ``beta`` and
    ``temperature`` are real numbers (or one-element tensors).
    """
    if has_torch_function_variadic(input, target, mask, num_items_in_batch):
        return handle_torch_function(jsd_with_logits, (input, target, mask, num_items_in_batch), input, target,
                                     beta=beta, temperature=temperature, reduction=reduction, mask=mask,
                                     num_items_in_batch=num_items_in_batch)
    _check_tensors("jsd_with_logits", input=input, target=target)
    beta = _real_arg("jsd_with_logits", "beta", beta)
    temperature = _real_arg("jsd_with_logits", "temperature", temperature)
    num_items = _num_items_tensor(num_items_in_batch)
    if reduction == "batchmean" and mask is None and num_items is None and input.dim() != 2:
        # TRL's unmasked 'batchmean' is per token: the number of rows, B * T
        # for (B, T, V) and 1 for one (V,) row, where F.kl_div's, which the op
        # follows, divides by input.size(0) alone. The count is built from the
        # sizes by a traced op (aten.scalar_tensor), not by torch.tensor of a
        # Python number: torch.export keeps it symbolic in dynamic dims and
        # torch.jit.trace records it from aten::size, where a constant would
        # bake in the traced shape. (A CPU float64 number, read by the op on
        # the host without a sync; nothing of size N x V is made.)
        num_items = torch.scalar_tensor(math.prod(input.shape[:-1]), dtype=torch.float64)
    return torch.ops.batchkl.kl_with_logits(input, target, beta, temperature, reduction, mask, num_items)


_KINDS = ("probs", "log_probs", "logits")


def kl_divergence(p: Tensor, q: Tensor, *, kind: str = "probs", dim: int = -1) -> Tensor:
    """KL(p || q) of each distribution along ``dim``: the answer to "KL
    divergence between two batches of distributions", with no N x K temporary.

    ``kind`` says what ``p`` and ``q`` hold:

    * ``"probs"``: probabilities, normalised per row first, so unnormalised
      counts work and exact zeros are fine (0 log 0 = 0, no epsilon, no NaN);
    * ``"log_probs"``: log-probabilities (used as given);
    * ``"logits"``: unnormalised log-probabilities, softmax-ed per row.

    The result has ``p``'s shape without ``dim``; gradients flow to both.
    """
    if has_torch_function_variadic(p, q):
        return handle_torch_function(kl_divergence, (p, q), p, q, kind=kind, dim=dim)
    _check_tensors("kl_divergence", p=p, q=q)
    if kind not in _KINDS:
        raise ValueError(f"batchkl_ext.kl_divergence: argument 'kind' must be one of 'probs', 'log_probs', "
                         f"'logits', got {kind!r}")
    _check_pair("batchkl_ext.kl_divergence", p, q, names=("p", "q"))
    if p.shape != q.shape:
        raise ValueError(f"batchkl_ext.kl_divergence: 'p' and 'q' must have the same shape, got "
                         f"{tuple(p.shape)} and {tuple(q.shape)}")
    if p.dim() == 0:
        raise ValueError("batchkl_ext.kl_divergence: 'p' and 'q' must have at least one dimension (the "
                         f"distribution dim), got shape {tuple(p.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"batchkl_ext.kl_divergence: argument 'dim' must be an int, got {type(dim).__name__}"
                        + (f" {dim!r}" if isinstance(dim, (bool, float, str)) else ""))
    dim = int(dim)
    if not -p.dim() <= dim < p.dim():
        raise IndexError(f"batchkl_ext.kl_divergence: argument 'dim' must be in [{-p.dim()}, {p.dim() - 1}] "
                         f"for tensors of shape {tuple(p.shape)}, got {dim}")
    # A view: the kernels take any strides.
    p, q = p.movedim(dim, -1), q.movedim(dim, -1)
    if kind == "log_probs":
        return torch.ops.batchkl.kl(q, p, "row", True)
    return torch.ops.batchkl.kl_with_logits(q, p, 0.0, 1.0, "none", None, None, kind == "probs")
