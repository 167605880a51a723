"""The direct path of a call plan: a repeat goes from the arguments to the backend's launcher.

Note [Direct plans]: a plan (plans.py, Note [Call plans]) replays the first call's decisions,
but its generic replay still builds an I.Call, re-runs promote() and bind_denominator(), and
goes through _Fused with seven arguments. When the backend gives a launcher (cpp, cuda: see
their `plan`) and the call is simple enough, the plan instead gets a `run` closure made here,
which does only what that signature needs:
- picks the launcher's tensors out of (args, kwargs) with precomputed getters (the weight is
  passed as given: binding only viewed it, so its data pointer is the bound weight's);
- runs the loss's 'early_exit' and 'check' hooks as the generic replay does (the check gets a
  Call, built only for it);
- forms the denominator by the kind the first call had (a constant; float(avg) + eps32; a
  floating tensor's reshape(()) + eps32 in the promoted dtype), exactly as bind_denominator;
- launches through _Direct (one tensor and one tuple: autograd's per-argument work is small)
  and shapes and casts the loss as the first call's were.
Whatever needs the whole Call later (a double backward) rebuilds it from the kept arguments.
Note [Planned checks]: a 'check' hook may carry `planned(spec, call)`, which returns at record
time either None or a function of the target tensor doing the same check for that signature
(e.g. the label range through the native helper found once, losses/pipeline.py); the direct
path then calls it instead of building a Call for the hook. Whatever it cannot decide cheaply
it hands to the hook's own code, so the errors are the hook's.
A plan gets no direct path where the first call promoted pred (a new tensor), had an integer
or unusual avg_factor, or fed the kernel a tensor no argument holds.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable

import torch

from . import buffers, cache, plans
from . import input_grads as IG
from . import inputs as I
from .ops import Level

_grad_enabled = torch.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_STATS = cache.STATS
EPS32 = I.EPS32

CONST, NUMBER, TENSOR = 0, 1, 2    # denominator kinds


def rounded(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient in pred's dtype (a copy only when the kernel computed in float32)."""
    if grad.dtype == dtype:
        return grad
    out = buffers.empty(grad.shape, dtype) if grad.device.type == "cpu" else \
        torch.empty_like(grad, dtype=dtype)
    return out.copy_(grad)


