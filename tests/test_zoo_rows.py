"""Numerics of the row-wise zoo losses against the float64 references in reference_zoo.py, on
every CPU backend: QualityFocalLoss (tuple and dense targets, activated), DistributionFocalLoss,
KnowledgeDistillationKLDivLoss, DiceLoss (both forms, its argument order), CrossEntropyLoss
use_mask=True and softmax ignore_index / avg_non_ignore / class_weight, the V3Det custom losses
(and the head hooks they expose) and GaussianFocalLoss's pos_inds path.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import lossgraph
from conftest import BACKENDS, assert_close, compiled
from reference_zoo import check_zoo

N, C = 24, 6


def rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def logits(g, shape, extreme=True):
    """N(0, 3^2) logits; `extreme` puts +-50 and -30 in a few rows."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if extreme:
        x[0], x[1] = 50.0, -50.0
        x[2, ::2] = -30.0
    return x


def row_weight(g, n=N):
    w = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(n, generator=g) < 0.2, torch.zeros_like(w), w)


def cases(loss, cfg, g, pred, target, n=N, **extra):
    """The shared matrix: 'none' with a weight, 'mean' with avg_factor as a tensor and a number,
    'sum', and float32 inputs."""
    def f32(x):
        if isinstance(x, tuple):
            return tuple(f32(y) for y in x)
        return x.float() if x.dtype.is_floating_point else x
    w = row_weight(g, n)
    check_zoo(loss, cfg, pred, target, weight=w, reduction_override="none", **extra)
    check_zoo(loss, cfg, pred, target, weight=w, avg_factor=torch.tensor(5.5), **extra)
    check_zoo(loss, cfg, pred, target, reduction_override="sum", **extra)
    check_zoo(loss, cfg, f32(pred), f32(target), weight=w.float(), avg_factor=9.0, **extra)


# -- QualityFocalLoss ------------------------------------------------------------------------------

QFL = [dict(type="QualityFocalLoss"), dict(type="QualityFocalLoss", beta=1.5, loss_weight=2.0),
       dict(type="QualityFocalLoss", activated=True)]


def qfl_target(g, form):
    """Labels in [-1, C + 1] (negative and >= C are all-negative rows), scores with 0 and 1."""
    labels = torch.randint(-1, C + 2, (N,), generator=g)
    labels[:4] = torch.tensor([0, C - 1, C, -1])
    scores = torch.rand(N, generator=g, dtype=torch.float64)
    scores[4], scores[5] = 0.0, 1.0
    if form == "tuple":
        return labels, scores
    return dense_target(labels, scores)


def dense_target(labels, scores):
    hit = labels.reshape(-1, 1) == torch.arange(C)
    return torch.where(hit, scores.reshape(-1, 1), torch.zeros(()).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["tuple", "dense"])
@pytest.mark.parametrize("cfg", QFL, ids=str)
def test_quality_focal(cfg, form, backend):
    loss = compiled(cfg, backend)
    g = rng("qfl", str(cfg), form)
    if cfg.get("activated"):
        pred = torch.rand(N, C, generator=g, dtype=torch.float64) * 0.98 + 0.01
        pred[0, 0], pred[1, 1] = 0.0, 1.0       # exact probabilities where BCE stays finite
    else:
        pred = logits(g, (N, C))
    target = qfl_target(g, form)
    if cfg.get("activated"):
        t = dense_target(*target) if form == "tuple" else target
        pred[0, 0], pred[1, 1] = t[0, 0], t[1, 1]
    cases(loss, cfg, g, pred, target)


def test_quality_focal_tuple_equals_dense():
    """The tuple form is the dense form with the score at the label column (spec check D1)."""
    g = rng("qfl-eq")
    loss = lossgraph.compile(dict(type="QualityFocalLoss", reduction="none"), backend="torchscript")
    x, (labels, scores) = logits(g, (N, C)), qfl_target(g, "tuple")
    assert_close(loss(x, (labels, scores)), loss(x, dense_target(labels, scores)),
                 torch.float64, "tuple vs dense")
    with pytest.raises(lossgraph.InputError, match="tuple of two"):
        loss(x, (labels,))
    with pytest.raises(lossgraph.InputError, match="scores"):
        loss(x, (labels, scores[:3]))
    with pytest.raises(lossgraph.ConfigError, match="Only sigmoid"):
        lossgraph.compile(dict(type="QualityFocalLoss", use_sigmoid=False))


