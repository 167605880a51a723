"""CUDA backend: the fused body rendered as a CUDA kernel, compiled by NVRTC, run on torch's stream.

Note [CUDA kernel design]: the element statements come from clower.lower, exactly as in the cpp
kernel (STYLE.md principle 8); templates/cuda/kernel.cu.j2 only places them in GPU loops.
- Schedule 'elem' (no row reductions): vector tiles (cudavec.py, Note [Vector tiles]): 128-bit
  loads and stores, 4 vectors in flight per thread, row values once per vector, a label-free
  vector without any one-hot test, one thread per box; grid-stride with 64-bit indices; the
  row r = i / K is one multiply-high below 2^31 (IntDivider magic), a 64-bit division above.
- Schedule 'rows' (rowsum/rowmax, e.g. softmax cross-entropy): Note [Row groups] (cudarows.py):
  a row of up to 32 * SLOTS columns is held in registers by a group of lanes, its passes
  straight-line code sharing their values; a longer row gets a warp and a k-loop per pass; row
  reductions in T within a lane, rows summed in double; in a float kernel a row sum's lanes are
  merged in double and the per-row values computed in double (Note [Row values on CUDA]). A row
  sum the lowering turned into a gather (a value read at the label's column) is computed by
  every lane.
- The one-hot split of the lowering (bodies folded for k == y and k != y): in the 'elem'
  schedule a branch after the statements both bodies share (the load, the sigmoid), at most one
  lane of a row taking the k == y side; in the 'rows' schedule the k == y column is computed
  once per row before the last k-loop, which picks its values by a select.
- Launch facts (schedule, parameters, tables) are written into the source's
  `// lossgraph-launch:` line, so a kernel read back from the disk cache needs no IR.
- Reduction: each thread sums its losses in double, each block writes one partial (fixed tree),
  and a one-block `_finish` kernel adds the partials in index order and applies the epilogue
  (/ denom, * loss_weight) on the device. The grid depends only on the problem size and the
  device, so results are bitwise reproducible; there are no float atomics.
- No host sync anywhere: a tensor avg_factor is read by the kernel through its pointer,
  per-class tables are compiled into the source, and outputs come from torch's caching
  allocator on the current stream, so a call can be captured in a CUDA graph.
- fp16/bf16 pred is read as float and all math is float (double for float64); the gradient is
  stored in pred's dtype, the loss in float32 (float64). Under a loss scale the backward reruns
  the body scaling the float gradient before it is rounded (Note [Loss scaling on CUDA]).
- Backward of a scalar loss: scale_grad runs a kernel that returns at once when
  grad_output == 1, so loss.backward() moves no gradient bytes and never syncs.
- torch.compile: the launch is the custom op lossgraph::cuda_fused with a fake implementation,
  so traced models keep one graph (see _fused_op).
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from threading import get_ident
from typing import Any, Callable, Optional

import torch

from .. import cache, codegen
from ..errors import BackendError, InputError
from ..inputs import compute_dtype
from ..ops import Level
from . import nvrtc
# rendering lives in cudarender.py; render and its constants stay reachable from here
from .cudarender import (BLOCK, LABEL_CTYPE, LAUNCH_LINE, STORAGE,  # noqa: F401
                         UNROLL, launch_info, render)
from .base import Artifact, check_call

SUFFIX = ".cu"
# C types of the kernel parameters after the tensors, and of the _finish and scale kernels
MAIN_TAIL = ("ptr", "int", "f64", "i64", "i64", "uint", "uint", "i64", "int", "ptr", "ptr", "ptr")
FINISH_ARGS = ("ptr", "int", "ptr", "int", "f64", "ptr")
SCALE_ARGS = ("ptr", "i64", "ptr", "int")
COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64,
           torch.float16: torch.float32, torch.bfloat16: torch.float32}


# -- availability and cache key ------------------------------------------------------------------

def unavailable_reason(device: str = "cuda") -> str | None:
    """Why this backend cannot run tensors on `device` here, or None when it can."""
    if device != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device} tensors"
    from . import cudadrv
    why = nvrtc.unavailable_reason() or cudadrv.unavailable_reason()
    if why is None and nvrtc.version()[0] > cudadrv.driver_version()[0]:
        why = (f"NVRTC {'.'.join(map(str, nvrtc.version()))} is newer than the driver's CUDA "
               f"{'.'.join(map(str, cudadrv.driver_version()))}; install the nvidia-cuda-nvrtc "
               f"and cuda-bindings versions of CUDA {cudadrv.driver_version()[0]}")
    return why


def available(device: str) -> bool:
    """Usable for CUDA tensors when a GPU, the driver, cuda-bindings and libnvrtc are present."""
    return unavailable_reason(device) is None


def components(v) -> dict:
    """Cache-key parts: NVRTC's version and options, and the launch shape the source assumes.

    The GPU architecture is the last part of the key: an entry folder holds one image per arch
    (<kernel>.sm_90.cubin), compiled on first use on a device of that arch.
    """
    ver = nvrtc.version() if nvrtc.unavailable_reason() is None else None
    return {"nvrtc": ".".join(map(str, ver)) if ver else "none",
            "nvrtc_options": " ".join(nvrtc.OPTIONS), "block": BLOCK, "unroll": UNROLL}


def device_target(index: int | None = None) -> str:
    """sm_XY of device `index` (default: the current one), or compute_XY PTX when NVRTC
    predates the GPU."""
    if index is None:
        index = torch.cuda.current_device()
    return nvrtc.target_for(torch.cuda.get_device_capability(index))


# -- the loaded kernel -----------------------------------------------------------------------------

KERNELS: list["CudaKernel"] = []   # loaded kernels by index: the custom op's `kernel` argument
_WARNED: dict[str, bool] = {}


@dataclass
class CudaKernel:
    """A rendered kernel with its launch facts; images per arch, modules per device."""

    name: str
    source: str
    folder: Path
    launch: dict
    reduction: str
    loss_level: Level
    index: int = -1
    images: dict[str, bytes] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    modules: dict[int, Any] = field(default_factory=dict)
    plans: dict[tuple, "Plan"] = field(default_factory=dict)

    def __post_init__(self):
        self.finish = f"{self.name}_finish"
        params = [tuple(p) for p in self.launch.get("params", ())]
        self.inputs = [(n, t == "T") for t, n in params[1:]]   # (name, cast to compute dtype)

    def image(self, target: str) -> bytes:
        """The cubin/PTX for target: from memory, from the entry folder, or compiled now."""
        if target in self.images:
            return self.images[target]
        kind = "cubin" if target.startswith("sm") else "ptx"
        path = self.folder / f"{self.name}.{target}.{kind}"
        image = cache.get(path)   # verified against its recorded sha256 (Note [Cache trust])
        if not image:
            try:
                image, ptx, log = nvrtc.compile_with_ptx(self.source, target, f"{self.name}.cu")
            except BackendError as e:
                self._write(f"compile.{target}.log", e.log or str(e))
                raise
            self.logs[target] = log
            self._write(path.name, image)
            self._write(f"compile.{target}.log", log)
            if kind == "cubin":   # its PTX, for a driver that cannot load the cubin
                self.images[target.replace("sm_", "compute_")] = ptx
                self._write(f"{self.name}.{target.replace('sm_', 'compute_')}.ptx", ptx)
        self.images[target] = image
        return image

    def _write(self, name: str, data) -> None:
        write = cache.put if isinstance(data, bytes) else cache.write_atomic
        try:
            cache.writing(self.folder, lambda d: write(d / name, data))
        except OSError:
            pass   # the image is in memory; the cache is an optimization

    def launcher(self, device: torch.device):
        """The module of this kernel on `device` (tests substitute an emulator here)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        mod = self.modules.get(index)
        if mod is None:
            mod = self.modules[index] = self._load_module(index)
        return mod

    def _load_module(self, index: int):
        """Note [PTX fallback]: the cubin for the device's arch, or, when the driver refuses
        it (e.g. an image newer than the driver), the PTX of the same compile (or of the newest
        arch below the device's), JIT-compiled by the driver, with one warning. When that fails
        too the BackendError reaches the compiler, which falls back to torchscript."""
        from .cudadrv import Module
        target = device_target(index)
        try:
            return Module(self.image(target), index)
        except BackendError as e:
            ptx = target if target.startswith("compute") else \
                nvrtc.ptx_target(torch.cuda.get_device_capability(index))
            if ptx == target:
                raise
            if not _WARNED.get("ptx"):
                _WARNED["ptx"] = True
                warnings.warn(f"lossgraph: loading the {target} cubin of {self.name} failed "
                              f"({e}); using its {ptx} PTX, JIT-compiled by the driver",
                              stacklevel=2)
            return Module(self.image(ptx), index)

    def loss_shape(self, rows: int, width: int) -> tuple:
        if self.reduction != "none":
            return ()
        return (rows, width) if self.loss_level is Level.ELEM else (rows,)


