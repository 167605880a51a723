"""Forward+backward of MMDetection-style eager code vs lossgraph's cpp backend for the call shapes
added by the `losses` work: HTC's semantic-head softmax CE over (N, C, H, W) and QDTrack's
MultiPosCrossEntropyLoss. Interleaved repeats in one process; prints medians and ratios.

    python benchmarks/bench_new_losses.py [--repeats 11]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import lossgraph as lg


def eager_ce(x, y):
    """mmdet cross_entropy: F.cross_entropy(reduction='none', ignore_index=255), mean, * 0.2."""
    return 0.2 * F.cross_entropy(x, y, ignore_index=255, reduction="none").mean()


def eager_multipos(pred, label):
    """mmdet multi_pos_cross_entropy: the (N, K*K) pair matrix, a 0 column, logsumexp, mean."""
    pos, neg = label >= 1, label == 0
    pp, pn = pred * pos.float(), pred * neg.float()
    pp[neg] = pp[neg] + float("inf")
    pn[pos] = pn[pos] + float("-inf")
    k = pred.shape[1]
    x = F.pad(pn.repeat(1, k) - torch.repeat_interleave(pp, k, dim=1), (0, 1), "constant", 0)
    return torch.logsumexp(x, dim=1).mean()


def timed(fn, x, *args) -> float:
    p = x.detach().clone().requires_grad_(True)
    t = time.perf_counter()
    fn(p, *args).backward()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ce = lg.compile(dict(type="CrossEntropyLoss", ignore_index=255, loss_weight=0.2), "cpp")
    mp = lg.compile(dict(type="MultiPosCrossEntropyLoss"), "cpp")
    x = torch.randn(2, 183, 100, 168)
    y = torch.randint(0, 183, (2, 100, 168))
    y[:, :10] = 255
    s = torch.randn(256, 256)
    lab = (torch.rand(256, 256) < 0.02).long()
    cases = {"ce_semantic_2x183x100x168": ((eager_ce, ce), (x, y)),
             "multipos_256x256": ((eager_multipos, mp), (s, lab))}
    for (fe, fl), inp in cases.values():         # warm up: compile, cache
        timed(fe, *inp), timed(fl, *inp)
    print("| case | eager ms | lossgraph cpp ms | cpp / eager |\n|---|---:|---:|---:|")
    for name, ((fe, fl), inp) in cases.items():
        e, c = [], []
        for _ in range(args.repeats):
            e.append(timed(fe, *inp))
            c.append(timed(fl, *inp))
        me, mc = statistics.median(e), statistics.median(c)
        print(f"| {name} | {me:.1f} | {mc:.1f} | {mc / me:.2f} |")


if __name__ == "__main__":
    main()
