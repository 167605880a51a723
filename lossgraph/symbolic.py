"""Symbolic values: a loss written as plain math on `Sym`s records itself into an IR graph."""
from __future__ import annotations

import math
import numbers

from .ir import Graph, Load
from .ops import Op


class Sym:
    """A symbolic tensor value inside a loss definition; arithmetic on it builds IR nodes."""

    __slots__ = ("graph", "id")
    __array_priority__ = 1000

    def __init__(self, graph: Graph, id: int):
        self.graph, self.id = graph, id

    # arithmetic
    def __add__(self, o): return _binary(Op.ADD, self, o)
    def __radd__(self, o): return _binary(Op.ADD, o, self)
    def __sub__(self, o): return _binary(Op.SUB, self, o)
    def __rsub__(self, o): return _binary(Op.SUB, o, self)
    def __mul__(self, o): return _binary(Op.MUL, self, o)
    def __rmul__(self, o): return _binary(Op.MUL, o, self)
    def __truediv__(self, o): return _binary(Op.DIV, self, o)
    def __rtruediv__(self, o): return _binary(Op.DIV, o, self)
    def __pow__(self, o): return _binary(Op.POW, self, o)
    def __rpow__(self, o): return _binary(Op.POW, o, self)
    def __neg__(self): return _unary(Op.NEG, self)
    def __pos__(self): return self
    def __abs__(self): return _unary(Op.ABS, self)
    # comparisons and logic (results are boolean masks)
    def __lt__(self, o): return _binary(Op.LT, self, o)
    def __le__(self, o): return _binary(Op.LE, self, o)
    def __gt__(self, o): return _binary(Op.GT, self, o)
    def __ge__(self, o): return _binary(Op.GE, self, o)
    def __eq__(self, o): return _binary(Op.EQ, self, o)  # type: ignore[override]
    def __ne__(self, o): return _binary(Op.NE, self, o)  # type: ignore[override]
    def __and__(self, o): return _binary(Op.AND, self, o)
    def __rand__(self, o): return _binary(Op.AND, o, self)
    def __or__(self, o): return _binary(Op.OR, self, o)
    def __ror__(self, o): return _binary(Op.OR, o, self)
    def __invert__(self): return _unary(Op.NOT, self)
    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise TypeError("a symbolic lossgraph value has no truth value: use lg.where(cond, a, b) "
                        "instead of if/and/or on tensors")

    def __getitem__(self, j: int) -> "Sym":
        """Column j of each row of an input (box coordinates: pred[0] is x1)."""
        n = self.graph[self.id]
        if n.op is not Op.INPUT or n.arg.access != "elem" or n.arg.comp is not None:
            raise TypeError("only a loss input can be indexed by a fixed column, e.g. pred[0]")
        if not isinstance(j, int) or j < 0:
            raise TypeError(f"column index must be a non-negative int, got {j!r}")
        return Sym(self.graph, self.graph.add(Op.INPUT, (), Load(n.arg.name, "elem", n.arg.kind, j)))

    def __repr__(self) -> str:
        n = self.graph[self.id]
        return f"<Sym %{self.id} {n.op.value}>"


def _graph_of(*xs) -> Graph | None:
    return next((x.graph for x in xs if isinstance(x, Sym)), None)


def _lift(g: Graph, x) -> int:
    if isinstance(x, Sym):
        if x.graph is not g:
            raise ValueError("symbolic values from two different loss definitions were mixed")
        return x.id
    if isinstance(x, bool):
        return g.const(x)
    if isinstance(x, numbers.Real):
        return g.const(float(x))
    raise TypeError(f"cannot use {type(x).__name__} {x!r} in a lossgraph expression; "
                    "use numbers or symbolic values")


def _as_float(g: Graph, i: int) -> int:
    """Arithmetic on masks or labels casts them to float first, as `.float()` does in torch."""
    return i if g.kind(i) == "f" else g.add(Op.FLOAT, (i,))


_ARITH = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MINIMUM, Op.MAXIMUM}
_PY = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b, Op.POW: lambda a, b: a ** b, Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b, Op.GT: lambda a, b: a > b, Op.GE: lambda a, b: a >= b,
    Op.EQ: lambda a, b: a == b, Op.NE: lambda a, b: a != b, Op.AND: lambda a, b: a and b,
    Op.OR: lambda a, b: a or b, Op.MINIMUM: min, Op.MAXIMUM: max,
}


def _binary(op: Op, a, b):
    g = _graph_of(a, b)
    if g is None:
        return _PY[op](a, b)
    ia, ib = _lift(g, a), _lift(g, b)
    if op in _ARITH:
        ia, ib = _as_float(g, ia), _as_float(g, ib)
    return Sym(g, g.add(op, (ia, ib)))


def _unary(op: Op, a):
    g = _graph_of(a)
    if g is None:
        raise TypeError(f"lg.{op.value} needs a symbolic value, got {a!r}")
    i = _lift(g, a)
    return Sym(g, g.add(op, (i if op is Op.NOT else _as_float(g, i),)))