def scaled(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * g in pred's dtype.

    Note [Loss scaling in float32]: for float16/bfloat16 pred the backend returns the gradient
    in float32 (cpp, torchscript); it is multiplied by grad_output (a GradScaler's loss scale) in
    float32 and rounded to pred's dtype once, after scaling. Rounding first, as a float16
    gradient would, flushes the small gradients of a mean over many elements to zero before the
    loss scale could lift them into float16's range.
    """
    if grad.dtype == dtype:
        return grad.mul_(g.to(dtype))
    out = buffers.empty(grad.shape, dtype) if grad.device.type == "cpu" else \
        torch.empty_like(grad, dtype=dtype)
    return torch.mul(grad, g.to(grad.dtype), out=out)


class Direct:
    """What a direct plan's launch and backward need, fixed per signature."""

    __slots__ = ("plan", "launch", "shape", "level", "dtype", "cpu", "scale", "row_level",
                 "scalar")

    def __init__(self, plan, launch, shape, level: Level, dtype: torch.dtype, cpu: bool, scale):
        self.plan, self.launch, self.shape, self.level = plan, launch, shape, level
        self.dtype, self.cpu, self.scale = dtype, cpu, scale
        self.row_level = level is Level.ROW and shape is not None
        self.scalar = shape is None or len(shape) == 0     # grad_output is 0-d


class _Direct(torch.autograd.Function):
    """_Fused (runtime.py) for a direct plan: job = (Direct, tensors, denom, module, args,
    kwargs). Note [Zero-copy backward] holds here too."""

    @staticmethod
    def forward(ctx, pred, job):
        d = job[0]
        loss, ctx.grad = d.launch(job[1], job[2])
        ctx.job = job
        return loss if d.shape is None else loss.reshape(d.shape)

    @staticmethod
    def backward(ctx, g):
        job = ctx.job
        d = job[0]
        if _grad_enabled():   # create_graph=True: see input_grads.py's Note [Double backward]
            module, args, kwargs = job[3:]
            plan = d.plan
            call = plan.finish(module.spec, plan.bound(args, kwargs), args, kwargs)
            return IG.vjp(module, call, d.level, ("pred",), g, reference=True)[0], None
        grad, ctx.grad = ctx.grad, None
        if grad is None:      # a second backward (retain_graph=True): run the kernel again
            grad = d.launch(job[1], job[2])[1]
        if d.scalar:
            if d.cpu and g.item() == 1.0:
                return (grad if grad.dtype == d.dtype else rounded(grad, d.dtype)), None
            if d.scale is not None and grad.dtype == d.dtype:
                return d.scale(grad, g), None   # the backend's device-side scaling, no sync
        elif d.row_level:
            g = g.unsqueeze(-1)
        return scaled(grad, g, d.dtype), None


# Note [Applying without Function.apply]: autograd.Function.apply is Python: it binds default
# arguments when there is a setup_context, and outside functorch transforms unwraps dead
# functorch wrappers among the arguments and calls the C implementation. A direct plan calls
# that C implementation itself, with pred unwrapped the same way; under a functorch transform
# it takes the generic replay (whose Function.apply raises or dispatches as it always did).
_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Direct)


def build(plan, cv, launch, call: I.Call, raw: dict[str, Any], spec,
          replay: Callable) -> Callable | None:
    """The direct `run(module, args, kwargs)` of a plan (Note [Direct plans]), or None.

    `call` is the first call after binding, `raw` its roles as passed, `launch` the backend's
    launcher (inputs in `launch.inputs` order), `replay` the plan's generic replay (taken under
    functorch transforms)."""
    if launch is None or getattr(launch, "inputs", None) is None or call.pred is not raw["pred"]:
        return None
    where = {"pred": "pred", plan.target_key: "target", "weight": "weight"}
    slots = []
    for name in launch.inputs:
        role = where.get(name)
        if role is None or plan.slots.get(role) is None or \
                (role == "weight" and plan.weight_shape is None):
            return None
        slots.append(plan.slots[role])
    avg = raw.get("avg_factor")
    if call.reduction != "mean" or avg is None:
        kind, const = CONST, call.denom
    elif type(avg) in (int, float):
        kind, const = NUMBER, None
    elif type(avg) is torch.Tensor and avg.dtype.is_floating_point and avg.numel() == 1:
        kind, const = TENSOR, None
    else:
        return None
    early, check = plan.hooks.get("early_exit"), plan.hooks.get("check")
    target_check = None
    if check is not None and getattr(check, "planned", None) is not None:
        target_check = check.planned(spec, call)    # Note [Planned checks]
        if target_check is not None:
            check = None
    # one getter for the launcher's tensors, then the target (when checked here and not
    # among them)
    n = len(slots)
    target_at = slots.index(plan.slots["target"]) if plan.slots["target"] in slots else None
    if target_check is not None and target_at is None:
        target_at = len(slots)
        slots.append(plan.slots["target"])
    avg_slot = plan.slots.get("avg_factor")
    avg_of = itemgetter(avg_slot)          # of args or of kwargs, as avg_positional says
    avg_positional = type(avg_slot) is int
    pick = plans.arg_getter(slots)
    pick_args = itemgetter(*slots) if len(slots) > 1 and all(type(s) is int for s in slots) \
        else None                    # the usual case without a frame: a tuple of positionals
    whole = len(slots) == n
    pdtype = call.pred.dtype
    d = Direct(plan, launch, plan.shape, plan.level, pdtype, call.pred.device.type == "cpu",
               plan.scale)
    grad, shape, out_dtype = plan.grad, plan.shape, call.out_dtype
    cast = launch.loss_dtype != out_dtype
    out_shape = tuple(call.out_shape) if call.out_shape and shape is None else None
    promote = torch.promote_types

    def run(module, args, kwargs):
        if grad and _functorch_active():
            return replay(module, args, kwargs)
        if early is not None:
            out = early(spec, plan.roles(args, kwargs))
            if out is not None:
                return out
        vals = pick_args(args) if pick_args is not None else pick(args, kwargs)
        if target_check is not None:
            target_check(vals[target_at])
        elif check is not None:
            check(spec, plan.bound(args, kwargs))
        if kind == NUMBER:
            denom = float(avg_of(args if avg_positional else kwargs)) + EPS32
        elif kind:
            denom = avg_of(args if avg_positional else kwargs).reshape(()) + EPS32
            denom = denom.to(promote(denom.dtype, pdtype))
        else:
            denom = const
        _STATS["memory_hits"] += 1
        module.__dict__["_last"] = cv    # (nn.Module.__setattr__ costs more than the launch)
        ins = vals if whole else vals[:n]
        if grad:
            loss = _APPLY(_unwrap_if_dead(vals[0]), (d, ins, denom, module, args, kwargs))
        else:
            loss = launch(ins, denom)[0]
            if shape is not None:
                loss = loss.reshape(shape)
        if out_shape is not None:
            loss = loss.reshape(out_shape)
        return loss.to(out_dtype) if cast else loss
    return run
