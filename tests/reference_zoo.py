"""Independent eager references of the rest of the MMDetection 3.3.0 zoo lossgraph compiles: the
IoU family, QualityFocal, DistributionFocal, KD, Dice, CrossEntropyLoss use_mask, the V3Det
custom losses and GaussianFocalLoss's pos_inds path.

Written from /work/shared/reference/mmdet-losses.md (sections 1.2-1.5 for the pipeline, 2.2 for
the formulas), not from MMDetection's code. Run them on float64 inputs for exact values; torch
autograd on them gives the reference gradients (including torch's half-and-half split of the
gradient at ties of max/min, and clamp passing the gradient at its bound). Each function takes the
config dict, then MMDetection's forward arguments, and returns what MMDetection's module returns.
"""
from __future__ import annotations

import math

import torch

from reference_losses import (bce_prob, bce_with_logits, cross_entropy_loss, focal_loss,
                              module_reduction, options, weight_reduce_loss)

# -- the IoU family (decoded boxes x1, y1, x2, y2) ------------------------------------------------


def _cols(b: torch.Tensor):
    return b.unbind(-1)


def _inter(p, t):
    """Intersection width and height (clamped at 0) and area."""
    iw = torch.clamp(torch.minimum(p[2], t[2]) - torch.maximum(p[0], t[0]), min=0)
    ih = torch.clamp(torch.minimum(p[3], t[3]) - torch.maximum(p[1], t[1]), min=0)
    return iw * ih


def _enclosing(p, t, lo):
    ew = torch.clamp(torch.maximum(p[2], t[2]) - torch.minimum(p[0], t[0]), min=lo)
    eh = torch.clamp(torch.maximum(p[3], t[3]) - torch.minimum(p[1], t[1]), min=lo)
    return ew, eh


def _area(b):
    return (b[2] - b[0]) * (b[3] - b[1])


def overlaps(pred, target, eps, giou=False):
    """bbox_overlaps(is_aligned=True): union and enclosing area are max(., eps).

    Section 2.2: a max with an eps tensor, not a clamp. The values agree, the gradients differ
    at a NaN: maximum's backward passes the gradient to a NaN operand (none of its masks hold),
    clamp's sends it 0, so a NaN coordinate makes the whole row's gradient NaN in MMDetection,
    and a clamp here gave NaN in two columns and 0 in the other two."""
    p, t = _cols(pred), _cols(target)
    inter = _inter(p, t)
    floor = inter.new_tensor(eps)
    union = torch.maximum(_area(p) + _area(t) - inter, floor)
    iou = inter / union
    if not giou:
        return iou
    ew, eh = _enclosing(p, t, 0)
    enclose = torch.maximum(ew * eh, floor)
    return iou - (enclose - union) / enclose


def _center_dist2(p, t):
    dx = (t[0] + t[2]) - (p[0] + p[2])
    dy = (t[1] + t[3]) - (p[1] + p[3])
    return dx ** 2 / 4 + dy ** 2 / 4


def _iou_eps(p, t, eps):
    inter = _inter(p, t)
    return inter / (_area(p) + _area(t) - inter + eps)


def iou_elem(name, o, pred, target):
    """The per-box loss of each IoU-family member (BoundedIoU: per box and side, (N, 4))."""
    eps = o["eps"]
    p, t = _cols(pred), _cols(target)
    if name == "IoULoss":
        mode = "linear" if o["linear"] else o["mode"]
        u = torch.clamp(overlaps(pred, target, 1e-6), min=eps)
        return {"linear": 1 - u, "square": 1 - u * u, "log": -torch.log(u)}[mode]
    if name == "GIoULoss":
        return 1 - overlaps(pred, target, eps, giou=True)
    if name in ("DIoULoss", "CIoULoss"):
        iou = _iou_eps(p, t, eps)
        ew, eh = _enclosing(p, t, 0)
        penalty = _center_dist2(p, t) / (ew ** 2 + eh ** 2 + eps)
        if name == "DIoULoss":
            return 1 - (iou - penalty)
        aspect = torch.atan((t[2] - t[0]) / (t[3] - t[1] + eps)) - \
            torch.atan((p[2] - p[0]) / (p[3] - p[1] + eps))
        v = 4 / math.pi ** 2 * aspect ** 2
        with torch.no_grad():
            alpha = (iou > 0.5).to(v.dtype) * v / (1 - iou + v)
        return 1 - torch.clamp(iou - (penalty + alpha * v), -1, 1)
    if name == "EIoULoss":
        return _eiou(p, t, eps, o["smooth_point"])
    if name == "SIoULoss":
        return _siou(p, t, eps, o["neg_gamma"])
    if name == "BoundedIoULoss":
        return _bounded(p, [c.detach() for c in t], o["beta"], eps)
    raise KeyError(name)


