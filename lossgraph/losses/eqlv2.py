"""EQLV2Loss (eqlv2_loss.py): Equalization Loss v2 for LVIS, a sigmoid BCE whose per-class
positive and negative weights follow the gradient statistics accumulated over training.

cls_score is (N, C + 1): C class logits, then one objectness/background logit. Each forward:
  1. neg_w = [sigmoid(gamma (pos_neg - mu)) for the C classes, 1 for the last column] and
     pos_w = 1 + alpha (1 - neg_w), from the buffers *before* this call;
  2. loss = loss_weight * sum(BCE(x, t) * (pos_w t + neg_w (1 - t))) / N, t the one-hot label
     over all C + 1 columns: the fused kernel, with pos_w and neg_w as per-column inputs;
  3. the gradient statistics of this call are added to the buffers (Note [EQLv2 state]).
As in MMDetection 3.3.0, forward(cls_score, label, weight, avg_factor, reduction_override)
ignores weight, avg_factor, reduction_override and the config's reduction and class_weight:
the result is always that scalar mean over rows.

Note [EQLv2 state]: the buffers pos_grad, neg_grad (float32, C entries) and pos_neg (initially
100, so every weight starts at 1) are registered buffers: they follow .to(device) and
state_dict. After each forward, with p = sigmoid(x) and g = |t (p - 1) + (1 - t) p| (the
magnitude of d BCE / dx), pos_grad += sum over rows of g t w and neg_grad += sum of g (1 - t) w
(C columns, the objectness column left out), summed over processes first when
use_distributed=True (torch.distributed.all_reduce, as MMDetection), then pos_neg = pos_grad /
(neg_grad + 1e-10). These statistics are torch ops on the detached score, in MMDetection's order,
so the state evolves as MMDetection's does; the update also runs under torch.no_grad.
"""
from __future__ import annotations

import torch

from ..build import check, col_input
from ..errors import InputShapeError
from ..inputs import Exact, check_label_range, check_pred, compute_dtype, fail, target_form
from ..registry import register_loss
from ..symbolic import bce_with_logits, one_hot

FORWARD = ("cls_score", "label", "weight=None", "avg_factor=None", "reduction_override=None")
POS_W, NEG_W = "eqlv2_pos_w", "eqlv2_neg_w"


def _state(spec):
    c = spec.kwargs()["num_classes"]
    return {"pos_grad": torch.zeros(c), "neg_grad": torch.zeros(c),
            "pos_neg": torch.ones(c) * 100}


def _weights(module, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_w, neg_w), one per column, in MMDetection's dtypes and order of operations."""
    kw = module.spec.kwargs()
    mapped = 1 / (1 + torch.exp(-kw["gamma"] * (module.pos_neg - kw["mu"])))
    neg_w = torch.cat([mapped, pred.new_ones(1)])
    return 1 + kw["alpha"] * (1 - neg_w), neg_w


def _collect_grad(module, pred: torch.Tensor, labels: torch.Tensor, pos_w, neg_w) -> None:
    """Note [EQLv2 state]: add this call's gradient statistics to the buffers."""
    target = torch.zeros_like(pred)
    target[torch.arange(pred.shape[0], device=pred.device), labels] = 1
    weight = pos_w * target + neg_w * (1 - target)
    prob = torch.sigmoid(pred)
    grad = torch.abs(target * (prob - 1) + (1 - target) * prob)
    pos_grad = torch.sum(grad * target * weight, dim=0)[:-1]
    neg_grad = torch.sum(grad * (1 - target) * weight, dim=0)[:-1]
    if module.use_distributed:
        torch.distributed.all_reduce(pos_grad)
        torch.distributed.all_reduce(neg_grad)
    module.pos_grad += pos_grad
    module.neg_grad += neg_grad
    module.pos_neg = module.pos_grad / (module.neg_grad + 1e-10)


def _bind_target(spec, call, target):
    labels, pos_w, neg_w = target
    call.target_form = target_form(spec.name, "labels", call.pred, labels)
    call.tensors["label"] = labels
    call.tensors[POS_W], call.tensors[NEG_W] = pos_w, neg_w


def _forward(module, a):
    """Weights from the buffers, the fused kernel (mean over rows), then the state update."""
    spec, c = module.spec, module.num_classes
    pred = check_pred(spec.name, a["pred"])
    labels = a["target"]
    if pred.dim() != 2 or pred.shape[1] != c + 1:
        fail(spec.name, f"cls_score must have shape (N, num_classes + 1) = (N, {c + 1}), got "
                        f"{tuple(pred.shape)}", InputShapeError)
    target_form(spec.name, "labels", pred, labels)
    check_label_range(spec.name, labels, 0, c, f"{c} = the objectness column")
    if module.pos_neg.device != pred.device:
        fail(spec.name, f"the pos_neg buffer is on {module.pos_neg.device} but cls_score is on "
                        f"{pred.device}: move the loss with .to(device)")
    with torch.no_grad():
        pos_w, neg_w = _weights(module, pred)
    n = pred.shape[0]
    dt = compute_dtype(pred.dtype)
    loss = module.run_pipeline({"pred": pred, "target": (labels, pos_w.to(dt), neg_w.to(dt)),
                                "avg_factor": Exact(float(n) if n else float("nan")),
                                "reduction_override": "mean"})
    with torch.no_grad():
        _collect_grad(module, pred.detach(), labels, pos_w, neg_w)
    return loss


def get_channel_num(self, num_classes: int) -> int:
    """The classifier's output channels: num_classes + 1 (the objectness column)."""
    return num_classes + 1


def get_activation(self, pred: torch.Tensor) -> torch.Tensor:
    """sigmoid scores; with test_with_obj the class scores are multiplied by 1 - objectness."""
    pred = torch.sigmoid(pred)
    if self.test_with_obj:
        pred[:, :-1] *= (1 - pred[:, -1:])
    return pred


def _attrs(spec):
    return {"get_channel_num": get_channel_num, "get_activation": get_activation, "group": True,
            "use_sigmoid": True}


@register_loss("EQLV2Loss", target="labels", forward=FORWARD,
               hooks={"forward": _forward, "bind_target": _bind_target, "state": _state,
                      "attrs": _attrs}, _builtin=True)
def eqlv2_loss(pred, target, use_sigmoid: bool = True, class_weight=None,
               num_classes: int = 1203, use_distributed: bool = False, mu: float = 0.8,
               alpha: float = 4.0, gamma: float = 12, vis_grad: bool = False,
               test_with_obj: bool = True):
    """BCE(x, onehot(label)) * (pos_w t + neg_w (1 - t)), pos_w and neg_w per column from the
    gradient statistics (see the module docstring). use_sigmoid is forced to True and
    class_weight is stored but unused, as in MMDetection 3.3.0."""
    check(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
    t = one_hot(target)
    return bce_with_logits(pred, t) * (col_input(POS_W) * t + col_input(NEG_W) * (1 - t))
