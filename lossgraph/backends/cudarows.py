"""The CUDA 'rows' schedule (row reductions: softmax cross-entropy, DFL, Seesaw, KD...).

Note [Row groups]: clower gives a row kernel as passes (each a k-loop ending in row sums or
maxima, then the row statements that need them) and a last k-loop for the gradient. The GPU
kernel runs them in one of two shapes, chosen in the kernel from K:
- short rows (K <= 32 * SLOTS, e.g. DFL's 17 bins, COCO's 81 classes): a group of G lanes per
  row, G the smallest power of two with G * SLOTS >= K (a warp holds 32 / G rows). Lane l of a
  group owns columns l, l + G, ..., l + (SLOTS - 1) G, loaded once into registers. Every pass is
  straight-line code over those SLOTS elements, with clower's element statements renamed per
  slot (v7 -> v7_2, k -> k_2) and each statement emitted once per slot: a value an earlier pass
  computed (exp(x - m) of the softmax) is reused by the later passes and by the gradient, not
  recomputed, and pred is read once. A column past K is clamped to K - 1 (so its loads stay in
  bounds) and left out of every reduction and store; a row past R likewise (the warp's loop is
  uniform, so the group shuffles are always full-warp).
- long rows: one warp per row, each pass a k-loop as before (the row is in L1 by then). A max
  pass and the sum of exp(x - max) after it are not fused into one online pass (running max m
  and s = s exp(m_old - m_new) + exp(x - m_new)): hand-fused in CE's kernel (sm_90, NVRTC 13.5,
  one exp per element by a select) that pass took 13.0 instructions per element against
  2.4 + 5.4 for the two k-loops, for one fewer read of a row that L1 holds.
Reductions accumulate in T (float for float/half pred) within a lane, and are merged over the
group's lanes by xor butterflies (a row sum's in double in a float kernel, Note [Row values on
CUDA]); the row's loss is added to the thread's double accumulator, so rows are summed in double
as before. A row maximum propagates NaN (lg_max), as the reference's max does, and the softmax
stays max-shifted: exp(x - max) never overflows for huge logits. The one-hot split's column
k == y (clower's Hot) is computed before the last k-loop by every lane of the row (_label_column);
the last k-loop runs the k != y body at every column, unpredicated, and picks the label column's
values by a select at k == y (a NaN of the k != y body there is dropped, not summed).

Note [Row values on CUDA]: a float row kernel is lowered with clower's `wide` (Note [Row values
in double]), as the cpp kernel is, so that CE softmax, DFL, Seesaw and KD are as exact as torch
at |logit| up to 1e30 strictly (Note [As exact as torch], test_huge_logit_rows_are_as_exact_as_
torch). What is double, and where:
- a row sum: each lane adds its own columns in float (SLOTS terms on the short-row path, K / 32
  on the long one), then the lanes' partials are converted and merged by the butterfly in
  double (log2 G shuffle pairs and DADDs per row); the row gets w<r> (double) and its T copy;
- a gather's value (w<r> = (double)v<r>, exact);
- every per-row value that depends on a row sum (log s, lse - x_y, the row's loss, KD's
  per-row sums over the temperature): clower's w<i>, computed once per row, rounded once;
- the label column k == y (Hot.body1): its arithmetic in double, so a softmax gradient's p - 1
  rounds once; its exp stays the float exp of the row sum's terms.
Element math stays float: no k-loop and no slot of the short-row path has a double instruction
(benchmarks/sass_report.py counts them). The row values' T copies are rounded by lg_narrow (an
asm cvt) before the k-loops: with a plain cast NVRTC kept the double live and converted it
again in every k-loop iteration (CE's gradient loop had 4 F2F.F32.F64 per 4 elements and lost
its per-iteration reciprocal sharing). Cost: per row, not per element: a double log (and a
division, for p of the label column) per row group, in a warp that holds 32 / G rows.
float64 kernels are unchanged (T is double there already).
"""
from __future__ import annotations

import re

SLOTS = 4        # columns per lane held in registers on the short-row path
DECL = re.compile(r"^const [\w ]+? (v\d+) = ")
T_COPY = re.compile(r"^const T (v\d+) = \(T\)(w\d+);$")   # a wide row value's T copy


