"""User losses written with lossgraph math: the MySmoothL1 example under every pipeline option, a
labels-target loss with row reductions, and the derivative of every lg op against torch autograd
(ties of min/max/clamp/rowmax included)."""
from __future__ import annotations

import itertools

import pytest
import torch

import lossgraph as lg
from conftest import assert_close, compiled
from reference_losses import weight_reduce_loss

DTYPES = [torch.float64, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def user_losses():
    """Register the user losses of this module; unregister them afterwards."""
    @lg.register_loss("MySmoothL1")
    def my_smooth_l1(pred, target, beta: float = 1.0):
        d = lg.abs(pred - target)
        return lg.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)

    @lg.register_loss("MyLabelSmoothCE", target="labels")
    def my_label_smooth_ce(pred, target, eps: float = 0.1):
        """Softmax CE with label smoothing: one value per row, via logsumexp, take and rowmean."""
        lse = lg.logsumexp(pred)
        return (1 - eps) * (lse - lg.take(pred, target)) + eps * (lse - lg.rowmean(pred))

    @lg.register_loss("MyOps")
    def my_ops(pred, target, k: float = 1.5, rows: bool = True):
        """Most lg ops in one expression (ties of minimum/maximum/clamp included)."""
        a = lg.minimum(pred, target) + lg.maximum(pred, 0.5) + lg.clamp(pred, -1.0, 1.0)
        b = lg.exp(-lg.abs(pred)) + lg.log1p(pred * pred) + lg.sqrt(pred * pred + 1.0)
        c = lg.sigmoid(pred) * lg.tanh(target) + lg.softplus(pred) - lg.logsigmoid(-pred)
        d = lg.atan(pred) + lg.sin(pred) * lg.cos(target) + lg.asin(lg.tanh(pred) * 0.9)
        e = lg.abs(pred) ** k + lg.floor(pred) * pred + lg.sign(target) * pred
        f = lg.stop_gradient(pred) * pred + lg.log(lg.sigmoid(pred) + 1.0) / (2.0 + pred * pred)
        g = lg.rowmax(pred) + lg.rowsum(pred * target) / lg.width(pred) + pred[1] * 2.0
        return a + b + c + d + e + f + g if rows else a + b + c + d + e + f

    yield
    for name in ("MySmoothL1", "MyLabelSmoothCE", "MyOps"):
        lg.REGISTRY.pop(name, None)


# -- eager references --------------------------------------------------------------------------------

def smooth_l1(pred, target, beta):
    d = torch.abs(pred - target)
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def label_smooth_ce(pred, labels, eps):
    lse = torch.logsumexp(pred, -1)
    picked = pred.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (1 - eps) * (lse - picked) + eps * (lse - pred.mean(-1))


def my_ops(pred, target, k=1.5, rows=True):
    half = torch.tensor(0.5, dtype=pred.dtype)     # lg.maximum is torch.maximum: ties split
    a = torch.minimum(pred, target) + torch.maximum(pred, half) + torch.clamp(pred, -1.0, 1.0)
    b = torch.exp(-torch.abs(pred)) + torch.log1p(pred * pred) + torch.sqrt(pred * pred + 1.0)
    c = torch.sigmoid(pred) * torch.tanh(target) + torch.nn.functional.softplus(pred) - \
        torch.nn.functional.logsigmoid(-pred)
    d = torch.atan(pred) + torch.sin(pred) * torch.cos(target) + torch.asin(torch.tanh(pred) * 0.9)
    e = torch.abs(pred) ** k + torch.floor(pred) * pred + torch.sign(target) * pred
    f = pred.detach() * pred + torch.log(torch.sigmoid(pred) + 1.0) / (2.0 + pred * pred)
    g = pred.amax(-1, keepdim=True) + (pred * target).sum(-1, keepdim=True) / pred.shape[-1] + \
        pred[:, 1:2] * 2.0
    return a + b + c + d + e + f + g if rows else a + b + c + d + e + f


def pipeline(elem, weight, reduction, avg_factor, loss_weight):
    return loss_weight * weight_reduce_loss(elem, weight, reduction, avg_factor)


# -- MySmoothL1 under every pipeline option ------------------------------------------------------------

