"""Pass: symbolic reverse-mode differentiation of the loss output with respect to pred.

The gradient is derived from the IR, never taken from torch autograd at run time. Each rule
mirrors the backward formula torch's autograd uses for the same op (derivatives.yaml), so the
generated gradient matches MMDetection's to rounding, including at ties, clamps and zeros.

Note [Grad in forward]: the derivative is taken of the *whole* pipeline (weight, reduce, scale), so
for 'mean'/'sum' the kernel emits the final gradient and backward only multiplies by grad_output.
For 'none' the seed is 1 per output element and backward multiplies elementwise by grad_output,
which is exact because every output element depends on one row of pred only.
"""
from __future__ import annotations

from typing import Callable

from ..build import Variant
from ..ir import Graph, Load
from ..ops import Level, Op


class _E:
    """A tiny emitter: adds nodes to g with short names, for writing derivative rules."""

    def __init__(self, g: Graph):
        self.g = g

    def c(self, v) -> int:
        return self.g.const(v)

    def __getattr__(self, name: str) -> Callable[..., int]:
        op = Op[name.rstrip("_").upper()]
        return lambda *srcs, arg=None: self.g.add(op, tuple(self._id(s) for s in srcs), arg)

    def _id(self, s) -> int:
        # node ids are ints; float literals in a rule are constants
        return self.c(s) if isinstance(s, float) else s


def _minmax(e: _E, x, y, a, lose_self: Op, lose_other: Op):
    half = e.where(e.eq(x, y), e.mul(a, 0.5), a)
    return [e.where(e.g.add(lose_self, (x, y)), 0.0, half), e.where(e.g.add(lose_other, (x, y)), 0.0, half)]


def _pow(e: _E, x, p, y, a, active):
    base = e.where(e.eq(p, 0.0), 0.0, e.mul(a, e.mul(p, e.pow(x, e.sub(p, 1.0)))))
    if p not in active:
        return [base, None]
    expo = e.where(e.and_(e.eq(x, 0.0), e.ge(p, 0.0)), 0.0, e.mul(a, e.mul(y, e.log(x))))
    return [base, expo]


def _bce_logits(e: _E, s, y, a):
    x, t = s[0], s[1]
    if len(s) == 2:
        return [e.mul(a, e.sub(e.sigmoid(x), t)), None]
    pt = e.mul(s[2], t)
    return [e.mul(a, e.sub(e.mul(e.sub(e.add(pt, 1.0), t), e.sigmoid(x)), pt)), None, None]


def _rowmax(e: _E, x, y, a):
    hit = e.float(e.eq(x, y))
    return [e.mul(e.div(a, e.rowsum(hit)), hit)]


# torch's binary_cross_entropy backward clamps (1 - p) p at EPSILON = 1e-12 held in a float:
# float32(1e-12), also for float64 inputs (measured against torch 2.13 autograd).
BCE_EPS = 9.999999960041972e-13

# rule(e, operands, output, adjoint, active operands) -> one contribution (or None) per operand
RULES: dict[Op, Callable] = {
    Op.NEG: lambda e, s, y, a, act: [e.neg(a)],
    Op.ABS: lambda e, s, y, a, act: [e.mul(a, e.sign(s[0]))],
    Op.EXP: lambda e, s, y, a, act: [e.mul(a, y)],
    Op.LOG: lambda e, s, y, a, act: [e.div(a, s[0])],
    Op.LOG1P: lambda e, s, y, a, act: [e.div(a, e.add(s[0], 1.0))],
    Op.SQRT: lambda e, s, y, a, act: [e.div(a, e.mul(y, 2.0))],
    Op.SIGMOID: lambda e, s, y, a, act: [e.mul(e.mul(a, e.sub(1.0, y)), y)],
    Op.LOGSIGMOID: lambda e, s, y, a, act: [e.mul(a, e.sigmoid(e.neg(s[0])))],
    Op.SOFTPLUS: lambda e, s, y, a, act: [e.mul(a, e.sigmoid(s[0]))],
    Op.ATAN: lambda e, s, y, a, act: [e.div(a, e.add(e.mul(s[0], s[0]), 1.0))],
    Op.ASIN: lambda e, s, y, a, act: [e.div(a, e.sqrt(e.sub(1.0, e.mul(s[0], s[0]))))],
    Op.COS: lambda e, s, y, a, act: [e.mul(a, e.neg(e.sin(s[0])))],
    Op.SIN: lambda e, s, y, a, act: [e.mul(a, e.cos(s[0]))],
    Op.TANH: lambda e, s, y, a, act: [e.mul(a, e.sub(1.0, e.mul(y, y)))],
    Op.RECIP: lambda e, s, y, a, act: [e.neg(e.mul(a, e.mul(y, y)))],
    Op.ADD: lambda e, s, y, a, act: [a, a],
    Op.SUB: lambda e, s, y, a, act: [a, e.neg(a)],
    Op.MUL: lambda e, s, y, a, act: [e.mul(a, s[1]), e.mul(a, s[0])],
    Op.DIV: lambda e, s, y, a, act: [e.div(a, s[1]), e.neg(e.mul(a, e.div(e.div(s[0], s[1]), s[1])))],
    Op.POW: lambda e, s, y, a, act: _pow(e, s[0], s[1], y, a, act),
    Op.MAXIMUM: lambda e, s, y, a, act: _minmax(e, s[0], s[1], a, Op.LT, Op.GT),
    Op.MINIMUM: lambda e, s, y, a, act: _minmax(e, s[0], s[1], a, Op.GT, Op.LT),
    Op.CLAMP: lambda e, s, y, a, act: [
        e.where(e.and_(e.ge(s[0], s[1]), e.le(s[0], s[2])), a, 0.0), None, None],
    Op.WHERE: lambda e, s, y, a, act: [None, e.where(s[0], a, 0.0), e.where(s[0], 0.0, a)],
    Op.BCE_LOGITS: lambda e, s, y, a, act: _bce_logits(e, s, y, a),
    Op.BCE_PROB: lambda e, s, y, a, act: [e.div(e.mul(a, e.sub(s[0], s[1])), e.clamp(
        e.mul(e.sub(1.0, s[0]), s[0]), BCE_EPS, float("inf"))), None],
    Op.ROWSUM: lambda e, s, y, a, act: [a],
    Op.ROWLSE: lambda e, s, y, a, act: [e.mul(a, e.exp(e.sub(s[0], y)))],
    Op.ROWMAX: lambda e, s, y, a, act: _rowmax(e, s[0], y, a),
    Op.WEIGHT: lambda e, s, y, a, act: [e.mul(a, s[1]), None],
    Op.REDUCE: lambda e, s, y, a, act: [e.div(a, s[1]) if len(s) == 2 else a, None][:len(s)],
    Op.OUTPUT: lambda e, s, y, a, act: [a],
}
# Ops whose output carries no derivative (masks, integer math, stop_gradient).
ZERO = (Op.SIGN, Op.FLOOR, Op.FLOAT, Op.NOT, Op.STOPGRAD, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ,
        Op.NE, Op.AND, Op.OR, Op.IOTA, Op.WIDTH, Op.CONST, Op.INPUT)


