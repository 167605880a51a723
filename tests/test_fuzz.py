"""Fuzzing: random configs x random inputs against the float64 references, and random expression
programs (through register_loss) against the reference interpreter, on every CPU backend.

Compiling dominates the cost, so each fuzzer draws its kernels from a modest pool (a few configs,
a few call plans that fix the kernel variant: dtype, reduction, weight layout, avg_factor kind)
and varies the inputs a lot: row counts (0 and 1 included), class counts, scales, extreme and
tied values, zero weights, avg_factor values, non-contiguous views. Everything is seeded; a
failure names its case, and `LOSSGRAPH_FUZZ_CASE=<fuzzer>:<seed>:<index>` reruns only that one:

    LOSSGRAPH_FUZZ_CASE=builtin:0:137 pytest tests/test_fuzz.py -k builtin

The default suite runs 2000 cases; `pytest -m fuzz tests/test_fuzz.py` runs 16800 more (other
seeds, every call plan). A run reports every failing case, not only the first.

Note [Fuzz counts]: the long sweep (`python -m pytest -q -n 0 -m fuzz tests/test_fuzz.py`,
12000 built-in cases and 4800 programs, 2 min 52 s on 2 busy cores) had 65 failing cases in
an earlier run, before fixes now on main; since then it has 0 failures of 16800, both before
and after the KD/Seesaw shift and GIoU joining the non-finite cases.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import lossgraph as lg
from lossgraph import reference
from lossgraph.build import Variant, build
from lossgraph.config import parse
from conftest import BACKENDS, assert_close, check_case, compiled
from reference_losses import reference as mmdet_reference, weight_reduce_loss
from reference_zoo import zoo_reference

ONLY = os.environ.get("LOSSGRAPH_FUZZ_CASE")   # '<fuzzer>:<seed>:<index>'


@pytest.fixture(autouse=True)
def one_thread():
    """The inputs are tiny: one intra-op thread. (Two threads on a busy machine make torch's
    float64 log_sigmoid take 20 ms a call, which was a third of this module's time.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _wanted(fuzzer: str, seed: int, i: int) -> bool:
    return ONLY is None or ONLY == f"{fuzzer}:{seed}:{i}"


def _describe(fuzzer: str, seed: int, i: int, what: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[:2]
    return (f"fuzz case {fuzzer}:{seed}:{i} failed: {what}\n  {type(err).__name__}: "
            f"{' / '.join(first)}\n  rerun it alone: LOSSGRAPH_FUZZ_CASE={fuzzer}:{seed}:{i} "
            f"pytest tests/test_fuzz.py -m 'fuzz or not fuzz' -k {fuzzer}")


def _report(fuzzer: str, done: int, failures: list[str]) -> None:
    """Fail with every failing case (the first 20 in full), or pass quietly."""
    if failures:
        raise AssertionError(f"{len(failures)} of {done} {fuzzer} fuzz cases failed:\n" +
                             "\n".join(failures[:20]))


def _gen(*key) -> tuple[random.Random, torch.Generator]:
    s = sum((k + 1) * ord(c) for k, c in enumerate(repr(key)))
    return random.Random(s), torch.Generator().manual_seed(s)


# -- random inputs ---------------------------------------------------------------------------------

def logits(r: random.Random, g: torch.Generator, n: int, c: int, dtype) -> torch.Tensor:
    """Logits at a random scale, with a few extreme values and exact ties now and then.

    Note [Extreme logits in the fuzzer]: MMDetection's sigmoid BCE (torch's formula, which the
    kernels reproduce) is 0 for a confident negative (x = -40, t = 0: the exact value is 4e-18),
    and the float64 references compute it exactly. Tolerances are relative to the largest
    reference value, so extreme values stay out of row 0 and weights keep row 0: the loss always
    has an ordinary row to be measured against (a softmax row with a +17 logit is confident:
    its loss and gradient are 1e-7, computed by cancellation both here and in the reference)."""
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * r.choice([0.5, 2.0, 6.0])
    if n:
        x[0] = x[0].clamp(-3.0, 3.0)   # row 0 stays ordinary, even at scale 6
    if n > 1 and r.random() < 0.4:
        k = max(1, x.numel() // 8)
        idx = torch.randint(c, x.numel(), (k,), generator=g)
        x.view(-1)[idx] = torch.tensor([r.choice([-40.0, -17.0, 0.0, 17.0, 40.0])
                                        for _ in range(k)], dtype=torch.float64)
    return x.to(dtype)


def strided(r: random.Random, t: torch.Tensor) -> torch.Tensor:
    """The same values, sometimes as a non-contiguous view (a column slice or a transpose)."""
    if t.dim() != 2 or r.random() < 0.5:
        return t
    if r.random() < 0.5:
        wide = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.t().contiguous().t()


def boxes(g: torch.Generator, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Target boxes and predictions around them, on a 1/16 grid (ties and degenerate boxes)."""
    xy = torch.floor(torch.rand(n, 2, generator=g) * 160) / 16
    t = torch.cat([xy, xy + torch.floor(torch.rand(n, 2, generator=g) * 80 + 1) / 16], 1)
    p = t + torch.floor(torch.randn(n, 4, generator=g) * 16) / 16
    if n:   # an ordinary overlapping pair in row 0 (Note [Extreme logits in the fuzzer])
        p[0] = t[0] + torch.tensor([0.125, -0.0625, 0.25, 0.0625])
    return p.to(dtype), t.to(dtype)


def labels(g, n, hi) -> torch.Tensor:
    return torch.randint(0, hi + 1, (n,), generator=g)


# -- the built-in losses ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A config with its input maker: make(r, g, n, c, dtype) -> (pred, target, weight_shape)."""

    cfg: dict
    make: Callable
    ref: Callable = mmdet_reference
    classes: tuple = (1, 2, 5, 9)
    nonfinite: bool = False   # NaN/inf in pred (where the reference is MMDetection's there too)


def _cls(r, g, n, c, dt, hi):
    return logits(r, g, n, c, dt), labels(g, n, hi(c)), "row"


def _dense(r, g, n, c, dt, tgt):
    return logits(r, g, n, c, dt), tgt(g, n, c).to(dt), "elem"


def _soft(g, n, c):
    t = torch.rand(n, c, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(n, c, generator=g) < 0.6, torch.zeros(()), t)


def _heat(g, n, c):
    t = torch.rand(n, c, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(n, c, generator=g) < 0.2, torch.ones(()), t)


def _prob(r, g, n, c, dt):
    p = torch.sigmoid(logits(r, g, n, c, torch.float64)).clamp(1e-4, 1 - 1e-4)
    return p.to(dt), _heat(g, n, c).to(dt), "elem"


def _reg(r, g, n, c, dt):
    s = r.choice([0.05, 1.0, 30.0])
    p = torch.randn(n, 4, generator=g, dtype=torch.float64) * s
    t = torch.where(torch.rand(n, 4, generator=g) < 0.2, p, torch.randn(n, 4, generator=g,
                                                                        dtype=torch.float64) * s)
    return p.to(dt), t.to(dt), "elem"


def _box(r, g, n, c, dt):
    p, t = boxes(g, n, dt)
    return p, t, "row"


def _qfl(r, g, n, c, dt):
    return logits(r, g, n, c, dt), (labels(g, n, c), torch.rand(n, generator=g).to(dt)), "row"


def _dfl(r, g, n, c, dt):
    t = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (c - 1) * 8) / 8
    return logits(r, g, n, c, dt), t.to(dt), "row"


CASES = [
    Case(dict(type="FocalLoss"), lambda r, g, n, c, dt: _cls(r, g, n, c, dt, lambda c: c)),
    Case(dict(type="FocalLoss", gamma=1.5, alpha=0.6, loss_weight=0.7),
         lambda r, g, n, c, dt: _dense(r, g, n, c, dt, _soft)),
    Case(dict(type="CrossEntropyLoss"), lambda r, g, n, c, dt: _cls(r, g, n, c, dt, lambda c: c - 1),
         classes=(1, 3, 8)),
    Case(dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=2.0),
         lambda r, g, n, c, dt: _cls(r, g, n, c, dt, lambda c: c)),
    Case(dict(type="VarifocalLoss"), lambda r, g, n, c, dt: _dense(r, g, n, c, dt, _soft)),
    Case(dict(type="GaussianFocalLoss"), _prob, nonfinite=True),
    Case(dict(type="L1Loss"), _reg, nonfinite=True),
    Case(dict(type="SmoothL1Loss", beta=0.3, loss_weight=3.0), _reg, nonfinite=True),
    Case(dict(type="MSELoss"), _reg, nonfinite=True),
    Case(dict(type="BalancedL1Loss"), _reg, nonfinite=True),
    Case(dict(type="GIoULoss"), _box, zoo_reference, nonfinite=True),
    Case(dict(type="CIoULoss"), _box, zoo_reference, nonfinite=True),
    Case(dict(type="QualityFocalLoss"), _qfl, zoo_reference, classes=(2, 5, 9)),
    Case(dict(type="DistributionFocalLoss"), _dfl, zoo_reference, classes=(2, 5, 17)),
]
# Call plans: (dtype, reduction_override, weight?, avg_factor kind); each fixes a kernel variant.
# A run gives each (config, backend) one plan, by seed, so that it compiles few kernels.
PLANS = [(torch.float64, "none", True, None), (torch.float32, "mean", True, "tensor"),
         (torch.float64, None, False, "float"), (torch.float32, "sum", True, None)]
ROWS = (0, 1, 2, 3, 7, 40)
# Note [Non-finite inputs in the fuzzer]: a NaN or an infinity goes into pred (outside row 0) for
# the losses whose float64 reference computes MMDetection's own non-finite results. Elsewhere
# the references use more stable formulas than MMDetection's torch calls (FocalLoss at x = -inf:
# torch's BCE gives NaN, the reference inf; the softmax references' logsumexp is not torch's at
# +-inf), so a non-finite pred there would test the reference, not the kernel. GIoU joined once
# its reference took bbox_overlaps' max(union, eps) instead of a clamp (reference_zoo.overlaps).
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def builtin_case(seed: int, i: int):
    """The i-th built-in case: (backend, Case, call description, check_case arguments)."""
    r, g = _gen("builtin", seed, i)
    j = i % len(CASES)
    case = CASES[j]
    b = (i // len(CASES)) % len(BACKENDS)
    backend = BACKENDS[b]
    dtype, red, weighted, avg = PLANS[(seed + j + b) % len(PLANS)]
    n, c = r.choice(ROWS), r.choice(case.classes)
    pred, target, wform = case.make(r, g, n, c, dtype)
    kwargs = {}
    if red is not None:
        kwargs["reduction_override"] = red
    if weighted:
        shape = (n,) if wform == "row" else (n, pred.shape[-1])
        w = torch.rand(shape, generator=g, dtype=torch.float64)
        w = torch.where(torch.rand(shape, generator=g) < 0.3, torch.zeros(()), w)
        if n:
            w[0] = 0.5    # Note [Extreme logits in the fuzzer]
        w = w.to(dtype)
        kwargs["weight"] = strided(r, w)
    if avg is not None and red in ("mean", None):
        value = r.choice([0.5, 3.0, 117.0])
        kwargs["avg_factor"] = torch.tensor(value) if avg == "tensor" else value
    if case.nonfinite and n > 1 and r.random() < 0.3:   # Note [Non-finite inputs in the fuzzer]
        pred = pred.clone()
        pred.view(-1)[r.randrange(pred.shape[-1], pred.numel())] = r.choice(NONFINITE)
    pred = strided(r, pred)
    what = (f"backend={backend} cfg={case.cfg} pred {tuple(pred.shape)} {dtype} "
            f"contiguous={pred.is_contiguous()} kwargs={ {k: v if not isinstance(v, torch.Tensor) else tuple(v.shape) for k, v in kwargs.items()} }")
    return backend, case, what, pred, target, kwargs


def run_builtin(seed: int, count: int, failures: list) -> int:
    done = 0
    for i in range(count):
        if not _wanted("builtin", seed, i):
            continue
        backend, case, what, pred, target, kwargs = builtin_case(seed, i)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the IoU family's empty-target notices
                check_case(compiled(case.cfg, backend), case.cfg, pred, target,
                           reference_fn=case.ref, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure is reported with its case
            failures.append(_describe("builtin", seed, i, what, e))
        done += 1
    return done


def test_fuzz_builtin_losses():
    """MMDetection's numbers for random inputs to the built-in losses, on every CPU backend."""
    failures: list[str] = []
    done = run_builtin(0, 1200, failures)
    assert done > 0
    _report("builtin", done, failures)


@pytest.mark.fuzz
def test_fuzz_builtin_losses_long():
    failures: list[str] = []
    n = sum(run_builtin(seed, 2000, failures) for seed in (1, 2, 3, 4, 5, 6))
    print(f"builtin fuzz cases: {n}, failed: {len(failures)}")
    _report("builtin", n, failures)


# -- random expression programs ----------------------------------------------------------------------

UNARY = {
    "abs": (lg.abs, torch.abs), "sigmoid": (lg.sigmoid, torch.sigmoid),
    "tanh": (lg.tanh, torch.tanh), "atan": (lg.atan, torch.atan),
    "sin": (lg.sin, torch.sin), "cos": (lg.cos, torch.cos),
    "softplus": (lg.softplus, None), "logsigmoid": (lg.logsigmoid, None),
    "expneg": (lambda x: lg.exp(-lg.abs(x)), None), "sqrt1": (lambda x: lg.sqrt(x * x + 1.0), None),
    "log1p2": (lambda x: lg.log1p(x * x), None), "floor": (lg.floor, None),
    "sign": (lg.sign, None), "stopgrad": (lg.stop_gradient, None),
    "asin": (lambda x: lg.asin(lg.tanh(x) * 0.9), None), "square": (lambda x: x ** 2, None),
    "rowsum": (lg.rowsum, None), "rowmax": (lg.rowmax, None), "lse": (lg.logsumexp, None),
    "rowmean": (lg.rowmean, None),
}
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (1.0 + b * b), "min": lg.minimum, "max": lg.maximum,
    "where": lambda a, b: lg.where(a < b, a * 0.5, b - a),
    "clamp": lambda a, b: lg.clamp(a, -1.5, 0.5) + b,
    "powk": lambda a, b: (lg.abs(a) + 0.5) ** 1.5 * b,
}


def random_program(r: random.Random, depth: int, const: bool = False, root: bool = True):
    """A random expression tree over pred, target and constants (a nested tuple); `const`
    allows a constant leaf here (lg ops need one symbolic argument, so a sibling has none)."""
    if depth == 0 or (not root and r.random() < 0.25):
        leaves = ["pred", "pred", "target"] + [("const", round(r.uniform(-2, 2), 3))] * const
        return r.choice(leaves)
    if r.random() < 0.4:
        return (r.choice(sorted(UNARY)), random_program(r, depth - 1, root=False))
    op = r.choice(sorted(BINARY))
    first = r.random() < 0.5 and op not in ("clamp", "powk")   # their first operand is an lg op's
    return (op, random_program(r, depth - 1, first, False),
            random_program(r, depth - 1, not first, False))


def emit(tree, pred, target, k):
    """The lg expression of a program tree."""
    if tree == "pred":
        return pred
    if tree == "target":
        return target
    if tree[0] == "const":
        return tree[1] * k
    if tree[0] in UNARY:
        return UNARY[tree[0]][0](emit(tree[1], pred, target, k))
    return BINARY[tree[0]](emit(tree[1], pred, target, k), emit(tree[2], pred, target, k))


def register_program(name: str, tree) -> None:
    """Register `tree + 0.25 * pred` (so every program is per element and reads pred)."""
    def fn(pred, target, k: float = 1.0):
        return emit(tree, pred, target, k) + 0.25 * pred
    fn.__name__ = name
    fn.__qualname__ = f"{name}:{tree!r}"   # the fingerprint falls back to the code: one per tree
    lg.register_loss(name)(fn)


def program_reference(cfg: dict, pred, target, weight=None, avg_factor=None,
                      reduction_override=None):
    """The reference interpreter on the build graph ('none'), then MMDetection's pipeline."""
    spec = parse(cfg)
    g = build(spec, Variant(reduction="none", target="dense", grad=False, dtype="float64"))
    p2 = pred.reshape(-1, pred.shape[-1])
    out = reference.evaluate(g, {"pred": p2, "target": target.reshape(p2.shape).to(pred.dtype)},
                             dtype=pred.dtype)["loss"]
    out = out.reshape(pred.shape) / spec.loss_weight      # the graph's SCALE, applied below
    red = reduction_override or spec.reduction
    return spec.loss_weight * weight_reduce_loss(out, weight, red, avg_factor)


POOL = 8   # programs per seed


@pytest.fixture(scope="module")
def programs():
    """Register the program pools of this module's seeds; unregister them afterwards."""
    names = []

    def make(seed: int) -> list[str]:
        r = random.Random(1000 + seed)
        out = []
        for j in range(POOL):
            name = f"FuzzProgram{seed}_{j}"
            tree = random_program(r, 4)
            register_program(name, tree)
            names.append(name)
            out.append(name)
        return out
    yield make
    for name in names:
        lg.REGISTRY.pop(name, None)


def run_programs(make, seed: int, count: int, failures: list) -> int:
    pool = make(seed)
    done = 0
    for i in range(count):
        if not _wanted("programs", seed, i):
            continue
        r, g = _gen("programs", seed, i)
        j = i % len(pool)
        name = pool[j]
        backend = BACKENDS[(i // len(pool)) % len(BACKENDS)]
        # one kernel variant per program: its dtype, reduction and weight are fixed by j
        dtype = torch.float32 if j % 3 == 2 else torch.float64
        cfg = dict(type=name, k=0.5 if j % 2 else 1.0, loss_weight=1.5,
                   reduction=["mean", "none", "sum"][j % 3])
        n, c = r.choice((0, 1, 3, 8, 33)), r.choice((2, 3, 5))
        pred = strided(r, (torch.randn(n, c, generator=g, dtype=torch.float64) *
                           r.choice([0.3, 1.0, 3.0])).to(dtype))
        target = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
        kwargs = {}
        if j % 4 < 2:
            kwargs["weight"] = torch.rand(n, c, generator=g, dtype=torch.float64).to(dtype)
        what = f"backend={backend} {name}={pool_tree(name)} cfg={cfg} pred {tuple(pred.shape)} {dtype}"
        try:
            check_case(compiled(cfg, backend), cfg, pred, target, reference_fn=program_reference,
                       **kwargs)
        except Exception as e:  # noqa: BLE001
            failures.append(_describe("programs", seed, i, what, e))
        done += 1
    return done


def pool_tree(name: str) -> str:
    return lg.REGISTRY[name].fn.__qualname__.split(":", 1)[1]


def test_fuzz_programs(programs):
    """Random lg programs: each backend's kernel == the reference interpreter (value, d/dpred)."""
    failures: list[str] = []
    done = run_programs(programs, 0, 800, failures)
    assert done > 0
    _report("programs", done, failures)


@pytest.mark.fuzz
def test_fuzz_programs_long(programs):
    failures: list[str] = []
    n = sum(run_programs(programs, seed, 1200, failures) for seed in (1, 2, 3, 4))
    print(f"program fuzz cases: {n}, failed: {len(failures)}")
    _report("programs", n, failures)
