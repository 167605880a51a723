"""Device and dtype safety: a compiled loss follows its inputs' device, and no backend hands a
pointer to the wrong place (Note [An explicit backend follows the device], Note [Device guard]).

Cases that would crash the process if a guard were missing (a meta or "CUDA" tensor's pointer
read by the C kernel) run in one subprocess, whose exit status is checked: a signal fails the
test instead of killing the session. There is no GPU here: CUDA tensors are stood in for by meta
tensors that report a cuda device, and the cuda backend's guard is called directly.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lossgraph as lg
from lossgraph import InputError
from lossgraph.backends import base, cuda
from lossgraph.build import Variant
from lossgraph.compiler import KernelMeta
from lossgraph.inputs import Call
from lossgraph.ops import Level

from conftest import BACKENDS, assert_close, check_case
from reference_losses import reference

ROOT = Path(__file__).resolve().parent.parent
HAS_CPP = "cpp" in BACKENDS

# The losses of the meta-tensor crash, with inputs made on a given device.
SCRIPT = r'''
import json, sys, warnings
import torch
import lossgraph as lg
from lossgraph import InputError
from lossgraph.backends import cpp

N, C = 6, 5
def cases(d):
    x = lambda *s: torch.randn(*s, device=d)
    lab = lambda hi: torch.randint(0, hi, (N,), device=d)
    box = lambda: torch.rand(N, 4, device=d) + torch.tensor([0, 0, 1, 1.], device=d)
    return {
        "FocalLoss": (dict(type="FocalLoss"), (x(N, C), lab(C + 1))),
        "CrossEntropyLoss": (dict(type="CrossEntropyLoss"), (x(N, C), lab(C))),
        "L1Loss": (dict(type="L1Loss", reduction="none"), (x(N, 4), x(N, 4))),
        "SmoothL1Loss": (dict(type="SmoothL1Loss"), (x(N, 4), x(N, 4))),
        "GIoULoss": (dict(type="GIoULoss"), (box(), box())),
        "VarifocalLoss": (dict(type="VarifocalLoss"), (x(N, C), torch.rand(N, C, device=d))),
        "QualityFocalLoss": (dict(type="QualityFocalLoss"),
                             (x(N, C), (lab(C + 1), torch.rand(N, device=d)))),
        "GaussianFocalLoss": (dict(type="GaussianFocalLoss"),
                              (torch.rand(N, C, device=d), torch.rand(N, C, device=d))),
    }

class OnCuda:
    """A meta tensor that says it is on cuda:0 (this machine has no GPU)."""
    def __init__(self, t): self.t = t
    device = torch.device("cuda", 0)
    def __getattr__(self, k): return getattr(self.t, k)

out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, (cfg, args) in cases("meta").items():
        loss = lg.compile(cfg, backend="cpp")
        p = args[0].requires_grad_()
        v = loss(p, *args[1:])
        v.sum().backward()
        out[name] = [list(v.shape), str(v.dtype), v.device.type,
                     list(p.grad.shape) == list(p.shape)]
out["warnings"] = [str(w.message) for w in caught if "lossgraph" in str(w.message)]

# the cpp kernel itself, handed tensors it cannot read: InputError before any pointer is used
loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
x, y = torch.randn(N, C), torch.randint(0, C + 1, (N,))
calls = []
launch = loss._launch
loss._launch = lambda call, level: (calls.append(call), launch(call, level))[1]
loss(x, y)
call, cv = calls[-1], loss._last
assert cv.backend.name == "cpp", cv.backend.name
def attempt(**change):
    saved = dict(call.__dict__)
    call.__dict__.update(change)
    try:
        cv.run(call)
        return "no error"
    except InputError as e:
        return str(e)
    finally:
        call.__dict__.update(saved)
out["direct"] = {
    "meta pred": attempt(pred=x.to("meta")),
    "cuda pred": attempt(pred=OnCuda(x.to("meta"))),
    "meta label": attempt(tensors={"label": y.to("meta")}),
    "int32 label": attempt(tensors={"label": y.int()}),
    "short label": attempt(tensors={"label": y[:3]}),
    "float64 pred": attempt(pred=x.double()),
    "meta denom": attempt(denom=torch.tensor(3.0, device="meta")),
    "fine": attempt(),
}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def crashy():
    """The SCRIPT's findings; the subprocess must exit normally (a signal is a failure)."""
    if not HAS_CPP:
        pytest.skip("needs the cpp backend (a C compiler)")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpp_loss_on_meta_tensors_gives_shapes_not_a_crash(crashy):
    """backend='cpp' with meta tensors: a shape-only result of MMDetection's shape and dtype,
    and a gradient of pred's shape, for every loss of the issue; meta warns nothing."""
    for name in ("FocalLoss", "CrossEntropyLoss", "L1Loss", "SmoothL1Loss", "GIoULoss",
                 "VarifocalLoss", "QualityFocalLoss", "GaussianFocalLoss"):
        shape = [6, 4] if name == "L1Loss" else []     # L1Loss is configured reduction='none'
        assert crashy[name] == [shape, "torch.float32", "meta", True], name
    assert crashy["warnings"] == []