def active_nodes(g: Graph, root: int) -> set[int]:
    """Nodes on a differentiable path from a pred input to root."""
    preds = [i for i, n in ((i, g[i]) for i in g.ids()) if n.op is Op.INPUT and n.arg.name == "pred"]
    reach = set(preds)
    for i in g.topo():
        n = g[i]
        if n.op not in ZERO and any(s in reach for s in n.srcs):
            reach.add(i)
    return reach & (g.ancestors(root) | {root})


def autodiff(g: Graph, v: Variant) -> Graph:
    """Add an OUTPUT 'grad' holding d(loss)/d(pred) (per output element for 'none')."""
    if not v.grad:
        return g
    g = g.copy()
    e, lv = _E(g), g.levels()
    root = g.outputs()["loss"]
    active = active_nodes(g, root)
    contribs: dict[int, list[int]] = {root: [e.c(1.0)]}
    for i in reversed(g.topo()):
        if i not in active or i not in contribs:
            continue
        n = g[i]
        a = _sum_to_level(e, contribs[i], lv[i])
        if n.op is Op.INPUT:
            contribs[i] = [a]
            continue
        if n.op is Op.SCALE:
            outs = [e.mul(a, n.arg)]
        else:
            outs = RULES[n.op](e, n.srcs, i, a, active)
        for s, d in zip(n.srcs, outs):
            if s in active and d is not None:
                if lv[i] is Level.ELEM and lv[s] is Level.ROW:
                    d = _sum_over_row(e, d)
                contribs.setdefault(s, []).append(d)
    g.add(Op.OUTPUT, (_pred_grad(e, g, contribs),), "grad")
    return g


def _sum_over_row(e: _E, d: int) -> int:
    """A per-row value read by an elementwise op is read by every column of its row, so its
    adjoint is summed over the row: width * d when d is the same for every column."""
    return e.rowsum(d) if e.g.levels()[d] is Level.ELEM else e.mul(d, e.width())


def _sum_to_level(e: _E, parts: list[int], level: Level) -> int:
    """Add up the adjoint contributions; an elementwise part of a per-row value is row-summed."""
    total = parts[0]
    for p in parts[1:]:
        total = e.add(total, p)
    if level is Level.ROW and e.g.levels()[total] is Level.ELEM:
        total = e.rowsum(total)
    return total


def _pred_grad(e: _E, g: Graph, contribs: dict[int, list[int]]) -> int:
    """Combine the adjoints of every pred load: elementwise ones add, column j lands at k == j."""
    total = None
    for i, ld in sorted(((i, g[i].arg) for i in g.ids() if g[i].op is Op.INPUT), key=lambda t: t[0]):
        if not isinstance(ld, Load) or ld.name != "pred" or i not in contribs:
            continue
        a = contribs[i][0]
        if ld.comp is not None:
            a = e.where(e.eq(e.iota(), e.g.const(ld.comp)), a, 0.0)
        total = a if total is None else e.add(total, a)
    return total if total is not None else e.c(0.0)
