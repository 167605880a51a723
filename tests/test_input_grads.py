"""Gradients for every input that requires grad (target, weight (N,) / (N,4) / (N,C), tensor
avg_factor, QFL's scores) and double backward (a gradient penalty), against MMDetection's eager
formulas differentiated by torch autograd in float64 (reference_losses.py / reference_zoo.py).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lossgraph as lg
from conftest import BACKENDS, assert_close, compiled
from reference_losses import reference
from reference_zoo import zoo_reference

D = torch.float64
N, C = 6, 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ref(cfg, *args, **kwargs):
    try:
        return reference(cfg, *args, **kwargs)
    except KeyError:
        return zoo_reference(cfg, *args, **kwargs)


def boxes(n, g):
    xy = torch.rand(n, 2, generator=g, dtype=D) * 10
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=D) * 5 + 1], 1)


def make(kind: str, g):
    """(pred, target) for a case; a float target (or QFL's scores) will require grad."""
    if kind == "boxes":
        return boxes(N, g) + 0.3 * torch.randn(N, 4, generator=g, dtype=D), boxes(N, g)
    if kind == "reg":
        return torch.randn(N, 4, generator=g, dtype=D), torch.randn(N, 4, generator=g, dtype=D)
    logits = torch.randn(N, C, generator=g, dtype=D) * 2
    if kind == "labels":
        return logits, torch.randint(0, C + 1, (N,), generator=g)
    if kind == "fg_labels":
        return logits, torch.randint(0, C, (N,), generator=g)
    if kind == "soft":
        return logits, torch.rand(N, C, generator=g, dtype=D)
    if kind == "qfl":
        return logits, (torch.randint(0, C + 1, (N,), generator=g), torch.rand(N, generator=g, dtype=D))
    raise ValueError(kind)


# (id, config, input kind, weight shape, weight-gradient dtype: CE's weight.float() rounds it)
CASES = [
    ("giou-w(N,)", dict(type="GIoULoss", loss_weight=2.0), "boxes", (N,), D),
    ("giou-w(N,4)", dict(type="GIoULoss"), "boxes", (N, 4), D),
    ("l1-w(N,4)", dict(type="L1Loss", loss_weight=1.5), "reg", (N, 4), D),
    ("l1-w(4,)", dict(type="L1Loss"), "reg", (4,), D),
    ("smoothl1-w(N,1)", dict(type="SmoothL1Loss", beta=0.5), "reg", (N, 1), D),
    ("focal-w(N,)", dict(type="FocalLoss", loss_weight=0.7), "labels", (N,), D),
    ("focal-w(N,C)", dict(type="FocalLoss"), "labels", (N, C), D),
    ("ce-sigmoid-labels", dict(type="CrossEntropyLoss", use_sigmoid=True), "fg_labels", (N,),
     torch.float32),
    ("ce-sigmoid-soft", dict(type="CrossEntropyLoss", use_sigmoid=True), "soft", (N, C),
     torch.float32),
    ("ce-softmax", dict(type="CrossEntropyLoss"), "fg_labels", (N,), torch.float32),
    ("qfl", dict(type="QualityFocalLoss"), "qfl", (N,), D),
]


def _leaves(kind, g, wshape):
    pred, target = make(kind, g)
    pred.requires_grad_(True)
    leaves = [pred]
    if isinstance(target, tuple):
        target = (target[0], target[1].requires_grad_(True))
        leaves.append(target[1])
    elif target.dtype.is_floating_point:
        leaves.append(target.requires_grad_(True))
    weight = (torch.rand(wshape, generator=g, dtype=D) + 0.1).requires_grad_(True)
    return pred, target, weight, leaves + [weight]


def _tol(t, wdtype, weight):
    return wdtype if t is weight else D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,cfg,kind,wshape,wdtype", CASES, ids=[c[0] for c in CASES])
def test_every_input_gets_its_gradient(backend, reduction, name, cfg, kind, wshape, wdtype):
    pred, target, weight, leaves = _leaves(kind, _gen(sum(map(ord, name))), wshape)
    kwargs = {"reduction_override": reduction}
    if reduction == "mean":
        kwargs["avg_factor"] = torch.tensor(4.0, dtype=D, requires_grad=True)
        leaves.append(kwargs["avg_factor"])
    before = [t.detach().clone() for t in leaves]
    loss = compiled(cfg, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no 'gets no gradient' warning
        out = loss(pred, target, weight, **kwargs)
    expected = ref(cfg, pred, target, weight, **kwargs)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected, D, f"{name} value")
    go = torch.rand(expected.shape, generator=_gen(1), dtype=D) + 0.5
    got = torch.autograd.grad(out, leaves, go)
    want = torch.autograd.grad(expected, leaves, go)
    for t, a, e in zip(leaves, got, want):
        assert a.shape == t.shape and a.dtype == t.dtype
        assert_close(a, e, _tol(t, wdtype, weight), f"{name} d/d{tuple(t.shape)}")
    for t0, t1 in zip(before, leaves):
        assert torch.equal(t0, t1.detach()), "an input was modified"


DOUBLE = [c for c in CASES if c[0] in ("giou-w(N,4)", "l1-w(N,4)", "smoothl1-w(N,1)",
                                       "focal-w(N,)", "ce-sigmoid-labels", "ce-softmax", "qfl")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("others", [False, True], ids=["pred-only", "all-inputs"])
@pytest.mark.parametrize("name,cfg,kind,wshape,wdtype", DOUBLE, ids=[c[0] for c in DOUBLE])
def test_gradient_penalty_double_backward(backend, others, name, cfg, kind, wshape, wdtype):
    """g = d(loss)/d(pred) with create_graph=True, then (g**2).sum().backward(), as in eager."""
    pred, target, weight, leaves = _leaves(kind, _gen(7), wshape)
    if not others:
        for t in leaves[1:]:
            t.requires_grad_(False)
        leaves = leaves[:1]
    loss = compiled(cfg, backend)
    for reduction in ("mean", "none"):
        out = loss(pred, target, weight, reduction_override=reduction)
        expected = ref(cfg, pred, target, weight, reduction_override=reduction)
        go = torch.rand(expected.shape, generator=_gen(2), dtype=D) + 0.5
        g, = torch.autograd.grad(out, pred, go, create_graph=True)
        ge, = torch.autograd.grad(expected, pred, go, create_graph=True)
        assert g.requires_grad, "create_graph=True gave a detached gradient"
        assert_close(g, ge, D, f"{name} first derivative")
        got = torch.autograd.grad((g ** 2).sum(), leaves)
        want = torch.autograd.grad((ge ** 2).sum(), leaves)
        for t, a, e in zip(leaves, got, want):
            assert_close(a, e, _tol(t, wdtype, weight), f"{name} {reduction} d(penalty)/d{tuple(t.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_coupled_none_double_backward(backend):
    """BoundedIoULoss 'none' (each side reads other columns) is differentiable twice as well."""
    cfg = dict(type="BoundedIoULoss", beta=0.2)
    g0 = _gen(3)
    pred, target = make("boxes", g0)
    pred.requires_grad_(True)
    out = compiled(cfg, backend)(pred, target, reduction_override="none")
    expected = ref(cfg, pred, target, reduction_override="none")
    go = torch.rand(expected.shape, generator=g0, dtype=D)
    g, = torch.autograd.grad(out, pred, go, create_graph=True)
    ge, = torch.autograd.grad(expected, pred, go, create_graph=True)
    assert_close(torch.autograd.grad((g ** 2).sum(), pred)[0],
                 torch.autograd.grad((ge ** 2).sum(), pred)[0], D, "penalty")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_recomputes_every_gradient(backend):
    """retain_graph=True: the second backward gives the same gradients for every input."""
    pred, target, weight, leaves = _leaves("boxes", _gen(4), (N,))
    out = compiled(dict(type="GIoULoss"), backend)(pred, target, weight)
    first = torch.autograd.grad(out, leaves, retain_graph=True)
    second = torch.autograd.grad(out, leaves, torch.tensor(3.0, dtype=D))
    for a, b in zip(first, second):
        assert torch.equal(a * 3, b)


def test_float32_target_gradient_keeps_its_dtype():
    """A float32 target of a float32 pred gets a float32 gradient within float32 tolerance."""
    g = _gen(5)
    pred, target = (x.float() for x in make("boxes", g))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    out = compiled(dict(type="GIoULoss"), "torchscript")(pred, target)
    out.backward()
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (pred, target))
    ref(dict(type="GIoULoss"), p64, t64).backward()
    assert target.grad.dtype == torch.float32
    assert_close(target.grad, t64.grad, torch.float32, "target grad")
    assert_close(pred.grad, p64.grad, torch.float32, "pred grad")


def test_extra_gradients_only_in_the_variants_that_need_them():
    """Only pred requires grad: the kernel is the plain one (no extra outputs, no wrt tag)."""
    loss = lg.compile(dict(type="L1Loss"), backend="torchscript")
    pred, target = make("reg", _gen(6))
    loss(pred.requires_grad_(True), target)
    assert "grad_" not in loss.source and "wrt" not in loss.source
    loss(pred, target.requires_grad_(True))
    assert "grad_target" in loss.source and "wrt-pred+target" in loss.source


def test_warning_names_only_inputs_without_gradient():
    """The one-time warning appears only for an argument that truly gets no gradient."""
    def _detach_target(spec, call, target):
        call.target_form = "dense"
        call.tensors["target"] = target.detach()

    @lg.register_loss("TestDetachedTarget", hooks={"bind_target": _detach_target})
    def detached(pred, target):
        return lg.abs(pred - target)

    loss = lg.compile(dict(type="TestDetachedTarget"), backend="torchscript")
    pred, target = make("reg", _gen(8))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    with pytest.warns(UserWarning, match="target require grad but lossgraph gives them no"):
        loss(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(pred, target)                              # once only
        lg.compile(dict(type="L1Loss"), backend="torchscript")(pred, target)

