"""torch.autograd.gradcheck of compiled losses: finite differences against the fused gradient,
for scalar reductions and for 'none' outputs (a full Jacobian), in float64 on small inputs.

Inputs keep clear of the kinks (|d| = 0 or beta, p at 0 or 1) where a finite difference is
not a derivative.
"""
from __future__ import annotations

import pytest
import torch

from conftest import compiled


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(n=4, c=3, seed=0):
    return torch.randn(n, c, generator=_gen(seed), dtype=torch.float64) * 2


def away_from(x, points, gap=0.05):
    """Nudge values of x that sit within `gap` of one of `points` (kinks) away from them."""
    for p in points:
        near = (x - p).abs() < gap
        x = torch.where(near, x + 3 * gap, x)
    return x


def regression(n=4, seed=0, beta=1.0):
    g = _gen(seed)
    target = torch.randn(n, 4, generator=g, dtype=torch.float64)
    d = torch.randn(n, 4, generator=g, dtype=torch.float64) * 1.5
    d = away_from(away_from(d, [0.0, beta, -beta]), [0.0, beta, -beta])
    return target + d, target


def probs(n=4, c=3, seed=0):
    return torch.rand(n, c, generator=_gen(seed), dtype=torch.float64) * 0.8 + 0.1


LABELS = torch.tensor([0, 3, 1, 2])          # 3 = background for 3 classes
CE_LABELS = torch.tensor([0, 2, -100, 1])    # one ignored row


def cases():
    """(id, config, pred, target, kwargs)."""
    g = _gen(7)
    pr, tr = regression(beta=0.5)
    heat_t = torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    heat_t[0, 0, 0] = 1.0
    q = torch.rand(4, 3, generator=g, dtype=torch.float64)
    q = torch.where(q < 0.5, torch.zeros_like(q), q)
    w_row = torch.rand(4, generator=g, dtype=torch.float64)
    return [
        ("focal-mean", dict(type="FocalLoss", loss_weight=0.7), logits(), LABELS,
         dict(weight=w_row, avg_factor=3.0)),
        ("focal-none", dict(type="FocalLoss", loss_weight=0.7), logits(seed=1), LABELS,
         dict(reduction_override="none")),
        ("focal-activated-sum", dict(type="FocalLoss", activated=True), probs(), LABELS,
         dict(reduction_override="sum")),
        ("ce-softmax-none", dict(type="CrossEntropyLoss", loss_weight=0.7), logits(), CE_LABELS,
         dict(reduction_override="none", weight=w_row)),
        ("ce-softmax-mean", dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 0.5],
                                 avg_non_ignore=True), logits(seed=2), CE_LABELS, {}),
        # sigmoid CE returns float32 as mmdet's does (label.float()), except when a float64
        # avg_factor of shape (1,) promotes it: the only way to a float64 result to gradcheck
        ("ce-sigmoid-mean", dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.7),
         logits(seed=3), torch.tensor([0, 3, -1, 2]), dict(avg_factor=torch.tensor([2.5]).double())),
        ("ce-sigmoid-dense-mean", dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.7),
         logits(seed=4), probs(seed=5), dict(avg_factor=torch.tensor([1.5]).double())),
        ("l1-mean", dict(type="L1Loss", loss_weight=0.7), pr, tr, dict(avg_factor=torch.tensor(2.5))),
        ("smoothl1-none", dict(type="SmoothL1Loss", beta=0.5, loss_weight=0.7), pr, tr,
         dict(reduction_override="none")),
        ("mse-sum", dict(type="MSELoss", loss_weight=0.7), pr, tr, dict(reduction_override="sum")),
        ("balancedl1-none", dict(type="BalancedL1Loss", loss_weight=0.7), pr, tr,
         dict(reduction_override="none")),
        ("gaussian-focal-mean", dict(type="GaussianFocalLoss", loss_weight=0.7),
         torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1, heat_t, {}),
        ("varifocal-none", dict(type="VarifocalLoss", loss_weight=0.7), logits(seed=6), q,
         dict(reduction_override="none")),
    ]


CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(case, backend):
    _, cfg, pred, target, kw = case
    loss = compiled(cfg, backend)
    x = pred.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: loss(p, target, **kw), (x,), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)
