"""GaussianFocalLoss (gaussian_focal_loss.py): CornerNet's focal loss on Gaussian heatmaps."""
from __future__ import annotations

from ..registry import register_loss
from ..symbolic import log, to_float

FORWARD = ("pred", "target", "pos_inds=None", "pos_labels=None", "weight=None", "avg_factor=None",
           "reduction_override=None")


@register_loss("GaussianFocalLoss", forward=FORWARD, _builtin=True)
def gaussian_focal_loss(pred, target, alpha: float = 2.0, gamma: float = 4.0,
                        pos_weight: float = 1.0, neg_weight: float = 1.0):
    """pos_weight * pos_loss + neg_weight * neg_loss on probabilities; positives where target == 1.

    pos_loss = -log(p + 1e-12) (1-p)^alpha [t == 1]; neg_loss = -log(1 - p + 1e-12) p^alpha (1-t)^gamma.
    """
    eps = 1e-12
    pos_weights = to_float(target == 1)
    neg_weights = (1 - target) ** gamma
    pos_loss = -log(pred + eps) * (1 - pred) ** alpha * pos_weights
    neg_loss = -log(1 - pred + eps) * pred ** alpha * neg_weights
    return pos_weight * pos_loss + neg_weight * neg_loss
