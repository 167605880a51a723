"""Native CPU backend: the fused body rendered as C, built by the system compiler, run via ctypes.

Note [C build route]: the kernel is plain C99 with raw pointers (no torch headers), so a new
kernel compiles in a fraction of a second and a cached .so loads in about a millisecond. OpenMP
parallelizes fixed chunks of rows; libmvec vectorizes exp/log without -ffast-math.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .. import buffers, codegen
from ..errors import BackendError
from ..inputs import compute_dtype
from ..ops import Level
from . import elf, fastcall
from .base import Artifact, KernelSource, check_call, table_tensor
from .clower import lower, scalar_loads
from .lanes import LANES_K, lanes

SUFFIX = ".c"
CHUNK = 16384   # elements per reduction chunk: fixed, so results do not depend on thread count
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu99"]
VEC_FUNCTIONS = [f"{t} {f}{s}({', '.join([t] * n)})" for t, s in (("float", "f"), ("double", ""))
                 for f, n in (("exp", 1), ("log", 1), ("log1p", 1), ("sin", 1), ("cos", 1),
                              ("atan", 1), ("asin", 1), ("tanh", 1), ("pow", 2))]
MIN_PARALLEL = 1 << 15   # below this many elements one thread is faster than waking a team
LANES_RB = 8              # rows per group of the lanes schedule (Note [Rows across lanes])


def compiler() -> str | None:
    """$CC, else gcc, else cc (None when there is none)."""
    for c in (os.environ.get("CC"), "gcc", "cc"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _compiler_id() -> str:
    return _toolchain()["id"]


@functools.lru_cache(maxsize=None)
def _cpu_id() -> str:
    """The CPU's feature flags (kernels are built with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe() -> tuple[bool, bool]:
    """(a C compiler builds a shared library here, libmvec's SIMD math links too)."""
    t = _toolchain()
    return t["ok"], t["vec"]


@functools.lru_cache(maxsize=None)
def _toolchain() -> dict:
    """What the compiler is and can do, remembered on disk per compiler binary.

    Note [Toolchain probe]: probing builds two tiny libraries (~80 ms), and `cc --version` is a
    process too; a process that only loads cached kernels should not pay for either, so the
    answers are kept in the cache folder, keyed by the compiler's path, size and mtime. Only a
    full success is kept for good: a failed probe (a transient error, a full /tmp) is kept for
    PROBE_RETRY_S only, so a later process tries again instead of using TorchScript forever."""
    from .. import cache
    cc = compiler()
    if cc is None:
        return {"id": "none", "ok": False, "vec": False}
    st = os.stat(cc)
    key = cache.digest({"cc": cc, "size": st.st_size, "mtime": st.st_mtime_ns, "flags": FLAGS,
                        "machine": platform.machine(), "vec": VEC_FUNCTIONS})
    memo = cache.cache_dir() / "cpp" / f"toolchain-{key[:16]}.json"
    for folder in cache.readable(memo.parent):
        try:
            t = json.loads(cache.read(folder / memo.name) or b"")
            if {"id", "ok", "vec", "time"} <= set(t) and (
                    _complete(t) or time.time() - t["time"] < PROBE_RETRY_S):
                return t
        except (ValueError, TypeError):
            pass
    out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    ok, vec = _run_probes(cc)
    t = {"id": out.splitlines()[0] if out else cc, "ok": ok, "vec": vec, "time": time.time()}
    try:
        cache.writing(memo.parent, lambda d: cache.write_atomic(d / memo.name, json.dumps(t)))
    except OSError:
        pass
    return t


PROBE_RETRY_S = 600


def _complete(t: dict) -> bool:
    """Everything the probe can find worked (libmvec is only looked for on x86-64)."""
    return bool(t["ok"]) and (bool(t["vec"]) or platform.machine() not in ("x86_64", "AMD64"))


