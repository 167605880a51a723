"""What every backend receives (KernelSource) and returns (Artifact)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import codegen
from ..build import Variant
from ..config import Spec
from ..ir import Graph


@dataclass
class KernelSource:
    """The fused kernel body of one variant, with what a renderer needs to know about it."""

    body: Graph
    spec: Spec
    variant: Variant
    graph_hash: str
    backend: str

    @property
    def fn_name(self) -> str:
        # a loss name may hold any character (e.g. a scope, 'mmdet.FocalLoss'): keep identifiers
        return f"{re.sub(r'[^0-9a-zA-Z_]', '_', self.spec.name.lower())}_{self.graph_hash[:10]}"

    def header(self, prefix: str) -> str:
        return codegen.header(prefix, self.spec.config(), self.variant.tag(), self.graph_hash,
                              self.backend)

    def tensor_param(self, name: str) -> bool:
        """Runtime scalars passed by value are floats; everything else is a tensor."""
        return not (name == "denom" and self.variant.denom == "value")


@dataclass
class Artifact:
    """A compiled kernel: `fn(*inputs in signature order) -> loss or (loss, grad)`."""

    fn: Callable
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def table_tensor(meta, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A per-class constant table (e.g. class_weight) as a tensor, made once per dtype/device."""
    made = meta.__dict__.setdefault("_table_tensors", {})
    key = (name, dtype, str(device))
    if key not in made:
        made[key] = torch.tensor(meta.tables[name], dtype=dtype, device=device)
    return made[key]


def signature(body: Graph) -> list[str]:
    """Kernel parameter names: pred first, then the other inputs by name."""
    return param_order({ld.name for ld in body.inputs()})


def param_order(names) -> list[str]:
    """The kernel parameter order of a set of input names: pred first, then the rest by name
    (a cached kernel's order is re-derived with this, never read from meta.json)."""
    names = set(names)
    return ["pred"] * ("pred" in names) + sorted(names - {"pred"})
