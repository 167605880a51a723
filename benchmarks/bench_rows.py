"""Row-loss benchmark: lossgraph cpp against torch.compile of an MMDetection-style eager module.

Forward+backward milliseconds, medians of interleaved repeats in one process, at 1 and 2 threads
(torch.set_num_threads; the cpp kernel takes the same count). Prints each median and the ratio
cpp / compile (the issue's measure; < 1 is faster), in wall time and in process CPU time (the
fairer measure on a loaded machine; at 1 thread it is the kernel's own cost). Softmax CE, DFL, Seesaw at three shares of
positive rows, GaussianFocal.

    python benchmarks/bench_rows.py                     # every case, 1 and 2 threads
    python benchmarks/bench_rows.py seesaw_25 --threads 1 --repeats 15
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eager  # noqa: E402
import bench_cpu  # noqa: E402
from bench_cpu import step  # noqa: E402  (Note [Who pays for the free])

import lossgraph as lg  # noqa: E402

SEESAW_C = 1203


class SeesawEager:
    """MMDetection's SeesawLoss forward (class part on positive rows + objectness CE), eager.

    The count update uses bincount instead of MMDetection's Python loop over labels.unique():
    the loop would dominate the eager time and say nothing about the kernels."""

    def __init__(self, num_classes=SEESAW_C, p=0.8, q=2.0, eps=1e-2):
        self.c, self.p, self.q, self.eps = num_classes, p, q, eps
        self.cum = torch.zeros(num_classes + 1)

    def classes(self, z, y, w, avg_factor):
        cum = self.cum[:self.c].clamp(min=1)
        onehot = F.one_hot(y, self.c)
        weights = z.new_ones(onehot.size())
        ratio = cum[None, :] / cum[:, None]             # MMDetection builds C x C per call
        index = (ratio < 1.0).float()
        weights = weights * (ratio.pow(self.p) * index + (1 - index))[y, :]
        scores = F.softmax(z.detach(), dim=1)
        self_scores = scores[torch.arange(len(scores)), y]
        m = scores / self_scores[:, None].clamp(min=self.eps)
        index = (m > 1.0).float()
        weights = weights * (m.pow(self.q) * index + (1 - index))
        z = z + weights.log() * (1 - onehot)
        loss = F.cross_entropy(z, y, reduction="none")
        return eager.weight_reduce(loss, w, "mean", avg_factor)

    def __call__(self, cls_score, labels, label_weights=None, avg_factor=None):
        weight = label_weights
        with torch.no_grad():
            self.cum += torch.bincount(labels, minlength=self.c + 1).float()
        pos = labels < self.c
        if bool(pos.any()):
            classes = self.classes(cls_score[pos][:, :self.c], labels[pos], weight[pos], avg_factor)
        else:
            classes = cls_score[pos].sum()
        obj = F.cross_entropy(cls_score[:, self.c:], (labels == self.c).long(), reduction="none")
        return classes + eager.weight_reduce(obj, weight, "mean", avg_factor)


def make_case(name: str):
    """(config, eager fn, pred, positional args, keyword args) of one case."""
    g = torch.Generator().manual_seed(0)
    if name == "ce_100k":
        n = 100_000
        pred = torch.randn(n, 81, generator=g) * 2
        labels = torch.randint(0, 81, (n,), generator=g)
        return dict(type="CrossEntropyLoss"), eager.cross_entropy, pred, (labels,), \
            dict(weight=torch.rand(n, generator=g), avg_factor=float(n))
    if name.startswith("dfl_"):
        n = {"dfl_40k": 40_000, "dfl_160k": 160_000}[name]
        pred = torch.randn(n, 17, generator=g)
        target = torch.rand(n, generator=g) * 15.99
        return dict(type="DistributionFocalLoss"), eager.distribution_focal_loss, pred, \
            (target,), dict(weight=torch.rand(n, generator=g), avg_factor=4.0)
    if name.startswith("seesaw_"):
        n, share = 4096, int(name.split("_")[1]) / 100
        pred = torch.randn(n, SEESAW_C + 2, generator=g) * 2
        labels = torch.randint(0, SEESAW_C, (n,), generator=g)
        labels[torch.rand(n, generator=g) >= share] = SEESAW_C
        cfg = dict(type="SeesawLoss", num_classes=SEESAW_C, return_dict=False)
        return cfg, SeesawEager(), pred, (labels,), dict(label_weights=torch.ones(n))
    if name == "gaussian_focal":
        return bench_cpu.make_case(name)
    raise KeyError(name)


CASES = ("ce_100k", "dfl_40k", "dfl_160k", "seesaw_0", "seesaw_25", "seesaw_100",
         "gaussian_focal")


def time_case(name: str, threads: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Median fwd+bwd ms of compile and cpp per thread count, interleaved."""
    config, fn, pred, args, kw = make_case(name)
    pred.requires_grad_(True)
    fns = {"compile": torch.compile(fn), "cpp": lg.compile(config, backend="cpp")}
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        for f in fns.values():
            step(f, pred, args, kw)
            step(f, pred, args, kw)
        times: dict[str, list[float]] = {i: [] for i in fns}
        cpu: dict[str, list[float]] = {i: [] for i in fns}
        for _ in range(repeats):
            for i, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step(f, pred, args, kw)
                times[i].append((time.perf_counter() - t0) * 1e3)
                cpu[i].append((time.process_time() - c0) * 1e3)
        out[t] = {**{i: statistics.median(v) for i, v in times.items()},
                  **{f"{i}_cpu": statistics.median(v) for i, v in cpu.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=11)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)   # Seesaw's graph breaks
    print(f"torch {torch.__version__}, lossgraph {lg.__version__}, threads {a.threads}")
    for name in a.cases:
        res = time_case(name, a.threads, a.repeats)
        for t, r in res.items():
            print(f"{name:15s} threads={t} compile_ms={r['compile']:.2f} cpp_ms={r['cpp']:.2f} "
                  f"cpp/compile={r['cpp'] / r['compile']:.2f}  (process CPU time: "
                  f"{r['compile_cpu']:.2f} / {r['cpp_cpu']:.2f} ms, "
                  f"{r['cpp_cpu'] / r['compile_cpu']:.2f})", flush=True)


if __name__ == "__main__":
    main()
