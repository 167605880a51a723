"""Pass: common-subexpression elimination by structural hashing."""
from __future__ import annotations

from ..build import Variant
from ..ir import Graph, Node
from ..ops import INFO, Op


def canonical(n: Node) -> Node:
    """Commutative ops get sorted operands (a*b == b*a exactly in IEEE arithmetic)."""
    if INFO[n.op].commutative:
        return Node(n.op, tuple(sorted(n.srcs)), n.arg)
    return n


def cse(g: Graph, v: Variant) -> Graph:
    """Merge nodes with the same op, operands and attribute; outputs are never merged."""
    g = g.copy()
    seen: dict[Node, int] = {}
    for i in g.topo():
        n = canonical(g[i])
        if n.op in (Op.OUTPUT, Op.KERNEL):
            continue
        if n in seen:
            g.redirect(i, seen[n])
        else:
            seen[n] = i
    g.prune()
    return g
