"""MultiPosCrossEntropyLoss (multipos_cross_entropy_loss.py): QDTrack's contrastive CE over a row
of similarity logits with several positives.

Per row: loss = log(1 + sum_{i pos} sum_{j neg} exp(x_j - x_i)), positives label >= 1, negatives
label == 0. MMDetection builds the (N, K*K) pair matrix and a logsumexp over it (plus a 0 column);
the kernel uses the factored form log(1 + S_neg * S_pos) = softplus(lse_neg(x) + lse_pos(-x)),
one pass per row and no K*K temporary.

Note [MultiPosCE's other labels]: MMDetection masks with pred * pos and pred * neg, so an element
that is neither (a label < 0, or a fractional one) is not masked out: it takes part on both sides
with the value 0 (pair (j, i) contributes exp(0 - x_i), exp(x_j - 0), and exp(0) for itself).
The kernel reproduces this: side P holds every element that is not negative, with value x where
positive and 0 otherwise; side N every element that is not positive, x where negative, else 0.
A row with an empty side has loss 0 (log 1), as MMDetection's padded logsumexp gives.
"""
from __future__ import annotations

import math

import torch

from ..errors import InputShapeError
from ..inputs import fail
from ..registry import register_loss
from ..symbolic import exp, log, rowmax, rowsum, softplus, stop_gradient, where

FORWARD = ("cls_score", "label", "weight=None", "avg_factor=None", "reduction_override=None",
           "**kwargs")


def _forward(module, a):
    """MMDetection asserts cls_score.size() == label.size(); extra keyword arguments are ignored."""
    pred, label = a["pred"], a["target"]
    if isinstance(pred, torch.Tensor) and isinstance(label, torch.Tensor) and \
            pred.shape != label.shape:
        fail(module.spec.name, f"label of shape {tuple(label.shape)} must have cls_score's shape "
                               f"{tuple(pred.shape)} (1 for positives, 0 for negatives)",
             InputShapeError)
    if isinstance(pred, torch.Tensor) and not pred.is_floating_point() and not pred.is_complex() \
            and pred.dtype != torch.bool:
        # MMDetection's first op, pred * pos_inds.float(), promotes integer scores to float32
        # (its own unit test passes an int64 cost matrix)
        pred = pred.float()
    return module.run_pipeline({**{k: a.get(k) for k in ("target", "weight", "avg_factor",
                                                          "reduction_override")}, "pred": pred})


def _side(values, member):
    """(max, sum of exp(v - max)) over the row's members: lse = max + log(sum); sum = 0 if none.
    The max is a constant for the derivative (the lse's gradient does not depend on it)."""
    m = stop_gradient(rowmax(where(member, values, -math.inf)))
    m = where(m > -math.inf, m, 0.0)
    return m, rowsum(exp(where(member, values - m, -math.inf)))   # exp(-inf): 0, no gradient


@register_loss("MultiPosCrossEntropyLoss", forward=FORWARD, quirks=("weight_float",),
               hooks={"forward": _forward}, _builtin=True)
def multipos_cross_entropy_loss(pred, target):
    """softplus(lse over negatives of x + lse over positives of -x) per row (see the module
    docstring for the elements that are neither); 0 for a row without a positive or a negative."""
    pos, neg = target >= 1, target == 0
    m_neg, s_neg = _side(where(neg, pred, 0.0), ~pos)
    m_pos, s_pos = _side(-where(pos, pred, 0.0), ~neg)
    both = s_neg * s_pos
    z = m_neg + m_pos + log(where(both > 0, both, 1.0))
    return where(both > 0, softplus(z), 0.0)
