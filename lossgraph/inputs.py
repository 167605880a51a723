"""Per-call argument handling: validate tensors, resolve the target form, broadcast the weight,
and turn avg_factor into the 'mean' denominator, exactly as MMDetection's pipeline does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import InputError, InputShapeError
from .ops import Level

EPS32 = torch.finfo(torch.float32).eps  # MMDetection adds float32 eps to avg_factor, any dtype
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float64 for float64 inputs, float32 for every other float
    (float16/bfloat16 inputs are computed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Call:
    """One call, normalized: kernel inputs in canonical layouts plus what shapes the result."""

    name: str
    pred: torch.Tensor
    target_form: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_access: str | None = None
    reduction: str = "mean"
    denom: Any = None                  # float, 0-d tensor, or None
    out_dtype: torch.dtype = torch.float32
    out_shape: tuple = ()                # of a reduced loss: () or avg_factor's (1,)-like shape
    params: tuple = ()

    @property
    def width(self) -> int:
        return self.pred.shape[-1] if self.pred.dim() else 1

    @property
    def rows(self) -> int:
        return self.pred.numel() // max(self.width, 1)

    def loss_shape(self, level: Level) -> torch.Size:
        return self.pred.shape if level is Level.ELEM else self.pred.shape[:-1]


def fail(name: str, msg: str, error: type = InputError):
    """Raise error (InputError or a subclass, see Note [Exception compatibility]) naming the loss."""
    raise error(f"{name}: {msg}")


def check_pred(name: str, pred) -> torch.Tensor:
    """pred must be a floating tensor with at least one dimension."""
    if not isinstance(pred, torch.Tensor):
        fail(name, f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if pred.dtype not in FLOATS:
        fail(name, f"pred must be a floating tensor (float16/bfloat16/float32/float64), got {pred.dtype}")
    if pred.dim() == 0:
        fail(name, "pred must have at least one dimension, got a 0-d tensor")
    return pred


def _same_device(name: str, what: str, t: torch.Tensor, pred: torch.Tensor) -> None:
    if t.device != pred.device:
        fail(name, f"{what} is on {t.device} but pred is on {pred.device}")


def target_form(name: str, declared: str, pred: torch.Tensor, target) -> str:
    """'dense' (same shape as pred) or 'labels' (integer class per row), checked."""
    if not isinstance(target, torch.Tensor):
        fail(name, f"target must be a torch.Tensor, got {type(target).__name__}")
    _same_device(name, "target", target, pred)
    form = declared
    if declared == "any":
        form = "dense" if target.dim() == pred.dim() else "labels"
    if form == "labels":
        if target.dtype not in INTS:
            fail(name, f"labels must be an integer tensor, got {target.dtype}")
        if tuple(target.shape) != tuple(pred.shape[:-1]):
            fail(name, f"labels of shape {tuple(target.shape)} do not match pred of shape "
                       f"{tuple(pred.shape)}: expected {tuple(pred.shape[:-1])}", InputShapeError)
    else:
        if tuple(target.shape) != tuple(pred.shape):
            fail(name, f"target of shape {tuple(target.shape)} does not match pred of shape "
                       f"{tuple(pred.shape)}", InputShapeError)
        if target.dtype not in FLOATS + INTS + (torch.bool,):
            fail(name, f"target must be a numeric tensor, got {target.dtype}")
    return form


def check_label_range(name: str, labels: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Labels outside [lo, hi] raise InputError (checked on the CPU, where it costs no sync).

    Every call pays this pass over the labels, so it runs in the native helper when there is one
    (one loop, no temporaries, ~1 us for a small tensor); torch finds the range for the message."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    if _in_range(labels, lo, hi):
        return
    mn, mx = (int(x) for x in torch.aminmax(labels))
    if mn < lo or mx > hi:
        fail(name, f"labels must be in [{lo}, {hi}] ({what}), got values in [{mn}, {mx}]")


def planned_label_range(name: str, labels: torch.Tensor, lo: int, hi: int,
                        what: str) -> Callable[[torch.Tensor], None]:
    """check_label_range for the repeats of a call plan, whose labels have `labels`' shape,
    dtype, device and strides: the native helper is looked up once, and only a failing pass
    goes through check_label_range (which raises its usual error)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return _no_check
    from .backends.cpp import _range_functions
    fn, n = _range_functions().get(labels.dtype), labels.numel()
    if fn is None or not labels.is_contiguous():
        return lambda t: check_label_range(name, t, lo, hi, what)

    def check(t: torch.Tensor) -> None:
        if not fn(t.data_ptr(), n, lo, hi):
            check_label_range(name, t, lo, hi, what)
    return check


def _no_check(t: torch.Tensor) -> None:
    return None


