"""Define a new loss as plain math, compile it, and use it with MMDetection's pipeline options.

    python examples/custom_loss.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lossgraph as lg  # noqa: E402


@lg.register_loss("MySmoothL1")
def my_smooth_l1(pred, target, beta: float = 1.0):
    """Smooth L1: keyword arguments with defaults become the config's hyperparameters."""
    d = lg.abs(pred - target)
    return lg.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


@lg.register_loss("SoftmaxFocal", target="labels")
def softmax_focal(pred, labels, gamma: float = 2.0):
    """A softmax focal loss on index labels: -(1 - p_y)^gamma log p_y, one value per row."""
    log_p = lg.take(pred, labels) - lg.logsumexp(pred)
    return -((1 - lg.exp(log_p)) ** gamma) * log_p


def eager_smooth_l1(pred, target, beta, weight, avg_factor, loss_weight):
    d = (pred - target).abs()
    loss = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta) * weight
    return loss_weight * loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)


def main() -> None:
    torch.manual_seed(0)
    loss = lg.compile(dict(type="MySmoothL1", beta=0.5, reduction="mean", loss_weight=2.0))
    pred = torch.randn(1000, 4, requires_grad=True)
    target, weight = torch.randn(1000, 4), torch.rand(1000, 4)
    value = loss(pred, target, weight, avg_factor=250.0)
    value.backward()
    ref_pred = pred.detach().clone().requires_grad_(True)
    ref = eager_smooth_l1(ref_pred, target, 0.5, weight, 250.0, 2.0)
    ref.backward()
    print(f"MySmoothL1: lossgraph {value.item():.6f}  eager {ref.item():.6f}  "
          f"max grad diff {(pred.grad - ref_pred.grad).abs().max().item():.1e}")
    print("per-element ('none') shape:", tuple(loss(pred, target, reduction_override="none").shape))
    print("\nIR of the last call (after every pass):\n")
    print(loss.graph)

    focal = lg.compile(dict(type="SoftmaxFocal", gamma=2.0, reduction="sum"))
    logits, labels = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    out = focal(logits, labels)
    out.backward()
    p = logits.detach().softmax(-1).gather(1, labels[:, None]).squeeze(1)
    print(f"\nSoftmaxFocal: lossgraph {out.item():.6f}  eager "
          f"{(-(1 - p) ** 2 * p.log()).sum().item():.6f}")


if __name__ == "__main__":
    main()
