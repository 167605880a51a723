"""The stateful losses GHMC, GHMR (momentum buffers) and SeesawLoss (class counts) against the
float64 references in reference_stateful.py, over several consecutive calls: values, gradients
and the buffers after every call, on every CPU backend, in float32 (2e-5) and float64 (1e-10).

float64 runs use a module converted with .double(), as an MMDetection module would be: its
buffers are then float64 too, like the reference's state.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import lossgraph
from conftest import BACKENDS, assert_close
from lossgraph.losses.ghm import count_values, harmonizing_weights
from reference_stateful import GHMCRef, GHMRRef, SeesawRef, bin_of, ghm_edges

DTYPES = [torch.float32, torch.float64]
N, C = 40, 6
K = 7           # Seesaw's num_classes in these tests


def rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make(cfg: dict, backend: str, dtype: torch.dtype):
    loss = lossgraph.compile(cfg, backend=backend)
    return loss.double() if dtype == torch.float64 else loss


def outputs(r) -> list[torch.Tensor]:
    return [r[k] for k in sorted(r)] if isinstance(r, dict) else [r]


def step(loss, ref, pred, *args, **kw):
    """One call of both: outputs (shape, dtype, value) and d/dpred compared; returns loss's."""
    dtype = pred.dtype
    p = pred.clone().requires_grad_(True)
    out = loss(p, *args, **kw)
    p64 = pred.double().requires_grad_(True)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kw.items()}
    stat = {} if isinstance(ref, SeesawRef) else {"stat_dtype": dtype}
    expected = ref(p64, *args64, **kw64, **stat)
    assert type(out) is type(expected)
    if isinstance(out, dict):
        assert list(out) == list(expected)
    total_a, total_e = 0, 0
    g = rng("grad_out", tuple(pred.shape))
    for a, e in zip(outputs(out), outputs(expected)):
        assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == dtype, f"dtype {a.dtype} != {dtype}"
        assert_close(a, e, dtype, "value")
        go = torch.rand(e.shape, generator=g, dtype=torch.float64) + 0.5
        total_a = total_a + (a * go.to(dtype)).sum()
        total_e = total_e + (e * go).sum()
    total_a.backward()
    total_e.backward()
    assert p.grad is not None and p.grad.dtype == dtype
    assert_close(p.grad, p64.grad, dtype, "grad")
    return out


# -- GHMC ----------------------------------------------------------------------------------------

def ghmc_inputs(g: torch.Generator, target: str, dtype):
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    x[:4] = torch.tensor([50.0, -50.0, 30.0, -20.0]).view(4, 1)   # g saturated at 0 and 1
    if target == "labels":
        t = torch.randint(-1, C + 1, (N,), generator=g)
        lw = (torch.rand(N, generator=g) > 0.2).to(torch.float64) * torch.rand(N, generator=g)
    else:
        t = (torch.rand(N, C, generator=g) > 0.8).to(torch.float64)
        lw = (torch.rand(N, C, generator=g) > 0.25).to(torch.float64)
    return x.to(dtype), t, lw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.75])
