"""The per-call path of a repeat: plain calls (Note [Plain calls]), guarded repeats (Note
[Guarded repeats]) and fast native calls (Note [Fast calls]) change the cost, never the result."""
from __future__ import annotations

import ctypes

import pytest
import torch
from torch import nn

import lossgraph as lg
from lossgraph import plans
from lossgraph.backends import cpp, fastcall
from lossgraph.errors import InputError

needs_cc = pytest.mark.skipif(not cpp.available("cpu"), reason="no working C compiler")


def focal_args(seed=0, n=16, c=6):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3).requires_grad_(True)
    return x, torch.randint(0, c + 1, (n,), generator=g), torch.rand(n, generator=g)


def fwd_bwd(loss, x, *args, **kw):
    x.grad = None
    out = loss(x, *args, **kw)
    out.sum().backward()
    return out.detach().clone(), x.grad.clone()


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


# -- Note [Plain calls] --------------------------------------------------------------------------

def test_module_and_global_hooks_still_run():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    first = fwd_bwd(loss, x, y, w)
    seen = []
    h1 = loss.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    h2 = loss.register_forward_hook(lambda m, a, out: seen.append("post"))
    h3 = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append("global"))
    try:
        assert same(fwd_bwd(loss, x, y, w), first)
    finally:
        h1.remove(), h2.remove(), h3.remove()
    assert sorted(seen) == ["global", "post", "pre"]
    seen.clear()
    assert same(fwd_bwd(loss, x, y, w), first) and seen == []


def test_a_patched_module_call_is_honoured(monkeypatch):
    """torch.fx's tracer patches nn.Module.__call__ on the class; a compiled loss goes through
    the patch like any module."""
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    calls = []
    original = nn.Module.__call__

    def patched(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(nn.Module, "__call__", patched)
    loss(x, y, w)
    assert calls == ["CompiledFocalLoss"]


def test_forward_and_call_agree():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    for _ in range(2):
        assert torch.equal(loss(x, y, w, avg_factor=3.0), loss.forward(x, y, w, avg_factor=3.0))


# -- Note [Guarded repeats] ---------------------------------------------------------------------

def _plan_count(loss):
    return len(loss._plans)


def test_guarded_repeats_find_the_plan_of_each_signature():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    x2, y2, w2 = focal_args(seed=1, n=24)
    book = loss._plans
    keys = {}
    for args in [(x, y, w), (x2, y2, w2)] * 3:
        key, plan = book.lookup(args, {})
        keys.setdefault(args[0].shape, set()).add(key)
        loss(*args)
    assert _plan_count(loss) == 2 and all(len(k) == 1 and None not in k for k in keys.values())
    # every field a key holds makes its own plan: dtype, layout, requires_grad, grad mode, values
    variants = [(x, y.int(), w), (x, y, w.double()), (x.detach(), y, w),
                (x.detach().t().contiguous().t().requires_grad_(True), y, w)]
    for args in variants:
        before = _plan_count(loss)
        loss(*args)
        loss(*args)
        assert _plan_count(loss) == before + 1, [a.dtype for a in args]
    with torch.no_grad():
        loss(x, y, w)
        loss(x, y, w)
    assert _plan_count(loss) == len(variants) + 3
    for r in ("sum", "mean"):
        loss(x, y, w, None, r)
        loss(x, y, w, None, r)
    assert _plan_count(loss) == len(variants) + 5


def test_guarded_and_unguarded_keys_agree(monkeypatch):
    x, y, w = focal_args()
    keys = []
    for guards in (plans._TensorGuards, None):
        monkeypatch.setattr(plans, "_TensorGuards", guards)
        loss = lg.compile(dict(type="FocalLoss"))
        out = [fwd_bwd(loss, x, y, w, avg_factor=2.0) for _ in range(3)]
        assert same(out[0], out[2])
        keys.append(loss._plans.lookup((x, y, w), {"avg_factor": 2.0})[0])
    assert keys[0] == keys[1] and keys[0] is not None


def test_evicting_plans_drops_the_guards(monkeypatch):
    monkeypatch.setattr(plans, "MAX_PLANS", 2)
    loss = lg.compile(dict(type="FocalLoss"))
    calls = [focal_args(seed=s, n=8 + s) for s in range(3)]
    for _ in range(2):
        for args in calls:
            loss(*args)
    assert _plan_count(loss) == 2
    for args in calls:          # every call still finds a plan or records one; results agree
        assert same(fwd_bwd(loss, *args), fwd_bwd(lg.compile(dict(type="FocalLoss")), *args))


def test_a_failed_label_check_on_a_guarded_repeat_raises():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    for _ in range(3):
        loss(x, y, w)
    with pytest.raises(InputError, match="labels must be in"):
        loss(x, torch.full_like(y, 99), w)


# -- Note [Fast calls] -------------------------------------------------------------------------

@needs_cc
def test_fast_and_ctypes_calls_give_the_same_bits():
    """The trampoline calls the kernel ctypes found, with the arguments ctypes would pass."""
    if fastcall.functions() is None:
        pytest.skip("no Python.h: kernels are called through ctypes")
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args(n=300)
    loss(x, y, w)
    fast = loss._last.artifact.fn
    n = len(cpp._tensor_params(loss._last.meta))
    slow = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n, ctypes.c_double, ctypes.c_longlong,
                            ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int)(fast.args[0])
    outs = []
    for fn in (fast, slow):
        lo, gr = torch.empty(()), torch.empty_like(x)
        fn(x.data_ptr(), y.data_ptr(), w.data_ptr(), 0.25, 300, 6, lo.data_ptr(), gr.data_ptr(), 2)
        outs.append((lo, gr))
    assert same(outs[0], outs[1])
    fwd_bwd(loss, x, y, w)   # and the module's own call


@needs_cc
def test_the_trampolines_reject_bad_calls_with_python_errors():
    got = fastcall.functions()
    if got is None:
        pytest.skip("no Python.h: kernels are called through ctypes")
    launch, check = got
    with pytest.raises(TypeError):
        launch(0, 1.0, 1, 1, 0, 0, 1)            # no tensor pointer
    with pytest.raises(TypeError):
        launch(*([0] * 30))
    with pytest.raises(ValueError, match="null"):
        launch(0, 0, 1.0, 0, 0, 0, 0, 1)          # no kernel
    with pytest.raises(TypeError):
        launch(1, "not a pointer", 1.0, 0, 0, 0, 0, 1)
    with pytest.raises(TypeError):
        check(0, 0, 0)
    t = torch.tensor([0, 3, 5])
    fn = cpp._range_functions()[torch.int64]
    assert fn(t.data_ptr(), 3, 0, 5) == 1 and fn(t.data_ptr(), 3, 0, 4) == 0
