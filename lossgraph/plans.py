"""Per-call fast path: a cached "call plan" for repeats of a call's signature.

Note [Call plans]: MMDetection calls each loss once per FPN level, every step, with the same
shapes, dtypes and argument forms; validating and binding such a call again costs more than a
small kernel. The first call of a signature runs the full pipeline (runtime.run_pipeline) and
records what it decided: where each role sits among the arguments, the target form, the weight's
access, the output dtype, the kernel and a backend launcher. A repeat with the same signature
(shapes, strides, dtypes, devices, requires_grad, grad mode, the values of every non-tensor
argument but avg_factor, whose type only) replays those decisions. Whatever depends on the data
still runs every call: the loss's 'early_exit' and 'check' hooks (label range, zero-weight
exit) and the avg_factor denominator. Calls are planned only where the replay is exact: no
'forward', 'bind_target' or 'avg_factor' hook, no empty pred, a weight that binding only viewed
(same memory, dtype and size), no other tensor requiring grad, not row-coupled 'none', not
under torch.compile tracing. Plans hold no tensors of a call.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter, methodcaller
from typing import Any, Callable

import torch
from torch import nn

from . import cache
from . import inputs as I
from .ops import Level

MAX_PLANS = 64                   # per module; the oldest plan goes first
UNPLANNED_HOOKS = ("forward", "bind_target", "avg_factor")


_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)
_grad_enabled = torch.is_grad_enabled
_PLAIN = (torch.Tensor, nn.Parameter)
_META = attrgetter("shape", "dtype", "device", "requires_grad")
_STRIDE = methodcaller("stride")
_UNSEEN = object()
_new = object.__new__
assert not hasattr(I.Call, "__post_init__") and not hasattr(I.Call, "__slots__")  # Plan.bound


# Note [Guarded repeats]: building a signature key (Note [Signature key]) reads 4 attributes and
# the strides of every tensor, makes a torch.Size and a torch.device each, then hashes and
# compares the nested tuple: ~22,000 x86 instructions for 3 tensors (callgrind), as much as the
# rest of a tiny planned call's forward. Dynamo's C++ TensorGuards checks the same metadata
# (dispatch keys, which cover the device type; dtype, device index, requires_grad, sizes,
# strides) of a tuple of tensors in ~3,700. So a form's keyer keeps, for each plan it has found,
# such a guard built from that call's tensors (it holds no tensor) with the grad mode and the
# non-tensor values; a repeat that passes a guard returns that plan and its recorded key without
# building one. A guard checks a superset of the key's tensor fields, so a hit is a call whose
# key equals the recorded one; a miss takes the key path above. Guards live in the keyer, so
# dropping the keyers (evicting a plan, clear()) drops them. TensorGuards is torch-internal:
# where it is missing or its constructor differs, keyers build keys as before.
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:      # pragma: no cover - other torch builds
    _TensorGuards = None
MAX_GUARDS = 8           # per call form: MMDetection's 5 FPN levels, with room


def _guard(ts: tuple) -> Callable | None:
    """A C-level check that tensors have ts' metadata (Note [Guarded repeats]), or None."""
    try:
        g = _TensorGuards(*ts, dynamic_dims_sizes=[list(t.shape) for t in ts],
                          dynamic_dims_strides=[list(t.stride()) for t in ts])
        return g.check if g.check(*ts) else None
    except Exception:    # noqa: BLE001 - an internal API: any failure means no guard
        return None


def _never(args: tuple, kwargs: dict) -> tuple[None, None]:
    return None, None


def arg_getter(slots: list) -> Callable[[tuple, dict], tuple]:
    """(args, kwargs) -> the values at slots (positional indices, keyword names, or None for
    an absent argument) as a tuple, in order, by C-level itemgetters."""
    if None in slots:
        return lambda a, k: tuple(None if s is None else a[s] if type(s) is int else k[s]
                                  for s in slots)
    pos = [s for s in slots if type(s) is int]
    kw = [s for s in slots if type(s) is not int]
    if not kw:
        get_a = _tuple_getter(pos)
        return lambda a, k: get_a(a)
    get_a, get_k = _tuple_getter(pos), _tuple_getter(kw)
    order = _tuple_getter([(pos + kw).index(s) for s in slots])
    return lambda a, k: order(get_a(a) + get_k(k))


