"""Result and gradient dtypes follow MMDetection's eager promotion (inputs.py's Note [Result
dtype]); each expected dtype is what the eager expression of MMDetection's code returns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, assert_close, compiled

EPS32 = torch.finfo(torch.float32).eps
F16, F32, F64 = torch.float16, torch.float32, torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def l1_eager(pred, target):
    """mmdet l1_loss + weight_reduce_loss('mean'): torch.abs(pred - target).mean(), no cast."""
    return torch.abs(pred - target).mean()


def sigmoid_ce_eager(pred, labels):
    """mmdet binary_cross_entropy with index labels: one-hot label.float(), weight.float()."""
    c = pred.shape[-1]
    t = (labels.reshape(-1, 1) == torch.arange(c)).long()
    w = torch.ones(pred.shape).float()
    loss = F.binary_cross_entropy_with_logits(pred, t.float(), reduction="none")
    return (loss * w).mean()


def boxes(n, dtype, g):
    xy = torch.rand(n, 2, generator=g, dtype=F64) * 10
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=F64) * 5 + 1], 1).to(dtype)


def giou_eager(pred, target, eps=1e-6):
    """mmdet giou_loss: 1 - bbox_overlaps(pred, target, 'giou', is_aligned=True), mean."""
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    union = area(pred) + area(target) - overlap
    union = torch.max(union, union.new_tensor([eps]))
    elt, erb = torch.min(pred[:, :2], target[:, :2]), torch.max(pred[:, 2:], target[:, 2:])
    ewh = (erb - elt).clamp(min=0)
    enclose = ewh[:, 0] * ewh[:, 1]
    enclose = torch.max(enclose, enclose.new_tensor([eps]))
    return (1 - (overlap / union - (enclose - union) / enclose)).mean()


# (id, config, pred dtype, target dtype, make(pred dtype, target dtype) -> (pred, target), eager)
TABLE = [
    ("l1-f16-pred-f32-target", dict(type="L1Loss"), F16, F32, F32, "reg", l1_eager),
    ("l1-f32-pred-f64-target", dict(type="L1Loss"), F32, F64, F64, "reg", l1_eager),
    ("giou-f32-pred-f64-target", dict(type="GIoULoss"), F32, F64, F64, "boxes", giou_eager),
    ("sigmoid-ce-f64-pred", dict(type="CrossEntropyLoss", use_sigmoid=True), F64, None, F32,
     "labels", sigmoid_ce_eager),
    ("sigmoid-ce-f16-pred", dict(type="CrossEntropyLoss", use_sigmoid=True), F16, None, F32,
     "labels", sigmoid_ce_eager),
]


def _inputs(kind, pdt, tdt, g):
    if kind == "reg":
        return torch.randn(8, 4, generator=g).to(pdt), torch.randn(8, 4, generator=g).to(tdt)
    if kind == "boxes":
        return (boxes(8, F64, g) + 0.3 * torch.randn(8, 4, generator=g, dtype=F64)).to(pdt), \
            boxes(8, tdt, g)
    return (torch.randn(8, 5, generator=g) * 2).to(pdt), torch.randint(0, 5, (8,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,cfg,pdt,tdt,out_dt,kind,eager", TABLE, ids=[t[0] for t in TABLE])
def test_result_dtype_as_mmdetection(backend, name, cfg, pdt, tdt, out_dt, kind, eager):
    """Value in MMDetection's dtype; pred's gradient in pred's dtype, as autograd gives it."""
    pred, target = _inputs(kind, pdt, tdt, _gen())
    p = pred.clone().requires_grad_(True)
    out = compiled(cfg, backend)(p, target)
    pe = pred.clone().requires_grad_(True)
    expected = eager(pe, target)
    assert expected.dtype == out_dt, "the eager expression itself gives the table's dtype"
    assert out.dtype == out_dt
    out.backward()
    expected.backward()
    assert p.grad.dtype == pdt
    # the exact values, computed from the same (exactly widened) inputs in float64
    p64 = pred.double().requires_grad_(True)
    t64 = target.double() if target.dtype.is_floating_point else target
    exact = eager(p64, t64)
    exact.backward()
    tol = F32 if F64 not in (out_dt, pdt) or name.startswith("sigmoid") else F64
    assert_close(out, exact, tol, f"{name} value")
    if pdt == F16:   # stored in float16: within one float16 rounding of the exact gradient
        assert torch.allclose(p.grad.double(), p64.grad, rtol=2.0 ** -10, atol=0), f"{name} grad"
    else:
        grad_tol = F32 if pdt != F64 or name.startswith("sigmoid") else F64
        assert_close(p.grad, p64.grad, grad_tol, f"{name} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_avg_factor_tensor_with_dims_promotes_sigmoid_ce(backend):
    """f32 loss.sum() / (a (1,) float64 avg_factor + eps) is float64, of shape (1,)."""
    pred, labels = _inputs("labels", F64, None, _gen(1))
    avg = torch.tensor([3.0], dtype=F64)
    out = compiled(dict(type="CrossEntropyLoss", use_sigmoid=True), backend)(pred, labels,
                                                                           avg_factor=avg)
    assert out.dtype == F64 and out.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_keeps_pred_dtype_with_a_wider_target(backend):
    """py_sigmoid_focal_loss casts the target with target.type_as(pred): no promotion."""
    g = _gen(2)
    pred = torch.randn(6, 4, generator=g)
    target = torch.rand(6, 4, generator=g, dtype=F64).round()
    assert compiled(dict(type="FocalLoss"), backend)(pred, target).dtype == F32
