"""Numerics of the IoU family (IoU, BoundedIoU, GIoU, DIoU, CIoU, EIoU, SIoU) against the float64
references in reference_zoo.py, on every CPU backend: values and gradients w.r.t. pred, every
reduction, (N,) and (N,4) weights, avg_factor as a number and as a tensor, random boxes plus
identical, disjoint, touching, zero-area and inverted ones; and the quirks MMDetection has.
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch

import lossgraph
from conftest import BACKENDS, compiled
from reference_zoo import check_zoo, zoo_reference

N = 40
CONFIGS = [
    dict(type="IoULoss"), dict(type="IoULoss", mode="square", eps=1e-16, loss_weight=5.0),
    dict(type="IoULoss", mode="linear", eps=1e-3),
    dict(type="BoundedIoULoss"), dict(type="BoundedIoULoss", beta=0.5, eps=1e-2, loss_weight=2.0),
    dict(type="GIoULoss"), dict(type="GIoULoss", eps=1e-3, loss_weight=2.0),
    dict(type="DIoULoss"), dict(type="CIoULoss", loss_weight=12.0),
    dict(type="EIoULoss"), dict(type="EIoULoss", smooth_point=0.3, eps=1e-4),
    dict(type="SIoULoss"), dict(type="SIoULoss", neg_gamma=True),
]


def rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def boxes(g, n=N):
    """Random target boxes, predictions around them (some close: IoU > 0.5), and the special rows:
    identical, disjoint, touching corners, zero-area, both empty, inverted, contained; all
    coordinates float32-exact (the special ones on a 1/64 grid, so float32 math is exact there)."""
    xy = torch.rand(n, 2, generator=g) * 20
    t = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 8 + 0.5], 1)
    spread = torch.where(torch.arange(n) % 2 == 0, 0.3, 3.0)[:, None]
    noise = torch.randn(n, 4, generator=g) * spread
    p = t + noise
    p[:, 2:] = torch.maximum(p[:, 2:], p[:, :2] + 0.05)
    special = [
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]),           # identical
        ([0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 5.0]),           # disjoint
        ([1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0]),           # touching corners
        ([1.0, 1.0, 1.0, 3.0], [0.5, 1.0, 2.0, 2.0]),           # zero-width pred
        ([2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]),           # both empty
        ([3.0, 3.0, 1.0, 1.0], [1.0, 1.0, 3.0, 3.0]),           # inverted pred
        ([1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 3.0, 3.0]),           # target inside pred
        ([0.5, 0.25, 1.5, 1.25], [0.5, 0.5, 1.5, 1.5]),         # same x extent
        ([0.0, 0.0, 0.015625, 0.03125], [0.0078125, 0.0, 0.015625, 0.015625]),  # tiny
    ]
    for i, (a, b) in enumerate(special[:n]):
        p[i], t[i] = torch.tensor(a), torch.tensor(b)
    return p.float().double(), t.float().double()


def weights(g, cfg, shape):
    w = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=g) < 0.2, torch.zeros_like(w), w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_values_and_gradients(cfg, backend):
    """Every reduction, (N,) / (N,4) weights, avg_factor float / tensor, float64 and float32."""
    loss = compiled(cfg, backend)
    g = rng(str(cfg))
    p, t = boxes(g)
    row_w = weights(g, cfg, (N, 4) if cfg["type"] == "BoundedIoULoss" else (N,))
    check_zoo(loss, cfg, p, t, weight=row_w, reduction_override="none")
    check_zoo(loss, cfg, p, t, weight=weights(g, cfg, (N, 4)), avg_factor=torch.tensor(7.5))
    check_zoo(loss, cfg, p, t, reduction_override="sum")
    check_zoo(loss, cfg, p.float(), t.float(), avg_factor=11.0)
    check_zoo(loss, cfg, p.float(), t.float(), weight=row_w.float(), reduction_override="none")
    with pytest.raises(ValueError, match="avg_factor can not be used"):
        loss(p, t, avg_factor=2.0, reduction_override="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_early_exit(backend):
    """v3: an all-zero weight returns (pred * weight).sum() (a scalar even for 'none', no
    loss_weight, before the reduction_override check); IoULoss only when the reduction != 'none'."""
    p, t = boxes(rng("zero"))
    for name in ("BoundedIoULoss", "GIoULoss", "DIoULoss", "CIoULoss", "EIoULoss", "SIoULoss"):
        loss = compiled(dict(type=name, loss_weight=3.0, reduction="none"), backend)
        for w in (torch.zeros(N), torch.zeros(N, 4), -torch.rand(N)):
            x = p.clone().requires_grad_(True)
            out = loss(x, t, weight=w, reduction_override="bogus")
            w2 = w[:, None] if w.dim() == 1 else w
            assert out.shape == () and torch.equal(out, (p * w2).sum())
            out.backward()
            assert torch.equal(x.grad, w2.expand_as(x).to(x.dtype))
    loss = compiled(dict(type="IoULoss", loss_weight=3.0), backend)
    assert loss(p, t, weight=torch.zeros(N)).shape == ()
    cfg = dict(type="IoULoss", loss_weight=3.0)
    out = check_zoo(loss, cfg, p, t, weight=torch.zeros(N), reduction_override="none")
    assert out.shape == (N,) and torch.equal(out, torch.zeros(N, dtype=out.dtype))
    with pytest.raises(lossgraph.InputError, match="reduction_override"):
        loss(p, t, weight=torch.zeros(N), reduction_override="bogus")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ciou_gate_and_nan_quirk(backend):
    """alpha is gated by IoU > 0.5, so CIoU == DIoU at IoU <= 0.5; in float32 two identical large
    boxes make alpha 0/0 = NaN, a NaN loss exactly where MMDetection's is NaN."""
    ciou, diou = compiled(dict(type="CIoULoss", reduction="none"), backend), \
        compiled(dict(type="DIoULoss", reduction="none"), backend)
    p = torch.tensor([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 4.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, 0.0, 7.0, 3.0], [0.5, 0.0, 4.0, 2.0]], dtype=torch.float64)
    c, d = ciou(p, t), diou(p, t)
    assert c[0] == d[0] and c[1] > d[1]           # IoU 1/7 gated off, IoU 7/8 gated on
    big = torch.tensor([[10.0, 10.0, 110.0, 60.0], [0.0, 0.0, 1.0, 1.0]])
    out = ciou(big, big.clone())
    ref = zoo_reference(dict(type="CIoULoss", reduction="none"), big, big.clone())
    assert torch.isnan(ref[0]) and not torch.isnan(ref[1])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_values(backend):
    """The values the spec measured: SIoU's neg_gamma quirk and EIoU on a disjoint pair."""
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    far = torch.tensor([[20.0, 20.0, 30.0, 30.0]], dtype=torch.float64)
    near = torch.tensor([[5.0, 5.0, 15.0, 15.0]], dtype=torch.float64)
    siou = compiled(dict(type="SIoULoss"), backend)
    siou_paper = compiled(dict(type="SIoULoss", neg_gamma=True), backend)
    assert round(siou(box, far).item(), 3) == 0.440
    assert round(siou_paper(box, far).item(), 3) == 1.359
    assert round(siou(box, near).item(), 3) == 0.740       # overlapping scores above disjoint
    eiou = compiled(dict(type="EIoULoss", reduction="none"), backend)
    assert round(eiou(box, far).item(), 2) == 1.70


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_and_errors(backend):
    """Boxes must have 4 columns; leading dims are rows; empty inputs give MMDetection's values."""
    giou = compiled(dict(type="GIoULoss"), backend)
    with pytest.raises(lossgraph.InputError, match=r"x1, y1, x2, y2"):
        giou(torch.rand(3, 5), torch.rand(3, 5))
    with pytest.raises(lossgraph.InputError, match="does not match"):
        giou(torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(lossgraph.InputError, match="weight"):
        giou(torch.rand(3, 4), torch.rand(3, 4), weight=torch.rand(3, 2) + 0.1)
    bounded = compiled(dict(type="BoundedIoULoss", reduction="none"), backend)
    assert bounded(*boxes(rng("shape"), 5)).shape == (5, 4)
    for red, expect in (("sum", 0.0), ("none", None)):
        e = giou(torch.zeros(0, 4), torch.zeros(0, 4), reduction_override=red)
        assert e.shape == ((0,) if expect is None else ())
    assert torch.isnan(giou(torch.zeros(0, 4), torch.zeros(0, 4)))


def test_iou_linear_is_deprecated():
    """linear=True means mode='linear' and warns, as MMDetection's constructor does."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loss = lossgraph.compile(dict(type="IoULoss", linear=True, mode="square"),
                                 backend="torchscript")
    assert any("linear=True" in str(x.message) for x in w)
    p, t = boxes(rng("linear"), 6)
    check_zoo(loss, dict(type="IoULoss", linear=True, mode="square"), p, t)
    with pytest.raises(lossgraph.ConfigError, match="mode"):
        lossgraph.compile(dict(type="IoULoss", mode="cubic"))