# -- DistributionFocalLoss, KD, Dice ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(type="DistributionFocalLoss"),
                                 dict(type="DistributionFocalLoss", loss_weight=0.25)], ids=str)
def test_distribution_focal(cfg, backend):
    loss = compiled(cfg, backend)
    g = rng("dfl", str(cfg))
    n = 16                                           # reg_max: n + 1 bins
    y = torch.rand(N, generator=g, dtype=torch.float64) * (n - 0.01)
    y[:4] = torch.tensor([0.0, n - 0.01, 3.0, 7.5])  # both ends, integers, halves
    cases(loss, cfg, g, logits(g, (N, n + 1)), y.float().double())
    with pytest.raises(lossgraph.InputError, match="targets must lie"):
        loss(logits(g, (2, n + 1), extreme=False), torch.tensor([0.5, float(n)]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(type="KnowledgeDistillationKLDivLoss"),
                                 dict(type="KnowledgeDistillationKLDivLoss", T=1,
                                      loss_weight=0.25)],
                         ids=str)
def test_knowledge_distillation(cfg, backend):
    loss = compiled(cfg, backend)
    g = rng("kd", str(cfg))
    soft = logits(g, (N, 17)) * 4                    # teacher probabilities that underflow to 0
    cases(loss, cfg, g, logits(g, (N, 17)), soft)
    teacher = soft.clone().requires_grad_(True)
    loss(logits(g, (N, 17)).requires_grad_(True), teacher).backward()
    assert teacher.grad is None                      # soft_label is detached, as in MMDetection


