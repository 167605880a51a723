"""TripletLoss (triplet_loss.py): batch-hard triplet loss on embeddings (tracking re-id).

For a batch of embeddings x (B, D) with identity labels (B,): the Euclidean distance matrix
dist = sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)); for each anchor i the hardest
positive d_ap = max of dist[i, j] over j of the same identity (i itself included) and the hardest
negative d_an = min over the other identities; loss = loss_weight * mean_i relu(d_ap - d_an +
margin) (nn.MarginRankingLoss with y = 1; its clamp passes the gradient at exactly 0).

Why it is not one fused kernel: the distance matrix is a (B, B) matrix product of the
embeddings, which the row-wise IR does not express. It is computed with torch ops (the same
ones MMDetection uses, so the same rounding); the mining and the hinge then run as the fused
row kernel over that matrix, pred = dist and target = the same-identity mask, and autograd
carries the kernel's gradient back through the distance computation. Ties in the max or min
share the gradient evenly, as torch's max over a masked row does.
As in MMDetection 3.3.0: forward(inputs, targets) has no weight, avg_factor or reduction
(a config's reduction other than 'mean' is refused: the result is always the mean), and hard_mining=False
raises NotImplementedError when called. An anchor without a negative in the batch raises
InputError on the CPU (MMDetection's min over an empty set raises); on a GPU that check would
need a host sync, so there such an anchor contributes relu(-inf) = 0.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigNotImplemented, ConfigTypeError
from ..inputs import FLOATS, INTS, check_pred, fail
from ..registry import register_loss
from ..symbolic import clamp, rowmax, where

FORWARD = ("inputs", "targets")


def distance_matrix(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x, clamped at 1e-12 before the square root."""
    b = x.size(0)
    sq = torch.pow(x, 2).sum(dim=1, keepdim=True).expand(b, b)
    d = torch.addmm(sq + sq.t(), x, x.t(), beta=1, alpha=-2)
    return d.clamp(min=1e-12).sqrt()


def _forward(module, a):
    spec = module.spec
    if not module.hard_mining:
        raise ConfigNotImplemented(f"{spec.name}: hard_mining=False is not implemented "
                                  f"(as in MMDetection)")
    x, labels = check_pred(spec.name, a["inputs"]), a["targets"]
    if x.dim() != 2:
        fail(spec.name, f"inputs must be a (batch_size, feat_dim) matrix, got {tuple(x.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:1] or \
            labels.dtype not in INTS + FLOATS:
        fail(spec.name, f"targets must be a tensor of {x.shape[0]} identity labels, got "
                        f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    same = labels.reshape(-1, 1) == labels.reshape(1, -1)
    if same.device.type == "cpu" and bool(same.all(dim=1).any()):
        fail(spec.name, "every anchor needs a negative (a sample of another identity) in the "
                        "batch; MMDetection's min over an empty set raises here")
    return module.run_pipeline({"pred": distance_matrix(x), "target": same.to(x.dtype),
                                "reduction_override": "mean"})


def _init(spec):
    if spec.reduction != "mean":
        raise ConfigTypeError(f"{spec.name} has no 'reduction': it always returns the mean over the "
                          f"batch (MMDetection's MarginRankingLoss)")


@register_loss("TripletLoss", forward=FORWARD, hooks={"forward": _forward, "init": _init},
               _builtin=True)
def triplet_loss(pred, target, margin: float = 0.3, hard_mining: bool = True):
    """relu(max over positives - min over negatives + margin) per row of the distance matrix."""
    same = target != 0
    d_ap = rowmax(where(same, pred, -math.inf))
    d_an = -rowmax(where(same, -math.inf, -pred))
    return clamp(d_ap - d_an + margin, 0.0)
