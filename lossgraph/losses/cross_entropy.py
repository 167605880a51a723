"""CrossEntropyLoss (cross_entropy_loss.py): softmax over C+1 classes or per-class sigmoid BCE."""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from ..build import check, is_labels, per_class
from ..errors import ConfigAssertion, InputAssertion
from ..config import check_reduction
from ..inputs import check_label_range, compute_dtype, fail, in_range
from ..registry import register_loss
from ..symbolic import bce_with_logits, logsumexp, one_hot, take, to_float, where

FORWARD = ("cls_score", "label", "weight=None", "avg_factor=None", "reduction_override=None",
           "ignore_index=None", "**kwargs")
ROLE_NAMES = {"pred", "target", "weight", "avg_factor", "reduction_override", "ignore_index"}


def _ignore(spec, call) -> int:
    ii = dict(call.params).get("ignore_index", spec.kwargs()["ignore_index"])
    return -100 if ii is None else ii


def _valid(spec, call) -> torch.Tensor:
    t = call.tensors["label" if call.target_form == "labels" else "target"]
    ii = _ignore(spec, call)
    return (t >= 0) & (t != ii)


def _avg_non_ignore(spec, call):
    """avg_non_ignore: average over non-ignored labels (mmdet counts them with .item(); we don't)."""
    if not spec.kwargs()["avg_non_ignore"] or spec.kwargs()["use_mask"]:
        return None   # mask_cross_entropy takes avg_non_ignore and ignores it
    valid = _valid(spec, call)
    # mmdet's count is a Python float, so a float64 loss must not get a float32-rounded count + eps
    dt = compute_dtype(call.pred.dtype)
    if spec.kwargs()["use_sigmoid"] and call.target_form == "labels":
        return valid.sum().to(dt) * call.width   # the one-hot expanded (N, C) mask
    return valid.sum().to(dt)


def _check(spec, call):
    cw = spec.kwargs()["class_weight"]
    if isinstance(cw, tuple) and len(cw) not in (1, call.width):
        # torch broadcasts class_weight against the last axis: it must have 1 or C values
        fail(spec.name, f"class_weight has {len(cw)} values but pred has {call.width} in its last "
                        f"axis (shape {tuple(call.pred.shape)})")
    kw = spec.kwargs()
    if not kw["use_sigmoid"] and not kw["use_mask"] and call.target_form == "dense":
        fail(spec.name, "the softmax loss takes integer labels: (N,) for a (N, C) cls_score, "
                        "(N, d1, ..., dk) for (N, C, d1, ..., dk); got a float tensor "
                        f"of shape {tuple(call.tensors['target'].shape)}")
    if not spec.kwargs()["use_sigmoid"] and call.target_form == "labels":
        labels, ii = call.tensors["label"], _ignore(spec, call)
        if labels.device.type == "cpu" and labels.numel() and in_range(labels, 0, call.width - 1):
            return          # no ignored label and none out of range: one native pass
        kept = labels[labels != ii] if labels.device.type == "cpu" else labels
        check_label_range(spec.name, kept, 0, call.width - 1, f"ignore_index {ii} excepted")


def _init(spec):
    kw = spec.kwargs()
    if kw["ignore_index"] is not None and not kw["avg_non_ignore"] and spec.reduction == "mean":
        warnings.warn("Default ``avg_non_ignore`` is False, if you would like to ignore the certain "
                      "label and average loss over non-ignore labels, which is the same with PyTorch "
                      "official cross_entropy, set ``avg_non_ignore=True``.", stacklevel=4)


def _forward(module, a, record=None):
    """The softmax and sigmoid losses run the pipeline; use_mask=True is mask_cross_entropy.
    `record` (Note [Call plans]) is passed on only where the pipeline sees the call's own
    arguments, so that a plan's replay of them is the same call."""
    kw = module.spec.kwargs()
    extra = sorted(a.keys() - ROLE_NAMES)
    if extra:   # forward's **kwargs reach mmdet's cross_entropy functions, which take none
        raise TypeError(f"{module.spec.name}.forward() got an unexpected keyword argument "
                        f"'{extra[0]}' (MMDetection passes **kwargs on to its cross-entropy "
                        f"function, which takes no other argument)")
    if kw["use_mask"]:
        return _mask_forward(module, a)
    if not kw["use_sigmoid"]:
        return _softmax_forward(module, a, record)
    return module.run_pipeline(a, record)


_forward.plannable = True   # runtime.CompiledLoss: repeats of the plain calls are planned