def load(meta, source: str, folder: Path) -> Artifact:
    """Compile (or read) the image for the current device's arch and register the kernel."""
    why = unavailable_reason(meta.variant.device)
    if why is not None:
        raise BackendError(why)
    kern = CudaKernel(meta.fn_name, source, Path(folder), launch_info(source),
                      meta.variant.reduction, meta.loss_level)
    kern.launcher(torch.device("cuda"))   # errors (compile; module load after the PTX fallback)
    # surface now, where the compiler can fall back to torchscript
    register(kern)
    info = {"kernel": kern, "dump": {f"compile.{t}.log": log for t, log in kern.logs.items()}}
    return Artifact(fn=functools.partial(fused, kern), source=source, info=info)


def register(kern: CudaKernel) -> CudaKernel:
    """Give kern its index in KERNELS (the custom op refers to kernels by index)."""
    kern.index = len(KERNELS)
    KERNELS.append(kern)
    return kern


# -- running ---------------------------------------------------------------------------------------

def prepare(call, kern: CudaKernel, ptrs: list | None = None):
    """pred as a contiguous (R, K) view and the other inputs in kernel order and kernel dtypes
    (contiguous, on pred's device); their data pointers are appended to `ptrs` when given.
    Kernels read data pointers only: nothing is detached."""
    pred = call.pred.contiguous().view(call.rows, call.width)
    if kern.launch["tables"]:
        _check_tables(call, kern)
    compute = COMPUTE[pred.dtype]
    dev, tensors, inputs = pred.device, call.tensors, []
    if ptrs is not None:
        ptrs.append(pred.data_ptr())
    for name, cast in kern.inputs:
        t = tensors[name]
        if t.device != dev:   # e.g. a CPU scalar a loss hook made: the kernel reads it
            t = t.to(dev)
        if cast and t.dtype != compute:
            t = t.to(compute)
        t = t.contiguous()
        inputs.append(t)
        if ptrs is not None:
            ptrs.append(t.data_ptr())
    return pred, inputs