def _eiou(p, t, eps, sp):
    """1 - I / (area_p + area_t - I + eps), I the signed corner-area expression; smooth at sp."""
    x0, y0 = torch.minimum(p[0], t[0]), torch.minimum(p[1], t[1])
    ax, ay = torch.maximum(p[0], t[0]) - x0, torch.maximum(p[1], t[1]) - y0
    bx, by = torch.minimum(p[2], t[2]) - x0, torch.minimum(p[3], t[3]) - y0
    # I = bx by + min(ax,bx) min(ay,by) - ax max(ay,by) - max(ax,bx) ay
    inter = bx * by + torch.minimum(ax, bx) * torch.minimum(ay, by) - \
        ax * torch.maximum(ay, by) - torch.maximum(ax, bx) * ay
    e = 1 - inter / (_area(p) + _area(t) - inter + eps)
    small = (e < sp).to(e.dtype)
    return small * 0.5 * e ** 2 / sp + (1 - small) * (e - 0.5 * sp)


def _siou(p, t, eps, neg_gamma):
    iou = _iou_eps(p, t, eps)
    ew, eh = _enclosing(p, t, eps)
    wp, hp = p[2] - p[0], p[3] - p[1] + eps
    wt, ht = t[2] - t[0], t[3] - t[1] + eps
    cx = (t[0] + t[2] - p[0] - p[2]) / 2 + eps
    cy = (t[1] + t[3] - p[1] - p[3]) / 2 + eps
    dist = torch.sqrt(cx ** 2 + cy ** 2)
    sx, sy = cx.abs() / dist, cy.abs() / dist
    sin_a = torch.where(sx > 2 ** 0.5 / 2, sy, sx)
    angle = torch.cos(2 * torch.asin(sin_a) - math.pi / 2)
    gamma = angle - 2 if neg_gamma else 2 - angle
    distance = 2 - torch.exp(gamma * (cx / ew) ** 2) - torch.exp(gamma * (cy / eh) ** 2)
    ow = (wp - wt).abs() / torch.maximum(wp, wt)
    oh = (hp - ht).abs() / torch.maximum(hp, ht)
    shape = (1 - torch.exp(-ow)) ** 4 + (1 - torch.exp(-oh)) ** 4
    return 1 - torch.clamp(iou - (distance + shape) / 2, -1, 1)


def _bounded(p, t, beta, eps):
    pw, ph = p[2] - p[0], p[3] - p[1]
    tw, th = t[2] - t[0], t[3] - t[1]
    dx = (t[0] + t[2]) / 2 - (p[0] + p[2]) / 2
    dy = (t[1] + t[3]) / 2 - (p[1] + p[3]) / 2
    zero = torch.zeros_like(dx)
    lx = 1 - torch.maximum((tw - 2 * dx.abs()) / (tw + 2 * dx.abs() + eps), zero)
    ly = 1 - torch.maximum((th - 2 * dy.abs()) / (th + 2 * dy.abs() + eps), zero)
    lw = 1 - torch.minimum(tw / (pw + eps), pw / (tw + eps))
    lh = 1 - torch.minimum(th / (ph + eps), ph / (th + eps))
    d = torch.stack([lx, ly, lw, lh], -1)
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


IOU_DEFAULTS = {
    "IoULoss": dict(linear=False, eps=1e-6, mode="log"),
    "BoundedIoULoss": dict(beta=0.2, eps=1e-3),
    "GIoULoss": dict(eps=1e-6), "DIoULoss": dict(eps=1e-6), "CIoULoss": dict(eps=1e-6),
    "EIoULoss": dict(eps=1e-6, smooth_point=0.1), "SIoULoss": dict(eps=1e-6, neg_gamma=False),
}