def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def element(stmts: list[str], loss: str, grad: str | None, at: str, mode: str,
            label: str | None = None) -> list[str]:
    """One element: its statements, the gradient store, and an element loss. With `label` (the
    row's label y) column k == y takes the values _label_column computed (lg_yg, lg_yl) by a
    select, so the element code runs unpredicated and a NaN of the k != y body there is dropped."""
    out = list(stmts)
    at_y = f"k == (long long){label}" if label else None
    if grad:
        g = f"({at_y} ? lg_yg : {grad})" if at_y else grad
        out.append(f"lg_st(&grad_out[{at}], LG_GRAD({g}));")
    if mode == "store_elem":
        out.append(f"loss_out[{at}] = {f'({at_y} ? lg_yl : {loss})' if at_y else loss};")
    elif mode == "acc_elem":
        out.append(f"acc += (double){f'({at_y} ? (T)0 : {loss})' if at_y else loss};")
    return out


def _final_parts(k, hot) -> tuple[list[str], str, str | None]:
    """(statements, loss, gradient) of the last k-loop at every column but the label's."""
    if hot is None:
        return list(k.final), k.loss_expr, k.grad_expr
    return list(hot.common) + list(hot.body0), hot.loss0, hot.grad0


def _label_column(k, hot, lane_test: str) -> list[str]:
    """The one-hot split's column k == y (clower's Hot.body1), computed by every lane of the
    row before the last k-loop; in a float kernel its arithmetic is double, rounded once into
    lg_yg and lg_yl (Note [Row values on CUDA])."""
    if hot is None or not (k.final or hot):
        return []
    y = f"(long long){hot.index}"
    out = ["T lg_yg = (T)0, lg_yl = (T)0;   /* the label column's gradient and loss */",
           "(void)lg_yg; (void)lg_yl;",
           f"if ({y} >= 0 && {y} < K) {{",
           f"  const long long k = {y};"]
    out += _indent(list(hot.common) + list(hot.body1), 2)
    narrow = "lg_narrow" if k.wide else "(T)"
    if hot.grad1:
        out.append(f"  lg_yg = {narrow}({hot.grad1});")
    if k.loss_mode == "store_elem":
        out.append(f"  lg_yl = {narrow}({hot.loss1});")
    elif k.loss_mode == "acc_elem":
        out.append(f"  if ({lane_test}) acc += (double){hot.loss1};")
    return out + ["}"]


def row_post(p) -> list[str]:
    """A pass's row statements; a double row value's T copy is rounded by lg_narrow (Note [Row
    values on CUDA])."""
    return [T_COPY.sub(r"const T \1 = lg_narrow(\2);", line) for line in p["row_post"]]


def _row_loss(k, lane_test: str) -> list[str]:
    if k.loss_mode == "store_row":
        return [f"if ({lane_test}) loss_out[r] = {k.loss_expr};"]
    if k.loss_mode == "acc_row":
        return [f"if ({lane_test}) acc += (double){k.loss_expr};"]
    return []


def _gathers(p, wide: bool) -> list[str]:
    out = []
    for name, label, stmts, e in p["gathers"]:
        out.append(f"T {name} = (T)0;   /* a row sum that is zero off column {label}: a gather */")
        out.append(f"if ({label} >= 0 && {label} < K) {{")
        out.append(f"  const long long k = (long long){label};")
        out += _indent(stmts, 2)
        out.append(f"  {name} = {e};")
        out.append("}")
        if wide:   # Note [Row values on CUDA]: one value, exact in double
            out.append(f"const double w{name[1:]} = (double){name};")
    return out


def _butterfly(reds, first: str, wide: bool) -> list[str]:
    """Merge the lanes' partial reductions; with `wide` (Note [Row values on CUDA]) a row sum's
    partials are merged in double, and the row gets both the sum w<r> and its T copy v<r>."""
    sums = [name for name, op, _ in reds if op == "rowsum"]
    acc = {name: f"{name}_d" if wide else f"{name}_a" for name in sums}
    out = [f"double {name}_d = (double){name}_a;" for name in sums] if wide else []
    out.append(f"for (int o = {first}; o > 0; o >>= 1) {{")
    for name, op, _ in reds:
        if op == "rowsum":
            out.append(f"  {acc[name]} += __shfl_xor_sync(0xffffffffu, {acc[name]}, o);")
        else:
            out.append(f"  {name}_a = lg_max({name}_a, __shfl_xor_sync(0xffffffffu, {name}_a, o));")
    out.append("}")
    for name, op, _ in reds:
        value = f"lg_narrow({name}_d)" if op == "rowsum" and wide else f"{name}_a"
        out.append(f"const T {name} = {value};")
        if op == "rowsum" and wide:
            out.append(f"const double w{name[1:]} = {name}_d;")
    return out


