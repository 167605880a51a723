"""Numerics of every built-in loss against the float64 references in reference_losses.py.

Values and gradients w.r.t. pred, plus the shape and dtype MMDetection would return, for every
config key, every reduction and reduction_override, every accepted weight form, avg_factor absent /
a number / a 0-d tensor, on random and extreme inputs, in float64 (1e-10) and float32 (2e-5).
Each test groups many calls on one shared compiled loss, so each specialization is scripted once.
"""
from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import lossgraph
from conftest import assert_close, check_case, compiled
from reference_losses import EPS32, reference

N, C = 6, 5
DTYPES = [torch.float64, torch.float32]
OVERRIDES = [None, "none", "mean", "sum"]


def rng(*key) -> torch.Generator:
    """A generator seeded from the test's own key, so every case is reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# avg_factor: absent or a Python number (0 included), or a 0-d tensor of either float dtype
NUMBERS = [None, 3.5, 0.0]
TENSORS = [torch.tensor(2.5), torch.tensor(4.0, dtype=torch.float64), torch.tensor(0.0)]


def effective(cfg: dict, override) -> str:
    return override or cfg.get("reduction", "mean")


def run(loss, cfg, pred, target, desc="", **kw):
    """check_case with the case's description in the failure message; where MMDetection raises
    ValueError ('sum' with avg_factor, unless an early exit comes first) lossgraph must too."""
    call = {k: v for k, v in kw.items() if k not in ("grad_out", "nograd")}
    try:
        reference(cfg, pred.detach(), target, **call)
    except ValueError as e:
        assert str(e) == 'avg_factor can not be used with reduction="sum"'
        assert effective(cfg, kw.get("reduction_override")) == "sum"
        with pytest.raises(ValueError, match=re.escape(str(e))):
            loss(pred, target, **call)
        return None
    try:
        return check_case(loss, cfg, pred, target, **kw)
    except AssertionError as e:
        shown = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) and v.dim() else v
                 for k, v in kw.items()}
        raise AssertionError(f"{cfg} {desc} pred={pred.dtype} {shown}: {e}") from None


# -- input makers ----------------------------------------------------------------------------------

def logits(g, shape, extreme):
    """N(0, 3^2) logits; `extreme` replaces most of them by +-50, +-20, +-17 or 0."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if extreme:
        vals = torch.tensor([50.0, -50.0, 20.0, -20.0, 17.0, -17.0, 0.0], dtype=torch.float64)
        pick = vals[torch.randint(0, len(vals), shape, generator=g)]
        x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.7, pick, x)
    return x


def probs(g, shape):
    return torch.rand(shape, generator=g, dtype=torch.float64) * 0.98 + 0.01


def sprinkle_zeros(g, w):
    """Weights with a few exact zeros, as label_weights have."""
    return torch.where(torch.rand(w.shape, generator=g) < 0.25, torch.zeros_like(w), w)


def fg_bg_labels(g, n=N, c=C):
    """Labels in [0, C], C being background; both ends always present."""
    y = torch.randint(0, c + 1, (n,), generator=g)
    y[0], y[1] = c, 0
    return y


def one_hot(y, c=C):
    return (y.reshape(-1, 1) == torch.arange(c)).double()


@dataclass
class Family:
    """How to feed one loss type: its target forms, inputs per form, and accepted weight forms."""

    type: str
    forms: tuple
    data: Callable          # (g, cfg, form, extreme) -> (pred float64, target)
    weights: Callable       # (g, cfg, form, pred) -> {name: weight}
    configs: list = field(default_factory=list)   # config variants (every key, non-default)


def focal_data(g, cfg, form, extreme):
    y = fg_bg_labels(g)
    t = y if form == "labels" else one_hot(y)
    if cfg.get("activated"):
        p = probs(g, (N, C))
        if extreme:
            # exact probabilities where they are valid: p == t (0 on negatives, 1 on positives)
            p = torch.where(torch.rand((N, C), generator=g) < 0.4, one_hot(y), p)
        return p, t
    return logits(g, (N, C), extreme), t


def focal_weights(g, cfg, form, pred):
    w = lambda *s: sprinkle_zeros(g, torch.rand(s, generator=g, dtype=torch.float64))  # noqa: E731
    return {"(N,)": w(N), "(N*C,)": w(N * C), "(N,C)": w(N, C), "(N,1)": w(N, 1)}


def ce_ignore(cfg):
    ii = cfg.get("ignore_index")
    return -100 if ii is None else ii


def ce_data(g, cfg, form, extreme):
    x = logits(g, (N, C), extreme)
    ii = ce_ignore(cfg)
    if not cfg.get("use_sigmoid"):
        y = torch.randint(0, C, (N,), generator=g)
        y[0], y[1], y[2] = 0, C - 1, ii          # the last real class, and an ignored row
        return x, y
    if form == "labels":
        # -1 (invalid), C (background), C + 1 (also an all-zero row), and an ignored label
        y = torch.randint(-1, C + 2, (N,), generator=g)
        y[0], y[1], y[2], y[3] = -1, C, ii, 0
        return x, y
    # dense soft targets, exactly representable in float32 (MMDetection does label.float())
    t = torch.randint(0, 9, (N, C), generator=g).double() / 8
    t[0, 0] = -1.0                               # invalid: label < 0
    return x, t


