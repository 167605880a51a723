"""GHMC and GHMR (ghm_loss.py): gradient-harmonized BCE and Authentic Smooth L1, with momentum.

Note [GHM histogram]: each call first bins the detached gradient norm g of every element into
`bins` intervals [edges[i], edges[i+1]) and weights an element tot / (count of its bin) / (number
of non-empty bins); with momentum the count is an EMA kept in the `acc_sum` buffer. That first
pass runs as torch ops on pred's device, with no host synchronization (MMDetection reads every
bin count with .item()):
  - g is computed with the very torch ops MMDetection uses, so it is bitwise the same, and
    torch.bucketize against the same `edges` buffer makes the same `>=` / `<` comparisons, so
    every element lands in MMDetection's bin, also exactly at an edge. A NaN g is in no bin.
  - the counts come from count_values (Note [Sync-free counts]); tot, the EMA update and the
    per-bin weight table stay on the device, rounded as MMDetection rounds them (below).
  - the per-element weight table[bin] is the kernel's elementwise weight: an N*C temporary, as
    in MMDetection. The kernel cannot recompute g itself: its sigmoid is not bitwise torch's, and
    an element one ulp from an edge would then change bins.
The fused kernel is the ordinary pipeline: loss * weight, summed, / (tot + eps32), * loss_weight.

MMDetection quirks kept: 'sum' raises ValueError (avg_factor=tot is always passed), after the
momentum buffer was updated; 'none' returns the unnormalized weight * loss; GHMR's tot is the sum
of label_weight (not a count) and its avg_factor argument is ignored; GHMC's tot counts the valid
entries of label_weight in its own shape (before any broadcast to pred).
"""
from __future__ import annotations

import torch

from ..build import check, is_labels
from ..errors import ConfigNotImplemented
from ..config import check_reduction
from ..inputs import FLOATS, INTS, broadcast, check_pred, compute_dtype, fail, target_form
from ..registry import register_loss
from ..symbolic import bce_with_logits, one_hot, sqrt

GHMC_FORWARD = ("pred", "target", "label_weight", "reduction_override=None", "**kwargs")
GHMR_FORWARD = ("pred", "target", "label_weight", "avg_factor=None", "reduction_override=None")


def count_values(keys: torch.Tensor, length: int) -> torch.Tensor:
    """How often each of 0..length-1 occurs in the integer tensor `keys` (all in that range).

    Note [Sync-free counts]: on CUDA torch.bincount reads max(keys) back to the host to size
    its output; histc over the fixed range [0, length] does not, and it counts small integers
    exactly in floating point while the total stays below 2**24 (float32), else in float64.
    CPU tensors take bincount (no device to wait for), and so does CUDA under
    torch.use_deterministic_algorithms, which rejects histc.
    """
    keys = keys.reshape(-1)
    if keys.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return torch.bincount(keys, minlength=length).narrow(0, 0, length)
    dt = torch.float32 if keys.numel() < 2 ** 24 else torch.float64
    return torch.histc(keys.to(dt), bins=length, min=0, max=length).to(torch.int64)


def _edges_state(last_edge):
    """The `edges` buffer (float32 i/bins, last edge set by `last_edge`) and `acc_sum`."""
    def state(spec):
        kw = spec.kwargs()
        edges = torch.arange(kw["bins"] + 1).float() / kw["bins"]
        last_edge(edges)
        out = {"edges": edges}
        if kw["momentum"] > 0:
            out["acc_sum"] = torch.zeros(kw["bins"])
        return out
    return state


def _ghmc_last_edge(edges):
    edges[-1] += 1e-6      # in float32, as ghm_loss.py does it


def _ghmr_last_edge(edges):
    edges[-1] = 1e3


