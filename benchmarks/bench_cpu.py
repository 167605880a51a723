"""CPU benchmark: MMDetection-style eager, torch.compile of it, lossgraph torchscript and cpp.

Forward+backward time (median of interleaved repeats, one process), peak memory of one step
(a fresh subprocess per measurement, VmHWM growth) and first-call time. Prints a table and the
ratios; `--markdown` prints the README table. Two extra sections: the tiny per-call case
(FocalLoss 8 x 80 on cpp against autograd's floor: a trivial autograd.Function's forward and
backward on the same tensors) and a size sweep (FocalLoss 1k...1M rows x 80 on cpp, ns per
element, median and p90, next to a plain copy of the gradient's bytes into a reused buffer).

    python benchmarks/bench_cpu.py                 # time every case, tiny call and sweep
    python benchmarks/bench_cpu.py --threads 1     # the same on one thread
    python benchmarks/bench_cpu.py --quick         # fewer repeats, cases and sizes
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
    if name == "focal_custom_v3det":
        n, c = 1024, 13_204
        pred = torch.randn(n, c, generator=g) * 2
        labels = torch.randint(0, c + 1, (n,), generator=g)
        kw = dict(weight=torch.rand(n, generator=g), avg_factor=float(n // 4))
        return dict(type="FocalCustomLoss", num_classes=c), eager.focal_loss, pred, (labels,), kw
    if name.startswith("focal_"):
        n = {"focal_100k": 100_000, "focal_44k": 44_800, "focal_403k": 403_000}[name]
        pred = torch.randn(n, 80, generator=g) * 2
        labels = torch.randint(0, 81, (n,), generator=g)
        kw = dict(weight=torch.rand(n, generator=g), avg_factor=float(n // 100))
        return dict(type="FocalLoss"), eager.focal_loss, pred, (labels,), kw
    if name == "seesaw_4k":
        n, c = 4096, 1203
        pred = torch.randn(n, c + 2, generator=g) * 2
        labels = torch.where(torch.rand(n, generator=g) < 0.25,
                             torch.randint(0, c, (n,), generator=g), torch.full((n,), c))
        return dict(type="SeesawLoss", num_classes=c), eager.SeesawLoss(c), pred, \
            (labels, torch.ones(n)), dict(avg_factor=float(n))
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
        n = {"ce_1k": 1024, "ce_100k": 100_000, "ce_200k": 200_000}[name]
        pred = torch.randn(n, 81, generator=g) * 2
        labels = torch.randint(0, 81, (n,), generator=g)
        return dict(type="CrossEntropyLoss"), eager.cross_entropy, pred, (labels,), \
            dict(weight=torch.rand(n, generator=g), avg_factor=float(n))
    if name == "giou_100k":
        pred, target = _boxes(100_000, g), _boxes(100_000, g)
        return dict(type="GIoULoss"), eager.giou_loss, pred, (target,), \
            dict(weight=torch.rand(100_000, generator=g), avg_factor=1000.0)
    if name.startswith("dfl_"):
        n = {"dfl_40k": 40_000, "dfl_160k": 160_000}[name]
        pred = torch.randn(n, 17, generator=g)
        target = torch.rand(n, generator=g) * 15.99
        return dict(type="DistributionFocalLoss"), eager.distribution_focal_loss, pred, (target,), \
            dict(weight=torch.rand(n, generator=g), avg_factor=4.0)
    raise KeyError(name)


CASES = ("focal_100k", "focal_44k", "focal_403k", "focal_custom_v3det", "l1_200k", "gaussian_focal",
         "ce_1k", "ce_100k", "ce_200k", "giou_100k", "dfl_40k", "dfl_160k", "seesaw_4k")
QUICK_CASES = ("focal_100k", "focal_403k", "ce_100k", "dfl_160k", "seesaw_4k")
ELEMENTWISE = ("focal_100k", "focal_44k", "focal_403k", "focal_custom_v3det", "gaussian_focal")


def implementation(impl: str, config: dict, fn):
    if impl == "eager":
        return fn
    if impl == "compile":
        return torch.compile(fn)
    return lg.compile(config, backend=impl)


def step(f, pred, args, kw):
    """One fwd+bwd, ending with the gradient freed.

    Note [Who pays for the free]: dropping a large gradient costs time (an munmap of the
    torch-allocated N x C tensor, page by page; a pooled block just goes back to the pool). The
    step frees the gradient it made itself, so each implementation pays for its own memory and
    not for the previous one's, whichever order the interleaved loop runs them in."""
    out = f(pred, *args, **kw)
    (sum(out.values()) if isinstance(out, dict) else out).backward()
    pred.grad = None


