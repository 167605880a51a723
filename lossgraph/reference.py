"""The reference interpreter: evaluates any IR graph with eager torch ops. The executable spec.

Every backend is tested against it, and the constant-folding pass uses it to fold constants, so
the meaning of each op is written down exactly once, here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ir import Graph, Load
from .ops import Op


def _bce_logits(x, t, pw=None):
    # torch's own formula: (1 - t) * x - (1 + (pw - 1) * t) * log_sigmoid(x)
    lw = 1 if pw is None else (pw - 1) * t + 1
    return (1 - t) * x - lw * F.logsigmoid(x)


def _bce_prob(p, t):
    # torch's own formula: both logs clamped at -100
    return (t - 1) * torch.clamp(torch.log1p(-p), min=-100) - t * torch.clamp(torch.log(p), min=-100)


def _softplus(x):
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


EVAL: dict[Op, Callable] = {
    Op.NEG: torch.neg, Op.ABS: torch.abs, Op.SIGN: torch.sign, Op.EXP: torch.exp,
    Op.LOG: torch.log, Op.LOG1P: torch.log1p, Op.SQRT: torch.sqrt, Op.SIGMOID: torch.sigmoid,
    Op.LOGSIGMOID: F.logsigmoid, Op.SOFTPLUS: _softplus, Op.FLOOR: torch.floor,
    Op.ATAN: torch.atan, Op.ASIN: torch.asin, Op.COS: torch.cos, Op.SIN: torch.sin,
    Op.TANH: torch.tanh, Op.RECIP: torch.reciprocal, Op.NOT: torch.logical_not,
    Op.STOPGRAD: torch.Tensor.detach,
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div, Op.POW: torch.pow,
    Op.MINIMUM: torch.minimum, Op.MAXIMUM: torch.maximum, Op.LT: torch.lt, Op.LE: torch.le,
    Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq, Op.NE: torch.ne, Op.AND: torch.logical_and,
    Op.OR: torch.logical_or, Op.WHERE: torch.where,
    Op.CLAMP: lambda x, lo, hi: torch.clamp(x, min=lo, max=hi),
    Op.BCE_LOGITS: _bce_logits, Op.BCE_PROB: _bce_prob,
    Op.ROWSUM: lambda x: torch.sum(x, -1, keepdim=True),
    Op.ROWMAX: lambda x: torch.amax(x, -1, keepdim=True),
    Op.ROWLSE: lambda x: torch.logsumexp(x, -1, keepdim=True),
    Op.WEIGHT: torch.mul,
}
# Ops with an attribute or a context, evaluated in `evaluate` itself.
SPECIAL = (Op.INPUT, Op.CONST, Op.IOTA, Op.WIDTH, Op.FLOAT, Op.REDUCE, Op.SCALE, Op.OUTPUT, Op.KERNEL)


def load(ld: Load, inputs: dict[str, torch.Tensor], tables: dict[str, tuple], dtype) -> torch.Tensor:
    """An input in the interpreter's layout: elem (R,K), row (R,1), col (K,), scalar 0-d."""
    if ld.name in tables:
        return torch.tensor(tables[ld.name], dtype=dtype, device=inputs["pred"].device)
    t = inputs[ld.name]
    if ld.comp is not None:
        return t[:, ld.comp:ld.comp + 1]
    if ld.access == "row":
        return t.reshape(-1, 1)
    if ld.access == "scalar":
        return torch.as_tensor(t, dtype=dtype)
    return t


def evaluate(g: Graph, inputs: dict[str, torch.Tensor], dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Evaluate graph g; `inputs` holds pred as (R, K), per-row inputs as (R,), scalars as numbers."""
    env: dict[int, torch.Tensor] = {}
    width = inputs["pred"].shape[-1]
    for i in g.topo():
        n = g[i]
        args = [env[s] for s in n.srcs]
        if n.op is Op.INPUT:
            env[i] = load(n.arg, inputs, g.tables, dtype)
        elif n.op is Op.CONST:
            env[i] = torch.tensor(n.arg, dtype=torch.bool if isinstance(n.arg, bool) else dtype)
        elif n.op is Op.IOTA:
            env[i] = torch.arange(width, device=inputs["pred"].device)
        elif n.op is Op.WIDTH:
            env[i] = torch.tensor(float(width), dtype=dtype)
        elif n.op is Op.FLOAT:
            env[i] = args[0].to(dtype)
        elif n.op is Op.REDUCE:
            env[i] = reduce(n.arg, *args)
        elif n.op is Op.SCALE:
            env[i] = args[0] * n.arg
        elif n.op is Op.OUTPUT:
            env[i] = args[0]
        elif n.op is Op.KERNEL:
            env[i] = evaluate(n.arg.body, inputs, dtype)   # a dict of the body's outputs
        else:
            env[i] = EVAL[n.op](*args)
    outs = {}
    for name, i in g.outputs().items():
        v = env[i]
        outs[name] = v[name] if isinstance(v, dict) else v
    return outs


def reduce(mode: str, x: torch.Tensor, denom=None) -> torch.Tensor:
    """The REDUCE stage: 'none' keeps x, 'sum' sums it, 'mean' divides the sum by denom."""
    if mode == "none":
        return x
    if mode == "sum":
        return x.sum()
    return x.sum() / denom


def fold_value(op: Op, values: list):
    """Evaluate one op on Python constants in float64 (used by constant folding)."""
    ts = [torch.tensor(v, dtype=torch.bool if isinstance(v, bool) else torch.float64) for v in values]
    out = ts[0].to(torch.float64) if op is Op.FLOAT else EVAL[op](*ts)
    return bool(out.item()) if out.dtype is torch.bool else float(out.item())
