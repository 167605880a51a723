"""Lowering shared by the native backends (cpp and CUDA): decompose, schedule, render C statements.

Note [One element body]: both native backends render the fused body through this module, so the
C statements of every element are the same text in the CPU and the GPU kernel; only the loop
skeletons differ (templates/cpp, templates/cuda). The element math of a CUDA kernel is therefore
verified numerically on the CPU through its cpp twin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..build import Variant
from ..ir import Graph, Load, Node
from ..ops import Level, Op, ROW_REDUCTIONS
from ..passes.cse import cse
from ..passes.fold import specialize

# -- decomposition of composite ops into primitives ---------------------------------------------


def _decompose_node(g: Graph, i: int, n: Node, shared: dict) -> Node | None:
    """Note [Shared exp(-|x|)]: sigmoid, logsigmoid, softplus and BCE-with-logits of the same x
    all reuse one e = exp(-|x|): sigmoid = 1/(1+e) for x >= 0, e/(1+e) below; logsigmoid =
    min(x,0) - log1p(e); softplus = max(x,0) + log1p(e). One exp and one log1p per element instead
    of two exps, and every form is exact at +-inf and propagates NaN.
    """
    def e_of(x):
        if x not in shared:
            shared[x] = g.add(Op.EXP, (g.add(Op.NEG, (g.add(Op.ABS, (x,)),)),))
        return shared[x]

    if n.op is Op.POW:
        return _integer_pow(g, n)
    one, zero = g.const(1.0), g.const(0.0)
    if n.op is Op.SIGMOID:
        x = n.srcs[0]
        e = e_of(x)
        r = g.add(Op.DIV, (one, g.add(Op.ADD, (one, e))))
        return Node(Op.WHERE, (g.add(Op.GE, (x, zero)), r, g.add(Op.MUL, (e, r))))
    if n.op is Op.LOGSIGMOID:
        x = n.srcs[0]
        return Node(Op.SUB, (g.add(Op.MINIMUM, (x, zero)), g.add(Op.LOG1P, (e_of(x),))))
    if n.op is Op.SOFTPLUS:
        x = n.srcs[0]
        return Node(Op.ADD, (g.add(Op.MAXIMUM, (x, zero)), g.add(Op.LOG1P, (e_of(x),))))
    if n.op is Op.BCE_LOGITS:
        # torch: (1 - t) * x - (1 + (pw - 1) * t) * log_sigmoid(x)
        x, t = n.srcs[:2]
        ls = g.add(Op.LOGSIGMOID, (x,))
        lw = ls if len(n.srcs) == 2 else g.add(Op.MUL, (g.add(Op.ADD, (g.add(Op.MUL, (
            g.add(Op.SUB, (n.srcs[2], one)), t)), one)), ls))
        return Node(Op.SUB, (g.add(Op.MUL, (g.add(Op.SUB, (one, t)), x)), lw))
    if n.op is Op.ROWLSE:
        # torch.logsumexp: the row max, with +-inf replaced by 0, is subtracted before exp
        x = n.srcs[0]
        m = g.add(Op.ROWMAX, (x,))
        m0 = g.add(Op.WHERE, (g.add(Op.EQ, (g.add(Op.ABS, (m,)), g.const(math.inf))), zero, m))
        s = g.add(Op.ROWSUM, (g.add(Op.EXP, (g.add(Op.SUB, (x, m0)),)),))
        return Node(Op.ADD, (g.add(Op.LOG, (s,)), m0))
    return None


def _integer_pow(g: Graph, n: Node) -> Node | None:
    """Note [Integer pow]: x**c for a whole c in [4, 16] becomes multiplications by repeated
    squaring (x**4 = (x*x)*(x*x)): exact to an ulp or two of powf, and no call that costs as much
    as an exp and a log (GaussianFocalLoss's (1 - t)**4). Exponents 2, 3, 0.5 were specialized by
    the fold pass already, exactly as torch evaluates them."""
    base, c = n.srcs[0], g[n.srcs[1]]
    if c.op is not Op.CONST or isinstance(c.arg, bool) or c.arg != int(c.arg) or not 4 <= c.arg <= 16:
        return None
    e, acc, sq = int(c.arg), None, base
    while e:
        if e & 1:
            acc = sq if acc is None else g.add(Op.MUL, (acc, sq))
        e >>= 1
        if e:
            sq = g.add(Op.MUL, (sq, sq))
    return g[acc]


def decompose(body: Graph, v: Variant) -> Graph:
    """Rewrite composite ops into primitives the C templates know, then fold and CSE again."""
    g = body.copy()
    shared: dict[int, int] = {}
    changed = True
    while changed:
        changed = False
        for i in g.topo():
            r = _decompose_node(g, i, g[i], shared)
            if r is not None:
                g.replace(i, r)
                changed = True
    return cse(specialize(g, v), v)


# -- scheduling -----------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Where each node is computed: once per call, per row (after pass p), per element (pass p)."""

    levels: dict[int, Level]
    row_after: dict[int, int]             # row node -> index of the pass whose results it needs
    elem_in: dict[int, set[int]]          # pass index -> elem nodes computed in that k-loop
    reductions: dict[int, list[int]]      # pass index -> reduction nodes finalized after it
    final: int                            # index of the last k-loop (outputs); 0 if none
    flat: bool                            # no per-row structure at all: one flat loop


def schedule(g: Graph) -> Schedule:
    """Assign reductions to k-loop passes by dependency depth; everything else follows."""
    lv, order = g.levels(), g.topo()
    depth: dict[int, int] = {}
    for i in order:
        d = max((depth[s] for s in g[i].srcs), default=0)
        depth[i] = d + 1 if g[i].op in ROW_REDUCTIONS else d
    reductions: dict[int, list[int]] = {}
    for i in order:
        if g[i].op in ROW_REDUCTIONS:
            reductions.setdefault(depth[i], []).append(i)
    final = max(reductions, default=0) + 1
    elem_in: dict[int, set[int]] = {p: set() for p in range(1, final + 1)}
    for p, reds in reductions.items():
        for r in reds:
            elem_in[p] |= {a for a in g.ancestors(r) if lv[a] is Level.ELEM and depth[a] < p}
    outs = g.outputs()
    roots = [g[o].srcs[0] for o in outs.values()] + [g[r].srcs[0] for r in g.find(Op.REDUCE)]
    for o in roots:
        elem_in[final] |= {a for a in g.ancestors(o) | {o} if lv[a] is Level.ELEM}
    if "grad" not in outs and not elem_in[final]:
        final = 0
    row_after = {i: depth[i] for i in order if lv[i] is Level.ROW}
    has_rows = bool(row_after) or any(g[i].op is Op.IOTA or
                                      (g[i].op is Op.INPUT and g[i].arg.access == "col")
                                      for i in order)
    return Schedule(lv, row_after, elem_in, reductions, final, not has_rows)


# -- rendering to C statements ----------------------------------------------------------------------

C: dict[Op, str] = {
    Op.NEG: "(-{0})", Op.ABS: "LG_ABS({0})", Op.SIGN: "((T)(({0} > 0) - ({0} < 0)))",
    Op.EXP: "LG_EXP({0})", Op.LOG: "LG_LOG({0})", Op.LOG1P: "LG_LOG1P({0})",
    Op.SQRT: "LG_SQRT({0})", Op.FLOOR: "LG_FLOOR({0})", Op.ATAN: "LG_ATAN({0})",
    Op.ASIN: "LG_ASIN({0})", Op.COS: "LG_COS({0})", Op.SIN: "LG_SIN({0})", Op.TANH: "LG_TANH({0})",
    Op.RECIP: "((T)1 / {0})", Op.FLOAT: "((T){0})", Op.NOT: "(!{0})", Op.STOPGRAD: "{0}",
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.DIV: "({0} / {1})",
    Op.POW: "LG_POW({0}, {1})", Op.MINIMUM: "lg_min({0}, {1})", Op.MAXIMUM: "lg_max({0}, {1})",
    Op.LT: "({0} < {1})", Op.LE: "({0} <= {1})", Op.GT: "({0} > {1})", Op.GE: "({0} >= {1})",
    Op.EQ: "({0} == {1})", Op.NE: "({0} != {1})", Op.AND: "({0} && {1})", Op.OR: "({0} || {1})",
    Op.WHERE: "({0} ? {1} : {2})", Op.CLAMP: "lg_clamp({0}, {1}, {2})",
    Op.BCE_PROB: "lg_bce_prob({0}, {1})", Op.WEIGHT: "({0} * {1})", Op.IOTA: "k",
    Op.WIDTH: "((T)K)",
}
CTYPE = {"f": "T", "b": "int", "i": "long long"}


def literal(v) -> str:
    """A C literal: the double value cast to T (rounding exactly as torch rounds a Python float)."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return f"{v}LL"
    if math.isnan(v):
        return "((T)LG_NAN)"
    if math.isinf(v):
        return "((T)LG_INF)" if v > 0 else "((T)-LG_INF)"
    return f"((T){float(v)!r})"


@dataclass
class CKernel:
    """The rendered pieces a C skeleton (template) places into its loops."""

    name: str
    params: list[tuple[str, str, str]]        # (C type, name, access)
    scalar: list[str]                         # once per call
    row_pre: list[str]                        # per row, before any k-loop
    passes: list[dict]                        # per pass: {stmts, reds: [(name, op, expr)], row_post}
    final: list[str]                          # per element in the last k-loop
    flat: bool
    loss_mode: str                            # 'acc_elem' | 'acc_row' | 'store_elem' | 'store_row'
    loss_expr: str                            # the value accumulated or stored
    grad_expr: str | None
    epilogue: list[str]                       # double math after the reduction
    total: str                                # the final loss value (double)
    tables: dict[str, tuple] = field(default_factory=dict)


def _name(num: dict[int, int], i: int) -> str:
    return f"v{num[i]}"


def _load(ld: Load, flat: bool) -> str:
    idx = "i" if flat else "(base + k)"
    if ld.comp is not None:
        return f"lg_ld(p_{ld.name}[base + {ld.comp}])"
    if ld.access == "scalar":
        return f"s_{ld.name}"
    at = {"elem": idx, "row": "r", "col": "k"}[ld.access]
    return f"lg_ld(p_{ld.name}[{at}])"


def scalar_loads(params) -> list[str]:
    """Per-call scalars: denom arrives by value, other scalar inputs as one-element arrays."""
    out = ["const T s_denom = (T)denom;"]
    out += [f"const T s_{n} = lg_ld(p_{n}[0]);" for _, n, a in params if a == "scalar" and n != "denom"]
    return out


def lower(body: Graph, v: Variant, name: str) -> CKernel:
    """Decompose, schedule and render the fused body into C statements."""
    g = decompose(body, v)
    sch = schedule(g)
    num, kinds = g.numbering(), g.kinds()
    expr: dict[int, str] = {}
    decl: dict[int, str] = {}
    for i in g.topo():
        n = g[i]
        args = [expr.get(s, "") for s in n.srcs]
        if n.op is Op.INPUT:
            expr[i] = _load(n.arg, sch.flat)
            if sch.levels[i] in (Level.ELEM, Level.ROW):
                decl[i] = f"const {_ctype(n.arg)} {_name(num, i)} = {expr[i]};"
                expr[i] = _name(num, i)
        elif n.op is Op.CONST:
            expr[i] = literal(n.arg)
        elif n.op in ROW_REDUCTIONS:
            expr[i] = _name(num, i)
        elif sch.levels[i] is Level.TOTAL:
            expr[i] = ""                      # rendered by _epilogue, after the reduction
        elif n.op in (Op.REDUCE, Op.OUTPUT):
            expr[i] = args[0]                 # reduction 'none' is the identity
        elif n.op is Op.SCALE:
            expr[i] = _name(num, i)
            decl[i] = f"const T {expr[i]} = ({args[0]} * {literal(n.arg)});"
        else:
            text = ("(i % K)" if sch.flat else "k") if n.op is Op.IOTA else C[n.op].format(*args)
            expr[i] = _name(num, i)
            decl[i] = f"const {CTYPE[kinds[i]]} {expr[i]} = {text};"
    return _assemble(g, v, sch, num, expr, decl, name)


def _ctype(ld: Load) -> str:
    return "LT" if ld.kind == "i" else "T"


def _assemble(g, v, sch: Schedule, num, expr, decl, name) -> CKernel:
    order = g.topo()
    outs = g.outputs()
    loss_root = g[outs["loss"]].srcs[0]
    red = g.find(Op.REDUCE)[0]
    pre = g[red].srcs[0]
    scalar = [decl[i] for i in order if i in decl and sch.levels[i] is Level.SCALAR]
    row_pre = [decl[i] for i in order if i in decl and sch.levels[i] is Level.ROW and
               sch.row_after[i] == 0]
    passes = []
    for p in range(1, sch.final):
        reds = [(_name(num, r), g[r].op.value, expr[g[r].srcs[0]]) for r in sch.reductions.get(p, [])]
        passes.append({
            "stmts": [decl[i] for i in order if i in sch.elem_in[p] and i in decl],
            "reds": reds,
            "row_post": [decl[i] for i in order if i in decl and sch.levels[i] is Level.ROW
                         and sch.row_after[i] == p],
        })
    final = [decl[i] for i in order if sch.final and i in sch.elem_in[sch.final] and i in decl]
    level_pre = sch.levels[pre]
    if g[red].arg == "none":
        mode = "store_elem" if sch.levels[loss_root] is Level.ELEM else "store_row"
    else:
        mode = "acc_elem" if level_pre is Level.ELEM else "acc_row"
    loss_expr = expr[loss_root] if mode.startswith("store") else expr[pre]
    epilogue, total = _epilogue(g, sch, num, expr, red)
    grad = expr[g[outs["grad"]].srcs[0]] if "grad" in outs else None
    params = _params(g)
    return CKernel(name, params, scalar, row_pre, passes, final, sch.flat, mode, loss_expr, grad,
                   epilogue, total, dict(g.tables))


def _epilogue(g: Graph, sch: Schedule, num, expr, red: int) -> tuple[list[str], str]:
    """Double-precision statements after the reduction: divide by denom, scale by loss_weight."""
    lines, cur = [], None
    for i in g.topo():
        n = g[i]
        if sch.levels[i] is not Level.TOTAL or n.op is Op.OUTPUT:
            continue
        if n.op is Op.REDUCE:
            rhs = "lg_total" if n.arg == "sum" else "lg_total / denom"
        elif n.op is Op.SCALE:
            rhs = f"t{num[n.srcs[0]]} * {float(n.arg)!r}"
        else:
            raise NotImplementedError(f"{n.op.value} after the reduction")
        lines.append(f"const double t{num[i]} = {rhs};")
        cur = f"t{num[i]}"
    return lines, cur or "lg_total"


def _params(g: Graph) -> list[tuple[str, str, str]]:
    """Kernel tensor parameters in signature order: (C type, name, access); denom is by value."""
    seen: dict[str, Load] = {}
    for ld in g.inputs():
        seen.setdefault(ld.name, ld)
    names = ["pred"] * ("pred" in seen) + sorted(set(seen) - {"pred", "denom"})
    return [(_ctype(seen[n]), n, seen[n].access) for n in names]
