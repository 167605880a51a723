"""The IoU family (iou_loss.py): IoU, BoundedIoU, GIoU, DIoU, CIoU, EIoU and SIoU on decoded boxes.

Boxes are (x1, y1, x2, y2) rows; `pred[j]` reads column j of each row, so the math is per row and
each loss is one value per box ((N,4) for BoundedIoULoss). The expressions follow MMDetection
3.3.0 term by term (same operations in the same order, the same max-with-eps in bbox_overlaps),
so float32 values round as MMDetection's do; its quirks are reproduced and named in each docstring.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal


from ..config import check_reduction
from ..inputs import fail
from ..registry import register_loss
from ..symbolic import (abs, asin, atan, clamp, class_index, cos, exp, log, maximum, minimum,
                        stop_gradient, to_float, where)
from .pipeline import DEVICE_EXIT, zero_weight_exit, zero_weight_forward


def check_boxes(spec, call):
    """pred and target hold boxes: the last axis has the 4 columns x1, y1, x2, y2."""
    if call.width != 4:
        fail(spec.name, f"pred must hold boxes (x1, y1, x2, y2) in its last axis, got shape "
                        f"{tuple(call.pred.shape)}")


def iou_zero_weight_exit(spec, a):
    """IoULoss's early exit: like the v3 one, but after the reduction_override check and only when
    the reduction is not 'none' (iou_loss.py); it returns (pred * weight).sum() with a host sync."""
    override = a.get("reduction_override")
    if override is not None:
        check_reduction(spec.name, override, "reduction_override")
    if (override or spec.reduction) == "none" or a.get(DEVICE_EXIT):
        return None
    return zero_weight_exit(spec, a)


def _warn_linear(spec):
    if spec.kwargs()["linear"]:
        warnings.warn('DeprecationWarning: Setting "linear=True" in IOULoss is deprecated, please '
                      'use "mode=`linear`" instead.', stacklevel=4)


IOU_HOOKS = {"early_exit": zero_weight_exit, "forward": zero_weight_forward,
             "check": check_boxes}


def _boxes(x):
    return x[0], x[1], x[2], x[3]


def _overlap(p, t):
    """Intersection area: clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0)."""
    w = clamp(minimum(p[2], t[2]) - maximum(p[0], t[0]), min=0.0)
    h = clamp(minimum(p[3], t[3]) - maximum(p[1], t[1]), min=0.0)
    return w * h


def _enclose_wh(p, t, lo):
    """Width and height of the smallest enclosing box, clamped at `lo`."""
    cw = clamp(maximum(p[2], t[2]) - minimum(p[0], t[0]), min=lo)
    ch = clamp(maximum(p[3], t[3]) - minimum(p[1], t[1]), min=lo)
    return cw, ch


def _area(b):
    return (b[2] - b[0]) * (b[3] - b[1])


def bbox_iou(p, t, eps: float, giou: bool = False):
    """bbox_overlaps(is_aligned=True): union and enclose area are max(., eps), not + eps."""
    overlap = _overlap(p, t)
    union = maximum(_area(p) + _area(t) - overlap, eps)
    ious = overlap / union
    if not giou:
        return ious
    cw, ch = _enclose_wh(p, t, 0.0)
    enclose = maximum(cw * ch, eps)
    return ious - (enclose - union) / enclose


def _iou_plus_eps(p, t, eps: float):
    """DIoU/CIoU/SIoU's IoU: overlap / (area_p + area_t - overlap + eps)."""
    overlap = _overlap(p, t)
    return overlap / (_area(p) + _area(t) - overlap + eps)


def _rho2(p, t):
    """Squared distance of the box centers, written as in diou_loss."""
    left = ((t[0] + t[2]) - (p[0] + p[2])) ** 2 / 4
    right = ((t[1] + t[3]) - (p[1] + p[3])) ** 2 / 4
    return left + right


@register_loss("IoULoss", weight="iou", hooks={"early_exit": iou_zero_weight_exit,
                                               "forward": zero_weight_forward,
                                               "check": check_boxes, "init": _warn_linear},
               _builtin=True)