def test_cpp_kernel_guard_rejects_what_it_cannot_read(crashy):
    d = crashy["direct"]
    assert d["meta pred"] == ("FocalLoss: the cpp backend cannot run meta tensors (pred is on "
                              "meta); compile with backend='auto' to follow the device")
    assert d["cuda pred"].startswith("FocalLoss: the cpp backend cannot run cuda tensors "
                                     "(pred is on cuda:0)")
    assert d["meta label"] == "FocalLoss: label is on meta but pred is on cpu"
    assert d["int32 label"] == ("FocalLoss: labels are torch.int32 but this kernel was "
                                "compiled for int64")
    assert d["short label"].startswith("FocalLoss: label has 3 elements but the kernel reads 6")
    assert d["float64 pred"] == ("FocalLoss: pred is torch.float64 but this kernel was compiled "
                                 "for float32")
    assert d["meta denom"].startswith("FocalLoss: the denominator must be one value on cpu")
    assert d["fine"] == "no error"


# -- an explicit backend follows the device ---------------------------------------------------------

def test_explicit_backend_follows_the_device():
    loss = lg.compile(dict(type="FocalLoss"), backend="cpp")
    comp = loss.compiler
    assert comp.backend_for("meta") == "torchscript"
    assert comp.backend_for("cuda") == lg.backends.auto("cuda")   # torchscript without a GPU
    if HAS_CPP:
        assert comp.backend_for("cpu") == "cpp"
    auto = lg.compile(dict(type="FocalLoss")).compiler
    for dev in ("cpu", "cuda", "meta"):
        assert auto.backend_for(dev) == lg.backends.auto(dev)


def test_explicit_backend_keeps_a_device_it_serves(monkeypatch):
    """A backend that says it can run the device keeps it (e.g. cuda with a GPU present)."""
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device="cuda": None)
    comp = lg.compile(dict(type="L1Loss"), backend="cuda").compiler
    assert comp.backend_for("cuda") == "cuda"


@pytest.mark.skipif(cuda.available("cuda"), reason="the cuda backend serves CPU tensors here?")
def test_cuda_backend_with_cpu_tensors_follows_them_and_warns_once():
    """backend='cuda' on CPU tensors (this machine has no GPU): the CPU's backend runs them with
    one warning naming both backends, and the numbers are MMDetection's."""
    cfg = dict(type="FocalLoss", loss_weight=2.0)
    loss = lg.compile(cfg, backend="cuda")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    with pytest.warns(UserWarning, match=r"^lossgraph: FocalLoss was compiled with backend="
                                         r"'cuda', which cannot run cpu tensors; using the "
                                         rf"{lg.backends.auto('cpu')} backend for them$"):
        out = loss(x, y)
    assert_close(out, reference(cfg, x, y), torch.float64, "value")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(x.float(), y, reduction_override="sum")     # a new variant: no second warning
    assert loss._last.backend.name == lg.backends.auto("cpu")


