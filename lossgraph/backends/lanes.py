"""Short rows batched across SIMD lanes: the cpp skeleton's second schedule for row losses.

Note [Rows across lanes]: a row kernel walks each row in k-loops (a max, a sum, the gradient);
vectorized along k, a short row (DFL's 17 bins, a 21-class softmax) is two vectors and a scalar
tail per loop, plus a horizontal reduction per row sum or max: per-row overhead, not
arithmetic, set the time. For K <= LANES_K the cpp kernel instead takes LG_RB rows at once and
puts row j in vector lane j: every k-loop becomes `for k: for j in lanes` with j innermost and
vectorized, so there is no tail (K iterations of full vectors) and no horizontal reduction (each
lane accumulates its own row). Loads and stores along j are strided by K (gcc emits them element
by element; the row group is in L1). Per-row values that a later loop needs live in small
per-lane arrays `l_v<id>[LG_RB]` (`l_w<id>` for a row value kept in double, Note [Row values
in double] in clower), saved where computed and reloaded where used.

The statements are clower's, unchanged (Note [One element body]); this module only regroups
them. Sums within a row are kept in double here (each lane adds its own row's K <= 64 terms; the
conversion is two instructions per vector, small next to the exp that makes a term), so a short
row's sums are exact to the last bit of T, more exact than the row schedule's float blocks;
rows are added in double in row order, so the result is still independent of the thread count.
Rows that do not fill a group take the row schedule."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

LANES_K = 64            # rows up to this width are batched; wider rows are long enough alone
DECL = re.compile(r"^(?:const )?([A-Za-z_][A-Za-z_ ]*?) ([vw]\d+) = ")
NAME = re.compile(r"\b[vw]\d+\b")
BUF = re.compile(r"lg_buf\[(\d+) \* K \+ k\]")
# Note [Pred tile]: the k-loops of a group read pred along j, strided by K, which gcc does
# element by element (a load and an insert per lane). When two or more k-loops read it, the
# first copies the group's values to a k-major tile (one strided pass) and every k-loop then
# reads the tile with plain vector loads. The values are the same; only where they come from.
PRED = "lg_ld(p_pred[(base + k)])"
TILE = "lg_tile[k * LG_RB + j]"


@dataclass
class Block:
    """One loop over the lanes of a row group (inside a k-loop when `k`)."""

    lines: list[str]
    k: bool = False         # inside `for k in [0, K)`
    simd: bool = True       # straight-line code: vectorize along the lanes


@dataclass
class Lanes:
    """The row-group schedule: per-lane arrays, the blocks in order, the group's sum."""

    arrays: list[tuple[str, str]] = field(default_factory=list)   # (C type, name)
    blocks: list[Block] = field(default_factory=list)
    _saved: dict[str, str] = field(default_factory=dict)
    tile: bool = False         # pred's values of the group copied to lg_tile (Note [Pred tile])

    def add(self, lines: list[str], k: bool = False, simd: bool = True, save=True):
        """Append a block: reload the per-row values it reads, save those it declares (all of
        them, or only the names in `save`)."""
        lines = [BUF.sub(r"lg_lbuf[(\1 * K + k) * LG_RB + j]", line) for line in lines]
        if k and self.tile:    # Note [Pred tile]
            lines = [line.replace(PRED, TILE) for line in lines]
        declared = {m.group(2): m.group(1) for m in map(DECL.match, lines) if m}
        used = {n for line in lines for n in NAME.findall(line)} - set(declared)
        restore = [f"const {self._saved[n]} {n} = l_{n}[j];" for n in sorted(used, key=_id)
                   if n in self._saved]
        keep = []
        if save:
            for n, ctype in declared.items():
                if save is not True and n not in save:
                    continue
                self._saved[n] = ctype
                self.arrays.append((ctype, f"l_{n}"))
                keep.append(f"l_{n}[j] = {n};")
        self.blocks.append(Block(restore + lines + keep, k, simd))

    def finish(self) -> "Lanes":
        """Drop the per-lane copies that no later block reads."""
        read = {n for b in self.blocks for line in b.lines
                for n in re.findall(r"\b(l_[vw]\d+)\[j\];$", line) if line.startswith("const ")}
        self.arrays = [(t, n) for t, n in self.arrays if not n.startswith("l_") or n in read]
        for b in self.blocks:
            b.lines = [x for x in b.lines
                       if not (re.match(r"l_[vw]\d", x) and x.split("[")[0] not in read)]
        return self

    def array(self, ctype: str, name: str) -> str:
        """Declare a per-lane array that blocks update in place."""
        self.arrays.append((ctype, name))
        return name