def harmonizing_weights(module, g: torch.Tensor, valid: torch.Tensor, tot: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """The GHM weight of every element of g (0 outside `valid`), updating `acc_sum` in place.

    `tot` is MMDetection's float32 value of tot. Rounding follows ghm_loss.py: without momentum
    the weight is the Python float tot / count rounded to `dtype`; with momentum the EMA is
    float32 buffer math, acc = acc * m + float32((1 - m) * count), and the weight is
    float32(tot) / acc; the division by the number of non-empty bins happens in `dtype`.
    """
    bins, mmt = module.bins, module.momentum
    edges = module.edges
    if edges.device != g.device:
        fail(module.spec.name, f"the module's buffers are on {edges.device} but pred is on "
                               f"{g.device}: move the loss with .to(device)")
    # edges[idx - 1] <= g < edges[idx]: the comparisons of ghm_loss.py, edges in g's dtype
    idx = torch.bucketize(g, edges.to(g.dtype), right=True, out_int32=True)
    key = torch.where(valid & (idx > 0), idx - 1, bins)   # bin `bins`: in no bin, weight 0
    counts = count_values(key, bins + 1).narrow(0, 0, bins)
    filled = counts > 0
    if mmt > 0:
        acc = module.acc_sum   # acc * m + (1 - m) * count in the filled bins; the rest stay
        acc.mul_(torch.full_like(acc, mmt).where(filled, 1.0))
        acc.add_(((1 - mmt) * counts.double()).to(acc.dtype))
        per_bin = (tot.to(acc.dtype) / acc).to(dtype)
    else:
        per_bin = (tot.double() / counts.double()).to(dtype)
    n = filled.sum().clamp(min=1).to(dtype)
    table = torch.where(filled, per_bin, per_bin.new_zeros(())) / n
    table = torch.cat([table, table.new_zeros(1)])
    return table.index_select(0, key.reshape(-1)).reshape(key.shape)


def _reduction(spec, a) -> str | None:
    override = a.get("reduction_override")
    if override is not None:
        check_reduction(spec.name, override, "reduction_override")
    return override


def _label_weight(spec, lw, pred: torch.Tensor) -> torch.Tensor:
    if not isinstance(lw, torch.Tensor):
        fail(spec.name, f"label_weight must be a torch.Tensor, got {type(lw).__name__}")
    if lw.device != pred.device:
        fail(spec.name, f"label_weight is on {lw.device} but pred is on {pred.device}")
    if lw.dtype not in FLOATS + INTS + (torch.bool,):
        fail(spec.name, f"label_weight must be a numeric tensor, got {lw.dtype}")
    return lw


def _broadcastable(spec, lw: torch.Tensor, pred: torch.Tensor) -> None:
    if broadcast(tuple(lw.shape), tuple(pred.shape)) != tuple(pred.shape):
        fail(spec.name, f"label_weight of shape {tuple(lw.shape)} does not broadcast to pred's "
                        f"shape {tuple(pred.shape)}")


# -- GHMC ---------------------------------------------------------------------------------------

def _ghmc_forward(module, a):
    """Histogram pass (Note [GHM histogram]), then the fused BCE kernel weighted by its result."""
    spec = module.spec
    override = _reduction(spec, a)
    pred = check_pred(spec.name, a["pred"])
    target = a["target"]
    form = target_form(spec.name, "any", pred, target)
    lw = _label_weight(spec, a["weight"], pred)
    with torch.no_grad():
        s = pred.detach().sigmoid().to(torch.promote_types(pred.dtype, torch.float32))
        if form == "labels":
            # _expand_onehot_labels: labels in [0, C) set one column; lw (N,) covers its row
            if lw.numel() != target.numel():
                fail(spec.name, f"label_weight of shape {tuple(lw.shape)} must have one value "
                                f"per row ({target.numel()}) with index labels")
            c = pred.shape[-1]
            g = s   # |s - onehot| is s, and 1 - s (exactly |s - 1|) at the label's column
            if c > 0:
                hit = ((target >= 0) & (target < c)).unsqueeze(-1)
                col = target.clamp(0, c - 1).unsqueeze(-1)
                s_y = s.gather(-1, col)
                g = s.scatter_(-1, col, torch.where(hit, 1 - s_y, s_y))
            valid = (lw > 0).reshape(target.shape).unsqueeze(-1)
            count = valid.sum() * c
        else:
            _broadcastable(spec, lw, pred)
            g = torch.abs(s - target.float())
            valid = lw > 0
            count = valid.sum()
        tot = count.to(torch.float32).clamp(min=1.0)
        w = harmonizing_weights(module, g, valid, tot, pred.dtype)
    return module.run_pipeline({"pred": pred, "target": target, "weight": w,
                                "avg_factor": tot.to(compute_dtype(pred.dtype)),
                                "reduction_override": override})


@register_loss("GHMC", target="any", forward=GHMC_FORWARD,
               hooks={"forward": _ghmc_forward, "state": _edges_state(_ghmc_last_edge)},
               _builtin=True)
def ghmc(pred, target, bins: int = 10, momentum: float = 0.0, use_sigmoid: bool = True):
    """BCE-with-logits(pred, t), weighted by the gradient-norm histogram (Note [GHM histogram]).

    t is the one-hot of index labels (labels outside [0, C) give an all-zero row) or the given
    binary (N, C) target; label_weight only marks valid elements (> 0).
    """
    if not use_sigmoid:
        raise ConfigNotImplemented("GHMC: use_sigmoid=False is not implemented (as in MMDetection)")
    check(bins >= 1, f"bins must be a positive integer, got {bins}")
    t = one_hot(target) if is_labels(target) else target
    return bce_with_logits(pred, t)


# -- GHMR ---------------------------------------------------------------------------------------

def _ghmr_forward(module, a):
    """Histogram pass over g = |d| / sqrt(mu^2 + d^2), then the fused ASL1 kernel."""
    spec = module.spec
    override = _reduction(spec, a)
    pred = check_pred(spec.name, a["pred"])
    target = a["target"]
    target_form(spec.name, "dense", pred, target)
    lw = _label_weight(spec, a["weight"], pred)
    _broadcastable(spec, lw, pred)
    mu = module.mu
    with torch.no_grad():
        diff = pred.detach() - target
        g = torch.abs(diff / torch.sqrt(mu * mu + diff * diff))
        tot = lw.float().sum().clamp(min=1.0)
        w = harmonizing_weights(module, g, lw > 0, tot, pred.dtype)
    out = module.run_pipeline({"pred": pred, "target": target, "weight": w,
                               "avg_factor": tot.to(compute_dtype(pred.dtype)),
                               "reduction_override": override})
    return out.to(torch.promote_types(pred.dtype, target.dtype))   # float16 in, float16 out


@register_loss("GHMR", forward=GHMR_FORWARD,
               hooks={"forward": _ghmr_forward, "state": _edges_state(_ghmr_last_edge)},
               _builtin=True)
def ghmr(pred, target, mu: float = 0.02, bins: int = 10, momentum: float = 0.0):
    """Authentic Smooth L1 sqrt(d^2 + mu^2) - mu, d = pred - target, weighted by the histogram.

    The avg_factor argument is accepted and ignored; the mean divides by tot = max(sum of
    label_weight, 1) (Note [GHM histogram]).
    """
    check(bins >= 1, f"bins must be a positive integer, got {bins}")
    diff = pred - target
    return sqrt(diff * diff + mu * mu) - mu
