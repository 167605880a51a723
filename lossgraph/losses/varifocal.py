"""VarifocalLoss (varifocal_loss.py): VFNet's IoU-aware classification loss."""
from __future__ import annotations

from ..build import check
from ..errors import ConfigAssertion
from ..registry import register_loss
from ..symbolic import abs, bce_with_logits, sigmoid, to_float


@register_loss("VarifocalLoss", _builtin=True)
def varifocal_loss(pred, target, use_sigmoid: bool = True, alpha: float = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True):
    """BCE(pred, q) * f; f = q (or 1) where q > 0, alpha |sigmoid(pred) - q|^gamma where q <= 0."""
    check(use_sigmoid is True, "Only sigmoid varifocal loss supported now.", ConfigAssertion)
    check(alpha >= 0.0, f"alpha must be >= 0, got {alpha}", ConfigAssertion)
    p = sigmoid(pred)
    pos, neg = to_float(target > 0.0), to_float(target <= 0.0)
    if iou_weighted:
        focal_weight = target * pos + alpha * abs(p - target) ** gamma * neg
    else:
        focal_weight = pos + alpha * abs(p - target) ** gamma * neg
    return bce_with_logits(pred, target) * focal_weight