def _check_tables(call, kern: CudaKernel) -> None:
    for name, n in kern.launch["tables"].items():
        if n != call.width:
            raise InputError(f"{call.name}: {name} has {n} values but pred has {call.width} "
                             f"classes (last dimension)")


def denominator(call, device: torch.device) -> tuple[Optional[torch.Tensor], float]:
    """'mean''s denominator as (device scalar, 0.0) or (None, value); never a host sync."""
    d = call.denom
    if d.__class__ is not torch.Tensor and not isinstance(d, torch.Tensor):
        return None, float(d or 0.0)
    if d.device.type == "cpu":
        return None, float(d)      # a CPU scalar is read on the host: no device sync
    if d.device != device:
        d = d.to(device)
    if d.dtype not in (torch.float32, torch.float64):
        d = d.to(torch.float32)
    return d.reshape(()), 0.0


@functools.lru_cache(maxsize=256)
def _divider(width: int) -> tuple[int, int, int]:
    """(magic, shift, limit) so that i // width == (umulhi(i, magic) + i) >> shift for i < limit."""
    if width <= 0 or width >= 1 << 31:
        return 1, 0, 0
    shift = max(0, (width - 1).bit_length())
    magic = ((1 << 32) * ((1 << shift) - width)) // width + 1
    return magic, shift, 1 << 31


