"""The backend registry: each backend renders a fused kernel to source, builds it, and runs it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

NAMES = ("torchscript", "cpp", "cuda")


@dataclass(frozen=True)
class Backend:
    """The functions a backend module provides (see backends/torchscript.py for the simplest)."""

    name: str
    suffix: str                                   # file suffix of the generated source
    available: Callable[[str], bool]              # device type -> usable here?
    render: Callable[..., str]                    # KernelSource -> source text
    load: Callable[..., Any]                      # (KernelMeta, source, entry dir) -> Artifact
    run: Callable[..., tuple]                     # (Artifact, Call, KernelMeta) -> (loss, grad)
    components: Callable[..., dict]               # Variant -> backend-specific cache-key parts
    scale_grad: Callable[..., Any] | None = None  # optional (Artifact, grad, 0-d g) -> grad *= g
    plan: Callable[..., Any] | None = None        # optional (Artifact, Call, KernelMeta) -> launcher


def get(name: str) -> Backend:
    """The backend called `name`."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
    m = importlib.import_module(f"{__name__}.{name}")
    return Backend(name, m.SUFFIX, m.available, m.render, m.load, m.run, m.components,
                   getattr(m, "scale_grad", None), getattr(m, "plan", None))


def auto(device: str) -> str:
    """The best backend for tensors on `device`: cuda on GPUs, cpp on CPUs with a C compiler."""
    if device == "cuda" and get("cuda").available("cuda"):
        return "cuda"
    if device == "cpu" and get("cpp").available("cpu"):
        return "cpp"
    return "torchscript"