def _run_probes(cc: str) -> tuple[bool, bool]:
    with tempfile.TemporaryDirectory() as d:
        ok = _try_build(cc, d, "double f(double x) { return x + 1; }\n")
        decls = "".join(f'{f} __attribute__((simd("notinbranch")));\n' for f in VEC_FUNCTIONS)
        body = decls + "#include <math.h>\nvoid g(float* x, int n) {\n#pragma omp simd\n" \
            "for (int i = 0; i < n; i++) x[i] = expf(x[i]) + log1pf(x[i]) + atanf(x[i]);\n}\n"
        vec = ok and platform.machine() in ("x86_64", "AMD64") and _try_build(cc, d, body)
    return ok, vec


def _try_build(cc: str, d: str, src: str) -> bool:
    c, so = os.path.join(d, "probe.c"), os.path.join(d, "probe.so")
    Path(c).write_text(src)
    try:
        r = subprocess.run([cc, *FLAGS, c, "-o", so, "-lm"], capture_output=True, text=True)
        data = Path(so).read_bytes() if r.returncode == 0 else b""
    except OSError:
        return False
    if not elf.complete(data):
        return False   # a compiler that exits 0 but writes a short file must not be dlopen'ed
    try:
        elf.dlopen(data)
        return True
    except OSError:
        return False


def available(device: str) -> bool:
    """Usable for CPU tensors when a C compiler can build and load a shared library."""
    return device == "cpu" and _probe()[0]


def components(v) -> dict:
    """Cache-key parts: the compiler, its flags and the CPU the code was tuned for."""
    return {"cc": _compiler_id(), "flags": " ".join(FLAGS), "cpu": _cpu_id(),
            "vecmath": _probe()[1], "chunk": CHUNK}


def render(src: KernelSource) -> str:
    """Render the fused body as a C kernel computing the loss and gradient in one pass."""
    v = src.variant
    k = lower(src.body, v, src.fn_name, buffers=True, wide=v.dtype != "float64")
    return codegen.render("cpp/kernel.c.j2", header=src.header("//"), k=k, lanes=lanes(k),
                          lanes_rb=LANES_RB, lanes_k=LANES_K,
                          double=v.dtype == "float64", label_type=_label_ctype(v.label_dtype),
                          vecmath=_probe()[1], vec_functions=VEC_FUNCTIONS, chunk=CHUNK,
                          scalar_loads=scalar_loads(k.params),
                          accumulate=k.loss_mode.startswith("acc"))


def _label_ctype(dtype: str) -> str:
    return {"int64": "long long", "int32": "int", "int16": "short", "int8": "signed char",
            "uint8": "unsigned char"}[dtype]


def build(source: str, folder: Path, fn_name: str) -> Path:
    """The path of source's verified shared library in folder (or the private folder that
    stands in for it), compiled first when there is none."""
    return library(source, folder, fn_name)[0]


def library(source: str, folder: Path, fn_name: str, flags: tuple[str, ...] = ()) -> tuple[Path, bytes]:
    """(path, verified bytes) of source's shared library: from the cache, or compiled once even
    with several processes racing (a DDP start). See Note [Cache trust]. `flags` are extra
    compiler flags (an include path: the source names what it was built for)."""
    from .. import cache
    # named by the source's hash, so one folder can hold the builds of several sources
    name = f"kernel-{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    data = cache.get(Path(folder) / name)
    if data is not None and elf.complete(data):
        return Path(folder) / name, data

    def make(where: Path) -> tuple[Path, bytes]:
        with cache.lock(where):
            again = cache.get(where / name)
            if again is not None and elf.complete(again):
                return where / name, again
            cache.set_aside(where / name)   # damaged, or never finished
            image = _compile(source, where, fn_name, flags)
            cache.put(where / name, image)
            return where / name, image
    return cache.writing(Path(folder), make)


