"""Shared test setup: a private cache folder, the usable backends, the GPU marker, and the helpers
that compare a compiled loss with the float64 references in reference_losses.py.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
import warnings

import pytest
import torch

import lossgraph
import lossgraph.backends
from reference_losses import reference

_CACHE_DIR: str | None = None
# tests/mmdet/ belongs to the optional MMDetection job (.ci/mmdet): collected only where mmdet and
# mmengine are installed, so the default suite neither needs them nor reports skipped tests
collect_ignore = [] if all(importlib.util.find_spec(m) for m in ("mmdet", "mmengine")) else ["mmdet"]


def pytest_configure(config):
    """Point LOSSGRAPH_CACHE_DIR at a fresh folder for this session; never dump by accident.

    Under pytest-xdist the controller makes the folder and its workers share it (the cache is
    safe for concurrent processes, Note [Cache trust]), so a kernel that tests in two workers
    use is compiled once: compiling is most of the suite's time."""
    global _CACHE_DIR
    shared = os.environ.get("LOSSGRAPH_TEST_CACHE_DIR")
    if shared and hasattr(config, "workerinput"):
        os.environ["LOSSGRAPH_CACHE_DIR"] = shared     # the controller removes it
    else:
        _CACHE_DIR = tempfile.mkdtemp(prefix="lossgraph-test-cache-")
        os.environ["LOSSGRAPH_CACHE_DIR"] = os.environ["LOSSGRAPH_TEST_CACHE_DIR"] = _CACHE_DIR
    for var in ("LOSSGRAPH_DUMP_DIR", "LOSSGRAPH_DISABLE_CACHE"):
        os.environ.pop(var, None)
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_unconfigure(config):
    if _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
        os.environ.pop("LOSSGRAPH_TEST_CACHE_DIR", None)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _backend_available(name: str, device: str = "cpu") -> bool:
    """True when backend `name` exists and says it can run on `device`; never raises."""
    try:
        return bool(lossgraph.backends.get(name).available(device))
    except Exception:  # noqa: BLE001 - a backend being written may not even import yet
        return False


# The backends usable on this machine: numeric tests are parametrized over this list, so a new
# backend (cpp, being written) joins every numeric test as soon as it reports itself available.
BACKENDS = ["torchscript"] + [b for b in ("cpp",) if _backend_available(b)]
GPU_BACKENDS = [b for b in ("torchscript", "cuda") if torch.cuda.is_available() and
                _backend_available(b, "cuda")]

# Relative tolerances against the float64 reference (max-abs error / max-abs reference).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# Elementwise, with a floor as a fraction of max-abs reference: |a - e| <= rtol |e| + FLOOR max|e|
# (float32 formulas such as torch's BCE cancel: x - logsigmoid(x) loses eps32 * |x| absolutely).
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-5}


@functools.lru_cache(maxsize=None)
def _compiled(key: str, backend: str):
    with warnings.catch_warnings():   # mmdet's ignore_index advice; test_ce_ignore_index_warning
        warnings.filterwarnings("ignore", message="Default ``avg_non_ignore`` is False")
        return lossgraph.compile(json.loads(key), backend=backend)


def compiled(cfg: dict, backend: str):
    """One shared CompiledLoss per (config, backend), so variants are scripted once a session."""
    return _compiled(json.dumps(cfg, sort_keys=True), backend)


# -- comparisons ---------------------------------------------------------------------------------