def _unary_fn(op: Op, py):
    def fn(x):
        if not isinstance(x, Sym):
            return py(x)
        return _unary(op, x)
    fn.__name__ = op.value
    fn.__doc__ = f"Elementwise {op.value}(x)."
    return fn


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


abs = _unary_fn(Op.ABS, lambda x: x if x >= 0 else -x)  # noqa: A001
sign = _unary_fn(Op.SIGN, lambda x: float((x > 0) - (x < 0)))
exp = _unary_fn(Op.EXP, math.exp)
log = _unary_fn(Op.LOG, math.log)
log1p = _unary_fn(Op.LOG1P, math.log1p)
sqrt = _unary_fn(Op.SQRT, math.sqrt)
sigmoid = _unary_fn(Op.SIGMOID, lambda x: 1.0 / (1.0 + math.exp(-x)))
logsigmoid = _unary_fn(Op.LOGSIGMOID, lambda x: -_softplus(-x))
softplus = _unary_fn(Op.SOFTPLUS, _softplus)
floor = _unary_fn(Op.FLOOR, math.floor)
atan = _unary_fn(Op.ATAN, math.atan)
asin = _unary_fn(Op.ASIN, math.asin)
cos = _unary_fn(Op.COS, math.cos)
sin = _unary_fn(Op.SIN, math.sin)
tanh = _unary_fn(Op.TANH, math.tanh)
stop_gradient = _unary_fn(Op.STOPGRAD, lambda x: x)


def where(cond, a, b):
    """Elementwise `a if cond else b` (both branches are evaluated, as in torch.where)."""
    g = _graph_of(cond, a, b)
    if g is None:
        return a if cond else b
    ic = _lift(g, cond)
    return Sym(g, g.add(Op.WHERE, (ic, _as_float(g, _lift(g, a)), _as_float(g, _lift(g, b)))))


def minimum(a, b):
    """Elementwise minimum; NaN propagates as in torch.minimum."""
    return _binary(Op.MINIMUM, a, b)


def maximum(a, b):
    """Elementwise maximum; NaN propagates as in torch.maximum."""
    return _binary(Op.MAXIMUM, a, b)


def clamp(x, min=None, max=None):  # noqa: A002
    """torch.clamp: the gradient passes where min <= x <= max."""
    g = _graph_of(x)
    if g is None:
        raise TypeError("lg.clamp needs a symbolic value")
    lo = _lift(g, -math.inf if min is None else min)
    hi = _lift(g, math.inf if max is None else max)
    return Sym(g, g.add(Op.CLAMP, (_as_float(g, x.id), lo, hi)))


def to_float(x):
    """Cast a mask or label to float (1.0 for True)."""
    g = _graph_of(x)
    return float(x) if g is None else Sym(g, _as_float(g, x.id))


def bce_with_logits(x, t, pos_weight=None):
    """F.binary_cross_entropy_with_logits(x, t, pos_weight), elementwise, torch's own gradient."""
    g = _graph_of(x, t, pos_weight)
    srcs = [_as_float(g, _lift(g, x)), _as_float(g, _lift(g, t))]
    if pos_weight is not None:
        srcs.append(_as_float(g, _lift(g, pos_weight)))
    return Sym(g, g.add(Op.BCE_LOGITS, srcs))


def binary_cross_entropy(p, t):
    """F.binary_cross_entropy(p, t) on probabilities: logs clamped at -100, torch's gradient."""
    g = _graph_of(p, t)
    return Sym(g, g.add(Op.BCE_PROB, (_as_float(g, _lift(g, p)), _as_float(g, _lift(g, t)))))


def class_index(x: Sym) -> Sym:
    """The class (last-axis) index k of each element, as an int."""
    return Sym(x.graph, x.graph.add(Op.IOTA))


def width(x: Sym) -> Sym:
    """The number of classes K (length of the last axis) as a float, e.g. for a row mean."""
    return Sym(x.graph, x.graph.add(Op.WIDTH))


def rowmean(x: Sym) -> Sym:
    """Mean over the class axis of each row."""
    return rowsum(x) / width(x)


def one_hot(labels: Sym) -> Sym:
    """1.0 where the element's class index equals the row's label, else 0.0."""
    return to_float(labels == class_index(labels))


def _row(op: Op, x: Sym) -> Sym:
    return Sym(x.graph, x.graph.add(op, (_as_float(x.graph, x.id),)))


def rowsum(x: Sym) -> Sym:
    """Sum over the class axis of each row."""
    return _row(Op.ROWSUM, x)


def rowmax(x: Sym) -> Sym:
    """Max over the class axis of each row."""
    return _row(Op.ROWMAX, x)


def logsumexp(x: Sym) -> Sym:
    """log(sum(exp(x))) over the class axis of each row, computed stably."""
    return _row(Op.ROWLSE, x)


def take(x: Sym, index: Sym) -> Sym:
    """x at column `index` of each row (a gather at a per-row integer index)."""
    return rowsum(where(class_index(x) == index, x, 0.0))