def ce_weights(g, cfg, form, pred):
    w = lambda *s: sprinkle_zeros(g, torch.rand(s, generator=g, dtype=torch.float64))  # noqa: E731
    if not cfg.get("use_sigmoid") or form == "labels":
        return {"(N,)": w(N)}
    return {"(N,C)": w(N, C), "(N,1)": w(N, 1), "(C,)": w(C)}


def regression_data(g, cfg, form, extreme):
    p = torch.randn((N, 4), generator=g, dtype=torch.float64) * 2
    t = torch.randn((N, 4), generator=g, dtype=torch.float64) * 2
    if extreme:
        beta = cfg.get("beta", 1.0)
        p[0] = torch.tensor([0.25, -1.5, 3.0, 1e3])
        t[0] = torch.tensor([0.25, -1.5, 3.0 - beta, -1e3])   # d = 0, 0, beta exactly, 2e3
        p[1] = torch.tensor([0.5, 0.75, -2.0, 0.0])
        t[1] = p[1] + beta                                       # d == beta (exact in binary)
    return p, t


def regression_weights(g, cfg, form, pred):
    w = lambda *s: sprinkle_zeros(g, torch.rand(s, generator=g, dtype=torch.float64))  # noqa: E731
    return {"(N,4)": w(N, 4), "(N,1)": w(N, 1), "(4,)": w(4)}


HEATMAP = (2, 3, 4, 4)


def gaussian_data(g, cfg, form, extreme):
    t = torch.rand(HEATMAP, generator=g, dtype=torch.float64) ** 2
    t = torch.where(torch.rand(HEATMAP, generator=g) < 0.15, torch.ones_like(t), t)  # centers
    t[0, 0, 0, 0], t[0, 0, 0, 1] = 1.0, 0.0
    p = probs(g, HEATMAP)
    if extreme:
        # exact 0 and 1 where valid: p == 1 at centers, p == 0 elsewhere (finite gradients)
        pick = torch.rand(HEATMAP, generator=g) < 0.4
        p = torch.where(pick, (t == 1).double(), p)
    return p, t


def gaussian_weights(g, cfg, form, pred):
    w = lambda *s: sprinkle_zeros(g, torch.rand(s, generator=g, dtype=torch.float64))  # noqa: E731
    b, c, h, wd = HEATMAP
    return {"same": w(*HEATMAP), "(B,1,H,W)": w(b, 1, h, wd), "(C,1,1)": w(c, 1, 1), "(W,)": w(wd)}


def varifocal_data(g, cfg, form, extreme):
    x = logits(g, (N, C), extreme)
    q = torch.rand((N, C), generator=g, dtype=torch.float64)
    q = torch.where(torch.rand((N, C), generator=g) < 0.6, torch.zeros_like(q), q)
    q[0, 0], q[0, 1] = 1.0, 0.0
    return x, q


def varifocal_weights(g, cfg, form, pred):
    w = lambda *s: sprinkle_zeros(g, torch.rand(s, generator=g, dtype=torch.float64))  # noqa: E731
    return {"(N,C)": w(N, C), "(N,1)": w(N, 1), "(C,)": w(C)}


FAMILIES = {
    "FocalLoss": Family("FocalLoss", ("labels", "onehot"), focal_data, focal_weights, [
        dict(use_sigmoid=True, gamma=0.0, alpha=1.0), dict(gamma=3.0, alpha=0.0),
        dict(gamma=1.5, alpha=0.5, loss_weight=2.0), dict(activated=True),
        dict(activated=True, gamma=1.5, alpha=0.75, reduction="sum"),
        dict(gamma=1.0, reduction="none", loss_weight=0.5)]),
    "CrossEntropyLoss": Family("CrossEntropyLoss", ("labels", "dense"), ce_data, ce_weights, [
        dict(use_sigmoid=False, use_mask=False, class_weight=[1.0, 2.0, 0.5, 3.0, 0.25],
             ignore_index=2),
        dict(ignore_index=-1, avg_non_ignore=True, loss_weight=2.0),
        dict(ignore_index=3, avg_non_ignore=True, reduction="sum"), dict(reduction="none"),
        dict(use_sigmoid=True, class_weight=[1.0, 2.0, 0.5, 3.0, 0.25], ignore_index=1),
        dict(use_sigmoid=True, avg_non_ignore=True, loss_weight=0.5),
        dict(use_sigmoid=True, ignore_index=2, avg_non_ignore=True, reduction="sum"),
        dict(use_sigmoid=True, reduction="none")]),
    "L1Loss": Family("L1Loss", ("dense",), regression_data, regression_weights, [
        dict(reduction="sum", loss_weight=5.0), dict(reduction="none")]),
    "SmoothL1Loss": Family("SmoothL1Loss", ("dense",), regression_data, regression_weights, [
        dict(beta=1.0 / 9), dict(beta=2.0, reduction="sum"),
        dict(beta=0.5, reduction="none", loss_weight=0.5)]),
    "MSELoss": Family("MSELoss", ("dense",), regression_data, regression_weights, [
        dict(reduction="sum", loss_weight=2.0), dict(reduction="none")]),
    "BalancedL1Loss": Family("BalancedL1Loss", ("dense",), regression_data, regression_weights, [
        dict(alpha=0.3), dict(gamma=2.0, reduction="sum"),
        dict(alpha=0.25, gamma=1.0, beta=2.0, reduction="none", loss_weight=3.0)]),
    "GaussianFocalLoss": Family("GaussianFocalLoss", ("dense",), gaussian_data, gaussian_weights, [
        dict(alpha=3.0, gamma=2.0), dict(alpha=1.5, gamma=3.0, reduction="none"),
        dict(pos_weight=0.25, neg_weight=0.75, reduction="sum", loss_weight=0.5)]),
    "VarifocalLoss": Family("VarifocalLoss", ("dense",), varifocal_data, varifocal_weights, [
        dict(use_sigmoid=True, alpha=0.5, gamma=1.5), dict(alpha=0.0, gamma=3.0, reduction="sum"),
        dict(alpha=0.9, gamma=2.5, iou_weighted=False, reduction="none", loss_weight=2.0)]),
}


