"""The loss registry: `register_loss` turns a math function into a LossDef (config schema + math)."""
from __future__ import annotations

import hashlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigAssertion, ConfigTypeError

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
        return norm


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
    if t is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok, float(v) if ok else v
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if t is str:
        return isinstance(v, str), v
    if origin in (list, tuple, typing.Sequence) or t in (list, tuple):
        ok = (isinstance(v, (list, tuple)) and
              all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
        return ok, tuple(float(x) for x in v) if ok else v
    return isinstance(v, t), v