def test_backend_property_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lg.compile(dict(type="L1Loss"), backend="cuda").backend in ("cpp", "torchscript",
                                                                            "cuda")


# -- the guard itself (base.check_call), as each backend calls it -----------------------------------

def _call(pred, **tensors) -> Call:
    c = Call("L1Loss", pred, "dense", reduction="mean", denom=float(pred.numel()))
    c.tensors.update(tensors)
    return c


def _meta(v: Variant, **access) -> KernelMeta:
    return KernelMeta("k", v, ["pred", *sorted(access), "denom"], Level.ELEM, {}, access)


def test_cuda_backend_guard_refuses_host_tensors():
    """cuda.run checks before it reads its artifact (None here): CPU pred, wrong dtype."""
    x = torch.randn(3, 4)
    call = _call(x, target=torch.randn(3, 4))
    meta = _meta(Variant(device="cuda"), target="elem")
    with pytest.raises(InputError, match=r"^L1Loss: the cuda backend cannot run cpu tensors "
                                         r"\(pred is on cpu\)"):
        cuda.run(None, call, meta)


def test_guard_checks_sizes_tables_and_devices():
    x = torch.randn(3, 4)
    v = Variant()
    ok = _call(x, target=torch.randn(3, 4), weight=torch.rand(3))
    base.check_call(ok, _meta(v, target="elem", weight="row"), "cpp", "cpu", lambda d: False)
    with pytest.raises(InputError, match=r"^L1Loss: weight has 3 elements but the kernel reads "
                                         r"4 \(col access, pred \(3, 4\)\)$"):
        base.check_call(ok, _meta(v, target="elem", weight="col"), "cpp", "cpu", lambda d: False)
    bad = _call(x, target=torch.randn(3, 4, device="meta"))
    with pytest.raises(InputError, match=r"^L1Loss: target is on meta but pred is on cpu$"):
        base.check_call(bad, _meta(v, target="elem"), "cpp", "cpu", lambda d: False)
    meta = KernelMeta("k", v, ["pred", "class_weight"], Level.ELEM, {"class_weight": (1.0, 2.0)},
                      {})
    with pytest.raises(InputError, match=r"^L1Loss: class_weight has 2 values but pred has 4 "
                                         r"classes \(last dimension\)$"):
        base.check_call(_call(x), meta, "cpp", "cpu", lambda d: False)
    # a CPU scalar beside a pred elsewhere is allowed (cpp reads it in place, cuda copies it)
    m = _call(x.to("meta"), weight=torch.tensor([2.0]))
    base.check_call(m, _meta(v, weight="scalar"), "torchscript", "meta", lambda d: True)


def test_torchscript_runs_meta_tensors_shape_only():
    """(A weight is left out: SmoothL1Loss's v3 all-zero-weight exit reads its values, which
    a meta tensor does not have; torch raises its own RuntimeError for that.)"""
    loss = lg.compile(dict(type="SmoothL1Loss", reduction="none"), backend="torchscript")
    p = torch.randn(5, 4, device="meta", requires_grad=True)
    out = loss(p, torch.randn(5, 4, device="meta"))
    assert out.shape == (5, 4) and out.device.type == "meta" and out.dtype == torch.float32
    out.sum().backward()
    assert p.grad.shape == (5, 4) and p.grad.device.type == "meta"


# -- non-finite hyperparameters (Note [Non-finite hyperparameters]) -------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("cfg, key", [
    (dict(type="FocalLoss", gamma=NAN), "gamma"), (dict(type="FocalLoss", alpha=NAN), "alpha"),
    (dict(type="SmoothL1Loss", beta=NAN), "beta"),
    (dict(type="KnowledgeDistillationKLDivLoss", T=NAN), "T"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, NAN]), "class_weight"),
])
def test_nan_hyperparameter_is_a_config_error_naming_it(cfg, key):
    with pytest.raises(lg.ConfigError, match=rf"^{cfg['type']}: config key '{key}' is NaN "):
        lg.compile(cfg, backend="torchscript")


