"""Stage 8: the runtime module. CompiledLoss has MMDetection's forward signature; each call is
normalized (inputs.py), mapped to a Variant, and run through that variant's cached kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from typing import Any

import torch
from torch import nn

from . import direct, plans
from .direct import rounded as _rounded, scaled as _scaled
from . import input_grads as IG
from . import inputs as I
from .build import Variant
from .compiler import CompiledVariant, Compiler
from .config import Spec, check_reduction
from .ops import Level
from .registry import ROLES


def _signature(names: tuple[str, ...]) -> inspect.Signature:
    params = []
    for n in names:
        if n == "**kwargs":
            params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        elif "=" in n:
            k, _ = n.split("=")
            params.append(inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
        else:
            params.append(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(params)


_is_compiling = plans._is_compiling

# Note [Plain calls]: nn.Module.__call__ goes through _wrapped_call_impl and _call_impl, two
# Python frames that repack *args/**kwargs, before forward; on a planned tiny call that is ~4 us
# of ~25. CompiledLoss.__call__ calls the forward's body directly when the call has nothing for
# nn.Module.__call__ to do: no forward/backward (pre-)hooks on the module or globally, no
# Module.compile(), no torch.jit.trace, no torch.compile tracing (dynamo then sees
# nn.Module.__call__ as usual), and nn.Module.__call__ not patched (torch.fx's tracer patches it
# on the class). Otherwise it hands the call to nn.Module.__call__, which runs forward.
_MODULE_CALL = nn.Module.__call__
_MODULE_DICT = nn.Module.__dict__          # a live view: sees a patched __call__
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, n) for n in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks"))          # dicts that register_module_*_hook fill in place
_any = any
_tracing_state = torch._C._get_tracing_state


@functools.lru_cache(maxsize=None)
def forward_class(name: str, forward: tuple[str, ...], doc: str) -> type:
    """The CompiledLoss subclass whose `forward` shows loss `name`'s MMDetection signature.

    Note [Visible signatures]: inspect.signature(loss.forward) and help(loss) read the class, so
    each forward signature gets a subclass (made once, cached) whose forward carries
    `__signature__`; it still takes (*args, **kwargs) and binds them in _roles. Copies and
    pickles rebuild the subclass from (name, forward, doc) (CompiledLoss.__reduce_ex__).
    """
    sig = _signature(forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    # CompiledLoss.forward's code under a new name and signature (calls go through __call__,
    # Note [Plain calls], which does not call forward)
    base = CompiledLoss.forward
    fwd = types.FunctionType(base.__code__, base.__globals__, "forward", base.__defaults__,
                             base.__closure__)
    fwd.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    fwd.__doc__ = f"{name}.forward{sig}, as in MMDetection 3.3.0.\n\n{doc}".rstrip()
    fwd.__name__ = "forward"
    fwd.__qualname__ = f"Compiled{name}.forward"
    return type(f"Compiled{name}", (CompiledLoss,), {
        "forward": fwd, "__doc__": f"MMDetection's {name}, compiled by lossgraph.",
        "__module__": __name__, "_forward_key": (name, forward, doc)})


def _rebuild(key: tuple):
    """An empty instance of forward_class(*key), for copy and pickle (its state comes next)."""
    return nn.Module.__new__(forward_class(*key))


class _Fused(torch.autograd.Function):
    """Forward runs the fused kernel (loss and gradient); backward only scales the gradient.

    Note [Zero-copy backward]: the kernel's gradient is handed to autograd once, without a copy:
    backward releases its own reference first, so the accumulator adopts the tensor (and a
    grad_output other than 1 scales it in place). Should backward run again on the same graph
    (retain_graph=True), the gradient is recomputed by running the kernel again, never reused.
    """

    @staticmethod
    def forward(ctx, pred, run, call, shape, level, scale, module):
        loss, grad = run(call)
        ctx.grad, ctx.run, ctx.call, ctx.scale = grad, run, call, scale
        ctx.module, ctx.level, ctx.dtype = module, level, pred.dtype
        ctx.row_level = level is Level.ROW and shape is not None
        return loss.reshape(shape) if shape is not None else loss

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():   # create_graph=True: see input_grads.py's Note [Double backward]
            d = IG.vjp(ctx.module, ctx.call, ctx.level, ("pred",), g, reference=True)[0]
            return d, None, None, None, None, None, None
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            grad = ctx.run(ctx.call)[1]
        if g.dim() == 0:
            if g.device.type == "cpu" and g.item() == 1.0:
                return _rounded(grad, ctx.dtype), None, None, None, None, None, None
            if ctx.scale is not None and grad.dtype == ctx.dtype:
                # the backend's device-side scaling (skips g == 1, no sync)
                return ctx.scale(grad, g, ctx.call), None, None, None, None, None, None
        elif ctx.row_level:
            g = g.unsqueeze(-1)
        return _scaled(grad, g, ctx.dtype), None, None, None, None, None, None


class _RowCoupledNone(torch.autograd.Function):
    """reduction='none' for a per-element loss whose element (r, k) reads other columns of row r.

    Note [Row-coupled 'none']: the fused kernel's gradient is one value per pred element, which
    backward can only scale elementwise; that is exact when output (r, k) depends on pred[r, k]
    alone, or when the loss has one value per row. For a per-element loss that also reads its
    row (BoundedIoULoss's x-term reads columns 0 and 2; a user loss mixing pred with
    lg.rowsum(pred)) forward runs the 'none' kernel without a gradient, and backward runs the
    'sum' kernel with weight * grad_output: d/dpred sum(g w l) = sum(g w dl/dpred).
    """

    @staticmethod
    def forward(ctx, pred, module, call, level):
        ctx.module, ctx.call, ctx.level = module, call, level
        cv = module.compiler.get(module.variant(call, False))
        module._last = cv
        return cv.run(call)[0].reshape(call.loss_shape(level))

    @staticmethod
    def backward(ctx, g):
        call, module = ctx.call, ctx.module
        if torch.is_grad_enabled():   # create_graph=True: see input_grads.py's Note [Double backward]
            return IG.vjp(module, call, ctx.level, ("pred",), g, reference=True)[0], None, None, None
        w = call.tensors.get("weight")
        shape = call.loss_shape(Level.ELEM)
        if w is not None:
            view = {"elem": shape, "row": shape[:-1] + (1,), "col": (shape[-1],), "scalar": ()}
            g = g * w.reshape(view[call.weight_access])
        summed = dataclasses.replace(call, reduction="sum", weight_access="elem", denom=None,
                                     tensors={**call.tensors, "weight": g.reshape(-1)})
        return module.compiler.get(module.variant(summed, True)).run(summed)[1], None, None, None


def _replay(plan: plans.Plan, module, args: tuple, kwargs: dict):
    """A repeat through its plan's generic replay (Note [Call plans])."""
    call = plan.bind(module.spec, args, kwargs)
    if not isinstance(call, I.Call):
        return call      # the loss's early exit
    module.__dict__["_last"] = plan.cv
    return _apply(module, call, plan.launch, plan.grad, plan.shape, plan.level, plan.scale)


