"""FocalLoss (focal_loss.py): sigmoid focal loss on logits or probabilities, labels or one-hot."""
from __future__ import annotations

from ..build import check, is_labels
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


@register_loss("FocalLoss", target="any", weight="focal", hooks={"check": _check}, _builtin=True)
def focal_loss(pred, target, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
               activated: bool = False):
    """BCE(pred, t) * (a t + (1-a)(1-t)) * pt^gamma with pt = (1-p) t + p (1-t).

    Labels are in [0, C], C being background (an all-zero row); a same-shape target is used as
    is; `activated=True` takes probabilities and binary_cross_entropy (logs clamped at -100).
    """
    check(use_sigmoid is True, "Only sigmoid focal loss supported now.")
    t = one_hot(target) if is_labels(target) else target
    p = pred if activated else sigmoid(pred)
    pt = (1 - p) * t + p * (1 - t)
    focal_weight = (alpha * t + (1 - alpha) * (1 - t)) * pt ** gamma
    bce = binary_cross_entropy(pred, t) if activated else bce_with_logits(pred, t)
    return bce * focal_weight

