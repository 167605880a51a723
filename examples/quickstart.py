"""Quickstart: RetinaNet's two losses, compiled by lossgraph, training a tiny head.

Compiles the FocalLoss and L1Loss configs of MMDetection's RetinaNet, trains a small
classification + box head for a few SGD steps on synthetic data, and checks at every step that the
compiled losses (values and the parameters they lead to) match MMDetection's eager formulas.

    python examples/quickstart.py
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lossgraph as lg  # noqa: E402

NUM_CLASSES, FEAT, ANCHORS = 80, 32, 2048

# The loss dicts exactly as in configs/_base_/models/retinanet_r50_fpn.py
LOSS_CLS = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
LOSS_BBOX = dict(type="L1Loss", loss_weight=1.0)


class TinyHead(nn.Module):
    """A RetinaNet-like head on per-anchor features: class logits and box deltas."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEAT, 64), nn.ReLU())
        self.cls = nn.Linear(64, NUM_CLASSES)
        self.reg = nn.Linear(64, 4)

    def forward(self, x):
        h = self.trunk(x)
        return self.cls(h), self.reg(h)


def eager_focal(pred, labels, weight, avg_factor, gamma=2.0, alpha=0.25):
    """MMDetection's py_sigmoid_focal_loss formula, one torch op per term."""
    t = F.one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES].type_as(pred)
    p = pred.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    w = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, t, reduction="none") * w * weight.view(-1, 1)
    return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)


def eager_l1(pred, target, weight, avg_factor):
    return (torch.abs(pred - target) * weight).sum() / (avg_factor + torch.finfo(torch.float32).eps)


def synthetic_batch(g: torch.Generator):
    """Features, labels (80 = background), label weights, box targets and box weights."""
    x = torch.randn(ANCHORS, FEAT, generator=g)
    labels = torch.full((ANCHORS,), NUM_CLASSES, dtype=torch.long)
    pos = torch.rand(ANCHORS, generator=g) < 0.05
    labels[pos] = torch.randint(0, NUM_CLASSES, (int(pos.sum()),), generator=g)
    label_weights = torch.ones(ANCHORS)
    bbox_targets = torch.randn(ANCHORS, 4, generator=g)
    bbox_weights = pos.float().view(-1, 1).expand(-1, 4).contiguous()
    return x, labels, label_weights, bbox_targets, bbox_weights, float(max(int(pos.sum()), 1))


def main() -> None:
    torch.manual_seed(0)
    loss_cls, loss_bbox = lg.compile(LOSS_CLS), lg.compile(LOSS_BBOX)
    print(f"compiled {loss_cls} and {loss_bbox}")
    head = TinyHead()
    ref = copy.deepcopy(head)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    print(f"{'step':>4} {'focal (lossgraph)':>18} {'focal (eager)':>14} {'l1 (lossgraph)':>15} "
          f"{'l1 (eager)':>11} {'max param diff':>15}")
    worst = 0.0
    for step in range(8):
        x, labels, lw, bt, bw, num_pos = synthetic_batch(g)
        cls, reg = head(x)
        lc = loss_cls(cls, labels, lw, avg_factor=num_pos)
        lb = loss_bbox(reg, bt, bw, avg_factor=num_pos)
        opt.zero_grad()
        (lc + lb).backward()
        opt.step()
        rcls, rreg = ref(x)
        rc, rb = eager_focal(rcls, labels, lw, num_pos), eager_l1(rreg, bt, bw, num_pos)
        ref_opt.zero_grad()
        (rc + rb).backward()
        ref_opt.step()
        diff = max((p - q).abs().max().item() for p, q in zip(head.parameters(), ref.parameters()))
        worst = max(worst, abs(lc.item() - rc.item()) / abs(rc.item()), diff)
        print(f"{step:>4} {lc.item():>18.6f} {rc.item():>14.6f} {lb.item():>15.6f} {rb.item():>11.6f} "
              f"{diff:>15.2e}")
    print(f"backend: {loss_cls.backend}; largest relative loss or parameter difference: {worst:.1e}")
    if worst > 1e-4:
        raise SystemExit("lossgraph and the eager formulas disagree")
    print("lossgraph matches MMDetection's eager formulas at every step.")


if __name__ == "__main__":
    main()