def in_range(t: torch.Tensor, lo: int, hi: int) -> bool:
    """True when one native pass shows every value of t in [lo, hi]; False when some value is
    not, or the pass does not apply (not a contiguous int32/int64 CPU tensor, no C compiler)."""
    return bool(_in_range(t, lo, hi))


def _in_range(t: torch.Tensor, lo: int, hi: int) -> bool | None:
    """backends.cpp.in_range, imported on first use (cpp imports this module); the first call
    puts it in this global's place, so later calls go straight to it."""
    global _in_range
    from .backends.cpp import in_range
    _in_range = in_range
    return in_range(t, lo, hi)


# -- weight broadcasting ------------------------------------------------------------------------

def broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast of two shapes, or None (torch.broadcast_shapes without the 0.4 s import of
    torch's symbolic-shape machinery on its first call)."""
    out = []
    for x, y in zip((1,) * (len(b) - len(a)) + a, (1,) * (len(a) - len(b)) + b):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _classify(name: str, w: torch.Tensor, loss_shape: torch.Size, level: Level) -> tuple[str, torch.Tensor]:
    """Raw `loss * weight` broadcasting: the weight must broadcast to the loss's own shape."""
    out = broadcast(tuple(w.shape), tuple(loss_shape))
    if out != tuple(loss_shape):
        fail(name, f"weight of shape {tuple(w.shape)} does not broadcast to the loss shape "
                   f"{tuple(loss_shape)}", InputShapeError)
    if w.numel() == 1:
        return "scalar", w.reshape(())
    shape = (1,) * (len(loss_shape) - w.dim()) + tuple(w.shape)
    if tuple(shape) == tuple(loss_shape):
        return ("elem" if level is Level.ELEM else "row"), w.reshape(-1)
    if level is Level.ELEM and shape[-1] == 1 and shape[:-1] == tuple(loss_shape[:-1]):
        return "row", w.reshape(-1)
    if level is Level.ELEM and all(s == 1 for s in shape[:-1]) and shape[-1] == loss_shape[-1]:
        return "col", w.reshape(-1)
    full = w.expand(loss_shape).reshape(-1)  # rare broadcast forms: materialize
    return ("elem" if level is Level.ELEM else "row"), full


def weight_raw(name, w, pred, loss_shape, level):
    """weighted_loss: plain broadcasting of the weight against the loss."""
    return _classify(name, w, loss_shape, level)


def weight_focal(name, w, pred, loss_shape, level):
    """focal_loss.py: a (N,) weight is viewed (N,1); else it must hold N*C values, viewed (N,C)."""
    if w.shape != loss_shape:
        n = loss_shape[0]
        if w.dim() >= 1 and w.size(0) == n:
            if w.numel() != n:
                fail(name, f"weight of shape {tuple(w.shape)} must have shape ({n},) or "
                           f"{tuple(loss_shape)}", InputShapeError)
            return "row", w.reshape(-1)
        if w.numel() != loss_shape.numel():
            fail(name, f"weight of shape {tuple(w.shape)} must have {n} or "
                       f"{loss_shape.numel()} elements (pred is {tuple(loss_shape)})", InputShapeError)
        return "elem", w.reshape(-1)
    return "elem", w.reshape(-1)


def weight_rows(name, w, pred, loss_shape, level):
    """One weight per row, repeated over the classes (CrossEntropyLoss with index labels)."""
    rows = (loss_shape[:-1] if level is Level.ELEM else loss_shape).numel()
    if w.numel() != rows:
        fail(name, f"weight of shape {tuple(w.shape)} must have one value per row ({rows})",
             InputShapeError)
    return "row", w.reshape(-1)


def weight_iou(name, w, pred, loss_shape, level):
    """iou_loss.py: a (N,4) weight is averaged over its last dim to (N,)."""
    if w.dim() > 1:
        if w.shape != pred.shape:
            fail(name, f"weight of shape {tuple(w.shape)} must have shape {tuple(pred.shape)} "
                       f"or ({pred.shape[0]},)", InputShapeError)
        w = w.mean(-1)
    return _classify(name, w, loss_shape, level)


WEIGHT_RULES: dict[str, Callable] = {"raw": weight_raw, "focal": weight_focal, "rows": weight_rows,
                                     "iou": weight_iou}


def bind_weight(call: Call, rule: str, w, level: Level, as_float: bool) -> None:
    """Validate and broadcast the weight per the loss's rule; record access and result dtype."""
    if not isinstance(w, torch.Tensor):
        fail(call.name, f"weight must be a torch.Tensor or None, got {type(w).__name__}")
    _same_device(call.name, "weight", w, call.pred)
    if w.dtype not in FLOATS + INTS + (torch.bool,):
        fail(call.name, f"weight must be a numeric tensor, got {w.dtype}")
    if as_float:
        w = w.float()
    loss_shape = call.loss_shape(level)
    access, t = WEIGHT_RULES[rule](call.name, w, call.pred, loss_shape, level)
    if t.dtype.is_floating_point:
        # widen only (exact): a float32 weight on a float64 loss is multiplied in float64, as
        # torch's promotion of `loss * weight` does in mmdet, gradient included
        t = t.to(torch.promote_types(t.dtype, call.pred.dtype))
    call.weight_access = access
    call.tensors["weight"] = t
    if t.dtype.is_floating_point and w.dim() > 0:  # a 0-d or integer weight never promotes
        call.out_dtype = torch.promote_types(call.out_dtype, t.dtype)


# -- result dtype ---------------------------------------------------------------------------------

# Note [Result dtype]: the result has the dtype MMDetection's eager ops give it. These losses start
# with `pred - target` (or bbox_overlaps(pred, target)) and no cast, so torch promotes pred with a
# float target: an f16 pred with an f32 target computes and returns f32, an f32 pred with an f64
# target f64. We cast pred to that dtype before the kernel (exact: a widening), so the kernel
# computes at that precision and autograd casts pred's gradient back to pred's dtype, as in eager.
# Losses that cast the target to pred's dtype (FocalLoss, VarifocalLoss: target.type_as(pred))
# keep pred's dtype. Sigmoid CrossEntropyLoss always returns float32: it passes label.float() to
# binary_cross_entropy_with_logits, whose result takes the target's dtype (f64 logits included),
# and multiplies by weight.float().
TARGET_PROMOTES = frozenset({"L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "IoULoss",
                             "BoundedIoULoss", "GIoULoss", "DIoULoss", "CIoULoss", "EIoULoss",
                             "SIoULoss"})
FLOAT32_SIGMOID = frozenset({"CrossEntropyLoss", "CrossEntropyCustomLoss"})


def promote(spec, call: Call) -> None:
    """Apply MMDetection's result dtype to the call; see Note [Result dtype]."""
    name = spec.name
    if name in TARGET_PROMOTES:
        t = call.tensors.get("target")
        if t is not None and t.dtype != call.pred.dtype and t.dtype.is_floating_point:
            dt = torch.promote_types(call.pred.dtype, t.dtype)
            if dt != call.pred.dtype:
                call.pred = call.pred.to(dt)
                call.out_dtype = torch.promote_types(call.out_dtype, dt)
    elif name in FLOAT32_SIGMOID:
        kw = spec.kwargs()
        if kw.get("use_sigmoid") and not kw.get("use_mask"):
            call.out_dtype = torch.float32


@dataclass(frozen=True)
class Exact:
    """What a loss's avg_factor hook returns to divide by a count as is, without the eps32 an
    avg_factor gets (e.g. SeesawLoss's mean over positive rows, a device tensor)."""

    value: Any


def bind_denominator(call: Call, avg_factor, level: Level, promotes: bool = True) -> None:
    """'mean' divides by avg_factor + eps32, or by the number of loss elements without it.
    A loss's own count (promotes=False: a Python number in mmdet, .item()) keeps the dtype."""
    if isinstance(avg_factor, Exact):
        call.denom = avg_factor.value
        return
    if avg_factor is not None and call.reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    if call.reduction != "mean":
        return
    if avg_factor is None:
        n = call.loss_shape(level).numel()
        # the mean of nothing is 0/0 = NaN, as in torch; a NaN denominator gives that without a
        # ZeroDivisionError in the kernel's Python-float scalar math (1 / denom)
        call.denom = float(n) if n else float("nan")
    elif isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1:
            fail(call.name, f"avg_factor must be a number or a one-element tensor, got shape "
                            f"{tuple(avg_factor.shape)}")
        d = avg_factor.reshape(()) + EPS32
        if promotes:
            # loss.sum() / (avg_factor + eps): torch's promotion of a 0-d sum with avg's shape
            call.out_dtype = torch.result_type(
                torch.empty((), dtype=call.out_dtype, device="meta"),
                torch.empty(avg_factor.shape, dtype=d.dtype, device="meta"))
            call.out_shape = avg_factor.shape      # sum / (a (1,) tensor) is a (1,) tensor
        # (with a float32 (1,) avg_factor and a float64 pred, MMDetection's division even runs in
        # float32; we return its float32 value but keep the gradient's 1/denom in float64)
        # eps is added in avg_factor's own dtype, as in mmdet; the division then runs at least at
        # pred's precision, so a float32 avg_factor does not round a float64 gradient's 1/denom
        call.denom = d.to(torch.promote_types(d.dtype, call.pred.dtype))
    elif isinstance(avg_factor, (int, float)) and not isinstance(avg_factor, bool):
        call.denom = float(avg_factor) + EPS32
    else:
        fail(call.name, f"avg_factor must be a number or a tensor, got {type(avg_factor).__name__}")
