"""AssociativeEmbeddingLoss (ae_loss.py): CornerNet's pull and push losses on corner embeddings.

forward(pred, target, match): pred and target are the top-left and bottom-right embedding maps
(B, M, H, W); match[i] lists image i's objects as [[tl_y, tl_x], [br_y, br_x]]. Per image, the
embeddings at the corners are read and flattened as MMDetection does (`view(-1, 1)`: with M > 1
each (object, channel) pair counts as one of the n = objects * M entries), e = (tl + br) / 2 and
  pull = sum((tl - e)^2 + (br - e)^2) / n
  push = sum over j != k of relu(1 - |e_j - e_k|) / (n (n - 1))   (0 when n <= 1)
both 0 (connected to pred) for an image without objects. The result is the tuple
(pull_weight * sum of pulls, push_weight * sum of pushes) over the batch: no weight, avg_factor
or reduction (a config's reduction other than 'mean' or loss_weight other than 1 is refused:
they are not MMDetection keys of this loss).

Why it is not one fused kernel: the inputs are per-image lists of coordinates (a data-dependent
gather whose length differs by image), both maps receive gradients (lossgraph kernels
differentiate pred only), and push is pairwise over the objects. The gathers and the pull run as
torch ops; the push hinge over each image's (n, n) difference matrix runs as the fused kernel
(pred = the differences, target = 1 off the diagonal; relu's gradient is 0 at 0, as F.relu's).
"""
from __future__ import annotations

import torch

from ..errors import ConfigTypeError
from ..inputs import check_pred, fail
from ..registry import register_loss
from ..symbolic import where

FORWARD = ("pred", "target", "match")


def _corners(name, tl: torch.Tensor, br: torch.Tensor, match) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, 1) embeddings at every object's corners, in MMDetection's flattened order."""
    try:
        idx = torch.tensor([[m[0][0], m[0][1], m[1][0], m[1][1]] for m in match],
                           dtype=torch.long, device=tl.device)
    except (TypeError, IndexError, ValueError):
        fail(name, "match[i] must list each object as [[tl_y, tl_x], [br_y, br_x]]")
    h, w = tl.shape[-2:]
    if bool((idx < 0).any() | (idx[:, 0::2] >= h).any() | (idx[:, 1::2] >= w).any()):
        fail(name, f"match coordinates must lie inside the {h}x{w} embedding map")
    tl_e = tl[:, idx[:, 0], idx[:, 1]].t().reshape(-1, 1)
    br_e = br[:, idx[:, 2], idx[:, 3]].t().reshape(-1, 1)
    return tl_e, br_e


def _per_image(module, tl, br, match):
    if len(match) == 0:
        zero = tl.sum() * 0.
        return zero, zero
    tl_e, br_e = _corners(module.spec.name, tl, br, match)
    me = (tl_e + br_e) / 2.0
    n = tl_e.size(0)
    pull = ((tl_e - me).pow(2) + (br_e - me).pow(2)).sum() / n
    if n <= 1:
        return pull, tl.sum() * 0.
    diff = me.expand(n, n, 1).permute(1, 0, 2).sum(-1) - me.sum(-1)
    off_diag = 1 - torch.eye(n, dtype=me.dtype, device=me.device)
    hinge = module.run_pipeline({"pred": diff, "target": off_diag, "reduction_override": "sum"})
    return pull, hinge / (n * (n - 1))


def _forward(module, a):
    name = module.spec.name
    pred, target, match = check_pred(name, a["pred"]), a["target"], a["match"]
    if pred.dim() != 4 or not isinstance(target, torch.Tensor) or target.shape != pred.shape:
        fail(name, f"pred and target must be (B, M, H, W) embedding maps of one shape, got "
                   f"{tuple(pred.shape)} and "
                   f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if len(match) != pred.size(0):
        fail(name, f"match must hold one list of objects per image ({pred.size(0)}), got "
                   f"{len(match)}")
    pull_all, push_all = 0.0, 0.0
    for i in range(pred.size(0)):
        pull, push = _per_image(module, pred[i], target[i], match[i])
        pull_all += module.pull_weight * pull
        push_all += module.push_weight * push
    return pull_all, push_all


def _init(spec):
    if spec.reduction != "mean" or spec.loss_weight != 1.0:
        raise ConfigTypeError(f"{spec.name} has no 'reduction' or 'loss_weight' (MMDetection's takes "
                          f"pull_weight and push_weight)")


@register_loss("AssociativeEmbeddingLoss", forward=FORWARD,
               hooks={"forward": _forward, "init": _init}, _builtin=True)
def associative_embedding_loss(pred, target, pull_weight: float = 0.25,
                               push_weight: float = 0.25):
    """The push hinge relu(w (1 - |d|)) of one image's embedding differences d, w = target (1 off
    the diagonal); the pull and the per-image scaling are torch ops (see the module docstring)."""
    v = target * (1 - abs(pred))
    return where(v > 0, v, 0.0)
