"""MMDetection-style eager losses for the benchmarks: one torch op per term, written from the
formulas in shared/reference/mmdet-losses.md (our own code, structured like MMDetection's)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps


def weight_reduce(loss, weight=None, reduction="mean", avg_factor=None):
    """MMDetection's weight_reduce_loss."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS32)
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"')


def focal_loss(pred, labels, weight=None, avg_factor=None, gamma=2.0, alpha=0.25):
    """FocalLoss on the CPU path: one-hot labels, then BCE * focal weight."""
    num_classes = pred.size(1)
    target = F.one_hot(labels, num_classes=num_classes + 1)[:, :num_classes].type_as(pred)
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None and weight.shape != loss.shape:
        weight = weight.view(-1, 1)
    return weight_reduce(loss, weight, "mean", avg_factor)


def l1_loss(pred, target, weight=None, avg_factor=None):
    """L1Loss with MMDetection's all-zero-weight early exit."""
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight).sum()
    return weight_reduce(torch.abs(pred - target), weight, "mean", avg_factor)


def gaussian_focal_loss(pred, target, weight=None, avg_factor=None, alpha=2.0, gamma=4.0):
    """GaussianFocalLoss (CornerNet) on probability heatmaps."""
    eps = 1e-12
    pos_weights = target.eq(1)
    neg_weights = (1 - target).pow(gamma)
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos_weights
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * neg_weights
    return weight_reduce(pos_loss + neg_loss, weight, "mean", avg_factor)


def cross_entropy(pred, labels, weight=None, avg_factor=None):
    """Softmax CrossEntropyLoss: F.cross_entropy per row, then weight and reduce."""
    loss = F.cross_entropy(pred, labels, reduction="none", ignore_index=-100)
    if weight is not None:
        weight = weight.float()
    return weight_reduce(loss, weight, "mean", avg_factor)


def giou_loss(pred, target, weight=None, avg_factor=None, eps=1e-6):
    """GIoULoss on decoded (x1, y1, x2, y2) boxes, through an aligned bbox_overlaps."""
    if weight is not None and not torch.any(weight > 0):
        return (pred * weight).sum()
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - overlap
    union = torch.max(union, union.new_tensor([eps]))
    ious = overlap / union
    enclosed_lt = torch.min(pred[:, :2], target[:, :2])
    enclosed_rb = torch.max(pred[:, 2:], target[:, 2:])
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = enclose_wh[:, 0] * enclose_wh[:, 1]
    enclose_area = torch.max(enclose_area, enclose_area.new_tensor([eps]))
    gious = ious - (enclose_area - union) / enclose_area
    return weight_reduce(1 - gious, weight, "mean", avg_factor)


def distribution_focal_loss(pred, label, weight=None, avg_factor=None):
    """DistributionFocalLoss: CE at the two bins around the float target."""
    dis_left = label.long()
    dis_right = dis_left + 1
    weight_left = dis_right.float() - label
    weight_right = label - dis_left.float()
    loss = F.cross_entropy(pred, dis_left, reduction="none") * weight_left \
        + F.cross_entropy(pred, dis_right, reduction="none") * weight_right
    return weight_reduce(loss, weight, "mean", avg_factor)




class SeesawLoss:
    """SeesawLoss (LVIS): cumulative class counts, then mitigation and compensation factors on
    the positive rows' softmax CE, plus a 2-way objectness CE on every row."""

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        self.num_classes, self.p, self.q, self.eps = num_classes, p, q, eps
        self.cum_samples = torch.zeros(num_classes + 1)

    def __call__(self, cls_score, labels, weight=None, avg_factor=None):
        for u in labels.unique():
            self.cum_samples[u] += (labels == u).sum()
        c = self.num_classes
        obj = F.cross_entropy(cls_score[:, -2:], (labels == c).long(), reduction="none")
        loss_obj = weight_reduce(obj, weight, "mean", avg_factor)
        pos = labels < c
        z, y = cls_score[pos][:, :c], labels[pos]
        if z.numel() == 0:
            return {"loss_cls_objectness": loss_obj, "loss_cls_classes": cls_score[pos].sum()}
        onehot = F.one_hot(y, c).type_as(z)
        counts = self.cum_samples[:c].clamp(min=1)
        ratio = counts[None, :] / counts[:, None]
        below = (ratio < 1.0).type_as(z)
        factor = (ratio.pow(self.p) * below + (1 - below))[y]
        scores = F.softmax(z.detach(), dim=1)
        self_scores = scores.gather(1, y[:, None])
        score_ratio = scores / self_scores.clamp(min=self.eps)
        above = (score_ratio > 1.0).type_as(z)
        factor = factor * (score_ratio.pow(self.q) * above + (1 - above))
        z = z + factor.log() * (1 - onehot)
        loss = F.cross_entropy(z, y, reduction="none")
        w = weight[pos] if weight is not None else None
        return {"loss_cls_objectness": loss_obj,
                "loss_cls_classes": weight_reduce(loss, w, "mean", avg_factor)}
