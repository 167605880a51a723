"""TorchScript backend: the fused kernel body rendered as one function of torch ops.

Note [TorchScript fallback]: TorchScript is deprecated upstream (warnings from 2.10, FutureWarning
from 2.14). We script the generated source with those warnings silenced, and if scripting fails
the very same source runs as plain Python, so the backend keeps working when TorchScript goes.
"""
from __future__ import annotations

import math
import types
import warnings

import torch

from .. import codegen
from ..ir import Graph, Load, Node
from ..ops import Level, Op
from ..inputs import compute_dtype
from ..passes.fold import COLUMN_RULES, specialize
from .decompose import stable_lse
from .base import Artifact, KernelSource, check_call, signature, table_tensor

TORCH: dict[Op, str] = {
    Op.NEG: "-{0}", Op.ABS: "torch.abs({0})", Op.SIGN: "torch.sign({0})", Op.EXP: "torch.exp({0})",
    Op.LOG: "torch.log({0})", Op.LOG1P: "torch.log1p({0})", Op.SQRT: "torch.sqrt({0})",
    Op.SIGMOID: "torch.sigmoid({0})", Op.LOGSIGMOID: "F.logsigmoid({0})",
    Op.SOFTPLUS: "torch.clamp({0}, min=0.0) + torch.log1p(torch.exp(-torch.abs({0})))",
    Op.FLOOR: "torch.floor({0})", Op.ATAN: "torch.atan({0})", Op.ASIN: "torch.asin({0})",
    Op.COS: "torch.cos({0})", Op.SIN: "torch.sin({0})", Op.TANH: "torch.tanh({0})",
    Op.RECIP: "torch.reciprocal({0})", Op.FLOAT: "{0}.to(cdt)", Op.NOT: "torch.logical_not({0})",
    Op.STOPGRAD: "{0}",
    Op.ADD: "{0} + {1}", Op.SUB: "{0} - {1}", Op.MUL: "{0} * {1}", Op.DIV: "{0} / {1}",
    Op.POW: "torch.pow({0}, {1})", Op.MINIMUM: "torch.minimum({0}, {1})",
    Op.MAXIMUM: "torch.maximum({0}, {1})", Op.LT: "{0} < {1}", Op.LE: "{0} <= {1}",
    Op.GT: "{0} > {1}", Op.GE: "{0} >= {1}", Op.EQ: "{0} == {1}", Op.NE: "{0} != {1}",
    Op.AND: "torch.logical_and({0}, {1})", Op.OR: "torch.logical_or({0}, {1})",
    Op.WHERE: "torch.where({0}, {1}, {2})", Op.CLAMP: "torch.clamp({0}, min={1}, max={2})",
    Op.BCE_LOGITS: "F.binary_cross_entropy_with_logits({0}, {1}, reduction='none')",
    Op.BCE_PROB: "F.binary_cross_entropy({0}, {1}, reduction='none')",
    Op.ROWSUM: "torch.sum({0}, -1, keepdim=True)", Op.ROWMAX: "torch.amax({0}, -1, keepdim=True)",
    Op.ROWLSE: "torch.logsumexp({0}, -1, keepdim=True)",
    Op.WEIGHT: "{0} * {1}", Op.SCALE: "{0} * {arg}",
    Op.IOTA: "torch.arange(pred.shape[-1], device=pred.device)",
    Op.WIDTH: "float(pred.shape[-1])",
}
# Forms used when an operand is a Python constant and torch wants a tensor there.
WITH_CONST = {
    Op.MINIMUM: ("torch.clamp({0}, max={1})", "torch.clamp({1}, max={0})"),
    Op.MAXIMUM: ("torch.clamp({0}, min={1})", "torch.clamp({1}, min={0})"),
    Op.POW: ("torch.pow({0}, {1})", "torch.pow(torch.full_like(pred, {0}), {1})"),
    Op.BCE_LOGITS: ("F.binary_cross_entropy_with_logits({0}, torch.full_like({0}, {1}), "
                    "reduction='none')", None),
    Op.BCE_PROB: ("F.binary_cross_entropy({0}, torch.full_like({0}, {1}), reduction='none')", None),
}