def _compile(source: str, folder: Path, fn_name: str, flags: tuple[str, ...] = ()) -> bytes:
    """Run the C compiler into a temporary file of folder; the bytes of a complete library."""
    cc = compiler()
    if cc is None:
        raise BackendError("no C compiler found (set $CC or install gcc)")
    c_file = folder / f"{fn_name}.c"
    c_file.write_text(source)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, *FLAGS, *flags, str(c_file), "-o", tmp, "-lm"]
    try:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            log, ok = " ".join(cmd) + "\n" + r.stdout + r.stderr, r.returncode == 0
        except OSError as e:
            log, ok = f"{' '.join(cmd)}\n{e}", False
        (folder / "compile.log").write_text(log)
        if not ok:
            raise BackendError(f"the C compiler failed (log: {folder / 'compile.log'})", log)
        with open(tmp, "rb") as f:
            data = f.read()
    finally:
        os.unlink(tmp)
    if not elf.complete(data):
        raise BackendError(f"the C compiler {cc} exited 0 but wrote {len(data)} bytes that are not "
                           f"a complete shared library (log: {folder / 'compile.log'})", log)
    return data


def load(meta, source: str, folder: Path) -> Artifact:
    """Build (or reuse) the shared library of this kernel and bind its function with ctypes."""
    so, data = library(source, Path(folder), meta.fn_name)
    try:
        lib = elf.dlopen(data)
        fn = getattr(lib, meta.fn_name)
    except (OSError, AttributeError) as e:
        raise BackendError(f"cannot load {so}: {e}") from e
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * len(_tensor_params(meta)) + [
        ctypes.c_double, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int]
    fn = fastcall.kernel(fn, len(_tensor_params(meta)))   # Note [Fast calls]
    log = so.parent / "compile.log"
    try:
        dump = {"compile.log": log.read_text()} if log.exists() else {}
    except (OSError, ValueError):
        dump = {}
    return Artifact(fn=fn, source=source, info={"library": str(so), "dump": dump})


def empty_output(shape, dtype) -> torch.Tensor:
    """An output tensor; large ones come from already-mapped memory (Note [Output buffer pool])."""
    return buffers.empty(shape, dtype)


HELPERS = """/* lossgraph runtime helpers */
int lg_any_positive_f32(const float* w, long long n) {
  int any = 0;
  #pragma omp simd reduction(|:any)
  for (long long i = 0; i < n; i++) any |= (w[i] > 0.0f);
  return any;
}
int lg_any_positive_f64(const double* w, long long n) {
  int any = 0;
  #pragma omp simd reduction(|:any)
  for (long long i = 0; i < n; i++) any |= (w[i] > 0.0);
  return any;
}
int lg_in_range_i64(const long long* x, long long n, long long lo, long long hi) {
  int bad = 0;
  #pragma omp simd reduction(|:bad)
  for (long long i = 0; i < n; i++) bad |= (x[i] < lo) | (x[i] > hi);
  return !bad;
}
int lg_in_range_i32(const int* x, long long n, long long lo, long long hi) {
  int bad = 0;
  #pragma omp simd reduction(|:bad)
  for (long long i = 0; i < n; i++) bad |= (x[i] < lo) | (x[i] > hi);
  return !bad;
}
int lg_open_range_f32(const float* x, long long n, double lo, double hi) {
  int bad = 0;   /* NaN fails both tests */
  #pragma omp simd reduction(|:bad)
  for (long long i = 0; i < n; i++) bad |= !((x[i] > lo) & (x[i] < hi));
  return !bad;
}
int lg_open_range_f64(const double* x, long long n, double lo, double hi) {
  int bad = 0;
  #pragma omp simd reduction(|:bad)
  for (long long i = 0; i < n; i++) bad |= !((x[i] > lo) & (x[i] < hi));
  return !bad;
}
"""


