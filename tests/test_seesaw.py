"""SeesawLoss's one gradient (Note [Seesaw's one gradient]): both parts' gradients land in one
N x (C + 2) buffer, bit for bit the gradient of the two-branch form, on every backend."""
from __future__ import annotations

import copy

import pytest
import torch

import lossgraph
from conftest import BACKENDS
from cuda_emulator import compiler
from test_cuda_emulated import emulated_gpu  # noqa: F401  (a fixture)
from lossgraph.losses import seesaw

K, N = 5, 24


def inputs(seed: int, dtype=torch.float32, share: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K + 2, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, K, (N,), generator=g)
    labels[torch.rand(N, generator=g) >= share] = K
    return x, labels, torch.rand(N, generator=g, dtype=torch.float64).to(dtype)


def run(cfg, backend, x, labels, kw, weights=(1.0, 1.0), joint=True, monkeypatch=None,
        create_graph=False):
    """(outputs, d/dx) of one call from a fresh module, with or without _Joint."""
    monkeypatch.setattr(seesaw, "JOINT_MIN_BYTES", 0)   # these inputs are small
    monkeypatch.setattr(seesaw, "_one_gradient", _spy if joint else lambda *a: False)
    loss = lossgraph.compile(cfg, backend=backend)
    loss = loss.to(x.dtype) if x.dtype == torch.float64 else loss
    p = x.clone().requires_grad_(True)
    out = loss(p, labels, **kw)
    parts = [out["loss_cls_classes"], out["loss_cls_objectness"]] if isinstance(out, dict) \
        else [out]
    total = sum(w * t for w, t in zip(weights, parts) if w is not None)
    if create_graph:
        (g,) = torch.autograd.grad(total, p, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), p)
        return [t.detach() for t in parts], gg, loss
    total.backward()
    return [t.detach() for t in parts], p.grad, loss


USED = []


def _spy(*a):
    used = _ONE(*a)
    USED.append(used)
    return used


_ONE = seesaw._one_gradient