def literal(v) -> str:
    """A Python literal for a constant (inf and nan spelled so TorchScript accepts them)."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "float('nan')"
    if math.isinf(v):
        return "float('inf')" if v > 0 else "float('-inf')"
    return repr(float(v))


def input_name(ld: Load) -> str:
    return ld.name if ld.comp is None else f"{ld.name}[:, {ld.comp}:{ld.comp + 1}]"


# In-place forms, used when an operand is a temporary of the result's shape whose last use is here.
INPLACE_UNARY = {Op.NEG: "neg_", Op.ABS: "abs_", Op.EXP: "exp_", Op.LOG: "log_", Op.LOG1P: "log1p_",
                 Op.SQRT: "sqrt_", Op.SIGMOID: "sigmoid_", Op.FLOOR: "floor_", Op.ATAN: "atan_",
                 Op.ASIN: "asin_", Op.COS: "cos_", Op.SIN: "sin_", Op.TANH: "tanh_",
                 Op.RECIP: "reciprocal_", Op.SIGN: "sign_"}
INPLACE_BINARY = {Op.ADD: "add_", Op.MUL: "mul_", Op.SUB: "sub_", Op.DIV: "div_", Op.WEIGHT: "mul_",
                  Op.POW: "pow_"}


def _dims(body: Graph) -> dict[int, tuple[bool, bool]]:
    """(varies by row, varies by column) of each node: equal dims mean equal tensor shapes."""
    dims: dict[int, tuple[bool, bool]] = {}
    for i in body.topo():
        n = body[i]
        if n.op is Op.INPUT:
            ld = n.arg
            dims[i] = (True, False) if ld.comp is not None else \
                {"elem": (True, True), "row": (True, False), "col": (False, True),
                 "scalar": (False, False)}[ld.access]
        elif n.op is Op.IOTA:
            dims[i] = (False, True)
        elif n.op in (Op.ROWSUM, Op.ROWMAX, Op.ROWLSE):
            dims[i] = (dims[n.srcs[0]][0], False)
        elif n.op is Op.REDUCE and n.arg != "none":
            dims[i] = (False, False)
        else:
            ds = [dims[s] for s in n.srcs]
            dims[i] = (any(d[0] for d in ds), any(d[1] for d in ds))
    return dims


def _aliases(body: Graph) -> dict[int, int]:
    """Nodes rendered as their operand's tensor (stop_gradient, reduction 'none', outputs)."""
    rep: dict[int, int] = {}
    for i in body.topo():
        n = body[i]
        is_alias = n.op in (Op.STOPGRAD, Op.OUTPUT) or (n.op is Op.REDUCE and n.arg == "none")
        rep[i] = rep[n.srcs[0]] if is_alias else i
    return rep


def _last_uses(body: Graph, rep: dict[int, int]) -> dict[int, int]:
    """Tensor -> the node that reads it last (-1 for outputs, which must stay intact)."""
    last: dict[int, int] = {}
    for i in body.topo():
        for s in body[i].srcs:
            last[rep[s]] = i
    for o in body.outputs().values():
        last[rep[o]] = -1
    return last