def forms_of(fam: Family, cfg: dict):
    if fam.type == "CrossEntropyLoss" and not cfg.get("use_sigmoid"):
        return ("labels",)
    return fam.forms


def cast(x, dtype):
    return x.to(dtype) if x.dtype.is_floating_point else x


# -- the pipeline matrix: every reduction x weight form x avg_factor, per loss ---------------------

# (config, whether every weight form is run in float64): the full matrix on one loss per weight rule
# and loss level (focal rule; rows rule on a per-row loss; rows + raw rules; raw with the v3 quirks;
# raw on a 4-D heatmap), a single weight form on the losses that share those rules. float32 runs
# fewer specializations (no weight and one form; 'mean' and 'none'), to keep the suite fast.
MATRIX = {
    "FocalLoss": (dict(loss_weight=0.7), True),
    "CrossEntropyLoss": (dict(loss_weight=0.7), True),
    "CrossEntropyLoss/sigmoid": (dict(use_sigmoid=True, loss_weight=0.7), True),
    "L1Loss": (dict(loss_weight=0.7), True),
    "GaussianFocalLoss": (dict(loss_weight=0.7), True),
    "SmoothL1Loss": (dict(beta=0.5, loss_weight=0.7), False),
    "MSELoss": (dict(loss_weight=0.7), False),
    "BalancedL1Loss": (dict(loss_weight=0.7), False),
    "VarifocalLoss": (dict(loss_weight=0.7), False),
}


def matrix_cfg(case: str) -> dict:
    """The matrix's config of a loss: other tests reuse it, and so its compiled specializations."""
    return dict(type=case.split("/")[0], **MATRIX[case][0])


def matrix_calls(weights, dtype):
    """(reduction_override, (name, weight), avg_factor) triples of the pipeline matrix."""
    overrides = OVERRIDES if dtype is torch.float64 else [None, "none"]
    calls = list(itertools.product(overrides, weights, NUMBERS))
    calls += itertools.product(OVERRIDES, weights[:1], TENSORS)          # a tensor denominator
    calls += itertools.product(["none", "sum"], weights[1:], TENSORS[:1])  # ignored / an error
    if dtype is not torch.float64:
        calls += itertools.product(["sum"], weights, [3.5])                # the error
    return calls


MATRIX_CASES = [(case, dtype) for case, (_, full) in MATRIX.items() for dtype in DTYPES
                if full or dtype is torch.float64]


@pytest.mark.parametrize("case, dtype", MATRIX_CASES, ids=lambda x: str(x))
def test_pipeline_matrix(case, dtype, backend):
    """reduction_override x weight form x avg_factor form (0 included), on random inputs
    (float32 only for the losses with the full matrix: the others share their code paths)."""
    fam = FAMILIES[case.split("/")[0]]
    extra, full = MATRIX[case]
    cfg = dict(type=fam.type, **extra)
    loss = compiled(cfg, backend)
    g = rng("matrix", case, str(dtype))
    for form in forms_of(fam, cfg):
        pred, target = fam.data(g, cfg, form, False)
        pred, target = pred.to(dtype), cast(target, dtype)
        forms = list(fam.weights(g, cfg, form, pred).items())
        weights = [("no weight", None)] + (forms if full and dtype is torch.float64 else forms[:1])
        for override, (wname, w), avg in matrix_calls(weights, dtype):
            run(loss, cfg, pred, target, f"{form} {wname}", weight=w, avg_factor=avg,
                reduction_override=override)


# -- every config key, on random and extreme inputs ------------------------------------------------

CONFIG_CASES = [(name, cfg) for name, fam in FAMILIES.items() for cfg in fam.configs]


def _cfg_id(case):
    name, cfg = case
    return name + "(" + ",".join(f"{k}={v}" for k, v in cfg.items()) + ")"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONFIG_CASES, ids=_cfg_id)
def test_config(case, dtype, backend):
    """Each config variant on random and extreme inputs: 'none' (the elementwise math and its
    gradient) with a weight, and in float64 also the config's own reduction with avg_factor.
    A second target form (one-hot / dense) runs in float64 'none' only."""
    name, extra = case
    fam = FAMILIES[name]
    cfg = dict(type=name, **extra)
    loss = compiled(cfg, backend)
    g = rng("config", _cfg_id(case), str(dtype))
    own_avg = None if cfg.get("reduction") == "sum" else 2.0
    forms = forms_of(fam, cfg)
    for form, extreme in itertools.product(forms, (False, True)):
        if form != forms[0] and dtype is not torch.float64:
            continue
        pred, target = fam.data(g, cfg, form, extreme)
        pred, target = pred.to(dtype), cast(target, dtype)
        wname, w = list(fam.weights(g, cfg, form, pred).items())[-1]
        calls = [("none", w, None)]
        if dtype is torch.float64 and form == forms[0]:
            calls.append((None, w, own_avg))
        for override, weight, avg in calls:
            run(loss, cfg, pred, target, f"{form} extreme={extreme} {wname}", weight=weight,
                avg_factor=avg, reduction_override=override)