CALLS = [{}, {"label_weights": True}, {"label_weights": True, "avg_factor": 7.0},
         {"reduction_override": "sum"}, {"avg_factor": torch.tensor(3.0)}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_one_gradient_equals_two_branches(backend, dtype, share, monkeypatch):
    for i, kw in enumerate(CALLS):
        x, labels, lw = inputs(i, dtype, share)
        kw = dict(kw, label_weights=lw) if kw.get("label_weights") else kw
        for cfg, weights in [(dict(type="SeesawLoss", num_classes=K), (1.0, 1.0)),
                             (dict(type="SeesawLoss", num_classes=K), (0.5, 3.0)),
                             (dict(type="SeesawLoss", num_classes=K, return_dict=False), (1.0,)),
                             (dict(type="SeesawLoss", num_classes=K, loss_weight=2.0), (1.0, None)),
                             (dict(type="SeesawLoss", num_classes=K), (None, 2.0))]:
            USED.clear()
            a, ga, _ = run(cfg, backend, x, labels, kw, weights, True, monkeypatch)
            assert USED == [True]
            b, gb, _ = run(cfg, backend, x, labels, kw, weights, False, monkeypatch)
            for s, t in zip(a, b):
                assert torch.equal(s, t)
            assert ga.dtype == x.dtype and torch.equal(ga, gb), (cfg, weights, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_gradient_double_backward_and_retain_graph(backend, monkeypatch):
    x, labels, lw = inputs(7, torch.float64)
    cfg = dict(type="SeesawLoss", num_classes=K)
    a, gga, loss = run(cfg, backend, x, labels, {"label_weights": lw}, joint=True,
                       monkeypatch=monkeypatch, create_graph=True)
    assert loss.cum_samples.sum().item() == N     # counted once, not again by the recompute
    b, ggb, _ = run(cfg, backend, x, labels, {"label_weights": lw}, joint=False,
                    monkeypatch=monkeypatch, create_graph=True)
    assert torch.allclose(gga, ggb, rtol=1e-12, atol=1e-12)
    # retain_graph: a second backward of the same graph gives the same gradient again
    monkeypatch.setattr(seesaw, "_one_gradient", _ONE)
    loss = lossgraph.compile(cfg, backend=backend).double()
    p = x.clone().requires_grad_(True)
    out = loss(p, labels, lw)
    total = out["loss_cls_classes"] + out["loss_cls_objectness"]
    total.backward(retain_graph=True)
    first = p.grad.clone()
    p.grad = None
    total.backward()
    assert torch.equal(p.grad, first)


def test_one_gradient_is_the_class_kernels_buffer(monkeypatch):
    """No N x (C + 2) zero fill or add in backward: the objectness gradient is added into the
    class gradient's last 2 columns in place."""
    monkeypatch.setattr(seesaw, "JOINT_MIN_BYTES", 0)
    x, labels, _ = inputs(3, share=0.0)
    loss = lossgraph.compile(dict(type="SeesawLoss", num_classes=K, return_dict=False))
    p = x.clone().requires_grad_(True)
    loss(p, labels)   # the kernels are built
    out = loss(p, labels)
    with torch.profiler.profile(record_shapes=True) as prof:
        out.backward()
    full = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::fill_", "aten::add_")
            and any(list(s) == [N, K + 2] for s in e.input_shapes)]
    assert full == []
    assert torch.equal(p.grad[:, :K], torch.zeros(N, K))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchanged_where_one_gradient_does_not_apply(backend, monkeypatch):
    """reduction='none', a label_weights or avg_factor that requires grad, no grad, a small
    cls_score: the two branches."""
    x, labels, lw = inputs(5)
    assert not seesaw._one_gradient(x.detach().requires_grad_(True), lw, None, "mean")  # small
    big = torch.zeros(seesaw.JOINT_MIN_BYTES // 4 // (K + 2) + 1, K + 2, requires_grad=True)
    assert seesaw._one_gradient(big, lw, None, "mean")
    monkeypatch.setattr(seesaw, "JOINT_MIN_BYTES", 0)
    loss = lossgraph.compile(dict(type="SeesawLoss", num_classes=K), backend=backend)
    p = x.clone().requires_grad_(True)
    w = lw.clone().requires_grad_(True)
    assert not seesaw._one_gradient(p, w, None, "mean")
    assert not seesaw._one_gradient(p, lw, None, "none")
    assert not seesaw._one_gradient(p, lw, torch.tensor(2.0, requires_grad=True), "mean")
    with torch.no_grad():
        assert not seesaw._one_gradient(p, lw, None, "mean")
    out = loss(p, labels, w)
    (out["loss_cls_classes"] + out["loss_cls_objectness"]).backward()
    assert p.grad is not None and w.grad is not None


def test_copies_after_one_gradient(monkeypatch):
    """deepcopy only: pickling a SeesawLoss fails on main already (its bound get_cls_channels
    & co. in the instance __dict__ are looked up on the half-built copy)."""
    monkeypatch.setattr(seesaw, "JOINT_MIN_BYTES", 0)
    x, labels, _ = inputs(9)
    loss = lossgraph.compile(dict(type="SeesawLoss", num_classes=K))
    p = x.clone().requires_grad_(True)
    out = loss(p, labels)
    (out["loss_cls_classes"] + out["loss_cls_objectness"]).backward()
    for other in (copy.deepcopy(loss),):
        assert torch.equal(other.cum_samples, loss.cum_samples)
        q = x.clone().requires_grad_(True)
        a, b = other(q, labels), loss(x, labels)
        assert all(torch.equal(a[k].detach(), b[k]) for k in a)



@pytest.mark.slow
@pytest.mark.skipif(compiler() is None or "cpp" not in BACKENDS,
                    reason="the CUDA emulator needs g++ (and the cpp twin)")
def test_one_gradient_on_the_emulated_cuda_path(emulated_gpu, monkeypatch):
    """backend='cuda' through the CUDA emulator: the same gradient with and without _Joint, at
    grad_output 1 and not (the rescale kernel), close to the cpp backend's."""
    x, labels, lw = inputs(11)
    cfg = dict(type="SeesawLoss", num_classes=K)
    for weights in [(1.0, 1.0), (0.5, 3.0), (None, 2.0)]:
        a, ga, _ = run(cfg, "cuda", x, labels, {"label_weights": lw}, weights, True, monkeypatch)
        b, gb, _ = run(cfg, "cuda", x, labels, {"label_weights": lw}, weights, False, monkeypatch)
        c, gc, _ = run(cfg, "cpp", x, labels, {"label_weights": lw}, weights, True, monkeypatch)
        assert all(torch.equal(s, t) for s, t in zip(a, b)) and torch.equal(ga, gb)
        assert all(torch.allclose(s, t, rtol=1e-5, atol=1e-6) for s, t in zip(a, c))
        assert torch.allclose(ga, gc, rtol=1e-5, atol=1e-6)
    assert any(name.startswith("seesaw") for name in emulated_gpu)
