"""Inspect every stage of a compilation: the IR after each pass and the generated kernels.

    python examples/inspect_kernels.py [OUT_DIR]

Writes the dump folder (config, IR text and Graphviz .dot per pass, generated source) for the
TorchScript and the native CPU backend, and prints where each stage went. The same dumps appear
for any compiled loss when LOSSGRAPH_DUMP_DIR is set.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lossgraph as lg  # noqa: E402

CONFIG = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lossgraph_dump_")
    pred = torch.randn(16, 80, requires_grad=True)
    labels, weight = torch.randint(0, 81, (16,)), torch.rand(16)
    for backend in ("torchscript", "cpp"):
        loss = lg.compile(CONFIG, backend=backend)
        loss(pred, labels, weight, avg_factor=4.0).backward()
        print(f"== {backend}: stages of the last specialization")
        for name, graph in loss.stages:
            print(f"   {name:<11} {len(graph):>3} nodes")
        files = loss.dump(os.path.join(out, backend))
        print(f"   dumped {len(files)} files to {os.path.join(out, backend)}")
    print("\n== IR after the fusion pass (one kernel node holding every stage):\n")
    print(loss.graph)
    print("\n== generated C kernel (cpp backend):\n")
    print(loss.source)


if __name__ == "__main__":
    main()