def time_case(name: str, repeats: int, impls=IMPLS) -> dict[str, float]:
    """Median fwd+bwd milliseconds of each implementation, measured interleaved."""
    config, fn, pred, args, kw = make_case(name)
    if config["type"] not in lg.known_losses():
        return {}
    pred.requires_grad_(True)
    fns = {i: implementation(i, config, fn) for i in impls}
    for f in fns.values():
        step(f, pred, args, kw)
        step(f, pred, args, kw)
    times: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(repeats):
        for i, f in fns.items():
            t = time.perf_counter()
            step(f, pred, args, kw)
            times[i].append((time.perf_counter() - t) * 1e3)
    return {i: statistics.median(t) for i, t in times.items()}


class _Floor(torch.autograd.Function):
    """autograd's floor: a Function whose forward and backward do no work."""

    @staticmethod
    def forward(ctx, pred, labels, weight, grad):
        ctx.grad = grad
        return pred.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return ctx.grad, None, None, None


def time_tiny(repeats: int) -> dict[str, float]:
    """FocalLoss 8 x 80 fwd+bwd on cpp and autograd's floor on the same tensors, microseconds."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(8, 80, generator=g).requires_grad_(True)
    labels, weight = torch.randint(0, 81, (8,), generator=g), torch.rand(8, generator=g)
    loss, grad = lg.compile(dict(type="FocalLoss"), backend="cpp"), torch.zeros(8, 80)
    fns = {"cpp": lambda: loss(pred, labels, weight, avg_factor=4.0),
           "floor": lambda: _Floor.apply(pred, labels, weight, grad)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 20):
        for k, f in fns.items():
            pred.grad = None
            t = time.perf_counter()
            f().backward()
            if r >= 20:
                times[k].append((time.perf_counter() - t) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


SWEEP = (1_000, 10_000, 100_000, 300_000, 1_000_000)


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def sweep(sizes, repeats: int) -> list[dict]:
    """FocalLoss N x 80 fwd+bwd on cpp, ns per element (median, p90), and a plain copy of the
    gradient's bytes into a reused buffer for scale."""
    loss, rows = lg.compile(dict(type="FocalLoss"), backend="cpp"), []
    for n in sizes:
        _, _, pred, args, kw = make_case("focal_100k") if n == 100_000 else (None, None, *_focal(n))
        pred.requires_grad_(True)
        dst, reps = torch.empty_like(pred), max(repeats, min(200, 20_000_000 // n))
        ts, cs = [], []
        for r in range(reps + 3):
            t = time.perf_counter()
            step(loss, pred, args, kw)
            t1 = time.perf_counter()
            dst.copy_(pred.detach())
            t2 = time.perf_counter()
            if r >= 3:
                ts.append(t1 - t)
                cs.append(t2 - t1)
        e = pred.numel() / 1e9
        rows.append({"rows": n, "median_ns": statistics.median(ts) / e, "p90_ns": _p90(ts) / e,
                     "copy_ns": statistics.median(cs) / e})
        print(f"sweep {n:>9,d} x 80: {rows[-1]['median_ns']:.2f} ns/elem median, "
              f"{rows[-1]['p90_ns']:.2f} p90 (copy {rows[-1]['copy_ns']:.2f})", flush=True)
    return rows


def _focal(n: int):
    g = torch.Generator().manual_seed(n)
    pred = torch.randn(n, 80, generator=g) * 2
    labels = torch.randint(0, 81, (n,), generator=g)
    return pred, (labels,), dict(weight=torch.rand(n, generator=g), avg_factor=float(max(n // 100, 1)))


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
    ap.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads")
    ap.add_argument("--quick", action="store_true",
                    help=f"3 repeats, cases {', '.join(QUICK_CASES)}, sweep to 300k rows")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny per-call case")
    ap.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = list(QUICK_CASES) if a.quick and a.cases == list(CASES) else a.cases
    repeats = 3 if a.quick else a.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lossgraph {lg.__version__}")
    tiny = None if a.no_tiny else time_tiny(50 if a.quick else 400)
    if tiny:
        print(f"tiny FocalLoss 8x80 fwd+bwd: cpp {tiny['cpp']:.1f} us, autograd floor "
              f"{tiny['floor']:.1f} us, difference {tiny['cpp'] - tiny['floor']:.1f} us", flush=True)
    sweep_rows = [] if a.no_sweep else sweep(SWEEP[:4] if a.quick else SWEEP, repeats)
    rows = []
    for name in cases:
        t = time_case(name, repeats)
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
        print(markdown_extra(tiny, sweep_rows))


def markdown_extra(tiny: dict | None, sweep_rows: list[dict]) -> str:
    lines = []
    if tiny:
        lines += ["", "| tiny call (FocalLoss 8×80 fwd+bwd) | µs |", "|---|---:|",
                  f"| lossgraph cpp | {tiny['cpp']:.1f} |", f"| autograd floor | {tiny['floor']:.1f} |"]
    if sweep_rows:
        lines += ["", "| FocalLoss rows × 80, cpp | ns/elem median | ns/elem p90 | copy ns/elem |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['rows']:,} | {r['median_ns']:.2f} | {r['p90_ns']:.2f} | {r['copy_ns']:.2f} |"
                  for r in sweep_rows]
    return "\n".join(lines)


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