def iou_family(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """Section 1.4/1.5 for the IoU family: the v3 zero-weight early exit (IoULoss: only when the
    reduction is not 'none'), a (N, 4) weight averaged to (N,) (not for BoundedIoU), then reduce."""
    name = cfg["type"]
    o = options(cfg, IOU_DEFAULTS[name])
    if name == "IoULoss":
        reduction = module_reduction(o, reduction_override)
        exits = reduction != "none"
    else:
        exits = True
    if exits and weight is not None and not bool((weight > 0).any()):
        w = weight.unsqueeze(1) if pred.dim() == weight.dim() + 1 else weight
        return (pred * w).sum()
    reduction = module_reduction(o, reduction_override)
    if weight is not None and weight.dim() > 1 and name != "BoundedIoULoss":
        assert weight.shape == pred.shape
        weight = weight.mean(-1)
    loss = iou_elem(name, o, pred, target)
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


# -- QualityFocalLoss, DistributionFocalLoss --------------------------------------------------


def qfl_dense_target(pred, target):
    """The tuple (labels, scores) as the dense target: score at the label column, 0 elsewhere."""
    if isinstance(target, torch.Tensor):
        return target.to(pred.dtype)
    labels, scores = target
    hit = labels.reshape(-1, 1) == torch.arange(pred.shape[-1])
    return torch.where(hit, scores.to(pred.dtype).reshape(-1, 1), torch.zeros((), dtype=pred.dtype))


def quality_focal_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """Row sum over C of BCE(x, s) |s - sigmoid(x)|^beta (s = 0 for negatives); then reduce."""
    o = options(cfg, dict(use_sigmoid=True, beta=2.0, activated=False))
    assert o["use_sigmoid"]
    reduction = module_reduction(o, reduction_override)
    s = qfl_dense_target(pred, target)
    if o["activated"]:
        loss = bce_prob(pred, s) * (s - pred).abs().pow(o["beta"])
    else:
        loss = bce_with_logits(pred, s) * (s - torch.sigmoid(pred)).abs().pow(o["beta"])
    return o["loss_weight"] * weight_reduce_loss(loss.sum(-1), weight, reduction, avg_factor)


def distribution_focal_loss(cfg, pred, target, weight=None, avg_factor=None,
                            reduction_override=None):
    """Two-point softmax CE at trunc(y) and trunc(y) + 1, weighted by the distances to y."""
    o = options(cfg, {})
    reduction = module_reduction(o, reduction_override)
    left = torch.trunc(target).long()
    logp = torch.log_softmax(pred, dim=-1)
    ce_l = -logp.gather(-1, left[:, None])[:, 0]
    ce_r = -logp.gather(-1, left[:, None] + 1)[:, 0]
    y = target.to(pred.dtype)
    loss = ce_l * (left + 1 - y) + ce_r * (y - left)
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


# -- KnowledgeDistillationKLDivLoss, DiceLoss ---------------------------------------------------


def kd_loss(cfg, pred, soft_label, weight=None, avg_factor=None, reduction_override=None):
    """T^2 * mean over K of q (log q - log_softmax(pred / T)); q = softmax(soft / T) detached."""
    o = options(cfg, dict(T=10))
    assert o["T"] >= 1
    reduction = module_reduction(o, reduction_override)
    T = o["T"]
    q = torch.softmax(soft_label.to(pred.dtype) / T, dim=-1).detach()
    kl = torch.xlogy(q, q) - q * torch.log_softmax(pred / T, dim=-1)
    return o["loss_weight"] * weight_reduce_loss(kl.mean(-1) * T * T, weight, reduction,
                                                 avg_factor)


def dice_loss(cfg, pred, target, weight=None, reduction_override=None, avg_factor=None):
    """1 - Dice per instance over the flattened mask; V-Net (squares, eps on each) or naive."""
    o = options(cfg, dict(use_sigmoid=True, activate=True, naive_dice=False, eps=1e-3))
    reduction = module_reduction(o, reduction_override)
    if o["activate"]:
        assert o["use_sigmoid"]
        pred = torch.sigmoid(pred)
    p, t = pred.flatten(1), target.flatten(1).to(pred.dtype)
    eps, inter = o["eps"], (p * t).sum(1)
    if o["naive_dice"]:
        d = (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)
    else:
        d = 2 * inter / ((p * p).sum(1) + eps + ((t * t).sum(1) + eps))
    if weight is not None:
        assert weight.dim() == 1 and len(weight) == len(pred)
    return o["loss_weight"] * weight_reduce_loss(1 - d, weight, reduction, avg_factor)


# -- CrossEntropyLoss(use_mask=True), the V3Det custom losses, GaussianFocal pos_inds -------------

CE = dict(use_sigmoid=False, use_mask=False, class_weight=None, ignore_index=None,
          avg_non_ignore=False)


def mask_cross_entropy(cfg, pred, target, label, avg_factor=None, reduction_override=None,
                       ignore_index=None):
    """Mean BCE-with-logits of each RoI's label channel, class_weight a broadcast weight; (1,)."""
    o = options(cfg, CE)
    assert o["use_mask"] and not o["use_sigmoid"]
    reduction = module_reduction(o, reduction_override)
    assert (ignore_index if ignore_index is not None else o["ignore_index"]) is None
    assert reduction == "mean" and avg_factor is None
    x = pred[torch.arange(len(pred)), label]
    loss = bce_with_logits(x, target.to(pred.dtype))
    if o["class_weight"] is not None:
        loss = loss * torch.tensor(o["class_weight"], dtype=pred.dtype)
    return (o["loss_weight"] * loss.mean()).reshape(1)


def _without(cfg, *keys):
    return {k: v for k, v in cfg.items() if k not in keys}


def cross_entropy_custom_loss(cfg, *args, **kwargs):
    """CrossEntropyLoss with num_classes (which only the custom head hooks use)."""
    assert cfg.get("num_classes", -1) != -1
    cfg = {**_without(cfg, "num_classes"), "type": "CrossEntropyLoss"}
    if cfg.get("use_mask"):
        return mask_cross_entropy(cfg, *args, **kwargs)
    return cross_entropy_loss(cfg, *args, **kwargs)


def focal_custom_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """FocalLoss on logits with index labels; `activated` is ignored, num_classes required."""
    assert cfg.get("num_classes", -1) != -1
    cfg = {**_without(cfg, "num_classes", "activated"), "type": "FocalLoss"}
    return focal_loss(cfg, pred, target, weight, avg_factor, reduction_override)


GAUSSIAN = dict(alpha=2.0, gamma=4.0, pos_weight=1.0, neg_weight=1.0)


def gaussian_focal_pos_inds(cfg, pred, target, pos_inds, pos_labels, weight=None,
                            avg_factor=None, reduction_override=None):
    """CenterNet-update: positive term at pred[pos_inds, pos_labels] and negative term over all
    elements, each reduced on its own (same reduction and avg_factor); `weight` is ignored."""
    o = options(cfg, GAUSSIAN)
    reduction = module_reduction(o, reduction_override)
    p = pred[pos_inds].gather(1, pos_labels[:, None])
    pos = -torch.log(p + 1e-12) * (1 - p) ** o["alpha"]
    neg = -torch.log(1 - pred + 1e-12) * pred ** o["alpha"] * (1 - target) ** o["gamma"]
    pos = weight_reduce_loss(pos, None, reduction, avg_factor)
    neg = weight_reduce_loss(neg, None, reduction, avg_factor)
    return o["loss_weight"] * (o["pos_weight"] * pos + o["neg_weight"] * neg)


def zoo_reference(cfg: dict, *args, **kwargs):
    """What MMDetection's module built from cfg returns for forward(*args, **kwargs)."""
    name = cfg["type"]
    if name in IOU_DEFAULTS:
        return iou_family(cfg, *args, **kwargs)
    if name == "CrossEntropyLoss":
        return mask_cross_entropy(cfg, *args, **kwargs) if cfg.get("use_mask") else \
            cross_entropy_loss(cfg, *args, **kwargs)
    return {"QualityFocalLoss": quality_focal_loss,
            "DistributionFocalLoss": distribution_focal_loss,
            "KnowledgeDistillationKLDivLoss": kd_loss, "DiceLoss": dice_loss,
            "CrossEntropyCustomLoss": cross_entropy_custom_loss,
            "FocalCustomLoss": focal_custom_loss,
            "GaussianFocalLoss": gaussian_focal_pos_inds}[name](cfg, *args, **kwargs)



# -- comparing a compiled loss with these references -----------------------------------------------

def check_zoo(loss, cfg: dict, pred: torch.Tensor, *args, grad_out=None, **kwargs):
    """conftest.check_case against the zoo's float64 references: same shape and dtype as
    MMDetection's result, value and d/dpred within tolerance, inputs unmodified."""
    from conftest import check_case
    return check_case(loss, cfg, pred, *args, grad_out=grad_out, reference_fn=zoo_reference,
                      **kwargs)