def _inplace(body: Graph, i: int, names, dims, last_use, kinds, rep,
             wide=frozenset()) -> str | None:
    """Note [In-place temporaries]: rewrite `a op b` as `a.op_(b)` when `a` is a temporary with
    the result's shape and dtype that nothing reads later. Same values, far fewer N x C
    allocations: this is what keeps the TorchScript backend ahead of eager code. The dtypes
    match: a float64 row value (`wide`, Note [Row values in float64]) and a float32 one never
    share a buffer."""
    n = body[i]
    if kinds[i] != "f" or dims[i] == (False, False):   # scalars may be Python floats
        return None

    def free(s):
        r = rep[s]
        return (body[r].op not in (Op.INPUT, Op.CONST) and kinds[r] == "f" and dims[r] == dims[i]
                and last_use.get(r) == i and (r in wide) == (i in wide))

    a = [names[s] for s in n.srcs]
    if n.op in INPLACE_UNARY and free(n.srcs[0]):
        return f"{a[0]}.{INPLACE_UNARY[n.op]}()"
    if n.op is Op.SCALE and free(n.srcs[0]):
        return f"{a[0]}.mul_({literal(n.arg)})"
    if n.op in INPLACE_BINARY:
        if free(n.srcs[0]):
            return f"{a[0]}.{INPLACE_BINARY[n.op]}({a[1]})"
        if n.op in (Op.ADD, Op.MUL, Op.WEIGHT) and free(n.srcs[1]):
            return f"{a[1]}.{INPLACE_BINARY[n.op]}({a[0]})"
        if n.op is Op.SUB and free(n.srcs[1]):
            return f"{a[1]}.neg_().add_({a[0]})"   # c - v == (-v) + c exactly
    return None


def _expr(body: Graph, i: int, names: dict[int, str]) -> str:
    n = body[i]
    args = [names[s] for s in n.srcs]
    consts = [body[s].op is Op.CONST for s in n.srcs]
    if n.op is Op.BCE_LOGITS and len(args) == 3:
        return f"F.binary_cross_entropy_with_logits({args[0]}, {args[1]}, pos_weight={args[2]}, " \
               "reduction='none')"
    if n.op in WITH_CONST and any(consts):
        form = WITH_CONST[n.op][0 if consts[-1] else 1]
        if form is None:
            raise NotImplementedError(f"{n.op.value} with a constant first operand")
        return form.format(*args)
    if n.op is Op.REDUCE:
        return {"none": "{0}", "sum": "torch.sum({0})", "mean": "torch.sum({0}) / {1}"}[n.arg] \
            .format(*args)
    if n.op is Op.OUTPUT:
        return args[0]
    return TORCH[n.op].format(*args, arg=literal(n.arg) if n.op is Op.SCALE else None)


# Note [Row values in float64]: in a float32 kernel (float16/bfloat16 inputs compute in float32
# too) the row sums are float64 tensors, and so is every per-row value after them (log(s),
# x_y - m, the row's loss, a total), each rounded once to float32 where it is returned; the
# gradient's label column k == y (softmax's p - 1) is computed again per row, in float64, and
# written over the float32 column (`_label_column`), so it rounds once too. This is the cpp
# backend's Note [Row values in double] (clower) in torch ops; Note [As exact as torch]
# (tests/test_rows.py) says what it buys: the float32 row sum cost CE's and DFL's gradients
# 1.5 ulps (of the largest value) at 2^24, where torch's is 0.53 and 0.56, and p then p - 1,
# two roundings, cost CE's 0.33 at 2^30 where torch's is 0.17. Element values stay float32, as
# torch computes them: an element op reads a row value's float32 copy (<name>_f), so p =
# e / float(s), as in cpp's element code. What it costs instead of float64 element columns
# (every node after a row sum in float64; tried first, as exact, CE 100k x 81 fwd+bwd +100%):
# on CPU a float64 (N, K) temporary is a fresh 64 MB mapping that page-faults on every call,
# and torch.sum(e, dtype=float64) or a mixed-dtype (N, K) op makes one internally. So a row sum
# is cast into one reused 2 MB float64 buffer, WIDE_BLOCK values at a time (lg_wide_sum), and a
# gather's sum (where(k == j, x, 0): one term) is taken in float32, exactly, then cast.
# Measured (kernel fwd+bwd, old and new interleaved, min of 40, one thread, 4 runs on a shared
# machine under load): CE 100k x 81 +8% to +18% (e.g. 70.4 -> 76.4 ms), DFL 160k x 17 +8% to
# +17% (49.0 -> 53.9 ms), mostly the float64 sum (2 MB blocks: ~10 ms where the float32 sum
# takes ~3 ms on CE); two threads gave +5% to +60% there, too noisy to quote. A float64
# kernel's source is unchanged.
WIDE_BLOCK = 1 << 18   # values (2 MB) per float64 block of lg_wide_sum


