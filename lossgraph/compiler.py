"""Stages 2-7 for one loss: build the IR of a variant, run the passes, render, compile and cache."""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import __version__, backends, cache, dump, passes
from .backends.base import Artifact, KernelSource, param_order, signature
from .build import Variant, build
from .config import Spec
from .errors import BackendError, ConfigError
from .ops import Level, Op

VARIANT_FIELDS = tuple(f.name for f in dataclasses.fields(Variant))
GRAPH_LINE = re.compile(r"^\W*graph: sha256:([0-9a-f]{64})$", re.M)   # codegen.header's line
# The device type each native backend is built for (TorchScript runs on any device).
NATIVE_DEVICE = {"cpp": "cpu", "cuda": "cuda"}


def _access(g) -> dict[str, str]:
    """How each input of a graph is read: elem, row, col or scalar (pred and target: elem)."""
    access = {ld.name: ("row" if ld.comp is not None else ld.access) for ld in g.inputs()}
    return {k: ("elem" if k in ("pred", "target") else a) for k, a in access.items()}


def _variant_access(v: Variant, name: str) -> str | None:
    """The access of the inputs a variant adds to the loss: the weight and the denominator."""
    return {"weight": v.weight, "denom": "scalar"}.get(name)


@dataclass
class KernelMeta:
    """What running a kernel needs to know, without its IR: name, variant, parameters, level."""

    fn_name: str
    variant: Variant
    params: list[str]
    loss_level: Level
    tables: dict[str, tuple] = field(default_factory=dict)
    access: dict[str, str] = field(default_factory=dict)   # input name -> elem/row/col/scalar


