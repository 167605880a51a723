"""The vector tiles of the CUDA 'elem' schedule: 128-bit loads and stores around clower's statements.

Note [Vector tiles]: a thread owns whole vectors of VEC consecutive elements (16 bytes of pred:
4 fp32, 8 fp16/bf16, 2 fp64; a box kernel's vector is one box, VEC = 4). One loop iteration
handles UNROLL vectors in two phases:
- loads: every vector's pred (and elementwise inputs) as 128-bit loads, its row, and the row's
  statements (clower's row_pre: the label and the row weight, read once per vector, i.e. once
  per row segment), all issued before any math so UNROLL x 16 bytes are in flight per thread;
- math: per vector, when it lies in one row and (one-hot split) the row's label is not one of
  its columns, the k != y body runs on the VEC loaded values with no per-element test, and the
  gradient (and a 'none' loss) leaves as 128-bit stores; otherwise (the one vector per row that
  holds the label, or a vector straddling two rows) a scalar loop runs the element code of the
  plain schedule, reloading from L1.
A box vector is its row: the row statements read their coordinates from the loaded vector, and
the element index k is the constant j, so the four gradients share one IoU (one thread per box).
The element statements are clower's text, with only the elementwise loads replaced by the
vector's lanes, so STYLE principle 8 (one element body for cpp and CUDA) still holds.
"""
from __future__ import annotations

import re

SIZE = {"float": 4, "double": 8, "lg_half": 2, "lg_bf16": 2}
DECL = re.compile(r"^const ([\w ]+?) (v\d+) = ")


def vec_width(storage: str, box: bool) -> int:
    """Elements per vector: 16 bytes of pred, or one box."""
    return 4 if box else 16 // SIZE[storage]


def unroll_for(vec: int) -> int:
    """Vectors in flight per thread: 4 (64 bytes of pred; a box kernel's 4 boxes)."""
    return 4


def _chunk_type(nbytes: int) -> str:
    return {16: "uint4", 8: "uint2", 4: "unsigned"}[nbytes]


