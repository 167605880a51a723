"""The CUDA backend on a GPU: parity with the float64 references and with the cpp twin (values and
gradients), bitwise determinism, fp16/bf16 at extreme logits, autocast, torch.compile without graph
breaks, no host sync, CUDA-graph capture, N*C above 2^31, multi-GPU, and the on-disk cubin cache.
Every test is marked `gpu` and skips cleanly on machines without CUDA.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lossgraph as lg
from lossgraph import cache
from lossgraph.backends import cuda, nvrtc

from conftest import _backend_available, check_case

pytestmark = pytest.mark.gpu
if torch.cuda.is_available() and not cuda.available("cuda"):
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=f"cuda backend unavailable: "
                                                           f"{cuda.unavailable_reason('cuda')}")]

DEV = "cuda"
N, C = 2000, 13


def gen():
    return torch.Generator(device="cpu").manual_seed(0)


def crit(cfg: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # a fallback to another backend would warn: fail then
        return lg.compile(cfg, backend="cuda")


def focal_inputs(n=N, c=C, dtype=torch.float32, scale=4.0):
    g = gen()
    x = (torch.randn(n, c, generator=g) * scale).to(DEV, dtype)
    y = torch.randint(0, c + 1, (n,), generator=g).to(DEV)
    w = torch.rand(n, generator=g).to(DEV)
    return x, y, w


CASES = [
    (dict(type="FocalLoss"), "labels", dict(weight="row", avg_factor="tensor")),
    (dict(type="FocalLoss", gamma=1.5, alpha=0.4, loss_weight=2.0), "labels",
     dict(weight="elem", avg_factor=37.0)),
    (dict(type="FocalLoss", reduction="none"), "onehot", {}),
    (dict(type="FocalLoss", reduction="sum"), "labels", {}),
    (dict(type="CrossEntropyLoss"), "classes", dict(weight="row")),
    (dict(type="CrossEntropyLoss", class_weight=[0.5 + i for i in range(C)], ignore_index=2,
          avg_non_ignore=True), "classes", {}),
    (dict(type="CrossEntropyLoss", reduction="none"), "classes", {}),
    (dict(type="CrossEntropyLoss", use_sigmoid=True), "labels", dict(weight="row")),
    (dict(type="L1Loss"), "box", dict(weight="elem", avg_factor=13.0)),
    (dict(type="SmoothL1Loss", beta=0.11, reduction="none"), "box", {}),
    (dict(type="MSELoss", loss_weight=2.0), "box", {}),
    (dict(type="BalancedL1Loss"), "box", {}),
    (dict(type="GaussianFocalLoss"), "heat", {}),
    (dict(type="VarifocalLoss"), "iou", {}),
]


def make(kind: str, kw: dict, device=DEV, dtype=torch.float32):
    """(pred, target, kwargs) for one case, on `device`."""
    g = gen()
    if kind in ("labels", "onehot", "classes"):
        x = torch.randn(N, C, generator=g) * 4
        if kind == "classes":
            t = torch.randint(0, C, (N,), generator=g)
        else:
            t = torch.randint(0, C + 1, (N,), generator=g)
            if kind == "onehot":
                t = torch.nn.functional.one_hot(t, C + 1)[:, :C]
    elif kind == "box":
        x, t = torch.randn(N, 4, generator=g), torch.randn(N, 4, generator=g)
    elif kind == "heat":
        x = torch.rand(4, 3, 16, 16, generator=g).clamp(1e-4, 1 - 1e-4)
        t = torch.where(torch.rand(4, 3, 16, 16, generator=g) > 0.9, 1.0,
                        torch.rand(4, 3, 16, 16, generator=g))
    else:   # iou targets
        x = torch.randn(N, C, generator=g) * 3
        t = torch.where(torch.rand(N, C, generator=g) > 0.9, torch.rand(N, C, generator=g), 0.0)
    kwargs = {}
    if kw.get("weight") == "row":
        kwargs["weight"] = torch.rand(x.shape[0], generator=g)
    elif kw.get("weight") == "elem":
        kwargs["weight"] = torch.rand(x.numel() if kind == "labels" else x.shape, generator=g)
    if kw.get("avg_factor") == "tensor":
        kwargs["avg_factor"] = torch.tensor(41.0)
    elif "avg_factor" in kw:
        kwargs["avg_factor"] = kw["avg_factor"]
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return x.to(device, dtype), t.to(device), {k: move(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("cfg,kind,kw", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in
                                                    enumerate(CASES)])
def test_matches_float64_reference(cfg, kind, kw):
    x, t, kwargs = make(kind, kw)
    loss = crit(cfg)
    go = None
    if cfg.get("reduction") == "none":    # check_case would make a CPU grad_output
        shape = loss(x, t, **kwargs).shape
        go = (torch.rand(shape, generator=gen(), dtype=torch.float64) * 2 - 0.5).to(DEV)
    check_case(loss, cfg, x, t, grad_out=go, **kwargs)


@pytest.mark.skipif(not _backend_available("cpp"), reason="no cpp backend here")
@pytest.mark.parametrize("cfg,kind,kw", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in
                                                    enumerate(CASES)])
def test_matches_cpp_twin(cfg, kind, kw):
    outs = []
    for device, backend in ((DEV, "cuda"), ("cpu", "cpp")):
        x, t, kwargs = make(kind, kw, device)
        x.requires_grad_(True)
        out = lg.compile(cfg, backend=backend)(x, t, **kwargs)
        go = torch.ones_like(out) if out.dim() == 0 else \
            torch.rand(out.shape, generator=gen()).to(device, out.dtype)
        out.backward(go)
        outs.append((out.detach().double().cpu(), x.grad.double().cpu()))
    (a, ga), (b, gb) = outs
    scale = max(b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() / scale < 2e-5
    assert (ga - gb).abs().max().item() / max(gb.abs().max().item(), 1e-30) < 2e-5


def test_bitwise_deterministic():
    loss = crit(dict(type="FocalLoss"))
    x, y, w = focal_inputs(200_000, 80)
    avg = torch.tensor(1234.0, device=DEV)
    results = []
    for _ in range(3):
        p = x.clone().requires_grad_(True)
        out = loss(p, y, weight=w, avg_factor=avg)
        out.backward()
        results.append((out.detach().clone(), p.grad.clone()))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite_at_extreme_logits(dtype):
    """mmcv's CUDA op gives NaN in fp16 for |logit| >~ 9 (mmcv#1488); here the math is fp32."""
    g = gen()
    x = (torch.where(torch.rand(N, C, generator=g) > 0.5, 20.0, -20.0)).to(DEV, dtype)
    y = torch.randint(0, C + 1, (N,), generator=g).to(DEV)
    p = x.clone().requires_grad_(True)
    out = crit(dict(type="FocalLoss"))(p, y)
    out.backward()
    assert out.dtype == dtype and torch.isfinite(out) and torch.isfinite(p.grad).all()
    assert p.grad.dtype == dtype
    ref = crit(dict(type="FocalLoss"))(x.float(), y)
    assert torch.allclose(out.float(), ref, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32(dtype):
    x, y, w = focal_inputs(dtype=dtype)
    p = x.clone().requires_grad_(True)
    q = x.float().requires_grad_(True)
    loss = crit(dict(type="FocalLoss"))
    a, b = loss(p, y, weight=w), loss(q, y, weight=w)
    a.backward()
    b.backward()
    rtol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert abs(a.float().item() - b.item()) <= rtol * abs(b.item())
    assert (p.grad.float() - q.grad).abs().max() <= rtol * q.grad.abs().max()


def test_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, C).to(DEV)
    feats = torch.randn(N, 32, device=DEV)
    y = torch.randint(0, C + 1, (N,), device=DEV)
    loss = crit(dict(type="FocalLoss"))
    with torch.autocast("cuda", dtype=torch.float16):
        out = loss(head(feats), y)
    out.backward()
    g16 = head.weight.grad.clone()
    head.zero_grad()
    out32 = loss(head(feats), y)
    out32.backward()
    assert torch.isfinite(out) and torch.isfinite(g16).all()
    assert abs(out.float().item() - out32.item()) < 5e-3 * abs(out32.item())
    assert (g16 - head.weight.grad).abs().max() < 2e-2 * head.weight.grad.abs().max()


