"""Pass: fuse every stage (elementwise, weight, reduce, scale, gradient) into one KERNEL node."""
from __future__ import annotations

from ..build import Variant
from ..ir import Graph, Kernel
from ..ops import Op


def fuse(g: Graph, v: Variant) -> Graph:
    """Wrap the whole graph as the body of one KERNEL node fed by the inputs."""
    body = g.copy()
    out = Graph(g.name, g.attrs)
    out.tables = dict(g.tables)
    inputs = [out.add(Op.INPUT, (), ld) for ld in sorted(body.inputs(), key=str)]
    k = out.add(Op.KERNEL, inputs, Kernel(body, tuple(sorted(body.outputs()))))
    for name in sorted(body.outputs()):
        out.add(Op.OUTPUT, (k,), name)
    return out


def kernel_body(g: Graph) -> Graph:
    """The body of the single KERNEL node of a fused graph."""
    ks = g.find(Op.KERNEL)
    if len(ks) != 1:
        raise ValueError(f"expected one fused kernel, found {len(ks)}")
    return g[ks[0]].arg.body
