"""Independent eager references of the six losses added last: L2Loss, MarginL2Loss,
MultiPosCrossEntropyLoss, TripletLoss, AssociativeEmbeddingLoss and EQLV2Loss.

Written from the formulas in /work/shared/reference/mmdet-losses.md section 2.2 (and the
MMDetection 3.3.0 semantics noted beside each function), with plain loops and broadcasting
rather than lossgraph's factorings, so that they check them. Run them on float64 inputs; torch
autograd on them gives the reference gradients. Like MMDetection they take the config dict first,
then the forward arguments.
"""
from __future__ import annotations

import torch

from reference_losses import module_reduction, options, weight_reduce_loss

L2_DEFAULTS = {"neg_pos_ub": -1, "pos_margin": -1, "neg_margin": -1, "hard_mining": False}


# -- L2Loss / MarginL2Loss -------------------------------------------------------------------------

def l2_weights(cfg: dict, pred, target, weight=None):
    """update_weight: (clamped margined pred, target with -1 where weight <= 0, mined weight,
    avg_factor = count(weight > 0)); hard mining only (a random choice is not reproducible)."""
    o = options(cfg, L2_DEFAULTS)
    weight = torch.ones_like(target) if weight is None else weight.clone()
    target = torch.where(weight <= 0, torch.full_like(target, -1), target)
    pos, neg = target == 1, target == 0
    p = pred
    if o["pos_margin"] > 0:
        p = p - o["pos_margin"] * pos.to(p.dtype)
    if o["neg_margin"] > 0:
        p = p - o["neg_margin"] * neg.to(p.dtype)
    p = p.clamp(0, 1)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if o["neg_pos_ub"] > 0 and n_neg / (n_pos + 1e-6) > o["neg_pos_ub"]:
        assert o["hard_mining"], "the reference reproduces hard mining only"
        keep = n_pos * o["neg_pos_ub"]
        costs = ((p.detach() - target) ** 2)[neg]
        order = sorted(range(len(costs)), key=lambda i: -float(costs[i]))[:keep]
        kept = torch.zeros(len(costs), dtype=torch.bool)
        kept[order] = True
        flat = weight[neg].clone()
        flat[~kept] = 0
        weight[neg] = flat
    return p, target, weight, (weight > 0).sum()


def l2_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """(clamp(pred - margins, 0, 1) - t)^2, weighted, avg_factor replaced by count(weight > 0)."""
    p, t, w, avg = l2_weights(cfg, pred, target, weight)
    red = module_reduction(cfg, reduction_override)
    return cfg.get("loss_weight", 1.0) * weight_reduce_loss((p - t) ** 2, w, red, avg)


def margin_l2_loss(cfg, pred, target, weight=None, avg_factor=None, reduction_override=None):
    """MarginL2Loss: the same numbers, target and weight cast to float32 first."""
    p, t, w, avg = l2_weights(cfg, pred, target, weight)
    red = module_reduction(cfg, reduction_override)
    return cfg.get("loss_weight", 1.0) * weight_reduce_loss((p - t.float()) ** 2, w.float(),
                                                            red, avg)


# -- MultiPosCrossEntropyLoss ------------------------------------------------------------------

def multipos_ce(cfg, cls_score, label, weight=None, avg_factor=None, reduction_override=None):
    """log(1 + sum over pairs (i positive side, j negative side) of exp(b_j - a_i)), per row.

    Side P: label != 0 (a_i = x_i if label >= 1 else 0); side N: label < 1 (b_j = x_j if
    label == 0 else 0): pred * mask leaves 0 where an element is neither, and only the other
    class is masked with infinities (mmdet-losses.md 2.2 and multipos_cross_entropy_loss.py).
    """
    o = options(cfg, {})
    pos, neg = label >= 1, label == 0
    a = torch.where(pos, cls_score, torch.zeros_like(cls_score))
    b = torch.where(neg, cls_score, torch.zeros_like(cls_score))
    pair = torch.exp(b[:, None, :] - a[:, :, None])             # [n, i, j] = exp(b_j - a_i)
    mask = (~neg)[:, :, None] & (~pos)[:, None, :]
    loss = torch.log(1 + (pair * mask).sum(dim=(1, 2)))
    w = None if weight is None else weight.float()
    return o["loss_weight"] * weight_reduce_loss(loss, w, module_reduction(o, reduction_override),
                                                 avg_factor)


# -- TripletLoss -------------------------------------------------------------------------------