def iou_loss(pred, target, linear: bool = False, eps: float = 1e-6,
             mode: Literal["linear", "square", "log"] = "log"):
    """1 - u, 1 - u^2 or -log(u), u = clamp(bbox_overlaps(pred, target), min=eps).

    bbox_overlaps keeps its own eps of 1e-6 (union = max(union, 1e-6)); the config's eps is only
    the clamp. `linear=True` is the deprecated spelling of mode='linear' (it warns). Quirks as in
    MMDetection 3.3.0: the all-zero-weight early exit only when the reduction is not 'none'
    (after the reduction_override check); a (N,4) weight is averaged to (N,).
    """
    if linear:
        mode = "linear"
    u = clamp(bbox_iou(_boxes(pred), _boxes(target), 1e-6), min=eps)
    if mode == "linear":
        return 1 - u
    if mode == "square":
        return 1 - u ** 2
    return -log(u)


@register_loss("BoundedIoULoss", hooks=IOU_HOOKS, _builtin=True)
def bounded_iou_loss(pred, target, beta: float = 0.2, eps: float = 1e-3):
    """Smooth-L1 (threshold beta) of [1 - x-fit, 1 - y-fit, 1 - w-ratio, 1 - h-ratio], (N,4).

    The target's centers and sizes are constants (no_grad in MMDetection). Raw weight broadcasting
    against the (N,4) loss; v3 all-zero-weight early exit (before the reduction_override check).
    """
    p, t = _boxes(pred), tuple(stop_gradient(c) for c in _boxes(target))
    pcx, pcy = (p[0] + p[2]) * 0.5, (p[1] + p[3]) * 0.5
    pw, ph = p[2] - p[0], p[3] - p[1]
    tcx, tcy = (t[0] + t[2]) * 0.5, (t[1] + t[3]) * 0.5
    tw, th = t[2] - t[0], t[3] - t[1]
    dx, dy = tcx - pcx, tcy - pcy
    loss_dx = 1 - maximum((tw - 2 * abs(dx)) / (tw + 2 * abs(dx) + eps), 0.0)
    loss_dy = 1 - maximum((th - 2 * abs(dy)) / (th + 2 * abs(dy) + eps), 0.0)
    loss_dw = 1 - minimum(tw / (pw + eps), pw / (tw + eps))
    loss_dh = 1 - minimum(th / (ph + eps), ph / (th + eps))
    k = class_index(pred)
    comb = where(k == 0, loss_dx, where(k == 1, loss_dy, where(k == 2, loss_dw, loss_dh)))
    return where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta)


@register_loss("GIoULoss", weight="iou", hooks=IOU_HOOKS, _builtin=True)
def giou_loss(pred, target, eps: float = 1e-6):
    """1 - GIoU, GIoU = IoU - (enclose - union) / enclose, union and enclose = max(., eps).

    v3 quirks: the all-zero-weight early exit (a scalar even for 'none', loss_weight skipped);
    a (N,4) weight is averaged to (N,).
    """
    return 1 - bbox_iou(_boxes(pred), _boxes(target), eps, giou=True)


@register_loss("DIoULoss", weight="iou", hooks=IOU_HOOKS, _builtin=True)
def diou_loss(pred, target, eps: float = 1e-6):
    """1 - (IoU - rho^2 / c^2): union + eps, c^2 = cw^2 + ch^2 + eps (enclose clamped at 0).

    v3 quirks: the all-zero-weight early exit; a (N,4) weight is averaged to (N,).
    """
    p, t = _boxes(pred), _boxes(target)
    ious = _iou_plus_eps(p, t, eps)
    cw, ch = _enclose_wh(p, t, 0.0)
    c2 = cw ** 2 + ch ** 2 + eps
    return 1 - (ious - _rho2(p, t) / c2)


@register_loss("CIoULoss", weight="iou", hooks=IOU_HOOKS, _builtin=True)
def ciou_loss(pred, target, eps: float = 1e-6):
    """1 - clamp(IoU - (rho^2/c^2 + alpha v), -1, 1), v = 4/pi^2 (atan(wt/ht) - atan(wp/hp))^2.

    Quirks as in MMDetection 3.3.0: alpha = [IoU > 0.5] v / (1 - IoU + v) is a constant (no_grad),
    so CIoU equals DIoU wherever IoU <= 0.5; heights get + eps; in float32 two identical large
    boxes give IoU == 1 and v == 0, so alpha = 0/0 = NaN and the loss is NaN, as in MMDetection.
    Also the all-zero-weight early exit and the (N,4) weight averaged to (N,).
    """
    p, t = _boxes(pred), _boxes(target)
    ious = _iou_plus_eps(p, t, eps)
    cw, ch = _enclose_wh(p, t, 0.0)
    c2 = cw ** 2 + ch ** 2 + eps
    w1, h1 = p[2] - p[0], p[3] - p[1] + eps
    w2, h2 = t[2] - t[0], t[3] - t[1] + eps
    rho2 = _rho2(p, t)
    v = (4 / math.pi ** 2) * (atan(w2 / h2) - atan(w1 / h1)) ** 2
    alpha = stop_gradient(to_float(ious > 0.5) * v / (1 - ious + v))
    cious = ious - (rho2 / c2 + alpha * v)
    return 1 - clamp(cious, min=-1.0, max=1.0)


