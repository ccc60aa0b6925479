"""How rdiag evaluates ``loss_fn(output, target)``: loss kinds and sequence outputs.

Every loss rdiag evaluates (the curvature operators' batch loss, the Monitor's
probe loss and gradient norm, the training loop of the harness) goes through
:func:`apply_loss`, so one rule holds everywhere:

* **Sequence outputs.** ``F.cross_entropy`` and ``nn.CrossEntropyLoss`` take the
  class axis second (``(N, C, T)``), while language models return ``(N, T, V)``
  logits with ``(N, T)`` token targets. When ``loss_fn`` is one of them, the
  targets are class indices of shape ``output.shape[:-1]`` and torch's own layout
  does not fit (``target.shape != (N, *output.shape[2:])``), the class axis is
  taken to be the last one: the loss is the cross-entropy over every position
  (the mean over the targets that are not ``ignore_index``, -100 by default),
  with no wrapper needed.

  .. warning::
      When both layouts fit (``(N, T, T)`` logits, sequence length equal to the
      vocabulary size) torch's layout is used, as ``F.cross_entropy`` itself would.

* **Causal language models.** Targets are aligned with the logits: ``target[:,
  t]`` is the label that ``output[:, t]`` is scored against. A causal LM scores
  position ``t`` against token ``t + 1``, so the caller shifts: ``target[:, :-1] =
  input_ids[:, 1:]`` and ``target[:, -1] = -100`` (ignored). Hugging Face models
  shift inside the model when they are called with ``labels=``; rdiag never calls
  them with labels, so its probe ``(inputs, targets)`` takes the shifted targets
  (:func:`shift_labels`; the Hugging Face callback builds them from ``labels`` or
  ``input_ids``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._checks import check_scalar_loss
from rdiag._typing import LossFn

LossKind = Literal["mse", "cross_entropy", "autodiff"]
LOSS_KINDS = ("mse", "cross_entropy", "autodiff")
#: The target value that cross-entropy ignores by default (torch and Hugging Face).
IGNORE_INDEX = -100


def infer_loss_kind(loss_fn: LossFn) -> LossKind:
    """Recognize ``mse_loss`` / ``cross_entropy`` (function or module, mean reduction).

    Args:
        loss_fn: The loss.

    Returns:
        ``"mse"``, ``"cross_entropy"``, or ``"autodiff"`` for anything else
        (including modules with class weights or label smoothing).
    """
    if loss_fn is F.mse_loss or (
        isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean"
    ):
        return "mse"
    if loss_fn is F.cross_entropy or (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and loss_fn.reduction == "mean"
        and loss_fn.weight is None
        and loss_fn.label_smoothing == 0.0
    ):
        return "cross_entropy"
    return "autodiff"


def ignore_index(loss_fn: LossFn) -> int:
    """The target value a cross-entropy loss ignores."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.ignore_index
    return IGNORE_INDEX


def class_axis(loss_fn: LossFn, output: Tensor, target: Tensor) -> int:
    """The class axis of a cross-entropy ``loss_fn`` on these shapes (see the module).

    Args:
        loss_fn: The loss.
        output: Raw outputs ``(N, *out)``.
        target: Targets.

    Returns:
        ``-1`` (``output.dim() - 1``) for a cross-entropy with sequence outputs
        ``(N, ..., V)`` and index targets ``(N, ...)`` that torch's layout rejects;
        ``1`` otherwise (torch's layout, and every other loss).
    """
    if not (loss_fn is F.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss)):
        return 1
    if output.dim() < 3 or target.is_floating_point():
        return 1
    torch_layout = (output.shape[0], *output.shape[2:])
    if tuple(target.shape) == tuple(output.shape[:-1]) != torch_layout:
        return output.dim() - 1
    return 1


def apply_loss(loss_fn: LossFn, output: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(output, target)``, with the class axis moved for sequence outputs.

    Args:
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        output: Raw outputs ``(N, *out)``, e.g. ``(N, T, V)`` logits.
        target: Targets, e.g. ``(N, T)`` token ids.

    Returns:
        The loss (a scalar for a mean reduction).

    Example:
        >>> logits, tokens = torch.randn(2, 5, 11), torch.randint(11, (2, 5))
        >>> flat = F.cross_entropy(logits.reshape(10, 11), tokens.reshape(10))
        >>> bool(torch.isclose(apply_loss(F.cross_entropy, logits, tokens), flat))
        True
    """
    axis = class_axis(loss_fn, output, target)
    if axis != 1:
        output = output.movedim(axis, 1)
    return loss_fn(output, target)


def checked_loss(loss_fn: LossFn, output: Tensor, target: Tensor) -> Tensor:
    """:func:`apply_loss`, checked: it runs on these shapes and gives a scalar.

    Args:
        loss_fn: The loss.
        output: Raw outputs ``(N, *out)``.
        target: Targets.

    Returns:
        The scalar loss.

    Raises:
        ValueError: ``loss_fn`` fails on these shapes (the message names both) or
            does not reduce to a scalar.
    """
    try:
        loss = apply_loss(loss_fn, output, target)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ValueError(
            f"expected probe targets that fit the model's outputs, got outputs "
            f"{tuple(output.shape)} and targets {tuple(target.shape)} "
            f"{str(target.dtype).replace('torch.', '')} ({first}); pass targets of "
            "the outputs' shape for mse_loss, class indices (N,) or (N, T) for "
            "cross_entropy"
        ) from err
    check_scalar_loss(loss)
    return loss


def shift_labels(labels: Tensor, ignore: int = IGNORE_INDEX) -> Tensor:
    """Targets aligned with a causal LM's logits: ``labels`` shifted left by one.

    Args:
        labels: ``(N, T)`` token labels (``input_ids``, or ``labels`` with ``-100``
            where no loss is taken).
        ignore: The value of the last position, which has no next token.

    Returns:
        ``(N, T)``: ``out[:, t] = labels[:, t + 1]``, ``out[:, -1] = ignore``.

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7]])).tolist()
        [[6, 7, -100]]
    """
    pad = torch.full_like(labels[:, :1], ignore)
    return torch.cat([labels[:, 1:], pad], dim=1)