def _apply(module, call: I.Call, run, grad: bool, shape, level: Level, scale):
    """Run a kernel on a bound call: through _Fused when a gradient is needed; shape the loss."""
    if grad:
        loss = _Fused.apply(call.pred, run, call, shape, level, scale, module)
    else:
        loss = run(call)[0]
        loss = loss.reshape(shape) if shape is not None else loss
    if call.out_shape and shape is None:
        loss = loss.reshape(call.out_shape)
    return loss if loss.dtype == call.out_dtype else loss.to(call.out_dtype)


class CompiledLoss(nn.Module):
    """An nn.Module computing an MMDetection loss with generated, fused kernels."""

    _forward_key: tuple | None = None

    def __new__(cls, spec: Spec = None, *args, **kwargs):
        if cls is CompiledLoss and isinstance(spec, Spec):
            loss = spec.loss
            cls = forward_class(loss.name, tuple(loss.forward), inspect.getdoc(loss.fn) or "")
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        if self._forward_key is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, (self._forward_key,), self.__getstate__()

    def _get_name(self) -> str:
        return "CompiledLoss"

    def __init__(self, spec: Spec, backend: str = "auto", dump_dir: str | None = None):
        super().__init__()
        self.spec = spec
        self.compiler = Compiler(spec, backend, dump_dir)
        self.reduction = spec.reduction
        self.loss_weight = spec.loss_weight
        for k, v in spec.hyper:
            if not hasattr(self, k):
                setattr(self, k, v)
        self._sig = _signature(spec.loss.forward)
        ps = [p for p in self._sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        self._positional = tuple(p.name for p in ps)
        self._keywords = set(self._positional) if len(ps) == len(self._sig.parameters) else None
        self._required = sum(p.default is p.empty for p in ps)
        self._call_hypers = tuple(k for k in sorted(set(ROLES.get(n, n) for n in self._positional))
                                  if k in spec.loss.params)
        self._last: CompiledVariant | None = None
        self._warned_grad = False
        hooks = spec.loss.hooks
        self._plans = None if any(h in hooks and not getattr(hooks[h], "plannable", False)
                                  for h in plans.UNPLANNED_HOOKS) else \
            plans.Plans(self._positional, ROLES)
        if "init" in hooks:
            hooks["init"](spec)
        # Module state (e.g. GHM's momentum sums) lives in buffers: it follows .to(device) and
        # is saved in state_dict.
        for name, t in hooks.get("state", lambda s: {})(spec).items():
            self.register_buffer(name, t)
        # Extra attributes and methods heads look for (get_cls_channels, custom_activation...).
        for name, value in hooks.get("attrs", lambda s: {})(spec).items():
            setattr(self, name, types.MethodType(value, self) if callable(value) else value)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_last"] = None       # a compiled kernel; see Note [Copying a compiled loss]
        if state.get("_plans") is not None:   # plans hold kernels too
            state["_plans"] = plans.Plans(self._positional, ROLES)
        return state

    # -- inspection -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.compiler.backend_for("cpu")

    def _inspected(self) -> CompiledVariant:
        if self._last is None:
            self._last = self.compiler.get(self.compiler.default_variant())
        return self._last

    @property
    def graph(self):
        """The IR of the last specialization used (after every pass), printable as text."""
        return self._inspected().graph

    @property
    def stages(self) -> list[tuple[str, Any]]:
        """(pass name, graph) for the build and every pass, in pipeline order."""
        return self._inspected().stages

    @property
    def source(self) -> str:
        """The generated source of the last specialization used."""
        return self._inspected().source

    def dump(self, path: str) -> list[str]:
        """Write every stage of the last specialization used into folder `path`."""
        return self.compiler.dump(self._inspected(), path)

    def extra_repr(self) -> str:
        return f"type={self.spec.name}, reduction={self.reduction}, loss_weight={self.loss_weight}"

    # -- calling ------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """nn.Module.__call__, without its two frames when nothing hooks the call (Note [Plain
        calls])."""
        if _is_compiling():
            return _MODULE_CALL(self, *args, **kwargs)
        d = self.__dict__
        try:
            hooked = d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or \
                d["_backward_pre_hooks"]
        except KeyError:
            hooked = True
        if hooked or "_compiled_call_impl" in d or _any(_GLOBAL_HOOKS) or \
                _MODULE_DICT["__call__"] is not _MODULE_CALL or _tracing_state() is not None:
            return _MODULE_DICT["__call__"](self, *args, **kwargs)   # patched or not
        return _plain(self, args, kwargs)

    def forward(self, *args, **kwargs):
        if _is_compiling():
            return self._unplanned(args, kwargs, None)
        return _plain(self, args, kwargs)

    def _unplanned(self, args: tuple, kwargs: dict, key: tuple | None):
        """A call without a plan: bind, validate and run it (recording a plan under `key`)."""
        roles = self._roles(args, kwargs)
        hooks = self.spec.loss.hooks
        if roles.get("reduction_override") is not None and "early_exit" not in hooks:
            # MMDetection asserts it first, except in the losses whose v3 zero-weight exit
            # returns before the assert (L1, SmoothL1, IoU family); run_pipeline checks it there
            check_reduction(self.spec.name, roles["reduction_override"], "reduction_override")
        record = (key, args, kwargs) if key is not None else None
        hook = hooks.get("forward")
        if hook is not None:   # a 'plannable' hook passes the record on to run_pipeline
            return hook(self, roles, record) if getattr(hook, "plannable", False) else hook(self, roles)
        return self.run_pipeline(roles, record)

    def _roles(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Bind the call to MMDetection's forward signature; map argument names to roles."""
        names = self._positional
        if len(args) <= len(names) and (self._keywords is None or not kwargs.keys() - self._keywords) and \
                not any(n in kwargs for n in names[:len(args)]) and len(args) >= self._required:
            bound = dict(zip(names, args))        # the fast path of inspect.Signature.bind
            bound.update(kwargs)
            if all(n in bound for n in names[:self._required]):
                return {ROLES.get(k, k): v for k, v in bound.items()}
        try:
            b = self._sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.spec.name}.forward{self._sig}: {e}") from None
        roles = {ROLES.get(k, k): v for k, v in b.arguments.items() if k != "kwargs"}
        roles.update(b.arguments.get("kwargs", {}))
        return roles

    def run_pipeline(self, a: dict[str, Any], record: tuple | None = None):
        """The standard call: validate, bind target/weight/avg_factor, run the variant's kernel.

        `a` maps pipeline roles (pred, target, weight, avg_factor, reduction_override, and any
        per-call hyperparameter) to the call's values; a loss's 'forward' hook may call this with
        prepared arguments (for losses made of several kernels). `record` is (signature key,
        args, kwargs) when forward() may keep a plan of this call (Note [Call plans]).
        """
        loss_def, name = self.spec.loss, self.spec.name
        hooks = loss_def.hooks
        pred = I.check_pred(name, a["pred"])
        if "early_exit" in hooks:
            out = hooks["early_exit"](self.spec, a)
            if out is not None:
                return out
        override = a.get("reduction_override")
        if override is not None:
            check_reduction(name, override, "reduction_override")
        call = I.Call(name, pred, "dense", reduction=override or self.spec.reduction,
                      out_dtype=pred.dtype)
        call.params = tuple((k, loss_def.params[k].check(name, a[k])) for k in self._call_hypers
                            if a.get(k) is not None)
        if "bind_target" in hooks:
            hooks["bind_target"](self.spec, call, a["target"])
        else:
            call.target_form = I.target_form(name, loss_def.target, pred, a["target"])
            call.tensors["label" if call.target_form == "labels" else "target"] = a["target"]
        if "check" in hooks:
            hooks["check"](self.spec, call)
        if "empty" in hooks and pred.numel() == 0:
            return hooks["empty"](self.spec, call, a)
        level = self.compiler.loss_level(call.target_form, call.params)
        if a.get("weight") is not None:
            rule = loss_def.weight if isinstance(loss_def.weight, str) else \
                loss_def.weight[call.target_form]
            I.bind_weight(call, rule, a["weight"], level, "weight_float" in loss_def.quirks)
        before = dataclasses.replace(call, tensors={}) if record is not None else None
        avg = a.get("avg_factor")
        hook_avg = avg is None and call.reduction == "mean" and "avg_factor" in hooks
        if hook_avg:
            avg = hooks["avg_factor"](self.spec, call)
            if avg is not None:    # a denominator from the data: not replayed by a plan
                before = None
        I.promote(self.spec, call)
        I.bind_denominator(call, avg, level, promotes=not hook_avg)
        self._check_grad_inputs(call, a)
        out = self._launch(call, level)
        if before is not None and not (torch.is_grad_enabled() and IG.extra_inputs(call)):
            self._record((*record, before, a), call, level)
        return out

    def variant(self, call: I.Call, grad: bool) -> Variant:
        """The specialization key of a normalized call."""
        return Variant(reduction=call.reduction, target=call.target_form,
                       weight=call.weight_access, grad=grad,
                       dtype=str(call.pred.dtype).replace("torch.", ""),
                       label_dtype=str(call.tensors["label"].dtype).replace("torch.", "")
                       if "label" in call.tensors else "int64",
                       device=call.pred.device.type,
                       denom="tensor" if isinstance(call.denom, torch.Tensor) else "value",
                       params=call.params)

    def _launch(self, call: I.Call, level: Level):
        others = IG.extra_inputs(call) if torch.is_grad_enabled() else ()
        if others:   # gradients for target, weight, avg_factor...: Note [Gradients of every input]
            loss = IG.launch(self, call, level, others)
            return loss.reshape(call.out_shape if call.reduction != "none" else loss.shape) \
                .to(call.out_dtype)
        grad = call.pred.requires_grad and torch.is_grad_enabled()
        if grad and call.reduction == "none" and \
                self.compiler.row_coupled(call.target_form, call.params):
            return _RowCoupledNone.apply(call.pred, self, call, level).to(call.out_dtype)
        v = self.variant(call, grad)
        cv = self.compiler.get(v)
        self._last = cv
        shape = call.loss_shape(level) if call.reduction == "none" else None
        return _apply(self, call, cv.run, grad, shape, level, cv.scale_grad)

    def _record(self, record: tuple, call: I.Call, level: Level):
        """Keep a plan of the call just launched for its repeats (Note [Call plans]), when one
        replays it exactly."""
        key, args, kwargs, before, a = record
        grad = call.pred.requires_grad and torch.is_grad_enabled()
        coupled = grad and call.reduction == "none" and \
            self.compiler.row_coupled(call.target_form, call.params)
        w = plans.replayable_weight(call, a.get("weight"))
        cv = self._last
        if coupled or cv is None or w is False or call.pred.numel() == 0 or \
                ("label" if call.target_form == "labels" else "target") not in call.tensors:
            return
        launch = cv.backend.plan(cv.artifact, call, cv.meta) if cv.backend.plan else None
        hooks = {k: f for k, f in self.spec.loss.hooks.items() if k in ("early_exit", "check")}
        plan = plans.Plan(
            self._plans.slots(args, kwargs), "label" if call.target_form == "labels" else "target",
            w, before, level, cv, _call_launcher(launch) if launch else cv.run, grad,
            call.loss_shape(level) if call.reduction == "none" else None, cv.scale_grad, hooks)
        plan.run = direct.build(plan, cv, launch, call, a, self.spec,
                                lambda m, xs, kw: _replay(plan, m, xs, kw))
        self._plans.add(key, plan)

    def _check_grad_inputs(self, call: I.Call, roles: dict[str, Any] | None = None) -> None:
        """Warn once about an argument that requires grad but gets no gradient: one that a loss's
        hook detached or did not hand to the kernel (the kernel's inputs all get gradients)."""
        if self._warned_grad or not torch.is_grad_enabled() or not roles:
            return
        used = [call.pred, call.denom, *call.tensors.values()]
        missed = [k for k, t in _grad_tensors(roles) if not any(_reaches(u, t) for u in used)]
        if missed:
            self._warned_grad = True
            warnings.warn(f"{self.spec.name}: {', '.join(missed)} require grad but lossgraph "
                          f"gives them no gradient", stacklevel=4)


