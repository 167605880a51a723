"""FocalLoss (focal_loss.py): sigmoid focal loss on logits or probabilities, labels or one-hot."""
from __future__ import annotations

from ..build import check, is_labels
from ..errors import ConfigAssertion, InputAssertion
from ..inputs import fail
from ..registry import register_loss
from ..symbolic import bce_with_logits, binary_cross_entropy, one_hot, sigmoid
from .pipeline import labels_with_background


def _check(spec, call):
    labels_with_background(spec, call)
    p = call.pred
    if spec.kwargs()["activated"] and p.device.type == "cpu" and p.numel() and \
            not bool(((p >= 0) & (p <= 1)).all()):
        fail(spec.name, "with activated=True, pred must hold probabilities in [0, 1]")


_check.planned = lambda spec, call: None if spec.kwargs()["activated"] else \
    labels_with_background.planned(spec, call)   # Note [Planned checks] in direct.py


@register_loss("FocalLoss", target="any", weight="focal", hooks={"check": _check}, _builtin=True)
def focal_loss(pred, target, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
               activated: bool = False):
    """BCE(pred, t) * (a t + (1-a)(1-t)) * pt^gamma with pt = (1-p) t + p (1-t).

    Labels are in [0, C], C being background (an all-zero row); a same-shape target is used as
    is; `activated=True` takes probabilities and binary_cross_entropy (logs clamped at -100).
    """
    check(use_sigmoid is True, "Only sigmoid focal loss supported now.", ConfigAssertion)
    t = one_hot(target) if is_labels(target) else target
    p = pred if activated else sigmoid(pred)
    pt = (1 - p) * t + p * (1 - t)
    focal_weight = (alpha * t + (1 - alpha) * (1 - t)) * pt ** gamma
    bce = binary_cross_entropy(pred, t) if activated else bce_with_logits(pred, t)
    return bce * focal_weight


# -- FocalCustomLoss (V3Det) -----------------------------------------------------------------

def _focal_cls_channels(self, num_classes):
    """get_cls_channels: C sigmoid logits."""
    if num_classes != self.num_classes:
        raise InputAssertion(f"{self.spec.name}: get_cls_channels({num_classes}) but the loss was "
                         f"built with num_classes={self.num_classes}")
    return num_classes


def _focal_activation(self, cls_score):
    """get_activation: the sigmoid of the first C logits."""
    return cls_score[:, :self.num_classes].sigmoid()


def _focal_custom_attrs(spec):
    from .cross_entropy import custom_accuracy
    return {"custom_cls_channels": True, "custom_activation": True, "custom_accuracy": True,
            "get_cls_channels": _focal_cls_channels, "get_activation": _focal_activation,
            "get_accuracy": custom_accuracy}


@register_loss("FocalCustomLoss", target="labels", weight="focal",
               hooks={"check": labels_with_background, "attrs": _focal_custom_attrs},
               _builtin=True)
def focal_custom_loss(pred, target, use_sigmoid: bool = True, num_classes: int = -1,
                      gamma: float = 2.0, alpha: float = 0.25, activated: bool = False):
    """FocalLoss for V3Det heads: always the logits path with labels one-hot expanded over
    pred.size(1) + 1 classes (the last, background, dropped). As in MMDetection 3.3.0,
    `activated` is stored but unused, and num_classes must be set (!= -1)."""
    check(use_sigmoid is True, "Only sigmoid focal loss supported now.", ConfigAssertion)
    check(num_classes != -1, "num_classes must be set (it is -1)", ConfigAssertion)
    return focal_loss(pred, target, gamma=gamma, alpha=alpha, activated=False)
