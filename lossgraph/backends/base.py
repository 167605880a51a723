"""What every backend receives (KernelSource) and returns (Artifact)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import codegen
from ..build import Variant
from ..config import Spec
from ..errors import InputError
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


def check_call(call, meta, backend: str, native: str, serves: Callable[[str], bool]) -> None:
    """Raise InputError unless every kernel input has the device, dtype and size the kernel reads.

    Note [Device guard]: the compiler picks a backend by pred's device (Note [An explicit backend
    follows the device]), but a kernel of the cpp or cuda backend reads raw pointers: a tensor
    on another device, a label dtype other than the one compiled in, or too few elements would
    be a crash or a silently wrong number, never an exception. So each backend's run checks
    first: pred on its `native` device type (or one `serves` accepts, e.g. the CUDA emulator in
    the tests), every other input on pred's device or on the CPU (a host scalar: cpp reads it
    in place, cuda copies it), pred and labels in the variant's dtypes, and each input's size
    matching its access (elem R*K, row R, col K, scalar 1). A few attribute reads per input.
    """
    pred, v = call.pred, meta.variant
    dev = pred.device
    if dev.type != native and not serves(dev.type):
        raise InputError(f"{call.name}: the {backend} backend cannot run {dev.type} tensors "
                         f"(pred is on {dev}); compile with backend='auto' to follow the device")
    if pred.dtype != getattr(torch, v.dtype):
        raise InputError(f"{call.name}: pred is {pred.dtype} but this kernel was compiled for "
                         f"{v.dtype}")
    rows, width = call.rows, call.width
    sizes = {"elem": rows * width, "row": rows, "col": width, "scalar": 1}
    for name in meta.params:
        if name in ("pred", "denom"):
            continue
        if name in meta.tables:
            if len(meta.tables[name]) != width:
                raise InputError(f"{call.name}: {name} has {len(meta.tables[name])} values but "
                                 f"pred has {width} classes (last dimension)")
            continue
        t = call.tensors[name]
        if t.device != dev and t.device.type != "cpu":
            raise InputError(f"{call.name}: {name} is on {t.device} but pred is on {dev}")
        if name == "label" and t.dtype != getattr(torch, v.label_dtype):
            raise InputError(f"{call.name}: labels are {t.dtype} but this kernel was compiled "
                             f"for {v.label_dtype}")
        want = sizes.get(meta.access.get(name, "elem"), rows * width)
        if t.numel() != want:
            raise InputError(f"{call.name}: {name} has {t.numel()} elements but the kernel "
                             f"reads {want} ({meta.access.get(name, 'elem')} access, pred "
                             f"{tuple(pred.shape)})")
    d = call.denom
    if isinstance(d, torch.Tensor) and (d.numel() != 1 or
                                        d.device != dev and d.device.type != "cpu"):
        raise InputError(f"{call.name}: the denominator must be one value on {dev} or the "
                         f"CPU, got shape {tuple(d.shape)} on {d.device}")


def signature(body: Graph) -> list[str]:
    """Kernel parameter names: pred first, then the other inputs by name."""
    return param_order({ld.name for ld in body.inputs()})


def param_order(names) -> list[str]:
    """The kernel parameter order of a set of input names: pred first, then the rest by name
    (a cached kernel's order is re-derived with this, never read from meta.json)."""
    names = set(names)
    return ["pred"] * ("pred" in names) + sorted(names - {"pred"})
