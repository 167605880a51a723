"""Pass: constant folding and specialization, as small pattern -> rewrite rules.

Each rule looks at one node and returns an existing node id to use instead, a new Node to put in
its place, or None. Rules never reassociate floating-point math: the generated code evaluates the
same operations in the same order as MMDetection's eager code, so values round the same way.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

from ..build import Variant
from ..ir import Graph, Node
from ..ops import Level, Op, ROW_REDUCTIONS, Stage, stage_of
from ..reference import fold_value

Rewrite = Optional[Union[int, Node]]


def _const(g: Graph, i: int):
    n = g[i]
    return n.arg if n.op is Op.CONST else None


def _is(g: Graph, i: int, value) -> bool:
    c = _const(g, i)
    return c is not None and not isinstance(c, bool) and c == value


def fold_constants(g: Graph, i: int, n: Node) -> Rewrite:
    """An elementwise op whose operands are all constants becomes a constant."""
    if stage_of(n.op) is not Stage.ELEMENTWISE or n.op in (Op.INPUT, Op.CONST, Op.IOTA, Op.WIDTH) or \
            n.op in (Op.ROWSUM, Op.ROWMAX, Op.ROWLSE, Op.STOPGRAD) or not n.srcs:
        return None
    values = [_const(g, s) for s in n.srcs]
    if any(v is None for v in values):
        return None
    return Node(Op.CONST, (), fold_value(n.op, values))


def identities(g: Graph, i: int, n: Node) -> Rewrite:
    """x*1, 1*x, x/1, x+0, x-0 and pow(x, 1) are x; --x is x; where(True, a, b) is a."""
    a = n.srcs
    if n.op is Op.MUL and _is(g, a[1], 1.0):
        return a[0]
    if n.op is Op.MUL and _is(g, a[0], 1.0):
        return a[1]
    if n.op in (Op.DIV, Op.POW) and _is(g, a[1], 1.0):
        return a[0]
    if n.op in (Op.ADD, Op.SUB) and _is(g, a[1], 0.0):
        return a[0]
    if n.op is Op.ADD and _is(g, a[0], 0.0):
        return a[1]
    if n.op is Op.NEG and g[a[0]].op is Op.NEG:
        return g[a[0]].srcs[0]
    if n.op is Op.WHERE and isinstance(_const(g, a[0]), bool):
        return a[1] if _const(g, a[0]) else a[2]
    return None


def reduce_row_value(g: Graph, i: int, n: Node) -> Rewrite:
    """A row reduction of a value that is already one per row (or per call) is that value.

    Note [Reducing a row value]: the reference interpreter holds a row value as an (R, 1) column,
    so rowsum/rowmax/logsumexp over its last axis is the value itself; the native loops would
    otherwise reduce K broadcast copies of it (rowsum(rowmax(x)) = K * max)."""
    if n.op not in ROW_REDUCTIONS or g.levels()[n.srcs[0]] is Level.ELEM:
        return None
    return n.srcs[0]


def specialize_pow(g: Graph, i: int, n: Node) -> Rewrite:
    """pow(x, c) for the exponents torch's CPU pow kernel special-cases (gamma=2 -> x*x).

    Note [Specialized pow]: torch evaluates x**2 as x*x, x**3 as x*x*x, x**0.5 as sqrt(x) and
    x**0 as 1, and so do we: same values (and the same NaN for sqrt(-inf)), no pow call, and
    the symbolic derivative of x*x is the 2*x that torch's pow_backward computes.
    """
    if n.op is not Op.POW:
        return None
    x, c = n.srcs[0], _const(g, n.srcs[1])
    if c is None or isinstance(c, bool):
        return None
    if c == 0.0:
        return Node(Op.CONST, (), 1.0)
    if c == 2.0:
        return Node(Op.MUL, (x, x))
    if c == 3.0:
        return Node(Op.MUL, (g.add(Op.MUL, (x, x)), x))
    if c == 0.5:
        return Node(Op.SQRT, (x,))
    return None


def stable_log_sigmoid(g: Graph, i: int, n: Node) -> Rewrite:
    """log(sigmoid(x)) -> logsigmoid(x); log(1 - sigmoid(x)) -> logsigmoid(-x).

    Note [Stable log-sigmoid]: in float32 sigmoid(x) rounds to 0 below x = -88 and 1 - sigmoid(x)
    rounds to 0 above x = 17, so the log form returns -inf (and a NaN gradient) where the true
    value is a finite -|x|. logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)) is exact everywhere.
    """
    if n.op is not Op.LOG:
        return None
    s = g[n.srcs[0]]
    if s.op is Op.SIGMOID:
        return Node(Op.LOGSIGMOID, s.srcs)
    if s.op is Op.SUB and _is(g, s.srcs[0], 1.0) and g[s.srcs[1]].op is Op.SIGMOID:
        return Node(Op.LOGSIGMOID, (g.add(Op.NEG, g[s.srcs[1]].srcs),))
    return None


def drop_unit_scale(g: Graph, i: int, n: Node) -> Rewrite:
    """loss_weight == 1 disappears: scale(x, 1.0) is x."""
    if n.op is Op.SCALE and n.arg == 1.0:
        return n.srcs[0]
    return None


RULES: list[Callable[[Graph, int, Node], Rewrite]] = [
    fold_constants, identities, reduce_row_value, specialize_pow, stable_log_sigmoid, drop_unit_scale]


# Rules valid where a graph stands for one column only (clower's one-hot specializations, whose
# row reductions are not real reductions any more): everything but reduce_row_value.
COLUMN_RULES = [r for r in RULES if r is not reduce_row_value]


def specialize(g: Graph, v: Variant, rules: list | None = None) -> Graph:
    """Apply RULES (or `rules`) until nothing changes, then drop dead nodes."""
    rules = RULES if rules is None else rules
    g = g.copy()
    changed = True
    while changed:
        changed = False
        for i in g.topo():
            if i not in g:
                continue
            for rule in rules:
                r = rule(g, i, g[i])
                if r is None:
                    continue
                if isinstance(r, Node):
                    g.replace(i, r)
                else:
                    g.redirect(i, r)
                changed = True
                break
        g.prune()
    return g