def _wide(body: Graph, dtype: str) -> frozenset:
    """Note [Row values in float64]: the float row and per-call values computed in float64 (row
    sums and what depends on them), in a float32 kernel."""
    if dtype == "float64":
        return frozenset()
    kinds, levels = body.kinds(), body.levels()
    wide: set[int] = set()
    for i in body.topo():
        n = body[i]
        if kinds[i] == "f" and levels[i] is not Level.ELEM and \
                (n.op is Op.ROWSUM or any(s in wide for s in n.srcs)):
            wide.add(i)
    return frozenset(wide)


def _gather(body: Graph, i: int) -> bool:
    """A row sum of where(k == j, a, 0) (j per row): one term, exact in float32."""
    w = body[body[i].srcs[0]]
    if w.op is not Op.WHERE or body[w.srcs[2]].op is not Op.CONST or body[w.srcs[2]].arg != 0:
        return False
    t = body[w.srcs[0]]
    return t.op is Op.EQ and any(body[s].op is Op.IOTA for s in t.srcs)


def _wide_sum(body: Graph, i: int, x: str) -> str:
    """Note [Row values in float64]: the float64 row sum of float32 (R, K) values `x`."""
    if _gather(body, i):
        return f"torch.sum({x}, -1, keepdim=True).to(torch.float64)"
    return f"lg_wide_sum({x}, {WIDE_BLOCK})"


def render(src: KernelSource) -> str:
    """Render the fused body as TorchScript source computing (loss, grad) in one function."""
    body = stable_lse(src.body)   # Note [Stable logsumexp]
    names: dict[int, str] = {}
    lines: list[str] = []
    levels, dims, kinds = body.levels(), _dims(body), body.kinds()
    rep = _aliases(body)
    last_use = _last_uses(body, rep)
    wide = _wide(body, src.variant.dtype)
    plan = _column_plan(body, src.variant, wide)
    if plan is not None:   # the row values the label column reads stay intact until then
        h, need = plan[0], plan[2]
        last_use.update({rep[s]: -1 for i in need for s in h[i].srcs if s not in need})
    narrow: dict[int, str] = {}     # wide value -> its float32 copy, for element ops
    for i in body.topo():
        n = body[i]
        if n.op is Op.INPUT:
            names[i] = input_name(n.arg)
        elif n.op is Op.CONST:
            names[i] = literal(n.arg)
        elif n.op is Op.OUTPUT:
            names[i] = names[n.srcs[0]]
        else:
            names[i] = f"v{len(lines) - len(narrow)}"
            reads = names if levels[i] is not Level.ELEM else names | narrow
            expr = _inplace(body, i, reads, dims, last_use, kinds, rep, wide) or \
                _expr(body, i, reads)
            if n.op is Op.ROWSUM and i in wide:
                expr = _wide_sum(body, i, names[n.srcs[0]])
            if n.op is Op.WHERE and all(levels[s] is Level.SCALAR for s in n.srcs[1:]):
                # where() of two Python floats is float32: give one branch the compute dtype
                c, a, b = (reads[s] for s in n.srcs)
                expr = f"torch.where({c}, {a} + torch.zeros((), dtype=cdt, device=pred.device), {b})"
            lines.append(f"{names[i]} = {expr}")
            if i in wide and any(levels[u] is Level.ELEM for u in body.users(i)):
                narrow[i] = f"{names[i]}_f"
                lines.append(f"{narrow[i]} = {names[i]}.to(cdt)")
    outs = body.outputs()
    loss = names[outs["loss"]]
    if rep[outs["loss"]] in wide:   # Note [Row values in float64]: rounded once, here
        lines.append(f"{loss} = {loss}.to(cdt)")
    rets = [loss]
    if "grad" in outs:
        g, root = names[outs["grad"]], body[body[outs["grad"]].srcs[0]]
        if levels[body[outs["grad"]].srcs[0]] is not Level.ELEM or root.op is Op.CONST:
            r = rep[outs["grad"]]
            g = f"torch.zeros_like(pred) + {narrow.get(r, f'{g}.to(cdt)' if r in wide else g)}"
        elif root.op is Op.INPUT:
            g = f"{g}.clone()"  # never hand an input tensor to autograd as the gradient
        lines.append(f"grad = ({g}).to(pred.dtype)")
        lines += _label_column(plan, names) if plan is not None else []
        rets.append("grad")
    for name in src.variant.extra_grads:
        g = _extra_grad(body, outs[f"grad_{name}"], names, levels)
        lines.append(f"grad_{name} = ({g}).to(cdt)" if rep[outs[f"grad_{name}"]] in wide else
                     f"grad_{name} = {g}")
        rets.append(f"grad_{name}")
    params = [(p, "Tensor" if src.tensor_param(p) else "float") for p in signature(body)]
    return codegen.render("torchscript/kernel.py.j2", header=src.header("#"),
                          fn=src.fn_name, params=params, lines=lines, rets=rets,
                          wide_sum=any(body[i].op is Op.ROWSUM and not _gather(body, i)
                                       for i in wide),
                          ret_type=f"Tuple[{', '.join(['Tensor'] * len(rets))}]" if len(rets) > 1
                          else "Tensor")


