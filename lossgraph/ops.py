"""The op enum of the IR and the facts every pass needs about each op, kept as data."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(enum.Enum):
    """Every node of a lossgraph IR is one of these ops."""

    # leaves
    INPUT = "input"        # arg: Load(name, access, comp)
    CONST = "const"        # arg: a Python float, int or bool
    IOTA = "iota"          # the class (last-axis) index k of the current element
    WIDTH = "width"        # the number of classes K (the length of the last axis), as a float
    # unary elementwise
    NEG = "neg"
    ABS = "abs"
    SIGN = "sign"
    EXP = "exp"
    LOG = "log"
    LOG1P = "log1p"
    SQRT = "sqrt"
    SIGMOID = "sigmoid"
    LOGSIGMOID = "logsigmoid"
    SOFTPLUS = "softplus"
    FLOOR = "floor"
    ATAN = "atan"
    ASIN = "asin"
    COS = "cos"
    SIN = "sin"
    TANH = "tanh"
    RECIP = "recip"
    FLOAT = "float"        # bool/int -> float
    NOT = "not"
    STOPGRAD = "stopgrad"  # identity whose derivative is zero
    # binary elementwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MINIMUM = "minimum"
    MAXIMUM = "maximum"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    # ternary elementwise
    WHERE = "where"
    CLAMP = "clamp"        # clamp(x, lo, hi), torch semantics
    # composite losses whose derivatives mirror torch's own backward formulas
    BCE_LOGITS = "bce_logits"  # (x, t) or (x, t, pos_weight)
    BCE_PROB = "bce_prob"      # (p, t), log clamped at -100
    # reductions along the last (class) axis of one row
    ROWSUM = "rowsum"
    ROWMAX = "rowmax"
    ROWLSE = "rowlse"
    # pipeline stages
    WEIGHT = "weight"      # (loss, w)
    REDUCE = "reduce"      # arg: 'none'|'sum'|'mean'; (x,) or (x, denom)
    SCALE = "scale"        # arg: loss_weight
    OUTPUT = "output"      # arg: output name ('loss' or 'grad')
    # after fusion
    KERNEL = "kernel"      # arg: Kernel (the fused body)


class Stage(enum.IntEnum):
    """Pipeline stage of a node; edges never go from a later stage to an earlier one."""

    ELEMENTWISE = 0
    WEIGHT = 1
    REDUCE = 2
    SCALE = 3
    OUTPUT = 4


class Level(enum.IntEnum):
    """How often a value changes: once per call, per row, per element, or after the reduction."""

    SCALAR = 0
    ROW = 1
    ELEM = 2
    TOTAL = 3


@dataclass(frozen=True)
class OpInfo:
    arity: tuple[int, ...]   # allowed operand counts
    kind: str                # result kind: 'f' float, 'b' bool, 'i' int, 's' same as first operand
    commutative: bool = False


UNARY_FLOAT = (Op.NEG, Op.ABS, Op.SIGN, Op.EXP, Op.LOG, Op.LOG1P, Op.SQRT, Op.SIGMOID, Op.LOGSIGMOID,
               Op.SOFTPLUS, Op.FLOOR, Op.ATAN, Op.ASIN, Op.COS, Op.SIN, Op.TANH, Op.RECIP, Op.STOPGRAD)
COMPARE = (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE)
ROW_REDUCTIONS = (Op.ROWSUM, Op.ROWMAX, Op.ROWLSE)
STAGE_OPS = {Op.WEIGHT: Stage.WEIGHT, Op.REDUCE: Stage.REDUCE, Op.SCALE: Stage.SCALE,
             Op.OUTPUT: Stage.OUTPUT}

INFO: dict[Op, OpInfo] = {
    Op.INPUT: OpInfo((0,), "s"),
    Op.CONST: OpInfo((0,), "s"),
    Op.IOTA: OpInfo((0,), "i"),
    Op.WIDTH: OpInfo((0,), "f"),
    **{op: OpInfo((1,), "f") for op in UNARY_FLOAT},
    Op.FLOAT: OpInfo((1,), "f"),
    Op.NOT: OpInfo((1,), "b"),
    Op.ADD: OpInfo((2,), "f", commutative=True),
    Op.SUB: OpInfo((2,), "f"),
    Op.MUL: OpInfo((2,), "f", commutative=True),
    Op.DIV: OpInfo((2,), "f"),
    Op.POW: OpInfo((2,), "f"),
    Op.MINIMUM: OpInfo((2,), "f", commutative=True),
    Op.MAXIMUM: OpInfo((2,), "f", commutative=True),
    **{op: OpInfo((2,), "b", commutative=op in (Op.EQ, Op.NE)) for op in COMPARE},
    Op.AND: OpInfo((2,), "b", commutative=True),
    Op.OR: OpInfo((2,), "b", commutative=True),
    Op.WHERE: OpInfo((3,), "f"),
    Op.CLAMP: OpInfo((3,), "f"),
    Op.BCE_LOGITS: OpInfo((2, 3), "f"),
    Op.BCE_PROB: OpInfo((2,), "f"),
    **{op: OpInfo((1,), "f") for op in ROW_REDUCTIONS},
    Op.WEIGHT: OpInfo((2,), "f"),
    Op.REDUCE: OpInfo((1, 2), "f"),
    Op.SCALE: OpInfo((1,), "f"),
    Op.OUTPUT: OpInfo((1,), "s"),
    Op.KERNEL: OpInfo(tuple(range(0, 16)), "f"),
}

REDUCTIONS = ("none", "mean", "sum")


def stage_of(op: Op) -> Stage:
    """The pipeline stage an op belongs to (everything else is elementwise)."""
    return STAGE_OPS.get(op, Stage.ELEMENTWISE)
