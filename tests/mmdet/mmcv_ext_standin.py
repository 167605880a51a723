"""A CPU stand-in for `mmcv._ext` (full mmcv's compiled ops), for the optional MMDetection job.

mmcv-lite has no `_ext`, yet `import mmdet.models` imports mmcv.ops, which loads `_ext` and asserts
that each op it names exists. `install()` puts a module in sys.modules whose every attribute is an
op: `nms` is implemented in plain torch (what the dense heads' predict path needs); any other op
raises NotImplementedError naming itself when called. The module's spec has no loader, so
mmengine's `mmcv_full_available()` (pkgutil.find_loader) still sees mmcv-lite and does not import
mmcv's DCN ops. Test support only: lossgraph never imports this.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

NAME = "mmcv._ext"


def nms(bboxes, scores, iou_threshold: float, offset: int = 0):
    """Greedy NMS as mmcv's kernel: indices kept, by descending score; boxes (x1, y1, x2, y2),
    areas with `offset` (0 or 1) added to widths and heights."""
    import torch
    if bboxes.numel() == 0:
        return bboxes.new_zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = bboxes.unbind(-1)
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.argsort(descending=True, stable=True)
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1) + offset).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1) + offset).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=bboxes.device)


def _missing(op: str):
    def op_fn(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{op} is not in lossgraph's CPU stand-in for mmcv's "
                                  f"compiled ops (only nms is); install full mmcv to use it")
    op_fn.__name__ = op
    return op_fn


def _getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


def install_unless_full() -> None:
    """install() where mmcv is mmcv-lite (no compiled `_ext`); full mmcv keeps its own ops."""
    import importlib.util
    if importlib.util.find_spec("mmcv") is None:
        return
    try:
        import mmcv._ext  # noqa: F401
    except ImportError:
        install()


def install() -> types.ModuleType:
    """Put the stand-in into sys.modules as mmcv._ext (idempotent); returns it."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    mod = types.ModuleType(NAME, __doc__)
    mod.__spec__ = importlib.machinery.ModuleSpec(NAME, None)   # loader-less: see the docstring
    mod.nms = nms
    mod.__getattr__ = _getattr
    sys.modules[NAME] = mod
    return mod
