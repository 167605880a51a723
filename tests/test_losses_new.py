"""The six losses added for MMDetection 3.3.0 parity (L2Loss, MarginL2Loss,
MultiPosCrossEntropyLoss, TripletLoss, AssociativeEmbeddingLoss, EQLV2Loss) against the float64
references in reference_new.py: values, gradients, state across calls, and their errors."""
from __future__ import annotations

import pytest
import torch

import lossgraph as lg
from lossgraph.errors import ConfigError, InputError

from conftest import assert_close, check_case
from reference_new import EQLv2, ae_loss, reference, triplet_loss

DTYPES = (torch.float32, torch.float64)


def _sim(n=6, m=7, seed=0, dtype=torch.float64):
    """A similarity matrix in (0.3, 1) (distinct values, no clamp ties) and a sparse 0/1 target."""
    g = torch.Generator().manual_seed(seed)
    pred = (0.3 + 0.7 * torch.rand(n, m, generator=g)).to(dtype)
    target = (torch.rand(n, m, generator=g) < 0.2).to(dtype)
    target[0, 0] = 1
    return pred, target


# -- L2Loss / MarginL2Loss ------------------------------------------------------------------------

L2_CASES = [
    dict(type="L2Loss"),
    dict(type="L2Loss", neg_pos_ub=2, pos_margin=0.1, neg_margin=0.2, hard_mining=True,
         loss_weight=0.5),
    dict(type="L2Loss", pos_margin=0.0, neg_margin=0.1, reduction="none"),
    dict(type="MarginL2Loss", neg_pos_ub=3, pos_margin=0.0, neg_margin=0.1, hard_mining=True),
    dict(type="MarginL2Loss", pos_margin=0.2, reduction="none"),
]


@pytest.mark.parametrize("cfg", L2_CASES, ids=lambda c: f"{c['type']}-{len(c)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_l2_losses_match_reference(backend, cfg, dtype):
    loss = lg.compile(cfg, backend=backend)
    pred, target = _sim(dtype=dtype)
    weight = torch.ones_like(target)
    weight[1, :3] = 0           # invalid: target becomes -1 there
    weight[2, 0] = -0.5         # negative: invalid, yet it still multiplies its loss
    check_case(loss, cfg, pred, target, reference_fn=reference)
    check_case(loss, cfg, pred, target, weight, reference_fn=reference)
    # avg_factor is replaced by count(weight > 0), whatever the caller passes
    check_case(loss, cfg, pred, target, avg_factor=1000.0, reference_fn=reference)


def test_l2_sum_always_raises_and_random_mining_keeps_the_bound():
    loss = lg.compile(dict(type="L2Loss", neg_pos_ub=1), backend="torchscript")
    pred, target = _sim(n=8, m=8)
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        loss(pred, target, reduction_override="sum")
    out = loss(pred, target, reduction_override="none")
    pos, neg = int((target == 1).sum()), target == 0
    assert int((out[neg] > 0).sum()) == pos          # #pos * neg_pos_ub negatives keep weight
    assert torch.equal(out[target == 1] > 0, torch.ones(pos, dtype=torch.bool))


def test_l2_errors():
    loss = lg.compile(dict(type="L2Loss", neg_pos_ub=2), backend="torchscript")
    pred, target = _sim()
    with pytest.raises(InputError, match="L2Loss: weight must be None or a tensor of pred's shape"):
        loss(pred, target, torch.ones(6))
    with pytest.raises(InputError, match="L2Loss: target must be a tensor of pred's shape"):
        loss(pred, target[0])
    with pytest.raises(InputError, match="neg_pos_ub > 0 samples negatives of a 2-D"):
        loss(pred.reshape(-1), target.reshape(-1))
    with pytest.raises(ConfigError, match="'neg_pos_ub' must be an integer"):
        lg.compile(dict(type="L2Loss", neg_pos_ub=2.5))


# -- MultiPosCrossEntropyLoss ---------------------------------------------------------------------

def _multipos(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 5, generator=g) * 4).to(dtype)
    y = torch.randint(0, 2, (7, 5), generator=g)
    y[0] = 0                     # no positive: loss 0
    y[1] = 1                     # no negative: loss 0
    y[2, 0], y[3, 1], y[4, 2] = -1, 2, -1   # neither (takes part with value 0), label 2 positive
    x[5, 0] = 60.0               # extreme logits
    x[6, 1] = -60.0
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multipos_ce_matches_reference(backend, reduction, dtype):
    cfg = dict(type="MultiPosCrossEntropyLoss", reduction=reduction, loss_weight=0.25)
    loss = lg.compile(cfg, backend=backend)
    x, y = _multipos(dtype)
    out = check_case(loss, cfg, x, y, reference_fn=reference)
    check_case(loss, cfg, x, y.double(), torch.rand(7), reference_fn=reference)
    if reduction == "mean":
        check_case(loss, cfg, x, y, avg_factor=torch.tensor(3.0), reference_fn=reference)
    if reduction == "none":
        assert out[0].item() == 0 and out[1].item() == 0


def test_multipos_ce_shape_check_and_kwargs():
    loss = lg.compile(dict(type="MultiPosCrossEntropyLoss"), backend="torchscript")
    x, y = _multipos(torch.float64)
    with pytest.raises(InputError, match=r"label of shape \(7,\) must have cls_score's shape"):
        loss(x, y[:, 0])
    assert torch.equal(loss(x, y, anything=1), loss(x, y))   # **kwargs are ignored, as in mmdet


