"""The CUDA kernels executed on the host by a small CUDA emulator (tests/emu, cuda_emulator.py).

Without a GPU this is what checks the CUDA skeleton itself: the grid-stride loops and their 64-bit
row division, the warp-per-row reductions, the gathers and the one-hot split, the per-block
partials and the ordered combine, the epilogue, fp16/bf16 loads and stores, the grad_output
scaling kernel, and the backend's own launch planning (cuda.prepare, cuda.fused). The element math
is the cpp twin's (test_cuda_compile.py checks the statements are the same text); here the CUDA
kernel's results are compared with the cpp backend's on the same call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import warnings

import pytest
import torch

import lossgraph as lg
from lossgraph import codegen
from lossgraph.backends import cuda
from lossgraph.build import Variant
from lossgraph.losses import pipeline

from conftest import _backend_available
from cuda_emulator import Emulator, _build, compiler

# g++ builds an emulator per kernel: the slow job runs these
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(compiler() is None or not _backend_available("cpp"),
                                 reason="the CUDA emulator needs g++ (and the cpp twin)")]

TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def emulated(cfg: dict, pred: torch.Tensor, *args, max_blocks: int = 3, **kwargs):
    """(cuda kernel outputs, cpp kernel outputs, kernel) for one call of a loss config."""
    m = lg.compile(cfg, backend="cpp")
    calls = []
    launch = m._launch
    m._launch = lambda call, level: (calls.append(call), launch(call, level))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(pred.detach().clone().requires_grad_(True), *args, **kwargs)
    call, cv = calls[-1], m._last
    want = cv.run(call)
    v = dataclasses.replace(cv.meta.variant, device="cuda")
    src, meta, _ = m.compiler.generate(v, "cuda")
    kern = cuda.CudaKernel(meta.fn_name, src, None, cuda.launch_info(src), v.reduction,
                           meta.loss_level)
    kern.launcher = Emulator(src, max_blocks)
    got = run_kernel(kern, call, v)
    return got, want, kern, call, v


def run_kernel(kern, call, v: Variant, **kw):
    pred, inputs = cuda.prepare(call, kern)
    pred = pred.detach()
    d = call.denom
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    denom = d.reshape(()).to(compute) if isinstance(d, torch.Tensor) else None   # host memory
    loss, grad = cuda.fused(kern, pred, inputs, denom, 0.0 if denom is not None else float(d or 0),
                            v.grad, **kw)
    return loss, (grad.reshape(call.pred.shape) if grad is not None else None)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str):
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN at different places"
    inf = torch.isinf(b)
    assert torch.equal(a[inf], b[inf]), f"{what}: infinities differ"
    ok = ~(torch.isnan(b) | inf)
    scale = max(b[ok].abs().max().item(), 1e-30) if ok.any() else 1.0
    err = ((a - b)[ok].abs().max().item() if ok.any() else 0.0) / scale
    assert err <= TOL[dtype], f"{what}: max |cuda - cpp| / max |cpp| = {err:.3g}"


def check(cfg, pred, *args, **kwargs):
    (loss, grad), (want_loss, want_grad), kern, call, v = emulated(cfg, pred, *args, **kwargs)
    assert grad is not None and grad.dtype == pred.dtype
    assert_close(loss, want_loss, pred.dtype, "loss")
    assert_close(grad, want_grad, pred.dtype, "grad")
    return kern, call, v


N, C = 1500, 7
gen = torch.Generator().manual_seed(0)


def logits(n=N, c=C, scale=4.0, dtype=torch.float32):
    return (torch.randn(n, c, generator=gen) * scale).to(dtype)


def labels(n=N, c=C, lo=0):
    return torch.randint(lo, c + 1, (n,), generator=gen)


def rand(*shape):
    return torch.rand(*shape, generator=gen)


# -- parity with the cpp twin ----------------------------------------------------------------------

def test_focal_labels_row_weight_tensor_avg_factor():
    """'elem' schedule with a row division, the one-hot split, a device-scalar denominator."""
    kern, _, _ = check(dict(type="FocalLoss"), logits(), labels(), weight=rand(N),
                       avg_factor=torch.tensor(37.0))
    assert kern.launch["schedule"] == "elem" and kern.launch["accumulate"]


def test_focal_options_elem_weight_float_avg_factor_extreme_logits():
    x = logits()
    x[:40] = 50.0 * torch.sign(torch.randn(40, C, generator=gen))
    check(dict(type="FocalLoss", gamma=1.5, alpha=0.4, loss_weight=2.0), x, labels(),
          weight=rand(N * C), avg_factor=123.5)


def test_focal_dense_target_none_is_flat_and_stores():
    kern, _, _ = check(dict(type="FocalLoss", reduction="none"), logits(),
                       (rand(N, C) > 0.8).float())
    assert not kern.launch["accumulate"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_half_precision_is_finite_where_mmcv_is_nan(dtype):
    """mmcv's op gives NaN in fp16 from |x| ~ 9 (its FLT_MIN clamp rounds to 0): fp32 math here."""
    x = torch.where(rand(N, C) > 0.5, 20.0, -20.0) * torch.sign(torch.randn(N, C, generator=gen))
    (loss, grad), *_ = emulated(dict(type="FocalLoss"), x.to(dtype), labels(), weight=rand(N))
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    check(dict(type="FocalLoss"), logits(dtype=dtype), labels(), weight=rand(N),
          avg_factor=torch.tensor(11.0))


