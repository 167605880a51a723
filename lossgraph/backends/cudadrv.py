"""CUDA driver glue for the cuda backend: load an image per device, launch on torch's stream.

Note [Contexts and streams]: torch runs every device in its primary context; a module is loaded
into the primary context of the device that runs it (multi-GPU: one module per device), and a
launch goes to `torch.cuda.current_stream(device)`, so it orders with the surrounding torch work
and is recorded by CUDA-graph capture. If another context is current on this thread, the
device's primary context is pushed for the launch and popped after it. Nothing here waits for
the GPU.
"""
from __future__ import annotations

import ctypes
import functools
import struct
import threading
from typing import Any, Sequence

import torch

from ..errors import BackendError

C_TYPES = {"ptr": ctypes.c_void_p, "int": ctypes.c_int, "uint": ctypes.c_uint,
           "i64": ctypes.c_longlong, "f64": ctypes.c_double}
SLOT = {"ptr": "Q", "int": "i4x", "uint": "I4x", "i64": "q", "f64": "d"}   # one 8-byte slot each


class Packer:
    """Note [Packed kernel arguments]: the kernel's void** argument array is built once per
    (function, argument kinds): one 8-byte slot per argument in a ctypes buffer and an array of
    the slots' addresses. A launch packs its values into the slots with one struct.pack_into
    and hands cuLaunchKernel the array's address, instead of cuda.bindings building a ctypes
    structure from (values, types) on every call. Packers are per thread (Module keeps them in
    a threading.local), so two threads never share a buffer between packing and launching."""

    def __init__(self, kinds: tuple):
        self.pack = struct.Struct("<" + "".join(SLOT[k] for k in kinds)).pack_into
        self.buf = ctypes.create_string_buffer(8 * max(1, len(kinds)))
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * max(1, len(kinds)))(*[base + 8 * i
                                                              for i in range(len(kinds))])
        self.address = ctypes.addressof(self.ptrs)


@functools.lru_cache(maxsize=None)
def ctypes_of(kinds: tuple) -> tuple:
    """The ctypes types of a kernel's parameter kinds (cached: a signature has few variants)."""
    return tuple(C_TYPES[k] for k in kinds)


@functools.lru_cache(maxsize=None)
def _bindings_driver():
    from cuda.bindings import driver
    return driver


def _driver():
    return _bindings_driver()


def _raw_stream(index: int) -> int:
    """The handle of torch's current stream on device `index` (one C call where torch has it)."""
    return torch.cuda.current_stream(index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


def check(result, what: str):
    """Unpack a cuda.bindings result tuple, raising BackendError on an error code."""
    err, *rest = result
    if int(err) != 0:
        raise BackendError(f"{what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else (rest or None)


def unavailable_reason() -> str | None:
    """Why the driver API cannot run kernels here, or None when it can."""
    try:
        _driver()
    except ImportError as e:
        return f"the cuda backend needs cuda-bindings ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch (torch.cuda.is_available() is False)"
    try:
        check(_driver().cuInit(0), "cuInit")
    except Exception as e:  # noqa: BLE001 - a missing libcuda raises cuda-pathfinder's error
        return f"the CUDA driver could not be initialized ({e})"
    return None


@functools.lru_cache(maxsize=None)
def driver_version() -> tuple[int, int]:
    """The driver's CUDA version, e.g. (12, 8)."""
    v = check(_driver().cuDriverGetVersion(), "cuDriverGetVersion")
    return v // 1000, (v % 1000) // 10


@functools.lru_cache(maxsize=None)
def primary_context(index: int):
    """The primary context of device `index` (the one torch uses), retained once."""
    drv = _driver()
    check(drv.cuInit(0), "cuInit")
    dev = check(drv.cuDeviceGet(index), "cuDeviceGet")
    return check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")


class _Current:
    """Makes the primary context of a device current for a block, if it is not already."""

    def __init__(self, index: int):
        self.ctx = primary_context(index)
        self.pushed = False

    def __enter__(self):
        drv = _driver()
        cur = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(cur) != int(self.ctx):
            check(drv.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
            self.pushed = True
        return self

    def __exit__(self, *exc):
        if self.pushed:
            check(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")


class Module:
    """A cubin (or PTX) loaded into one device's primary context; launches its functions."""

    def __init__(self, image: bytes, index: int):
        self.index = index
        self.device = torch.device("cuda", index)
        with _Current(index):
            self.module = check(_driver().cuModuleLoadData(image), "cuModuleLoadData")
        self._functions: dict[str, Any] = {}
        self._max_blocks: dict[tuple[str, int], int] = {}
        self._tls = threading.local()
        self._ctx = int(primary_context(index))
        self.sms = torch.cuda.get_device_properties(index).multi_processor_count

    def function(self, name: str):
        f = self._functions.get(name)
        if f is None:
            f = check(_driver().cuModuleGetFunction(self.module, name.encode()),
                      f"cuModuleGetFunction({name})")
            self._functions[name] = f
        return f

    def max_blocks(self, name: str, block: int) -> int:
        """Blocks of `block` threads that fill the device at full occupancy (fixed per device)."""
        key = (name, block)
        if key not in self._max_blocks:
            with _Current(self.index):
                per_sm = check(_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    self.function(name), block, 0), "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            self._max_blocks[key] = max(1, per_sm) * self.sms
        return self._max_blocks[key]

    def bind(self, specs: Sequence[tuple]) -> "Launches":
        """A callable that launches, in order, each (name, grid, block, kinds) of specs with one
        tuple of values per kernel (kinds: C_TYPES names); see Note [Packed kernel arguments]."""
        return Launches(self, specs)

    def launch(self, name: str, grid: int, block: int, values: Sequence, kinds: tuple) -> None:
        """Launch name<<<grid, block>>>(values) on torch's current stream of this device; kinds
        name the C type of each value (C_TYPES). Nothing waits for the GPU."""
        cache = self._tls.__dict__
        key = (name, grid, block, kinds)
        fire = cache.get(key)
        if fire is None:
            fire = cache[key] = self.bind([key])
        fire(values)


class Launches:
    """Kernels with fixed grids and argument layouts on one device, for one thread: calling it
    with all the kernels' values in one tuple packs them (one struct.pack_into) and launches the
    kernels in order on torch's current stream, pushing the device's primary context only when
    another context is current (Note [Contexts and streams])."""

    def __init__(self, mod: Module, specs: Sequence[tuple]):
        kinds = tuple(k for *_, ks in specs for k in ks)
        self.packer = Packer(kinds)
        self.pack, self.buf = self.packer.pack, self.packer.buf
        first, self.items = 0, []
        for name, grid, block, ks in specs:
            addr = self.packer.address + 8 * first   # this kernel's slice of the void** array
            self.items.append((mod.function(name), name, grid, block, addr))
            first += len(ks)
        self.index, self.ctx, self.drv = mod.index, mod._ctx, _driver()

    def __call__(self, values: Sequence) -> None:
        self.pack(self.buf, 0, *values)
        drv = self.drv
        if int(drv.cuCtxGetCurrent()[1]) != self.ctx:
            with _Current(self.index):
                return self._launch(drv)
        return self._launch(drv)

    def _launch(self, drv) -> None:
        stream = _raw_stream(self.index)
        for fn, name, grid, block, address in self.items:
            (err,) = drv.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, stream, address, 0)
            if err:
                raise BackendError(f"launching {name} failed: {getattr(err, 'name', err)}")