@pytest.mark.parametrize("value", [NAN, INF, -INF, 10 ** 400])
def test_non_finite_loss_weight_is_a_config_error(value):
    with pytest.raises(lg.ConfigError, match=r"^L1Loss: config key 'loss_weight' must be finite"):
        lg.compile(dict(type="L1Loss", loss_weight=value), backend="torchscript")


@pytest.mark.parametrize("cfg, message", [
    (dict(type="SmoothL1Loss", beta=0.0), "beta must be > 0, got 0.0"),
    (dict(type="SmoothL1Loss", beta=-INF), "beta must be > 0, got -inf"),
    (dict(type="BalancedL1Loss", beta=-1.0), "beta must be > 0, got -1.0"),
    (dict(type="VarifocalLoss", alpha=-INF), "alpha must be >= 0, got -inf"),
    (dict(type="KnowledgeDistillationKLDivLoss", T=0.5), "T must be >= 1, got 0.5"),
])
def test_mmdetection_range_asserts_are_config_errors(cfg, message):
    """A ConfigError with MMDetection's condition: at build time, or at the call where
    MMDetection asserts inside its loss function (SmoothL1/BalancedL1 beta)."""
    with pytest.raises(lg.ConfigError, match=rf"^{cfg['type']}: {re.escape(message)}$"):
        x = torch.randn(3, 4)
        lg.compile(cfg, backend="torchscript")(x, x)


@pytest.mark.parametrize("backend", ["torchscript", "cpp"])
@pytest.mark.parametrize("cfg", [dict(type="SmoothL1Loss", beta=INF),
                                 dict(type="FocalLoss", gamma=INF, alpha=0.4)])
def test_infinite_hyperparameter_gives_mmdetections_value(cfg, backend):
    """beta=inf makes SmoothL1Loss 0; gamma=inf keeps only pt == 1 in FocalLoss; an infinite
    constant renders as valid C (LG_INF)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64) if cfg["type"] == "SmoothL1Loss" \
        else torch.randint(0, 5, (6,), generator=g)
    check_case(lg.compile(cfg, backend=backend), cfg, x, t, reduction_override="none")


# -- loss names and dump folders (Note [Loss names]) -------------------------------------------------

@pytest.mark.parametrize("name", ["../x/MyL1", "a/b", "..", "x..y", "", "1abc", "a b", "a\\b", 3])
def test_register_loss_rejects_names_that_are_not_plain(name):
    with pytest.raises(ValueError, match=r"^invalid loss name "):
        lg.register_loss(name)


def test_register_loss_accepts_plain_names_with_dashes(tmp_path):
    @lg.register_loss("My-L1_x")
    def my_l1(pred, target):
        return lg.abs(pred - target)
    try:
        loss = lg.compile(dict(type="My-L1_x"), backend="torchscript", dump_dir=str(tmp_path))
        loss(torch.randn(3, 2), torch.randn(3, 2))
        assert [p.name for p in tmp_path.iterdir()] == ["My-L1_x"]
    finally:
        lg.REGISTRY.pop("My-L1_x", None)


def test_dump_folder_never_leaves_the_dump_root(tmp_path):
    from lossgraph import dump
    assert dump.variant_folder(tmp_path, "L1Loss", "cpp.mean") == (tmp_path / "L1Loss" /
                                                                   "cpp.mean").resolve()
    with pytest.raises(ValueError, match=r"would be outside"):
        dump.variant_folder(tmp_path, "../x", "cpp.mean")


# -- running from the folder that holds a clone (Note [Running beside the clone]) -----------------

def test_import_beside_a_clone_finds_the_package(tmp_path):
    clone = tmp_path / "lossgraph"
    clone.mkdir()
    for name in ("__init__.py", "lossgraph", "templates"):
        (clone / name).symlink_to(ROOT / name)
    code = "import lossgraph as lg; print(lg.__file__); print(callable(lg.compile))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    where, ok = r.stdout.split()
    assert ok == "True" and where == str(clone / "lossgraph" / "__init__.py")
