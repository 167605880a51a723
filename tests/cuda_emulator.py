"""Run lossgraph's generated CUDA kernels on the host, through the small emulator in tests/emu.

The generated .cu source is compiled by g++ with tests/emu/cuda_emu.h forced in front of it, plus
one wrapper per kernel that unpacks a void** parameter array exactly as cuLaunchKernel does. An
`Emulator` has the launcher interface of cudadrv.Module (max_blocks, launch), so the backend's
own launch planning (cuda.fused, cuda.scale_grad) drives it with CPU tensors' pointers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lossgraph.backends.cudadrv import C_TYPES

EMU = Path(__file__).resolve().parent / "emu"
SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\(\w+\) (\w+)\((.*?)\)\s*\{',
                       re.S)
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas"]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def _build_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"lossgraph-cuda-emu-{os.getuid()}"
    d.mkdir(exist_ok=True)
    return d


def _build(text: str, extra: list[str]) -> Path:
    """Compile C++ text into a shared library named by its hash (reused across runs)."""
    key = hashlib.sha256((text + " ".join(FLAGS + extra)).encode()).hexdigest()[:20]
    so = _build_dir() / f"{key}.so"
    if not so.exists():
        src = so.with_suffix(".cpp")
        src.write_text(text)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([compiler(), *FLAGS, *extra, str(src), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, so)
    return so


@functools.lru_cache(maxsize=None)
def runtime() -> ctypes.CDLL:
    """The emulator runtime, loaded globally so kernel libraries resolve its symbols."""
    lib = ctypes.CDLL(str(_build((EMU / "cuda_emu.cpp").read_text(), [])), mode=ctypes.RTLD_GLOBAL)
    lib.lg_emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint,
                                  ctypes.POINTER(ctypes.c_void_p)]
    lib.lg_emu_launch.restype = None
    return lib


def wrappers(source: str) -> str:
    """extern "C" void emu_<kernel>(void** p): call <kernel> with *(type*)p[i] per parameter."""
    out = []
    for name, params in SIGNATURE.findall(source):
        args = []
        for i, p in enumerate(x.strip() for x in params.split(",") if x.strip()):
            ctype = re.match(r"^(.*?)\s*\w+$", p.replace("__restrict__", "")).group(1).strip()
            args.append(f"*({ctype}*)p[{i}]")
        out.append(f'extern "C" void emu_{name}(void** p) {{ {name}({", ".join(args)}); }}')
    return "\n".join(out) + "\n"


class Emulator:
    """Runs the kernels of one CUDA source on the host; the launcher interface of cudadrv.Module."""

    def __init__(self, source: str, max_blocks: int = 3):
        runtime()
        text = source + "\n" + wrappers(source)
        include = ["-include", str(EMU / "cuda_emu.h"), "-x", "c++"]
        self.lib = ctypes.CDLL(str(_build(text, include)))
        self.blocks = max_blocks
        self.launches: list[tuple[str, int, int]] = []

    def __call__(self, device):   # CudaKernel.launcher(device) -> launcher
        return self

    def max_blocks(self, name: str, block: int) -> int:
        return self.blocks

    def bind(self, specs):
        """cudadrv.Module.bind: launch each (name, grid, block, kinds) in order, their values
        concatenated in one sequence."""
        def fire(values):
            at = 0
            for name, grid, block, kinds in specs:
                self.launch(name, grid, block, values[at:at + len(kinds)], kinds)
                at += len(kinds)
        return fire

    def launch(self, name: str, grid: int, block: int, values, kinds) -> None:
        assert len(kinds) == len(values), (name, kinds, values)
        values = [C_TYPES[t](v) for t, v in zip(kinds, values)]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        fn = ctypes.cast(getattr(self.lib, f"emu_{name}"), ctypes.c_void_p)
        self.launches.append((name, grid, block))
        runtime().lg_emu_launch(fn, grid, block, params)
