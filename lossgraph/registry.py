"""The loss registry: `register_loss` turns a math function into a LossDef (config schema + math)."""
from __future__ import annotations

import hashlib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigAssertion, ConfigError, ConfigTypeError

# The forward signature shared by almost every MMDetection loss (mmdet-losses.md §1.4).
DEFAULT_FORWARD = ("pred", "target", "weight=None", "avg_factor=None", "reduction_override=None")
# Forward-argument names and the pipeline role each one plays.
ROLES = {"pred": "pred", "cls_score": "pred", "target": "target", "label": "target",
         "labels": "target", "weight": "weight", "label_weight": "weight",
         "label_weights": "weight", "avg_factor": "avg_factor",
         "reduction_override": "reduction_override"}
PIPELINE_KEYS = {"reduction": "mean", "loss_weight": 1.0}


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a loss: its name, default and accepted type."""

    name: str
    default: Any
    type: Any   # a typing annotation, or None to infer from the default

    def check(self, loss: str, value: Any) -> Any:
        """Return `value` normalized to the declared type, or raise ConfigError naming the key."""
        ok, norm = _conforms(value, self.type if self.type is not None else _infer(self.default))
        if not ok:
            t = self.type if self.type is not None else _infer(self.default)
            # a value outside a Literal's choices is an `assert mode in [...]` in MMDetection
            error = ConfigAssertion if typing.get_origin(t) is typing.Literal else ConfigTypeError
            raise error(f"{loss}: config key '{self.name}' must be {_type_name(t)}, "
                        f"got {type(value).__name__} {value!r}")
        if _has_nan(norm):
            raise ConfigError(f"{loss}: config key '{self.name}' is NaN ({value!r}), which "
                              f"would make the loss NaN; give a number")
        return norm


# Note [Non-finite hyperparameters]: MMDetection checks no hyperparameter for NaN or infinity;
# it asserts a few ranges (SmoothL1Loss/BalancedL1Loss beta > 0, VarifocalLoss alpha >= 0,
# KnowledgeDistillationKLDivLoss T >= 1), which a NaN fails, as in Python (`nan > 0` is False),
# and the loss definitions make the same checks. Otherwise a NaN key turns every loss value (or
# a branch such as `x < beta`) into NaN on every call, which has no use: lossgraph rejects a NaN
# in any key (a number, or an entry of a list such as class_weight) with a ConfigError naming it.
# An infinity is kept and gives MMDetection's value (beta=inf makes SmoothL1Loss 0, gamma=inf
# keeps only pt == 1 in FocalLoss; a range assert rejects the others, e.g. beta=-inf), except
# loss_weight (config.py): it scales the whole loss, so +-inf only ever gives +-inf or NaN.


def _has_nan(v: Any) -> bool:
    """True for a float NaN, or a list/tuple holding one."""
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, (list, tuple)):
        return any(_has_nan(x) for x in v)
    return False


# Note [Loss names]: a loss's name becomes a folder of the dump tree (dump_dir/<name>/...) and
# part of kernel identifiers; '../x/MyL1' would write outside dump_dir. A name is a letter or
# '_', then letters, digits, '_', '-' and '.' (a config may name a type with a registry scope,
# see config.unscoped), with no '..' so it can never be a parent-folder step.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def check_name(name: Any) -> str:
    """Raise ValueError unless `name` is a valid loss type name (Note [Loss names])."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid loss name {name!r}: use a letter or '_' followed by letters, "
                         f"digits, '_', '-' or '.' (no '..', no path separators)")
    return name


@dataclass
class LossDef:
    """A registered loss: name, math function, hyperparameters and pipeline behaviour."""

    name: str
    fn: Callable
    params: dict[str, Param]
    target: str = "dense"                 # 'dense' | 'labels' | 'any'
    weight: str | dict = "raw"            # weight rule (inputs.WEIGHT_RULES), or one per target form
    forward: tuple[str, ...] = DEFAULT_FORWARD
    quirks: frozenset = frozenset()       # e.g. {'zero_weight_exit', 'empty_zero'}
    hooks: dict[str, Callable] = field(default_factory=dict)
    builtin: bool = False

    @property
    def fingerprint(self) -> str:
        """Hash of the math function's source, so an edited loss never hits a stale cache."""
        try:
            src = inspect.getsource(self.fn)
        except (OSError, TypeError):
            src = self.fn.__code__.co_code.hex()
        return hashlib.sha256(src.encode()).hexdigest()[:16]


REGISTRY: dict[str, LossDef] = {}


def register_loss(name: str, *, target: str = "dense", weight: str | dict = "raw",
                  forward: tuple[str, ...] | None = None, quirks=(), hooks=None,
                  _builtin: bool = False):
    """Register `fn(pred, target, **hyper)` as loss `name`; its keyword defaults are config keys."""
    check_name(name)
    if target not in ("dense", "labels", "any"):
        raise ValueError(f"target must be 'dense', 'labels' or 'any', got {target!r}")

    def deco(fn: Callable) -> Callable:
        params = _params_of(name, fn)
        if name in REGISTRY and REGISTRY[name].builtin and not _builtin:
            raise ValueError(f"'{name}' is a built-in lossgraph loss; choose another name")
        REGISTRY[name] = LossDef(name, fn, params, target, weight,
                                 tuple(forward or DEFAULT_FORWARD), frozenset(quirks),
                                 dict(hooks or {}), _builtin)
        return fn
    return deco


def _params_of(name: str, fn: Callable) -> dict[str, Param]:
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    if len(names) < 2:
        raise TypeError(f"loss '{name}' must take (pred, target, **hyperparameters)")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = {}
    for p in list(sig.parameters.values())[2:]:
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"loss '{name}': hyperparameter '{p.name}' needs a default value")
        if p.name in PIPELINE_KEYS:
            raise TypeError(f"loss '{name}': '{p.name}' is a pipeline key, not a hyperparameter")
        params[p.name] = Param(p.name, p.default, hints.get(p.name))
    return params


# -- type checking of config values ------------------------------------------------------------

def _infer(default: Any) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    if default is None:
        return Any
    return type(default)


def _type_name(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple, typing.Sequence) or t in (list, tuple):
        return "a list of numbers"
    if t is type(None):
        return "None"
    if t is float:
        return "a number"
    if t is int:
        return "an integer"
    return f"a {getattr(t, '__name__', t)}"


def _conforms(v: Any, t: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True, v
    if origin is typing.Literal:
        return v in args, v
    if origin is typing.Union:
        for a in args:
            ok, norm = _conforms(v, a)
            if ok:
                return True, norm
        return False, v
    if t is type(None):
        return v is None, v
    if t is bool:
        return isinstance(v, bool), v
    if t is float:   # an int too large for a float (10**400) is not a number we can use
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and \
            (isinstance(v, float) or abs(v) <= 2 ** 1023)
        return ok, float(v) if ok else v
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if t is str:
        return isinstance(v, str), v
    if origin in (list, tuple, typing.Sequence) or t in (list, tuple):
        ok = (isinstance(v, (list, tuple)) and
              all(isinstance(x, (int, float)) and not isinstance(x, bool) and
                  (isinstance(x, float) or abs(x) <= 2 ** 1023) for x in v))
        return ok, tuple(float(x) for x in v) if ok else v
    return isinstance(v, t), v