def _plain(self: CompiledLoss, args: tuple, kwargs: dict):
    """forward(*args, **kwargs) outside torch.compile: a repeat's plan (Note [Call plans]), or
    the unplanned path."""
    book, key = self.__dict__["_plans"], None
    if book is not None:     # Plans.lookup, inlined: a frame less
        form = (*map(type, args), *kwargs, *map(type, kwargs.values())) if kwargs else \
            tuple(map(type, args))
        key, plan = (book.forms.get(form) or book.keyer(form))(args, kwargs)
        if plan is not None:     # a repeat
            run = plan.run       # Note [Direct plans], else the generic replay
            return run(self, args, kwargs) if run is not None else _replay(plan, self, args, kwargs)
    return self._unplanned(args, kwargs, key)


def _call_launcher(launch):
    """A backend launcher (tensors in launch.inputs order, denominator) as call -> (loss, grad)."""
    names = launch.inputs
    return lambda c: launch(tuple(c.pred if n == "pred" else c.tensors[n] for n in names), c.denom)


def _grad_tensors(roles: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(role, tensor) for every argument other than pred that requires grad, in tuples too."""
    out = []
    for k, v in roles.items():
        if v is None or k == "pred":
            continue
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                out.append((k, v))
        elif isinstance(v, (tuple, list)):
            out += [(k, t) for t in v if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def _reaches(u, t: torch.Tensor, limit: int = 64) -> bool:
    """True when autograd carries a gradient of tensor u back to tensor t (u is t, or t is
    among u's autograd ancestors, searched a few dozen nodes deep)."""
    if not isinstance(u, torch.Tensor) or not u.requires_grad:
        return False
    if u is t:
        return True
    goal = t.grad_fn
    todo, seen = [u.grad_fn], 0
    while todo and seen < limit:
        fn = todo.pop()
        seen += 1
        if fn is None:
            continue
        if fn is goal or (goal is None and getattr(fn, "variable", None) is t):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False