def test_softmax_cross_entropy_rows_schedule_gather_table():
    """'rows' schedule: warp max and sum, the label gather, class_weight compiled in."""
    y = labels(c=C - 1)
    y[::17] = 2   # the ignore_index
    kern, _, _ = check(dict(type="CrossEntropyLoss", class_weight=[0.5 + i for i in range(C)],
                            ignore_index=2, avg_non_ignore=True), logits(), y, weight=rand(N))
    assert kern.launch["schedule"] == "rows" and kern.launch["tables"] == {"class_weight": C}


def test_softmax_cross_entropy_none_stores_rows():
    x = logits(n=300, c=40)
    x[3, 5] = float("nan")
    x[4] = float("-inf")
    x[4, 1] = 0.0
    kern, _, _ = check(dict(type="CrossEntropyLoss", reduction="none"), x, labels(300, 39))
    assert kern.loss_shape(300, 40) == (300,)



@pytest.mark.parametrize("n,c,scale,dtype", [
    (300, 3, 4.0, torch.float32),       # 1 lane per row
    (257, 17, 4.0, torch.float32),      # 8 lanes per row (DFL's bins)
    (200, 81, 1e4, torch.float32),      # 32 lanes, huge logits: max-shifted
    (100, 128, 30.0, torch.float16),    # the largest short row
    (90, 129, 30.0, torch.bfloat16),    # the smallest long row: a warp's k-loops
    (40, 700, 1e4, torch.float64),
])
def test_softmax_cross_entropy_row_groups(n, c, scale, dtype):
    """Note [Row groups]: lanes per row from K, slots clamped past K, rows past R skipped."""
    x = logits(n, c, scale=scale, dtype=dtype)
    kern, _, _ = check(dict(type="CrossEntropyLoss"), x, labels(n, c - 1), weight=rand(n),
                       max_blocks=2)
    assert kern.launch["schedule"] == "rows"


@pytest.mark.parametrize("c", [17, 200])
def test_row_losses_dfl_and_knowledge_distillation(c):
    """Several row passes (KD: two maxima, two sums, a third pass of sums) in registers."""
    check(dict(type="KnowledgeDistillationKLDivLoss", T=10), logits(300, c, scale=30.0),
          logits(300, c, scale=30.0))
    if c == 17:
        check(dict(type="DistributionFocalLoss"), logits(300, c), rand(300) * 15.99)


