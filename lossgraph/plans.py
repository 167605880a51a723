"""Per-call fast path: a cached "call plan" for repeats of a call's signature.

Note [Call plans]: MMDetection calls each loss once per FPN level, every step, with the same
shapes, dtypes and argument forms; validating and binding such a call again costs more than a
small kernel. The first call of a signature runs the full pipeline (runtime.run_pipeline) and
records what it decided: where each role sits among the arguments, the target form, the weight's
access, the output dtype, the kernel and a backend launcher. A repeat with the same signature
(shapes, strides, dtypes, devices, requires_grad, grad mode, the values of every non-tensor
argument but avg_factor, whose type only) replays those decisions. Whatever depends on the data
still runs every call: the loss's 'early_exit' and 'check' hooks (label range, zero-weight
exit) and the avg_factor denominator. Calls are planned only where the replay is exact: no
'forward', 'bind_target' or 'avg_factor' hook, no empty pred, a weight that binding only viewed
(same memory, dtype and size), no other tensor requiring grad, not row-coupled 'none', not
under torch.compile tracing. Plans hold no tensors of a call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import cache
from . import inputs as I
from .ops import Level

MAX_PLANS = 64                   # per module; the oldest plan goes first
UNPLANNED_HOOKS = ("forward", "bind_target", "avg_factor")
TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def _compiling() -> bool:
    f = getattr(torch.compiler, "is_compiling", None)
    return bool(f()) if f is not None else False


def _sig(x, value: bool) -> Any:
    if type(x) in TENSOR_TYPES:
        return (x.shape, x.dtype, x.device, x.stride(), x.requires_grad)
    if isinstance(x, torch.Tensor):
        raise TypeError("a tensor subclass: not planned")
    return (type(x), x) if value else type(x)


@dataclass
class Plan:
    """The recorded decisions of one call signature (see Note [Call plans])."""

    slots: dict[str, Any]          # role -> positional index or keyword name
    target_key: str                # 'label' or 'target'
    weight_shape: tuple | None     # the bound weight's shape (a view of the raw weight)
    call: I.Call                   # the call's fields before its denominator (tensors emptied)
    level: Level
    cv: Any                        # the CompiledVariant
    launch: Callable               # call -> (loss, grad)
    grad: bool
    shape: Any                     # the loss shape of a 'none' reduction, else None
    scale: Callable | None
    hooks: dict[str, Callable]

    def arg(self, role: str, args: tuple, kwargs: dict):
        s = self.slots.get(role)
        if s is None:
            return None
        return args[s] if type(s) is int else kwargs[s]

    def bind(self, spec, args: tuple, kwargs: dict):
        """The Call of a repeat, or the early-exit result when the loss takes one."""
        if "early_exit" in self.hooks:
            a = {r: (args[s] if type(s) is int else kwargs[s]) for r, s in self.slots.items()}
            out = self.hooks["early_exit"](spec, a)
            if out is not None:
                return out
        c = self.call
        call = I.Call(c.name, self.arg("pred", args, kwargs), c.target_form,
                      {self.target_key: self.arg("target", args, kwargs)}, c.weight_access,
                      c.reduction, None, c.out_dtype, (), c.params)
        if self.weight_shape is not None:
            w = self.arg("weight", args, kwargs)
            call.tensors["weight"] = w if w.shape == self.weight_shape else w.view(self.weight_shape)
        if "check" in self.hooks:
            self.hooks["check"](spec, call)
        I.promote(spec, call)
        I.bind_denominator(call, self.arg("avg_factor", args, kwargs), self.level)
        cache.STATS["memory_hits"] += 1
        return call


class Plans:
    """A module's plans by call signature; `key` is None for calls that are never planned."""

    def __init__(self, positional: tuple[str, ...], roles: dict[str, str]):
        self.positional = positional
        self.roles = roles
        self.avg_index = next((i for i, n in enumerate(positional)
                               if roles.get(n, n) == "avg_factor"), -1)
        self._plans: dict[tuple, Plan] = {}

    def key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The call's signature, or None when it cannot be planned."""
        if len(args) > len(self.positional) or _compiling():
            return None
        try:
            k = (torch.is_grad_enabled(),
                 tuple(_sig(x, i != self.avg_index) for i, x in enumerate(args)),
                 tuple((n, _sig(x, self.roles.get(n, n) != "avg_factor"))
                       for n, x in kwargs.items()))
            hash(k)
        except TypeError:
            return None
        return k

    def get(self, key: tuple) -> Plan | None:
        return self._plans.get(key)

    def slots(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        s: dict[str, Any] = {self.roles.get(n, n): i for i, n in enumerate(self.positional[:len(args)])}
        s.update({self.roles.get(n, n): n for n in kwargs})
        return s

    def add(self, key: tuple, plan: Plan) -> None:
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def replayable_weight(call: I.Call, raw) -> tuple | None | bool:
    """The bound weight's shape when binding only viewed the raw weight, None without a weight,
    False when binding made a new tensor (then the call is not planned)."""
    t = call.tensors.get("weight")
    if t is None:
        return None
    if not isinstance(raw, torch.Tensor) or t.dtype != raw.dtype or t.numel() != raw.numel() or \
            not raw.is_contiguous() or not t.is_contiguous() or \
            (t.numel() and t.data_ptr() != raw.data_ptr()):
        return False
    return tuple(t.shape)