def test_every_config_key_is_exercised():
    """Each hyperparameter of each loss tested here is set (non-default) by some config case."""
    for name in FAMILIES:
        loss = lossgraph.REGISTRY[name]
        keys = set(loss.params) | {"reduction", "loss_weight"}
        cfgs = [cfg for n, cfg in CONFIG_CASES if n == name]
        used = {k for cfg in cfgs for k in cfg}
        assert keys <= used, f"{name}: no test sets {sorted(keys - used)}"
        changed = {k for cfg in cfgs for k, v in cfg.items()
                   if k not in loss.params or v != loss.params[k].default}
        fixed = {"use_sigmoid", "use_mask"} if name != "CrossEntropyLoss" else {"use_mask"}
        assert keys - fixed <= changed, f"{name}: no test changes {sorted(keys - fixed - changed)}"
    assert {"FocalLoss", "CrossEntropyLoss", "L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss",
            "GaussianFocalLoss", "VarifocalLoss"} <= set(FAMILIES)


# -- extreme values that saturate -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_focal_activated_saturated_probabilities(dtype, backend):
    """activated=True with p = 0 on a positive / p = 1 on a negative: log clamped at -100 and
    torch's (p - t) / max(p (1 - p), 1e-12) gradient, next to ordinary elements."""
    cfg = dict(type="FocalLoss", activated=True)   # also a CONFIG_CASES config
    loss = compiled(cfg, backend)
    y = torch.tensor([0, 1, 2, 5, 3])
    p = torch.rand((5, C), generator=rng("sat", str(dtype)), dtype=torch.float64) * 0.9 + 0.05
    sat = torch.zeros((5, C), dtype=torch.bool)
    p[0, 0], p[1, 2], p[2, 2], p[3, 4], p[4, 3] = 0.0, 1.0, 0.0, 1.0, 1e-13
    sat[0, 0] = sat[1, 2] = sat[3, 4] = sat[4, 3] = True
    p = p.to(dtype)
    x = p.clone().requires_grad_(True)
    out = loss(x, y, reduction_override="none")
    gout = torch.rand(out.shape, generator=rng("sat-g"), dtype=torch.float64)
    out.backward(gout.to(dtype))
    x64 = p.double().requires_grad_(True)
    ref = reference(cfg, x64, y, reduction_override="none")
    ref.backward(gout)
    for mask in (sat, ~sat):
        assert_close(out[mask], ref[mask], dtype, "value")
        assert_close(x.grad[mask], x64.grad[mask], dtype, "grad")
    assert out[0, 0].item() == pytest.approx(100 * 0.25 * 1.0)   # -log clamped at -100, alpha, pt=1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_focal_saturated_probabilities(dtype, backend):
    """p = 0 at a center and p = 1 off-center: -log(1e-12) terms and 1e12 gradients."""
    cfg = matrix_cfg("GaussianFocalLoss")
    loss = compiled(cfg, backend)
    t = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.25, 1.0, 0.9, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.0, 1.0, 0.3, 1.0], [0.5, 0.7, 1.0, 0.0]], dtype=torch.float64)
    sat = torch.tensor([[True, True, False, False], [False, False, True, False]])
    x = p.to(dtype).clone().requires_grad_(True)
    out = loss(x, t.to(dtype), reduction_override="none")
    out.backward(torch.ones_like(out))
    x64 = p.clone().requires_grad_(True)
    ref = reference(cfg, x64, t, reduction_override="none")
    ref.backward(torch.ones_like(ref))
    for mask in (sat, ~sat):
        assert_close(out[mask], ref[mask], dtype, "value")
        assert_close(x.grad[mask], x64.grad[mask], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_stay_finite(dtype, backend):
    """Logits of +-1e4 (far past float32's sigmoid saturation) give finite values and gradients."""
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 60.0]], dtype=dtype)
    y = torch.tensor([0, 0])
    for case, target in [("FocalLoss", y), ("CrossEntropyLoss", y), ("CrossEntropyLoss/sigmoid", y),
                         ("VarifocalLoss", torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.3]]))]:
        cfg = matrix_cfg(case)
        out = run(compiled(cfg, backend), cfg, x, cast(target, dtype), reduction_override="none")
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_focal_pos_inds(dtype, backend):
    """The CenterNet-update path: positives at pred[pos_inds, pos_labels], both terms reduced
    separately with the same avg_factor; weight is ignored (index and mask pos_inds)."""
    cfg = dict(type="GaussianFocalLoss", pos_weight=0.25, neg_weight=0.75, loss_weight=0.5)
    loss = compiled(cfg, backend)
    g = rng("pos_inds", str(dtype))
    pred = probs(g, (N, C)).to(dtype)
    target = torch.rand((N, C), generator=g, dtype=torch.float64).to(dtype)
    pos_inds, pos_labels = torch.tensor([0, 2, 5]), torch.tensor([1, 0, 4])
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[0, 2, 5]] = True
    for inds in (pos_inds, mask):
        for override, avg, w in [(None, None, None), ("sum", None, None), (None, 3.0, None),
                                 ("mean", torch.tensor(2.0), torch.rand(N, C, generator=g))]:
            run(loss, cfg, pred, target, f"pos_inds {inds.dtype}", pos_inds=inds,
                pos_labels=pos_labels, weight=w, avg_factor=avg, reduction_override=override)