def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Max-abs error over max-abs reference within TOL[dtype], and elementwise with a small floor.

    NaNs must sit at the same places; infinities must match exactly.
    """
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at different places\n{a}\n{e}"
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities differ"
    ok = ~(nan_e | inf_e)
    a, e = a[ok], e[ok]
    if e.numel() == 0:
        return
    rtol = TOL[dtype]
    scale = e.abs().max().item()
    err = (a - e).abs()
    if scale == 0:
        assert err.max().item() == 0, f"{what}: expected all zeros, got max |a| = {err.max()}"
        return
    rel = err.max().item() / scale
    assert rel <= rtol, f"{what}: max |a - e| / max |e| = {rel:.3g} > {rtol:g}"
    bound = rtol * e.abs() + FLOOR[dtype] * scale
    bad = err > bound
    if bad.any():
        k = int(bad.nonzero()[0][0]) if bad.dim() else 0
        raise AssertionError(f"{what}: {int(bad.sum())} elements off, e.g. {a[k].item()!r} vs "
                             f"{e[k].item()!r} (max |e| {scale:.3g})")


def _to64(x):
    """Floating tensors (also inside a target tuple) to float64; everything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        return x.detach().double()
    if isinstance(x, tuple):
        return tuple(_to64(y) for y in x)
    return x


def _tensors(args, kwargs):
    return [x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)]


def check_case(loss, cfg: dict, pred: torch.Tensor, *args, grad_out=None, nograd: bool = False,
               reference_fn=reference, **kwargs):
    """Run the compiled loss and the reference; compare shape, dtype, value and d/dpred.

    `pred` keeps its dtype (float32 or float64); the reference runs once on the same dtypes (for
    the result's dtype and shape) and once in float64 (for values and autograd gradients). For
    'none' outputs the upstream gradient is random unless `grad_out` is given. Inputs must come
    back unmodified. With nograd=True a call on a pred without requires_grad is checked too.
    Returns the compiled loss's output.
    """
    dtype = pred.dtype
    inputs = [pred] + _tensors(args, kwargs)
    before = [t.clone() for t in inputs]
    p = pred.detach().clone().requires_grad_(True)
    out = loss(p, *args, **kwargs)
    with torch.no_grad():
        like = reference_fn(cfg, pred.detach(), *args, **kwargs)
    assert out.shape == like.shape, f"shape {tuple(out.shape)} != mmdet's {tuple(like.shape)}"
    assert out.dtype == like.dtype, f"dtype {out.dtype} != mmdet's {like.dtype}"
    p64 = pred.detach().double().requires_grad_(True)
    # avg_factor keeps its dtype: mmdet adds eps32 to it in that dtype (float32 rounding included)
    ref = reference_fn(cfg, p64, *[_to64(a) for a in args],
                    **{k: v if k == "avg_factor" else _to64(v) for k, v in kwargs.items()})
    assert_close(out, ref, dtype, f"{cfg} value")
    if ref.requires_grad:
        assert out.requires_grad, "the output is not connected to pred"
        if grad_out is None:
            grad_out = torch.ones(()) if out.dim() == 0 else \
                torch.rand(out.shape, dtype=torch.float64) * 2 - 0.5
        # the upstream gradient as it reaches `out`, in out's dtype (float32 for a float64 pred
        # of sigmoid CrossEntropyLoss), for the reference too
        grad_out = grad_out.to(out.dtype).double()
        out.backward(grad_out.to(out.dtype))
        ref.backward(grad_out)
        assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == pred.shape
        assert_close(p.grad, p64.grad, dtype, f"{cfg} grad")
    if nograd:
        plain = loss(pred.detach(), *args, **kwargs)
        assert not plain.requires_grad and plain.grad_fn is None
        assert plain.dtype == out.dtype and plain.shape == out.shape
        assert_close(plain, ref, dtype, "value without grad")
    assert torch.equal(p.detach(), pred) or torch.equal(p.isnan(), pred.isnan()) and \
        torch.equal(torch.nan_to_num(p.detach()), torch.nan_to_num(pred)), "pred was modified"
    for t0, t1 in zip(before, inputs):
        assert torch.equal(t0, t1) or (torch.isnan(t0).any() and
                                       torch.equal(torch.nan_to_num(t0), torch.nan_to_num(t1))), \
            "an input tensor was modified"
    return out


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend usable on this machine."""
    return request.param
