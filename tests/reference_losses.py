"""Independent eager references of the MMDetection 3.3.0 losses lossgraph compiles.

Written from /work/shared/reference/mmdet-losses.md, not from MMDetection's code:
- section 1.2 `weight_reduce_loss` (weight, reduction, avg_factor + eps32, the 'sum' error),
- section 1.4 the module convention (reduction_override, loss_weight after the reduction, the v3
  all-zero-weight early exit of L1Loss/SmoothL1Loss),
- section 1.5 how each loss broadcasts `weight`,
- section 1.6 CrossEntropyLoss's ignore_index / avg_non_ignore / class_weight,
- section 2.2 the element formulas.

Each function takes the config dict first, then MMDetection's forward arguments, and returns what
the MMDetection module would return (value, shape and dtype). Run them on float64 inputs for exact
values; torch autograd on them gives the reference gradients. No torch loss function is used:
BCE-with-logits is spelled out from log-sigmoids (`bce_with_logits`), and BCE on probabilities is
its own autograd function carrying torch's documented backward formula, because MMDetection's
gradient there is torch's (it differs from the analytic one where p (1 - p) < 1e-12).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps   # 1.1920929e-07, added to avg_factor whatever the dtype
# torch's binary_cross_entropy backward clamps p (1 - p) at an EPSILON of 1e-12 held in a float,
# so even in float64 the clamp is float32(1e-12) = 9.999999960041972e-13 (measured, torch 2.13).
BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))
REDUCTIONS = (None, "none", "mean", "sum")


# -- section 1: the shared pipeline --------------------------------------------------------------

def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """'none' keeps the tensor, 'mean' averages every element, 'sum' adds them."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"{reduction} is not a valid value for reduction")


def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    """Section 1.2: plain broadcasting by weight, then reduce; avg_factor + eps32 for 'mean'."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS32)
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"')


def module_reduction(cfg: dict, reduction_override) -> str:
    """Section 1.4: the override must be None/'none'/'mean'/'sum', else the config's reduction."""
    assert reduction_override in REDUCTIONS
    return reduction_override or cfg.get("reduction", "mean")


def options(cfg: dict, defaults: dict) -> dict:
    """The config with defaults filled in; any key the loss does not know is an error."""
    known = {"type", "reduction", "loss_weight", *defaults}
    unknown = set(cfg) - known
    if unknown:
        raise KeyError(f"unknown config keys {sorted(unknown)}")
    return {**defaults, "reduction": "mean", "loss_weight": 1.0, **cfg}


# -- elementwise building blocks -----------------------------------------------------------------

def bce_with_logits(x, t, pos_weight=None):
    """-[pw t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], with log(1 - sigmoid(x)) = logsig(-x)."""
    pos = t * F.logsigmoid(x)
    if pos_weight is not None:
        pos = pos_weight * pos
    return -(pos + (1 - t) * F.logsigmoid(-x))


class _BCEProb(torch.autograd.Function):
    """binary_cross_entropy on probabilities: logs clamped at -100; torch's backward formula
    (p - t) / max((1 - p) p, float32(1e-12)): what MMDetection's activated=True path differentiates."""

    @staticmethod
    def forward(ctx, p, t):
        ctx.save_for_backward(p, t)
        return -(t * torch.clamp(torch.log(p), min=-100) +
                 (1 - t) * torch.clamp(torch.log(1 - p), min=-100))

    @staticmethod
    def backward(ctx, g):
        p, t = ctx.saved_tensors
        return g * (p - t) / torch.clamp((1 - p) * p, min=BCE_EPS), None


def bce_prob(p, t):
    return _BCEProb.apply(p, t)


