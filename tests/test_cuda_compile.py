"""The CUDA backend without a GPU: every built-in loss renders and compiles to cubin (sm_80, sm_90)
through NVRTC, the CUDA and cpp kernels share their element statements, the on-disk image cache,
availability messages, and torch.compile readiness of the compiler's first-call path.
"""
from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch

import lossgraph as lg
from lossgraph import passes
from lossgraph.backends import clower, cuda, cudarows, nvrtc
from lossgraph.build import Variant
from lossgraph.compiler import Compiler
from lossgraph.config import parse
from lossgraph.errors import BackendError

NO_NVRTC = nvrtc.unavailable_reason()
needs_nvrtc = pytest.mark.skipif(NO_NVRTC is not None, reason=f"NVRTC unavailable: {NO_NVRTC}")
BUILTIN = sorted(n for n, d in lg.REGISTRY.items() if d.builtin)
ARCHS = ("sm_80", "sm_90")


def _config(name: str) -> dict:
    """The loss's default config, plus the keys some losses require (num_classes)."""
    for extra in ({}, {"num_classes": 4}):
        try:
            Compiler(parse(dict(type=name, **extra)), "cuda")
            return dict(type=name, **extra)
        except lg.ConfigError:
            pass
    return dict(type=name)


def _target(name: str) -> str:
    return "dense" if lg.REGISTRY[name].target == "dense" else "labels"


def _variant(cfg: dict, **kw) -> Variant:
    base = Variant(target=_target(cfg["type"]), device="cuda",
                   reduction=cfg.get("reduction", "mean"))
    return dataclasses.replace(base, **kw)


def _source(cfg: dict, v: Variant, backend: str = "cuda") -> tuple[str, object]:
    src, meta, _ = Compiler(parse(cfg), backend).generate(v, backend)
    return src, meta


# Every built-in loss: its default variant for both archs, plus a variant with a low-precision
# (or float64) pred, a weight and a device-tensor avg_factor for one arch.
RICH = [dict(dtype="float16"), dict(dtype="bfloat16"), dict(dtype="float64")]
CASES = [(_config(n), {}, arch) for n in BUILTIN for arch in ARCHS]
CASES += [(_config(n), dict(RICH[i % 3], weight="row" if _target(n) == "labels" else "elem",
                              denom="tensor"), ARCHS[i % 2]) for i, n in enumerate(BUILTIN)]
# Option combinations of the losses with many options (schedules, tables, store modes).
CASES += [
    (dict(type="FocalLoss", gamma=1.5, alpha=0.4, loss_weight=2.0, reduction="sum"),
     dict(target="dense", dtype="bfloat16", weight="elem"), "sm_90"),
    (dict(type="FocalLoss", activated=True), dict(dtype="float16", weight="row"), "sm_80"),
    (dict(type="FocalLoss", reduction="none"), dict(label_dtype="int32", weight="col"), "sm_90"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[0.5, 1.0, 2.0],
          reduction="none"), dict(dtype="float16"), "sm_80"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, 1.0, 1.0, 0.1], ignore_index=2,
          avg_non_ignore=True), dict(dtype="bfloat16", weight="row", denom="tensor"), "sm_90"),
    (dict(type="CrossEntropyLoss", reduction="none"), dict(grad=False), "sm_80"),
    (dict(type="GaussianFocalLoss", pos_weight=0.25, neg_weight=0.75), dict(dtype="float16"),
     "sm_90"),
    (dict(type="SmoothL1Loss", beta=0.11, reduction="none"), dict(dtype="float64"), "sm_80"),
    (dict(type="VarifocalLoss", iou_weighted=False), dict(dtype="float16", weight="scalar"),
     "sm_90"),
]


@needs_nvrtc
@pytest.mark.parametrize("cfg,kw,arch", CASES,
                         ids=[f"{c['type']}-{'-'.join(map(str, k.values())) or 'default'}-{a}"
                              for c, k, a in CASES])
def test_compiles_to_cubin(cfg, kw, arch):
    src, meta = _source(cfg, _variant(cfg, **kw))
    image, log = nvrtc.compile(src, arch, f"{meta.fn_name}.cu")
    assert image[:4] == b"\x7fELF", "a cubin is an ELF image"
    assert "warning" not in log, log
    assert "#include" not in src, "NVRTC ships no headers: the source must need none"


def test_every_builtin_loss_is_covered():
    assert {c["type"] for c, _, _ in CASES} == set(BUILTIN)


