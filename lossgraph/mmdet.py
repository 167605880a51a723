"""MMDetection / mmengine integration: lossgraph's losses in MMDetection's MODELS registry.

In a config:

    custom_imports = dict(imports=['lossgraph.mmdet'], allow_failed_imports=False)
    model = dict(bbox_head=dict(loss_cls=dict(type='lossgraph.FocalLoss', gamma=2.0, ...)))

registers every lossgraph loss under the `lossgraph` scope. To compile every loss of an
unchanged config (MMDetection's own type names), opt in with the environment variable
LOSSGRAPH_MMDET=all (read when this module is imported) or call `compile_all()`. The backend is
'auto' unless LOSSGRAPH_MMDET_BACKEND (or compile_all's `backend`, or a `backend` key of a
`lossgraph.` config) says otherwise. Each loss built this way logs one line through mmengine's
MMLogger. Importing this module needs mmengine and mmdet; lossgraph itself does not.
"""
from __future__ import annotations

import os
from typing import Any

from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.logging import MMLogger
from mmengine.registry import Registry

import lossgraph

# Note [The lossgraph scope]: a child of MMDetection's MODELS with scope 'lossgraph', so
# MODELS.build(dict(type='lossgraph.FocalLoss')) finds it from mmdet's registry (and from
# mmengine's root, which searches its children by scope) without touching MMDetection's names.
MODELS = Registry("model", parent=MMDET_MODELS, scope="lossgraph")

# lossgraph names that differ from MMDetection's registered class names
MMDET_NAMES = {"EQLv2Loss": "EQLV2Loss"}
ENV_ALL, ENV_BACKEND = "LOSSGRAPH_MMDET", "LOSSGRAPH_MMDET_BACKEND"
SWAPPED: dict[str, type] = {}      # MMDetection type name -> the class it had before compile_all


def _log(message: str) -> None:
    MMLogger.get_current_instance().info(message)


def build(name: str, cfg: dict[str, Any], backend: str | None = None, swapped: bool = False):
    """Compile loss `name` from an MMDetection config's keyword arguments, logging one line."""
    cfg = dict(cfg)
    backend = cfg.pop("backend", None) or backend or os.environ.get(ENV_BACKEND) or "auto"
    module = lossgraph.compile(dict(type=name, **cfg), backend=backend)
    shown = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    what = f"MMDetection's {MMDET_NAMES.get(name, name)}" if swapped else f"lossgraph.{name}"
    _log(f"lossgraph: compiled {name}({shown}) for {what}, backend {module.backend}")
    return module


def loss_class(name: str, backend: str | None = None, swapped: bool = False) -> type:
    """A class standing in for MMDetection's loss class `name`: calling it with the class's
    keyword arguments returns the compiled loss (a lossgraph.CompiledLoss)."""

    def __new__(cls, *args, **cfg):
        if args:
            raise TypeError(f"{cls.__name__}: pass the loss's arguments by keyword, as a config "
                            f"dict does (got {len(args)} positional)")
        return build(name, cfg, backend, swapped)

    return type(MMDET_NAMES.get(name, name), (), {
        "__new__": __new__, "__module__": __name__, "lossgraph_type": name,
        "__doc__": f"lossgraph's compiled {name}: {name}(**cfg) is lossgraph.compile(dict("
                   f"type={name!r}, **cfg)).\n\n" + (lossgraph.REGISTRY[name].fn.__doc__ or "")})


def register_all() -> list[str]:
    """Register every lossgraph loss in the `lossgraph` scope; returns the names added."""
    added = []
    for name in lossgraph.known_losses():
        if name not in MODELS.module_dict:
            MODELS.register_module(name=name, module=loss_class(name))
            added.append(name)
    return added


def compile_all(backend: str | None = None) -> list[str]:
    """Make MMDetection's own loss type names build lossgraph's compiled losses; returns the
    MMDetection names swapped. Idempotent; `restore()` undoes it."""
    import mmdet.models  # noqa: F401  (registers MMDetection's losses first; see Note [Swap order])
    swapped = []
    for name in lossgraph.known_losses():
        mm = MMDET_NAMES.get(name, name)
        if mm not in MMDET_MODELS.module_dict:
            continue    # a lossgraph-only loss (e.g. registered by the user)
        SWAPPED.setdefault(mm, MMDET_MODELS.module_dict[mm])
        MMDET_MODELS.register_module(name=mm, module=loss_class(name, backend, swapped=True),
                                     force=True)
        swapped.append(mm)
    return swapped


def restore() -> None:
    """Undo compile_all: MMDetection's loss names build MMDetection's classes again."""
    for mm, cls in SWAPPED.items():
        MMDET_MODELS.register_module(name=mm, module=cls, force=True)
    SWAPPED.clear()


# Note [Swap order]: MMDetection registers its losses (without force) when mmdet.models is
# imported; compile_all imports it first, so that registration cannot later collide with ours.
register_all()
if os.environ.get(ENV_ALL, "").lower() in ("all", "1", "true"):
    compile_all()
