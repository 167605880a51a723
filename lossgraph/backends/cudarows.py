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
- long rows: one warp per row, each pass a k-loop as before (the row is in L1 by then).
Reductions accumulate in T (float for float/half pred) within a row, per lane and then over the
group's lanes by xor butterflies; the row's loss is added to the thread's double accumulator, so
rows are summed in double as before. A row maximum propagates NaN (lg_max), as the reference's
max does, and the softmax stays max-shifted: exp(x - max) never overflows for huge logits.
The error of a float row sum of at most 32 * SLOTS terms in this tree is a few float ulps, far
inside the tolerances the emulated tests hold the kernels to (2e-6 for float32).
"""
from __future__ import annotations

import re

SLOTS = 4        # columns per lane held in registers on the short-row path
DECL = re.compile(r"^const [\w ]+? (v\d+) = ")


def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def element(stmts: list[str], loss: str, grad: str | None, at: str, mode: str) -> list[str]:
    """One element: its statements, the gradient store, and an element loss."""
    out = list(stmts)
    if grad:
        out.append(f"lg_st(&grad_out[{at}], LG_GRAD({grad}));")
    if mode == "store_elem":
        out.append(f"loss_out[{at}] = {loss};")
    elif mode == "acc_elem":
        out.append(f"acc += (double){loss};")
    return out


def _final_parts(k, hot):
    """(shared statements, [(test or None, statements, loss, grad)]) of the last k-loop."""
    if hot is None:
        return list(k.final), [(None, [], k.loss_expr, k.grad_expr)]
    return list(hot.common), [(f"k == (long long){hot.index}", hot.body1, hot.loss1, hot.grad1),
                              (None, hot.body0, hot.loss0, hot.grad0)]


def _row_loss(k, lane_test: str) -> list[str]:
    if k.loss_mode == "store_row":
        return [f"if ({lane_test}) loss_out[r] = {k.loss_expr};"]
    if k.loss_mode == "acc_row":
        return [f"if ({lane_test}) acc += (double){k.loss_expr};"]
    return []


def _gathers(p) -> list[str]:
    out = []
    for name, label, stmts, e in p["gathers"]:
        out.append(f"T {name} = (T)0;   /* a row sum that is zero off column {label}: a gather */")
        out.append(f"if ({label} >= 0 && {label} < K) {{")
        out.append(f"  const long long k = (long long){label};")
        out += _indent(stmts, 2)
        out.append(f"  {name} = {e};")
        out.append("}")
    return out


def _butterfly(reds, first: str) -> list[str]:
    out = [f"for (int o = {first}; o > 0; o >>= 1) {{"]
    for name, op, _ in reds:
        if op == "rowsum":
            out.append(f"  {name}_a += __shfl_xor_sync(0xffffffffu, {name}_a, o);")
        else:
            out.append(f"  {name}_a = lg_max({name}_a, __shfl_xor_sync(0xffffffffu, {name}_a, o));")
    out.append("}")
    out += [f"const T {name} = {name}_a;" for name, _, _ in reds]
    return out


def _init(reds) -> list[str]:
    return [f"T {name}_a = {'(T)0' if op == 'rowsum' else '(T)-LG_INF'};" for name, op, _ in reds]


def _update(name: str, op: str, e: str) -> str:
    return f"{name}_a += {e};" if op == "rowsum" else f"{name}_a = lg_max({name}_a, {e});"


def long_rows(k, hot) -> list[str]:
    """One warp per row, a k-loop per pass."""
    out = []
    for p in k.passes:
        out += _gathers(p)
        if p["reds"]:
            out += _init(p["reds"])
            out.append("for (long long k = lane; k < K; k += 32) {")
            out += _indent(p["stmts"], 2)
            out += ["  " + _update(n, op, e) for n, op, e in p["reds"]]
            out.append("}")
            out += _butterfly(p["reds"], "16")
        out += p["row_post"]
    common, branches = _final_parts(k, hot)
    if k.final or hot:
        out.append("for (long long k = lane; k < K; k += 32) {")
        body = list(common)
        if hot is None:
            body += element([], k.loss_expr, k.grad_expr, "base + k", k.loss_mode)
        else:
            (t, b1, l1, g1), (_, b0, l0, g0) = branches
            body.append(f"if ({t}) {{")
            body += _indent(element(b1, l1, g1, "base + k", k.loss_mode), 2)
            body.append("} else {")
            body += _indent(element(b0, l0, g0, "base + k", k.loss_mode), 2)
            body.append("}")
        out += _indent(body, 2)
        out.append("}")
    return out + _row_loss(k, "lane == 0")


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
    common, branches = _final_parts(k, hot)
    lists = [p["stmts"] for p in k.passes] + [common] + [b for _, b, _, _ in branches]
    names = {m.group(1) for stmts in lists for s in stmts if (m := DECL.match(s))}
    slots = [_Slot(j, names) for j in range(SLOTS)]
    out = []
    for s in slots:
        out.append(f"const int ok_{s.j} = lane + {s.j} * lg_gw < K;")
        out.append(f"const long long k_{s.j} = ok_{s.j} ? lane + {s.j} * lg_gw : K - 1;")
    for p in k.passes:
        out += _gathers(p)
        if p["reds"]:
            out += _init(p["reds"])
            for s in slots:
                out += s.emit(p["stmts"])
                for name, op, e in p["reds"]:
                    # a clamped column repeats column K - 1: harmless to a maximum; column
                    # lane < G <= K of slot 0 always exists
                    upd = _update(name, op, s.rename(e))
                    out.append(upd if op == "rowmax" or s.j == 0 else f"if (ok_{s.j}) {upd}")
            out += _butterfly(p["reds"], "lg_gw >> 1")
        out += p["row_post"]
    if k.final or hot:
        for s in slots:
            body = s.emit(common)
            for t, stmts, loss, grad in branches:
                part = s.emit(stmts, set(s.seen))
                part += [s.rename(x) for x in element([], loss, grad, "base + k", k.loss_mode)]
                if hot is None:
                    body += part
                elif t is not None:
                    body += [f"if ({s.rename(t)}) {{", *_indent(part, 2), "} else {"]
                else:
                    body += [*_indent(part, 2), "}"]
            out.append(f"if (ok_{s.j} && lg_row_ok) {{")
            out += _indent(body, 2)
            out.append("}")
    return out + _row_loss(k, "lane == 0 && lg_row_ok")