def _softmax_forward(module, a, record=None):
    """F.cross_entropy's shapes: (N, C) logits with (N,) labels, (N, C, d1, ..., dk) with
    (N, d1, ..., dk), or unbatched (C,) with a 0-d label.

    Note [Class axis of softmax CE]: F.cross_entropy reads the classes along dim 1. The kernel
    reads them along the last axis, so a (N, C, d1..dk) score is moved to (N, d1..dk, C)
    (a contiguous copy; autograd routes the gradient back) and runs the (M, C) kernel with M =
    N*d1*..*dk rows; 'none' keeps the (N, d1..dk) shape. The weight is MMDetection's
    weight_reduce_loss on that loss: `weight.float()` broadcast against (N, d1..dk).
    """
    pred, label = a["pred"], a["target"]
    if not isinstance(pred, torch.Tensor) or not isinstance(label, torch.Tensor) or \
            label.dtype.is_floating_point or label.dtype == torch.bool:
        return module.run_pipeline(a)   # run_pipeline names what is wrong
    squeeze = pred.dim() == 1 and label.dim() == 0
    if squeeze:
        pred, label = pred[None], label[None]
    if pred.dim() >= 2 and label.dim() == pred.dim() - 1 and \
            tuple(label.shape) != (pred.shape[0],) + tuple(pred.shape[2:]):
        fail(module.spec.name, f"labels of shape {tuple(label.shape)} do not match cls_score of "
                               f"shape {tuple(pred.shape)}: the classes are dim 1, as in "
                               f"F.cross_entropy, so labels must have shape "
                               f"{(pred.shape[0],) + tuple(pred.shape[2:])}")
    if pred.dim() >= 3 and label.dim() == pred.dim() - 1:
        pred = pred.movedim(1, -1).contiguous()
    w = _broadcast_weight(a.get("weight"), label)
    same = pred is a["pred"] and label is a["target"] and w is a.get("weight")
    a = {**a, "pred": pred, "target": label, "weight": w}
    loss = module.run_pipeline(a, record if same else None)
    return loss.reshape(()) if squeeze and loss.dim() == 1 else loss


def _broadcast_weight(w, label: torch.Tensor):
    """A weight that broadcasts to the (N, d1..dk) loss but is not one value per row is expanded
    to it, as `loss * weight` broadcasts it; any other weight goes on to the rows check."""
    if not isinstance(w, torch.Tensor) or tuple(w.shape) == tuple(label.shape) or \
            w.numel() == label.numel():
        return w
    from ..inputs import broadcast
    if broadcast(tuple(w.shape), tuple(label.shape)) == tuple(label.shape):
        return w.expand(label.shape)
    return w