@register_loss("EIoULoss", weight="iou", hooks=IOU_HOOKS, _builtin=True)
def eiou_loss(pred, target, eps: float = 1e-6, smooth_point: float = 0.1):
    """Smooth-EIoU: e = 1 - I / (area_p + area_t - I + eps), 0.5 e^2/sp below sp, else e - sp/2.

    Quirk as in MMDetection 3.3.0: I is a signed-area expression built from the extent corner; it
    is the true intersection for overlapping boxes and goes negative for disjoint ones. The
    smooth switch is a constant mask (detached). Also the v3 zero-weight exit and (N,4) weights.
    """
    px1, py1, px2, py2 = _boxes(pred)
    tx1, ty1, tx2, ty2 = _boxes(target)
    ex1, ey1 = minimum(px1, tx1), minimum(py1, ty1)
    ix1, iy1 = maximum(px1, tx1), maximum(py1, ty1)
    ix2, iy2 = minimum(px2, tx2), minimum(py2, ty2)
    xmin, ymin = minimum(ix1, ix2), minimum(iy1, iy2)
    xmax, ymax = maximum(ix1, ix2), maximum(iy1, iy2)
    inter = (ix2 - ex1) * (iy2 - ey1) + (xmin - ex1) * (ymin - ey1) - \
        (ix1 - ex1) * (ymax - ey1) - (xmax - ex1) * (iy1 - ey1)
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + eps
    ious = 1 - (inter / union)
    sign = to_float(ious < smooth_point)
    return 0.5 * sign * ious ** 2 / smooth_point + (1 - sign) * (ious - 0.5 * smooth_point)


@register_loss("SIoULoss", weight="iou", hooks=IOU_HOOKS, _builtin=True)
def siou_loss(pred, target, eps: float = 1e-6, neg_gamma: bool = False):
    """1 - clamp(IoU - (distance_cost + shape_cost) / 2, -1, 1), YOLOv6's SIoU as in MMDetection.

    Quirk (default neg_gamma=False): gamma = 2 - angle_cost is positive, so the distance cost
    2 - e^(gamma rho_x) - e^(gamma rho_y) is <= 0 and *lowers* the loss as centers move apart
    (a disjoint pair can score below an overlapping one); neg_gamma=True is the paper's
    angle_cost - 2. Enclose sizes are clamped at eps, heights and center offsets get + eps.
    Also the v3 zero-weight exit and (N,4) weights averaged to (N,).
    """
    p, t = _boxes(pred), _boxes(target)
    ious = _iou_plus_eps(p, t, eps)
    cw, ch = _enclose_wh(p, t, eps)
    w1, h1 = p[2] - p[0], p[3] - p[1] + eps
    w2, h2 = t[2] - t[0], t[3] - t[1] + eps
    s_cw = (t[0] + t[2] - p[0] - p[2]) * 0.5 + eps
    s_ch = (t[1] + t[3] - p[1] - p[3]) * 0.5 + eps
    sigma = (s_cw ** 2 + s_ch ** 2) ** 0.5
    sin_alpha_1 = abs(s_cw) / sigma
    sin_alpha_2 = abs(s_ch) / sigma
    sin_alpha = where(sin_alpha_1 > math.sqrt(2) / 2, sin_alpha_2, sin_alpha_1)
    angle_cost = cos(asin(sin_alpha) * 2 - math.pi / 2)
    rho_x, rho_y = (s_cw / cw) ** 2, (s_ch / ch) ** 2
    gamma = angle_cost - 2 if neg_gamma else 2 - angle_cost
    distance_cost = 2 - exp(gamma * rho_x) - exp(gamma * rho_y)
    omega_w = abs(w1 - w2) / maximum(w1, w2)
    omega_h = abs(h1 - h2) / maximum(h1, h2)
    shape_cost = (1 - exp(-1 * omega_w)) ** 4 + (1 - exp(-1 * omega_h)) ** 4
    sious = ious - 0.5 * (distance_cost + shape_cost)
    return 1 - clamp(sious, min=-1.0, max=1.0)

