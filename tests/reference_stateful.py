"""Independent eager references of MMDetection 3.3.0's stateful losses: GHMC, GHMR, SeesawLoss.

Written from /work/shared/reference/mmdet-losses.md section 2.2 (and 1.2 for the reduction), not
from MMDetection's code. Each class keeps its own state (the momentum sums, the class counts) in
float64 and evolves it call by call; values are computed in float64 so torch autograd on a
float64 pred gives the reference gradient.

One thing is deliberately not float64: the gradient norm g that picks each element's bin is
computed in the precision of the pred under test (`stat_dtype`), because which side of a bin edge
an element falls on is decided in that precision, by MMDetection and by lossgraph alike. The bin
edges are float32 i / bins (GHMC: last edge + 1e-6 in float32; GHMR: last edge 1e3), and an
element is in bin i when edges[i] <= g < edges[i + 1].
"""
from __future__ import annotations

import torch

from reference_losses import bce_with_logits, module_reduction, weight_reduce_loss


def ghm_edges(bins: int, last: str) -> torch.Tensor:
    """float32 i / bins; `last` is 'ghmc' (+1e-6 in float32) or 'ghmr' (1e3)."""
    e = torch.tensor([i / bins for i in range(bins + 1)], dtype=torch.float32)
    e[-1] = e[-1] + torch.tensor(1e-6, dtype=torch.float32) if last == "ghmc" else 1e3
    return e