# -- pipeline quirks --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss"])
def test_all_zero_weight_early_exit(name, dtype, backend):
    """v3: no weight > 0 returns (pred * weight).sum() before anything else: a scalar even for
    'none', loss_weight skipped, an invalid reduction_override not even looked at."""
    cfg = matrix_cfg(name)             # loss_weight 0.7: skipped by the exit
    loss = compiled(cfg, backend)
    g = rng("zero", name, str(dtype))
    pred, target = regression_data(g, cfg, "dense", False)
    pred, target = pred.to(dtype), target.to(dtype)
    for w in [torch.zeros(N, 4), torch.zeros(N), torch.zeros(N, 1), -torch.rand(N, 4, generator=g),
              -torch.rand(N, generator=g).double()]:
        for override in (None, "none", "sum"):
            out = run(loss, cfg, pred, target, weight=w, reduction_override=override)
            assert out.dim() == 0
        assert loss(pred, target, weight=w, reduction_override="bogus").dim() == 0
        out = run(loss, cfg, pred, target, weight=w, avg_factor=3.0, reduction_override="sum")
        if w.dim() == 1:   # (N,) is unsqueezed to (N, 1): (pred * w[:, None]).sum()
            assert out.item() == pytest.approx((pred.double() * w[:, None].double()).sum().item())
    # a single positive weight means the ordinary path
    w = torch.zeros(N, 4)
    w[2, 1] = 1.0
    out = run(loss, cfg, pred, target, weight=w, reduction_override="none")
    assert out.shape == pred.shape


@pytest.mark.parametrize("name", ["MSELoss", "BalancedL1Loss", "GaussianFocalLoss", "VarifocalLoss",
                                  "FocalLoss"])
def test_all_zero_weight_no_early_exit(name, backend):
    """Only L1Loss and SmoothL1Loss have the v3 early exit; the others keep the loss shape."""
    fam = FAMILIES[name]
    cfg = matrix_cfg(name)
    loss = compiled(cfg, backend)
    pred, target = fam.data(rng("nozero", name), cfg, fam.forms[0], False)
    w = torch.zeros_like(pred)
    out = run(loss, cfg, pred, target, weight=w, reduction_override="none")
    assert out.shape == pred.shape and not out.any()
    run(loss, cfg, pred, target, weight=w)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_empty_inputs(name, backend):
    """No rows: L1/SmoothL1/BalancedL1 give pred.sum() * 0; the others an empty loss (mean: NaN)."""
    fam = FAMILIES[name]
    cfgs = [matrix_cfg(name)]
    if name == "CrossEntropyLoss":
        cfgs += [matrix_cfg("CrossEntropyLoss/sigmoid"),
                 dict(type=name, ignore_index=3, avg_non_ignore=True, reduction="sum")]
    for cfg in cfgs:
        loss = compiled(cfg, backend)
        for form in forms_of(fam, cfg):
            pred, target = fam.data(rng("empty", name), cfg, form, False)
            pred, target = pred[:0], target[:0]
            for override, avg in [(None, None), ("none", None), ("sum", None), ("mean", 2.0),
                                  ("none", 2.0), ("sum", 2.0)]:
                run(loss, cfg, pred, target, f"{form}", avg_factor=avg, reduction_override=override)


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "BalancedL1Loss"])
def test_empty_target_with_weight(name, backend):
    """An empty weight: L1/SmoothL1 take the zero-weight exit; BalancedL1 broadcasts 0 * (0, 4)."""
    cfg = matrix_cfg(name)
    loss = compiled(cfg, backend)
    pred, target = torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)
    for override in (None, "none", "sum"):
        run(loss, cfg, pred, target, weight=torch.zeros(0, 4, dtype=torch.float64),
            reduction_override=override)


def test_avg_factor_zero_explodes(backend):
    """mean with avg_factor 0 divides by eps32 (mmdet-losses.md A1: sum 6 -> 5.03e7)."""
    cfg = matrix_cfg("L1Loss")
    loss = compiled(cfg, backend)
    pred = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    out = loss(pred, torch.zeros_like(pred), avg_factor=0) / 0.7
    assert out.item() == pytest.approx(6 / EPS32, rel=1e-12)
    assert out.item() == pytest.approx(5.03e7, rel=1e-3)


def test_none_ignores_avg_factor(backend):
    """'none' returns the weighted elementwise loss; avg_factor is silently ignored (A2)."""
    cfg = matrix_cfg("MSELoss")
    loss = compiled(cfg, backend)
    pred = torch.randn(4, 4, generator=rng("a2"), dtype=torch.float64)
    target = torch.zeros_like(pred)
    for avg in (None, 0.0, 7.0, torch.tensor(2.0)):
        out = loss(pred, target, avg_factor=avg, reduction_override="none")
        torch.testing.assert_close(out, pred * pred * 0.7, rtol=1e-15, atol=0)


