"""Runtime hooks shared by several built-in losses (MMDetection's pipeline quirks)."""
from __future__ import annotations

import torch

from ..inputs import EPS32, check_label_range, planned_label_range


def _any_positive(w: torch.Tensor) -> bool:
    """torch.any(w > 0); on the CPU through the native helper when there is one."""
    from ..backends.cpp import any_positive
    fast = any_positive(w)
    return bool(torch.any(w > 0)) if fast is None else fast


DEVICE_EXIT = "_zero_weight_on_device"   # key in the roles: the forward hook selects instead


def _early_value(pred: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MMDetection's early return: (pred * weight).sum(), weight broadcast over pred's last axis."""
    if pred.dim() == w.dim() + 1:
        w = w.unsqueeze(1)
    return (pred * w).sum()


def zero_weight_exit(spec, a):
    """v3 L1/SmoothL1/IoU quirk: an all-zero weight returns (pred * weight).sum() at once.

    It runs before the reduction_override check, ignores the reduction (a scalar even for 'none'),
    skips loss_weight and needs a host sync, all exactly as in MMDetection 3.3.0. On a device the
    forward hook below makes the same choice without the sync (Note [Zero-weight exit on the
    device]).
    """
    w, pred = a.get("weight"), a["pred"]
    if a.get(DEVICE_EXIT) or not isinstance(w, torch.Tensor):
        return None
    if not _any_positive(w):
        return _early_value(pred, w)
    return None


def _device_select(module, a) -> bool:
    """True when the exit must not sync: a weight off the CPU, or a CUDA kernel (which runs
    CPU tensors only under the tests' emulator), for a scalar result and a valid override."""
    w = a.get("weight")
    if not isinstance(w, torch.Tensor) or not isinstance(a.get("pred"), torch.Tensor):
        return False
    if w.device.type == "cpu" and module.compiler.backend_for("cpu") != "cuda":
        return False
    override = a.get("reduction_override")
    if override not in (None, "none", "mean", "sum"):
        return False     # the sync path keeps MMDetection's order: exit before the check
    return (override or module.spec.reduction) != "none"


def zero_weight_forward(module, a, record=None):
    """Note [Zero-weight exit on the device]: on a GPU the v3 exit is computed, not branched on:
    the normal loss and MMDetection's early value (pred * weight).sum() are both formed and
    torch.where(any(weight > 0), loss, early) picks one on the device, so a call never waits for
    the GPU, can be captured in a CUDA graph and traces with fullgraph=True. The early value takes
    the loss's dtype. 'none' keeps the host check: the early exit changes the result's shape."""
    if not _device_select(module, a):
        return module.run_pipeline(a, record)     # the CPU path may keep a call plan
    pred = a["pred"]
    keep = torch.any(a["weight"] > 0).to(pred.device)
    gated = _Gate.apply(pred, keep) if pred.requires_grad else pred
    out = module.run_pipeline({**a, "pred": gated, DEVICE_EXIT: True})
    early = _early_value(pred, a["weight"].to(pred.device))
    return torch.where(keep.to(out.device), out, early.to(out.dtype))


class _Gate(torch.autograd.Function):
    """Identity on pred whose backward keeps the gradient where `keep`, else exact zeros.

    Note [Gated exit gradient]: when the early value is selected, torch.where sends 0 to the
    normal loss, and the kernel's stored gradient times 0 is NaN wherever pred is NaN or the
    gradient is infinite; MMDetection's exit, (pred * weight).sum(), has the gradient
    weight = 0 there. A select (not a product) after the kernel's backward gives that 0."""

    @staticmethod
    def forward(ctx, pred, keep):
        ctx.save_for_backward(keep)
        return pred.view_as(pred)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


zero_weight_forward.plannable = True   # runtime.CompiledLoss: Note [Call plans] may record it


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


def _planned_labels_with_background(spec, call):
    """labels_with_background for a call plan's repeats (Note [Planned checks] in direct.py)."""
    if call.target_form != "labels":
        return lambda target: None
    c = call.width
    return planned_label_range(spec.name, call.tensors["label"], 0, c, f"{c} = background")


labels_with_background.planned = _planned_labels_with_background
