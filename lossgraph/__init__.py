"""lossgraph: compile MMDetection loss configs into fused, differentiated kernels.

    import lossgraph as lg
    loss = lg.compile(dict(type='FocalLoss', gamma=2.0, alpha=0.25))
    value = loss(cls_score, labels, weight=label_weights, avg_factor=num_pos)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .build import check, is_labels, per_class, row_input, scalar_input  # noqa: E402
from .config import parse, public_names  # noqa: E402
from .errors import (BackendError, ConfigAssertion, ConfigError, ConfigNotImplemented,  # noqa: E402
                     ConfigTypeError, InputAssertion, InputError, InputShapeError)
from .registry import REGISTRY, register_loss  # noqa: E402
from .symbolic import (Sym, abs, asin, atan, bce_with_logits, binary_cross_entropy,  # noqa: E402,A004
                       class_index, clamp, cos, exp, floor, log, log1p, logsigmoid, logsumexp,
                       maximum, minimum, one_hot, rowmax, rowsum, sigmoid, sign, sin, softplus,
                       sqrt, stop_gradient, take, tanh, to_float, where, width, rowmean)
from . import losses as _builtin_losses  # noqa: E402,F401  (registers the MMDetection losses)
from .runtime import CompiledLoss  # noqa: E402


def compile(config, backend: str = "auto", dump_dir: str | None = None) -> CompiledLoss:  # noqa: A001
    """Compile an MMDetection loss config dict into an nn.Module with the same forward."""
    return CompiledLoss(parse(config), backend=backend, dump_dir=dump_dir)


def known_losses() -> list[str]:
    """Names of every registered loss type."""
    return public_names()


__all__ = ["compile", "register_loss", "CompiledLoss", "ConfigError", "InputError",
           "BackendError", "ConfigAssertion", "ConfigNotImplemented", "ConfigTypeError", "InputAssertion",
           "InputShapeError", "known_losses", "Sym", "abs", "exp", "log", "log1p", "sqrt", "sigmoid",
           "logsigmoid", "softplus", "where", "minimum", "maximum", "clamp", "sign", "floor", "atan",
           "asin", "cos", "sin", "tanh", "stop_gradient", "rowsum", "rowmax", "logsumexp", "take",
           "one_hot", "class_index", "width", "rowmean", "to_float", "bce_with_logits", "binary_cross_entropy",
           "check", "is_labels", "per_class", "row_input", "scalar_input"]