CONFIGS = [dict(type="MySmoothL1"), dict(type="MySmoothL1", beta=0.5, loss_weight=2.0),
           dict(type="MySmoothL1", beta=1.0 / 9, reduction="sum"),
           dict(type="MySmoothL1", beta=2, reduction="none", loss_weight=0.25)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_my_smooth_l1(cfg, dtype, backend):
    loss = compiled(cfg, backend)
    beta = float(cfg.get("beta", 1.0))
    g = torch.Generator().manual_seed(3)
    pred = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 2)
    target = torch.randn(6, 4, generator=g, dtype=torch.float64)
    pred[0, :2] = target[0, :2]                  # d = 0
    target[1, 0] = 0.25
    pred[1, 0] = 0.25 + beta if beta in (0.5, 1.0, 2.0) else pred[1, 0]   # d == beta exactly
    pred, target = pred.to(dtype), target.to(dtype)
    weights = [None, torch.rand(6, 4, generator=g, dtype=torch.float64),
               torch.rand(6, 1, generator=g, dtype=torch.float64),
               torch.rand(4, generator=g, dtype=torch.float64)]
    if cfg is CONFIGS[1] and dtype is torch.float64:     # every combination once
        calls = itertools.product([None, "none", "mean", "sum"], weights,
                                  [None, 3.0, torch.tensor(2.5)])
    else:                                                # fewer specializations for the others
        calls = [(None, None, None), ("none", weights[1], 5.0), (None, weights[1], 3.0),
                 ("sum", None, 3.0)]
    for override, w, avg in calls:
        reduction = override or cfg.get("reduction", "mean")
        if reduction == "sum" and avg is not None:
            with pytest.raises(ValueError, match=r'avg_factor can not be used with reduction="sum"'):
                loss(pred, target, weight=w, avg_factor=avg, reduction_override=override)
            continue
        x = pred.clone().requires_grad_(True)
        out = loss(x, target, weight=w, avg_factor=avg, reduction_override=override)
        x64 = pred.detach().clone().double().requires_grad_(True)
        ref = pipeline(smooth_l1(x64, target.double(), beta), w, reduction, avg,
                       float(cfg.get("loss_weight", 1.0)))
        assert out.shape == ref.shape
        assert out.dtype == torch.promote_types(dtype, w.dtype if w is not None else dtype) or \
            (avg is not None and out.dtype == torch.promote_types(dtype, torch.float32))
        gout = torch.rand(out.shape, generator=g, dtype=torch.float64) if out.dim() else \
            torch.tensor(1.0, dtype=torch.float64)
        out.backward(gout.to(out.dtype))
        ref.backward(gout)
        assert_close(out, ref, dtype, f"value {override} {avg}")
        assert_close(x.grad, x64.grad, dtype, f"grad {override} {avg}")


def test_user_loss_config_is_checked():
    with pytest.raises(lg.ConfigError, match=r"^MySmoothL1 got unknown config key 'bta'; did you "
                                             r"mean 'beta'\? \(valid keys: beta, loss_weight, "
                                             r"reduction\)$"):
        lg.compile(dict(type="MySmoothL1", bta=1.0), backend="torchscript")
    with pytest.raises(lg.ConfigError, match=r"^MySmoothL1: config key 'beta' must be a number, "
                                             r"got str 'x'$"):
        lg.compile(dict(type="MySmoothL1", beta="x"), backend="torchscript")


def test_redefining_a_user_loss_takes_effect():
    """Re-registering a name replaces its math; its fingerprint changes so no cache is stale."""
    @lg.register_loss("_Redefined")
    def v1(pred, target):
        return pred - target

    try:
        x, t = torch.ones(2, 3), torch.zeros(2, 3)
        first = lg.compile(dict(type="_Redefined"), backend="torchscript")(x, t, reduction_override="sum")
        fp1 = lg.REGISTRY["_Redefined"].fingerprint

        @lg.register_loss("_Redefined")
        def v2(pred, target):
            return 2.0 * (pred - target)

        second = lg.compile(dict(type="_Redefined"), backend="torchscript")(x, t, reduction_override="sum")
        assert lg.REGISTRY["_Redefined"].fingerprint != fp1
        assert first.item() == 6.0 and second.item() == 12.0
    finally:
        lg.REGISTRY.pop("_Redefined", None)