def _mask_forward(module, a):
    """use_mask=True (FCNMaskHead): forward(mask_pred (R, C, *), mask_targets (R, *), labels (R,)).

    The 3rd positional argument is each RoI's class label, not a weight: channel labels[r] of RoI r
    is gathered (torch indexing, whose backward scatters the kernel's gradient into pred), then
    the mean BCE-with-logits over all its elements, class_weight as BCE's `weight`, returned with
    shape (1,). MMDetection asserts ignore_index is None, reduction == 'mean' and no avg_factor.
    """
    spec, pred, labels = module.spec, a["pred"], a.get("weight")
    ii = a.get("ignore_index")
    override = a.get("reduction_override")
    if override is not None:
        check_reduction(spec.name, override, "reduction_override")
    if (ii if ii is not None else spec.kwargs()["ignore_index"]) is not None:
        fail(spec.name, "BCE loss does not support ignore_index (use_mask=True)", InputAssertion)
    if (override or spec.reduction) != "mean" or a.get("avg_factor") is not None:
        fail(spec.name, "use_mask=True supports only reduction='mean' and no avg_factor",
             InputAssertion)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() != pred.shape[0]:
        fail(spec.name, "use_mask=True takes the label of each RoI as its 3rd argument: a tensor "
                        f"of shape ({pred.shape[0]},), got "
                        f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
    rois = torch.arange(pred.shape[0], dtype=torch.long, device=pred.device)
    pred_slice = pred[rois, labels].squeeze(1)
    loss = module.run_pipeline({"pred": pred_slice, "target": a["target"],
                                "reduction_override": "mean"})
    return loss[None]


# a call whose denominator this hook gives is not planned (runtime.run_pipeline); the others are
_avg_non_ignore.plannable = True
CE_HOOKS = {"forward": _forward, "avg_factor": _avg_non_ignore, "check": _check, "init": _init}


@register_loss("CrossEntropyLoss", target="any", weight={"labels": "rows", "dense": "raw"},
               forward=FORWARD, quirks=("weight_float",), hooks=CE_HOOKS, _builtin=True)
def cross_entropy_loss(pred, target, use_sigmoid: bool = False, use_mask: bool = False,
                       class_weight: Optional[Union[float, list]] = None,
                       ignore_index: Optional[int] = None, avg_non_ignore: bool = False):
    """Sigmoid: BCE-with-logits per class, class_weight as pos_weight, invalid rows weighted 0.
    Softmax: -cw[y] log_softmax(x)[y] per row, 0 where y == ignore_index (default -100).
    Mask (use_mask=True): BCE-with-logits of the gathered label channel (see _mask_forward),
    class_weight as a weight broadcast against the mask's last axis, as torch broadcasts it."""
    check(not (use_sigmoid and use_mask), "use_sigmoid and use_mask cannot both be True", ConfigAssertion)
    if use_mask:
        check(ignore_index is None, "BCE loss does not support ignore_index (use_mask=True)",
              ConfigAssertion, at_call=True)
        cw = _class_weight(class_weight)
        loss = bce_with_logits(pred, target)
        return loss if cw is None else loss * cw
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
    if len(cw) == 1:
        return float(cw[0])    # a one-element class_weight broadcasts over every class
    return per_class("class_weight", cw)


# -- CrossEntropyCustomLoss (V3Det) ------------------------------------------------------------

def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent as MMDetection's accuracy(topk=1): shape (1,), 0-d 0 if empty."""
    if pred.size(0) == 0:
        return pred.new_tensor(0.0)
    hit = pred.topk(1, dim=1)[1][:, 0] == target
    return hit.float().sum(0, keepdim=True) * (100.0 / pred.size(0))


def custom_accuracy(self, cls_score, labels):
    """get_accuracy: {'acc_classes': top-1 accuracy over the foreground rows (labels < C)}."""
    pos = labels < self.num_classes
    return {"acc_classes": accuracy(cls_score[:, :self.num_classes][pos], labels[pos])}


def _ce_cls_channels(self, num_classes):
    """get_cls_channels: C + 1 logits for softmax (the background last), C for sigmoid."""
    if num_classes != self.num_classes:
        raise InputAssertion(f"{self.spec.name}: get_cls_channels({num_classes}) but the loss was "
                         f"built with num_classes={self.num_classes}")
    return num_classes if self.use_sigmoid else num_classes + 1


def _ce_activation(self, cls_score):
    """get_activation: softmax over [C classes, background]; sigmoid scores plus a clamped
    1 - sum background score."""
    fine = cls_score[:, :self.num_classes]
    if not self.use_sigmoid:
        return torch.softmax(torch.cat([fine, cls_score[:, [-1]]], dim=-1), dim=-1)
    scores = fine.sigmoid()
    neg = (1 - scores.sum(dim=1, keepdim=True)).clamp(min=0, max=1)
    return torch.cat([scores, neg], dim=1)


def _ce_custom_attrs(spec):
    return {"custom_cls_channels": True, "custom_activation": True, "custom_accuracy": True,
            "get_cls_channels": _ce_cls_channels, "get_activation": _ce_activation,
            "get_accuracy": custom_accuracy}


@register_loss("CrossEntropyCustomLoss", target="any", weight={"labels": "rows", "dense": "raw"},
               forward=FORWARD, quirks=("weight_float",),
               hooks={**CE_HOOKS, "attrs": _ce_custom_attrs}, _builtin=True)
def cross_entropy_custom_loss(pred, target, use_sigmoid: bool = False, use_mask: bool = False,
                              num_classes: int = -1,
                              class_weight: Optional[Union[float, list]] = None,
                              ignore_index: Optional[int] = None, avg_non_ignore: bool = False):
    """CrossEntropyLoss for V3Det heads: the same loss, plus `num_classes` (required, != -1) and
    the custom_cls_channels / custom_activation / custom_accuracy hooks heads call."""
    check(num_classes != -1, "num_classes must be set (it is -1)", ConfigAssertion)
    return cross_entropy_loss(pred, target, use_sigmoid=use_sigmoid, use_mask=use_mask,
                              class_weight=class_weight, ignore_index=ignore_index,
                              avg_non_ignore=avg_non_ignore)