@pytest.mark.parametrize("cfg,kw", [
    (dict(type="FocalLoss"), dict(weight="row")),
    (dict(type="FocalLoss"), dict(target="dense", reduction="none")),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 3.0]), dict(weight="row")),
    (dict(type="L1Loss"), dict(weight="elem", dtype="float16")),
    (dict(type="GaussianFocalLoss"), {}),
])
def test_cuda_and_cpp_share_the_element_body(cfg, kw):
    """STYLE principle 8: every statement of the cpp kernel's element body is in the CUDA kernel.
    The per-row code and the one-hot label column are each backend's own lowering: a float cpp
    kernel computes them in double (Note [Row values in double] in clower), and so does a float
    CUDA row kernel (Note [Row values on CUDA] in cudarows, its T copies rounded by lg_narrow)."""
    v = _variant(cfg, **kw)
    cu, meta = _source(cfg, v)
    c, _ = _source(cfg, dataclasses.replace(v, device="cpu"), "cpp")
    comp = Compiler(parse(cfg), "cuda")
    body = passes.kernel_body(comp.stages(v)[-1][1])
    k = clower.lower(body, v, meta.fn_name)
    lines = k.scalar + [s for p in k.passes for s in p["stmts"]]
    lines += [s for p in k.passes for _, _, stmts, _ in p["gathers"] for s in stmts]
    lines += k.hot.body0 if k.hot else k.final
    assert len(lines) > 3
    for line in lines:
        assert line in cu and line in c, line
    kc = clower.lower(body, v, meta.fn_name, wide=v.dtype != "float64")
    rows_cu = cuda.launch_info(cu)["schedule"] == "rows"
    for kk, src in ((kc if rows_cu else k, cu), (kc, c)):
        post = cudarows.row_post if src is cu else (lambda p: p["row_post"])
        rows = kk.row_pre + [s for p in kk.passes for s in post(p)]
        for line in rows + (kk.hot.body1 if kk.hot else []):
            assert line in src, line


@pytest.mark.parametrize("cfg,kw,schedule,accumulate", [
    (dict(type="FocalLoss"), {}, "elem", True),
    (dict(type="L1Loss", reduction="none"), {}, "elem", False),
    (dict(type="CrossEntropyLoss"), {}, "rows", True),
    (dict(type="CrossEntropyLoss", reduction="none"), {}, "rows", False),
])
def test_launch_line(cfg, kw, schedule, accumulate):
    src, _ = _source(cfg, _variant(cfg, **kw))
    info = cuda.launch_info(src)
    assert info["schedule"] == schedule and info["accumulate"] == accumulate
    assert info["params"][0] == ["S", "pred"] and info["block"] == cuda.BLOCK
    assert (f"{_source(cfg, _variant(cfg, **kw))[1].fn_name}_finish" in src) == accumulate


def test_class_weight_table_is_compiled_in():
    cfg = dict(type="CrossEntropyLoss", class_weight=[0.5, 2.0, 4.0])
    src, _ = _source(cfg, _variant(cfg))
    assert "static __device__ const T p_class_weight[3] = { ((T)0.5), ((T)2.0), ((T)4.0) };" in src
    assert cuda.launch_info(src)["tables"] == {"class_weight": 3}
    assert "p_class_weight," not in src.split("extern \"C\"")[1].split("{")[0]


def test_divider_matches_integer_division():
    rng = random.Random(0)
    widths = list(range(1, 300)) + [rng.randrange(1, 1 << 31) for _ in range(300)] + [(1 << 31) - 1]
    for d in widths:
        magic, shift, limit = cuda._divider(d)
        assert limit == 1 << 31
        for n in [0, 1, d - 1, d, d + 1, limit - 1] + [rng.randrange(limit) for _ in range(40)]:
            if 0 <= n < limit:
                t = (n * magic) >> 32
                assert (t + n) >> shift == n // d, (n, d)
    assert cuda._divider(1 << 31)[2] == 0     # widths from 2^31 up: always the 64-bit division


# -- caching, availability, errors ---------------------------------------------------------------

@needs_nvrtc
def test_images_are_cached_per_arch_in_the_entry_folder(tmp_path, monkeypatch):
    cfg = dict(type="L1Loss")
    src, meta = _source(cfg, _variant(cfg))
    k = cuda.CudaKernel(meta.fn_name, src, tmp_path, cuda.launch_info(src), "mean", meta.loss_level)
    image = k.image("sm_80")
    assert (tmp_path / f"{meta.fn_name}.sm_80.cubin").read_bytes() == image
    assert (tmp_path / "compile.sm_80.log").exists()
    assert (tmp_path / f"{meta.fn_name}.compute_80.ptx").read_bytes().startswith(b"//")

    def refuse(*a, **kw):
        raise AssertionError("compiled again instead of reading the cached cubin")
    monkeypatch.setattr(nvrtc, "compile", refuse)
    monkeypatch.setattr(nvrtc, "compile_with_ptx", refuse)
    again = cuda.CudaKernel(meta.fn_name, src, tmp_path, cuda.launch_info(src), "mean",
                            meta.loss_level)
    assert again.image("sm_80") == image
    with pytest.raises(AssertionError):
        again.image("sm_90")


