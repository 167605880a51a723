"""Pass: symbolic reverse-mode differentiation of the loss output with respect to pred (and,
when the variant asks, to other inputs: Variant.wrt, e.g. ('pred', 'target', 'weight')).

The gradient is derived from the IR, never taken from torch autograd at run time. Each rule
mirrors the backward formula torch's autograd uses for the same op (derivatives.yaml), so the
generated gradient matches MMDetection's to rounding, including at ties, clamps and zeros.

Note [Grad in forward]: the derivative is taken of the *whole* pipeline (weight, reduce, scale), so
for 'mean'/'sum' the kernel emits the final gradient and backward only multiplies by grad_output.
For 'none' the seed is 1 per output element and backward multiplies elementwise by grad_output,
which is exact because every output element depends on one row of pred only.

Note [Gradients of other inputs]: d(loss)/d(name) for each extra name in Variant.wrt is the
output 'grad_<name>' at the input's own level: elementwise for elem and col inputs (the runtime
sums a col input's over the rows), per row for row inputs (summed over the row here, as for
pred's per-row loads), and for a scalar input every contribution at its own level (the runtime
sums them up). The runtime asks for these only under 'mean'/'sum' (runtime.py's Note [Gradients
of every input]); avg_factor's gradient, -loss / (avg_factor + eps), needs no kernel output.
An operand that lies on a differentiable path but has no derivative rule is an error, never a
silently missing gradient.
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


def _bce_logits(e: _E, s, y, a, active):
    x, t = s[0], s[1]
    if len(s) == 2:
        # torch's target backward without pos_weight: -x
        dt = e.neg(e.mul(a, x)) if t in active else None
        return [e.mul(a, e.sub(e.sigmoid(x), t)), dt]
    pt = e.mul(s[2], t)
    # torch's target backward with pos_weight: log_sigmoid(-x) - pos_weight * log_sigmoid(x)
    dt = e.mul(a, e.sub(e.logsigmoid(e.neg(x)), e.mul(e.logsigmoid(x), s[2]))) \
        if t in active else None
    return [e.mul(a, e.sub(e.mul(e.sub(e.add(pt, 1.0), t), e.sigmoid(x)), pt)), dt, None]


def _bce_prob(e: _E, s, y, a, active):
    p, t = s
    dp = e.div(e.mul(a, e.sub(p, t)), e.clamp(e.mul(e.sub(1.0, p), p), BCE_EPS, float("inf")))
    # torch's target backward: -logit(p) = log(1 - p) - log(p), unclamped
    dt = e.mul(a, e.sub(e.log1p(e.neg(p)), e.log(p))) if t in active else None
    return [dp, dt]


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
    Op.BCE_LOGITS: lambda e, s, y, a, act: _bce_logits(e, s, y, a, act),
    Op.BCE_PROB: lambda e, s, y, a, act: _bce_prob(e, s, y, a, act),
    Op.ROWSUM: lambda e, s, y, a, act: [a],
    Op.ROWLSE: lambda e, s, y, a, act: [e.mul(a, e.exp(e.sub(s[0], y)))],
    Op.ROWMAX: lambda e, s, y, a, act: _rowmax(e, s[0], y, a),
    Op.WEIGHT: lambda e, s, y, a, act: [e.mul(a, s[1]), e.mul(a, s[0]) if s[1] in act else None],
    Op.REDUCE: lambda e, s, y, a, act: [e.div(a, s[1]) if len(s) == 2 else a, None][:len(s)],
    Op.OUTPUT: lambda e, s, y, a, act: [a],
}
# Ops whose output carries no derivative (masks, integer math, stop_gradient).
ZERO = (Op.SIGN, Op.FLOOR, Op.FLOAT, Op.NOT, Op.STOPGRAD, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ,
        Op.NE, Op.AND, Op.OR, Op.IOTA, Op.WIDTH, Op.CONST, Op.INPUT)


def active_nodes(g: Graph, root: int, wrt: tuple = ("pred",)) -> set[int]:
    """Nodes on a differentiable path from an input named in `wrt` (default: pred) to root."""
    reach = {i for i in g.ids() if g[i].op is Op.INPUT and g[i].arg.name in wrt}
    for i in g.topo():
        n = g[i]
        if n.op not in ZERO and any(s in reach for s in n.srcs):
            reach.add(i)
    return reach & (g.ancestors(root) | {root})


def autodiff(g: Graph, v: Variant) -> Graph:
    """Add an OUTPUT 'grad' holding d(loss)/d(pred) (per output element for 'none'), and an
    OUTPUT 'grad_<name>' for each other input named in v.wrt."""
    if not v.grad:
        return g
    g = g.copy()
    e, lv = _E(g), g.levels()
    root = g.outputs()["loss"]
    active = active_nodes(g, root, ("pred",) + v.extra_grads)
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
            if s in active and d is None:
                raise NotImplementedError(f"{g.name}: no derivative of {n.op.value} with respect "
                                          f"to its operand %{g.numbering()[s]}")
            if s in active:
                if lv[i] is Level.ELEM and lv[s] is Level.ROW:
                    d = _sum_over_row(e, d)
                contribs.setdefault(s, []).append(d)
    g.add(Op.OUTPUT, (_input_grad(e, g, contribs, "pred"),), "grad")
    for name in v.extra_grads:
        g.add(Op.OUTPUT, (_input_grad(e, g, contribs, name),), f"grad_{name}")
    return g


def _sum_over_row(e: _E, d: int) -> int:
    """A per-row value read by an elementwise op is read by every column of its row, so its
    adjoint is summed over the row: width * d when d is the same for every column."""
    return e.rowsum(d) if e.g.levels()[d] is Level.ELEM else e.mul(d, e.width())


def _sum_to_level(e: _E, parts: list[int], level: Level) -> int:
    """Add up the adjoint contributions; an elementwise part of a per-row value is row-summed.
    For a scalar (whose parts the runtime sums), a per-row part joining elementwise ones is put
    in column 0 only, so that it is counted once per row."""
    if level is Level.SCALAR and len({e.g.levels()[p] for p in parts}) > 1:
        top = max(e.g.levels()[p] for p in parts)
        parts = [p if e.g.levels()[p] is top else _at_column_0(e, p, top) for p in parts]
    total = parts[0]
    for p in parts[1:]:
        total = e.add(total, p)
    if level is Level.ROW and e.g.levels()[total] is Level.ELEM:
        total = e.rowsum(total)
    return total


def _at_column_0(e: _E, p: int, top: Level) -> int:
    if top is not Level.ELEM:
        raise NotImplementedError(f"{e.g.name}: a scalar input read at several levels")
    if e.g.levels()[p] is Level.SCALAR:
        raise NotImplementedError(f"{e.g.name}: a scalar input read both per call and per element")
    return e.where(e.eq(e.iota(), e.g.const(0)), p, 0.0)


def _input_grad(e: _E, g: Graph, contribs: dict[int, list[int]], name: str) -> int:
    """Combine the adjoints of every load of input `name`: elementwise ones add, column j
    lands at k == j."""
    total = None
    for i, ld in sorted(((i, g[i].arg) for i in g.ids() if g[i].op is Op.INPUT), key=lambda t: t[0]):
        if not isinstance(ld, Load) or ld.name != name or i not in contribs:
            continue
        a = contribs[i][0]
        if ld.comp is not None:
            a = e.where(e.eq(e.iota(), e.g.const(ld.comp)), a, 0.0)
        total = a if total is None else e.add(total, a)
    return total if total is not None else e.c(0.0)
