"""Call plans (repeats skip re-binding but keep every data check) and float16 loss scaling."""
from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch

import lossgraph as lg
from lossgraph import cache, plans
from lossgraph.errors import InputError
from conftest import BACKENDS
from reference_losses import reference

N, C = 64, 10


def focal_args(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, C, generator=g) * 3).requires_grad_(True)
    return x, torch.randint(0, C + 1, (n,), generator=g), torch.rand(n, generator=g)


def run(loss, x, *args, **kw):
    x.grad = None
    out = loss(x, *args, **kw)
    if out.requires_grad:
        out.sum().backward()
    return out.detach().clone(), None if x.grad is None else x.grad.clone()


CALLS = [
    ("FocalLoss", lambda x, y, w: ((y, w), dict(avg_factor=7.0))),
    ("FocalLoss", lambda x, y, w: ((y,), dict(weight=w, avg_factor=torch.tensor([5.0])))),
    ("FocalLoss", lambda x, y, w: ((y, w, None, "none"), {})),
    ("FocalLoss", lambda x, y, w: ((y, w.reshape(-1, 1)), dict(reduction_override="sum"))),
    ("SmoothL1Loss", lambda x, y, w: ((torch.randn(N, C), w[:, None]), dict(avg_factor=3.0))),
    ("L1Loss", lambda x, y, w: ((torch.zeros_like(x), w[:, None].expand(-1, C).contiguous()), {})),
    ("CrossEntropyLoss", lambda x, y, w: ((y % C,), dict(weight=w, avg_factor=9.0))),
    ("CrossEntropyLoss", lambda x, y, w: ((torch.where(y < 3, -100, y % C), w), {})),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(CALLS)), ids=lambda i: f"{CALLS[i][0]}-{i}")
def test_a_repeat_equals_the_first_call_and_uses_its_plan(i, backend):
    name, make = CALLS[i]
    loss = lg.compile(dict(type=name), backend=backend)
    x, y, w = focal_args(i)
    args, kw = make(x, y, w)
    first = run(loss, x, *args, **kw)
    assert len(loss._plans) == 1
    hits = cache.STATS["memory_hits"]
    second = run(loss, x, *args, **kw)
    assert cache.STATS["memory_hits"] == hits + 1 and len(loss._plans) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].dtype == second[0].dtype and first[0].shape == second[0].shape


def test_the_label_range_is_checked_on_every_repeat():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    loss(x, y, w)
    y[3] = C + 1
    with pytest.raises(InputError, match=r"labels must be in \[0, 10\].*\[0, 11\]"):
        loss(x, y, w)
    y[3] = -1
    with pytest.raises(InputError, match=r"got values in \[-1, 10\]"):
        loss(x, y.to(torch.int32), w)


def test_softmax_ce_repeats_check_labels_and_count_non_ignored_each_call():
    """CrossEntropyLoss's forward hook passes plain (N, C) calls on to a plan; the label check
    (ignore_index excepted) runs on every repeat, and avg_non_ignore's count, which depends on
    the labels, keeps such calls unplanned."""
    x, y, w = focal_args()
    y = y % C
    loss = lg.compile(dict(type="CrossEntropyLoss", ignore_index=4))
    loss(x, y, w)
    loss(x, y, w)
    assert len(loss._plans) == 1 and next(iter(loss._plans._plans.values())).run is not None
    y[2] = 4                                     # ignored: fine
    loss(x, y, w)
    y[5] = C
    with pytest.raises(InputError, match=r"labels must be in \[0, 9\]"):
        loss(x, y, w)
    counted = lg.compile(dict(type="CrossEntropyLoss", ignore_index=4, avg_non_ignore=True))
    y[5] = 1
    for k in range(3):
        y[k] = 4
        ref = reference(dict(type="CrossEntropyLoss", ignore_index=4, avg_non_ignore=True),
                        x.double(), y, w.double())
        assert torch.allclose(counted(x, y, w).double(), ref, rtol=1e-5)
    assert len(counted._plans) == 0


def test_the_zero_weight_exit_and_avg_factor_are_rebound_on_every_repeat():
    loss = lg.compile(dict(type="L1Loss"))
    x = torch.randn(N, 4, requires_grad=True)
    t, w = torch.zeros(N, 4), torch.ones(N, 4)
    for avg in (2.0, 8.0):
        expected = (x.detach().abs() * w).sum() / (avg + torch.finfo(torch.float32).eps)
        assert torch.allclose(loss(x, t, w, avg_factor=avg), expected)
    zero = torch.zeros(N, 4)
    out = loss(x, t, zero, avg_factor=2.0)            # same signature: the exit still runs
    assert out.item() == 0.0 and out.grad_fn is not None


