"""Stage 2: Spec + Variant -> IR graph. Traces the loss math, then appends weight, reduce, scale."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from .config import Spec
from .errors import ConfigError
from .ir import Graph, Load
from .ops import Level, Op
from .symbolic import Sym


@dataclass(frozen=True)
class Variant:
    """Everything about one call that changes the generated code (the specialization key)."""

    reduction: str = "mean"
    target: str = "dense"            # 'dense' or 'labels'
    weight: str | None = None        # None, 'elem', 'row', 'col' or 'scalar'
    grad: bool = True
    dtype: str = "float32"           # storage dtype of pred (compute is float32 or float64)
    label_dtype: str = "int64"
    device: str = "cpu"
    denom: str = "value"             # 'value' (a number) or 'tensor' (a device scalar), for 'mean'
    params: tuple = field(default=())  # per-call hyperparameter overrides, e.g. ignore_index
    wrt: tuple = ("pred",)           # inputs differentiated when grad: pred, then others by name

    @property
    def extra_grads(self) -> tuple:
        """The inputs other than pred whose gradients the kernel returns (output 'grad_<name>')."""
        return tuple(n for n in self.wrt if n != "pred") if self.grad else ()

    def describe(self) -> dict:
        """The fields shown in the IR header."""
        d = {"reduction": self.reduction, "target": self.target, "weight": self.weight or "none",
             "grad": self.grad, "dtype": self.dtype}
        d.update(dict(self.params))
        if self.extra_grads:
            d["wrt"] = "+".join(self.wrt)
        return d

    def tag(self) -> str:
        """A short, file-name-safe description of this variant."""
        parts = [self.reduction, self.target, f"w-{self.weight or 'none'}", self.dtype,
                 self.device, "grad" if self.grad else "nograd"]
        parts += [f"{k}-{v}" for k, v in self.params]
        parts += [f"wrt-{'+'.join(self.wrt)}"] if self.extra_grads else []
        return ".".join(str(p).replace("/", "_") for p in parts)


@dataclass
class _Trace:
    graph: Graph
    variant: Variant
    spec: Spec


_TRACE: contextvars.ContextVar[_Trace | None] = contextvars.ContextVar("lossgraph_trace", default=None)


def _current(what: str) -> _Trace:
    t = _TRACE.get()
    if t is None:
        raise RuntimeError(f"lg.{what} can only be called inside a loss definition being compiled")
    return t


def check(cond: bool, message: str, error: type = ConfigError, at_call: bool = False) -> None:
    """Inside a loss definition: reject a config with error(message) unless cond holds; with
    at_call=True the loss still builds and the error is raised by its calls (as MMDetection does).

    Note [Errors at call time]: MMDetection checks some config values only in forward (DiceLoss
    softmax, SmoothL1Loss beta > 0); the check then fails the build's trace with `at_call` set,
    the Compiler swallows it there, and every call's trace raises it again.
    """
    if not cond:
        t = _TRACE.get()
        err = error(f"{t.spec.name}: {message}" if t else message)
        err.at_call = at_call
        raise err


def is_labels(target: Sym) -> bool:
    """True when the target of this call is a vector of integer class labels."""
    return target.graph.kind(target.id) == "i"


def per_class(name: str, values) -> Sym:
    """A per-class constant vector (e.g. class_weight) read at the element's class index."""
    t = _current("per_class")
    t.graph.tables[name] = tuple(float(v) for v in values)
    return Sym(t.graph, t.graph.add(Op.INPUT, (), Load(name, "col")))


def scalar_input(name: str) -> Sym:
    """A per-call runtime scalar supplied by the loss's own runtime hook."""
    t = _current("scalar_input")
    return Sym(t.graph, t.graph.add(Op.INPUT, (), Load(name, "scalar")))


def row_input(name: str, kind: str = "f") -> Sym:
    """A per-row input tensor (one value per row of pred) supplied by the runtime."""
    t = _current("row_input")
    return Sym(t.graph, t.graph.add(Op.INPUT, (), Load(name, "row", kind)))


def col_input(name: str) -> Sym:
    """A per-class input vector (one value per column of pred) supplied by the runtime."""
    t = _current("col_input")
    return Sym(t.graph, t.graph.add(Op.INPUT, (), Load(name, "col")))


def build(spec: Spec, v: Variant) -> Graph:
    """Trace the loss math for this variant and append the weight, reduce and scale stages."""
    g = Graph(spec.name, v.describe())
    pred = Sym(g, g.add(Op.INPUT, (), Load("pred", "elem")))
    if v.target == "labels":
        target = Sym(g, g.add(Op.INPUT, (), Load("label", "row", "i")))
    else:
        target = Sym(g, g.add(Op.INPUT, (), Load("target", "elem")))
    token = _TRACE.set(_Trace(g, v, spec))
    try:
        out = spec.loss.fn(pred, target, **{**spec.kwargs(), **dict(v.params)})
    finally:
        _TRACE.reset(token)
    x = _loss_node(spec, g, out)
    if v.weight is not None:
        x = g.add(Op.WEIGHT, (x, g.add(Op.INPUT, (), Load("weight", v.weight))))
    if v.reduction == "mean":
        x = g.add(Op.REDUCE, (x, g.add(Op.INPUT, (), Load("denom", "scalar"))), "mean")
    else:
        x = g.add(Op.REDUCE, (x,), v.reduction)
    x = g.add(Op.SCALE, (x,), spec.loss_weight)
    g.add(Op.OUTPUT, (x,), "loss")
    g.prune()
    return g


def _loss_node(spec: Spec, g: Graph, out) -> int:
    if not isinstance(out, Sym):
        raise TypeError(f"loss '{spec.name}' must return a symbolic value computed from pred, "
                        f"got {type(out).__name__}")
    if g.kind(out.id) != "f":
        out = Sym(g, g.add(Op.FLOAT, (out.id,)))
    preds = [i for i in g.ids() if g[i].op is Op.INPUT and g[i].arg.name == "pred"]
    if g.levels()[out.id] < Level.ROW or out.id not in g.depends_on(preds):
        raise TypeError(f"loss '{spec.name}' returned a value that does not depend on pred")
    return out.id
