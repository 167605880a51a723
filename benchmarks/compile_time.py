"""How long a new kernel takes to appear: cold (trace, passes, render, C compiler, load) and
warm (a new process loading the same kernel from the disk cache).

    python benchmarks/compile_time.py [--backend cpp]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = ["dict(type='FocalLoss')", "dict(type='CrossEntropyLoss')", "dict(type='GIoULoss')",
           "dict(type='GaussianFocalLoss')", "dict(type='QualityFocalLoss')"]

CHILD = """
import time, sys, torch, lossgraph as lg, lossgraph.cache as c
loss = lg.compile({config}, backend={backend!r})
v = loss.compiler.default_variant()
t = time.perf_counter()
loss.compiler.get(v)
print("SECONDS", time.perf_counter() - t, c.STATS["renders"])
"""


def measure(config: str, backend: str, cache: str) -> tuple[float, int]:
    """Seconds spent in Compiler.get of the default variant, and how many sources it rendered."""
    code = CHILD.format(config=config, backend=backend)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LOSSGRAPH_CACHE_DIR": cache},
                         cwd=Path(__file__).resolve().parent.parent).stdout
    seconds, renders = out.split("SECONDS")[1].split()[:2]
    return float(seconds), int(renders)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpp", choices=["cpp", "torchscript"])
    a = ap.parse_args()
    colds, warms = [], []
    for config in CONFIGS:
        with tempfile.TemporaryDirectory() as d:
            cold, r1 = measure(config, a.backend, d)
            warm, r2 = measure(config, a.backend, d)
        colds.append(cold)
        warms.append(warm)
        print(f"{config:<40} cold {cold * 1e3:7.1f} ms ({r1} rendered)   "
              f"warm {warm * 1e3:6.1f} ms ({r2} rendered)")
    print(f"median cold {statistics.median(colds) * 1e3:.0f} ms, max {max(colds) * 1e3:.0f} ms; "
          f"median warm {statistics.median(warms) * 1e3:.1f} ms, max {max(warms) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
