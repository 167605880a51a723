"""Python work per call on the CUDA launch path, measured without a GPU (stubbed driver).

    python benchmarks/cuda_launch_path.py [--calls 300]

Note [Measuring the launch path]: lg.compile(FocalLoss, backend='cuda') is called on CPU tensors
with the driver replaced by a stub whose cuLaunchKernel returns at once (the cuda.bindings
result tuple), and torch's device queries by constants; the kernel image is compiled by NVRTC as
usual. Everything from `loss(...)` up to cuLaunchKernel is then the real code. Three counts per
forward + backward (loss.backward() with grad_output 1, a 1000 x 80 pred, labels, a row weight,
a tensor avg_factor):
- bytecodes: Python bytecode instructions executed (sys.settrace with f_trace_opcodes), over all
  Python code on the path (lossgraph, torch's Python layers);
- calls: Python and C function calls (sys.setprofile 'call' and 'c_call' events);
- backend bytecodes and calls: the part executed in (calls made from, or into, functions of)
  lossgraph/backends/cuda.py and cudadrv.py: the backend's share, from cuda.run to
  cuLaunchKernel (the generic runtime path in runtime.py/inputs.py is not the backend's);
- us: median wall time per call (noisy on a shared machine; the counts are exact).
perf's instruction counter is not available in this container, so bytecodes stand in for
x86 instructions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lossgraph as lg  # noqa: E402
from lossgraph.backends import cuda, cudadrv  # noqa: E402


class StubDriver:
    """cuda.bindings.driver with every call answered at once (contexts and functions are ints)."""

    CUstream = int

    def __getattr__(self, name):
        table = {"cuDeviceGet": lambda i: (0, i), "cuDevicePrimaryCtxRetain": lambda d: (0, 7),
                 "cuCtxGetCurrent": lambda: (0, 7), "cuModuleLoadData": lambda im: (0, 1),
                 "cuModuleGetFunction": lambda m, n: (0, 2),
                 "cuOccupancyMaxActiveBlocksPerMultiprocessor": lambda f, b, s: (0, 8)}
        fn = table.get(name, lambda *a: (0,))
        setattr(self, name, fn)
        return fn


def stub_gpu() -> None:
    """Route the cuda backend to the stub driver for CPU tensors."""
    drv = StubDriver()
    cudadrv._driver = lambda: drv
    cudadrv.primary_context.cache_clear()
    cuda.unavailable_reason = lambda device="cuda": None
    cuda.device_target = lambda index=None: "sm_90"
    torch.cuda.get_device_properties = lambda i: SimpleNamespace(multi_processor_count=132)
    torch.cuda.current_device = lambda: 0
    torch.cuda.current_stream = lambda d=None: SimpleNamespace(cuda_stream=0)
    if hasattr(cudadrv, "_raw_stream"):
        cudadrv._raw_stream = lambda index: 0
    orig = cuda.CudaKernel.launcher
    cuda.CudaKernel.launcher = lambda self, device: orig(self, torch.device("cuda", 0))


def one_call(loss, x, y, w, avg):
    p = x.requires_grad_(True)
    loss(p, y, weight=w, avg_factor=avg).backward()
    p.grad = None


def count(fn, *args) -> tuple[int, int, int, int]:
    """(bytecodes, calls, backend bytecodes, backend calls) of one fn(*args)."""
    ops = [0, 0, 0, 0]
    backend = ("backends/cuda.py", "backends/cudadrv.py")

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            ops[0] += 1
            if frame.f_code.co_filename.endswith(backend):
                ops[2] += 1
        return trace

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            ops[1] += 1
            if frame.f_code.co_filename.endswith(backend):
                ops[3] += 1
    sys.settrace(trace)
    sys.setprofile(prof)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return ops[0], ops[1], ops[2], ops[3]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    stub_gpu()
    loss = lg.compile(dict(type="FocalLoss"), backend="cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 80, generator=g)
    y = torch.randint(0, 81, (1000,), generator=g)
    w = torch.rand(1000, generator=g)
    avg = torch.tensor(25.0)
    for _ in range(20):
        one_call(loss, x, y, w, avg)
    assert loss.compiler.backend_for("cpu") == "cuda"
    ops, calls, back, back_calls = count(one_call, loss, x, y, w, avg)
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        one_call(loss, x, y, w, avg)
        times.append(time.perf_counter() - t)
    print(f"per forward+backward: {ops} bytecodes, {calls} calls in all; in the cuda backend "
          f"(cuda.py, cudadrv.py): {back} bytecodes, {back_calls} calls; "
          f"{statistics.median(times) * 1e6:.1f} us median of {args.calls}")


if __name__ == "__main__":
    main()