def one_hot_labels(labels: torch.Tensor, num_classes: int, dtype) -> torch.Tensor:
    """[labels_n == c] for c in [0, num_classes): labels outside that range give a zero row."""
    return (labels.reshape(-1, 1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def log_softmax_at(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x[n, y_n] - logsumexp_c x[n, c], with the row max subtracted first."""
    m = x.detach().amax(dim=1, keepdim=True)
    lse = (m + torch.log(torch.exp(x - m).sum(dim=1, keepdim=True)))[:, 0]
    return x.gather(1, labels.reshape(-1, 1))[:, 0] - lse


# -- FocalLoss -----------------------------------------------------------------------------------

FOCAL = dict(use_sigmoid=True, gamma=2.0, alpha=0.25, activated=False)


def focal_weight_shape(weight: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Section 1.5: (N,) -> (N, 1); else N*C values -> (N, C); then ndim must agree."""
    if weight.shape != loss.shape:
        if weight.size(0) == loss.size(0):
            weight = weight.view(-1, 1)
        else:
            assert weight.numel() == loss.numel()
            weight = weight.view(loss.size(0), -1)
    assert weight.ndim == loss.ndim
    return weight


def focal_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """Section 2.2: BCE(x, t) (alpha t + (1 - alpha)(1 - t)) pt^gamma, pt = (1-p) t + p (1-t)."""
    o = options(cfg, FOCAL)
    assert o["use_sigmoid"], "Only sigmoid focal loss supported now."
    reduction = module_reduction(o, reduction_override)
    if pred.dim() == target.dim():
        t = target.to(pred.dtype)              # a one-hot (or soft) target is used as is
    else:
        c = pred.size(1)
        if target.numel() and (int(target.min()) < 0 or int(target.max()) > c):
            raise RuntimeError("F.one_hot: class values must be in [0, C]")
        t = one_hot_labels(target, c, pred.dtype)  # label C (background) is an all-zero row
    if o["activated"]:
        p, bce = pred, bce_prob(pred, t)
    else:
        p, bce = torch.sigmoid(pred), bce_with_logits(pred, t)
    alpha, gamma = o["alpha"], o["gamma"]
    pt = (1 - p) * t + p * (1 - t)
    loss = bce * ((alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma))
    if weight is not None:
        weight = focal_weight_shape(weight, loss)
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


# -- CrossEntropyLoss ----------------------------------------------------------------------------

CROSS_ENTROPY = dict(use_sigmoid=False, use_mask=False, class_weight=None, ignore_index=None,
                     avg_non_ignore=False)


def cross_entropy_loss(cfg, cls_score, label, weight=None, avg_factor=None,
                       reduction_override=None, ignore_index=None):
    """Section 2.2 / 1.6: softmax CE over rows, or per-class sigmoid BCE (labels or dense)."""
    o = options(cfg, CROSS_ENTROPY)
    assert not (o["use_sigmoid"] and o["use_mask"])
    assert not o["use_mask"], "use_mask is not modelled by this reference"
    reduction = module_reduction(o, reduction_override)
    if ignore_index is None:
        ignore_index = o["ignore_index"]
    ii = -100 if ignore_index is None else ignore_index
    cw = o["class_weight"]
    cw = None if cw is None else cls_score.new_tensor(cw)
    if o["use_sigmoid"]:
        out = o["loss_weight"] * _sigmoid_ce(cls_score, label, weight, reduction, avg_factor, cw,
                                             ii, o["avg_non_ignore"])
        return out.to(_sigmoid_ce_dtype(reduction, avg_factor))
    return o["loss_weight"] * _softmax_ce(cls_score, label, weight, reduction, avg_factor, cw, ii,
                                          o["avg_non_ignore"])


def _softmax_ce(x, y, weight, reduction, avg_factor, cw, ii, avg_non_ignore):
    """-cw[y] (x_y - logsumexp x) per row, 0 where y == ignore_index; weight.float() per row."""
    keep = y != ii
    kept = y[keep]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= x.size(1)):
        raise IndexError("cross_entropy: target out of bounds")
    ys = torch.where(keep, y, torch.zeros_like(y))
    nll = -log_softmax_at(x, ys)
    if cw is not None:
        nll = nll * cw[ys]
    loss = torch.where(keep, nll, torch.zeros_like(nll))
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = y.numel() - int((y == ii).sum())          # a Python int, as .item() gives
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _sigmoid_ce(x, label, weight, reduction, avg_factor, cw, ii, avg_non_ignore):
    """BCE-with-logits per class with class_weight as pos_weight; invalid labels weigh 0."""
    if x.dim() != label.dim():
        n, c = x.size(0), x.size(-1)
        valid = (label >= 0) & (label != ii)
        t = one_hot_labels(torch.where(valid, label, torch.full_like(label, -1)), c, x.dtype)
        mask = valid.reshape(-1, 1).expand(n, c).float()
        w = mask if weight is None else weight.reshape(-1, 1).repeat(1, c) * mask
    else:
        t = label.to(x.dtype)
        mask = ((label >= 0) & (label != ii)).float()
        w = mask if weight is None else weight * mask
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = float(mask.sum())                          # .item() of the expanded mask
    w = w.float()
    loss = bce_with_logits(x, t, cw)
    return weight_reduce_loss(loss, w, reduction, avg_factor)


def _sigmoid_ce_dtype(reduction, avg_factor) -> torch.dtype:
    """mmdet passes label.float() to binary_cross_entropy_with_logits, whose result takes the
    target's dtype: float32 for any pred (float64 too); a tensor avg_factor may promote it again.
    (The reference computes in pred's dtype and casts the result, as lossgraph does.)"""
    like = torch.zeros((), dtype=torch.float32)
    if isinstance(avg_factor, torch.Tensor) and reduction == "mean":
        like = like / (avg_factor + EPS32)
    return like.dtype


# -- regression losses ---------------------------------------------------------------------------

def _zero_weight_exit(pred, weight):
    """v3 L1Loss/SmoothL1Loss: with no positive weight, (pred * weight).sum() at once."""
    if weight is not None and not torch.any(weight > 0):
        if pred.dim() == weight.dim() + 1:
            weight = weight.unsqueeze(1)
        return (pred * weight).sum()
    return None


def _regression(cfg, defaults, elem, pred, target, weight, avg_factor, reduction_override,
                zero_exit=False, empty_zero=False):
    o = options(cfg, defaults)
    if zero_exit:
        out = _zero_weight_exit(pred, weight)
        if out is not None:
            return out
    reduction = module_reduction(o, reduction_override)
    if empty_zero and target.numel() == 0:
        loss = pred.sum() * 0
    else:
        assert pred.size() == target.size()
        loss = elem(o, pred, target)
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


def l1_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """|pred - target| (zero-weight exit, empty target -> 0)."""
    return _regression(cfg, {}, lambda o, p, t: torch.abs(p - t), pred, target, weight,
                       avg_factor, reduction_override, zero_exit=True, empty_zero=True)


def _smooth_l1(o, p, t):
    beta = o["beta"]
    assert beta > 0
    d = torch.abs(p - t)
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def smooth_l1_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """0.5 d^2 / beta below beta, d - beta / 2 above (zero-weight exit, empty target -> 0)."""
    return _regression(cfg, dict(beta=1.0), _smooth_l1, pred, target, weight, avg_factor,
                       reduction_override, zero_exit=True, empty_zero=True)


def mse_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """(pred - target)^2."""
    return _regression(cfg, {}, lambda o, p, t: (p - t) ** 2, pred, target, weight, avg_factor,
                       reduction_override)


def _balanced_l1(o, p, t):
    alpha, gamma, beta = o["alpha"], o["gamma"], o["beta"]
    assert beta > 0
    d = torch.abs(p - t)
    b = math.exp(gamma / alpha) - 1
    small = alpha / b * (b * d + 1) * torch.log(b * d / beta + 1) - alpha * d
    large = gamma * d + gamma / b - alpha * beta
    return torch.where(d < beta, small, large)


def balanced_l1_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """Libra R-CNN's balanced L1 (empty target -> 0)."""
    return _regression(cfg, dict(alpha=0.5, gamma=1.5, beta=1.0), _balanced_l1, pred, target,
                       weight, avg_factor, reduction_override, empty_zero=True)


# -- GaussianFocalLoss, VarifocalLoss ------------------------------------------------------------

GAUSSIAN_FOCAL = dict(alpha=2.0, gamma=4.0, pos_weight=1.0, neg_weight=1.0)


def gaussian_focal_loss(cfg, pred, target, pos_inds=None, pos_labels=None, weight=None,
                        avg_factor=None, reduction_override=None):
    """-pw log(p + 1e-12)(1-p)^a [g == 1] - nw log(1 - p + 1e-12) p^a (1-g)^gamma (standard path)."""
    o = options(cfg, GAUSSIAN_FOCAL)
    reduction = module_reduction(o, reduction_override)
    eps = 1e-12
    if pos_inds is not None:
        # CenterNet-update (section 2.2): the positive term only at pred[pos_inds, pos_labels], the
        # negative term everywhere; each reduced on its own (same reduction and avg_factor, no
        # weight), then pos_weight * pos + neg_weight * neg, then loss_weight
        assert pos_labels is not None
        p = pred[pos_inds].gather(1, pos_labels.unsqueeze(1))
        pos = -torch.log(p + eps) * (1 - p).pow(o["alpha"])
        neg = -torch.log(1 - pred + eps) * pred.pow(o["alpha"]) * (1 - target).pow(o["gamma"])
        pos = weight_reduce_loss(pos, None, reduction, avg_factor)
        neg = weight_reduce_loss(neg, None, reduction, avg_factor)
        return o["loss_weight"] * (o["pos_weight"] * pos + o["neg_weight"] * neg)
    pos = -torch.log(pred + eps) * (1 - pred).pow(o["alpha"]) * (target == 1)
    neg = -torch.log(1 - pred + eps) * pred.pow(o["alpha"]) * (1 - target).pow(o["gamma"])
    loss = o["pos_weight"] * pos + o["neg_weight"] * neg
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


VARIFOCAL = dict(use_sigmoid=True, alpha=0.75, gamma=2.0, iou_weighted=True)


def varifocal_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """BCE(x, q) * (q or 1 where q > 0, alpha |sigmoid(x) - q|^gamma where q <= 0)."""
    o = options(cfg, VARIFOCAL)
    assert o["use_sigmoid"] and o["alpha"] >= 0
    reduction = module_reduction(o, reduction_override)
    assert pred.size() == target.size()
    q = target.to(pred.dtype)
    pos = (q > 0).to(pred.dtype)
    neg = (q <= 0).to(pred.dtype)
    modulator = o["alpha"] * torch.abs(torch.sigmoid(pred) - q).pow(o["gamma"]) * neg
    focal_weight = (q * pos if o["iou_weighted"] else pos) + modulator
    loss = bce_with_logits(pred, q) * focal_weight
    return o["loss_weight"] * weight_reduce_loss(loss, weight, reduction, avg_factor)


REFERENCES = {
    "FocalLoss": focal_loss,
    "CrossEntropyLoss": cross_entropy_loss,
    "L1Loss": l1_loss,
    "SmoothL1Loss": smooth_l1_loss,
    "MSELoss": mse_loss,
    "BalancedL1Loss": balanced_l1_loss,
    "GaussianFocalLoss": gaussian_focal_loss,
    "VarifocalLoss": varifocal_loss,
}


def reference(cfg: dict, *args, **kwargs):
    """What MMDetection's module built from cfg returns for forward(*args, **kwargs)."""
    return REFERENCES[cfg["type"]](cfg, *args, **kwargs)