def test_avg_factor_of_shape_one_keeps_its_shape(backend):
    """loss.sum() / (avg_factor + eps) with a (1,) avg_factor is a (1,) tensor in MMDetection."""
    cfg = matrix_cfg("L1Loss")
    pred, target = regression_data(rng("avg1"), cfg, "dense", False)
    run(compiled(cfg, backend), cfg, pred, target, avg_factor=torch.tensor([2.0], dtype=pred.dtype))
    # a float32 (1,) avg_factor makes MMDetection's result float32 (a sized tensor wins the
    # promotion over the 0-d sum); lossgraph keeps the float64 gradient (documented in inputs.py)
    out = compiled(cfg, backend)(pred.requires_grad_(), target, avg_factor=torch.tensor([2.0]))
    assert out.shape == (1,) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_grad_output_not_one(dtype, backend):
    """backward with a grad_output other than 1 (e.g. a loss scaled by 0.5 afterwards)."""
    for name in ["FocalLoss", "CrossEntropyLoss", "SmoothL1Loss", "VarifocalLoss"]:
        fam = FAMILIES[name]
        cfg = matrix_cfg(name)
        pred, target = fam.data(rng("g", name), cfg, fam.forms[0], False)
        for override in ("mean",) if dtype is torch.float32 else ("mean", "sum"):
            run(compiled(cfg, backend), cfg, pred.to(dtype), cast(target, dtype),
                reduction_override=override, grad_out=torch.tensor(0.37))


@pytest.mark.parametrize("name", ["FocalLoss", "CrossEntropyLoss", "SmoothL1Loss",
                                  "GaussianFocalLoss"])
def test_pred_without_requires_grad(name, backend):
    """A pred that needs no gradient (e.g. under evaluation) gives the same value, no graph."""
    fam = FAMILIES[name]
    cfg = matrix_cfg(name)
    loss = compiled(cfg, backend)
    for dtype, override in [(torch.float64, "none"), (torch.float32, "mean")]:
        pred, target = fam.data(rng("nograd", name), cfg, fam.forms[0], False)
        pred, target = pred.to(dtype), cast(target, dtype)
        check_case(loss, cfg, pred, target, reduction_override=override, nograd=True)
        with torch.no_grad():
            out = loss(pred.clone().requires_grad_(True), target)
        assert out.grad_fn is None
        assert_close(out, reference(cfg, pred.double(), cast(target, torch.float64)), dtype)


def test_grad_accumulates_over_calls(backend):
    """Two backward passes into the same leaf add up, as with eager losses."""
    cfg = matrix_cfg("FocalLoss")
    loss = compiled(cfg, backend)
    pred, y = focal_data(rng("acc"), cfg, "labels", False)
    x = pred.clone().requires_grad_(True)
    loss(x, y).backward()
    loss(x, y, reduction_override="sum").backward()
    x64 = pred.clone().requires_grad_(True)
    (reference(cfg, x64, y) + reference(cfg, x64, y, reduction_override="sum")).backward()
    assert_close(x.grad, x64.grad, torch.float64, "accumulated grad")


# -- CrossEntropyLoss specifics ----------------------------------------------------------------------

@pytest.mark.parametrize("use_sigmoid", [False, True])
def test_ce_per_call_ignore_index(use_sigmoid, backend):
    """forward(..., ignore_index=k) overrides the config's ignore_index for that call only."""
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=use_sigmoid, avg_non_ignore=True)
    loss = compiled(cfg, backend)
    g = rng("ii", use_sigmoid)
    x = logits(g, (N, C), False)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    for ii, override in [(2, None), (4, "none"), (None, None)]:
        check_case(loss, cfg, x, y, reduction_override=override, ignore_index=ii)
    check_case(loss, cfg, x.float(), y, ignore_index=4)
    # the config's own ignore_index is untouched afterwards
    check_case(loss, cfg, x, y)


def test_ce_ignore_index_warning():
    """ignore_index with avg_non_ignore=False and 'mean' warns at construction, as mmdet does."""
    with pytest.warns(UserWarning, match=r"Default ``avg_non_ignore`` is False"):
        lossgraph.compile(dict(type="CrossEntropyLoss", ignore_index=3), backend="torchscript")


def test_ce_avg_non_ignore_numbers(backend):
    """mmdet-losses.md C1: 5 rows, 1 ignored: sum/5 by default, sum/4 = F.cross_entropy."""
    x = torch.randn(5, 4, generator=rng("c1"), dtype=torch.float64)
    y = torch.tensor([0, 3, -100, 2, 1])
    plain = compiled(matrix_cfg("CrossEntropyLoss"), backend)(x, y) / 0.7
    avg = compiled(dict(type="CrossEntropyLoss", ignore_index=-1, avg_non_ignore=True,
                        loss_weight=2.0), backend)(x, y, ignore_index=-100) / 2
    total = torch.nn.functional.cross_entropy(x, y, reduction="sum")
    assert plain.item() == pytest.approx(total.item() / 5, rel=1e-14)
    assert avg.item() == pytest.approx(total.item() / (4 + EPS32), rel=1e-14)
    assert avg.item() == pytest.approx(torch.nn.functional.cross_entropy(x, y).item(), rel=1e-7)