@needs_nvrtc
def test_cache_key_names_nvrtc():
    comps = cuda.components(Variant())
    assert comps["nvrtc"] == ".".join(map(str, nvrtc.version()))
    assert set(comps) >= {"nvrtc", "nvrtc_options", "block", "unroll"}


@needs_nvrtc
def test_nvrtc_errors_are_backend_errors_with_the_log():
    with pytest.raises(BackendError, match="NVRTC failed to compile") as e:
        nvrtc.compile("this is not CUDA", "sm_80")
    assert "error" in e.value.log
    with pytest.raises(ValueError, match="bad CUDA architecture"):
        nvrtc.compile("", "hopper")
    with pytest.raises(BackendError, match="cannot compile for sm_50"):
        nvrtc.compile("", "sm_50")


@needs_nvrtc
def test_targets_for_devices():
    newest = max(nvrtc.supported_archs())
    assert nvrtc.target_for((9, 0)) == "sm_90"
    assert nvrtc.target_for((newest // 10 + 5, 0)) == f"compute_{newest}"   # a GPU newer than NVRTC
    between = next(cc for cc in range(min(nvrtc.supported_archs()), newest)
                   if cc not in nvrtc.supported_archs())      # an arch NVRTC does not list
    below = max(a for a in nvrtc.supported_archs() if a < between)
    assert nvrtc.target_for(divmod(between, 10)) == f"compute_{below}"
    with pytest.raises(BackendError, match="older than NVRTC"):
        nvrtc.target_for((3, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a GPU-less machine")
def test_unavailable_without_a_gpu():
    assert not cuda.available("cuda") and not cuda.available("cpu")
    assert lg.backends.auto("cuda") != "cuda"
    assert "CUDA device" in cuda.unavailable_reason("cuda")
    assert "CUDA tensors only" in cuda.unavailable_reason("cpu")


def test_cuda_on_cpu_tensors_falls_back_with_a_clear_warning():
    loss = lg.compile(dict(type="FocalLoss"), backend="cuda")
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    with pytest.warns(UserWarning, match="backend='cuda', which cannot run cpu tensors; using"):
        out = loss(x, y)
    ref = lg.compile(dict(type="FocalLoss"), backend="torchscript")(x, y)
    assert torch.allclose(out, ref)


# -- torch.compile readiness ---------------------------------------------------------------

def test_first_compile_inside_torch_compile_keeps_one_graph():
    """Compiler.get's miss path (cache I/O, builds) runs eagerly under dynamo: no graph break,
    even for two variants first met in the middle of one trace."""
    comp = Compiler(parse(dict(type="FocalLoss")), "torchscript")
    v1 = Variant(reduction="mean", target="labels", weight="row")
    v2 = Variant(reduction="sum", target="labels", weight="row")

    def f(x):
        a, b = comp.get(v1), comp.get(v2)
        return x * len(a.meta.params) + (b.meta.variant.reduction == "sum")

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
    assert torch.equal(out, f(torch.ones(2)))
    assert comp.get(v1).meta.variant == v1 and comp.get(v2).meta.variant == v2


def test_custom_op_schema_and_fake():
    op = torch.ops.lossgraph.cuda_fused.default
    assert "Tensor pred, Tensor[] inputs, Tensor? denom" in str(op._schema)
    cfg = dict(type="CrossEntropyLoss", reduction="none")
    src, meta = _source(cfg, _variant(cfg))
    k = cuda.register(cuda.CudaKernel(meta.fn_name, src, None, cuda.launch_info(src), "none",
                                      meta.loss_level))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        pred = torch.empty(5, 4, dtype=torch.bfloat16)
        loss, grad = cuda._fused_fake(k.index, pred, [], None, 0.0, True)
        assert loss.shape == (5,) and loss.dtype == torch.float32
        assert grad.shape == (5, 4) and grad.dtype == torch.bfloat16
        _, nograd = cuda._fused_fake(k.index, pred, [], None, 0.0, False)
        assert nograd.shape == (0,)


# -- the driver glue, against a recording fake of cuda.bindings.driver -----------------------------

class FakeDriver:
    """Records calls; contexts are ints (device i's primary context is 100 + i)."""

    def __init__(self, current: int):
        self.current, self.calls, self.fail = current, [], None

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            if name == self.fail:
                from cuda.bindings.driver import CUresult
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            return {"cuDeviceGet": lambda i: (0, i),
                    "cuDevicePrimaryCtxRetain": lambda d: (0, 100 + d),
                    "cuCtxGetCurrent": lambda: (0, self.current),
                    "cuCtxPopCurrent": lambda: (0, 0), "cuModuleLoadData": lambda im: (0, "mod"),
                    "cuModuleGetFunction": lambda m, n: (0, f"fn:{n.decode()}"),
                    "cuOccupancyMaxActiveBlocksPerMultiprocessor": lambda f, b, s: (0, 6),
                    "CUstream": lambda h: h}.get(name, lambda *a: (0,))(*args)
        return call


@pytest.mark.skipif(NO_NVRTC is not None, reason="needs cuda-bindings")
def test_driver_glue_pushes_the_device_context_and_uses_torchs_stream(monkeypatch):
    from types import SimpleNamespace

    from lossgraph.backends import cudadrv
    fake = FakeDriver(current=100)            # device 0's context is current; we run on device 1
    monkeypatch.setattr(cudadrv, "_driver", lambda: fake)
    cudadrv.primary_context.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(cudadrv, "_raw_stream", lambda index: 777)
    try:
        mod = cudadrv.Module(b"cubin", 1)
        assert mod.max_blocks("k", 256) == 6 * 132
        mod.launch("k", 5, 256, [123, 7, 2.5], ("ptr", "int", "f64"))
        names = [n for n, _ in fake.calls]
        assert names[names.index("cuModuleLoadData") - 1] == "cuCtxPushCurrent"
        assert names[names.index("cuModuleLoadData") + 1] == "cuCtxPopCurrent"
        args = dict(fake.calls)["cuLaunchKernel"]
        assert args[:9] == ("fn:k", 5, 1, 1, 256, 1, 1, 0, 777)
        import ctypes
        slots = ctypes.cast(args[9], ctypes.POINTER(ctypes.c_void_p))   # the packed void**
        assert ctypes.c_void_p.from_address(slots[0]).value == 123
        assert ctypes.c_int.from_address(slots[1]).value == 7
        assert ctypes.c_double.from_address(slots[2]).value == 2.5
        assert names[-1] == "cuCtxPopCurrent" and names[-3] == "cuCtxPushCurrent"
        fake.current, fake.calls = 101, []      # device 1 current: no push, no pop
        mod.launch("k", 1, 256, [0], ("ptr",))
        assert [n for n, _ in fake.calls] == ["cuCtxGetCurrent", "cuLaunchKernel"]
        fake.calls = []
        mod.launch("k", 1, 256, [0], ("ptr",))   # the bound launch is reused
        assert [n for n, _ in fake.calls] == ["cuCtxGetCurrent", "cuLaunchKernel"]
        fake.fail = "cuLaunchKernel"
        with pytest.raises(BackendError, match="launching k failed: CUDA_ERROR_INVALID_VALUE"):
            mod.launch("k", 1, 256, [0], ("ptr",))
    finally:
        cudadrv.primary_context.cache_clear()


@needs_nvrtc
def test_cubin_load_failure_falls_back_to_the_ptx_of_the_same_compile(tmp_path, monkeypatch):
    """A driver that refuses the cubin (say, older than NVRTC) gets the PTX shipped with it,
    with one warning; when the PTX fails too the BackendError reaches the compiler."""
    from types import SimpleNamespace

    from lossgraph.backends import cudadrv
    fake = FakeDriver(current=100)
    loaded = []

    def load(image):
        loaded.append(image[:4])
        if image.startswith(b"\x7fELF") or fake.fail == "ptx":
            from cuda.bindings.driver import CUresult
            return (CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION,)
        return (0, "mod")
    fake.cuModuleLoadData = load
    monkeypatch.setattr(cudadrv, "_driver", lambda: fake)
    cudadrv.primary_context.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    monkeypatch.setattr(cuda, "_WARNED", {})
    cfg = dict(type="L1Loss")
    src, meta = _source(cfg, _variant(cfg))
    try:
        k = cuda.CudaKernel(meta.fn_name, src, tmp_path, cuda.launch_info(src), "mean",
                            meta.loss_level)
        with pytest.warns(UserWarning, match="sm_80 cubin .* failed .*compute_80 PTX"):
            k.launcher(torch.device("cuda", 0))
        assert loaded[0] == b"\x7fELF" and loaded[1] != b"\x7fELF"
        assert (tmp_path / f"{meta.fn_name}.compute_80.ptx").read_bytes() == k.images["compute_80"]
        fake.fail = "ptx"
        k2 = cuda.CudaKernel(meta.fn_name, src, tmp_path, cuda.launch_info(src), "mean",
                             meta.loss_level)
        with pytest.raises(BackendError, match="cuModuleLoadData failed"):
            k2.launcher(torch.device("cuda", 0))
    finally:
        cudadrv.primary_context.cache_clear()
