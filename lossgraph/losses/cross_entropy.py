"""CrossEntropyLoss (cross_entropy_loss.py): softmax over C+1 classes or per-class sigmoid BCE."""
from __future__ import annotations

import warnings

import torch

from ..build import check, is_labels, per_class
from ..inputs import check_label_range
from ..registry import register_loss
from ..symbolic import bce_with_logits, logsumexp, one_hot, take, to_float, where

FORWARD = ("cls_score", "label", "weight=None", "avg_factor=None", "reduction_override=None",
           "ignore_index=None")


def _ignore(spec, call) -> int:
    ii = dict(call.params).get("ignore_index", spec.kwargs()["ignore_index"])
    return -100 if ii is None else ii


def _valid(spec, call) -> torch.Tensor:
    t = call.tensors["label" if call.target_form == "labels" else "target"]
    ii = _ignore(spec, call)
    return (t >= 0) & (t != ii)


def _avg_non_ignore(spec, call):
    """avg_non_ignore: average over non-ignored labels (mmdet counts them with .item(); we don't)."""
    if not spec.kwargs()["avg_non_ignore"]:
        return None
    valid = _valid(spec, call)
    # mmdet's count is a Python float, so a float64 loss must not get a float32-rounded count + eps
    dt = torch.float64 if call.pred.dtype == torch.float64 else torch.float32
    if spec.kwargs()["use_sigmoid"] and call.target_form == "labels":
        return valid.sum().to(dt) * call.width   # the one-hot expanded (N, C) mask
    return valid.sum().to(dt)


def _check(spec, call):
    if not spec.kwargs()["use_sigmoid"] and call.target_form == "labels":
        labels, ii = call.tensors["label"], _ignore(spec, call)
        kept = labels[labels != ii] if labels.device.type == "cpu" else labels
        check_label_range(spec.name, kept, 0, call.width - 1, f"ignore_index {ii} excepted")


def _init(spec):
    kw = spec.kwargs()
    if kw["ignore_index"] is not None and not kw["avg_non_ignore"] and spec.reduction == "mean":
        warnings.warn("Default ``avg_non_ignore`` is False, if you would like to ignore the certain "
                      "label and average loss over non-ignore labels, which is the same with PyTorch "
                      "official cross_entropy, set ``avg_non_ignore=True``.", stacklevel=4)


@register_loss("CrossEntropyLoss", target="any", weight={"labels": "rows", "dense": "raw"},
               forward=FORWARD, quirks=("weight_float",),
               hooks={"avg_factor": _avg_non_ignore, "check": _check, "init": _init}, _builtin=True)
def cross_entropy_loss(pred, target, use_sigmoid: bool = False, use_mask: bool = False,
                       class_weight=None, ignore_index=None, avg_non_ignore: bool = False):
    """Sigmoid: BCE-with-logits per class, class_weight as pos_weight, invalid rows weighted 0.
    Softmax: -cw[y] log_softmax(x)[y] per row, 0 where y == ignore_index (default -100)."""
    check(not (use_sigmoid and use_mask), "use_sigmoid and use_mask cannot both be True")
    check(not use_mask, "use_mask=True is not supported yet")
    ii = -100 if ignore_index is None else ignore_index
    valid = (target >= 0) & (target != ii)
    if use_sigmoid:
        t = one_hot(target) if is_labels(target) else target
        return bce_with_logits(pred, t, pos_weight=_class_weight(class_weight)) * to_float(valid)
    check(is_labels(target), "the softmax loss needs integer labels")
    nll = logsumexp(pred) - take(pred, target)
    cw = _class_weight(class_weight)
    if cw is not None:
        nll = nll * (take(cw, target) if not isinstance(cw, float) else cw)
    return where(target != ii, nll, 0.0)


def _class_weight(cw):
    if cw is None or isinstance(cw, float):
        return cw
    return per_class("class_weight", cw)