def test_ce_rpn_single_class(backend):
    """RPN: num_classes=1, an (N, 1) logit compared with label == 0 (mmdet-losses.md C2)."""
    cfg = matrix_cfg("CrossEntropyLoss/sigmoid")
    x = torch.randn(8, 1, generator=rng("rpn"), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    out = run(compiled(cfg, backend), cfg, x, y)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(x[:, 0], (y == 0).double())
    assert out.dtype == torch.float32      # mmdet's label.float() makes sigmoid CE float32
    assert out.item() == pytest.approx((0.7 * manual).float().item(), rel=1e-13)


def test_ce_sigmoid_soft_target_valid_mask(backend):
    """A dense target uses (t >= 0) & (t != ignore_index) as the weight (1.0 targets ignored
    when ignore_index=1), and avg_non_ignore counts the valid elements."""
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True, ignore_index=1, avg_non_ignore=True)
    loss = compiled(cfg, backend)
    x = torch.randn(3, 2, generator=rng("soft"), dtype=torch.float64)
    t = torch.tensor([[1.0, 0.5], [-0.5, 0.0], [0.25, 1.0]], dtype=torch.float64)
    out = run(loss, cfg, x, t, reduction_override="none")
    assert (out[t == 1] == 0).all() and (out[t < 0] == 0).all()
    mean = run(loss, cfg, x, t)
    valid = ((t >= 0) & (t != 1)).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    # the result is float32 (mmdet's label.float()); the sum and division run in float64
    expected = ((bce * valid).sum() / (3 + EPS32)).float()
    assert mean.item() == pytest.approx(expected.item(), rel=1e-13)


# -- signatures, dtypes, devices ----------------------------------------------------------------------

def test_positional_arguments_follow_mmdet(backend):
    """Positional calls use MMDetection 3.3.0's order for each forward signature."""
    x = torch.randn(N, C, generator=rng("pos"), dtype=torch.float64)
    y = fg_bg_labels(rng("pos-y"))
    w = torch.rand(N, generator=rng("pos-w"), dtype=torch.float64)
    cfg = matrix_cfg("FocalLoss")
    assert torch.equal(compiled(cfg, backend)(x, y, w, 2.0, "none"),
                       compiled(cfg, backend)(x, y, weight=w, avg_factor=2.0, reduction_override="none"))
    cfg = matrix_cfg("CrossEntropyLoss")
    yc = torch.tensor([0, 1, 2, 3, 4, 4])
    loss = compiled(cfg, backend)
    assert torch.equal(loss(x, yc, w, None, "sum", 4),
                       loss(cls_score=x, label=yc, weight=w, reduction_override="sum", ignore_index=4))
    cfg = matrix_cfg("GaussianFocalLoss")
    p, t = gaussian_data(rng("pos-g"), cfg, "dense", False)
    wg = torch.rand(HEATMAP, generator=rng("pos-gw"), dtype=torch.float64)
    loss = compiled(cfg, backend)
    assert torch.equal(loss(p, t, None, None, wg, 3.0, "mean"),
                       loss(p, t, weight=wg, avg_factor=3.0))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'label_weight'"):
        loss(p, t, label_weight=wg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, backend):
    """fp16/bf16 preds: output and gradient in pred's dtype, close to the float64 reference."""
    tol = 1e-2 if dtype is torch.float16 else 3e-2
    for name in ["FocalLoss", "SmoothL1Loss", "VarifocalLoss", "GaussianFocalLoss"]:
        fam = FAMILIES[name]
        cfg = matrix_cfg(name)
        loss = compiled(cfg, backend)
        pred, target = fam.data(rng("half", name), cfg, fam.forms[0], False)
        pred, target = pred.to(dtype), cast(target, dtype)
        for override in ("mean", "none") if name == "FocalLoss" else ("none",):
            x = pred.clone().requires_grad_(True)
            out = loss(x, target, reduction_override=override)
            assert out.dtype == dtype and out.shape == reference(cfg, pred, target,
                                                                 reduction_override=override).shape
            g = torch.ones_like(out)
            out.backward(g)
            x64 = pred.double().requires_grad_(True)
            ref = reference(cfg, x64, cast(target, torch.float64), reduction_override=override)
            ref.backward(g.double())
            assert x.grad.dtype == dtype
            for a, e in ((out, ref), (x.grad, x64.grad)):
                err = (a.double() - e.detach()).abs().max() / e.detach().abs().max()
                assert err < tol, f"{name} {override}: {err}"