def test_signatures_grad_mode_and_layouts_get_their_own_plans():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    ref = reference(dict(type="FocalLoss"), x.detach().double(), y, w.double())
    with torch.no_grad():
        assert loss(x, y, w).grad_fn is None
    assert loss(x, y, w).grad_fn is not None
    xt = x.detach().t().contiguous().t().requires_grad_(True)       # a strided pred
    got = loss(xt, y, w)
    assert loss(xt, y, w).grad_fn is not None and len(loss._plans) == 3
    assert torch.allclose(got.double(), ref, rtol=1e-5)


def test_plans_are_bounded_and_hold_no_tensors():
    loss = lg.compile(dict(type="FocalLoss"))
    for n in range(1, plans.MAX_PLANS + 6):
        x, y, w = focal_args(n, n)
        run(loss, x, y, w)
    assert len(loss._plans) == plans.MAX_PLANS
    x, y, w = focal_args(0)
    refs = [weakref.ref(t) for t in (x, y, w)]
    run(loss, x, y, w)
    run(loss, x, y, w)
    x.grad = None
    del x, y, w
    gc.collect()
    assert all(r() is None for r in refs)


def test_not_planned_other_grads_forward_hooks_and_tensor_subclasses():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(x, y, w.requires_grad_(True))
        loss(x, y, w)
    # the weight gets its own gradient (input_grads.py), so nothing warns; such calls never plan
    assert len(loss._plans) == 0 and len(caught) == 0
    assert lg.compile(dict(type="GHMC"))._plans is None      # a 'forward' hook: never planned
    sub = torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), x.detach())
    assert loss._plans.key((sub, y, w), {}) is None


def test_a_planned_module_copies_and_pickles():
    loss = lg.compile(dict(type="FocalLoss"))
    x, y, w = focal_args()
    first = run(loss, x, y, w)
    for other in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert len(other._plans) == 0
        assert torch.equal(run(other, x, y, w)[1], first[1])


# -- float16 with loss scaling ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, avg", [(32768.0, None), (65536.0, "tensor")])
def test_fp16_loss_scaling_flushes_no_more_than_eager(backend, scale, avg):
    """A mean over many elements has gradients below float16's smallest subnormal; a loss scale
    lifts them only if it is applied before rounding. (A float16 loss cannot carry a grad_output
    of 65,536: it rounds to inf. With a (1,) float32 avg_factor the loss is float32, as in
    MMDetection, and 65,536 reaches the gradient.)"""
    check_fp16_loss_scaling(backend, scale, avg)


def check_fp16_loss_scaling(backend: str, scale: float, avg) -> None:
    """FocalLoss 4,000 x 80 in float16 under a loss scale: the gradient is finite, flushes no
    more elements to zero than MMDetection's eager float16 backward (and fewer than rounding
    before scaling would), and is close to the float64 gradient."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    x = (torch.randn(n, 80, generator=g) * 4).half().requires_grad_(True)
    y = torch.randint(0, 81, (n,), generator=g)
    kw = {} if avg is None else dict(avg_factor=torch.tensor([n * 80.0]))
    cfg = dict(type="FocalLoss")
    ours = lg.compile(cfg, backend=backend)(x, y, **kw)
    eager = reference(cfg, x, y, **kw)
    assert ours.dtype == eager.dtype
    got, = torch.autograd.grad(ours, x, torch.full_like(ours, scale))
    ref, = torch.autograd.grad(eager, x, torch.full_like(eager, scale))
    x64 = x.detach().double().requires_grad_(True)
    exact, = torch.autograd.grad(reference(cfg, x64, y, **{k: v.double() for k, v in kw.items()}),
                                 x64, torch.full((), scale, dtype=torch.float64).expand(ours.shape))
    assert torch.isfinite(got).all()
    zeros, eager_zeros = int((got == 0).sum()), int((ref == 0).sum())
    rounded_first = int(((exact / scale).half().double() * scale == 0).sum())
    assert 0 < rounded_first and zeros <= eager_zeros and zeros < rounded_first
    assert torch.allclose(got.double(), exact, rtol=2e-3, atol=6e-8)


# -- the direct path (direct.py, Note [Direct plans]) -----------------------------------------

DIRECT_CALLS = [
    lambda x, y, w: ((y, w), dict(avg_factor=7.0)),
    lambda x, y, w: ((y,), dict(weight=w, avg_factor=torch.tensor([5.0]))),
    lambda x, y, w: ((y, w, 3), {}),
    lambda x, y, w: ((y, w), {}),
    lambda x, y, w: ((y, w, None, "none"), {}),
    lambda x, y, w: ((y,), dict(reduction_override="sum")),
]


def _generic(loss):
    """The module's plans with their direct paths removed (the generic replay)."""
    for p in loss._plans._plans.values():
        p.run = None