# -- a labels-target loss with row reductions ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_labels_target_row_reductions(dtype, backend):
    cfg = dict(type="MyLabelSmoothCE", eps=0.2, loss_weight=1.5)
    loss = compiled(cfg, backend)
    g = torch.Generator().manual_seed(5)
    pred = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3)
    pred[0] = torch.tensor([50.0, -50.0, 0.0, 20.0, -20.0])
    pred = pred.to(dtype)
    labels = torch.tensor([0, 4, 1, 2, 3, 4, 0])
    w = torch.rand(7, generator=g, dtype=torch.float64)
    calls = [(None, None, None), ("none", w, None), ("sum", w, None), (None, w, 4.0)]
    if dtype is torch.float64:
        calls += [(None, None, torch.tensor(3.0)), ("none", None, None)]
    for override, weight, avg in calls:
        x = pred.clone().requires_grad_(True)
        out = loss(x, labels, weight=weight, avg_factor=avg, reduction_override=override)
        assert out.shape == ((7,) if (override or "mean") == "none" else ())
        x64 = pred.detach().clone().double().requires_grad_(True)
        ref = pipeline(label_smooth_ce(x64, labels, 0.2), weight, override or "mean", avg, 1.5)
        gout = torch.rand(out.shape, generator=g, dtype=torch.float64) if out.dim() else \
            torch.tensor(1.0, dtype=torch.float64)
        out.backward(gout.to(out.dtype))
        ref.backward(gout)
        assert_close(out, ref, dtype, f"value {override}")
        assert_close(x.grad, x64.grad, dtype, f"grad {override}")


def test_labels_target_rejects_a_dense_target():
    loss = lg.compile(dict(type="MyLabelSmoothCE"), backend="torchscript")
    with pytest.raises(lg.InputError, match=r"^MyLabelSmoothCE: labels must be an integer tensor, "
                                            r"got torch.float32$"):
        loss(torch.randn(3, 4), torch.rand(3, 4).argmax(-1).float())
    with pytest.raises(lg.InputError, match=r"^MyLabelSmoothCE: labels of shape \(3, 4\) do not "
                                            r"match pred of shape \(3, 4\): expected \(3,\)$"):
        loss(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.long))


# -- every op's derivative against torch autograd --------------------------------------------------------

def ops_inputs():
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(6, 4, generator=g, dtype=torch.float64) * 1.5
    target = torch.randn(6, 4, generator=g, dtype=torch.float64)
    pred[0] = torch.tensor([0.5, 1.0, -1.0, 0.3])          # ties with maximum(., 0.5) and clamp
    target[0, 3] = 0.3                                      # a tie of minimum(pred, target)
    pred[1] = torch.tensor([2.0, 2.0, -3.0, 2.0])          # a three-way tie of the row max
    pred[2, 1] = 0.0                                        # abs, sign, floor at 0
    target[2, 2] = 0.0
    return pred, target, g


def check_ops(cfg, reduction, backend):
    loss = compiled(cfg, backend)
    pred, target, g = ops_inputs()
    x = pred.clone().requires_grad_(True)
    out = loss(x, target, reduction_override=reduction)
    x64 = pred.clone().requires_grad_(True)
    elem = my_ops(x64, target, rows=cfg.get("rows", True))
    ref = {"none": elem, "sum": elem.sum(), "mean": elem.mean()}[reduction]
    gout = torch.rand(out.shape, generator=g, dtype=torch.float64) if out.dim() else \
        torch.tensor(0.75, dtype=torch.float64)
    out.backward(gout)
    ref.backward(gout)
    assert_close(out, ref, torch.float64, "value")
    assert_close(x.grad, x64.grad, torch.float64, "grad")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_every_op_matches_torch_autograd(reduction, backend):
    """Values and gradients of MyOps in float64, with ties of min/max/clamp/rowmax in the input;
    per-row values (rowmax, rowsum, a column pred[1]) added to elementwise terms."""
    check_ops(dict(type="MyOps"), reduction, backend)


def test_every_elementwise_op_with_none_reduction(backend):
    """'none' with a random grad_output, for a loss whose element (n, k) reads pred[n, k] only."""
    check_ops(dict(type="MyOps", rows=False), "none", backend)


def test_none_reduction_with_row_terms(backend):
    """Elements that also read per-row values of pred: Note [Row-coupled 'none'] in runtime.py."""
    check_ops(dict(type="MyOps"), "none", backend)