def _tuple_getter(keys: list) -> Callable[[Any], tuple]:
    """container -> (container[k] for k in keys) as a tuple, by one C-level itemgetter call."""
    if not keys:
        return lambda c: ()
    if len(keys) == 1:
        k = keys[0]
        return lambda c: (c[k],)
    return itemgetter(*keys)


@dataclass
class Plan:
    """The recorded decisions of one call signature (see Note [Call plans])."""

    slots: dict[str, Any]          # role -> positional index or keyword name
    target_key: str                # 'label' or 'target'
    weight_shape: tuple | None     # the bound weight's shape (a view of the raw weight)
    call: I.Call                   # the call's fields before its denominator (tensors emptied)
    level: Level
    cv: Any                        # the CompiledVariant
    launch: Callable               # call -> (loss, grad)
    grad: bool
    shape: Any                     # the loss shape of a 'none' reduction, else None
    scale: Callable | None
    hooks: dict[str, Callable]
    run: Callable | None = None    # the direct path (direct.py), when the call allows it

    def roles(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {r: (args[s] if type(s) is int else kwargs[s]) for r, s in self.slots.items()}

    def arg(self, role: str, args: tuple, kwargs: dict):
        s = self.slots.get(role)
        if s is None:
            return None
        return args[s] if type(s) is int else kwargs[s]

    def bind(self, spec, args: tuple, kwargs: dict):
        """The Call of a repeat, or the early-exit result when the loss takes one."""
        if "early_exit" in self.hooks:
            out = self.hooks["early_exit"](spec, self.roles(args, kwargs))
            if out is not None:
                return out
        call = self.bound(args, kwargs)
        if "check" in self.hooks:
            self.hooks["check"](spec, call)
        self.finish(spec, call, args, kwargs)
        cache.STATS["memory_hits"] += 1
        return call

    def __post_init__(self):
        c = self.call
        roles = ("pred", "target", "weight") if self.weight_shape is not None else ("pred", "target")
        self._pick = arg_getter([self.slots.get(r) for r in roles])
        self._fields = {"name": c.name, "target_form": c.target_form,
                        "weight_access": c.weight_access, "reduction": c.reduction, "denom": None,
                        "out_dtype": c.out_dtype, "out_shape": (), "params": c.params}

    def bound(self, args: tuple, kwargs: dict) -> I.Call:
        """The repeat's Call as run_pipeline has it when the 'check' hook runs (no denominator).

        Note [Building a Call]: I.Call's dataclass __init__ only assigns its fields; here the
        instance dict is filled in one update from the recorded fields instead (a third of the
        work, on every planned call of a loss with a 'check' hook)."""
        got = self._pick(args, kwargs)
        tensors = {self.target_key: got[1]}
        ws = self.weight_shape
        if ws is not None:
            w = got[2]
            tensors["weight"] = w if w.shape == ws else w.view(ws)
        call = _new(I.Call)
        call.__dict__.update(self._fields, pred=got[0], tensors=tensors)
        return call

    def finish(self, spec, call: I.Call, args: tuple, kwargs: dict) -> I.Call:
        """The result dtype and the denominator: the rest of the binding."""
        I.promote(spec, call)
        I.bind_denominator(call, self.arg("avg_factor", args, kwargs), self.level)
        return call


class Plans:
    """A module's plans by call signature; `key` is None for calls that are never planned."""

    def __init__(self, positional: tuple[str, ...], roles: dict[str, str]):
        self.positional = positional
        self.roles = roles
        self.avg_index = next((i for i, n in enumerate(positional)
                               if roles.get(n, n) == "avg_factor"), -1)
        self._plans: dict[tuple, Plan] = {}
        self.forms: dict[tuple, Callable] = {}     # call form -> keyer (Note [Signature key])

    def lookup(self, args: tuple, kwargs: dict) -> tuple[tuple | None, Plan | None]:
        """(the call's signature, its plan): (None, None) when the call cannot be planned.

        Note [Signature key]: every call pays for this, so it is a few C-level calls rather than
        Python work per argument. The call's form (each argument's type, the keyword names)
        selects a keyer made once per form (_keyer); it picks the tensors and the values with
        itemgetters and reads every tensor's (shape, dtype, device, requires_grad) and strides
        with map. The key is (form, grad mode, those, the values but avg_factor's, whose type
        is in the form). A form with a tensor subclass, or too many positional arguments, has
        no keyer: such calls are never planned.
        """
        if _is_compiling():
            return None, None
        form = (*map(type, args), *kwargs, *map(type, kwargs.values())) if kwargs else \
            tuple(map(type, args))
        keyer = self.forms.get(form)
        return (keyer or self.keyer(form))(args, kwargs)

    def keyer(self, form: tuple) -> Callable[[tuple, dict], tuple]:
        """The (args, kwargs) -> (key, plan) function of a call form, made once per form."""
        keyer = self._keyer(form) or _never
        if len(self.forms) >= MAX_PLANS:
            self.forms.clear()
        self.forms[form] = keyer
        return keyer

    def _keyer(self, form: tuple) -> Callable | None:
        """The key function of a call form (Note [Signature key]), or None: never planned.

        A form is the positional arguments' types, then the keyword names (str instances,
        which no type is), then the keywords' types."""
        npos = next((i for i, t in enumerate(form) if isinstance(t, str)), len(form))
        ptypes, rest = form[:npos], form[npos:]
        names, ktypes = rest[:len(rest) // 2], rest[len(rest) // 2:]
        if len(ptypes) > len(self.positional):
            return None
        if any(issubclass(t, torch.Tensor) and t not in _PLAIN for t in (*ptypes, *ktypes)):
            return None                  # a tensor subclass: not planned
        tp = [i for i, t in enumerate(ptypes) if t in _PLAIN]
        vp = [i for i, t in enumerate(ptypes) if t not in _PLAIN and i != self.avg_index]
        tk = [n for n, t in zip(names, ktypes) if t in _PLAIN]
        vk = [n for n, t in zip(names, ktypes)
              if t not in _PLAIN and self.roles.get(n, n) != "avg_factor"]
        tensors = arg_getter(tp + tk)
        values = arg_getter(vp + vk) if vp or vk else None
        get = self._plans.get
        if values is None:
            def full(ts, gm, a, k):
                key = (form, gm, *map(_META, ts), *map(_STRIDE, ts))
                return key, get(key)     # (tensor metadata always hashes)
        else:
            def full(ts, gm, a, k):
                key = (form, gm, *map(_META, ts), *map(_STRIDE, ts), values(a, k))
                try:
                    return key, get(key)
                except TypeError:        # an unhashable argument value
                    return None, None
        if _TensorGuards is None:
            return lambda a, k: full(tensors(a, k), _grad_enabled(), a, k)
        seen: list[tuple] = []           # (check, grad mode, values, key, plan): Note [Guarded repeats]

        def keyer(a, k):
            ts, gm = tensors(a, k), _grad_enabled()
            for check, mode, vals, key, plan in seen:
                if mode is gm and check(*ts) and (values is None or vals == values(a, k)):
                    return key, plan
            key, plan = full(ts, gm, a, k)
            if plan is not None and len(seen) < MAX_GUARDS:
                check = _guard(ts)
                if check is not None:
                    seen.append((check, gm, values(a, k) if values is not None else None, key, plan))
            return key, plan
        return keyer

    def key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The call's signature, or None when it cannot be planned."""
        return self.lookup(args, kwargs)[0]

    def get(self, key: tuple) -> Plan | None:
        return self._plans.get(key)

    def slots(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        s: dict[str, Any] = {self.roles.get(n, n): i for i, n in enumerate(self.positional[:len(args)])}
        s.update({self.roles.get(n, n): n for n in kwargs})
        return s

    def add(self, key: tuple, plan: Plan) -> None:
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
            self.forms.clear()           # the keyers' guarded plans go with it
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()
        self.forms.clear()

    def __len__(self) -> int:
        return len(self._plans)


def replayable_weight(call: I.Call, raw) -> tuple | None | bool:
    """The bound weight's shape when binding only viewed the raw weight, None without a weight,
    False when binding made a new tensor (then the call is not planned)."""
    t = call.tensors.get("weight")
    if t is None:
        return None
    if not isinstance(raw, torch.Tensor) or t.dtype != raw.dtype or t.numel() != raw.numel() or \
            not raw.is_contiguous() or not t.is_contiguous() or \
            (t.numel() and t.data_ptr() != raw.data_ptr()):
        return False
    return tuple(t.shape)
