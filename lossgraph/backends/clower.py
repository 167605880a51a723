"""Lowering shared by the native backends (cpp and CUDA): decompose, schedule, render C statements.

Note [One element body]: both native backends render the fused body through this module, so the
C statements of every element are the same text in the CPU and the GPU kernel; only the loop
skeletons differ (templates/cpp, templates/cuda). The element math of a CUDA kernel is therefore
verified numerically on the CPU through its cpp twin. The per-row code and the one-hot label
column of a float cpp kernel are the exception: computed in double there (Note [Row values in
double]), as before in CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..build import Variant
from ..ir import Graph, Load, Node
from ..ops import Level, Op, ROW_REDUCTIONS
from ..passes.fold import COLUMN_RULES, specialize
from .base import signature
from .decompose import decompose

# -- scheduling -----------------------------------------------------------------------------------


def elem_closure(g: Graph, roots, levels: dict[int, Level], through=lambda i: False,
                 stop=frozenset()) -> set[int]:
    """The element-level nodes the roots need within one k-loop: the walk stops at per-row and
    per-call values (computed outside the loop, e.g. a row reduction's result), unless
    `through(node)` says the loop must compute that node itself; nodes in `stop` are included
    but not walked through (their value comes from a row buffer)."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        i = stack.pop()
        if i in seen or not (levels.get(i) is Level.ELEM or through(i)):
            continue
        seen.add(i)
        if i not in stop:
            stack.extend(g[i].srcs)
    return seen


@dataclass
class Schedule:
    """Where each node is computed: once per call, per row (after pass p), per element (pass p)."""

    levels: dict[int, Level]
    row_after: dict[int, int]             # row node -> index of the pass whose results it needs
    elem_in: dict[int, set[int]]          # pass index -> elem nodes computed in that k-loop
    reductions: dict[int, list[int]]      # pass index -> reduction nodes finalized after it
    final: int                            # index of the last k-loop (outputs); 0 if none
    flat: bool                            # no per-row structure at all: one flat loop
    npasses: int = 0                      # k-loops that compute row reductions, before `final`


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
        elem_in[p] |= elem_closure(g, [g[r].srcs[0] for r in reds], lv)
    outs = g.outputs()
    roots = [g[o].srcs[0] for o in outs.values()] + [g[r].srcs[0] for r in g.find(Op.REDUCE)]
    elem_in[final] |= elem_closure(g, roots, lv)
    if "grad" not in outs and not elem_in[final]:
        final = 0
    row_after = {i: depth[i] for i in order if lv[i] is Level.ROW}
    has_rows = bool(row_after) or any(g[i].op is Op.IOTA or
                                      (g[i].op is Op.INPUT and g[i].arg.access == "col")
                                      for i in order)
    return Schedule(lv, row_after, elem_in, reductions, final, not has_rows,
                    max(reductions, default=0))


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
# Note [Row values in double]: in a float cpp kernel (lower(wide=True)) the row sums (gathers
# too) and the per-row values that depend on them are computed in double: the sums are double
# already (Note [Blocked sums], lanes.py), and were cast to T before log(s), lse - x_y and the
# row's loss, each rounding once more; now such a value is `const double w<i>`, rounded once
# where it is stored, followed by its T copy v<i>, which the element statements read (they stay
# float and vectorized, same text). Row values computed before any sum (a label's bins and their
# weights, DFL's left + 1 - t) stay T, as torch computes them: in double they cost DFL 3-5% more
# (its lanes schedule keeps them in per-lane arrays), for one rounding of the bin weight. The
# k == y column of a one-hot split (Hot.body1: one element per row, scalar code) does its
# arithmetic in double too, so a softmax gradient's p - 1 rounds once instead of twice (p = e /
# s, then p - 1); its exp/log stay the T functions on T operands (the same e as in the row sum;
# libm's double exp there cost a CE row 4%). Cost, measured (ctypes, one thread, min of 60 runs,
# run-to-run noise 2%): CE 100k x 81 +1-3%, DFL 160k x 17 +1-2%. See Note [As exact as torch]
# (tests/test_rows.py) for what this buys. CUDA row kernels set `wide` too (cudarows.py, Note
# [Row values on CUDA]); element kernels and float64 kernels (T is double there) do not.
# CD is C with double functions; lg_dmin/lg_dmax/lg_dclamp/lg_dbce_prob are the cpp template's.
CD: dict[Op, str] = C | {
    Op.ABS: "fabs({0})", Op.SIGN: "((double)(({0} > 0) - ({0} < 0)))", Op.EXP: "exp({0})",
    Op.LOG: "log({0})", Op.LOG1P: "log1p({0})", Op.SQRT: "sqrt({0})", Op.FLOOR: "floor({0})",
    Op.ATAN: "atan({0})", Op.ASIN: "asin({0})", Op.COS: "cos({0})", Op.SIN: "sin({0})",
    Op.TANH: "tanh({0})", Op.RECIP: "(1.0 / {0})", Op.FLOAT: "((double){0})",
    Op.POW: "pow({0}, {1})", Op.MINIMUM: "lg_dmin({0}, {1})", Op.MAXIMUM: "lg_dmax({0}, {1})",
    Op.CLAMP: "lg_dclamp({0}, {1}, {2})", Op.BCE_PROB: "lg_dbce_prob({0}, {1})",
    Op.WIDTH: "((double)K)",
}


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


def dliteral(v) -> str:
    """A double literal that is valid C and CUDA for every float, inf and NaN included."""
    v = float(v)
    if math.isnan(v):
        return "((double)LG_NAN)"
    if math.isinf(v):
        return "((double)LG_INF)" if v > 0 else "(-(double)LG_INF)"
    return repr(v)


@dataclass
class Hot:
    """Note [One-hot split]: when every use of the class index k in a row goes through one test
    `k == y` against a per-row integer y (a label), the row is computed as two specializations of
    the element body: with the test false for every column (vectorized, no compares, half the
    terms folded away) and with it true at column y only (scalar). The loops skip column y
    instead of patching it afterwards, so an inf or NaN there cannot leak into the row's sum."""

    index: str                 # C expression of y (row level)
    body0: list[str]           # element statements with k != y
    loss0: str
    grad0: str | None
    body1: list[str]           # element statements at k == y
    loss1: str
    grad1: str | None


@dataclass
class CKernel:
    """The rendered pieces a C skeleton (template) places into its loops."""

    name: str
    params: list[tuple[str, str, str]]        # (C type, name, access)
    scalar: list[str]                         # once per call
    row_pre: list[str]                        # per row, before any k-loop
    passes: list[dict]                        # per pass: {stmts, reds, gathers, row_post}
    final: list[str]                          # per element in the last k-loop
    flat: bool
    loss_mode: str                            # 'acc_elem' | 'acc_row' | 'store_elem' | 'store_row'
    loss_expr: str                            # the value accumulated or stored
    grad_expr: str | None
    epilogue: list[str]                       # double math after the reduction
    total: str                                # the final loss value (double)
    tables: dict[str, tuple] = field(default_factory=dict)
    hot: Hot | None = None
    nbuf: int = 0                             # row buffers (K values of T each) the cpp loops use
    guard: str | None = None                  # a row with this false has loss 0 and gradient 0
    wide: bool = False                        # Note [Row values in double]: w<id> row values


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


def _ctype(ld: Load) -> str:
    return "LT" if ld.kind == "i" else "T"


def render_nodes(g: Graph, levels: dict[int, Level], flat: bool) -> tuple[dict, dict]:
    """C expression (a name or a literal) and declaration of every node; names are v<node id>,
    stable across the specialized copies of the graph."""
    kinds = g.kinds()
    expr: dict[int, str] = {}
    decl: dict[int, str] = {}
    for i in g.topo():
        n = g[i]
        args = [expr.get(s, "") for s in n.srcs]
        name = f"v{i}"
        if n.op is Op.INPUT:
            expr[i] = _load(n.arg, flat)
            if levels[i] in (Level.ELEM, Level.ROW):
                decl[i], expr[i] = f"const {_ctype(n.arg)} {name} = {expr[i]};", name
        elif n.op is Op.CONST:
            expr[i] = literal(n.arg)
        elif n.op in ROW_REDUCTIONS:
            expr[i] = name
        elif levels[i] is Level.TOTAL:
            expr[i] = ""                      # rendered by _epilogue, after the reduction
        elif n.op in (Op.REDUCE, Op.OUTPUT):
            expr[i] = args[0]                 # reduction 'none' is the identity
        elif n.op is Op.SCALE:
            expr[i], decl[i] = name, f"const T {name} = ({args[0]} * {literal(n.arg)});"
        else:
            text = ("(i % K)" if flat else "k") if n.op is Op.IOTA else C[n.op].format(*args)
            if n.op is Op.LOG1P and _exp_of_negative(g, n.srcs[0]):
                text = f"lg_log1p01({args[0]})"
            ctype = CTYPE[kinds[i]]
            if n.op is Op.IOTA:
                # Note [32-bit class index]: k compared with a float (k < num_classes, DFL's
                # k == bin) converts it per element; AVX2 has no vector int64 -> float, so a
                # long long k kept those loops scalar. A row has far fewer than 2^31 columns.
                ctype, text = "int", f"(int){text}"
            expr[i], decl[i] = name, f"const {ctype} {name} = {text};"
    return expr, decl


def _exp_of_negative(g: Graph, i: int) -> bool:
    """True for exp(-|x|), a value known to lie in [0, 1] (or be NaN)."""
    n = g[i]
    if n.op is not Op.EXP:
        return False
    m = g[n.srcs[0]]
    return m.op is Op.NEG and g[m.srcs[0]].op is Op.ABS


def wide_decls(g: Graph, ids, have: set[int], expr: dict, decl: dict,
               narrow=()) -> dict[int, list[str]]:
    """Note [Row values in double]: declarations of the nodes `ids` computed in double. A float
    node i is `const double w<i>`, followed by its T copy `v<i>` (what element statements read,
    so their text and math stay as they are); an operand reads `w<s>` where s was declared here
    or is in `have` (double values declared before), else its usual T expression; bool and int
    nodes keep their type and name and compare the double operands. Loads and row reductions
    keep their T declaration and add `w<i> = (double)v<i>`, as exact as the value they read; so
    do the ops in `narrow` (computed in T from the T copies of their operands)."""
    kinds = g.kinds()
    out: dict[int, list[str]] = {}

    def arg(s: int) -> str:
        if g[s].op is Op.CONST and kinds[s] == "f":
            return dliteral(g[s].arg)
        if (s in out or s in have) and kinds[s] == "f":
            return f"w{s}"
        return expr.get(s, "")

    for i in g.topo():
        if i not in ids or i not in decl:
            continue
        n = g[i]
        args = [arg(s) for s in n.srcs]
        if n.op is Op.INPUT or n.op in ROW_REDUCTIONS or n.op in narrow:
            out[i] = [decl[i]] + ([f"const double w{i} = (double)v{i};"] if kinds[i] == "f" else [])
            continue
        if n.op is Op.SCALE:
            text = f"({args[0]} * {dliteral(n.arg)})"
        elif n.op is Op.IOTA:
            out[i] = [decl[i]]
            continue
        elif n.op is Op.LOG1P:
            text = f"log1p({args[0]})"
        else:
            text = (CD if kinds[i] == "f" else C)[n.op].format(*args)
        if kinds[i] == "f":
            out[i] = [f"const double w{i} = {text};", f"const T v{i} = (T)w{i};"]
        else:
            out[i] = [f"const {CTYPE[kinds[i]]} v{i} = {text};"]
    return out


def lower(body: Graph, v: Variant, name: str, buffers: bool = False,
          wide: bool = False) -> CKernel:
    """Decompose, schedule and render the fused body into C statements; `buffers` keeps
    transcendental element values of a row from one k-loop to the next (the cpp skeleton)."""
    g = decompose(body, v)
    sch = schedule(g)
    expr, decl = render_nodes(g, sch.levels, sch.flat)
    outs = g.outputs()
    loss_root = g[outs["loss"]].srcs[0]
    red = g.find(Op.REDUCE)[0]
    pre = g[red].srcs[0]
    order = g.topo()
    hot = _hot_test(g, sch)
    bufs = _buffers(g, sch, hot) if buffers and not sch.flat else Buffers({}, {})
    scalar = [decl[i] for i in order if i in decl and sch.levels[i] is Level.SCALAR]
    kinds = g.kinds()
    rows = {i: [decl[i]] for i in decl if sch.levels[i] is Level.ROW}
    passes = [_pass(g, v, sch, p, expr, decl, hot, bufs) for p in range(1, sch.npasses + 1)]
    row_w: set[int] = set()
    if wide:   # Note [Row values in double]: row sums (gathers too) and what depends on them
        sums = set(g.find(Op.ROWSUM))
        row_w = sums | {i for i in order if i in rows and kinds[i] == "f" and
                        g.ancestors(i) & sums}
        rows = {i: lines for i, lines in rows.items() if i not in row_w} | \
            wide_decls(g, row_w, row_w, expr, decl)
    for p, pas in enumerate(passes, 1):
        pas["row_post"] = [line for i in order if i in rows and sch.row_after[i] == p
                           for line in rows[i]]
    row_pre = [line for i in order if i in rows and sch.row_after[i] == 0 for line in rows[i]]
    final = []
    if sch.final:
        need = bufs.closure(g, sch, sch.final, _final_roots(g))
        final = bufs.stmts(order, need, decl, sch.final)
    if g[red].arg == "none":
        mode = "store_elem" if sch.levels[loss_root] is Level.ELEM else "store_row"
    else:
        mode = "acc_elem" if sch.levels[pre] is Level.ELEM else "acc_row"
    loss_node = loss_root if mode.startswith("store") else pre
    grad_node = g[outs["grad"]].srcs[0] if "grad" in outs else None
    split = None
    if hot is not None and sch.final:
        known = {i for i in decl if sch.levels[i] in (Level.ROW, Level.SCALAR)} | \
            {i for i in g.ids() if g[i].op in (Op.CONST, Op.INPUT) or i in sch.row_after}
        split = _split_final(g, v, sch, hot, mode, known, bufs, row_w if wide else None)
    epilogue, total = _epilogue(g, sch, red)
    guard = _guard(g, v, sch, mode) if not sch.flat else None
    at = loss_node
    while g[at].op in (Op.REDUCE, Op.OUTPUT):   # identities: their expression is the operand's
        at = g[at].srcs[0]
    loss_expr = f"w{at}" if at in row_w else expr[loss_node]
    return CKernel(name, _params(g), scalar, row_pre, passes, final, sch.flat, mode,
                   loss_expr, expr[grad_node] if grad_node is not None else None,
                   epilogue, total, dict(g.tables), split, len(bufs.slot), guard, wide)


def _guard(g: Graph, v: Variant, sch: Schedule, mode: str) -> str | None:
    """Note [Skipped rows]: a per-row condition c (known before any k-loop) such that with c
    false the row's loss term and its whole gradient fold to 0, e.g. SeesawLoss's class part on
    background rows. The cpp skeleton then writes the zeros and skips the row's k-loops, so the
    time falls with the share of such rows. A product 0 * w counts as 0 when w does not depend
    on pred (a weight, 1 / avg_factor): MMDetection selects those rows before weighting, so an
    inf or NaN weight there never reached its sum either."""
    outs = g.outputs()
    for c in g.topo():
        if g.kind(c) != "b" or sch.levels[c] is not Level.ROW or sch.row_after.get(c) != 0 or \
                not any(g[u].op is Op.WHERE and g[u].srcs[0] == c for u in g.users(c)):
            continue
        h = _specialized(g, v, c, False)
        lv = h.levels()
        if mode.startswith("acc"):
            loss = h[h.find(Op.REDUCE)[0]].srcs[0]
        else:
            loss = h[h.outputs()["loss"]].srcs[0]
        roots = [loss] + ([h[h.outputs()["grad"]].srcs[0]] if "grad" in outs else [])
        if all(_is_zero(h, lv, i) for i in roots):
            return f"v{c}"
    return None


def _is_zero(h: Graph, lv, i: int) -> bool:
    """0, or 0 times a value that does not depend on any element (see Note [Skipped rows])."""
    n = h[i]
    if n.op is Op.CONST:
        return n.arg == 0.0 and not isinstance(n.arg, bool)
    if n.op in (Op.MUL, Op.WEIGHT):
        a, b = n.srcs
        return (_is_zero(h, lv, a) and _elem_free(h, lv, b)) or \
            (_is_zero(h, lv, b) and _elem_free(h, lv, a))
    return False


def _elem_free(h: Graph, lv, i: int) -> bool:
    """True when no element value (pred, a reduction's operand) feeds node i."""
    return all(lv[j] is not Level.ELEM for j in h.ancestors(i) | {i})


def _final_roots(g: Graph) -> list[int]:
    """The values the last k-loop produces: the outputs and the reduction's operand."""
    outs = g.outputs()
    return [g[o].srcs[0] for o in outs.values()] + [g[r].srcs[0] for r in g.find(Op.REDUCE)]


# Note [Row buffers]: a row's k-loops are separate passes (a reduction must finish before the
# values that need it), and each recomputed every element value it needed, so a softmax paid
# exp(x - m) twice per element (in the row sum, then in the gradient). The cpp skeleton keeps a
# transcendental element value that a later k-loop needs in a per-chunk buffer of K values:
# computed once, stored in the pass that first needs it, loaded in the later ones (the row is
# in L1 for every row size that matters). The stored value is the same T, so results do not
# change. CUDA kernels recompute (a warp holds no row buffer), as before.
TRANSCENDENTAL = (Op.EXP, Op.LOG, Op.LOG1P, Op.POW, Op.ATAN, Op.ASIN, Op.COS, Op.SIN, Op.TANH,
                  Op.SQRT)


@dataclass
class Buffers:
    """Buffered element nodes: their slot in the row buffer and the pass that computes them."""

    slot: dict[int, int]
    producer: dict[int, int]

    def before(self, q: int) -> frozenset:
        """Buffered nodes computed in a pass before q (loaded there, not recomputed)."""
        return frozenset(i for i, p in self.producer.items() if p < q)

    def closure(self, g: Graph, sch: Schedule, q: int, roots) -> set[int]:
        """Element nodes k-loop q computes or loads."""
        return elem_closure(g, roots, sch.levels, stop=self.before(q))

    def stmts(self, order, need, decl, q: int) -> list[str]:
        """Declarations of k-loop q; buffered values are stored where produced, else loaded."""
        out = []
        for i in order:
            if i not in need or i not in decl:
                continue
            if i in self.slot and self.producer[i] < q:
                out.append(f"const T v{i} = lg_buf[{self.slot[i]} * K + k];")
                continue
            out.append(decl[i])
            if i in self.slot and self.producer[i] == q:
                out.append(f"lg_buf[{self.slot[i]} * K + k] = v{i};")
        return out


def _buffers(g: Graph, sch: Schedule, hot) -> Buffers:
    """Transcendental element values a later k-loop of the same row needs again."""
    test = hot[0] if hot is not None else None
    producer: dict[int, int] = {}
    for p in range(1, sch.npasses + 1):
        roots = [g[r].srcs[0] for r in sch.reductions.get(p, [])]
        for i in elem_closure(g, roots, sch.levels, stop=frozenset(producer)):
            if i not in producer and g[i].op in TRANSCENDENTAL and g.kind(i) == "f" and \
                    (test is None or test not in g.ancestors(i)):
                producer[i] = p
    used: set[int] = set()
    later = [(q, [g[r].srcs[0] for r in sch.reductions.get(q, [])])
             for q in range(2, sch.npasses + 1)]
    if sch.final:
        later.append((sch.final, _final_roots(g)))
    for q, roots in later:
        stop = frozenset(i for i, p in producer.items() if p < q)
        used |= elem_closure(g, roots, sch.levels, stop=stop) & stop
    keep = sorted(used)
    return Buffers({i: n for n, i in enumerate(keep)}, {i: producer[i] for i in keep})


def _hot_test(g: Graph, sch: Schedule) -> tuple[int, int] | None:
    """(test node, label node) when the class index is only ever compared with one row label."""
    if sch.flat:
        return None
    iotas = g.find(Op.IOTA)
    tests = {u for i in iotas for u in g.users(i)}
    if len(iotas) != 1 or len(tests) != 1:
        return None
    t = next(iter(tests))
    n = g[t]
    other = [s for s in n.srcs if s != iotas[0]]
    if n.op is not Op.EQ or len(other) != 1 or sch.levels[other[0]] is not Level.ROW or \
            g.kind(other[0]) != "i":
        return None
    return t, other[0]


def _specialized(g: Graph, v: Variant, test: int, value: bool) -> Graph:
    """g with the one-hot test replaced by a constant, folded again."""
    h = g.copy()
    h.replace(test, Node(Op.CONST, (), value))
    return specialize(h, v, COLUMN_RULES)


def _elem_stmts(h: Graph, roots: list[int], levels, decl, known: set[int],
                stop=frozenset()) -> list[str]:
    """Declarations the roots need inside the k loop: element-level nodes, plus any node the
    specialization created that the row and scalar sections of the original graph lack."""
    need = elem_closure(h, roots, levels, through=lambda i: i not in known, stop=stop)
    return [decl[i] for i in h.topo() if i in need and i in decl]


def _decls(h: Graph, decl: dict, lines: list[str]) -> list[tuple[int, str]]:
    """(node, line) for declaration lines of h, in order."""
    back = {line: i for i, line in decl.items()}
    return [(back.get(line, -1), line) for line in lines]


def _roots(h: Graph, mode: str) -> tuple[int | None, int | None]:
    """(per-element loss value, gradient) nodes of a graph, found through its outputs."""
    outs = h.outputs()
    loss = None
    if mode.endswith("elem"):
        loss = h[outs["loss"]].srcs[0] if mode.startswith("store") else h[h.find(Op.REDUCE)[0]].srcs[0]
    return loss, (h[outs["grad"]].srcs[0] if "grad" in outs else None)


def _split_final(g, v, sch, hot, mode, known, bufs, row_w=None) -> Hot:
    """The final k-loop's statements with the test false (k != y) and true (k == y). With
    `row_w` (the row values declared in double), the k == y column is computed in double (Note
    [Row values in double]): one element per row, scalar code, so e.g. a softmax gradient's
    p - 1 is rounded once, when stored."""
    test, label = hot
    parts = []
    for value in (False, True):
        h = _specialized(g, v, test, value)
        lv = h.levels()
        e, d = render_nodes(h, lv, False)
        loss, grad = _roots(h, mode)
        roots = [n for n in (loss, grad) if n is not None]
        stop = bufs.before(sch.final) if not value else frozenset()
        if value and row_w is not None:
            need = elem_closure(h, roots, lv, through=lambda i: i not in known)
            wd = wide_decls(h, need, row_w, e, d, TRANSCENDENTAL)
            body = [line for i in h.topo() if i in wd for line in wd[i]]
            kinds = h.kinds()
            w = {i: f"w{i}" for i in set(wd) | row_w if kinds.get(i) == "f" and
                 h[i].op is not Op.CONST}
            parts.append((body, w.get(loss, e.get(loss, "")),
                          w.get(grad, e.get(grad)) if grad is not None else None))
            continue
        body = _elem_stmts(h, roots, lv, d, known, stop)
        if stop:
            body = [f"const T v{i} = lg_buf[{bufs.slot[i]} * K + k];" if i in stop and
                    line == d.get(i) else line for i, line in _decls(h, d, body)]
        parts.append((body, e.get(loss, ""),
                      e[grad] if grad is not None else None))
    (b0, l0, g0), (b1, l1, g1) = parts
    return Hot(f"v{label}", b0, l0, g0, b1, l1, g1)


def _pass(g, v, sch, p, expr, decl, hot, bufs) -> dict:
    """One k-loop pass; a row sum of a value that is zero off the hot column becomes a gather.
    lower() adds the pass's row_post (the row values it makes computable)."""
    order = g.topo()
    reds, gathers = [], []
    for r in sch.reductions.get(p, []):
        gather = _gather(g, v, sch, hot, r) if g[r].op is Op.ROWSUM else None
        if gather is not None:
            gathers.append((f"v{r}", *gather))
        else:
            reds.append((f"v{r}", g[r].op.value, expr[g[r].srcs[0]]))
    gathered = {name for name, *_ in gathers}
    need = bufs.closure(g, sch, p, [g[r].srcs[0] for r in sch.reductions.get(p, [])
                                    if f"v{r}" not in gathered])
    return {"stmts": bufs.stmts(order, need, decl, p), "reds": reds,
            "gathers": gathers}


def _gather(g, v, sch, hot, r) -> tuple[str, list[str], str] | None:
    """(label, statements at k == label, value) when rowsum's operand is 0 off one column.

    Note [Gathers]: take(x, idx) is rowsum(where(k == idx, x, 0)); when setting that one test
    false folds the operand to 0, the row sum is the value at column idx: one load instead of a
    k-loop. idx may be any per-row value (DFL's two float bin indices too); a float index that is
    not a whole number in [0, K) matches no column, so the label expression maps it to -1."""
    x = g[r].srcs[0]
    for test, label in _index_tests(g, sch, x, hot):
        h0 = _specialized(g, v, test, False)
        src0 = h0[r].srcs[0] if r in h0 else None
        if src0 is None or h0[src0].op is not Op.CONST or h0[src0].arg != 0.0:
            continue
        h1 = g.copy()
        keep = h1.add(Op.OUTPUT, (x,), "_gathered")   # x's value at k == idx, even where the
        h1.replace(test, Node(Op.CONST, (), True))     # rest of that specialization is dead
        h1 = specialize(h1, v, COLUMN_RULES)
        lv = h1.levels()
        e, d = render_nodes(h1, lv, False)
        x1 = h1[keep].srcs[0]
        known = {i for i in g.ids() if i in sch.row_after or sch.levels[i] is Level.SCALAR}
        idx = f"v{label}" if g.kind(label) == "i" else \
            f"((v{label} >= 0 && v{label} < K && v{label} == LG_FLOOR(v{label})) ? " \
            f"(long long)v{label} : -1LL)"
        return (idx, _elem_stmts(h1, [x1], lv, d, known), e[x1])
    return None


def _index_tests(g: Graph, sch: Schedule, x: int, hot) -> list[tuple[int, int]]:
    """(test, index) for every k == index test x depends on, index a per-row value; the hot
    test first."""
    if hot is not None and hot[0] in g.ancestors(x):
        return [hot]
    out = []
    for t in sorted(g.ancestors(x) | {x}):
        n = g[t]
        if n.op is not Op.EQ:
            continue
        a, b = n.srcs
        if g[b].op is Op.IOTA:
            a, b = b, a
        if g[a].op is Op.IOTA and sch.levels.get(b) is Level.ROW:
            out.append((t, b))
    return out


def _epilogue(g: Graph, sch: Schedule, red: int) -> tuple[list[str], str]:
    """Double-precision statements after the reduction: divide by denom, scale by loss_weight."""
    lines, cur = [], None
    for i in g.topo():
        n = g[i]
        if sch.levels[i] is not Level.TOTAL or n.op is Op.OUTPUT:
            continue
        if n.op is Op.REDUCE:
            rhs = "lg_total" if n.arg == "sum" else "lg_total / denom"
        elif n.op is Op.SCALE:
            rhs = f"t{n.srcs[0]} * {dliteral(n.arg)}"
        else:
            raise NotImplementedError(f"{n.op.value} after the reduction")
        lines.append(f"const double t{i} = {rhs};")
        cur = f"t{i}"
    return lines, cur or "lg_total"


def _params(g: Graph) -> list[tuple[str, str, str]]:
    """Kernel tensor parameters in signature order: (C type, name, access); denom is by value."""
    seen: dict[str, Load] = {}
    for ld in g.inputs():
        seen.setdefault(ld.name, ld)
    names = [n for n in signature(g) if n != "denom"]   # the order every backend passes them in
    return [(_ctype(seen[n]), n, seen[n].access) for n in names]
