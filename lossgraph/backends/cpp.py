"""Native CPU backend: the fused body rendered as C, built by the system compiler, run via ctypes.

Note [C build route]: the kernel is plain C99 with raw pointers (no torch headers), so a new
kernel compiles in a fraction of a second and a cached .so loads in about a millisecond. OpenMP
parallelizes fixed chunks of rows; libmvec vectorizes exp/log without -ffast-math.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .. import codegen
from ..errors import BackendError
from ..inputs import compute_dtype
from ..ops import Level
from .base import Artifact, KernelSource, check_call, table_tensor
from .clower import lower, scalar_loads

SUFFIX = ".c"
CHUNK = 16384   # elements per reduction chunk: fixed, so results do not depend on thread count
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu99"]
VEC_FUNCTIONS = [f"{t} {f}{s}({', '.join([t] * n)})" for t, s in (("float", "f"), ("double", ""))
                 for f, n in (("exp", 1), ("log", 1), ("log1p", 1), ("sin", 1), ("cos", 1),
                              ("atan", 1), ("asin", 1), ("tanh", 1), ("pow", 2))]
MIN_PARALLEL = 1 << 15   # below this many elements one thread is faster than waking a team


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
    answers are kept in the cache folder, keyed by the compiler's path, size and mtime."""
    from .. import cache
    cc = compiler()
    if cc is None:
        return {"id": "none", "ok": False, "vec": False}
    st = os.stat(cc)
    key = cache.digest({"cc": cc, "size": st.st_size, "mtime": st.st_mtime_ns, "flags": FLAGS,
                        "machine": platform.machine(), "vec": VEC_FUNCTIONS})
    memo = cache.cache_dir() / "cpp" / f"toolchain-{key[:16]}.json"
    try:
        t = json.loads(memo.read_text())
        if {"id", "ok", "vec"} <= set(t):
            return t
    except (OSError, ValueError):
        pass
    out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    ok, vec = _run_probes(cc)
    t = {"id": out.splitlines()[0] if out else cc, "ok": ok, "vec": vec}
    if cache.enabled():
        try:
            cache.write_atomic(memo, json.dumps(t))
        except OSError:
            pass
    return t


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
    r = subprocess.run([cc, *FLAGS, c, "-o", so, "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        return False
    try:
        ctypes.CDLL(so)
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
    k = lower(src.body, v, src.fn_name)
    return codegen.render("cpp/kernel.c.j2", header=src.header("//"), k=k,
                          double=v.dtype == "float64", label_type=_label_ctype(v.label_dtype),
                          vecmath=_probe()[1], vec_functions=VEC_FUNCTIONS, chunk=CHUNK,
                          scalar_loads=scalar_loads(k.params),
                          accumulate=k.loss_mode.startswith("acc"))


def _label_ctype(dtype: str) -> str:
    return {"int64": "long long", "int32": "int", "int16": "short", "int8": "signed char",
            "uint8": "unsigned char"}[dtype]


def build(source: str, folder: Path, fn_name: str) -> Path:
    """Compile source into folder/kernel.so once, even with several processes racing (a DDP start)."""
    # named by the source's hash: dlopen caches by path, so a rebuilt kernel needs a new name
    so = folder / f"kernel-{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.exists():
            return so
        cc = compiler()
        if cc is None:
            raise BackendError("no C compiler found (set $CC or install gcc)")
        c_file = folder / f"{fn_name}.c"
        c_file.write_text(source)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *FLAGS, str(c_file), "-o", tmp, "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            log = " ".join(cmd) + "\n" + r.stdout + r.stderr
            ok = r.returncode == 0
        except OSError as e:
            log, ok = f"{' '.join(cmd)}\n{e}", False
        (folder / "compile.log").write_text(log)
        if not ok:
            os.unlink(tmp)
            raise BackendError(f"the C compiler failed (log: {folder / 'compile.log'})", log)
        os.replace(tmp, so)
    return so


def load(meta, source: str, folder: Path) -> Artifact:
    """Build (or reuse) the shared library of this kernel and bind its function with ctypes."""
    so = build(source, Path(folder), meta.fn_name)
    try:
        lib = ctypes.CDLL(str(so))
        fn = getattr(lib, meta.fn_name)
    except (OSError, AttributeError) as e:
        raise BackendError(f"cannot load {so}: {e}") from e
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * len(_tensor_params(meta)) + [
        ctypes.c_double, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int]
    log = Path(folder) / "compile.log"
    info = {"library": str(so), "dump": {"compile.log": log.read_text()} if log.exists() else {}}
    return Artifact(fn=fn, source=source, info=info)


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None where there is none (not Linux/glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError):
        return None


HUGE_MIN = 4 << 20   # bytes; smaller outputs gain nothing from 2 MiB pages
MADV_HUGEPAGE = 14


def empty_output(shape, dtype) -> torch.Tensor:
    """torch.empty, advised to use transparent huge pages when large.

    Note [Huge pages for outputs]: a fresh 32-65 MB gradient is written once by the kernel, and
    on Linux every 4 KiB page of it faults on first touch: that costed more than the kernel
    itself (65 MB: 15 ms of faults for 3.6 ms with 2 MiB pages, measured here). The advice only
    changes how pages are backed, never the values.
    """
    t = torch.empty(shape, dtype=dtype)
    size = t.numel() * t.element_size()
    madvise = _madvise() if size >= HUGE_MIN else None
    if madvise is not None:
        start = (t.data_ptr() + 4095) & ~4095
        madvise(start, (t.data_ptr() + size - start) & ~4095, MADV_HUGEPAGE)
    return t


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
"""


@functools.lru_cache(maxsize=None)
def _helpers():
    """The helper library (built once, cached on disk like a kernel), or None."""
    if not available("cpu"):
        return None
    from .. import cache
    try:
        lib = ctypes.CDLL(str(build(HELPERS, cache.cache_dir() / "cpp" / "helpers", "helpers")))
    except (BackendError, OSError):
        return None
    for name in ("lg_any_positive_f32", "lg_any_positive_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_longlong]
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


def _tensor_params(meta) -> list[str]:
    return [p for p in meta.params if p != "denom"]  # denom is passed by value


def _contig(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def run(artifact: Artifact, call, meta):
    """Run the kernel on contiguous CPU tensors; returns (loss, grad or None).

    Note [Half precision on the CPU]: float16/bfloat16 inputs are converted to float32 here and
    the gradient is converted back, so the kernel itself is float32 or float64 only.
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
    v = meta.variant
    if call.reduction == "none":
        loss = empty_output((R, K) if meta.loss_level is Level.ELEM else (R,), compute)
    else:
        loss = torch.empty((), dtype=compute)
    grad = empty_output((R, K), compute) if v.grad else None
    denom = call.denom.item() if isinstance(call.denom, torch.Tensor) else (call.denom or 0.0)
    threads = torch.get_num_threads() if R * K >= MIN_PARALLEL else 1
    artifact.fn(*ptrs, denom, R, K, loss.data_ptr(), grad.data_ptr() if grad is not None else None,
                threads)
    if grad is not None:
        grad = grad.reshape(call.pred.shape)
        if grad.dtype != call.pred.dtype:
            grad = grad.to(call.pred.dtype)
    return loss, grad
