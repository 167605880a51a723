"""conftest.py for MMDetection 3.3.0's own loss tests, run unchanged against lossgraph.

.ci/mmdet copies MMDetection's tests/test_models/test_losses/ into a scratch folder with this file
as its conftest.py. Before the test files import MMDetection's loss classes, every class lossgraph
compiles is replaced, in every mmdet.models module that holds it, by lossgraph.mmdet's stand-in
(`FocalLoss(**cfg)` is `lossgraph.compile(dict(type='FocalLoss', **cfg), backend=...)`), and
compile_all() makes MODELS.build do the same (DDQAuxLoss builds its QualityFocalLoss and GIoULoss
through MODELS). A loss class lossgraph lacks is replaced by one that raises, so its tests fail
instead of silently testing MMDetection's own class. LOSSGRAPH_TEST_BACKEND picks the backend.
"""
import os
import sys

sys.path.insert(0, os.environ["LOSSGRAPH_MMDET_SUPPORT"])   # tests/mmdet of the lossgraph tree
import mmcv_ext_standin  # noqa: E402

mmcv_ext_standin.install()

import mmdet.models  # noqa: E402,F401
import torch  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402

import lossgraph  # noqa: E402
import lossgraph.mmdet as lm  # noqa: E402

BACKEND = os.environ.get("LOSSGRAPH_TEST_BACKEND", "torchscript")
COMPOSITE = {"DDQAuxLoss"}    # not a loss function: its inner losses come from MODELS (compiled)
COMPILED = {lm.MMDET_NAMES.get(n, n): n for n in lossgraph.known_losses()}


def _uncovered(name):
    def __new__(cls, *args, **kwargs):
        raise NotImplementedError(f"lossgraph does not compile {name}: this test is uncovered")
    return type(name, (), {"__new__": __new__})


def _replacements():
    out = {}
    for name, cls in MODELS.module_dict.items():
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)
                and cls.__module__.startswith("mmdet.models.losses.")) or name in COMPOSITE:
            continue
        if name in COMPILED:
            out[cls] = lm.loss_class(COMPILED[name], BACKEND, swapped=True)
        elif name.endswith("Loss") or name.startswith("GHM"):
            out[cls] = _uncovered(name)
    return out


def _swap():
    table = _replacements()       # before compile_all, which replaces MODELS' entries
    lm.compile_all(BACKEND)
    for modname, mod in list(sys.modules.items()):
        if modname == "mmdet" or modname.startswith("mmdet."):
            for attr, value in list(vars(mod).items()):
                if isinstance(value, type) and value in table:
                    setattr(mod, attr, table[value])
    compiled = sorted(c.__name__ for c in table.values() if hasattr(c, "lossgraph_type"))
    uncovered = sorted(c.__name__ for c in table.values() if not hasattr(c, "lossgraph_type"))
    print(f"lossgraph ({BACKEND}): compiled {compiled}; uncovered {uncovered}")


_swap()