@pytest.mark.parametrize("i", range(len(DIRECT_CALLS)))
def test_the_direct_path_equals_the_generic_replay_bit_for_bit(i):
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args(i)
    args, kw = DIRECT_CALLS[i](x, y, w)
    first = run(loss, x, *args, **kw)
    plan, = loss._plans._plans.values()
    assert plan.run is not None
    direct = run(loss, x, *args, **kw)
    _generic(loss)
    generic = run(loss, x, *args, **kw)
    for a, b in ((first, direct), (generic, direct)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].dtype == b[0].dtype and a[0].shape == b[0].shape
        assert a[1].stride() == b[1].stride()


def test_direct_losses_never_alias_and_inputs_are_untouched():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args()
    saved = [t.detach().clone() for t in (x, y, w)]
    outs = [loss(x, y, w, avg_factor=3.0) for _ in range(3)]
    x2 = (x.detach() * 0.5).requires_grad_(True)
    outs.append(loss(x2, y, w, avg_factor=3.0))
    assert len({o.data_ptr() for o in outs}) == len(outs)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[3])
    for o in outs:
        o.backward()
    assert all(torch.equal(a, b.detach()) for a, b in zip(saved, (x, y, w)))


def test_direct_backward_scales_retains_and_double_backwards():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args()
    loss(x, y, w)
    out = loss(x, y, w)                       # direct
    g1, = torch.autograd.grad(out, x, torch.tensor(2.5), retain_graph=True)
    g2, = torch.autograd.grad(out, x, torch.tensor(2.5))          # the kernel runs again
    assert torch.equal(g1, g2)
    x64 = x.detach().double().requires_grad_(True)
    want, = torch.autograd.grad(reference(dict(type="FocalLoss"), x64, y, w.double()), x64)
    assert torch.allclose(g1.double(), 2.5 * want, rtol=1e-5)
    out = loss(x, y, w)
    g, = torch.autograd.grad(out, x, create_graph=True)          # create_graph: the reference
    assert g.requires_grad and torch.allclose(g.double(), want, rtol=1e-5, atol=1e-9)


def test_the_direct_label_check_raises_the_hooks_error():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args()
    loss(x, y, w, avg_factor=2.0)
    assert next(iter(loss._plans._plans.values())).run is not None
    bad = y.clone()
    bad[5] = C + 3
    with pytest.raises(InputError, match=r"labels must be in \[0, 10\] \(10 = background\), "
                                         r"got values in \[0, 13\]"):
        loss(x, bad, w, avg_factor=2.0)
    assert torch.equal(loss(x, y, w, avg_factor=2.0), loss(x, y, w, avg_factor=2.0))


def test_direct_plans_from_several_threads():
    import threading
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    cases = [focal_args(s, n) for s, n in ((1, 16), (2, 40), (3, 16))]
    want = [run(loss, x, y, w, avg_factor=5.0) for x, y, w in cases]
    errors = []

    def work(k):
        try:
            for _ in range(30):
                x, y, w = cases[k % 3]
                xk = x.detach().clone().requires_grad_(True)
                got = run(loss, xk, y, w, avg_factor=5.0)
                assert torch.equal(got[0], want[k % 3][0]) and torch.equal(got[1], want[k % 3][1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_direct_inspection_and_compile_tracing_skip_plans():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    x, y, w = focal_args()
    loss(x, y, w)
    loss._last = None
    loss(x, y, w)                             # the direct path records the kernel it ran
    assert loss._last is not None and "lossgraph" in loss.source
    import unittest.mock as mock
    with mock.patch.object(plans, "_is_compiling", lambda: True):
        assert loss._plans.lookup((x, y, w), {}) == (None, None)