@dataclass
class Plan:
    """Note [Launch plans]: everything about a launch that depends only on the call's signature
    (shape, device, dtype; and the thread, which owns the argument buffers) is worked out once
    and kept on the kernel: the grid, the divider, the output shapes, and the bound launches
    (cudadrv.Launches) of the kernel and its combine. A call then allocates its outputs, collects
    data pointers and fires. The vector tiles' alignment test runs in the kernel itself."""

    blocks: int
    loss_shape: tuple
    loss_dtype: torch.dtype
    fixed: tuple          # R, K, magic, shift, fast_limit, vec_ok (a box kernel's rows are boxes)
    fire: Callable        # cudadrv.Launches of the kernel (and its combine)
    accumulate: bool


def _plan(kern: CudaKernel, dev: torch.device, rows: int, width: int, dtype: torch.dtype,
          ninputs: int, fast_limit: int | None) -> Plan:
    mod = kern.launcher(dev)
    block, n = kern.launch["block"], rows * width
    if kern.launch["schedule"] == "elem":
        work = math.ceil(n / (block * kern.launch["unroll"] * kern.launch.get("vec", 1)))
    else:
        work = math.ceil(rows / (block // 32))
    blocks = max(1, min(work, mod.max_blocks(kern.name, block)))
    magic, shift, limit = _divider(width)
    if fast_limit is not None:
        limit = min(limit, fast_limit)
    specs = [(kern.name, blocks, block, ("ptr",) * (1 + ninputs) + MAIN_TAIL)]
    if kern.launch["accumulate"]:
        specs.append((kern.finish, 1, block, FINISH_ARGS))
    box_ok = int(not kern.launch.get("box") or width == kern.launch["vec"])
    return Plan(blocks, kern.loss_shape(rows, width), compute_dtype(dtype),
                (rows, width, magic, shift, limit, box_ok), mod.bind(specs),
                kern.launch["accumulate"])


def fused(kern: CudaKernel, pred: torch.Tensor, inputs: list[torch.Tensor],
          denom: Optional[torch.Tensor], denom_value: float, grad: bool,
          fast_limit: int | None = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the kernel (and its combine) on pred's device: returns (loss, grad or None)."""
    ptrs = [pred.data_ptr()]
    for t in inputs:
        ptrs.append(t.data_ptr())
    return _launch(kern, pred, ptrs, denom, denom_value, grad, fast_limit)


def _launch(kern: CudaKernel, pred: torch.Tensor, ptrs: list, denom: Optional[torch.Tensor],
            denom_value: float, grad: bool, fast_limit: int | None):
    """fused() on the data pointers of pred and the inputs."""
    shape, dev, dtype = pred.shape, pred.device, pred.dtype
    key = (shape, dev, dtype, fast_limit, get_ident())
    try:
        plan = kern.plans[key]
    except KeyError:
        plan = kern.plans[key] = _plan(kern, dev, *shape, dtype, len(ptrs) - 1, fast_limit)
    loss = torch.empty(plan.loss_shape, dtype=plan.loss_dtype, device=dev)
    lptr = loss.data_ptr()
    if grad:
        g = torch.empty(shape, dtype=dtype, device=dev)
        gptr = g.data_ptr()
    else:
        g, gptr = None, 0
    if denom is None:
        dptr = dkind = 0
    else:
        dptr, dkind = denom.data_ptr(), 1 if denom.dtype == torch.float32 else 2
    if plan.accumulate:
        partials = torch.empty(plan.blocks, dtype=torch.float64, device=dev)
        pptr = partials.data_ptr()   # freed on return: the allocator orders reuse on the stream
        plan.fire((*ptrs, dptr, dkind, denom_value, *plan.fixed, lptr, gptr, pptr,
                   pptr, plan.blocks, dptr, dkind, denom_value, lptr))
    else:
        plan.fire((*ptrs, dptr, dkind, denom_value, *plan.fixed, lptr, gptr, 0))
    return loss, g


def run(artifact: Artifact, call, meta):
    """Run the kernel on pred's device and current stream; returns (loss, grad or None)."""
    check_call(call, meta, "cuda", "cuda", available)   # Note [Device guard]
    kern: CudaKernel = artifact.info["kernel"]
    if HAS_OP and _compiling():
        return _run_traced(kern, call, meta.variant.grad)
    ptrs: list = []
    pred, inputs = prepare(call, kern, ptrs)
    d = call.denom
    if d.__class__ is torch.Tensor or isinstance(d, torch.Tensor):
        denom, value = denominator(call, pred.device)
    else:
        denom, value = None, float(d or 0.0)
    loss, g = _launch(kern, pred, ptrs, denom, value, meta.variant.grad, None)
    if g is not None and "rescale" in kern.launch:   # Note [Loss scaling on CUDA]
        call.cuda_versions = _versions(call)
    if g is None or g.shape == call.pred.shape:
        return loss, g
    return loss, g.view(call.pred.shape)


def plan(artifact: Artifact, call, meta):
    """A launcher for repeats of `call` (same shapes, dtypes, strides, devices), or None.

    Note [Direct launches]: like cpp's Note [Launch plan]: when pred and every input are already
    contiguous, on pred's device and in the kernel's dtypes, a repeat needs none of prepare()'s
    conversions nor check_call's guard (its signature passed them), and the launch plan is
    found per thread without building _launch's key. The launcher takes the tensors in its
    `inputs` order and the call's denominator; it never reads a device value on the host.
    """
    kern: CudaKernel = artifact.info["kernel"]
    pred = call.pred
    if not pred.is_contiguous() or pred.dtype not in COMPUTE or kern.launch["tables"] and \
            any(n != call.width for n in kern.launch["tables"].values()):
        return None
    dev, dtype, compute = pred.device, pred.dtype, COMPUTE[pred.dtype]
    for name, cast in kern.inputs:
        t = call.tensors.get(name)
        if t is None or t.device != dev or (cast and t.dtype != compute) or not t.is_contiguous():
            return None
    rows, width, grad_shape = call.rows, call.width, tuple(pred.shape)
    want_grad, empty, ptr = meta.variant.grad, torch.empty, torch.Tensor.data_ptr
    by_thread: dict[int, Plan] = {}

    def launch(ins, denom):
        p = by_thread.get(get_ident())
        if p is None:
            p = by_thread[get_ident()] = _plan(kern, dev, rows, width, dtype, len(ins) - 1, None)
        if denom.__class__ is torch.Tensor:
            if denom.device.type == "cpu":
                dptr = dkind = 0
                value = float(denom)     # a host value: no device sync
            else:
                d = denominator_tensor(denom, dev)
                dptr, dkind, value = d.data_ptr(), 1 if d.dtype == torch.float32 else 2, 0.0
        else:
            dptr = dkind = 0
            value = float(denom or 0.0)
        loss = empty(p.loss_shape, dtype=p.loss_dtype, device=dev)
        lptr = loss.data_ptr()
        if want_grad:
            g = empty(grad_shape, dtype=dtype, device=dev)
            gptr = g.data_ptr()
        else:
            g, gptr = None, 0
        if p.accumulate:
            partials = empty(p.blocks, dtype=torch.float64, device=dev)
            pptr = partials.data_ptr()   # freed on return: the allocator orders reuse
            p.fire((*map(ptr, ins), dptr, dkind, value, *p.fixed, lptr, gptr, pptr,
                    pptr, p.blocks, dptr, dkind, value, lptr))
        else:
            p.fire((*map(ptr, ins), dptr, dkind, value, *p.fixed, lptr, gptr, 0))
        return loss, g
    launch.inputs = ("pred", *(name for name, _ in kern.inputs))
    launch.loss_dtype = compute_dtype(dtype)
    return launch


def denominator_tensor(d: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device denominator as the kernel reads it (denominator()'s tensor case)."""
    if d.device != device:
        d = d.to(device)
    if d.dtype not in (torch.float32, torch.float64):
        d = d.to(torch.float32)
    return d.reshape(())


def _run_traced(kern: CudaKernel, call, grad: bool):
    """run() under torch.compile: the launch is the custom op (Note [Custom op])."""
    pred, inputs = prepare(call, kern)
    denom, value = denominator(call, pred.device)
    pred, inputs = pred.detach(), [t.detach() for t in inputs]
    loss, g = torch.ops.lossgraph.cuda_fused(kern.index, pred, inputs, denom, value, grad)
    return loss, (g.reshape(call.pred.shape) if grad else None)


# -- torch.compile: the launch as a custom op ------------------------------------------------------

def _compiling() -> bool:
    """True while dynamo traces (torch.compiler.is_compiling from torch 2.3 on)."""
    return _IS_COMPILING() if _IS_COMPILING is not None else torch._dynamo.is_compiling()


_IS_COMPILING = getattr(torch.compiler, "is_compiling", None)


HAS_OP = hasattr(torch.library, "custom_op")   # torch >= 2.4; older torch breaks the graph here
if HAS_OP:
    @torch.library.custom_op("lossgraph::cuda_fused", mutates_args=(), device_types="cuda")
    def _fused_op(kernel: int, pred: torch.Tensor, inputs: list[torch.Tensor],
                  denom: Optional[torch.Tensor], denom_value: float,
                  grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Note [Custom op]: under torch.compile the launch is this opaque op (eager calls
        launch directly, skipping the dispatcher); the fake below gives shapes and dtypes to the
        tracer. Without a gradient the second output is an empty tensor (no None outputs)."""
        loss, g = fused(KERNELS[kernel], pred, inputs, denom, denom_value, grad)
        return loss, g if g is not None else pred.new_empty((0,))

    @_fused_op.register_fake
    def _fused_fake(kernel, pred, inputs, denom, denom_value, grad):
        rows, width = pred.shape
        shape = KERNELS[kernel].loss_shape(rows, width)
        loss = pred.new_empty(shape, dtype=compute_dtype(pred.dtype))
        return loss, pred.new_empty((rows, width) if grad else (0,))


# -- backward: grad *= grad_output on the device ---------------------------------------------------

SCALE_KINDS = {torch.float32: ("f32", "float", "float", "(float)gd", 0),
               torch.float64: ("f64", "double", "double", "gd", 1),
               torch.float16: ("f16", "lg_half", "float",
                               "lg_half_to_float(lg_float_to_half((float)gd))", 2),
               torch.bfloat16: ("bf16", "lg_bf16", "float",
                                "lg_bf16_to_float(lg_float_to_bf16((float)gd))", 3)}


def render_scale() -> str:
    """The source of the grad_output scaling kernels, one per gradient dtype."""
    kinds = [(n, s, c, r) for n, s, c, r, _ in SCALE_KINDS.values()]
    header = "\n".join(f"// {line}" for line in (
        "Generated by lossgraph. Do not edit.", "backend: cuda (grad_output scaling)"))
    return codegen.render("cuda/scale.cu.j2", header=header, kinds=kinds, block=BLOCK)


@functools.lru_cache(maxsize=None)
def _scaler() -> CudaKernel:
    src = render_scale()
    key = cache.sha(src + json.dumps(components(None)))[:32]
    folder = cache.cache_dir() / "cuda" / "scale" / key
    return CudaKernel("lg_scale", src, folder, {}, "sum", Level.SCALAR)


def scale_grad(artifact: Artifact, grad: torch.Tensor, g: torch.Tensor, call=None,
               launcher: Callable | None = None) -> torch.Tensor:
    """grad.mul_(g) for a 0-d grad_output g, on the device, skipped there when g == 1; for a
    float16/bfloat16 gradient of `call`, the kernel's rescale instead (Note [Loss scaling on CUDA])."""
    if _compiling() or g.device != grad.device or not grad.is_contiguous() \
            or g.dtype not in SCALE_KINDS or grad.dtype not in SCALE_KINDS:
        return grad.mul_(g.to(grad.dtype))
    kern = artifact.info.get("kernel") if artifact is not None and call is not None else None
    if kern is not None and "rescale" in kern.launch and \
            getattr(call, "cuda_versions", None) == _versions(call):
        return _rescale(kern, call, grad, g)
    name = SCALE_KINDS[grad.dtype][0]
    mod = (launcher or _scaler().launcher)(grad.device)
    fn = f"lg_scale_{name}"
    n = grad.numel()
    blocks = max(1, min(math.ceil(n / (BLOCK * UNROLL)), mod.max_blocks(fn, BLOCK)))
    mod.launch(fn, blocks, BLOCK, (grad.data_ptr(), n, g.data_ptr(), SCALE_KINDS[g.dtype][4]),
               SCALE_ARGS)
    return grad


# Note [Loss scaling on CUDA]: a float16 gradient rounded before a GradScaler's loss scale
# multiplies it loses every element below float16's subnormals (2^-24), which a mean over many
# elements is full of; MMDetection's eager backward keeps more of them. The cpp and torchscript
# kernels return a float32 gradient (Note [Loss scaling in float32]); on the GPU that would move
# 2 + 4 bytes per element in the forward and 4 + 2 more in the backward, even when
# grad_output == 1 (bfloat16 training without a scaler). Instead the forward stays as it is (a
# gradient in pred's dtype, 2 + 2 bytes), and a half kernel with a reduced loss has a second
# entry, <name>_rescale: the same body with the gradient multiplied by grad_output in float and
# rounded once, and no loss. The backward launches it on the call's inputs instead of scaling the
# rounded gradient: it reads pred (and the inputs) again and writes the gradient in place, as
# many bytes as the scale kernel's read and write, and like it every block returns at once when
# grad_output == 1 (read on the device: no sync). It re-reads the inputs at backward time, so the
# forward records their version counters on the call; when one has changed (an in-place edit
# after the forward) the backward scales the forward's gradient, as before.

def _versions(call) -> tuple:
    """The version counters of the call's tensors (a changed one means an in-place write)."""
    d = call.denom
    return (call.pred._version, *[t._version for t in call.tensors.values()],
            d._version if isinstance(d, torch.Tensor) else None)


def _rescale(kern: CudaKernel, call, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad = round(kernel gradient * g): the rescale kernel, written into grad in place."""
    ptrs: list = []
    pred, _inputs = prepare(call, kern, ptrs)
    denom, value = denominator(call, pred.device)
    rows, width = pred.shape
    key = (pred.shape, pred.device, pred.dtype, None, get_ident())
    plan = kern.plans.get(key)
    if plan is None:
        plan = kern.plans[key] = _plan(kern, pred.device, rows, width, pred.dtype,
                                       len(ptrs) - 1, None)
    dptr, dkind = (0, 0) if denom is None else \
        (denom.data_ptr(), 1 if denom.dtype == torch.float32 else 2)
    mod = kern.launcher(pred.device)
    kinds = ("ptr",) * len(ptrs) + MAIN_TAIL + ("ptr", "int")
    mod.launch(f"{kern.name}_rescale", plan.blocks, kern.launch["block"],
               (*ptrs, dptr, dkind, value, *plan.fixed, 0, grad.data_ptr(), 0, g.data_ptr(),
                SCALE_KINDS[g.dtype][4]), kinds)
    return grad