def _words(name: str, nbytes: int) -> list[str]:
    """The 32-bit words of a vector held in chunks <name>_c<m> (16 bytes each)."""
    if nbytes <= 4:
        return [f"{name}_c0"]
    per = min(nbytes, 16) // 4
    return [f"{name}_c{w // 4}.{'xyzw'[w % 4]}" if per > 1 else f"{name}_c{w // 4}"
            for w in range(nbytes // 4)]


def loads(name: str, ptr: str, ctype: str, vec: int, at: str) -> list[str]:
    """16-byte (or narrower) loads of vec elements of ctype from ptr + at."""
    nbytes = SIZE[ctype] * vec
    chunk = min(nbytes, 16)
    return [f"const {_chunk_type(chunk)} {name}_c{m} = "
            f"*(const {_chunk_type(chunk)}*)({ptr} + {at} + {m * chunk // SIZE[ctype]});"
            for m in range(max(1, nbytes // 16))]


def lane(name: str, ctype: str, vec: int, j: int) -> str:
    """Element j of a loaded vector, as a compute value (float for 16-bit storage)."""
    words = _words(name, SIZE[ctype] * vec)
    if ctype == "float":
        return f"__uint_as_float({words[j]})"
    if ctype == "double":
        return f"__hiloint2double((int){words[2 * j + 1]}, (int){words[2 * j]})"
    w = words[j // 2]
    bits = f"(unsigned short)({w} >> 16)" if j % 2 else f"(unsigned short)({w} & 0xffffu)"
    return f"lg_{'half' if ctype == 'lg_half' else 'bf16'}_to_float({bits})"


def stores(ptr: str, ctype: str, vec: int, at: str, values: list[str]) -> list[str]:
    """Store vec values (compute type) to ptr + at as 16-byte (or narrower) chunks of ctype."""
    if ctype == "float":
        words = [f"__float_as_uint({v})" for v in values]
    elif ctype == "double":
        words = [w for v in values for w in (f"(unsigned)__double2loint({v})",
                                             f"(unsigned)__double2hiint({v})")]
    else:
        pack = "lg_pack_half2" if ctype == "lg_half" else "lg_pack_bf16x2"
        words = [f"{pack}({values[j]}, {values[j + 1]})" for j in range(0, vec, 2)]
    out, step = [], min(len(words), 4)
    for m in range(0, len(words), step):
        part = words[m:m + step]
        typ = _chunk_type(4 * len(part))
        val = part[0] if len(part) == 1 else f"make_{typ}({', '.join(part)})"
        out.append(f"*({typ}*)({ptr} + {at} + {m * 4 // SIZE[ctype]}) = {val};")
    return out


def _declared(lines: list[str]) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(DECL.match, lines) if m]


def tile(k, hot, params: list[tuple[str, str]], ctypes: dict[str, str], vec: int, count: int,
         box: bool, grad: bool) -> list[str]:
    """The statements of one tile of `count` vectors starting at vector index `t`."""
    flat = k.flat
    vecs = [n for t, n in params if t in ("S", "T") and _access(k, n) == "elem"]
    out = ["/* loads: every vector of the tile, its row and the row's statements */"]
    rows = _declared(k.row_pre)
    out += [f"const long long i{u} = (t + {u} * stride) * LG_VEC;" for u in range(count)]
    if not flat:   # one test for the tile: i{count-1} is its largest index
        out.append(f"long long {', '.join(f'r{u}' for u in range(count))};")
        out.append(f"if (i{count - 1} < fast_limit) {{")
        out += [f"  r{u} = lg_row_fast(i{u}, magic, shift);" for u in range(count)]
        out.append("} else {")
        out += [f"  r{u} = i{u} / K;" for u in range(count)]
        out.append("}")
    for u in range(count):
        for n in vecs:
            out += loads(f"x{u}_{n}", f"p_{n}", ctypes[n], vec, f"i{u}")
        if rows:
            out += [f"{t} {name}_{u};" for t, name in rows]
            body = [_lanes_rowpre(s, u, vecs, ctypes, vec) if box else s for s in k.row_pre]
            out.append("{")
            out.append(f"  const long long r = r{u}, base = r{u} * K;")
            out.append("  (void)base;")
            out += ["  " + s for s in body]
            out += [f"  {name}_{u} = {name};" for _, name in rows]
            out.append("}")
    out.append("/* math: per vector, the fast k != y body on the loaded lanes, or the scalar path */")
    if k.loss_mode == "acc_elem":
        out.append("T tile_sum = (T)0;")
    for u in range(count):
        out += _vector_math(k, hot, u, vecs, ctypes, vec, box, grad, rows)
    if k.loss_mode == "acc_elem":
        out.append("acc += (double)tile_sum;")
    return out


def _access(k, name: str) -> str:
    return next(a for _, n, a in k.params if n == name)


def _lanes_rowpre(stmt: str, u: int, vecs, ctypes, vec) -> str:
    """A box row statement with its coordinate loads p_x[base + c] read from vector u."""
    for n in vecs:
        stmt = re.sub(rf"lg_ld\(p_{n}\[base \+ (\d+)\]\)",
                      lambda m: lane(f"x{u}_{n}", ctypes[n], vec, int(m.group(1))), stmt)
    return stmt


def _elem_lanes(stmts: list[str], u: int, j: int, vecs, ctypes, vec, flat: bool) -> list[str]:
    at = r"i" if flat else r"\(base \+ k\)"
    out = []
    for s in stmts:
        for n in vecs:
            s = re.sub(rf"lg_ld\(p_{n}\[{at}\]\)", lane(f"x{u}_{n}", ctypes[n], vec, j), s)
        out.append(s)
    return out


def _vector_math(k, hot, u, vecs, ctypes, vec, box, grad, rows) -> list[str]:
    flat = k.flat
    out = ["{"]
    if not flat:
        out.append(f"  const long long r = r{u}, base = r{u} * K, k0 = i{u} - base;")
        out.append("  (void)base;")
    out += [f"  const {t} {name} = {name}_{u};" for t, name in rows]
    fast = [] if flat or box else ["k0 + LG_VEC <= K"]
    if hot is not None and not box:
        # 32-bit wrap-around can only send a vector to the scalar path, never skip the label
        fast.append(f"(unsigned)((int){hot.index} - (int)k0) >= (unsigned)LG_VEC")
    stmts = hot.common + hot.body0 if hot else k.final
    loss = hot.loss0 if hot else k.loss_expr
    gexpr = hot.grad0 if hot else k.grad_expr
    inner = []
    for j in range(vec):
        idx = [f"const long long i = i{u} + {j};"]
        if not flat:
            idx.append(f"const long long k = {j if box else f'k0 + {j}'};")
        elem_loss = k.loss_mode.endswith("elem")
        inner.append("{")
        inner += ["  " + s for s in idx + ["(void)i;" + (" (void)k;" if not flat else "")]]
        inner += ["  " + s for s in _elem_lanes(stmts, u, j, vecs, ctypes, vec, flat)]
        if grad and gexpr:
            inner.append(f"  g{j} = LG_GRAD({gexpr});")
        if elem_loss:
            inner.append(f"  l{j} = {loss};")
        inner.append("}")
    decl = []
    if grad and gexpr:
        decl.append(f"T {', '.join(f'g{j}' for j in range(vec))};")
    if k.loss_mode.endswith("elem"):
        decl.append(f"T {', '.join(f'l{j}' for j in range(vec))};")
    after = []
    if grad and gexpr:
        after += stores("grad_out", ctypes["pred"], vec, f"i{u}", [f"g{j}" for j in range(vec)])
    if k.loss_mode == "store_elem":
        after += stores("loss_out", "double" if ctypes["T"] == "double" else "float", vec,
                        f"i{u}", [f"l{j}" for j in range(vec)])
    elif k.loss_mode == "acc_elem":
        after.append(f"tile_sum += {_pairwise([f'l{j}' for j in range(vec)])};")
    elif k.loss_mode == "store_row":
        after.append(f"if (k0 == 0) loss_out[r] = {k.loss_expr};")
    elif k.loss_mode == "acc_row":
        after.append(f"if (k0 == 0) acc += (double){k.loss_expr};")
    body = decl + inner + after
    if fast:
        out.append(f"  if ({' && '.join(fast)}) {{")
        out += ["    " + s for s in body]
        out.append("  } else {")
        out.append("#pragma unroll 1")
        out.append(f"    for (long long e = i{u}; e < i{u} + LG_VEC; e++) lg_scalar_element(e);")
        out.append("  }")
    else:
        out += ["  " + s for s in body]
    out.append("}")
    return out


def _pairwise(xs: list[str]) -> str:
    """x0 + x1 + ... as a balanced tree (Note [Vector tiles]: the per-vector sum in T)."""
    if len(xs) == 1:
        return xs[0]
    h = len(xs) // 2
    return f"({_pairwise(xs[:h])} + {_pairwise(xs[h:])})"
