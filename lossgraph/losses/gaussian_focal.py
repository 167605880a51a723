"""GaussianFocalLoss (gaussian_focal_loss.py): CornerNet's focal loss on Gaussian heatmaps."""
from __future__ import annotations

from ..errors import InputAssertion
from ..inputs import fail
from ..registry import register_loss
from ..symbolic import log, to_float

FORWARD = ("pred", "target", "pos_inds=None", "pos_labels=None", "weight=None", "avg_factor=None",
           "reduction_override=None")


def _part(module, config: dict):
    """A compiled helper loss of `module` (built once, on the same backend and dump folder)."""
    from ..config import parse
    from ..runtime import CompiledLoss
    parts = module.__dict__.setdefault("_lg_parts", {})
    key = tuple(sorted(config.items()))
    if key not in parts:
        parts[key] = CompiledLoss(parse(config), backend=module.compiler.backend,
                                  dump_dir=module.compiler.dump_dir)
    return parts[key]


def _forward(module, a):
    """Without pos_inds: the standard kernel. With pos_inds/pos_labels (CenterNet-update), as
    gaussian_focal_loss_with_pos_inds: the positive term at pred[pos_inds, pos_labels] and the
    negative term over all of pred are reduced *separately* (same reduction and avg_factor),
    then combined as loss_weight * (pos_weight * pos + neg_weight * neg); `weight` is ignored.
    Each term is its own compiled kernel; the gather is torch indexing (its backward scatters)."""
    pos_inds = a.get("pos_inds")
    if pos_inds is None:
        return module.run_pipeline(a)
    spec, kw = module.spec, module.spec.kwargs()
    if a.get("pos_labels") is None:
        fail(spec.name, "pos_labels must be given with pos_inds", InputAssertion)
    pred = a["pred"]
    pos_pred = pred[pos_inds].gather(1, a["pos_labels"].unsqueeze(1))
    common = {"avg_factor": a.get("avg_factor"), "reduction_override": a.get("reduction_override")}
    pos = _part(module, {"type": "_GaussianFocalPos", "alpha": kw["alpha"],
                         "reduction": spec.reduction})
    neg = _part(module, {"type": "_GaussianFocalNeg", "alpha": kw["alpha"], "gamma": kw["gamma"],
                         "reduction": spec.reduction})
    pos_loss = pos(pos_pred, pos_pred.detach(), **common)
    neg_loss = neg(pred, a["target"], **common)
    return spec.loss_weight * (kw["pos_weight"] * pos_loss + kw["neg_weight"] * neg_loss)


@register_loss("GaussianFocalLoss", forward=FORWARD, hooks={"forward": _forward}, _builtin=True)
def gaussian_focal_loss(pred, target, alpha: float = 2.0, gamma: float = 4.0,
                        pos_weight: float = 1.0, neg_weight: float = 1.0):
    """pos_weight * pos_loss + neg_weight * neg_loss on probabilities; positives where target == 1.

    pos_loss = -log(p + 1e-12) (1-p)^alpha [t == 1]; neg_loss = -log(1 - p + 1e-12) p^alpha (1-t)^gamma.
    """
    eps = 1e-12
    pos_weights = to_float(target == 1)
    neg_weights = (1 - target) ** gamma
    pos_loss = -log(pred + eps) * (1 - pred) ** alpha * pos_weights
    neg_loss = -log(1 - pred + eps) * pred ** alpha * neg_weights
    return pos_weight * pos_loss + neg_weight * neg_loss


@register_loss("_GaussianFocalPos", _builtin=True)
def gaussian_focal_pos(pred, target, alpha: float = 2.0):
    """Helper of GaussianFocalLoss's pos_inds path: -log(p + 1e-12) (1 - p)^alpha at the gathered
    positives (target is unused)."""
    return -log(pred + 1e-12) * (1 - pred) ** alpha


@register_loss("_GaussianFocalNeg", _builtin=True)
def gaussian_focal_neg(pred, target, alpha: float = 2.0, gamma: float = 4.0):
    """Helper of GaussianFocalLoss's pos_inds path: -log(1 - p + 1e-12) p^alpha (1 - t)^gamma."""
    return -log(1 - pred + 1e-12) * pred ** alpha * (1 - target) ** gamma
