"""Runtime hooks shared by several built-in losses (MMDetection's pipeline quirks)."""
from __future__ import annotations

import torch

from ..inputs import EPS32, check_label_range


def _any_positive(w: torch.Tensor) -> bool:
    """torch.any(w > 0); on the CPU through the native helper when there is one."""
    from ..backends.cpp import any_positive
    fast = any_positive(w)
    return bool(torch.any(w > 0)) if fast is None else fast


def zero_weight_exit(spec, a):
    """v3 L1/SmoothL1/IoU quirk: an all-zero weight returns (pred * weight).sum() at once.

    It runs before the reduction_override check, ignores the reduction (a scalar even for 'none'),
    skips loss_weight and needs a host sync, all exactly as in MMDetection 3.3.0.
    """
    w, pred = a.get("weight"), a["pred"]
    if isinstance(w, torch.Tensor) and not _any_positive(w):
        if pred.dim() == w.dim() + 1:
            w = w.unsqueeze(1)
        return (pred * w).sum()
    return None


def empty_zero(spec, call, a):
    """Empty-target quirk (v2.17+): the elementwise loss is pred.sum() * 0, then weight/reduce."""
    loss = call.pred.sum() * 0
    w, avg = a.get("weight"), a.get("avg_factor")
    if w is not None:
        loss = loss * w
    if avg is None:
        loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[call.reduction]
    elif call.reduction == "mean":
        loss = loss.sum() / (avg + EPS32)
    elif call.reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return spec.loss_weight * loss


def labels_with_background(spec, call):
    """Index labels must be in [0, C], C being background (F.one_hot raises otherwise)."""
    if call.target_form == "labels":
        c = call.width
        check_label_range(spec.name, call.tensors["label"], 0, c, f"{c} = background")