@dataclass
class CompiledVariant:
    """One specialization, ready to run; its IR stages are rebuilt on demand after a disk hit."""

    meta: KernelMeta
    source: str
    artifact: Artifact
    backend: backends.Backend
    restage: Callable[[], list]
    _stages: list | None = None

    @property
    def stages(self) -> list:
        if self._stages is None:
            self._stages = self.restage()
        return self._stages

    @property
    def graph(self):
        return self.stages[-1][1]

    def run(self, call) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.backend.run(self.artifact, call, self.meta)

    @property
    def scale_grad(self) -> Callable | None:
        """The backend's in-place `grad *= g` for a 0-d g (cuda: on the device, no sync), or None."""
        f = self.backend.scale_grad
        return None if f is None else functools.partial(f, self.artifact)


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (a second's import):
    in torch 2.x that decorator only sets this attribute, which dynamo reads when it traces."""
    fn._dynamo_marked_constant = True
    return fn


class Compiler:
    """Compiles and caches the variants of one loss spec for one backend choice."""

    def __init__(self, spec: Spec, backend: str = "auto", dump_dir: str | None = None):
        if backend != "auto":
            backends.get(backend)  # validates the name
        self.spec, self.backend, self.dump_dir = spec, backend, dump_dir
        self._variants: dict[Variant, int] = {}   # variant -> i; the kernel is self._compiled_<i>
        self._levels: dict[tuple, tuple] = {}
        self._fallback_warned = self._device_warned = False
        try:
            self.default_variant()  # traces the math once, so config errors surface at compile()
        except ConfigError as e:
            if not getattr(e, "at_call", False):  # see Note [Errors at call time]
                raise

    def __getstate__(self) -> dict:
        """Note [Copying a compiled loss]: kernels are process-local handles (ctypes functions,
        CUDA modules), so a deepcopy or a pickle (EMA hooks, checkpoints of whole models) carries
        only the spec and the backend choice; the copy reloads its kernels from the disk cache."""
        return {"spec": self.spec, "backend": self.backend, "dump_dir": self.dump_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["backend"], state["dump_dir"])

    def backend_for(self, device: str) -> str:
        """The backend that runs tensors on `device` (a device type: 'cpu', 'cuda', 'meta').

        Note [An explicit backend follows the device]: a compiled loss is a module inside a
        model, and `model.to('cuda')` moves its tensors, not its backend choice. When the chosen
        backend cannot serve the inputs' device (backend='cpp' with CUDA or meta tensors,
        backend='cuda' with CPU tensors) the loss follows the device, as 'auto' would, and warns
        once: every backend computes MMDetection's numbers, so this keeps a model portable where
        an error would break `.to()`, and no device pointer ever reaches host code (the backends'
        own guards, backends/base.py check_call, catch any other path). Meta tensors carry no
        data, so they go to TorchScript's shape-only result without a warning. On its own device
        a backend is kept even when its toolchain is missing: the build fails and falls back
        with the compiler's log (`_index`), which says more than a device warning would.
        """
        if self.backend == "auto":
            return backends.auto(device)
        if NATIVE_DEVICE.get(self.backend, device) == device or \
                backends.get(self.backend).available(device):
            return self.backend
        return backends.auto(device)

    def _warn_followed(self, device: str, chosen: str) -> None:
        """Warn once when an explicit backend gave way to the device's (see the Note above)."""
        if chosen != self.backend and self.backend != "auto" and device != "meta" and \
                not self._device_warned:
            self._device_warned = True
            warnings.warn(f"lossgraph: {self.spec.name} was compiled with backend="
                          f"'{self.backend}', which cannot run {device} tensors; using the "
                          f"{chosen} backend for them", stacklevel=5)

    def default_variant(self) -> Variant:
        """The variant shown before any call: the config's reduction, no weight, with a gradient."""
        target = "dense" if self.spec.loss.target == "dense" else "labels"
        v = Variant(reduction=self.spec.reduction, target=target)
        self.loss_level(target, ())
        return v

    def loss_level(self, target: str, params: tuple) -> Level:
        """Whether the loss has one value per element or per row (for weights and 'none')."""
        return self._analyse(target, params)[0]

    def row_coupled(self, target: str, params: tuple) -> bool:
        """True for a per-element loss whose elements also read other columns of their row."""
        return self._analyse(target, params)[1]

    def _analyse(self, target: str, params: tuple) -> tuple[Level, bool]:
        return self._analysis(target, params)[:2]

    def _analysis(self, target: str, params: tuple) -> tuple[Level, bool, dict, dict]:
        """(loss level, row-coupled, access kind of each input, per-class tables) of the
        unweighted, unreduced loss: what a disk hit checks meta.json against."""
        key = (target, params)
        if key not in self._levels:
            g = build(self.spec, Variant(reduction="none", target=target, grad=False, params=params))
            red = g.find(Op.REDUCE)[0]
            lv = g.levels()
            preds = [i for i in g.ids() if g[i].op is Op.INPUT and g[i].arg.name == "pred"]
            coupled = lv[g[red].srcs[0]] is Level.ELEM and \
                any(lv[i] is Level.ROW for i in g.depends_on(preds))
            self._levels[key] = (lv[g[red].srcs[0]], coupled, _access(g), dict(g.tables))
        return self._levels[key]

    def stages(self, v: Variant) -> list:
        return passes.run(build(self.spec, v), v)

    def generate(self, v: Variant, backend: str) -> tuple[str, KernelMeta, list]:
        """(source, meta, stages) of variant v for `backend`, without building or caching it
        (ahead-of-time compilation: `python -m lossgraph compile`)."""
        stages = self.stages(v)
        source, meta = self._render(v, backends.get(backend), stages)
        return source, meta, stages

    def get(self, v: Variant) -> CompiledVariant:
        """The compiled kernel of variant v: from memory, from disk, or freshly generated."""
        i = self._index(tuple(getattr(v, f) for f in VARIANT_FIELDS))
        return getattr(self, f"_compiled_{i}")

    @_assume_constant_result
    def _index(self, fields: tuple) -> int:
        """The number i of variant Variant(*fields) (its kernel is self._compiled_<i>),
        compiling it first if it is new.

        Note [Compiling under torch.compile]: dynamo calls this eagerly instead of tracing it
        (assume_constant_result), so a model whose loss first runs inside torch.compile keeps one
        graph: cache I/O, the C compiler and NVRTC stay out of the trace. It takes plain field
        values (dynamo does not hand over a dataclass built in the trace intact), and each kernel
        is an attribute of its own, which a trace reads fresh even when it was compiled mid-trace
        (a container read earlier in the trace would be a stale snapshot).
        """
        v = Variant(*fields)
        i = self._variants.get(v)
        if i is not None:
            cache.STATS["memory_hits"] += 1
            return i
        name = self.backend_for(v.device)
        self._warn_followed(v.device, name)
        try:
            cv = self._compile(v, backends.get(name))
        except BackendError as e:
            if name == "torchscript":
                raise
            where = self._save_log(name, v, e.log)
            if not self._fallback_warned:
                warnings.warn(f"lossgraph: the {name} backend failed for {self.spec.name} "
                              f"({e}); falling back to torchscript{where}", stacklevel=4)
                self._fallback_warned = True
            cv = self._compile(v, backends.get("torchscript"))
        i = self._variants[v] = len(self._variants)
        setattr(self, f"_compiled_{i}", cv)
        return i

    def _save_log(self, backend: str, v: Variant, log: str) -> str:
        """Put a failed build's log in the dump folder, when there is one."""
        root = dump.dump_root(self.dump_dir)
        if not root or not log:
            return ""
        folder = dump.variant_folder(root, self.spec.name, f"{backend}.{v.tag()}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compile.log").write_text(log)
        return f"; compiler log in {folder / 'compile.log'}"

    def _components(self, v: Variant, be: backends.Backend) -> dict[str, Any]:
        return {"schema": cache.SCHEMA, "lossgraph": __version__, "code": cache.code_hash(),
                "backend": be.name,
                "spec": self.spec.key(), "variant": repr(v), "torch": torch.__version__,
                **be.components(v)}

    def _compile(self, v: Variant, be: backends.Backend) -> CompiledVariant:
        comps = self._components(v, be)
        key = cache.digest(comps)
        hit = cache.load(be.name, key)
        stages = artifact = None
        if hit is not None:
            meta_d, source, folder = hit
            meta = self._meta_from_disk(v, be, meta_d, source)
            try:
                artifact = be.load(meta, source, folder) if meta is not None else None
            except BackendError:
                artifact = None   # a damaged entry is a miss; it is rewritten below
            if artifact is not None:
                cache.STATS["disk_hits"] += 1
        if artifact is None:
            cache.STATS["misses"] += 1
            stages = self.stages(v)
            source, meta = self._render(v, be, stages)
            cache.STATS["renders"] += 1
            folder = cache.store(be.name, key, comps, source, "source" + be.suffix,
                                 {"fn_name": meta.fn_name, "params": meta.params,
                                  "loss_level": int(meta.loss_level), "tables": meta.tables,
                                  "access": meta.access})
            artifact = be.load(meta, source, folder)
        cv = CompiledVariant(meta, source, artifact, be, lambda: self.stages(v), stages)
        root = dump.dump_root(self.dump_dir)
        if root:
            self.dump(cv, dump.variant_folder(root, self.spec.name, f"{be.name}.{v.tag()}"))
        return cv

    def _meta_from_disk(self, v: Variant, be: backends.Backend, meta_d: dict,
                        source: str) -> KernelMeta | None:
        """The KernelMeta of a cached kernel, re-derived from lossgraph's code and the verified
        source (Note [Cache trust]); None (a miss) when meta.json disagrees with either."""
        try:
            level, _, access, tables = self._analysis(v.target, v.params)
            found = GRAPH_LINE.search(source)
            fn_name = KernelSource(None, self.spec, v, found.group(1), be.name).fn_name
            names = set(meta_d["params"])
            if len(names) != len(meta_d["params"]) or not set(access) <= names or \
                    fn_name != meta_d["fn_name"] or int(meta_d["loss_level"]) != int(level):
                return None
            access = {n: _variant_access(v, n) or access.get(n) for n in names}
            tables = {n: tables[n] for n in names if n in tables}
            if None in access.values() or dict(meta_d["access"]) != access or \
                    {k: tuple(t) for k, t in meta_d["tables"].items()} != tables:
                return None
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        return KernelMeta(fn_name, v, param_order(names), level, tables, access)

    def _render(self, v: Variant, be: backends.Backend, stages) -> tuple[str, KernelMeta]:
        fused = stages[-1][1]
        body = passes.kernel_body(fused)
        red = body.find(Op.REDUCE)[0]
        src = KernelSource(body, self.spec, v, fused.digest(), be.name)
        access = _access(body)
        meta = KernelMeta(src.fn_name, v, signature(body), body.levels()[body[red].srcs[0]],
                          dict(body.tables), access)
        return be.render(src), meta

    def dump(self, cv: CompiledVariant, path) -> list[str]:
        """Write config, every IR stage (text and dot) and the source into folder `path`."""
        extra = {"cache_key.json": json.dumps(self._components(cv.meta.variant, cv.backend),
                                              indent=1, sort_keys=True)}
        extra.update(cv.artifact.info.get("dump", {}))
        return dump.write_stages(path, self.spec.config(), cv.stages, cv.source,
                                 cv.backend.suffix, extra)
