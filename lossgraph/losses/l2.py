"""L2Loss (l2_loss.py) and MarginL2Loss (margin_loss.py): QDTrack's similarity regression.

Both square the gap between a similarity in [0, 1] and a binary target, after `update_weight`:
  1. the weight defaults to ones; every element with weight <= 0 gets target -1 (neither
     positive nor negative);
  2. pos_margin > 0 is subtracted from pred where target == 1, neg_margin > 0 where target == 0;
     pred is then clamped to [0, 1] (torch.clamp: the gradient passes where 0 <= x <= 1);
  3. with neg_pos_ub > 0 and #neg / (#pos + 1e-6) > neg_pos_ub, only #pos * neg_pos_ub negatives
     keep their weight: the largest losses (hard_mining=True, torch.topk) or a random choice;
  4. avg_factor is replaced by the number of elements with weight > 0, whatever was passed, so
     'mean' divides by that count + eps32 and 'sum' always raises ValueError (avg_factor is set).
The margins, the clamp and the square run in the fused kernel; steps 1, 3 and 4 are torch ops
on the host side of the call (the mining needs counts and a top-k, as in MMDetection).

Note [L2 without mutation]: MMDetection writes -1 into the caller's target and zeros into the
caller's weight (and subtracts the margins from pred in place); lossgraph computes the same
numbers on copies and leaves every input as it was. The random choice of negatives
(hard_mining=False) draws with torch.randperm, as MMDetection's numpy shuffle is not available
here: the same distribution, not the same draw for a given seed.
"""
from __future__ import annotations

import torch

from ..config import check_reduction
from ..errors import InputShapeError
from ..inputs import FLOATS, INTS, check_pred, fail
from ..registry import register_loss
from ..symbolic import clamp, where


def _margined(pred, target, pos_margin: float, neg_margin: float):
    """pred minus the margins where target is 1 (positive) or 0 (negative), clamped to [0, 1]."""
    if pos_margin > 0:
        pred = pred - where(target == 1, pos_margin, 0.0)
    if neg_margin > 0:
        pred = pred - where(target == 0, neg_margin, 0.0)
    return clamp(pred, 0.0, 1.0)


def _torch_margined(spec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same as _margined with torch ops, for the hard-mining costs (detached)."""
    kw = spec.kwargs()
    p = pred.detach().clone()
    if kw["pos_margin"] > 0:
        p[target == 1] -= kw["pos_margin"]
    if kw["neg_margin"] > 0:
        p[target == 0] -= kw["neg_margin"]
    return torch.clamp(p, min=0, max=1)


def _check(spec, pred, target, weight):
    name = spec.name
    if not isinstance(target, torch.Tensor) or target.shape != pred.shape:
        fail(name, f"target must be a tensor of pred's shape {tuple(pred.shape)}, got "
                   f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}",
             InputShapeError)
    if target.dtype not in FLOATS + INTS:
        fail(name, f"target must be a numeric tensor, got {target.dtype}")
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.shape != pred.shape):
        fail(name, f"weight must be None or a tensor of pred's shape {tuple(pred.shape)} (its "
                   f"entries <= 0 mark the target invalid), got "
                   f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if spec.kwargs()["neg_pos_ub"] > 0 and pred.dim() != 2:
        fail(name, f"neg_pos_ub > 0 samples negatives of a 2-D similarity matrix, got pred of "
                   f"shape {tuple(pred.shape)}")


def _mine(spec, pred, target, weight) -> torch.Tensor:
    """Step 3: the weight with the surplus negatives set to 0 (a copy), or `weight` itself."""
    kw = spec.kwargs()
    num_pos, num_neg = int((target == 1).sum()), int((target == 0).sum())
    ub = kw["neg_pos_ub"]
    if not (ub > 0 and num_neg / (num_pos + 1e-6) > ub):
        return weight
    keep = num_pos * ub
    neg_idx = torch.nonzero(target == 0, as_tuple=False)
    if kw["hard_mining"]:
        p = _torch_margined(spec, pred, target)
        costs = (torch.abs(p - target) ** 2)[neg_idx[:, 0], neg_idx[:, 1]]
        neg_idx = neg_idx[costs.topk(keep)[1], :]
    else:
        neg_idx = neg_idx[torch.randperm(len(neg_idx), device=neg_idx.device)[:keep]]
    kept = torch.zeros_like(target, dtype=torch.bool)
    kept[neg_idx[:, 0], neg_idx[:, 1]] = True
    weight = weight.clone()
    weight[(target == 0) ^ kept] = 0
    return weight


def _forward(as_float: bool):
    """update_weight, then the fused kernel with avg_factor = count(weight > 0)."""
    def forward(module, a):
        spec = module.spec
        override = a.get("reduction_override")
        if override is not None:
            check_reduction(spec.name, override, "reduction_override")
        pred, target, weight = check_pred(spec.name, a["pred"]), a["target"], a.get("weight")
        _check(spec, pred, target, weight)
        if weight is None:
            weight = target.new_ones(target.size())
        target = target.masked_fill(weight <= 0, -1)
        weight = _mine(spec, pred, target, weight)
        if as_float:   # MarginL2Loss: mse_loss(pred, target.float(), weight.float())
            target, weight = target.float(), weight.float()
        return module.run_pipeline({"pred": pred, "target": target, "weight": weight,
                                    "avg_factor": (weight > 0).sum(),
                                    "reduction_override": override})
    return forward


@register_loss("L2Loss", hooks={"forward": _forward(False)}, _builtin=True)
def l2_loss(pred, target, neg_pos_ub: int = -1, pos_margin: float = -1, neg_margin: float = -1,
            hard_mining: bool = False):
    """|clamp(pred - margins, 0, 1) - t|^2 after update_weight (see the module docstring)."""
    d = _margined(pred, target, pos_margin, neg_margin) - target
    return d * d


@register_loss("MarginL2Loss", hooks={"forward": _forward(True)}, _builtin=True)
def margin_l2_loss(pred, target, neg_pos_ub: int = -1, pos_margin: float = -1,
                   neg_margin: float = -1, hard_mining: bool = False):
    """L2Loss through mse_loss, with target and weight cast to float32 (as margin_loss.py)."""
    d = _margined(pred, target, pos_margin, neg_margin) - target
    return d * d
