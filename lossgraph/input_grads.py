"""Gradients beyond pred: every input that requires grad (target, weight, a tensor avg_factor, a
loss's own float inputs), and differentiable gradients for create_graph=True (double backward).

Note [Gradients of every input]: when a call has a float input other than pred that requires
grad, the runtime takes `_FusedInputs` instead of the pred-only `_Fused` (runtime.py), so the
pred-only path and its kernels stay exactly as they are. The derivatives come from the same
symbolic autodiff (Variant.wrt; passes/autodiff.py's Note [Gradients of other inputs]):
- 'mean'/'sum': forward runs one kernel that returns the loss and the gradient of every
  requested input; backward multiplies them by grad_output. The tensors handed to the kernel are
  the canonical ones of inputs.py (a (N,4) IoU weight averaged to (N,), a row weight flattened,
  a cast), produced by differentiable torch ops, so autograd carries each gradient from the
  canonical layout back to the user's tensor.
- avg_factor: d(loss)/d(avg_factor) = d(lw * S / (avg + eps))/d(avg) = -loss / (avg + eps),
  computed from the loss the kernel returned: no kernel output, any backend.
- 'none': backward runs the 'sum' kernel with grad_output folded into the weight,
  w' = g * w (as Note [Row-coupled 'none'] does for pred): d/dx sum(w' l) is the vector-Jacobian
  product for pred and target, and d/dw = g * d/dw' summed back to the weight's shape.
Kernels with extra gradient outputs are rendered by the TorchScript backend only (whatever the
loss's backend): the C and CUDA element skeletons (other modules) write one gradient per element
of pred, and a second gradient buffer of another shape is a change to both templates. These are
rare calls (gradient penalties, learned targets or weights), so one TorchScript function of the
same IR is the right trade; the pred-only kernels of every backend are untouched.

Note [Double backward]: under create_graph=True a backward must itself be differentiable. Then the
gradient IR of the variant (the graph after 'cse_grad', the same derivative the kernels run) is
evaluated by the reference interpreter with differentiable torch ops on the saved inputs, and
autograd differentiates that: the exact second derivative (of torch's own first-derivative
formulas, which the rules mirror), never a detached zero.
"""
from __future__ import annotations

import dataclasses

import torch

from . import reference
from .inputs import Call, compute_dtype
from .ops import Level

# Shapes of an input in the kernel layout, by access: R rows, K columns.
_LAYOUT = {"elem": lambda r, k: (r, k), "row": lambda r, k: (r,), "col": lambda r, k: (k,),
           "scalar": lambda r, k: ()}


def extra_inputs(call: Call) -> tuple[str, ...]:
    """Names of the call's inputs other than pred that require grad ('denom': avg_factor)."""
    names = [k for k, t in call.tensors.items() if t.requires_grad]
    d = call.denom
    if isinstance(d, torch.Tensor) and d.requires_grad:
        names.append("denom")
    return tuple(names)


def launch(module, call: Call, level: Level, names: tuple[str, ...]):
    """Run the loss through _FusedInputs: gradients for pred and every input in `names`."""
    engine = _Engine(module, call, level, ("pred",) + names)
    tensors = [call.pred] + [call.denom if n == "denom" else call.tensors[n] for n in names]
    return _FusedInputs.apply(engine, *tensors)


class _Engine:
    """One call's loss and gradients with respect to `wrt` (pred first)."""

    def __init__(self, module, call: Call, level: Level, wrt: tuple[str, ...]):
        self.module, self.call, self.level, self.wrt = module, call, level, wrt
        self.grads = None

    def forward(self) -> torch.Tensor:
        call = self.call
        if call.reduction == "none":
            cv = self.module.compiler.get(self.module.variant(call, False))
            self.module._last = cv
            return cv.run(call)[0].reshape(call.loss_shape(self.level))
        loss, grads = _kernel(self.module, call, self.wrt)
        self.loss, self.grads = loss, grads
        return loss

    def backward(self, g: torch.Tensor) -> tuple:
        if torch.is_grad_enabled():            # Note [Double backward]
            return vjp(self.module, self.call, self.level, self.wrt, g, reference=True)
        if self.call.reduction == "none":
            return vjp(self.module, self.call, self.level, self.wrt, g, reference=False)
        grads, self.grads = self.grads, None
        if grads is None:                        # backward again (retain_graph=True)
            self.loss, grads = _kernel(self.module, self.call, self.wrt)
        g = g.reshape(())
        return tuple(None if x is None else x * g.to(x.dtype) for x in grads)


class _FusedInputs(torch.autograd.Function):
    """The loss with gradients for pred and other inputs; see Note [Gradients of every input]."""

    @staticmethod
    def forward(ctx, engine: _Engine, *tensors):
        ctx.engine = engine
        return engine.forward()

    @staticmethod
    def backward(ctx, g):
        return (None,) + ctx.engine.backward(g)


# -- the kernel path -----------------------------------------------------------------------------

def _compiler(module, device: str):
    """The compiler for kernels with extra gradient outputs: TorchScript (Note [Gradients of every
    input]); the loss's own when it already is TorchScript."""
    if module.compiler.backend_for(device) == "torchscript":
        return module.compiler
    c = module.__dict__.get("_input_grads_compiler")
    if c is None:
        from .compiler import Compiler
        c = Compiler(module.spec, "torchscript", module.compiler.dump_dir)
        module.__dict__["_input_grads_compiler"] = c
    return c


