"""DiceLoss (dice_loss.py): V-Net and naive Dice per instance, over its flattened mask."""
from __future__ import annotations

import torch

from ..build import check
from ..errors import ConfigNotImplemented, InputShapeError
from ..inputs import fail
from ..registry import register_loss
from ..symbolic import rowsum, sigmoid

# MMDetection's DiceLoss.forward swaps avg_factor and reduction_override (mmdet-losses.md §1.4).
FORWARD = ("pred", "target", "weight=None", "reduction_override=None", "avg_factor=None")


def _dice_forward(module, a):
    """Flatten pred and target to (n, -1), so each kernel row is one instance, and check the
    (n,) weight as dice_loss asserts it (weight.ndim == 1 and len(weight) == n)."""
    name, pred, target = module.spec.name, a["pred"], a["target"]
    for what, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            fail(name, f"{what} must be a tensor of shape (n, *), got "
                       f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if target.shape[0] != pred.shape[0] or target[0].numel() != pred[0].numel():
        fail(name, f"target of shape {tuple(target.shape)} does not match pred of shape "
                   f"{tuple(pred.shape)}", InputShapeError)
    w = a.get("weight")
    if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1 or len(w) != len(pred)):
        fail(name, f"weight must have shape ({len(pred)},), one value per instance, got "
                   f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}",
             InputShapeError)
    return module.run_pipeline({**a, "pred": pred.flatten(1), "target": target.flatten(1)})


@register_loss("DiceLoss", forward=FORWARD, hooks={"forward": _dice_forward}, _builtin=True)
def dice_loss(pred, target, use_sigmoid: bool = True, activate: bool = True,
              naive_dice: bool = False, eps: float = 1e-3):
    """1 - d per instance: V-Net d = 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps)), naive
    d = (2 sum(p t) + eps) / (sum p + sum t + eps); p = sigmoid(pred) when `activate`.

    As in MMDetection 3.3.0: forward(pred, target, weight, reduction_override, avg_factor), the
    inputs flattened to (n, -1) and the target cast to float; 'mean' averages over instances.
    """
    check(not activate or use_sigmoid, "activate=True needs use_sigmoid=True (softmax is not "
                                       "implemented in MMDetection's DiceLoss)",
          ConfigNotImplemented, at_call=True)
    p = sigmoid(pred) if activate else pred
    a = rowsum(p * target)
    if naive_dice:
        return 1 - (2 * a + eps) / (rowsum(p) + rowsum(target) + eps)
    b = rowsum(p * p) + eps
    c = rowsum(target * target) + eps
    return 1 - (2 * a) / (b + c)