def _hot(body: Graph) -> tuple[int, int] | None:
    """(test, label) when the class index k is only compared with one integer row value."""
    iotas = body.find(Op.IOTA)
    tests = {u for i in iotas for u in body.users(i)}
    if len(iotas) != 1 or len(tests) != 1:
        return None
    t = next(iter(tests))
    other = [s for s in body[t].srcs if s != iotas[0]]
    if body[t].op is not Op.EQ or len(other) != 1 or body.kind(other[0]) != "i" or \
            body.levels()[other[0]] is not Level.ROW:
        return None
    return t, other[0]


def _column_plan(body: Graph, v, wide) -> tuple | None:
    """Note [Row values in float64]: (graph with k == y, its gradient root, the nodes the label
    column computes itself, label node) when the gradient depends on float64 row values."""
    hot, outs = _hot(body), body.outputs()
    if hot is None or "grad" not in outs:
        return None
    root = body[outs["grad"]].srcs[0]
    if not body.ancestors(root) & wide or body.levels()[root] is not Level.ELEM:
        return None
    test, label = hot
    h = body.copy()
    h.replace(test, Node(Op.CONST, (), True))
    h = specialize(h, v, COLUMN_RULES)
    levels = body.levels()
    known = {i for i in body.ids() if levels[i] is not Level.ELEM and
             body[i].op not in (Op.INPUT, Op.CONST)}
    root = h[h.outputs()["grad"]].srcs[0]
    need, stack = set(), [root]
    while stack:   # the column's own nodes: the walk stops at the kernel's row values
        i = stack.pop()
        if i not in need and i not in known:
            need.add(i)
            stack.extend(h[i].srcs)
    return h, root, need, label