def _kernel(module, call: Call, wrt: tuple[str, ...]) -> tuple[torch.Tensor, tuple]:
    """(loss, gradients in wrt order, each in its tensor's own layout) from one kernel call."""
    kernel_names = tuple(n for n in wrt if n not in ("pred", "denom"))
    v = module.variant(call, True)
    if kernel_names:
        v = dataclasses.replace(v, wrt=("pred",) + kernel_names)
        cv = _compiler(module, call.pred.device.type).get(v)
        loss, grad, extras = cv.run(call)
    else:
        cv = module.compiler.get(v)
        (loss, grad), extras = cv.run(call), ()
    module._last = cv
    by_name = dict(zip(kernel_names, extras))
    out = []
    for n in wrt:
        if n == "pred":
            out.append(grad)
        elif n == "denom":
            out.append((-loss / call.denom).to(call.denom.dtype))
        else:
            out.append(_to_input(by_name[n], _access(cv.meta.access, n), call, n))
    return loss, tuple(out)


def _access(access: dict, name: str) -> str:
    return access.get(name, "elem")


def _to_input(adj: torch.Tensor, access: str, call: Call, name: str) -> torch.Tensor:
    """An input's adjoint (at its level: (R,K), (R,1) or ()) summed to its own layout."""
    t = call.tensors[name]
    if access == "col":
        adj = adj.sum(0)
    elif access == "scalar":
        adj = adj.sum()
    return adj.reshape(t.shape).to(t.dtype)


# -- vector-Jacobian products for 'none' and for create_graph --------------------------------------

def vjp(module, call: Call, level: Level, wrt: tuple[str, ...], g: torch.Tensor,
        reference: bool) -> tuple:
    """g^T d(loss)/d(input) for each input in wrt; differentiable when `reference`."""
    if call.reduction == "none":
        return _vjp_none(module, call, level, wrt, g, reference)
    if reference:
        loss, grads = _reference(module, call, wrt)
    else:
        loss, grads = _kernel(module, call, wrt)
    g = g.reshape(())
    return tuple(None if x is None else x * g.to(x.dtype) for x in grads)


def _vjp_none(module, call: Call, level: Level, wrt, g, reference: bool) -> tuple:
    """'none': d/dx sum(g w l), by the 'sum' kernel with w' = g w (Note [Gradients of every input])."""
    shape = tuple(call.loss_shape(level))
    g = g.reshape(shape).to(compute_dtype(call.pred.dtype))
    w = call.tensors.get("weight")
    access = "elem" if level is Level.ELEM else "row"
    if w is not None:
        view = {"elem": shape, "row": shape[:-1] + (1,) if level is Level.ELEM else shape,
                "col": shape[-1:], "scalar": ()}[call.weight_access]
        gw = g * w.reshape(view)
    else:
        gw = g
    folded = dataclasses.replace(call, reduction="sum", weight_access=access, denom=None,
                                 tensors={**call.tensors, "weight": gw.reshape(-1)})
    inner = tuple(n for n in wrt if n != "denom")      # avg_factor is ignored by 'none'
    _, grads = (_reference if reference else _kernel)(module, folded, inner)
    by_name = dict(zip(inner, grads))
    out = []
    for n in wrt:
        if n == "weight":    # d/dw = g * d/dw', summed over the dims w was broadcast along
            adj = by_name[n].reshape(shape) * g
            adj = {"elem": adj, "row": adj.sum(-1) if level is Level.ELEM else adj,
                   "col": adj.reshape(-1, shape[-1]).sum(0), "scalar": adj.sum()}[call.weight_access]
            out.append(adj.reshape(w.shape).to(w.dtype))
        else:
            out.append(by_name.get(n))
    return tuple(out)


def _reference(module, call: Call, wrt: tuple[str, ...]) -> tuple[torch.Tensor, tuple]:
    """(loss, gradients) from the gradient IR evaluated with differentiable torch ops."""
    kernel_names = tuple(n for n in wrt if n not in ("pred", "denom"))
    v = dataclasses.replace(module.variant(call, True), wrt=("pred",) + kernel_names)
    cache = module.__dict__.setdefault("_grad_graphs", {})
    if v not in cache:
        cache[v] = dict(module.compiler.stages(v))["cse_grad"]
    graph = cache[v]
    cdt = compute_dtype(call.pred.dtype)
    r, k = call.rows, call.width
    access = {ld.name: ("elem" if ld.name in ("pred", "target") else ld.access)
              for ld in graph.inputs() if ld.name not in graph.tables}
    inputs = {"pred": call.pred.reshape(r, k).to(cdt)}
    for name, acc in access.items():
        if name == "pred":
            continue
        if name == "denom":
            d = call.denom
            inputs[name] = d.to(cdt) if isinstance(d, torch.Tensor) else \
                torch.tensor(d, dtype=cdt, device=call.pred.device)
            continue
        t = call.tensors[name]
        if t.dtype.is_floating_point or name == "target":
            t = t.to(cdt)
        inputs[name] = t.reshape(_LAYOUT[acc](r, k))
    outs = reference.evaluate(graph, inputs, cdt)
    levels, nodes = graph.levels(), graph.outputs()
    loss = outs["loss"]
    result = []
    for n in wrt:
        if n == "pred":
            gp = torch.broadcast_to(outs["grad"], (r, k))
            result.append(gp.reshape(call.pred.shape).to(call.pred.dtype))
        elif n == "denom":
            result.append((-loss / inputs["denom"]).to(call.denom.dtype))
        else:
            lv = levels[graph[nodes[f"grad_{n}"]].srcs[0]]
            full = {Level.ELEM: (r, k), Level.ROW: (r, 1)}.get(lv, ())
            adj = torch.broadcast_to(outs[f"grad_{n}"], full)
            result.append(_to_input(adj, access.get(n, "elem"), call, n))
    return loss, tuple(result)


__all__ = ["extra_inputs", "launch", "vjp"]