def bin_of(g: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin of every element (-1 if none), by the comparisons the spec states."""
    out = torch.full(g.shape, -1, dtype=torch.long)
    e = edges.to(g.dtype)
    for i in range(len(edges) - 1):
        out[(g >= e[i]) & (g < e[i + 1])] = i
    return out


class _GHM:
    """The shared histogram weighting of GHMC and GHMR."""

    def __init__(self, cfg: dict, defaults: dict, last: str):
        known = {"type", "reduction", "loss_weight", *defaults}
        assert not set(cfg) - known, f"unknown keys {set(cfg) - known}"
        self.o = {**defaults, "reduction": "mean", "loss_weight": 1.0, **cfg}
        self.bins, self.momentum = self.o["bins"], self.o["momentum"]
        self.edges = ghm_edges(self.bins, last)
        self.acc_sum = torch.zeros(self.bins, dtype=torch.float64)

    def weights(self, g: torch.Tensor, valid: torch.Tensor, tot: float) -> torch.Tensor:
        """tot / n_i for each element of non-empty bin i (EMA n_i with momentum), / #non-empty."""
        b = bin_of(g, self.edges)
        b = torch.where(valid.expand(b.shape), b, torch.full_like(b, -1))
        w = torch.zeros(g.shape, dtype=torch.float64)
        filled = 0
        for i in range(self.bins):
            inside = b == i
            n = int(inside.sum())
            if n == 0:
                continue
            filled += 1
            if self.momentum > 0:
                self.acc_sum[i] = self.momentum * self.acc_sum[i] + (1 - self.momentum) * n
                w[inside] = tot / self.acc_sum[i]
            else:
                w[inside] = tot / n
        return w / filled if filled else w

    def finish(self, loss, w, tot, reduction_override):
        reduction = module_reduction(self.o, reduction_override)
        return self.o["loss_weight"] * weight_reduce_loss(loss, w, reduction, avg_factor=tot)


class GHMCRef(_GHM):
    """GHM-C: BCE-with-logits weighted by the histogram of g = |sigmoid(x) - t| over valid
    elements; tot = max(#valid entries of label_weight, 1) is also the avg_factor."""

    def __init__(self, cfg: dict):
        super().__init__(cfg, {"bins": 10, "momentum": 0, "use_sigmoid": True}, "ghmc")
        if not self.o["use_sigmoid"]:
            raise NotImplementedError

    def __call__(self, pred, target, label_weight, reduction_override=None,
                 stat_dtype=torch.float32, **kwargs):
        n, c = pred.shape[0], pred.shape[-1]
        if pred.dim() != target.dim():   # index labels: one-hot over [0, C), weight per row
            t = torch.zeros(n, c, dtype=torch.float64)
            ok = (target >= 0) & (target < c)
            t[ok.nonzero()[:, 0], target[ok]] = 1.0
            label_weight = label_weight.reshape(-1, 1).expand(n, c)
        else:
            t = target.double()
        valid = label_weight > 0
        tot = max(float(valid.sum()), 1.0)
        x = pred.detach().to(stat_dtype)
        g = torch.abs(torch.sigmoid(x) - t.to(torch.promote_types(stat_dtype, torch.float32)))
        w = self.weights(g, valid, tot)
        return self.finish(bce_with_logits(pred, t), w, tot, reduction_override)


class GHMRRef(_GHM):
    """GHM-R: ASL1 sqrt(d^2 + mu^2) - mu weighted by the histogram of g = |d| / sqrt(d^2 + mu^2);
    tot = max(sum of label_weight, 1). avg_factor is ignored."""

    def __init__(self, cfg: dict):
        super().__init__(cfg, {"mu": 0.02, "bins": 10, "momentum": 0}, "ghmr")

    def __call__(self, pred, target, label_weight, avg_factor=None, reduction_override=None,
                 stat_dtype=torch.float32):
        mu = self.o["mu"]
        d = pred - target.double()
        loss = torch.sqrt(d * d + mu * mu) - mu
        ds = pred.detach().to(stat_dtype) - target.to(stat_dtype)
        g = torch.abs(ds / torch.sqrt(mu * mu + ds * ds))
        tot = max(float(label_weight.double().sum()), 1.0)
        w = self.weights(g, label_weight > 0, tot)
        return self.finish(loss, w, tot, reduction_override)


def softmax_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)[y] per row, as logsumexp(z) - z_y."""
    return torch.logsumexp(z, -1) - z.gather(-1, y.view(-1, 1)).squeeze(-1)


class SeesawRef:
    """Seesaw loss: cumulative class counts, then a class part on positive rows and an
    objectness part (2-way CE of the last two logits, target [label == C]) on every row."""

    DEFAULTS = {"use_sigmoid": False, "p": 0.8, "q": 2.0, "num_classes": 1203, "eps": 1e-2,
                "return_dict": True}

    def __init__(self, cfg: dict):
        known = {"type", "reduction", "loss_weight", *self.DEFAULTS}
        assert not set(cfg) - known
        self.o = {**self.DEFAULTS, "reduction": "mean", "loss_weight": 1.0, **cfg}
        assert not self.o["use_sigmoid"]
        self.cum_samples = torch.zeros(self.o["num_classes"] + 1, dtype=torch.float64)

    def class_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE of z + log(mitigation * compensation) off the label column, per positive row."""
        c, p, q, eps = self.o["num_classes"], self.o["p"], self.o["q"], self.o["eps"]
        factor = torch.ones_like(z)
        if p > 0:
            counts = self.cum_samples[:c].clamp(min=1)
            ratio = counts[None, :] / counts[y][:, None]
            factor = factor * torch.where(ratio < 1, ratio ** p, torch.ones_like(ratio))
        if q > 0:
            s = torch.softmax(z.detach(), -1)
            ratio = s / s.gather(-1, y.view(-1, 1)).clamp(min=eps)
            factor = factor * torch.where(ratio > 1, ratio ** q, torch.ones_like(ratio))
        off = torch.ones_like(z).scatter_(-1, y.view(-1, 1), 0.0)
        return softmax_ce(z + torch.log(factor) * off, y)

    def __call__(self, cls_score, labels, label_weights=None, avg_factor=None,
                 reduction_override=None):
        c, lw_cfg = self.o["num_classes"], self.o["loss_weight"]
        reduction = module_reduction(self.o, reduction_override)
        assert cls_score.shape[-1] == c + 2
        for k in range(c + 1):
            self.cum_samples[k] += float((labels == k).sum())
        # label_weights are cast to float32 (mmdet-losses.md section 1.5), ones(float32) when
        # None, also for a float64 pred; the loss times them has torch's promoted dtype
        wdt = torch.promote_types(cls_score.dtype, torch.float32)
        w = torch.ones(labels.shape, dtype=wdt) if label_weights is None else \
            label_weights.float().to(wdt)
        pos = labels < c
        z = cls_score[:, :c]
        if bool(pos.any()):
            classes = lw_cfg * weight_reduce_loss(self.class_loss(z[pos], labels[pos]), w[pos],
                                                  reduction, avg_factor)
        else:
            classes = z[pos].sum()
        obj = softmax_ce(cls_score[:, c:], (labels == c).long())
        objectness = lw_cfg * weight_reduce_loss(obj, w, reduction, avg_factor)
        if self.o["return_dict"]:
            return {"loss_cls_objectness": objectness, "loss_cls_classes": classes}
        return classes + objectness

    def activation(self, cls_score):
        """softmax over the classes times P(object), then P(background)."""
        c = self.o["num_classes"]
        e = torch.exp(cls_score[:, :c] - cls_score[:, :c].max(-1, keepdim=True).values)
        p_cls = e / e.sum(-1, keepdim=True)
        o = cls_score[:, c:]
        p_obj = 1 / (1 + torch.exp(o[:, 1:] - o[:, :1]))
        return torch.cat([p_cls * p_obj, 1 - p_obj], -1)

