"""The native CPU backend: determinism, NaN/Inf, dtypes and layouts, cache reuse, build races,
and the fallback when no C compiler works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lossgraph as lg
from lossgraph.backends import cpp

pytestmark = pytest.mark.skipif(not cpp.available("cpu"), reason="no working C compiler")
ROOT = Path(__file__).resolve().parent.parent

FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)


def _focal_inputs(n=3000, c=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * 3, torch.randint(0, c + 1, (n,), generator=g),
            torch.rand(n, generator=g))


def _run(loss, pred, *args, **kw):
    p = pred.detach().clone().requires_grad_(True)
    out = loss(p, *args, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), p.grad


@pytest.mark.parametrize("config,reduction", [(FOCAL, "mean"), (FOCAL, "sum"),
                                              (dict(type="CrossEntropyLoss"), "mean"),
                                              (dict(type="SmoothL1Loss", beta=0.5), "mean")])
def test_bitwise_identical_for_any_thread_count(config, reduction):
    pred, labels, w = _focal_inputs()
    loss = lg.compile({**config, "reduction": reduction}, backend="cpp")
    if config["type"] == "SmoothL1Loss":
        pred, labels = pred[:, :4].contiguous(), torch.randn(3000, 4)
        w = None
    elif config["type"] == "CrossEntropyLoss":
        labels = labels.clamp(max=79)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            outs.append(_run(loss, pred, labels, weight=w))
    finally:
        torch.set_num_threads(before)
    for v, g in outs[1:]:
        assert torch.equal(v, outs[0][0]) and torch.equal(g, outs[0][1])


def test_nan_and_inf_propagate_like_eager():
    pred, labels, w = _focal_inputs(64, 5)
    pred[3, 1], pred[7, 2], pred[9, 0] = float("nan"), float("inf"), -float("inf")
    for reduction in ("none", "mean"):
        ours = _run(lg.compile({**FOCAL, "reduction": reduction}, backend="cpp"), pred, labels, w)
        ref = _run(lg.compile({**FOCAL, "reduction": reduction}, backend="torchscript"), pred, labels, w)
        for a, b in zip(ours, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-6)


def test_nan_propagates_through_minimum_and_clamp():
    @lg.register_loss("_TestNanMinMax")
    def f(pred, target):
        return lg.minimum(pred, target) + lg.maximum(pred, 0.5) + lg.clamp(pred, -1.0, 1.0)

    pred = torch.tensor([[float("nan"), 1.0, -2.0, 3.0]])
    target = torch.tensor([[0.0, float("nan"), 0.0, 0.0]])
    for backend in ("cpp", "torchscript"):
        out = lg.compile(dict(type="_TestNanMinMax", reduction="none"), backend=backend)(pred, target)
        assert torch.isnan(out[0, :2]).all() and torch.isfinite(out[0, 2:]).all(), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_compute_in_float32_and_return_grad_in_input_dtype(dtype):
    pred, labels, w = _focal_inputs(200, 7)
    loss = lg.compile(FOCAL, backend="cpp")
    v, g = _run(loss, pred.to(dtype), labels, w)
    v32, g32 = _run(loss, pred.to(dtype).float(), labels, w)
    assert g.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    if dtype == torch.float64:
        v32, g32 = _run(lg.compile(FOCAL, backend="torchscript"), pred.double(), labels, w)
    torch.testing.assert_close(v.double(), v32.double(), rtol=tol, atol=0)
    torch.testing.assert_close(g, g32.to(dtype), rtol=1e-2 if dtype != torch.float64 else 1e-10,
                               atol=1e-6)


def test_non_contiguous_inputs_and_int32_labels():
    pred, labels, w = _focal_inputs(300, 9)
    loss = lg.compile(FOCAL, backend="cpp")
    base = _run(loss, pred, labels, w)
    wide = torch.zeros(300, 18)
    wide[:, ::2] = pred
    strided = _run(loss, wide[:, ::2], labels.to(torch.int32), torch.stack([w, w], 1)[:, 0])
    for a, b in zip(base, strided):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=300)


STATS_SCRIPT = """
    import json, torch, lossgraph as lg, lossgraph.cache as c
    loss = lg.compile(dict(type='FocalLoss'), backend='cpp')
    x = torch.randn(32, 80, requires_grad=True)
    loss(x, torch.randint(0, 81, (32,)), torch.rand(32), avg_factor=3.0).backward()
    print("STATS " + json.dumps(c.STATS) + " " + loss._last.artifact.info["library"])
"""


def test_second_process_loads_the_cached_library_without_building(tmp_path):
    env = {"LOSSGRAPH_CACHE_DIR": str(tmp_path)}
    first = _python(STATS_SCRIPT, env)
    assert first.returncode == 0, first.stderr
    lib = first.stdout.split()[-1]
    mtime = os.stat(lib).st_mtime_ns
    second = _python(STATS_SCRIPT, env)
    assert second.returncode == 0, second.stderr
    stats = json.loads(second.stdout.split("STATS ")[1].rsplit(" ", 1)[0])
    assert stats["renders"] == 0 and stats["disk_hits"] == 1
    assert second.stdout.split()[-1] == lib and os.stat(lib).st_mtime_ns == mtime


def test_concurrent_processes_build_one_library(tmp_path):
    env = {**os.environ, "LOSSGRAPH_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(STATS_SCRIPT)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    libs = {o.split()[-1] for o, _ in outs}
    assert len(libs) == 1
    # one kernel library (the runtime helpers, e.g. the label-range check, and the fast-call
    # trampolines, Note [Fast calls], are built apart)
    assert len([p for p in Path(tmp_path).rglob("kernel-*.so")
                if p.parent.name not in ("helpers", "fastcall")]) == 1


def test_failing_compiler_warns_once_and_falls_back_with_log_in_dump(tmp_path):
    code = """
        import warnings, torch, lossgraph as lg
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss = lg.compile(dict(type='L1Loss'), backend='cpp')
            x = torch.randn(8, 4, requires_grad=True)
            v = loss(x, torch.zeros(8, 4)); v.backward()
            loss(x, torch.zeros(8, 4), reduction_override='sum')
        msgs = [str(m.message) for m in w if 'falling back' in str(m.message)]
        print(len(msgs), loss._last.backend.name, abs(v.item() - x.abs().mean().item()) < 1e-6)
        print(msgs[0])
    """
    env = {"CC": "false", "LOSSGRAPH_CACHE_DIR": str(tmp_path / "cache"),
           "LOSSGRAPH_DUMP_DIR": str(tmp_path / "dump")}
    r = _python(code, env)
    assert r.returncode == 0, r.stderr
    first, message = r.stdout.splitlines()[:2]
    assert first == "1 torchscript True"
    assert "compiler log in" in message
    assert list((tmp_path / "dump").rglob("compile.log"))


def test_generated_source_is_readable_c():
    loss = lg.compile(FOCAL, backend="cpp")
    pred, labels, w = _focal_inputs(8, 4)
    loss(pred.requires_grad_(), labels, w, avg_factor=2.0)
    src = loss.source
    assert src.startswith("// Generated by lossgraph")
    assert "#pragma omp parallel for" in src and "grad_out[base + k]" in src
    assert "// backend: cpp" in src
