"""CPU benchmark: MMDetection-style eager, torch.compile of it, lossgraph torchscript and cpp.

Forward+backward time (median of interleaved repeats, one process), peak memory of one step
(a fresh subprocess per measurement, VmHWM growth) and first-call time. Prints a table and the
ratios; `--markdown` prints the README table.

    python benchmarks/bench_cpu.py                 # time every case
    python benchmarks/bench_cpu.py --memory --first-call --markdown
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eager  # noqa: E402

import lossgraph as lg  # noqa: E402

IMPLS = ("eager", "compile", "torchscript", "cpp")


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    return torch.cat([xy, xy + wh], 1)


def make_case(name: str):
    """(config, eager fn, pred, positional args, keyword args) of one benchmark case."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("focal"):
        n = {"focal_100k": 100_000, "focal_44k": 44_800}[name]
        pred = torch.randn(n, 80, generator=g) * 2
        labels = torch.randint(0, 81, (n,), generator=g)
        kw = dict(weight=torch.rand(n, generator=g), avg_factor=float(n // 100))
        return dict(type="FocalLoss"), eager.focal_loss, pred, (labels,), kw
    if name == "l1_200k":
        pred, target = torch.randn(200_000, 4, generator=g), torch.randn(200_000, 4, generator=g)
        w = (torch.rand(200_000, 1, generator=g) > 0.7).float().expand(-1, 4).contiguous()
        return dict(type="L1Loss"), eager.l1_loss, pred, (target,), dict(weight=w, avg_factor=5000.0)
    if name == "gaussian_focal":
        pred = torch.rand(8, 80, 128, 128, generator=g).clamp(1e-4, 1 - 1e-4)
        target = torch.rand(8, 80, 128, 128, generator=g) ** 8
        target[torch.rand(target.shape, generator=g) > 0.999] = 1.0
        return dict(type="GaussianFocalLoss"), eager.gaussian_focal_loss, pred, (target,), \
            dict(avg_factor=500.0)
    if name.startswith("ce_"):
        n = {"ce_1k": 1024, "ce_200k": 200_000}[name]
        pred = torch.randn(n, 81, generator=g) * 2
        labels = torch.randint(0, 81, (n,), generator=g)
        return dict(type="CrossEntropyLoss"), eager.cross_entropy, pred, (labels,), \
            dict(weight=torch.rand(n, generator=g), avg_factor=float(n))
    if name == "giou_100k":
        pred, target = _boxes(100_000, g), _boxes(100_000, g)
        return dict(type="GIoULoss"), eager.giou_loss, pred, (target,), \
            dict(weight=torch.rand(100_000, generator=g), avg_factor=1000.0)
    if name == "dfl_40k":
        pred = torch.randn(40_000, 17, generator=g)
        target = torch.rand(40_000, generator=g) * 15.99
        return dict(type="DistributionFocalLoss"), eager.distribution_focal_loss, pred, (target,), \
            dict(weight=torch.rand(40_000, generator=g), avg_factor=4.0)
    raise KeyError(name)


CASES = ("focal_100k", "focal_44k", "l1_200k", "gaussian_focal", "ce_1k", "ce_200k", "giou_100k",
         "dfl_40k")


def implementation(impl: str, config: dict, fn):
    if impl == "eager":
        return fn
    if impl == "compile":
        return torch.compile(fn)
    return lg.compile(config, backend=impl)


def step(f, pred, args, kw):
    pred.grad = None
    f(pred, *args, **kw).backward()


def time_case(name: str, repeats: int) -> dict[str, float]:
    """Median fwd+bwd milliseconds of each implementation, measured interleaved."""
    config, fn, pred, args, kw = make_case(name)
    if config["type"] not in lg.known_losses():
        return {}
    pred.requires_grad_(True)
    fns = {i: implementation(i, config, fn) for i in IMPLS}
    for f in fns.values():
        step(f, pred, args, kw)
        step(f, pred, args, kw)
    times: dict[str, list[float]] = {i: [] for i in IMPLS}
    for _ in range(repeats):
        for i, f in fns.items():
            t = time.perf_counter()
            step(f, pred, args, kw)
            times[i].append((time.perf_counter() - t) * 1e3)
    return {i: statistics.median(t) for i, t in times.items()}


def _hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(name: str, impl: str) -> None:
    """(subprocess) Peak RSS growth of one fwd+bwd step after a warm-up step, in MB."""
    config, fn, pred, args, kw = make_case(name)
    pred.requires_grad_(True)
    f = implementation(impl, config, fn)
    step(f, pred, args, kw)
    pred.grad = None
    base = _rss_kb()
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak to the current RSS
    step(f, pred, args, kw)
    print(f"PEAK_MB {(_hwm_kb() - base) / 1024:.1f}")


def first_call_child(name: str, impl: str) -> None:
    """(subprocess, empty caches) Seconds from compile to the end of the first fwd+bwd."""
    config, fn, pred, args, kw = make_case(name)
    pred.requires_grad_(True)
    t = time.perf_counter()
    step(implementation(impl, config, fn), pred, args, kw)
    print(f"FIRST_S {time.perf_counter() - t:.3f}")


def child(flag: str, name: str, impl: str, env: dict) -> float:
    out = subprocess.run([sys.executable, __file__, flag, name, impl], capture_output=True,
                         text=True, env={**os.environ, **env}).stdout
    m = re.search(r"(PEAK_MB|FIRST_S) ([\d.]+)", out)
    return float(m.group(2)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per step")
    ap.add_argument("--first-call", action="store_true", help="also measure first-call time")
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lossgraph {lg.__version__}")
    rows = []
    for name in a.cases:
        t = time_case(name, a.repeats)
        if not t:
            print(f"{name}: loss not available in this build, skipped")
            continue
        row = {"case": name, **{f"{i}_ms": t[i] for i in IMPLS}}
        if a.memory:
            # Note [Measuring peak memory]: with an explicit mmap threshold glibc returns every
            # large block to the OS when it is freed, so the resident set tracks live tensors
            mem_env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
            row.update({f"{i}_mb": child("--mem-child", name, i, mem_env) for i in IMPLS})
        if a.first_call:
            with tempfile.TemporaryDirectory() as d:
                env = {"LOSSGRAPH_CACHE_DIR": d, "TORCHINDUCTOR_CACHE_DIR": d}
                row["compile_first_s"] = child("--first-child", name, "compile", env)
                row["cpp_first_s"] = child("--first-child", name, "cpp", env)
                row["cpp_warm_s"] = child("--first-child", name, "cpp", env)
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
              + f"  cpp/compile={row['cpp_ms'] / row['compile_ms']:.2f}"
              + f"  torchscript/eager={row['torchscript_ms'] / row['eager_ms']:.2f}", flush=True)
    if a.markdown:
        print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    head = ("| case | eager ms | torch.compile ms | lossgraph torchscript ms | lossgraph cpp ms | "
            "cpp / compile |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['eager_ms']:.1f} | {r['compile_ms']:.1f} | "
                     f"{r['torchscript_ms']:.1f} | {r['cpp_ms']:.1f} | "
                     f"{r['cpp_ms'] / r['compile_ms']:.2f} |")
    if rows and "eager_mb" in rows[0]:
        lines += ["", "| case | peak MB eager | compile | torchscript | cpp |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['eager_mb']:.0f} | {r['compile_mb']:.0f} | "
                  f"{r['torchscript_mb']:.0f} | {r['cpp_mb']:.0f} |" for r in rows]
    if rows and "cpp_first_s" in rows[0]:
        lines += ["", "| case | first call torch.compile s | cpp cold s | cpp from disk cache s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['compile_first_s']:.1f} | {r['cpp_first_s']:.2f} | "
                  f"{r['cpp_warm_s']:.2f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--mem-child":
        memory_child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--first-child":
        warnings.simplefilter("ignore")
        first_call_child(sys.argv[2], sys.argv[3])
    else:
        main()