# -- TripletLoss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triplet_matches_reference(backend, dtype):
    cfg = dict(type="TripletLoss", margin=0.3, loss_weight=2.0)
    loss = lg.compile(cfg, backend=backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g).to(dtype)
    x[7] = x[6]                                  # a duplicate: tied distances share the gradient
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    p = x.clone().requires_grad_(True)
    out = loss(p, labels)
    out.backward()
    p64 = x.double().requires_grad_(True)
    ref = triplet_loss(cfg, p64, labels)
    ref.backward()
    assert out.dtype == dtype and out.shape == ()
    assert_close(out, ref, dtype, "triplet value")
    assert_close(p.grad, p64.grad, dtype, "triplet grad")


def test_triplet_errors():
    loss = lg.compile(dict(type="TripletLoss"), backend="torchscript")
    with pytest.raises(InputError, match="every anchor needs a negative"):
        loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match=r"targets must be a tensor of 3 identity labels"):
        loss(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="hard_mining=False"):
        lg.compile(dict(type="TripletLoss", hard_mining=False))(torch.randn(3, 4),
                                                                torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="TripletLoss has no 'reduction'"):
        lg.compile(dict(type="TripletLoss", reduction="sum"))


# -- AssociativeEmbeddingLoss ---------------------------------------------------------------------

MATCH = [[[[0, 1], [3, 4]], [[1, 1], [2, 2]], [[0, 0], [4, 4]]],   # three objects
         [],                                                        # none
         [[[2, 2], [4, 3]]]]                                        # one: push is 0


@pytest.mark.parametrize("channels", [1, 2])
def test_associative_embedding_matches_reference(backend, channels):
    cfg = dict(type="AssociativeEmbeddingLoss", pull_weight=0.5, push_weight=0.75)
    loss = lg.compile(cfg, backend=backend)
    g = torch.Generator().manual_seed(3)
    tl0, br0 = (torch.randn(3, channels, 5, 5, generator=g, dtype=torch.float64) * 0.6
                for _ in range(2))
    tl, br = tl0.clone().requires_grad_(True), br0.clone().requires_grad_(True)
    pull, push = loss(tl, br, MATCH)
    (pull + 2 * push).backward()
    rtl, rbr = tl0.clone().requires_grad_(True), br0.clone().requires_grad_(True)
    rpull, rpush = ae_loss(cfg, rtl, rbr, MATCH)
    (rpull + 2 * rpush).backward()
    for a, e, what in ((pull, rpull, "pull"), (push, rpush, "push"), (tl.grad, rtl.grad, "d tl"),
                       (br.grad, rbr.grad, "d br")):
        assert_close(a, e, torch.float64, what)
    assert push.item() > 0


def test_associative_embedding_errors():
    loss = lg.compile(dict(type="AssociativeEmbeddingLoss"), backend="torchscript")
    tl = torch.randn(1, 1, 4, 4)
    with pytest.raises(InputError, match="match must hold one list of objects per image"):
        loss(tl, tl, [])
    with pytest.raises(InputError, match="inside the 4x4 embedding map"):
        loss(tl, tl, [[[[0, 0], [4, 4]]]])
    with pytest.raises(ConfigError, match="has no 'reduction' or 'loss_weight'"):
        lg.compile(dict(type="AssociativeEmbeddingLoss", loss_weight=2.0))


# -- EQLV2Loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eqlv2_values_gradients_and_state_across_calls(backend, dtype):
    cfg = dict(type="EQLV2Loss", num_classes=4, loss_weight=1.5, gamma=12, mu=0.8, alpha=4.0)
    loss = lg.compile(cfg, backend=backend)
    ref = EQLv2(cfg)
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        x = (torch.randn(9, 5, generator=g) * 2).to(dtype)
        labels = torch.randint(0, 5, (9,), generator=g)
        p = x.clone().requires_grad_(True)
        out = loss(p, labels, torch.rand(9), avg_factor=7.0, reduction_override="sum")  # ignored
        out.backward()
        p64 = x.double().requires_grad_(True)
        r = ref(p64, labels)
        r.backward()
        assert out.shape == () and out.dtype == dtype
        assert_close(out, r, dtype, f"step {step} value")
        assert_close(p.grad, p64.grad, dtype, f"step {step} grad")
        for name, want in (("pos_grad", ref.pos_grad), ("neg_grad", ref.neg_grad),
                           ("pos_neg", ref.ratio)):
            got = getattr(loss, name)
            assert got.dtype == torch.float32
            assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), name
    assert set(loss.state_dict()) == {"pos_grad", "neg_grad", "pos_neg"}


def test_eqlv2_heads_hooks_and_errors():
    loss = lg.compile(dict(type="EQLV2Loss", num_classes=3), backend="torchscript")
    assert loss.get_channel_num(3) == 4 and loss.use_sigmoid is True
    x = torch.randn(2, 4)
    act = loss.get_activation(x)
    s = torch.sigmoid(x)
    assert torch.allclose(act[:, :-1], s[:, :-1] * (1 - s[:, -1:])) and torch.equal(act[:, -1], s[:, -1])
    with pytest.raises(InputError, match=r"cls_score must have shape \(N, num_classes \+ 1\)"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\]"):
        loss(x, torch.tensor([0, 4]))