@pytest.mark.parametrize("name", ["ce", "dfl", "kd"])
def test_huge_logit_rows_are_as_exact_as_torch(name):
    """test_rows' huge-logit bound (Note [As exact as torch]) on the CUDA kernel, strictly (no
    floor) as on cpp: row values in double (Note [Row values on CUDA] in cudarows); its warp
    reductions sum in another order than the cpp loops, so the bound is checked here too."""
    from test_rows import SCALES, _as_exact, _big_rows, _case, _eager_grad, _rel
    for scale in SCALES:
        x = _big_rows(scale)
        config, fn, args = _case(name, x)
        (loss, grad), _, _, _, _ = emulated(config, x, *args)
        ref, ref_g = _eager_grad(fn, x.double(), *(a.double() if a.is_floating_point() else a
                                                   for a in args))
        t32, t32_g = _eager_grad(fn, x, *args)
        assert _as_exact(_rel(loss, ref), _rel(t32, ref)), (name, scale)
        assert _as_exact(_rel(grad, ref_g), _rel(t32_g, ref_g)), (name, scale)


@pytest.mark.parametrize("name,k", [("ce", 4), ("dfl", 4), ("kd", 4), ("ce", 200), ("kd", 200)])
def test_inf_and_nan_rows_match_torch(name, k):
    """test_rows' +-inf and NaN rows on both row shapes (k = 200 pads them with zeros): the label
    column picked by a select (Note [Row groups]) keeps torch's NaNs and drops none."""
    from test_rows import SPECIAL_ROWS, _case, _eager_grad
    x = torch.tensor(SPECIAL_ROWS)
    x = torch.cat([x, torch.zeros(x.shape[0], k - x.shape[1])], 1)
    config, fn, args = _case(name, x, seed=1)
    (loss, grad), _, _, _, _ = emulated(config, x, *args)
    ref, ref_g = _eager_grad(fn, x, *args)
    torch.testing.assert_close(loss, ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_g, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_seesaw_huge_logit_rows_are_as_exact_as_torch(monkeypatch):
    """test_rows' Seesaw bound on the CUDA kernel: no larger than the float32 eager reference's
    error, strictly (Note [As exact as torch]); a background row with NaN class logits gets no
    gradient."""
    import reference_stateful
    from test_rows import NAN, SCALES, _as_exact, _big_rows, _rel, _seesaw_ref
    monkeypatch.setattr(reference_stateful, "softmax_ce",
                        lambda z, y: torch.nn.functional.cross_entropy(z, y, reduction="none"))
    c = 6
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 1, 2, 6, 0])
    for scale in SCALES:
        x = _big_rows(scale, n=12, k=c + 2, seed=2)
        x[6, :c] = NAN
        cfg = dict(type="SeesawLoss", num_classes=c)
        (loss, grad), _, kern, _, _ = emulated(cfg, x, y)
        assert kern.launch["schedule"] == "rows"
        x64 = x.double()
        ref, ref_g = _seesaw_ref(cfg, x64 - x64[:, :c].amax(1, keepdim=True), y, torch.float64)
        t32, t32_g = _seesaw_ref(cfg, x, y, torch.float32)
        assert torch.equal(grad[6], torch.zeros(c + 2))
        assert _as_exact(_rel(loss, ref), _rel(t32, ref)), scale
        assert _as_exact(_rel(grad, ref_g), _rel(t32_g, ref_g)), scale


def test_sigmoid_cross_entropy_bf16_with_ignored_labels():
    check(dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="sum"),
          logits(dtype=torch.bfloat16), labels(lo=-1))


@pytest.mark.parametrize("cfg,dtype", [
    (dict(type="L1Loss", reduction="sum"), torch.float16),
    (dict(type="SmoothL1Loss", beta=0.11, reduction="none"), torch.bfloat16),
    (dict(type="MSELoss", loss_weight=2.0), torch.float32),
    (dict(type="BalancedL1Loss"), torch.float64),
])
def test_box_losses_flat(cfg, dtype):
    x, t = torch.randn(2000, 4, generator=gen), torch.randn(2000, 4, generator=gen)
    # the target in pred's dtype: a float32 target would promote pred first (mmdet's pred - target)
    check(cfg, x.to(dtype), t.to(dtype), weight=rand(2000, 4))


def test_gaussian_focal_float64():
    heat = rand(2, 3, 16, 16).clamp(1e-4, 1 - 1e-4).double()
    target = torch.where(rand(2, 3, 16, 16) > 0.95, 1.0, rand(2, 3, 16, 16)).double()
    check(dict(type="GaussianFocalLoss", pos_weight=0.25, neg_weight=0.75), heat, target)