@functools.lru_cache(maxsize=None)
def _helpers():
    """The helper library (built once, cached on disk like a kernel), or None."""
    if not available("cpu"):
        return None
    from .. import cache
    try:
        _, data = library(HELPERS, cache.cache_dir() / "cpp" / "helpers", "helpers")
        lib = elf.dlopen(data)
    except (BackendError, OSError):
        return None
    for name in ("lg_any_positive_f32", "lg_any_positive_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_longlong]
    for name in ("lg_in_range_i64", "lg_in_range_i32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] + [ctypes.c_longlong] * 3
    for name in ("lg_open_range_f32", "lg_open_range_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double,
                                       ctypes.c_double]
    return lib


def any_positive(t: torch.Tensor) -> bool | None:
    """torch.any(t > 0) for a contiguous float CPU tensor without its bool temporary, else None.

    The v3 all-zero-weight early exit asks this of every L1/SmoothL1/IoU weight; on the CPU the
    bool tensor and its reduction cost more than the loss kernel (0.8 of 1.3 ms at 200k x 4)."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or \
            not t.is_contiguous() or t.requires_grad:
        return None
    lib = _helpers()
    if lib is None:
        return None
    fn = lib.lg_any_positive_f32 if t.dtype == torch.float32 else lib.lg_any_positive_f64
    return bool(fn(t.data_ptr(), t.numel()))


def in_range(t: torch.Tensor, lo: int, hi: int) -> bool | None:
    """Whether every value of a contiguous int64/int32 CPU tensor is in [lo, hi], in one pass
    without temporaries (the per-call label check); None where the helper does not apply."""
    fn = _range_functions().get(t.dtype)
    if fn is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    return bool(fn(t.data_ptr(), t.numel(), lo, hi))


def in_open_range(t: torch.Tensor, lo: float, hi: float) -> bool | None:
    """Whether every value of a contiguous float32/float64 CPU tensor lies in (lo, hi) (NaN does
    not), in one pass without temporaries; None where the helper does not apply."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or \
            not t.is_contiguous():
        return None
    lib = _helpers()
    if lib is None:
        return None
    fn = lib.lg_open_range_f32 if t.dtype == torch.float32 else lib.lg_open_range_f64
    return bool(fn(t.data_ptr(), t.numel(), float(lo), float(hi)))


@functools.lru_cache(maxsize=None)
def _range_functions() -> dict:
    """The helper library's range check by label dtype (empty without the library)."""
    lib = _helpers()
    if lib is None:
        return {}
    return {torch.int64: fastcall.check(lib.lg_in_range_i64),
            torch.int32: fastcall.check(lib.lg_in_range_i32)}


_data_ptr = torch.Tensor.data_ptr


def _tensor_params(meta) -> list[str]:
    return [p for p in meta.params if p != "denom"]  # denom is passed by value


def _contig(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.dtype != dtype:   # a large float16 pred's float32 copy comes from the pool too
        return empty_output(t.shape, dtype).copy_(t) if t.dim() else t.to(dtype)
    return t.contiguous()


def _outputs(meta, R: int, K: int, compute: torch.dtype, reduction: str, shape):
    """(loss, grad or None) output tensors of one launch; the gradient is contiguous, in pred's
    shape (R x K values in row-major order)."""
    if reduction == "none":
        loss = empty_output((R, K) if meta.loss_level is Level.ELEM else (R,), compute)
    else:
        loss = torch.empty((), dtype=compute)
    return loss, (empty_output(shape, compute) if meta.variant.grad else None)


def _denom(call) -> float:
    return call.denom.item() if isinstance(call.denom, torch.Tensor) else (call.denom or 0.0)


def run(artifact: Artifact, call, meta):
    """Run the kernel on contiguous CPU tensors; returns (loss, grad or None).

    Note [Half precision on the CPU]: float16/bfloat16 inputs are converted to float32 here and
    the gradient is returned in float32, shaped like pred: the runtime rounds it to pred's dtype
    after scaling it by grad_output (Note [Loss scaling in float32] in runtime.py), so the kernel
    itself is float32 or float64 only.
    """
    check_call(call, meta, "cpp", "cpu", available)   # Note [Device guard]
    compute = compute_dtype(call.pred.dtype)
    pred = _contig(call.pred, compute)
    R, K = call.rows, call.width
    ptrs, keep = [], [pred]
    for name in _tensor_params(meta):
        if name == "pred":
            t = pred
        elif name in meta.tables:
            t = table_tensor(meta, name, compute, "cpu")
        else:
            t = call.tensors[name]
            t = _contig(t, t.dtype if name == "label" else compute)
        keep.append(t)
        ptrs.append(t.data_ptr())
    loss, grad = _outputs(meta, R, K, compute, call.reduction, call.pred.shape)
    threads = torch.get_num_threads() if R * K >= MIN_PARALLEL else 1
    artifact.fn(*ptrs, _denom(call), R, K, loss.data_ptr(),
                grad.data_ptr() if grad is not None else None, threads)
    return loss, grad


def plan(artifact: Artifact, call, meta):
    """A launcher for repeats of `call` (same shapes, dtypes, strides), or None.

    Note [Launch plan]: when every input is already contiguous in the kernel's dtype (the usual
    case), a repeat needs none of run()'s conversions: the launcher takes the new call's tensors
    (in the order of its `inputs` names, pred first) and the call's denominator, reads their
    pointers and launches. The runtime only uses it for calls with the same signature, whose
    tensors therefore have the same layouts as `call`'s. Everything that depends only on the
    signature (output shapes and dtypes, whether the gradient is pooled, the thread count, the
    table pointers) is worked out here, once.
    """
    compute = compute_dtype(call.pred.dtype)
    if call.pred.dtype != compute or not call.pred.is_contiguous():
        return None
    inputs, tables = [], []
    for i, name in enumerate(_tensor_params(meta)):
        if name in meta.tables:
            tables.append((i, table_tensor(meta, name, compute, "cpu")))
            continue
        if name != "pred":
            t = call.tensors[name]
            if t.dtype != (t.dtype if name == "label" else compute) or not t.is_contiguous():
                return None
        inputs.append(name)
    R, K, fn, shape = call.rows, call.width, artifact.fn, tuple(call.pred.shape)
    parallel = R * K >= MIN_PARALLEL
    tensor_denom = meta.variant.denom == "tensor"
    want_grad = meta.variant.grad
    loss_shape = ()
    if call.reduction == "none":
        loss_shape = (R, K) if meta.loss_level is Level.ELEM else (R,)
    # outputs below the pool's threshold come from torch.empty directly; buffers.empty would
    # decide the same (the threshold only moves memory between malloc and the pool)
    loss_small = math.prod(loss_shape) * compute.itemsize < buffers.MIN_BYTES
    grad_small = R * K * compute.itemsize < buffers.MIN_BYTES
    # torch.empty_like of a template parses no shape or dtype: about half of torch.empty's
    # time, which is a tenth of a tiny call. A reduced loss is made like a 0-d template that is
    # never handed out; a small gradient like pred (contiguous, in the compute dtype)
    empty, empty_like, pooled = torch.empty, torch.empty_like, buffers.empty
    scalar = torch.empty((), dtype=compute) if not loss_shape else None

    def launch(ins, denom):
        if tables:
            ptrs = list(map(_data_ptr, ins))
            for i, t in tables:
                ptrs.insert(i, t.data_ptr())
        else:
            ptrs = map(_data_ptr, ins)
        if scalar is not None:
            loss = empty_like(scalar)
        else:
            loss = empty(loss_shape, dtype=compute) if loss_small else pooled(loss_shape, compute)
        if want_grad:
            grad = empty_like(ins[0]) if grad_small else pooled(shape, compute)
            gptr = grad.data_ptr()
        else:
            grad = gptr = None
        fn(*ptrs, denom.item() if tensor_denom else (denom or 0.0), R, K, loss.data_ptr(), gptr,
           torch.get_num_threads() if parallel else 1)
        return loss, grad
    launch.inputs, launch.loss_dtype = tuple(inputs), compute
    return launch
