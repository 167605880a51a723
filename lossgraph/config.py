"""Stage 1: an MMDetection loss config dict -> a validated, immutable Spec."""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError, ConfigTypeError, InputAssertion
from .ops import REDUCTIONS
from .registry import PIPELINE_KEYS, REGISTRY, LossDef


@dataclass(frozen=True)
class Spec:
    """A parsed config: the loss definition, its hyperparameters and the pipeline keys."""

    loss: LossDef
    hyper: tuple[tuple[str, Any], ...]
    reduction: str
    loss_weight: float

    @property
    def name(self) -> str:
        return self.loss.name

    def kwargs(self) -> dict[str, Any]:
        return dict(self.hyper)

    def config(self) -> dict[str, Any]:
        """The full config dict with every default filled in."""
        return {"type": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in self.hyper},
                "reduction": self.reduction, "loss_weight": self.loss_weight}

    def key(self) -> str:
        """Canonical JSON of the config plus the loss definition's fingerprint."""
        return json.dumps({"config": self.config(), "def": self.loss.fingerprint}, sort_keys=True)


def public_names() -> list[str]:
    """Registered loss types, without the private helpers of composite losses ('_' prefix)."""
    return sorted(n for n in REGISTRY if not n.startswith("_"))


# Registry scopes whose loss types are lossgraph's: MMEngine's 'mmdet.FocalLoss' and our own.
SCOPES = ("mmdet", "lossgraph")


def unscoped(name: str) -> str:
    """'mmdet.FocalLoss' or 'lossgraph.FocalLoss' -> 'FocalLoss'; other scopes raise ConfigError."""
    if "." not in name:
        return name
    scope, _, bare = name.rpartition(".")
    if scope not in SCOPES:
        raise ConfigError(f"loss type '{name}' has scope '{scope}'; lossgraph compiles "
                          f"MMDetection's losses: use '{bare}', 'mmdet.{bare}' or "
                          f"'lossgraph.{bare}'")
    return bare


def closest(word: str, options, n: int = 3) -> str:
    """'; did you mean X?' for the options closest to word, or ''."""
    near = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(x) for x in near)}?" if near else ""


def parse(config: Mapping[str, Any]) -> Spec:
    """Validate an MMDetection loss config (never mutating it) and return its Spec."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a loss config must be a dict such as dict(type='FocalLoss'), "
                          f"got {type(config).__name__}")
    cfg = dict(config)
    if "type" not in cfg:
        raise ConfigError("loss config has no 'type' key, e.g. dict(type='FocalLoss')")
    name = cfg.pop("type")
    if not isinstance(name, str):
        raise ConfigError(f"loss config 'type' must be a string, got {name!r}")
    name = unscoped(name)
    if name not in REGISTRY:
        public = public_names()
        raise ConfigError(f"unknown loss type '{name}'{closest(name, public)} "
                          f"(known: {', '.join(public)})")
    loss = REGISTRY[name]
    for key in cfg:
        if key not in loss.params and key not in PIPELINE_KEYS:
            valid = sorted(list(loss.params) + list(PIPELINE_KEYS))
            raise ConfigTypeError(f"{name} got unknown config key '{key}'{closest(key, valid)} "
                              f"(valid keys: {', '.join(valid)})")
    hyper = tuple((k, p.check(name, cfg.get(k, p.default))) for k, p in loss.params.items())
    return Spec(loss, hyper, check_reduction(name, cfg.get("reduction", "mean"), "reduction"),
                _loss_weight(name, cfg.get("loss_weight", 1.0)))


def check_reduction(name: str, value: Any, what: str) -> str:
    """Raise ConfigError (InputAssertion for a call's reduction_override, asserted in MMDetection's
    forward) unless value is 'none', 'mean' or 'sum'."""
    if value not in REDUCTIONS:
        error = InputAssertion if what == "reduction_override" else ConfigError
        raise error(f"{name}: {what} must be one of 'none', 'mean', 'sum', got {value!r}")
    return value


def _loss_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: config key 'loss_weight' must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:      # an int beyond float range, e.g. 10**400
        value = math.inf
    if not math.isfinite(value):   # Note [Non-finite hyperparameters] (registry.py)
        raise ConfigError(f"{name}: config key 'loss_weight' must be finite, got {value!r}")
    return value