def test_one_dimensional_pred_is_one_long_row():
    x = torch.randn(5000, generator=gen)
    check(dict(type="CrossEntropyLoss", use_sigmoid=True), x, (rand(5000) > 0.5).float())


# -- vector tiles (Note [Vector tiles]): one block, so the 4-vector tile loop, the single-vector
#    loop, the label's scalar path and the scalar tail all run --------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_vector_tiles_focal_labels(dtype):
    n, c = 130, 80
    x = logits(n, c, dtype=dtype)
    x[0, :8] = float("inf")
    x[1, :8] = float("nan")
    kern, _, _ = check(dict(type="FocalLoss"), x, labels(n, c), weight=rand(n), max_blocks=1)
    assert kern.launch["vec"] == (2 if dtype == torch.float64 else 16 // x.element_size())
    assert kern.launch["unroll"] == 4


def test_vector_tiles_none_and_dense_target_store_vectors():
    n, c = 90, 40
    check(dict(type="FocalLoss", reduction="none"), logits(n, c, dtype=torch.bfloat16),
          labels(n, c), max_blocks=1)
    check(dict(type="FocalLoss", reduction="none"), logits(n, c),
          (rand(n, c) > 0.8).float(), weight=rand(n * c), max_blocks=1)


def test_unaligned_inputs_take_the_scalar_path():
    """A pred view that is not 16-byte aligned runs the plain element code (no vector tiles)."""
    n, c = 64, 80
    base = torch.randn(n * c + 1, generator=gen) * 4
    x = base[1:].reshape(n, c)             # 4 bytes past an aligned start
    assert x.data_ptr() % 16 != 0
    (loss, grad), (wl, wg), kern, call, v = emulated(dict(type="FocalLoss"), x, labels(n, c),
                                                     max_blocks=1)
    pred, inputs = cuda.prepare(call, kern)
    assert "& 15u" in kern.source      # the kernel tests its pointers' alignment itself
    l2, g2 = run_kernel_unaligned(kern, x, inputs, call, v)
    assert_close(l2, wl, torch.float32, "loss")
    assert_close(g2, wg, torch.float32, "grad")


def run_kernel_unaligned(kern, x, inputs, call, v):
    loss, grad = cuda.fused(kern, x, inputs, None, float(call.denom or 0), v.grad)
    return loss, grad.reshape(call.pred.shape)


@pytest.mark.parametrize("cfg", [dict(type="GIoULoss"), dict(type="DIoULoss", reduction="none"),
                                 dict(type="IoULoss", mode="linear"),
                                 dict(type="CIoULoss")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_box_losses_one_thread_per_box(cfg, dtype):
    n = 1100
    xy = rand(n, 2) * 50
    box = torch.cat([xy, xy + 1 + rand(n, 2) * 30], 1)
    tgt = box + torch.randn(n, 4, generator=gen) * 3
    kern, _, _ = check(cfg, box.to(dtype), tgt.to(dtype), weight=rand(n), max_blocks=1)
    assert kern.launch["box"] and kern.launch["vec"] == 4


# -- the skeleton's own guarantees --------------------------------------------------------------

def test_bitwise_reproducible():
    (l1, g1), _, kern, call, v = emulated(dict(type="FocalLoss"), logits(), labels(),
                                          weight=rand(N))
    l2, g2 = run_kernel(kern, call, v)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_64_bit_row_division_path_agrees():
    """Above fast_limit the row is i / K in 64 bits (what N*C >= 2^31 uses); same bits."""
    (loss, grad), _, kern, call, v = emulated(dict(type="FocalLoss"), logits(), labels(),
                                              weight=rand(N))
    l2, g2 = run_kernel(kern, call, v, fast_limit=333)
    assert torch.equal(loss, l2) and torch.equal(grad, g2)


def test_grid_covers_every_element_and_row():
    """More elements than one sweep of the grid: every gradient entry is written."""
    for cfg, x, y in [(dict(type="FocalLoss"), logits(5000, 3), labels(5000, 3)),
                      (dict(type="CrossEntropyLoss"), logits(999, 33), labels(999, 32))]:
        (loss, grad), (wl, wg), kern, *_ = emulated(cfg, x, y, max_blocks=2)
        assert torch.isfinite(grad).all()
        assert_close(grad, wg, torch.float32, "grad")


def test_empty_input_gives_the_empty_mean():
    cfg = dict(type="MSELoss")
    m = lg.compile(cfg, backend="cpp")
    src, meta, _ = m.compiler.generate(Variant(device="cuda"), "cuda")
    kern = cuda.CudaKernel(meta.fn_name, src, None, cuda.launch_info(src), "mean", meta.loss_level)
    kern.launcher = Emulator(src)
    x = torch.empty(0, 4)
    loss, grad = cuda.fused(kern, x, [torch.empty(0, 4)], None, 0.0, True)
    assert torch.isnan(loss) and grad.shape == (0, 4)


# -- grad_output scaling ------------------------------------------------------------------

@pytest.fixture(scope="module")
def scaler():
    return Emulator(cuda.render_scale())


@pytest.mark.parametrize("gdtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("odtype", [torch.float32, torch.float16, torch.float64])
def test_scale_grad_matches_mul(scaler, gdtype, odtype):
    grad = torch.randn(3000, generator=gen).to(gdtype)
    for g in (2.5, -0.37, 1.0):
        go = torch.tensor(g, dtype=odtype)
        want = grad.clone().mul_(go.to(gdtype))
        got = cuda.scale_grad(None, grad.clone(), go, launcher=scaler)
        assert torch.equal(got, want), (g, gdtype, odtype)


# -- half and bfloat16 conversions of the prelude ----------------------------------------------

def _conversions():
    prelude = codegen.render("cuda/device.cuh.j2", block=256)
    from cuda_emulator import EMU
    text = prelude + """
extern "C" void lg_convert(const float* x, unsigned short* h, unsigned short* b, float* hf,
                           float* bf, long long n) {
  for (long long i = 0; i < n; i++) {
    h[i] = lg_float_to_half(x[i]); b[i] = lg_float_to_bf16(x[i]);
    hf[i] = lg_half_to_float(h[i]); bf[i] = lg_bf16_to_float(b[i]);
  }
}
"""
    from cuda_emulator import runtime
    runtime()
    return ctypes.CDLL(str(_build(text, ["-include", str(EMU / "cuda_emu.h"), "-x", "c++"])))


def test_half_and_bfloat16_conversions_round_like_torch():
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, 1e6, 2.0 ** -14, 2.0 ** -24,
               2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -26, 1e-8, 3.0e38, 1.0 + 2.0 ** -11,
               1.0 + 3 * 2.0 ** -11, float("inf"), float("-inf"), float("nan")]
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (200000,), generator=gen, dtype=torch.int64)
    x = torch.cat([torch.tensor(special), bits.to(torch.int32).view(torch.float32),
                   torch.randn(100000, generator=gen) * 1e3,
                   torch.randn(100000, generator=gen) * 1e-5])
    x = x.contiguous()
    n = x.numel()
    h, b = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    hf, bf = torch.empty(n), torch.empty(n)
    lib = _conversions()
    lib.lg_convert(*(ctypes.c_void_p(t.data_ptr()) for t in (x, h, b, hf, bf)),
                   ctypes.c_longlong(n))
    for got_bits, got_f, dt in ((h, hf, torch.float16), (b, bf, torch.bfloat16)):
        want = x.to(dt)
        nan = torch.isnan(x)
        assert torch.isnan(got_bits.view(dt)[nan]).all() and torch.isnan(got_f[nan]).all()
        assert torch.equal(got_bits[~nan], want.view(torch.int16)[~nan]), dt
        assert torch.equal(got_f[~nan], want.float()[~nan]), dt


# -- torch.compile: the custom op and its fake --------------------------------------------------

def test_custom_op_under_torch_compile(monkeypatch):
    """The launch op traces with fullgraph=True through AOTAutograd (its fake gives the shapes);
    a CPU kernel backed by the emulator stands in for the GPU."""
    (_, _), _, kern, call, v = emulated(dict(type="FocalLoss"), logits(64, 5), labels(64, 5))
    cuda.register(kern)
    lib = torch.library.Library("lossgraph", "IMPL")   # noqa: F841 - keeps the CPU kernel alive

    def cpu_kernel(kernel, pred, inputs, denom, denom_value, grad):
        loss, g = cuda.fused(cuda.KERNELS[kernel], pred, inputs, denom, denom_value, grad)
        return loss, g if g is not None else pred.new_empty((0,))
    lib.impl("cuda_fused", cpu_kernel, "CPU")
    pred, inputs = cuda.prepare(call, kern)
    pred = pred.detach()      # prepare leaves autograd alone; the traced path detaches

    def f(p, y):
        loss, grad = torch.ops.lossgraph.cuda_fused(kern.index, p, [y], None, float(call.denom),
                                                    True)
        return loss * 2, grad.sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(pred, inputs[0])
    want = f(pred, inputs[0])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- the whole runtime path, with the emulator standing in for the device -------------------------

@pytest.fixture
def emulated_gpu(monkeypatch):
    """backend='cuda' runs CPU tensors: NVRTC still compiles (sm_80), the emulator launches."""
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device="cuda": None)
    monkeypatch.setattr(cuda, "device_target", lambda index=None: "sm_80")
    emulators = {}

    def launcher(self, device):
        if self.name not in emulators:
            emulators[self.name] = Emulator(self.source)
        return emulators[self.name]
    monkeypatch.setattr(cuda.CudaKernel, "launcher", launcher)
    return emulators


def test_compiled_loss_end_to_end(emulated_gpu):
    """lg.compile(cfg, backend='cuda') on CPU tensors, the GPU replaced by the emulator: load
    (NVRTC for sm_80 included), run, and backward through the runtime's scale_grad hook."""
    emulators = emulated_gpu
    cfg = dict(type="FocalLoss", loss_weight=0.5)
    x, y, w = logits(), labels(), rand(N)
    avg = torch.tensor(40.0)
    results = []
    for backend in ("cuda", "cpp"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = lg.compile(cfg, backend=backend)
            p = x.clone().requires_grad_(True)
            (loss(p, y, weight=w, avg_factor=avg) * 2.5).backward()
            q = x.clone().requires_grad_(True)
            out = loss(q, y, weight=w, avg_factor=avg)
            out.backward()
        assert loss.compiler.backend_for("cpu") == backend
        results.append((out.detach(), p.grad, q.grad))
    (o1, p1, q1), (o2, p2, q2) = results
    assert_close(o1, o2, torch.float32, "loss")
    assert_close(p1, p2, torch.float32, "grad * 2.5")
    assert_close(q1, q2, torch.float32, "grad")
    assert any(name.startswith("lg_scale") for name in emulators), "scale_grad was not used"


# -- no host sync: the v3 zero-weight exits are selected on the device --------------------------

def _no_sync(monkeypatch):
    """Every way a tensor reaches the host (item, bool, float, int, tolist) raises, and so does
    the host-side any(weight > 0) (on CPU tensors it is native code, not Tensor.__bool__)."""
    def refuse(*a, **kw):
        raise AssertionError("host sync: a tensor was read on the host during the call")
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(pipeline, "_any_positive", refuse)


@pytest.mark.parametrize("cfg,weight", [
    (dict(type="L1Loss"), "elem"), (dict(type="SmoothL1Loss", beta=0.5), "elem"),
    (dict(type="IoULoss"), "row"), (dict(type="GIoULoss", reduction="sum"), "row")])
def test_zero_weight_exits_make_no_host_sync(emulated_gpu, monkeypatch, cfg, weight):
    """Weighted L1/SmoothL1/IoU/GIoU on the CUDA path: no tensor is read on the host, and the
    result (and gradient) is the normal loss, or MMDetection's (pred * weight).sum() when no
    weight is positive, exactly as the cpp backend's host-side exit gives."""
    n = 300
    xy = rand(n, 2) * 20
    pred = torch.cat([xy, xy + 1 + rand(n, 2) * 10], 1)
    tgt = pred + torch.randn(n, 4, generator=gen)
    shape = (n, 4) if weight == "elem" else (n,)
    pred[7, 1] = float("nan")   # the exit's gradient is weight = 0 there (Note [Gated exit
    pred[9, 2] = float("inf")   # gradient]), the loss NaN, as MMDetection's (pred * w).sum()
    for w in (rand(*shape), torch.zeros(shape), -rand(*shape)):
        got, want = [], []
        for backend, out in (("cuda", got), ("cpp", want)):
            loss = lg.compile(cfg, backend=backend)
            p = pred.clone().requires_grad_(True)
            if backend == "cuda":   # build the kernel first: constant folding at build time
                loss(p, tgt, weight=w)   # reads host values; only the call itself must not
            with monkeypatch.context() as m:
                if backend == "cuda":
                    _no_sync(m)
                value = loss(p, tgt, weight=w)
            value.backward()
            out += [value.detach(), p.grad]
        assert got[0].shape == want[0].shape == ()
        assert_close(got[0], want[0], torch.float32, "loss")
        assert_close(got[1], want[1], torch.float32, "grad")


def test_zero_weight_exit_none_reduction_keeps_the_host_check(emulated_gpu):
    """'none' with an all-zero weight returns a scalar (the early exit changes the shape)."""
    loss = lg.compile(dict(type="L1Loss", reduction="none"), backend="cuda")
    x = torch.randn(50, 4, generator=gen)
    assert loss(x, x + 1, weight=torch.zeros(50, 4)).shape == ()
    assert loss(x, x + 1, weight=torch.ones(50, 4)).shape == (50, 4)


# -- float16 / bfloat16 under a loss scale (Note [Loss scaling on CUDA]) --------------------------

@pytest.mark.parametrize("scale, avg", [(32768.0, None), (65536.0, "tensor")])
def test_fp16_loss_scaling_flushes_no_more_than_eager(emulated_gpu, scale, avg):
    """test_fast_path's check on the CUDA kernels: the backward's rescale kernel multiplies the
    float gradient by the loss scale before rounding, so no more gradient elements are flushed to
    zero than MMDetection's eager float16 backward flushes, and far fewer than rounding first."""
    from test_fast_path import check_fp16_loss_scaling
    check_fp16_loss_scaling("cuda", scale, avg)
    assert any(name.endswith("_rescale") for e in emulated_gpu.values()
               for name, _, _ in e.launches)


@pytest.mark.parametrize("cfg,dtype", [(dict(type="CrossEntropyLoss"), torch.float16),
                                       (dict(type="FocalLoss"), torch.bfloat16)])
def test_loss_scaled_backward_matches_cpp(emulated_gpu, cfg, dtype):
    """The rescale kernel (rows and elem schedules) gives the cpp backend's float32 gradient times
    the scale, rounded once; grad_output == 1 leaves the forward's gradient; an in-place edit of
    pred after the forward falls back to scaling the forward's gradient."""
    x, y = logits(300, 20, dtype=dtype), labels(300, 19)
    grads = {}
    for backend in ("cuda", "cpp"):
        loss = lg.compile(cfg, backend=backend)
        p = x.clone().requires_grad_(True)
        out = loss(p, y, avg_factor=torch.tensor(5000.0))
        grads[backend] = [torch.autograd.grad(out, p, torch.tensor(s), retain_graph=True)[0]
                          for s in (1.0, 1024.0, 3.0)]
    for got, want in zip(grads["cuda"], grads["cpp"]):
        assert_close(got, want, dtype, "scaled grad")
    loss = lg.compile(cfg, backend="cuda")
    p = x.clone().requires_grad_(True)
    pred = p * 1
    out = loss(pred, y, avg_factor=torch.tensor(5000.0))
    with torch.no_grad():
        pred.mul_(1)   # an in-place write after the forward: the rescale would read it
    emulated_gpu.pop("lg_scale", None)
    got = torch.autograd.grad(out, p, torch.tensor(3.0))[0]
    assert emulated_gpu["lg_scale"].launches, "the fallback scales the forward's gradient"
    assert_close(got, grads["cpp"][2], dtype, "scaled grad after an in-place write")