def triplet_loss(cfg, inputs, targets):
    """mean_i relu(max_{j same} d_ij - min_{j other} d_ij + margin), d from |x|^2 terms."""
    o = {"margin": 0.3, "loss_weight": 1.0, **{k: v for k, v in cfg.items() if k != "type"}}
    b = inputs.shape[0]
    terms = []
    for i in range(b):
        d = [torch.sqrt(torch.clamp((inputs[i] ** 2).sum() + (inputs[j] ** 2).sum()
                                    - 2 * (inputs[i] * inputs[j]).sum(), min=1e-12))
             for j in range(b)]
        ap = torch.stack([d[j] for j in range(b) if targets[j] == targets[i]]).max()
        an = torch.stack([d[j] for j in range(b) if targets[j] != targets[i]]).min()
        terms.append(torch.clamp(ap - an + o["margin"], min=0))
    return o["loss_weight"] * torch.stack(terms).mean()


# -- AssociativeEmbeddingLoss --------------------------------------------------------------------

def ae_loss(cfg, pred, target, match):
    """(pull_weight * sum of pulls, push_weight * sum of pushes) over the images, each
    (object, channel) embedding one entry as MMDetection's view(-1, 1) makes it."""
    o = {"pull_weight": 0.25, "push_weight": 0.25, **{k: v for k, v in cfg.items() if k != "type"}}
    pull_all, push_all = 0.0, 0.0
    for i in range(pred.shape[0]):
        tl = [pred[i, m, a[0], a[1]] for (a, _b) in match[i] for m in range(pred.shape[1])]
        br = [target[i, m, b[0], b[1]] for (_a, b) in match[i] for m in range(pred.shape[1])]
        n = len(tl)
        zero = pred[i].sum() * 0.0
        if n == 0:
            pull, push = zero, zero
        else:
            e = [(x + y) / 2 for x, y in zip(tl, br)]
            pull = sum((x - m) ** 2 + (y - m) ** 2 for x, y, m in zip(tl, br, e)) / n
            push = zero if n == 1 else sum(
                torch.relu(1 - torch.abs(e[k] - e[j])) for k in range(n) for j in range(n)
                if j != k) / (n * (n - 1))
        pull_all = pull_all + o["pull_weight"] * pull
        push_all = push_all + o["push_weight"] * push
    return pull_all, push_all


# -- EQLV2Loss -----------------------------------------------------------------------------------

class EQLv2:
    """EQLv2 with its float32 state: weights from the statistics before the call, then the
    statistics of |sigmoid(x) - t| weighted by (pos_w t + neg_w (1 - t)) added (C columns)."""

    def __init__(self, cfg: dict):
        self.o = {"num_classes": 1203, "mu": 0.8, "alpha": 4.0, "gamma": 12, "loss_weight": 1.0,
                  **{k: v for k, v in cfg.items() if k != "type"}}
        c = self.o["num_classes"]
        self.pos_grad = torch.zeros(c)
        self.neg_grad = torch.zeros(c)
        self.ratio = torch.full((c,), 100.0)

    def __call__(self, pred, labels):
        n, k = pred.shape
        t = torch.zeros(n, k, dtype=pred.dtype)
        for r in range(n):
            t[r, labels[r]] = 1
        gm = 1 / (1 + torch.exp(-self.o["gamma"] * (self.ratio - self.o["mu"])))
        neg_w = torch.cat([gm.to(pred.dtype), torch.ones(1, dtype=pred.dtype)])
        pos_w = 1 + self.o["alpha"] * (1 - neg_w)
        w = pos_w * t + neg_w * (1 - t)
        bce = torch.clamp(pred, min=0) - pred * t + torch.log1p(torch.exp(-pred.abs()))
        loss = self.o["loss_weight"] * (bce * w).sum() / n
        g = (torch.sigmoid(pred.detach()) - t).abs()
        self.pos_grad += (g * t * w).sum(0)[:-1]
        self.neg_grad += (g * (1 - t) * w).sum(0)[:-1]
        self.ratio = self.pos_grad / (self.neg_grad + 1e-10)
        return loss


REFERENCES = {"L2Loss": l2_loss, "MarginL2Loss": margin_l2_loss,
              "MultiPosCrossEntropyLoss": multipos_ce}


def reference(cfg: dict, *args, **kwargs):
    """The reference of cfg's loss type (the pipeline losses above)."""
    return REFERENCES[cfg["type"]](cfg, *args, **kwargs)

