"""KnowledgeDistillationKLDivLoss (kd_loss.py): LD's KL divergence between tempered softmaxes."""
from __future__ import annotations

import torch

from ..build import check
from ..errors import ConfigAssertion
from ..registry import register_loss
from ..symbolic import exp, log, logsumexp, rowmax, rowsum, stop_gradient, where, width

FORWARD = ("pred", "soft_label", "weight=None", "avg_factor=None", "reduction_override=None")


def _kd_forward(module, a):
    """soft_label is the target; MMDetection detaches its softmax, so it never gets a gradient.
    The classes are dim 1, as in MMDetection's softmax(dim=1)."""
    a = dict(a)
    soft_label = a.pop("soft_label")
    a["target"] = soft_label.detach() if hasattr(soft_label, "detach") else soft_label
    pred, target = a["pred"], a["target"]
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor) and pred.dim() >= 3 \
            and target.shape == pred.shape:
        # Note [KD class axis]: kd_loss.py takes both softmaxes and the mean over dim 1; the
        # kernel reduces the last axis, so (N, K, d2..) becomes (N, d2.., K) and the loss
        # (N, d2..), the shape MMDetection's .mean(1) leaves.
        a["pred"], a["target"] = pred.movedim(1, -1).contiguous(), target.movedim(1, -1).contiguous()
    return module.run_pipeline(a)


@register_loss("KnowledgeDistillationKLDivLoss", forward=FORWARD, hooks={"forward": _kd_forward},
               _builtin=True)
def kd_kl_div_loss(pred, target, T: float = 10):
    """T^2 * mean over the K columns of q (log q - log_softmax(pred / T)), q = softmax(soft / T).

    As in MMDetection 3.3.0: a *mean* over the K columns (not a sum), q detached, and
    F.kl_div's xlogy convention (a term with q == 0 is 0). q is computed as torch's softmax
    (exp(s - max) / sum) and log q = log(q), so the values round as MMDetection's do.
    """
    check(T >= 1, f"T must be >= 1, got {T}", ConfigAssertion)
    e = exp(_shifted(target, T))
    q = stop_gradient(e / rowsum(e))
    xlogy = where(q == 0, 0.0, q * log(q))
    z = _shifted(pred, T)
    logp = z - logsumexp(z)
    return rowsum(xlogy - q * logp) / width(pred) * (T * T)


def _shifted(x, T: float):
    """(x - max x) / T: x / T - max(x / T) without rounding x / T first.

    Note [Shift before the temperature]: MMDetection divides first, so at |x| = 2^16 and T = 10
    each x / T is off by up to half an ulp of 6554 (2.4e-4) before the row max is subtracted,
    and the KL divergence, a small difference of such values, inherits that error (6.7e-4 of
    the loss at 2^16, 10% at 2^24). x - max x is exact (Sterbenz, for the values a row holds
    at that scale) and small, so dividing it rounds relative to the small difference. Both forms
    are the same number in exact arithmetic (T >= 1 > 0, so max(x / T) = max(x) / T); the max
    is a constant of the softmax (it cancels exactly), so it carries no gradient, and a row
    with +-inf or NaN still gives NaN, as (inf - inf) does in torch's log_softmax."""
    return (x - stop_gradient(rowmax(x))) / T
