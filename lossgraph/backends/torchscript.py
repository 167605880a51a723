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
from ..ir import Graph, Load
from ..ops import Level, Op
from ..inputs import compute_dtype
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


def _inplace(body: Graph, i: int, names, dims, last_use, kinds, rep) -> str | None:
    """Note [In-place temporaries]: rewrite `a op b` as `a.op_(b)` when `a` is a temporary with
    the result's shape and dtype that nothing reads later. Same values, far fewer N x C
    allocations: this is what keeps the TorchScript backend ahead of eager code."""
    n = body[i]
    if kinds[i] != "f" or dims[i] == (False, False):   # scalars may be Python floats
        return None

    def free(s):
        r = rep[s]
        return (body[r].op not in (Op.INPUT, Op.CONST) and kinds[r] == "f" and dims[r] == dims[i]
                and last_use.get(r) == i)

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


def render(src: KernelSource) -> str:
    """Render the fused body as TorchScript source computing (loss, grad) in one function."""
    body = stable_lse(src.body)   # Note [Stable logsumexp]
    names: dict[int, str] = {}
    lines: list[str] = []
    levels, dims, kinds = body.levels(), _dims(body), body.kinds()
    rep = _aliases(body)
    last_use = _last_uses(body, rep)
    for i in body.topo():
        n = body[i]
        if n.op is Op.INPUT:
            names[i] = input_name(n.arg)
        elif n.op is Op.CONST:
            names[i] = literal(n.arg)
        elif n.op is Op.OUTPUT:
            names[i] = names[n.srcs[0]]
        else:
            names[i] = f"v{len(lines)}"
            expr = _inplace(body, i, names, dims, last_use, kinds, rep) or _expr(body, i, names)
            if n.op is Op.WHERE and all(levels[s] is Level.SCALAR for s in n.srcs[1:]):
                # where() of two Python floats is float32: give one branch the compute dtype
                c, a, b = (names[s] for s in n.srcs)
                expr = f"torch.where({c}, {a} + torch.zeros((), dtype=cdt, device=pred.device), {b})"
            lines.append(f"{names[i]} = {expr}")
    outs = body.outputs()
    loss = names[outs["loss"]]
    rets = [loss]
    if "grad" in outs:
        g, root = names[outs["grad"]], body[body[outs["grad"]].srcs[0]]
        if levels[body[outs["grad"]].srcs[0]] is not Level.ELEM or root.op is Op.CONST:
            g = f"torch.zeros_like(pred) + {g}"
        elif root.op is Op.INPUT:
            g = f"{g}.clone()"  # never hand an input tensor to autograd as the gradient
        lines.append(f"grad = ({g}).to(pred.dtype)")
        rets.append("grad")
    for name in src.variant.extra_grads:
        lines.append(f"grad_{name} = {_extra_grad(body, outs[f'grad_{name}'], names, levels)}")
        rets.append(f"grad_{name}")
    params = [(p, "Tensor" if src.tensor_param(p) else "float") for p in signature(body)]
    return codegen.render("torchscript/kernel.py.j2", header=src.header("#"),
                          fn=src.fn_name, params=params, lines=lines, rets=rets,
                          ret_type=f"Tuple[{', '.join(['Tensor'] * len(rets))}]" if len(rets) > 1
                          else "Tensor")


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