def _id(name: str) -> tuple[int, str]:
    return int(name[1:]), name[0]


def lanes(k) -> Lanes | None:
    """The lanes schedule of a row kernel (a clower CKernel), or None when it has none: flat
    kernels have no rows, and rows with a skip guard keep the row schedule (skipping is
    their speed)."""
    if k.flat or k.guard is not None:
        return None
    s = Lanes()
    lf = s.array("double", "lg_lf") if k.loss_mode == "acc_elem" else None
    s.add(list(k.row_pre) + ([f"{lf}[j] = 0.0;"] if lf else []))
    loops = [p["stmts"] for p in k.passes if p["reds"]] + \
        [k.hot.body0 if k.hot is not None else k.final]
    if sum(any(PRED in line for line in body) for body in loops) >= 2:
        s.add([f"{TILE} = {PRED};"], k=True, save=False)
        s.tile = True
    for p in k.passes:
        for name, label, stmts, e in p["gathers"]:
            s.add([f"T {name} = (T)0;", f"if ({label} >= 0 && {label} < K) {{",
                   f"const long long k = (long long){label};", *stmts, f"{name} = {e};", "}"]
                  + ([f"const double w{name[1:]} = (double){name};"] if k.wide else []),
                  simd=False, save=(name, f"w{name[1:]}"))
        if p["reds"]:
            init, update, final = [], [], []
            for name, op, e in p["reds"]:
                if op == "rowsum":
                    a = s.array("double", f"{name}_l")
                    init.append(f"{a}[j] = 0.0;")
                    update.append(f"{a}[j] += (double)({e});")
                    final.append(f"const T {name} = (T){a}[j];")
                    if k.wide:   # Note [Row values in double] (clower): the sum as it is
                        final.append(f"const double w{name[1:]} = {a}[j];")
                else:
                    a = s.array("T", f"{name}_l")
                    nan = s.array("int", f"{name}_n")
                    init += [f"{a}[j] = (T)-LG_INF;", f"{nan}[j] = 0;"]
                    update += [f"{a}[j] = {a}[j] > {e} ? {a}[j] : {e};", f"{nan}[j] |= ({e} != {e});"]
                    final.append(f"const T {name} = {nan}[j] ? (T)LG_NAN : {a}[j];")
            s.add(init, save=False)
            s.add(list(p["stmts"]) + update, k=True, save=False)
            s.add(final + list(p["row_post"]))
        elif p["row_post"]:
            s.add(list(p["row_post"]))
    _final(s, k, lf)
    return s.finish()


def _outputs(k, stmts, loss, grad, lf, skip=None) -> list[str]:
    """An element body followed by its gradient store and its loss store or accumulation."""
    out = list(stmts)
    if grad:
        out.append(f"grad_out[base + k] = {grad};")
    if k.loss_mode == "store_elem":
        out.append(f"loss_out[base + k] = {loss};")
    elif k.loss_mode == "acc_elem":
        out += [f"const T lg_c = {loss};", f"{lf}[j] += ({skip}) ? 0.0 : (double)lg_c;"] if skip \
            else [f"{lf}[j] += (double)({loss});"]
    return out


def _final(s: Lanes, k, lf) -> None:
    """The last k-loop (one-hot split or plain), then each row's loss in row order."""
    h = k.hot
    if h is not None:
        y = f"const long long lg_y = (long long){h.index};"
        s.add([y] + _outputs(k, h.body0, h.loss0, h.grad0, lf, "k == lg_y"), k=True, save=False)
        s.add([y, "if (lg_y >= 0 && lg_y < K) {", "const long long k = lg_y;",
               *_outputs(k, h.body1, h.loss1, h.grad1, lf), "}"], simd=False, save=False)
    elif k.final:
        s.add(_outputs(k, k.final, k.loss_expr, k.grad_expr, lf), k=True, save=False)
    if k.loss_mode == "store_row":
        s.add([f"loss_out[r] = {k.loss_expr};"], save=False)
    elif k.loss_mode == "acc_row":
        s.add([f"acc += (double){k.loss_expr};"], simd=False, save=False)
    elif lf is not None:
        s.add([f"acc += (double){lf}[j];"], simd=False, save=False)