def _init(reds) -> list[str]:
    return [f"T {name}_a = {'(T)0' if op == 'rowsum' else '(T)-LG_INF'};" for name, op, _ in reds]


def _update(name: str, op: str, e: str) -> str:
    return f"{name}_a += {e};" if op == "rowsum" else f"{name}_a = lg_max({name}_a, {e});"


def long_rows(k, hot) -> list[str]:
    """One warp per row, a k-loop per pass."""
    out = []
    for p in k.passes:
        out += _gathers(p, k.wide)
        if p["reds"]:
            out += _init(p["reds"])
            out.append("for (long long k = lane; k < K; k += 32) {")
            out += _indent(p["stmts"], 2)
            out += ["  " + _update(n, op, e) for n, op, e in p["reds"]]
            out.append("}")
            out += _butterfly(p["reds"], "16", k.wide)
        out += row_post(p)
    # the row's own values first: no double is live in the last k-loop (Note [Row values on CUDA])
    out += _label_column(k, hot, "lane == 0") + _row_loss(k, "lane == 0")
    if k.final or hot:
        stmts, loss, grad = _final_parts(k, hot)
        out.append("for (long long k = lane; k < K; k += 32) {")
        out += _indent(element(stmts, loss, grad, "base + k", k.loss_mode,
                               hot and hot.index), 2)
        out.append("}")
    return out


class _Slot:
    """Slot j's copy of the element statements: names renamed, each statement once."""

    def __init__(self, j: int, names: set[str]):
        self.j, self.seen = j, set()
        self.pattern = re.compile(r"\b(k|" + "|".join(sorted(names)) + r")\b") if names else \
            re.compile(r"\b(k)\b")

    def rename(self, text: str) -> str:
        return self.pattern.sub(lambda m: f"{m.group(1)}_{self.j}", text)

    def emit(self, stmts: list[str], seen: set[str] | None = None) -> list[str]:
        seen = self.seen if seen is None else seen
        out = []
        for s in stmts:
            if s not in seen:
                seen.add(s)
                out.append(self.rename(s))
        return out


def short_rows(k, hot) -> list[str]:
    """A group of lanes per row, SLOTS columns per lane in registers (Note [Row groups])."""
    stmts, loss, grad = _final_parts(k, hot)
    lists = [p["stmts"] for p in k.passes] + [stmts]
    names = {m.group(1) for stmts in lists for s in stmts if (m := DECL.match(s))}
    slots = [_Slot(j, names) for j in range(SLOTS)]
    out = []
    for s in slots:
        out.append(f"const int ok_{s.j} = lane + {s.j} * lg_gw < K;")
        out.append(f"const long long k_{s.j} = ok_{s.j} ? lane + {s.j} * lg_gw : K - 1;")
    for p in k.passes:
        out += _gathers(p, k.wide)
        if p["reds"]:
            out += _init(p["reds"])
            for s in slots:
                out += s.emit(p["stmts"])
                for name, op, e in p["reds"]:
                    # a clamped column repeats column K - 1: harmless to a maximum; column
                    # lane < G <= K of slot 0 always exists
                    upd = _update(name, op, s.rename(e))
                    out.append(upd if op == "rowmax" or s.j == 0 else f"if (ok_{s.j}) {upd}")
            out += _butterfly(p["reds"], "lg_gw >> 1", k.wide)
        out += row_post(p)
    out += _label_column(k, hot, "lane == 0 && lg_row_ok") + _row_loss(k, "lane == 0 && lg_row_ok")
    if k.final or hot:
        for s in slots:
            out.append(f"if (ok_{s.j} && lg_row_ok) {{")
            out += _indent(s.emit(stmts), 2)
            out += _indent([s.rename(x) for x in element([], loss, grad, "base + k",
                                                           k.loss_mode, hot and hot.index)], 2)
            out.append("}")
    return out