@pytest.mark.parametrize("target", ["labels", "dense"])
def test_ghmc_consecutive_calls(backend, dtype, momentum, target):
    cfg = dict(type="GHMC", bins=7 if target == "dense" else 30, momentum=momentum,
               loss_weight=2.0 if momentum else 1.0)
    loss, ref = make(cfg, backend, dtype), GHMCRef(cfg)
    g = rng("ghmc", str(dtype), momentum, target)
    for call, override in enumerate([None, "none", None, "mean", "none"]):
        pred, t, lw = ghmc_inputs(g, target, dtype)
        step(loss, ref, pred, t, lw, reduction_override=override)
        if momentum:
            assert_close(loss.acc_sum, ref.acc_sum, dtype, f"acc_sum after call {call}")
        else:
            assert not hasattr(loss, "acc_sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ghmc_none_in_config_and_extra_kwargs_ignored(backend):
    cfg = dict(type="GHMC", bins=10, momentum=0.5, reduction="none")
    loss, ref = make(cfg, backend, torch.float32), GHMCRef(cfg)
    g = rng("ghmc-none")
    for _ in range(3):
        pred, t, lw = ghmc_inputs(g, "labels", torch.float32)
        out = step(loss, ref, pred, t, lw, avg_factor=12.0)   # a head's avg_factor: ignored
        assert out.shape == (N, C)


# -- GHMR ----------------------------------------------------------------------------------------

def ghmr_inputs(g: torch.Generator, dtype):
    pred = torch.randn(N, 4, generator=g, dtype=torch.float64) * 0.05
    target = torch.randn(N, 4, generator=g, dtype=torch.float64) * 0.05
    target[:3] = pred[:3]                                       # g = 0 exactly
    # weights exact in float32, so MMDetection's float32 sum of them is exact too
    lw = (torch.rand(N, 4, generator=g) > 0.3) * torch.randint(1, 5, (N, 4), generator=g) / 4
    return pred.to(dtype), target.to(dtype), lw.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_ghmr_consecutive_calls(backend, dtype, momentum):
    cfg = dict(type="GHMR", mu=0.02 if momentum else 0.1, bins=10 if momentum else 20,
               momentum=momentum, loss_weight=1.0 if momentum else 3.0)
    loss, ref = make(cfg, backend, dtype), GHMRRef(cfg)
    g = rng("ghmr", str(dtype), momentum)
    calls = [{}, {"reduction_override": "none"}, {"avg_factor": 5.0},
             {"reduction_override": "mean"}, {"avg_factor": 3.0, "reduction_override": "none"}]
    for call, kw in enumerate(calls):
        pred, t, lw = ghmr_inputs(g, dtype)
        step(loss, ref, pred, t, lw, **kw)
        if momentum:
            assert_close(loss.acc_sum, ref.acc_sum, dtype, f"acc_sum after call {call}")


# -- GHM quirks and state --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["GHMC", "GHMR"])
def test_ghm_sum_raises_after_updating_the_momentum(backend, name):
    """avg_factor=tot is always passed, so 'sum' raises, but only after acc_sum moved on."""
    cfg = dict(type=name, bins=10, momentum=0.75)
    for reduction_in_config in (False, True):
        c = dict(cfg, reduction="sum") if reduction_in_config else cfg
        loss, ref = make(c, backend, torch.float32), (GHMCRef if name == "GHMC" else GHMRRef)(c)
        g = rng("sum", name)
        pred, t, lw = ghmc_inputs(g, "labels", torch.float32) if name == "GHMC" else \
            ghmr_inputs(g, torch.float32)
        kw = {} if reduction_in_config else {"reduction_override": "sum"}
        with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
            ref(pred.double(), t, lw, **kw)
        with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
            loss(pred, t, lw, **kw)
        assert loss.acc_sum.abs().sum() > 0
        assert_close(loss.acc_sum, ref.acc_sum, torch.float32, "acc_sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["GHMC", "GHMR"])
def test_ghm_all_zero_label_weight(backend, name):
    """No valid element: tot = 1, every weight 0, the loss 0 with a zero gradient, no update."""
    loss = make(dict(type=name, momentum=0.5), backend, torch.float32)
    pred = torch.randn(N, 4, requires_grad=True)
    target = torch.randint(0, 5, (N,)) if name == "GHMC" else torch.randn(N, 4)
    out = loss(pred, target, torch.zeros(N if name == "GHMC" else (N, 4)))
    out.backward()
    assert out.item() == 0 and out.requires_grad
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    assert torch.equal(loss.acc_sum, torch.zeros(10))


def test_ghm_bins_follow_the_edges_exactly():
    """g exactly at an edge, and one float32 ulp either side, lands where `>=` / `<` put it."""
    bins = 10
    edges = ghm_edges(bins, "ghmc")
    module = lossgraph.compile(dict(type="GHMC", bins=bins))
    assert torch.equal(module.edges, edges)
    g = torch.cat([edges, torch.nextafter(edges, torch.tensor(-1.0)),
                   torch.nextafter(edges, torch.tensor(2.0)), torch.tensor([float("nan"), 1e3])])
    valid = torch.ones_like(g, dtype=torch.bool)
    valid[3] = False
    w = harmonizing_weights(module, g, valid, torch.tensor(float(g.numel())), torch.float32)
    b = bin_of(g, edges)
    b[3] = -1
    counts = torch.stack([(b == i).sum() for i in range(bins)])
    assert torch.equal(count_values(torch.where(b < 0, bins, b), bins + 1)[:bins], counts)
    filled = int((counts > 0).sum())
    expected = torch.where(b >= 0, g.numel() / counts[b.clamp(min=0)].double() / filled,
                           torch.zeros((), dtype=torch.float64))
    assert_close(w, expected, torch.float32, "weights")
    assert (w[b < 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ghmc_target_equal_to_edges_through_the_module(backend):
    """A dense target chosen so that g = |sigmoid(x) - t| is exactly an edge value."""
    loss, ref = make(dict(type="GHMC", bins=5, momentum=0.5), backend, torch.float32), \
        GHMCRef(dict(type="GHMC", bins=5, momentum=0.5))
    x = torch.randn(30, 5, generator=rng("edges"))
    s = torch.sigmoid(x)
    e = ghm_edges(5, "ghmc")[torch.randint(0, 5, (30, 5), generator=rng("e"))]
    t = s - e
    exact = torch.abs(s - t) == e
    assert exact.float().mean() > 0.5
    step(loss, ref, x, torch.where(exact, t, 0.0), torch.ones(30, 5))
    assert_close(loss.acc_sum, ref.acc_sum, torch.float32, "acc_sum")


def test_ghm_config_errors():
    with pytest.raises(NotImplementedError):
        lossgraph.compile(dict(type="GHMC", use_sigmoid=False))
    with pytest.raises(lossgraph.ConfigError, match="'bins' must be an integer"):
        lossgraph.compile(dict(type="GHMC", bins=10.5))
    with pytest.raises(lossgraph.ConfigError, match="bins must be a positive integer"):
        lossgraph.compile(dict(type="GHMR", bins=0))


def test_ghm_input_errors_leave_the_state_alone():
    loss = lossgraph.compile(dict(type="GHMC", momentum=0.5))
    with pytest.raises(lossgraph.InputError, match="one value per row"):
        loss(torch.randn(4, 3), torch.randint(0, 4, (4,)), torch.ones(4, 3))
    with pytest.raises(lossgraph.InputError, match="reduction_override"):
        loss(torch.randn(4, 3), torch.randint(0, 4, (4,)), torch.ones(4), reduction_override="avg")
    loss = lossgraph.compile(dict(type="GHMR", momentum=0.5))
    with pytest.raises(lossgraph.InputError, match="does not broadcast"):
        loss(torch.randn(4, 4), torch.randn(4, 4), torch.ones(3))
    assert torch.equal(loss.acc_sum, torch.zeros(10))


@pytest.mark.parametrize("name", ["GHMC", "GHMR"])
def test_ghm_state_dict_round_trip_and_dtype(name):
    cfg = dict(type=name, bins=8, momentum=0.6)
    a = lossgraph.compile(cfg)
    assert list(a.state_dict()) == ["edges", "acc_sum"]   # MMDetection's buffer names and order
    assert list(lossgraph.compile(dict(type=name)).state_dict()) == ["edges"]
    g = rng("sd", name)
    inputs = [ghmc_inputs(g, "labels", torch.float32) if name == "GHMC" else
              ghmr_inputs(g, torch.float32) for i in range(4)]
    for x in inputs[:2]:
        a(*x)
    b = lossgraph.compile(cfg)
    b.load_state_dict(a.state_dict())
    for x in inputs[2:]:
        assert torch.equal(a(*x), b(*x))
        assert torch.equal(a.acc_sum, b.acc_sum)
    b.double()
    assert b.acc_sum.dtype == b.edges.dtype == torch.float64
    out = b(inputs[0][0].double(), inputs[0][1], inputs[0][2])
    assert out.dtype == torch.float64
    b.to(torch.float32)
    assert b.acc_sum.dtype == torch.float32


def test_forward_hooks_need_no_host_sync_on_cuda(monkeypatch):
    """Everything the GHM and Seesaw forwards do before their kernels runs on fake CUDA tensors,
    where any read of data back to the host (.item(), bool(), bincount's max, boolean indexing)
    raises; the kernels themselves are replaced by a stub that records their arguments."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lossgraph.losses import seesaw

    cases = [(dict(type="GHMC", bins=30, momentum=0.75), "labels"),
             (dict(type="GHMC", momentum=0.5), "dense"),
             (dict(type="GHMR", momentum=0.5), "dense"),
             (dict(type="SeesawLoss", num_classes=K), "seesaw")]
    losses = [(lossgraph.compile(cfg), form) for cfg, form in cases]
    seen = []
    monkeypatch.setattr(seesaw, "_objectness_loss", lambda module: lambda *a: a[0].sum())
    with FakeTensorMode():
        dev = torch.device("cuda")
        for loss, form in losses:
            for name, buf in list(loss.named_buffers()):
                loss._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=dev)
            loss.run_pipeline = lambda a: seen.append(a) or a["pred"].sum()
            if form == "seesaw":
                pred = torch.empty(N, K + 2, device=dev)
                labels = torch.empty(N, dtype=torch.long, device=dev)
                out = loss(pred, labels, torch.empty(N, device=dev), 3.0)
                assert set(out) == {"loss_cls_objectness", "loss_cls_classes"}
                n = seesaw._num_pos(loss.spec, SimpleNamespace(tensors={"label": labels},
                                                               pred=pred))
                assert n.value.shape == ()
                continue
            pred = torch.empty(N, C, device=dev)
            target = torch.empty(N, dtype=torch.long, device=dev) if form == "labels" else \
                torch.empty(N, C, device=dev)
            weight = torch.empty(N if form == "labels" else (N, C), device=dev)
            loss(pred, target, weight)
            assert seen[-1]["weight"].shape == (N, C) and seen[-1]["avg_factor"].shape == ()
    assert len(seen) == len(cases)


# -- SeesawLoss ------------------------------------------------------------------------------------

def seesaw_inputs(g: torch.Generator, dtype, positives: bool = True):
    x = torch.randn(N, K + 2, generator=g, dtype=torch.float64) * 3
    tail = torch.randint(0, K, (N,), generator=g) ** 2 // K          # a long-tailed class mix
    labels = torch.where(torch.rand(N, generator=g) < 0.5, torch.tensor(K), tail)
    if not positives:
        labels = torch.full((N,), K)
    return x.to(dtype), labels


SEESAW = [dict(type="SeesawLoss", num_classes=K),
          dict(type="SeesawLoss", num_classes=K, p=0.0),
          dict(type="SeesawLoss", num_classes=K, q=0.0, return_dict=False),
          dict(type="SeesawLoss", num_classes=K, p=1.3, q=3.0, eps=0.05, loss_weight=2.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SEESAW, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                              if k not in ("type", "num_classes")))
def test_seesaw_consecutive_calls(backend, dtype, cfg):
    loss, ref = make(cfg, backend, dtype), SeesawRef(cfg)
    g = rng("seesaw", str(dtype), str(cfg))
    calls = [({}, True), ({"label_weights": True}, True),
             ({"label_weights": True, "avg_factor": 7.0}, True),
             ({"reduction_override": "sum"}, True), ({}, False),
             ({"label_weights": True, "reduction_override": "none"}, True)]
    if not cfg.get("return_dict", True):
        calls.pop()   # 'none' gives (N_pos,) + (N,): only broadcastable when N_pos is N or 1
    for call, (kw, positives) in enumerate(calls):
        pred, labels = seesaw_inputs(g, dtype, positives)
        if kw.get("label_weights"):
            kw = dict(kw, label_weights=torch.rand(N, generator=g, dtype=torch.float64).to(dtype))
        step(loss, ref, pred, labels, **kw)
        assert torch.equal(loss.cum_samples, ref.cum_samples.to(loss.cum_samples.dtype)), call


@pytest.mark.parametrize("backend", BACKENDS)
def test_seesaw_without_positives(backend):
    """The class loss is 0 with a zero gradient (MMDetection: cls_score[pos].sum()), the
    objectness loss is the usual one, and the background count still goes up."""
    loss = make(dict(type="SeesawLoss", num_classes=K), backend, torch.float32)
    pred = torch.randn(N, K + 2, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        out = loss(pred, torch.full((N,), K), reduction_override=reduction)
        classes = out["loss_cls_classes"]
        assert classes.shape == () and classes.item() == 0 and classes.requires_grad
        classes.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred))
        pred.grad = None
    assert loss.cum_samples.tolist() == [0.0] * K + [3.0 * N]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seesaw_sum_with_avg_factor_raises_after_counting(backend):
    loss = make(dict(type="SeesawLoss", num_classes=K, reduction="sum"), backend, torch.float32)
    pred, labels = seesaw_inputs(rng("sum"), torch.float32)
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        loss(pred, labels, avg_factor=4.0)
    assert loss.cum_samples.sum().item() == N


def test_seesaw_hooks():
    loss = lossgraph.compile(dict(type="SeesawLoss", num_classes=K))
    assert loss.custom_cls_channels and loss.custom_activation and loss.custom_accuracy
    assert loss.use_sigmoid is False
    assert loss.get_cls_channels(K) == K + 2
    with pytest.raises(lossgraph.InputError, match="num_classes"):
        loss.get_cls_channels(K + 1)
    pred, labels = seesaw_inputs(rng("hooks"), torch.float64)
    ref = SeesawRef(dict(type="SeesawLoss", num_classes=K))
    act = loss.get_activation(pred)
    assert act.shape == (N, K + 1)
    assert_close(act, ref.activation(pred), torch.float64, "activation")
    assert_close(act.sum(-1), torch.ones(N, dtype=torch.float64), torch.float64, "row sums")
    acc = loss.get_accuracy(pred, labels)
    assert list(acc) == ["acc_objectness", "acc_classes"]
    pos = labels < K
    obj_right = (pred[:, K] > pred[:, K + 1]) == pos
    cls_right = pred[pos, :K].argmax(-1) == labels[pos]
    assert acc["acc_objectness"].shape == (1,)
    assert acc["acc_objectness"].item() == pytest.approx(100.0 * obj_right.double().mean().item())
    assert acc["acc_classes"].item() == pytest.approx(100.0 * cls_right.double().mean().item())
    none = loss.get_accuracy(pred, torch.full((N,), K))["acc_classes"]
    assert none.shape == () and none.item() == 0
    with pytest.raises(lossgraph.InputError, match="channels"):
        loss.get_activation(pred[:, :-1])


def test_seesaw_errors_and_state():
    loss = lossgraph.compile(dict(type="SeesawLoss", num_classes=K))
    with pytest.raises(lossgraph.InputError, match="num_classes \\+ 2"):
        loss(torch.randn(N, K + 1), torch.zeros(N, dtype=torch.long))
    with pytest.raises(lossgraph.InputError, match="labels must be in"):
        loss(torch.randn(N, K + 2), torch.full((N,), K + 1))
    with pytest.raises(lossgraph.ConfigError, match="use_sigmoid"):
        lossgraph.compile(dict(type="SeesawLoss", use_sigmoid=True))
    assert torch.equal(loss.cum_samples, torch.zeros(K + 1))
    assert list(loss.state_dict()) == ["cum_samples"]
    pred, labels = seesaw_inputs(rng("state"), torch.float32)
    loss(pred, labels)
    other = lossgraph.compile(dict(type="SeesawLoss", num_classes=K))
    other.load_state_dict(loss.state_dict())
    a, b = loss(pred, labels), other(pred, labels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other.double()
    assert other.cum_samples.dtype == torch.float64
    assert torch.equal(other.cum_samples, loss.cum_samples.double())