def test_torch_compile_without_graph_breaks():
    torch.manual_seed(0)
    cls = crit(dict(type="FocalLoss"))
    box = crit(dict(type="L1Loss"))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cls, self.reg = torch.nn.Linear(32, C), torch.nn.Linear(32, 4)

        def forward(self, f, y, w, t, avg):
            return cls(self.cls(f), y, weight=w, avg_factor=avg) + box(self.reg(f), t)

    model = Head().to(DEV)
    f = torch.randn(N, 32, device=DEV)
    y = torch.randint(0, C + 1, (N,), device=DEV)
    w = torch.rand(N, device=DEV)
    t = torch.randn(N, 4, device=DEV)
    avg = torch.tensor(55.0, device=DEV)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(f, y, w, t, avg)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(f, y, w, t, avg)
    out.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(f, y, w, t, avg)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    for a, b in zip(got, [p.grad for p in model.parameters()]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_no_host_sync():
    loss = crit(dict(type="FocalLoss"))
    x, y, w = focal_inputs()
    avg = torch.tensor(17.0, device=DEV)
    p = x.clone().requires_grad_(True)
    loss(p, y, weight=w, avg_factor=avg).backward()     # compile and load outside the check
    p.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = loss(p, y, weight=w, avg_factor=avg)
        out.backward()
        (loss(p, y, weight=w, avg_factor=avg) * 3.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_backward_scales_by_grad_output():
    loss = crit(dict(type="FocalLoss"))
    x, y, w = focal_inputs()
    p, q = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss(p, y, weight=w).backward()
    (loss(q, y, weight=w) * 2.5).backward()
    assert torch.allclose(q.grad, p.grad * 2.5, rtol=1e-6)


def test_cuda_graph_capture():
    loss = crit(dict(type="FocalLoss"))
    x, y, w = focal_inputs()
    avg = torch.tensor(29.0, device=DEV)
    static = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static.grad = None
            loss(static, y, weight=w, avg_factor=avg).backward()
    torch.cuda.current_stream().wait_stream(side)
    static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loss(static, y, weight=w, avg_factor=avg)
        out.backward()
    for scale in (1.0, -2.0):
        with torch.no_grad():
            static.copy_(x * scale)
        avg.fill_(29.0 + scale)
        graph.replay()
        torch.cuda.synchronize()
        p = (x * scale).requires_grad_(True)
        ref = loss(p, y, weight=w, avg_factor=avg)
        ref.backward()
        assert torch.equal(out, ref) and torch.equal(static.grad, p.grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device():
    loss = crit(dict(type="FocalLoss"))
    x, y, w = focal_inputs()
    ref = loss(x, y, weight=w)
    with torch.cuda.device(0):
        out = loss(x.to("cuda:1"), y.to("cuda:1"), weight=w.to("cuda:1"))
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """64-bit indexing: N*C = 2^31 + 256 in fp16 (about 9 GB); checked against two halves."""
    rows, width = (1 << 24) + 2, 128
    need = rows * width * 2 * 2 + rows * 8 * 2
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.3:
        pytest.skip(f"needs {need * 1.3 / 2**30:.1f} GiB of free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(rows, width, device=DEV, dtype=torch.float16, generator=g)
    y = torch.randint(0, width + 1, (rows,), device=DEV, generator=g)
    loss = crit(dict(type="FocalLoss", reduction="sum"))
    p = x.requires_grad_(True)
    total = loss(p, y)
    total.backward()
    half = rows // 2
    with torch.no_grad():
        a, b = loss(x[:half].detach(), y[:half]), loss(x[half:].detach(), y[half:])
    assert torch.isfinite(total)
    assert abs(total.double().item() - (a.double() + b.double()).item()) <= 1e-3 * abs(total.item())
    tail = x[-1000:].detach().clone().requires_grad_(True)
    loss(tail, y[-1000:]).backward()
    assert torch.equal(p.grad[-1000:], tail.grad)


def test_cubin_cache_hit_needs_no_nvrtc(monkeypatch):
    cfg = dict(type="FocalLoss", gamma=1.25)
    x, y, w = focal_inputs()
    first = crit(cfg)(x, y, weight=w)
    calls = []
    real = nvrtc.compile
    monkeypatch.setattr(nvrtc, "compile", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    hits = cache.STATS["disk_hits"]
    second = crit(cfg)(x, y, weight=w)           # a new module: from disk, not from memory
    assert cache.STATS["disk_hits"] > hits and not calls
    assert torch.equal(first, second)
