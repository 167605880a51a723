"""The IR verifier, run after every pass: operands, kinds, levels and stage order must hold."""
from __future__ import annotations

from ..ir import Graph
from ..ops import INFO, ROW_REDUCTIONS, Level, Op, Stage, stage_of

FLOAT_OPERANDS = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MINIMUM, Op.MAXIMUM, Op.NEG, Op.ABS,
                  Op.EXP, Op.LOG, Op.LOG1P, Op.SQRT, Op.SIGMOID, Op.LOGSIGMOID, Op.SOFTPLUS,
                  Op.ATAN, Op.ASIN, Op.COS, Op.SIN, Op.TANH, Op.RECIP, Op.BCE_LOGITS, Op.BCE_PROB,
                  *ROW_REDUCTIONS, Op.WEIGHT}


class VerifyError(AssertionError):
    """The IR broke an invariant; the message names the node."""


def verify(g: Graph) -> Graph:
    """Check the invariants of g (recursing into kernel bodies); return g unchanged."""
    num, kinds, levels = g.numbering(), g.kinds(), g.levels()
    for i in g.topo():
        n = g[i]
        where = f"{g.name}: %{num[i]} = {n.op.value}"
        if len(n.srcs) not in INFO[n.op].arity:
            raise VerifyError(f"{where} has {len(n.srcs)} operands")
        for s in n.srcs:
            if s not in g:
                raise VerifyError(f"{where} uses a missing node")
            if n.op is not Op.KERNEL and stage_of(g[s].op) > stage_of(n.op) and \
                    stage_of(n.op) is not Stage.OUTPUT:
                raise VerifyError(f"{where} (stage {stage_of(n.op).name}) reads a later stage")
        if n.op in FLOAT_OPERANDS and any(kinds[s] != "f" for s in n.srcs):
            raise VerifyError(f"{where} has a non-float operand")
        if n.op is Op.WHERE and kinds[n.srcs[0]] != "b":
            raise VerifyError(f"{where} condition is not boolean")
        if n.op is not Op.REDUCE and stage_of(n.op) is Stage.ELEMENTWISE and \
                any(levels[s] is Level.TOTAL for s in n.srcs):
            raise VerifyError(f"{where} reads a reduced total")
        if n.op is Op.KERNEL:
            verify(n.arg.body)
    if "loss" not in g.outputs():
        raise VerifyError(f"{g.name}: no 'loss' output")
    return g
