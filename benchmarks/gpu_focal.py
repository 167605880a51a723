"""GPU benchmark: RetinaNet-size FocalLoss forward+backward (403,000 x 80 logits, labels, a (N,)
weight and a device-tensor avg_factor) for MMDetection-style eager code, torch.compile of it, and
lossgraph's cuda backend (also replayed as a CUDA graph, which shows the kernels without Python).

Times are medians of interleaved repeats (each repeat: `--steps` back-to-back steps between two
CUDA events, divided by the steps). Achieved bandwidth counts the bytes that must move: logits
read + gradient written + labels + weights; it is compared with the device-to-device copy
bandwidth measured here (a torch copy of a 1 GiB tensor: bytes read + bytes written).

    python benchmarks/gpu_focal.py                       # float32
    python benchmarks/gpu_focal.py --dtype float16 --repeats 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lossgraph as lg  # noqa: E402
from eager import focal_loss as py_sigmoid_focal_loss  # noqa: E402  (MMDetection's Python path)

def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), median of 20 copies of 1 GiB."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def make_inputs(n: int, c: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, c, generator=g, device=device) * 2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, c + 1, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < 0.9] = c       # mostly background
    weight = torch.rand(n, generator=g, device=device)
    avg = (labels < c).sum().float().clamp(min=1.0)                   # num_pos, on the device
    return x, labels, weight, avg


def step_fn(fn, x, labels, weight, avg):
    def step():
        x.grad = None
        fn(x, labels, weight, avg).backward()
    return step


def graph_step(fn, x, labels, weight, avg):
    """The same step captured once as a CUDA graph; replaying it runs only the GPU work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.grad = None
            fn(x, labels, weight, avg).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x, labels, weight, avg).backward()
    return graph.replay


def timed(step, steps: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        step()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / steps


def peak_memory(step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=403_000)
    p.add_argument("--c", type=int, default=80)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_focal.py: no CUDA device here (torch.cuda.is_available() is False); nothing "
              "to measure.")
        return 0
    from lossgraph.backends import cuda
    if not cuda.available("cuda"):
        print(f"gpu_focal.py: the lossgraph cuda backend is unavailable: "
              f"{cuda.unavailable_reason('cuda')}")
        return 0
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    x, labels, weight, avg = make_inputs(args.n, args.c, dtype, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # no silent fallback to another backend
        ours = lg.compile(dict(type="FocalLoss", gamma=2.0, alpha=0.25), backend="cuda")
        ours(x, labels, weight=weight, avg_factor=avg)
    lossgraph_fn = lambda x, y, w, a: ours(x, y, weight=w, avg_factor=a)  # noqa: E731
    compiled = torch.compile(py_sigmoid_focal_loss)
    impls = {"eager (mmdet-style)": step_fn(py_sigmoid_focal_loss, x, labels, weight, avg),
             "torch.compile": step_fn(compiled, x, labels, weight, avg),
             "lossgraph cuda": step_fn(lossgraph_fn, x, labels, weight, avg)}
    check = {}
    for name, fn in (("eager (mmdet-style)", py_sigmoid_focal_loss), ("torch.compile", compiled),
                     ("lossgraph cuda", lossgraph_fn)):
        x.grad = None
        out = fn(x, labels, weight, avg)
        out.backward()
        check[name] = (out.detach().double(), x.grad.double().clone())
    try:
        impls["lossgraph cuda (CUDA graph)"] = graph_step(lossgraph_fn, x, labels, weight, avg)
    except Exception as e:  # noqa: BLE001 - report and go on without that row
        print(f"(CUDA-graph capture of lossgraph failed: {type(e).__name__}: {e})")
    memory = {name: peak_memory(step) for name, step in impls.items()}
    for step in impls.values():
        timed(step, 3)
    samples = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, step in impls.items():
            samples[name].append(timed(step, args.steps))
    elt = x.element_size()
    moved = args.n * args.c * elt * 2 + labels.numel() * labels.element_size() + \
        weight.numel() * weight.element_size()
    copy = copy_bandwidth(device)
    ref_out, ref_grad = check["eager (mmdet-style)"]
    print(f"FocalLoss forward+backward, {args.n} x {args.c} {args.dtype} logits, labels, "
          f"(N,) weight, device avg_factor on {torch.cuda.get_device_name()}")
    print(f"bytes that must move: {moved / 1e6:.1f} MB; device copy bandwidth {copy:.0f} GB/s "
          f"(floor {moved / copy / 1e3:.1f} us)")
    print(f"{'implementation':30s} {'median us':>10s} {'GB/s':>8s} {'% floor':>8s} "
          f"{'peak MiB':>9s} {'vs compile':>10s}")
    base = statistics.median(samples["torch.compile"])
    for name, ts in samples.items():
        t = statistics.median(ts)
        gbs = moved / t / 1e9
        print(f"{name:30s} {t * 1e6:10.1f} {gbs:8.0f} {100 * gbs / copy:7.1f}% "
              f"{memory[name]:9.1f} {base / t:9.2f}x")
    for name, (out, grad) in check.items():
        rel = (out - ref_out).abs().item() / max(ref_out.abs().item(), 1e-30)
        grel = ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30)).item()
        print(f"  {name}: loss {out.item():.6f} (rel diff {rel:.1e}), grad max rel diff {grel:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
