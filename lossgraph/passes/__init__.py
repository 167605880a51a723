"""The pass pipeline, listed once, in order. Each pass is a pure function (Graph, Variant) -> Graph."""
from __future__ import annotations

from ..build import Variant
from ..ir import Graph
from .autodiff import autodiff
from .cse import cse
from .fold import specialize
from .fuse import fuse, kernel_body
from .verify import VerifyError, verify

PIPELINE = [
    ("specialize", specialize),   # constant folding, gamma=2 -> x*x, loss_weight=1 disappears
    ("cse", cse),                 # structural hashing merges repeated subexpressions
    ("autodiff", autodiff),       # d(loss)/d(pred) appended as the 'grad' output
    ("simplify", specialize),     # the same rules, on the derivative
    ("cse_grad", cse),            # the gradient reuses the forward's values
    ("fuse", fuse),               # all stages become one kernel node
]


def run(g: Graph, v: Variant) -> list[tuple[str, Graph]]:
    """Run PIPELINE on g, verifying after each pass; return every stage, 'build' first."""
    stages = [("build", verify(g))]
    for name, p in PIPELINE:
        g = verify(p(g, v))
        stages.append((name, g))
    return stages


__all__ = ["PIPELINE", "run", "verify", "VerifyError", "kernel_body"]
