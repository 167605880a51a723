"""Ahead-of-time compilation for training: which variants detection heads call, and writing each
compiled kernel into the disk cache under the key the training process will look up.

Note [Head calls]: a loss dict in a model config is called by its head in a few fixed ways, so
`lossgraph compile MODEL_CONFIG` builds each of these variants (float32 unless --dtype says
otherwise, int64 labels, gradient on):
  - the target form a plain call uses (class labels if the loss takes them), except that an
    `any`-target loss under a key naming a dense target (loss_centerness, loss_obj, loss_iou)
    gets a same-shape target;
  - without a weight, and with the weight heads pass: label_weights (N,) for the losses with one
    value per row or whose rule reads a (N,) weight per row (FocalLoss, label-based
    CrossEntropyLoss, IoU losses, DFL, KD, Dice...), bbox_weights shaped like pred for the other
    per-element losses (L1Loss, SmoothL1Loss, BoundedIoULoss...);
  - for reduction='mean', avg_factor as a Python number (AnchorHead, BBoxHead, GFL) and as a
    device tensor (FCOS's reduce_mean(num_pos), DETR's cls_avg_factor).
Losses whose forward hook calls the kernel another way (AssociativeEmbeddingLoss's per-image
'sum', SeesawLoss's objectness part, GaussianFocalLoss with pos_inds) get these variants too,
and compile the rest on first use.

Note [AOT into the cache]: the CLI renders a variant exactly as the runtime does
(Compiler.generate), then stores source and meta.json under the cache key of
Compiler._components, and puts the built artifact in the entry folder where the backend's load
looks first: the cpp shared library (cpp.build names it by the source hash), the cuda images
(<kernel>.<arch>.cubin). A training process with the same LOSSGRAPH_CACHE_DIR, lossgraph, torch
and compiler then counts a disk hit and renders nothing.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from . import backends, cache
from .build import Variant
from .compiler import Compiler, KernelMeta
from .ops import Level

DENSE_KEYS = ("centerness", "obj", "iou")
ROW_RULES = ("focal", "rows", "iou")


def _key_name(where: str) -> str:
    """The last key of a config path: 'model.roi_head.bbox_head[0].loss_cls' -> 'loss_cls'."""
    return re.sub(r"\[\d+\]$", "", where.rsplit(".", 1)[-1])


def weight_access(compiler: Compiler, target: str) -> str:
    """How the weight a head passes reaches the kernel: 'row' or 'elem' (Note [Head calls])."""
    rule = compiler.spec.loss.weight
    rule = rule if isinstance(rule, str) else rule[target]
    level = compiler.loss_level(target, ())
    return "row" if level is Level.ROW or rule in ROW_RULES else "elem"


def head_variants(compiler: Compiler, where: str) -> list[Variant]:
    """The variants a head calls the loss under config path `where` with (Note [Head calls])."""
    base = compiler.default_variant()
    target = base.target
    if compiler.spec.loss.target == "any" and any(k in _key_name(where) for k in DENSE_KEYS):
        target = "dense"
    weights = [None, weight_access(compiler, target)]
    denoms = ["value", "tensor"] if base.reduction == "mean" else ["value"]
    return [dataclasses.replace(base, target=target, weight=w, denom=d)
            for w in weights for d in denoms]


def store(compiler: Compiler, v: Variant, backend: str, source: str, meta: KernelMeta) -> Path:
    """Write a rendered variant into the disk cache (Note [AOT into the cache]); its folder."""
    be = backends.get(backend)
    comps = compiler._components(v, be)
    key = cache.digest(comps)
    cache.store(be.name, key, comps, source, "source" + be.suffix,
                {"fn_name": meta.fn_name, "params": meta.params,
                 "loss_level": int(meta.loss_level), "tables": meta.tables,
                 "access": meta.access})
    return cache.entry_dir(be.name, key)


def place(folder: Path, files: list[Path], backend: str) -> None:
    """Copy the built cuda images into the cache entry folder, named as the runtime reads them."""
    if backend != "cuda" or not cache.enabled():
        return
    for f in files:
        if f.suffix in (".cubin", ".ptx"):
            cache.put(folder / f.name, f.read_bytes())   # with its sha256 (Note [Cache trust])


def build_cpp(source: str, folder: Path, fn_name: str, out_stem: Path) -> Path:
    """Build the cpp library in the cache entry folder (where load looks) and copy it to out."""
    from .backends import cpp
    so = cpp.build(source, folder if cache.enabled() else out_stem, fn_name)
    target = out_stem.with_suffix(".so")
    shutil.copyfile(so, target)
    return target
