"""NVRTC: CUDA source -> cubin (or PTX) through cuda.bindings, with no GPU and no nvcc needed.

Note [Where libnvrtc comes from]: `cuda.bindings.nvrtc` finds libnvrtc through cuda-pathfinder,
which looks in the pip wheels first (`nvidia-cuda-nvrtc` installs nvidia/cu13/lib, the -cu12
wheel nvidia/cuda_nvrtc/lib), then in a system CUDA toolkit. NVRTC is a pure compiler library:
it needs no driver, so the CLI and the compile tests run on machines without a GPU.
"""
from __future__ import annotations

import functools
import re

from ..errors import BackendError

# Note [Fast division on CUDA]: --prec-div=false makes float x / y div.full.f32 (and 1 / y
# rcp.approx): at most 2 ulp over the full range instead of IEEE's 0.5, with no slow-path branch
# (about 9 fewer instructions per division); inf, NaN and 0 keep their IEEE results. Double
# division stays IEEE. sqrt, log and the rest stay precise (no --use_fast_math, no ftz).
# 177 = unused static function.
OPTIONS = ("-std=c++17", "--fmad=true", "--prec-div=false", "--diag-suppress=177")
ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")
INSTALL = "pip install 'lossgraph[cuda]' (the cuda-bindings and nvidia-cuda-nvrtc packages)"


def _bindings():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BackendError(f"the cuda backend needs cuda-bindings ({e}); {INSTALL}") from None
    return nvrtc


@functools.lru_cache(maxsize=None)
def version() -> tuple[int, int]:
    """NVRTC's (major, minor); BackendError when the bindings or libnvrtc cannot be loaded."""
    nvrtc = _bindings()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - cuda-pathfinder raises its own error types
        raise BackendError(f"libnvrtc could not be loaded ({e}); {INSTALL}") from None
    _check(nvrtc, err, "nvrtcVersion")
    return major, minor


def unavailable_reason() -> str | None:
    """Why NVRTC cannot compile here, or None when it can."""
    try:
        version()
    except BackendError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def supported_archs() -> tuple[int, ...]:
    """The compute capabilities (e.g. 80, 90) this NVRTC can emit code for."""
    nvrtc = _bindings()
    version()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(nvrtc, err, "nvrtcGetSupportedArchs")
    return tuple(archs)


def parse_arch(arch: str) -> tuple[str, int, str]:
    """'sm_90' -> ('sm', 90, ''); ValueError for anything that is not sm_XY[a|f] or compute_XY."""
    m = ARCH.match(arch.strip())
    if not m:
        raise ValueError(f"bad CUDA architecture {arch!r}: expected e.g. sm_80, sm_90, sm_90a or "
                         f"compute_90")
    return m.group(1), int(m.group(2)), m.group(3)


def target_for(capability: tuple[int, int]) -> str:
    """The target for a device: its own cubin if NVRTC knows the arch, else PTX of the newest
    arch NVRTC knows below it (the driver JIT-compiles PTX for any newer GPU: a GPU newer than
    this NVRTC, or an arch between two that NVRTC lists)."""
    cc = capability[0] * 10 + capability[1]
    if cc in supported_archs():
        return f"sm_{cc}"
    return ptx_target(capability)


def ptx_target(capability: tuple[int, int]) -> str:
    """compute_XY PTX of the newest arch NVRTC knows at or below the device's."""
    cc = capability[0] * 10 + capability[1]
    archs = supported_archs()
    below = [a for a in archs if a <= cc]
    if below:
        return f"compute_{max(below)}"
    raise BackendError(f"the GPU is sm_{cc}, older than NVRTC {'.'.join(map(str, version()))} "
                       f"supports (sm_{min(archs)} and newer)")


def compile(source: str, arch: str, name: str = "kernel.cu") -> tuple[bytes, str]:  # noqa: A001
    """Compile source for arch (sm_XY -> cubin, compute_XY -> PTX); returns (image, log)."""
    image, _, log = compile_with_ptx(source, arch, name)
    return image, log


def compile_with_ptx(source: str, arch: str, name: str = "kernel.cu") -> tuple[bytes, bytes, str]:
    """(image, PTX, log): a cubin compile also yields its compute_XY PTX, kept as the fallback
    the driver can JIT when the cubin does not load (Note [PTX fallback] in cuda.py)."""
    kind, cc, suffix = parse_arch(arch)
    archs = supported_archs()
    if cc not in archs:
        raise BackendError(f"NVRTC {'.'.join(map(str, version()))} cannot compile for {arch}; "
                           f"it supports sm_{', sm_'.join(map(str, archs))}")
    nvrtc = _bindings()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in OPTIONS)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _log(nvrtc, prog)
        if int(err) != 0:
            first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[:200])
            raise BackendError(f"NVRTC failed to compile {name} for {arch}: {first}", log)
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        _check(nvrtc, err, "nvrtcGetPTXSize")
        ptx = b" " * size
        (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
        _check(nvrtc, err, "nvrtcGetPTX")
        if kind != "sm":
            return ptx, ptx, log
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize")
        image = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, image)
        _check(nvrtc, err, "nvrtcGetCUBIN")
        return image, ptx, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if int(err) != 0 or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\0").decode(errors="replace")


def _check(nvrtc, err, what: str) -> None:
    if int(err) != 0:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise BackendError(f"{what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