def _label_column(plan, names: dict[int, str]) -> list[str]:
    """Note [Row values in float64]: the gradient's label column k == y computed per row, with
    the float64 row values (so a softmax gradient's p - 1 rounds once) and written over the
    float32 one; rows whose label is no column (ignore_index, background) keep theirs."""
    h, root, need, label = plan
    y, cols = names[label], dict(names)
    lines = [f"lg_y = {y}.long().clamp(0, pred.shape[-1] - 1)"]
    for i in h.topo():
        n = h[i]
        if i not in need:
            continue
        if n.op in (Op.INPUT, Op.CONST, Op.IOTA):
            ld = n.arg
            cols[i] = literal(n.arg) if n.op is Op.CONST else "lg_y" if n.op is Op.IOTA else \
                f"torch.gather({ld.name}, 1, lg_y)" if ld.access == "elem" else \
                f"{ld.name}[lg_y]" if ld.access == "col" else input_name(ld)
            continue
        cols[i] = f"c{i}"
        lines.append(f"c{i} = {_expr(h, i, cols)}")
    col = cols[root] if root in need and h[root].op is not Op.CONST else \
        f"(torch.zeros(lg_y.shape, dtype=torch.float64, device=pred.device) + {cols[root]})"
    lines.append(f"grad.scatter_(1, lg_y, torch.where(({y} >= 0) & ({y} < pred.shape[-1]), "
                 f"{col}.to(cdt), torch.gather(grad, 1, lg_y)))")
    return lines


def _extra_grad(body: Graph, out: int, names: dict[int, str], levels) -> str:
    """The gradient of another input, in the compute dtype: (R, K) when it varies per element,
    (R, 1) per row, 0-d per call; a fresh tensor, never an input or a temporary still in use."""
    g = names[out]
    shape = {Level.ELEM: "pred.shape", Level.ROW: "(pred.shape[0], 1)"}.get(
        levels[body[out].srcs[0]], "()")
    return f"torch.zeros({shape}, dtype=cdt, device=pred.device) + {g}"


SUFFIX = ".py"


def available(device: str) -> bool:
    return True


def components(v) -> dict:
    return {}


def load(meta, source: str, folder) -> Artifact:
    """Script the generated source (warnings silenced); fall back to running it as Python."""
    module = types.ModuleType(f"lossgraph_generated_{meta.fn_name}")
    code = compile(source, f"<lossgraph {meta.fn_name}>", "exec")
    exec(code, module.__dict__)
    fn = module.__dict__[meta.fn_name]
    scripted = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = torch.jit.script(fn)
            scripted = True
    except Exception:  # noqa: BLE001 - TorchScript refused it: the same source runs as Python
        pass
    return Artifact(fn=fn, source=source, info={"scripted": scripted})


def arguments(call, meta) -> list:
    """Kernel arguments in the TorchScript layout: elem (R,K), row (R,1), col (K,), scalars 0-d."""
    compute = compute_dtype(call.pred.dtype)
    pred = call.pred.detach().reshape(call.rows, call.width)
    if pred.dtype != compute:
        pred = pred.to(compute)
    args = []
    for name in meta.params:
        if name == "pred":
            args.append(pred)
        elif name == "denom":
            args.append(call.denom)
        elif name in meta.tables:
            args.append(table_tensor(meta, name, compute, pred.device))
        else:
            t = call.tensors[name]
            if t.dtype.is_floating_point and t.dtype != compute or name == "target":
                t = t.to(compute)  # one compute dtype (target.type_as(pred), as MMDetection does)
            kind = meta.access[name]
            shape = {"elem": (call.rows, call.width), "row": (call.rows, 1), "col": (call.width,),
                     "scalar": ()}[kind]
            args.append(t.reshape(shape))
    return args


def run(artifact: Artifact, call, meta):
    """Call the scripted kernel; returns (loss, grad or None)."""
    check_call(call, meta, "torchscript", call.pred.device.type, available)
    out = artifact.fn(*arguments(call, meta))
    if meta.variant.extra_grads:     # input_grads.py: (loss, grad, other inputs' gradients)
        loss, grad, *extras = out
        return loss, grad.reshape(call.pred.shape), tuple(extras)
    if meta.variant.grad:
        loss, grad = out
        return loss, grad.reshape(call.pred.shape)
    return out, None
