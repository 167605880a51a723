"""SeesawLoss (seesaw_loss.py): long-tail softmax CE with mitigation and compensation factors.

cls_score has C + 2 columns: C class logits, then 2 objectness logits (object, background).
Each forward first adds the batch's label counts to the `cum_samples` buffer (C + 1 entries), then
returns two losses:
  - loss_cls_classes: on positive rows (label < C), the CE of z' = z + log(M * K) off the label
    column, with the mitigation M_j = (N_j / N_y)^p where N_j < N_y (counts clamped >= 1) and the
    compensation K_j = (s_j / max(s_y, eps))^q where that ratio > 1, s = softmax(z) detached.
  - loss_cls_objectness: softmax CE of the last 2 logits against [label == C].
Both are multiplied by label_weights, reduced (avg_factor as usual) and scaled by loss_weight.

Note [Seesaw without a host sync]: MMDetection selects the positive rows (and tests
`pos_inds.sum() > 0`), which reads data back to the host. Here the class kernel runs over every
row of the full (N, C + 2) score, masks the 2 objectness columns with -inf, and zeroes the loss of
non-positive rows, so 'mean' and 'sum' need no sync: the count updates go through count_values,
and 'mean' divides by the number of positives as a device scalar, max(N_pos, 1) (Note [Exact
positive count]). With no positives the class loss is 0 with a zero gradient, as MMDetection's
cls_score[pos].sum(). Only reduction='none', whose result has N_pos rows, selects them on the
host.

Quirks kept: the counts are updated before the loss (and before the ValueError that 'sum' with an
avg_factor raises); 'none' returns (N_pos,) and (N,) losses, whose sum with return_dict=False
only broadcasts when N_pos is N or 1, as in MMDetection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import buffers
from ..build import check, col_input
from ..errors import ConfigAssertion, InputAssertion, InputShapeError
from ..config import check_reduction, parse
from ..inputs import (FLOATS, INTS, Exact, check_label_range, check_pred, compute_dtype, fail,
                      target_form)
from ..plans import _is_compiling
from ..registry import register_loss
from ..symbolic import (class_index, clamp, exp, log, logsumexp, maximum, rowmax, rowsum,
                        stop_gradient, take, where)
from .ghm import count_values

FORWARD = ("cls_score", "labels", "label_weights=None", "avg_factor=None",
           "reduction_override=None")
CUM = "cum_samples"     # the kernel's per-column input: cum_samples[:C], padded to C + 2


def _bind_target(spec, call, target):
    """The forward hook passes (labels, per-column counts); the counts are a kernel input."""
    labels, cum = target
    call.target_form = target_form(spec.name, "labels", call.pred, labels)
    call.tensors["label"] = labels
    call.tensors[CUM] = cum


def _num_pos(spec, call):
    """'mean' without avg_factor averages over the positive rows (at least 1), on the device:
    MMDetection's mean over the selected rows divides by their count exactly (no eps)."""
    labels = call.tensors["label"]
    n = (labels < spec.kwargs()["num_classes"]).sum().to(compute_dtype(call.pred.dtype)).clamp(min=1)
    return Exact(n)


def _state(spec):
    return {"cum_samples": torch.zeros(spec.kwargs()["num_classes"] + 1, dtype=torch.float)}


def _objectness_loss(module):
    """The objectness part is MMDetection's softmax cross_entropy: lossgraph's own
    CrossEntropyLoss, compiled once per module for its backend, reduction and loss_weight."""
    sub = module.__dict__.get("_objectness")
    if sub is None:
        from ..runtime import CompiledLoss   # runtime imports the losses package
        cfg = dict(type="CrossEntropyLoss", reduction=module.spec.reduction,
                   loss_weight=module.spec.loss_weight)
        sub = CompiledLoss(parse(cfg), module.compiler.backend, module.compiler.dump_dir)
        module.__dict__["_objectness"] = sub   # a plain attribute: no submodule, no state_dict key
    return sub


