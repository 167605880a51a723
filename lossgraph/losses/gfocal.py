"""Generalized Focal Loss (gfocal_loss.py): QualityFocalLoss and DistributionFocalLoss.

Both are row losses: QFL sums its per-class terms over the C columns, DFL is a two-point softmax
cross-entropy over the n+1 bins. Each is one kernel: the row reductions and the gradient that
needs them run in the same pass over the row.
"""
from __future__ import annotations

import torch

from ..build import check, is_labels, row_input
from ..errors import ConfigAssertion, InputAssertion
from ..inputs import FLOATS, INTS, compute_dtype, fail, target_form
from ..registry import register_loss
from ..symbolic import (abs, bce_with_logits, binary_cross_entropy, class_index, floor,
                        logsumexp, rowsum, sigmoid, sign, take, where)

QFL_SCORE = "score"     # the per-row IoU quality of the tuple target
DFL_TARGET = "distance"  # DFL's float target, one value per row


def _qfl_target(spec, call, target):
    """The tuple target (labels (N,), scores (N,)) or, since v3, a dense (N, C) soft target."""
    pred = call.pred
    if isinstance(target, torch.Tensor):
        call.target_form = target_form(spec.name, "dense", pred, target)
        call.tensors["target"] = target
        return
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        fail(spec.name, "target for QFL must be a tuple of two elements, including category "
                        "label and quality label, respectively (or a dense (N, C) tensor)",
             InputAssertion)
    labels, score = target
    rows = tuple(pred.shape[:-1])
    for what, t, dtypes in (("labels", labels, INTS), ("scores", score, FLOATS)):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            fail(spec.name, f"the {what} of the target tuple must be a "
                            f"{'integer' if dtypes is INTS else 'floating'} tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != rows:
            fail(spec.name, f"the {what} of the target tuple have shape {tuple(t.shape)}, "
                            f"expected {rows} for pred of shape {tuple(pred.shape)}")
        if t.device != pred.device:
            fail(spec.name, f"the {what} are on {t.device} but pred is on {pred.device}")
    call.target_form = "labels"
    call.tensors["label"] = labels
    call.tensors[QFL_SCORE] = score.to(compute_dtype(pred.dtype))


@register_loss("QualityFocalLoss", target="labels", hooks={"bind_target": _qfl_target},
               _builtin=True)
def quality_focal_loss(pred, target, use_sigmoid: bool = True, beta: float = 2.0,
                       activated: bool = False):
    """sum over C of BCE(x, t) |t - sigmoid(x)|^beta, one value per row, then the (N,) weight.

    Tuple target (labels, scores): t = score at the label's column for labels in [0, C), 0
    elsewhere (labels < 0 or >= C are all-negative rows); dense target: t as given (elements
    with t != 0 are the positives). For t = 0 the term is BCE(x, 0) sigmoid(x)^beta, exactly
    MMDetection's negative term. `activated=True` takes probabilities and binary_cross_entropy.
    """
    check(use_sigmoid is True, "Only sigmoid in QFL supported now.", ConfigAssertion)
    if is_labels(target):
        t = where(target == class_index(pred), row_input(QFL_SCORE), 0.0)
    else:
        t = target
    p = pred if activated else sigmoid(pred)
    bce = binary_cross_entropy(pred, t) if activated else bce_with_logits(pred, t)
    return rowsum(bce * abs(t - p) ** beta)


def _dfl_target(spec, call, target):
    """A float distance per row, 0 <= y < n (n + 1 bins); out-of-range ones are checked on CPU."""
    pred = call.pred
    if not isinstance(target, torch.Tensor) or target.dtype not in FLOATS:
        fail(spec.name, f"target must be a floating tensor of distances, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(pred.shape[:-1]):
        fail(spec.name, f"target of shape {tuple(target.shape)} does not match pred of shape "
                        f"{tuple(pred.shape)}: expected {tuple(pred.shape[:-1])}")
    if target.device != pred.device:
        fail(spec.name, f"target is on {target.device} but pred is on {pred.device}")
    if target.device.type == "cpu" and target.numel() and not _bins_in_range(target, call.width):
        # F.cross_entropy raises for the bins trunc(y) and trunc(y) + 1 outside [0, n]
        left = target.detach().trunc()
        if bool(torch.isnan(target).any()) or float(left.min()) < 0 or \
                float(left.max()) > call.width - 2:
            fail(spec.name, f"targets must lie in [0, {call.width - 1}) for {call.width} bins, "
                            f"got values in [{float(target.min())}, {float(target.max())}]")
    call.target_form = "dense"
    call.tensors[DFL_TARGET] = target.to(compute_dtype(pred.dtype))
    # the bin weights (l + 1 - y, y - l) are in the target's dtype, so it promotes the result
    call.out_dtype = torch.promote_types(call.out_dtype, target.dtype)


def _bins_in_range(target: torch.Tensor, width: int) -> bool:
    """0 <= trunc(y) <= width - 2 for every y (no NaN), i.e. -1 < y < width - 1, in one native
    pass; False when that pass does not apply (then the torch check above decides)."""
    from ..backends.cpp import in_open_range
    return bool(in_open_range(target.detach(), -1.0, width - 1.0))


@register_loss("DistributionFocalLoss", target="dense", hooks={"bind_target": _dfl_target},
               _builtin=True)
def distribution_focal_loss(pred, target):
    """CE(x, l) (l + 1 - y) + CE(x, l + 1) (y - l), l = y.long() (truncation), softmax over bins.

    The two cross-entropies share one row logsumexp. Targets must satisfy 0 <= l and l + 1 <= n
    (F.cross_entropy raises otherwise; checked here for CPU tensors, unchecked on GPU).
    """
    y = row_input(DFL_TARGET)
    left = sign(y) * floor(abs(y))          # torch's .long() truncates toward zero
    right = left + 1
    lse = logsumexp(pred)
    return (lse - take(pred, left)) * (right - y) + (lse - take(pred, right)) * (y - left)