DICE = [dict(type="DiceLoss"), dict(type="DiceLoss", naive_dice=True, eps=1.0, loss_weight=5.0),
        dict(type="DiceLoss", activate=False, eps=5e-6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", DICE, ids=str)
def test_dice(cfg, backend):
    loss = compiled(cfg, backend)
    g = rng("dice", str(cfg))
    n = 5
    target = (torch.rand(n, 6, 7, generator=g) > 0.6).double()
    target[0] = 0.0                                  # an empty mask
    if cfg.get("activate", True):
        pred = logits(g, (n, 6, 7))
    else:
        pred = torch.rand(n, 6, 7, generator=g, dtype=torch.float64)
    cases(loss, cfg, g, pred, target, n=n)
    # DiceLoss.forward(pred, target, weight, reduction_override, avg_factor): positional order
    w = row_weight(g, n)
    assert_close(loss(pred, target, w, "sum"),
                 loss(pred, target, weight=w, reduction_override="sum"), torch.float64,
                 "positional")
    with pytest.raises(lossgraph.InputError, match="one value per instance"):
        loss(pred, target, weight=torch.rand(n, 1))


# -- CrossEntropyLoss: use_mask, softmax details, CrossEntropyCustomLoss -------------------------

MASK = [dict(type="CrossEntropyLoss", use_mask=True),
        dict(type="CrossEntropyLoss", use_mask=True, loss_weight=2.0,
             class_weight=[0.5 + i / 4 for i in range(7)]),
        dict(type="CrossEntropyCustomLoss", use_mask=True, num_classes=4, class_weight=[3.0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", MASK, ids=str)
def test_mask_cross_entropy(cfg, backend):
    """The 3rd positional argument is each RoI's label; mean BCE of that channel, shape (1,)."""
    loss = compiled(cfg, backend)
    g = rng("mask", str(cfg))
    pred = logits(g, (5, 4, 6, 7))
    target = torch.rand(5, 6, 7, generator=g, dtype=torch.float64).round()
    labels = torch.tensor([0, 3, 3, 1, 2])
    out = check_zoo(loss, cfg, pred, target, labels)
    assert out.shape == (1,)
    check_zoo(loss, cfg, pred.float(), target.float(), labels)
    for bad in (dict(reduction_override="sum"), dict(avg_factor=2.0), dict(ignore_index=1)):
        with pytest.raises(lossgraph.InputError):
            loss(pred, target, labels, **bad)


SOFTMAX = [
    (dict(type="CrossEntropyLoss", ignore_index=255, avg_non_ignore=True), 255),
    (dict(type="CrossEntropyLoss", ignore_index=2, avg_non_ignore=True,
          class_weight=[0.5 + i for i in range(C + 1)]), 2),
    (dict(type="CrossEntropyLoss", class_weight=[1.0] * C + [0.1], loss_weight=2.0), -100),
    (dict(type="CrossEntropyCustomLoss", num_classes=C, ignore_index=-1,
          class_weight=[0.3 + i for i in range(C + 1)]), -1),
]


@pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg,ignored", SOFTMAX, ids=lambda x: str(x))
def test_softmax_ignore_and_class_weight(cfg, ignored, backend):
    """Ignored rows (in or out of the class range) are 0 and not counted with avg_non_ignore;
    class_weight multiplies by cw[y] and a plain 'mean' still divides by N; the per-call
    ignore_index."""
    loss = compiled(cfg, backend)
    g = rng("softmax", str(cfg))
    labels = torch.randint(0, C + 1, (N,), generator=g)
    labels[::5] = ignored
    cases(loss, cfg, g, logits(g, (N, C + 1)), labels)
    per_call = torch.where(labels == ignored, 4, labels)      # only 4 is ignored in this call
    check_zoo(loss, cfg, logits(g, (N, C + 1)), per_call, ignore_index=4)


def test_class_weight_length_is_checked():
    """A class_weight that cannot broadcast is an error, never an out-of-range read."""
    loss = lossgraph.compile(dict(type="CrossEntropyLoss", use_sigmoid=True,
                                  class_weight=[1.0, 2.0]))
    with pytest.raises(lossgraph.InputError, match="class_weight has 2 values"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_losses(backend):
    """CrossEntropyCustomLoss (softmax and sigmoid) and FocalCustomLoss: the losses, and the
    get_cls_channels / get_activation / get_accuracy hooks V3Det heads call."""
    g = rng("custom", backend)
    for cfg in (dict(type="CrossEntropyCustomLoss", num_classes=C),
                dict(type="CrossEntropyCustomLoss", num_classes=C, use_sigmoid=True),
                dict(type="FocalCustomLoss", num_classes=C, activated=True, gamma=1.5)):
        loss = compiled(cfg, backend)
        sigmoid = cfg.get("use_sigmoid", cfg["type"] == "FocalCustomLoss")
        channels = C if sigmoid else C + 1
        assert loss.get_cls_channels(C) == channels
        assert loss.custom_cls_channels and loss.custom_activation and loss.custom_accuracy
        x = logits(g, (N, channels), extreme=False)
        labels = torch.randint(0, C + 1, (N,), generator=g)
        check_zoo(loss, cfg, x, labels, weight=row_weight(g))
        if sigmoid:
            s = torch.sigmoid(x)
            expect = s if cfg["type"] == "FocalCustomLoss" else \
                torch.cat([s, (1 - s.sum(1, keepdim=True)).clamp(0, 1)], 1)
        else:
            expect = torch.softmax(x, -1)
        assert_close(loss.get_activation(x), expect, torch.float64, "activation")
        fg = labels < C
        acc = (x[fg, :C].argmax(1) == labels[fg]).double().mean() * 100
        assert_close(loss.get_accuracy(x, labels)["acc_classes"], acc.reshape(1), torch.float32,
                     "accuracy")   # a float32 count, as in MMDetection
        with pytest.raises(ValueError, match="num_classes"):
            loss.get_cls_channels(C + 1)
    with pytest.raises(lossgraph.ConfigError, match="num_classes must be set"):
        lossgraph.compile(dict(type="FocalCustomLoss"))


# -- GaussianFocalLoss pos_inds ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(type="GaussianFocalLoss"),
                                 dict(type="GaussianFocalLoss", pos_weight=0.25, neg_weight=0.75,
                                      alpha=3.0, gamma=2.0, loss_weight=2.0)], ids=str)
def test_gaussian_focal_pos_inds(cfg, backend):
    """Positives at pred[pos_inds, pos_labels]; the two parts are reduced separately (same
    reduction and avg_factor) and combined; the weight is ignored."""
    loss = compiled(cfg, backend)
    g = rng("gauss", str(cfg))
    pred = torch.rand(N, C, generator=g, dtype=torch.float64) * 0.98 + 0.01
    target = torch.rand(N, C, generator=g, dtype=torch.float64) ** 2
    inds = torch.randperm(N, generator=g)[:7]
    labels = torch.randint(0, C, (7,), generator=g)
    target[inds, labels] = 1.0
    check_zoo(loss, cfg, pred, target, inds, labels, weight=torch.rand(N, C))
    check_zoo(loss, cfg, pred, target, inds, labels, avg_factor=torch.tensor(3.0))
    check_zoo(loss, cfg, pred.float(), target.float(), inds, labels, avg_factor=3.0)
    check_zoo(loss, cfg, pred, target, inds, labels, reduction_override="sum")
    with pytest.raises(lossgraph.InputError, match="pos_labels"):
        loss(pred, target, inds)