def test_weight_and_avg_dtypes_promote_like_torch(backend):
    """A float64 weight or avg_factor tensor promotes a float32 loss to float64, as in mmdet;
    a 0-d float64 weight does not (a 0-d tensor never promotes within its category)."""
    cfg = matrix_cfg("L1Loss")
    loss = compiled(cfg, backend)
    g = rng("promote")
    pred = torch.randn(N, 4, generator=g)
    target = torch.randn(N, 4, generator=g)
    for kw in [dict(weight=torch.rand(N, 4, dtype=torch.float64)),
               dict(weight=torch.rand(1, dtype=torch.float64)),
               dict(weight=torch.tensor(0.5, dtype=torch.float64)),
               dict(weight=torch.tensor(0.5, dtype=torch.float64), reduction_override="none"),
               dict(weight=torch.ones(N, 4, dtype=torch.int64)),
               dict(avg_factor=torch.tensor(3.0, dtype=torch.float64)),
               dict(avg_factor=torch.tensor(3)),
               dict(avg_factor=torch.tensor(3.0, dtype=torch.float64), reduction_override="none")]:
        check_case(loss, cfg, pred, target, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_matches_reference(name):
    """On a GPU, every backend that runs there matches the float64 reference."""
    from conftest import GPU_BACKENDS
    fam = FAMILIES[name]
    cfg = dict(type=name, loss_weight=0.5)
    for backend in GPU_BACKENDS:
        loss = compiled(cfg, backend)
        for dtype in DTYPES:
            pred, target = fam.data(rng("cuda", name), cfg, fam.forms[0], True)
            pred, target = pred.to(dtype).cuda(), cast(target, dtype).cuda()
            w = list(fam.weights(rng("cuda-w", name), cfg, fam.forms[0], pred).values())[0]
            for override in ("none", "mean", "sum"):
                x = pred.clone().requires_grad_(True)
                out = loss(x, target, weight=w.cuda(), reduction_override=override)
                assert out.device.type == "cuda"
                out.backward(torch.ones_like(out))
                x64 = pred.double().cpu().requires_grad_(True)
                ref = reference(cfg, x64, cast(target, torch.float64).cpu(), weight=w,
                                reduction_override=override)
                ref.backward(torch.ones_like(ref))
                assert_close(out.cpu(), ref, dtype, f"{backend} value")
                assert_close(x.grad.cpu(), x64.grad, dtype, f"{backend} grad")


# -- the references themselves, against torch's own losses -----------------------------------------

def test_reference_matches_torch_builtins():
    """The hand-written references agree with torch's loss functions where those exist."""
    F = torch.nn.functional
    g = rng("ref")
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    y = torch.tensor([0, 1, 4, 2, -100, 3])
    cw = [1.0, 2.0, 3.0, 0.5, 0.25]
    pairs = [
        (reference(dict(type="CrossEntropyLoss"), x, y, reduction_override="none"),
         F.cross_entropy(x, y, reduction="none")),
        (reference(dict(type="CrossEntropyLoss", class_weight=cw), x, y, reduction_override="none"),
         F.cross_entropy(x, y, weight=torch.tensor(cw, dtype=torch.float64), reduction="none")),
    ]
    t = torch.rand(6, 5, generator=g, dtype=torch.float64)
    pairs.append((reference(dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=cw), x, t,
                            reduction_override="none"),
                  # mmdet's sigmoid CE result is float32 (label.float()); the math stays float64
                  F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor(cw, dtype=torch.float64),
                                                     reduction="none").float()))
    d, u = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                            dtype=torch.float64)
    d.requires_grad_(True)
    pairs += [(reference(dict(type="SmoothL1Loss", beta=0.5), d, u, reduction_override="none"),
               F.smooth_l1_loss(d, u, beta=0.5, reduction="none")),
              (reference(dict(type="L1Loss"), d, u), F.l1_loss(d, u)),
              (reference(dict(type="MSELoss"), d, u), F.mse_loss(d, u))]
    p = torch.rand(6, 5, generator=g, dtype=torch.float64)
    p[0, 0], p[0, 1], p[1, 0], p[1, 1] = 0.0, 1.0, 1e-14, 1 - 1e-14
    p.requires_grad_(True)
    from reference_losses import bce_prob
    pairs.append((bce_prob(p, t), F.binary_cross_entropy(p, t, reduction="none")))
    for a, e in pairs:
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    for a, e, leaf in [(pairs[0][0], pairs[0][1], x), (pairs[2][0], pairs[2][1], x),
                       (pairs[3][0], pairs[3][1], d), (pairs[-1][0], pairs[-1][1], p)]:
        ga, = torch.autograd.grad(a.sum(), leaf, retain_graph=True)
        ge, = torch.autograd.grad(e.sum(), leaf, retain_graph=True)
        torch.testing.assert_close(ga, ge, rtol=1e-13, atol=1e-13)


def test_reference_focal_matches_paper_formula():
    """-alpha t (1-p)^gamma log p - (1-alpha)(1-t) p^gamma log(1-p) (Lin et al.), section 2.2."""
    g = rng("paper")
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = fg_bg_labels(g)
    t, p = one_hot(y), torch.sigmoid(x)
    for gamma, alpha in [(2.0, 0.25), (1.5, 0.6), (0.0, 0.5)]:
        paper = -alpha * t * (1 - p) ** gamma * torch.log(p) - \
            (1 - alpha) * (1 - t) * p ** gamma * torch.log(1 - p)
        ours = reference(dict(type="FocalLoss", gamma=gamma, alpha=alpha), x, y,
                         reduction_override="none")
        torch.testing.assert_close(ours, paper, rtol=1e-12, atol=1e-14)


def test_reference_balanced_l1_continuity():
    """BalancedL1 is continuous at d = beta (mmdet-losses.md: 1.0771 / 1.0786 / 1.0801)."""
    cfg = dict(type="BalancedL1Loss")
    vals = [reference(cfg, torch.tensor([[d]], dtype=torch.float64), torch.zeros(1, 1,
                      dtype=torch.float64), reduction_override="none").item()
            for d in (0.999, 1.0, 1.001)]
    assert [round(v, 4) for v in vals] == [1.0771, 1.0786, 1.0801]