def _check_inputs(module, a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    spec, c = module.spec, module.num_classes
    cls_score = check_pred(spec.name, a["pred"])
    if cls_score.shape[-1] != c + 2:
        fail(spec.name, f"cls_score must have num_classes + 2 = {c + 2} channels (classes, then "
                        f"object and background), got shape {tuple(cls_score.shape)}",
             InputShapeError)
    labels = a["target"]
    target_form(spec.name, "labels", cls_score, labels)
    check_label_range(spec.name, labels, 0, c, f"{c} = background")
    if module.cum_samples.device != cls_score.device:
        fail(spec.name, f"the cum_samples buffer is on {module.cum_samples.device} but cls_score "
                        f"is on {cls_score.device}: move the loss with .to(device)")
    lw = a.get("weight")
    if lw is not None:
        if not isinstance(lw, torch.Tensor) or lw.dtype not in FLOATS + INTS + (torch.bool,):
            fail(spec.name, f"label_weights must be a numeric tensor or None, got "
                            f"{getattr(lw, 'dtype', type(lw).__name__)}")
        if lw.device != cls_score.device:
            fail(spec.name, f"label_weights is on {lw.device} but cls_score is on "
                            f"{cls_score.device}")
    return cls_score, labels, lw


def _forward(module, a):
    """Update the class counts, then run the class kernel and the objectness kernel."""
    spec, c = module.spec, module.num_classes
    override = a.get("reduction_override")
    if override is not None:
        check_reduction(spec.name, override, "reduction_override")
    cls_score, labels, lw = _check_inputs(module, a)
    with torch.no_grad():
        cum = module.cum_samples
        cum.add_(count_values(labels, c + 1).to(cum.dtype))
        cols = torch.cat([cum.narrow(0, 0, c), cum.new_ones(2)]).to(compute_dtype(cls_score.dtype))
    lw = lw.float() if lw is not None else labels.new_ones(labels.shape, dtype=torch.float32)
    args = (labels, cols, lw, a.get("avg_factor"), override)
    if _one_gradient(cls_score, lw, args[3], override or spec.reduction):
        classes, objectness = _Joint.apply(cls_score, module, args)
    else:
        classes, objectness = _parts(module, cls_score, cls_score.narrow(-1, c, 2), *args)
    if module.return_dict:
        return {"loss_cls_objectness": objectness, "loss_cls_classes": classes}
    return classes + objectness


def _parts(module, pred, obj_pred, labels, cols, lw, avg, override):
    """(class loss, objectness loss): the class kernel on pred (N, C + 2), the objectness kernel
    on obj_pred, pred's last 2 columns; the counts `cols` are already updated."""
    c = module.num_classes
    classes = module.run_pipeline({"pred": pred, "target": (labels, cols), "weight": lw,
                                   "avg_factor": avg, "reduction_override": override})
    if (override or module.spec.reduction) == "none":
        pos = labels < c
        classes = classes[pos] if bool(pos.any()) else pred[..., :c][pos].sum()
    objectness = _objectness_loss(module)(obj_pred, (labels == c).long(), lw, avg, override)
    return classes, objectness


JOINT_MIN_BYTES = buffers.MIN_BYTES   # Note [Seesaw's one gradient]: below, two branches


def _one_gradient(cls_score, lw, avg, reduction: str) -> bool:
    """Whether _Joint applies: a gradient of a large cls_score alone, a reduced loss, eager
    autograd."""
    return torch.is_grad_enabled() and cls_score.requires_grad and not lw.requires_grad and \
        not (isinstance(avg, torch.Tensor) and avg.requires_grad) and reduction != "none" and \
        cls_score.numel() * cls_score.element_size() >= JOINT_MIN_BYTES and not _is_compiling()


class _Joint(torch.autograd.Function):
    """Both parts of one cls_score, with one gradient buffer: Note [Seesaw's one gradient].

    Note [Seesaw's one gradient]: the class kernel reads all C + 2 columns and returns an
    N x (C + 2) gradient; the objectness kernel reads the last 2. Given to autograd as two
    branches, the objectness part's narrow() backward allocates a zeroed N x (C + 2) tensor for
    its N x 2 gradient and the engine adds the two full-size gradients: two more passes over
    N x (C + 2) floats, plus the fresh tensor's page faults, which cost more than both kernels
    at 0% positives (6 of 11 ms at 4096 x 1205). Here forward runs both parts under
    enable_grad, each on a detached leaf of its own (cls_score for the class part, a contiguous
    copy of its last 2 columns for the objectness part), so each keeps its fused kernel, plans
    and loss scaling; backward takes both parts' gradients from their small graphs (one engine
    run) and adds the N x 2 objectness gradient into the class gradient's last 2 columns in
    place (the class gradient is 0 there: those columns are masked with -inf), so the class
    kernel's buffer is the gradient autograd receives. An output the backward does not reach
    gets no gradient (set_materialize_grads(False)). The result is the two-branch sum, in the
    same dtype and rounding, except that a -0.0 of the class gradient stays -0.0 (the zero
    padding made it +0.0). create_graph=True recomputes both parts on cls_score itself
    (without counting again) and differentiates them as the two-branch form does.

    The two branches remain where this does not apply (reduction='none', label_weights or
    avg_factor requiring grad, torch.compile) and below JOINT_MIN_BYTES (the output pool's
    threshold, 1 MiB): a small gradient is malloc'd without page faults and its fill and add
    cost less than the engine run this backward adds (measured, thread CPU time: +10% per
    call at 64 x 22, even at 1024 x 256, -8% at 1024 x 512, -11% at 2048 x 1205).
    """

    @staticmethod
    def forward(ctx, cls_score, module, args):
        ctx.set_materialize_grads(False)
        c = module.num_classes
        with torch.enable_grad():
            x = cls_score.detach().requires_grad_()
            xo = cls_score.detach().narrow(-1, c, 2).contiguous().requires_grad_()
            parts = _parts(module, x, xo, *args)
        ctx.parts, ctx.leaves, ctx.module, ctx.args = parts, (x, xo), module, args
        ctx.pred = cls_score   # for create_graph=True only (as _Fused, no version check)
        return tuple(p.detach() for p in parts)

    @staticmethod
    def backward(ctx, g_cls, g_obj):
        if torch.is_grad_enabled():   # create_graph=True
            return _double_backward(ctx, g_cls, g_obj), None, None
        outs, gs = _reached(ctx.parts, (g_cls, g_obj))
        if not outs:
            return None, None, None
        # one engine run through both parts' graphs, kept for a retain_graph=True backward
        grad, obj = torch.autograd.grad(outs, ctx.leaves, gs, retain_graph=True,
                                        allow_unused=True)
        if obj is not None:
            if grad is None:
                grad = torch.zeros_like(ctx.leaves[0])
            grad.narrow(-1, ctx.module.num_classes, 2).add_(obj)
        return grad, None, None


def _reached(parts, grads) -> tuple[list, list]:
    """(outputs, grad_outputs) of the parts the backward reached and that have a gradient."""
    used = [(p, g) for p, g in zip(parts, grads) if g is not None and p.requires_grad]
    return [p for p, _ in used], [g for _, g in used]


def _double_backward(ctx, g_cls, g_obj):
    """The gradient as the two-branch form gives it, differentiable (create_graph=True)."""
    pred, c = ctx.pred, ctx.module.num_classes
    outs, gs = _reached(_parts(ctx.module, pred, pred.narrow(-1, c, 2), *ctx.args),
                        (g_cls, g_obj))
    if not outs:
        return None
    return torch.autograd.grad(outs, pred, gs, create_graph=True, allow_unused=True)[0]


# -- the hooks heads call -----------------------------------------------------------------------

def _split(self, cls_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cls_score.size(-1) != self.num_classes + 2:
        fail(self.spec.name, f"cls_score must have num_classes + 2 = {self.num_classes + 2} "
                             f"channels, got shape {tuple(cls_score.shape)}", InputShapeError)
    return cls_score[..., :-2], cls_score[..., -2:]


def get_cls_channels(self, num_classes: int) -> int:
    """The classifier's output channels: num_classes + 2 (the two objectness logits)."""
    if num_classes != self.num_classes:
        fail(self.spec.name, f"get_cls_channels({num_classes}) but the loss was configured with "
                             f"num_classes={self.num_classes}", InputAssertion)
    return num_classes + 2


def get_activation(self, cls_score: torch.Tensor) -> torch.Tensor:
    """(N, C + 1) scores: softmax(classes) * P(object), then P(background)."""
    classes, objectness = _split(self, cls_score)
    p_cls = F.softmax(classes, dim=-1)
    p_obj = F.softmax(objectness, dim=-1)
    return torch.cat([p_cls * p_obj[..., [0]], p_obj[..., [1]]], dim=-1)


def top1_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Percentage of rows whose top-1 class is the target, as a (1,) tensor (0-d 0 if no rows);
    the same topk, ties and rounding as mmdet's accuracy(pred, target, topk=1)."""
    if pred.size(0) == 0:
        return pred.new_tensor(0.0)
    top = pred.topk(1, dim=1).indices.reshape(-1)
    correct = (top == target.reshape(-1)).float().sum(0, keepdim=True)
    return correct.mul_(100.0 / pred.size(0))


def get_accuracy(self, cls_score: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'acc_objectness', 'acc_classes'}: top-1 accuracy of each part (classes on positives)."""
    pos = labels < self.num_classes
    classes, objectness = _split(self, cls_score)
    return {"acc_objectness": top1_accuracy(objectness, (labels == self.num_classes).long()),
            "acc_classes": top1_accuracy(classes[pos], labels[pos])}


def _attrs(spec):
    return {"custom_cls_channels": True, "custom_activation": True, "custom_accuracy": True,
            "get_cls_channels": get_cls_channels, "get_activation": get_activation,
            "get_accuracy": get_accuracy}


@register_loss("SeesawLoss", target="labels", weight="rows", forward=FORWARD,
               quirks=("weight_float",),
               hooks={"forward": _forward, "bind_target": _bind_target, "avg_factor": _num_pos,
                      "state": _state, "attrs": _attrs}, _builtin=True)
def seesaw_loss(pred, target, use_sigmoid: bool = False, p: float = 0.8, q: float = 2.0,
                num_classes: int = 1203, eps: float = 1e-2, return_dict: bool = True):
    """The class part, per row of the full (N, C + 2) score: CE(z', y) on positive rows, else 0.

    z' = z + log(M * K) off the label column (see the module docstring); the objectness columns
    are masked out with -inf. M and K carry no gradient (counts; a detached softmax).

    Note [Seesaw in the log domain]: log(M * K) is formed as p log(N_j / N_y) + q (log s_j -
    log max(s_y, eps)) with log s_j = (z_j - max z) - log sum exp(z - max z): one log per element
    where MMDetection's form takes a pow for M, a softmax division and a pow for K, and a log of
    their product; the two agree to float rounding (and K's test s_j / max(s_y, eps) > 1 is the
    same test on the logs).

    Note [Seesaw shifted first]: the row max of the class logits is subtracted before log(M K)
    is added: at |z| = 2^20 z + log(M K) rounds to an eighth, as it does in MMDetection (an
    error of 2e4 ulps of the loss), while z - max z is exact (Sterbenz) and small, so the sum
    rounds relative to a small number. The CE is the same in exact arithmetic (it is invariant
    under a shift of the row); the shift carries no gradient, as a shift of a softmax has none,
    and a row with NaN or +inf still gives NaN (inf - inf).

    Note [Seesaw background rows]: MMDetection computes the class part on the selected positive
    rows only, so a background row's logits never enter it: pred is replaced by 0 there, the
    row's loss and gradient fold to 0 and the cpp kernel skips the row (Note [Skipped rows]).
    """
    check(not use_sigmoid, "use_sigmoid=True is not supported: SeesawLoss is a softmax loss",
          ConfigAssertion)
    check(num_classes >= 1, f"num_classes must be a positive integer, got {num_classes}")
    pos = target < num_classes
    x = where(pos, pred, 0.0)   # Note [Seesaw background rows]
    k = class_index(pred)
    z = where(k < num_classes, x, -math.inf)
    z = z - stop_gradient(rowmax(z))   # Note [Seesaw shifted first]
    log_factor = None
    if p > 0:       # mitigation: (N_j / N_y)^p where class j has fewer samples than the label y
        counts = clamp(col_input(CUM), min=1.0)
        ratio = counts / take(counts, target)
        log_factor = where(ratio < 1.0, p * log(ratio), 0.0)
    if q > 0:       # compensation: (s_j / max(s_y, eps))^q where class j scores above the label
        zd = stop_gradient(z)   # its row max is 0 already (NaN in a row with NaN or +inf)
        log_total = log(rowsum(exp(zd)))
        log_s_y = maximum(take(zd, target) - log_total, math.log(eps))
        log_ratio = (zd - log_total) - log_s_y
        comp = where(log_ratio > 0.0, q * log_ratio, 0.0)
        log_factor = comp if log_factor is None else log_factor + comp
    if log_factor is not None:
        z = where(k == target, z, z + log_factor)
    nll = logsumexp(z) - take(z, target)
    return where(pos, nll, 0.0)
