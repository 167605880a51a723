"""Box-regression losses: L1Loss, SmoothL1Loss, MSELoss, BalancedL1Loss (smooth_l1_loss.py etc.)."""
from __future__ import annotations

import math

from ..build import check
from ..errors import ConfigAssertion
from ..registry import register_loss
from ..symbolic import abs, log, where
from .pipeline import empty_zero, zero_weight_exit, zero_weight_forward

ZERO_EXIT = {"early_exit": zero_weight_exit, "forward": zero_weight_forward,
             "empty": empty_zero}


@register_loss("L1Loss", hooks=ZERO_EXIT, _builtin=True)
def l1_loss(pred, target):
    """|pred - target|. v3 quirks: all-zero weight returns (pred*weight).sum(); empty -> 0."""
    return abs(pred - target)


@register_loss("SmoothL1Loss", hooks=ZERO_EXIT, _builtin=True)
def smooth_l1_loss(pred, target, beta: float = 1.0):
    """0.5 d^2 / beta if d < beta else d - 0.5 beta, d = |pred - target| (same quirks as L1Loss)."""
    check(beta > 0, f"beta must be > 0, got {beta}", ConfigAssertion, at_call=True)
    diff = abs(pred - target)
    return where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


@register_loss("MSELoss", _builtin=True)
def mse_loss(pred, target):
    """(pred - target)^2, as F.mse_loss(reduction='none')."""
    d = pred - target
    return d * d


@register_loss("BalancedL1Loss", hooks={"empty": empty_zero}, _builtin=True)
def balanced_l1_loss(pred, target, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0):
    """Libra R-CNN: (a/b)(b d + 1) ln(b d / beta + 1) - a d below beta, g d + g/b - a beta above."""
    check(beta > 0, f"beta must be > 0, got {beta}", ConfigAssertion, at_call=True)
    diff = abs(pred - target)
    b = math.e ** (gamma / alpha) - 1
    return where(diff < beta, alpha / b * (b * diff + 1) * log(b * diff / beta + 1) - alpha * diff,
                 gamma * diff + gamma / b - alpha * beta)
