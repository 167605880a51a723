"""IR tests: the text after build and after each pass, what each pass must do, the rule tables,
the reference interpreter against the compiled kernels, and value preservation across passes."""
from __future__ import annotations

import importlib

import pytest
import torch

import lossgraph as lg
from lossgraph import passes, reference
from lossgraph.build import Variant, build
from lossgraph.config import parse
from lossgraph.ir import Graph, Load
from lossgraph.ops import Op
from lossgraph.passes import PIPELINE, VerifyError, verify
from conftest import compiled

autodiff_rules = importlib.import_module("lossgraph.passes.autodiff")
torchscript = importlib.import_module("lossgraph.backends.torchscript")


@pytest.fixture(scope="module", autouse=True)
def toy_loss():
    """_PassToy: pow(., 2), a duplicate subexpression, x * 1.0 and log(sigmoid(x)), in one loss."""
    @lg.register_loss("_PassToy")
    def pass_toy(pred, target, gamma: float = 2.0):
        d = lg.abs(pred - target)
        return 0.5 * d ** gamma + lg.abs(pred - target) * 1.0 - lg.log(lg.sigmoid(pred))
    yield
    lg.REGISTRY.pop("_PassToy", None)


def stages(cfg: dict, v: Variant = Variant()):
    return dict(passes.run(build(parse(cfg), v), v))


# -- the text of every stage, for one small loss ---------------------------------------------------

TOY = {
    "build": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = const 2.0 : f scalar
  %5 = pow %3, %4 : f elem
  %6 = const 0.5 : f scalar
  %7 = mul %6, %5 : f elem
  %8 = sub %0, %1 : f elem
  %9 = abs %8 : f elem
  %10 = const 1.0 : f scalar
  %11 = mul %9, %10 : f elem
  %12 = add %7, %11 : f elem
  %13 = sigmoid %0 : f elem
  %14 = log %13 : f elem
  %15 = sub %12, %14 : f elem
  %16 = input denom:scalar : f scalar
  %17 = reduce mean %15, %16 : f total
  %18 = scale 1.0 %17 : f total
  %19 = output loss %18 : f total
}
""",
    "specialize": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = mul %3, %3 : f elem
  %5 = const 0.5 : f scalar
  %6 = mul %5, %4 : f elem
  %7 = sub %0, %1 : f elem
  %8 = abs %7 : f elem
  %9 = add %6, %8 : f elem
  %10 = logsigmoid %0 : f elem
  %11 = sub %9, %10 : f elem
  %12 = input denom:scalar : f scalar
  %13 = reduce mean %11, %12 : f total
  %14 = output loss %13 : f total
}
""",
    "cse": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = mul %3, %3 : f elem
  %5 = const 0.5 : f scalar
  %6 = mul %5, %4 : f elem
  %7 = add %6, %3 : f elem
  %8 = logsigmoid %0 : f elem
  %9 = sub %7, %8 : f elem
  %10 = input denom:scalar : f scalar
  %11 = reduce mean %9, %10 : f total
  %12 = output loss %11 : f total
}
""",
    "autodiff": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = mul %3, %3 : f elem
  %5 = const 0.5 : f scalar
  %6 = mul %5, %4 : f elem
  %7 = add %6, %3 : f elem
  %8 = logsigmoid %0 : f elem
  %9 = sub %7, %8 : f elem
  %10 = input denom:scalar : f scalar
  %11 = reduce mean %9, %10 : f total
  %12 = output loss %11 : f total
  %13 = const 1.0 : f scalar
  %14 = div %13, %10 : f scalar
  %15 = neg %14 : f scalar
  %16 = neg %0 : f elem
  %17 = sigmoid %16 : f elem
  %18 = mul %15, %17 : f elem
  %19 = mul %14, %4 : f elem
  %20 = mul %14, %5 : f scalar
  %21 = mul %20, %3 : f elem
  %22 = mul %20, %3 : f elem
  %23 = add %14, %21 : f elem
  %24 = add %23, %22 : f elem
  %25 = sign %2 : f elem
  %26 = mul %24, %25 : f elem
  %27 = neg %26 : f elem
  %28 = add %18, %26 : f elem
  %29 = output grad %28 : f elem
}
""",
    "simplify": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = mul %3, %3 : f elem
  %5 = const 0.5 : f scalar
  %6 = mul %5, %4 : f elem
  %7 = add %6, %3 : f elem
  %8 = logsigmoid %0 : f elem
  %9 = sub %7, %8 : f elem
  %10 = input denom:scalar : f scalar
  %11 = reduce mean %9, %10 : f total
  %12 = output loss %11 : f total
  %13 = const 1.0 : f scalar
  %14 = div %13, %10 : f scalar
  %15 = neg %14 : f scalar
  %16 = neg %0 : f elem
  %17 = sigmoid %16 : f elem
  %18 = mul %15, %17 : f elem
  %19 = mul %14, %5 : f scalar
  %20 = mul %19, %3 : f elem
  %21 = mul %19, %3 : f elem
  %22 = add %14, %20 : f elem
  %23 = add %22, %21 : f elem
  %24 = sign %2 : f elem
  %25 = mul %23, %24 : f elem
  %26 = add %18, %25 : f elem
  %27 = output grad %26 : f elem
}
""",
    "cse_grad": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input pred:elem : f elem
  %1 = input target:elem : f elem
  %2 = sub %0, %1 : f elem
  %3 = abs %2 : f elem
  %4 = mul %3, %3 : f elem
  %5 = const 0.5 : f scalar
  %6 = mul %5, %4 : f elem
  %7 = add %6, %3 : f elem
  %8 = logsigmoid %0 : f elem
  %9 = sub %7, %8 : f elem
  %10 = input denom:scalar : f scalar
  %11 = reduce mean %9, %10 : f total
  %12 = output loss %11 : f total
  %13 = const 1.0 : f scalar
  %14 = div %13, %10 : f scalar
  %15 = neg %14 : f scalar
  %16 = neg %0 : f elem
  %17 = sigmoid %16 : f elem
  %18 = mul %15, %17 : f elem
  %19 = mul %14, %5 : f scalar
  %20 = mul %19, %3 : f elem
  %21 = add %14, %20 : f elem
  %22 = add %21, %20 : f elem
  %23 = sign %2 : f elem
  %24 = mul %22, %23 : f elem
  %25 = add %18, %24 : f elem
  %26 = output grad %25 : f elem
}
""",
    "fuse": """\
graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
  %0 = input denom:scalar : f scalar
  %1 = input pred:elem : f elem
  %2 = input target:elem : f elem
  %3 = kernel %0, %1, %2 : f elem -> (grad, loss)
    graph _PassToy(reduction=mean, target=dense, weight=none, grad=True, dtype=float32) {
      %0 = input pred:elem : f elem
      %1 = input target:elem : f elem
      %2 = sub %0, %1 : f elem
      %3 = abs %2 : f elem
      %4 = mul %3, %3 : f elem
      %5 = const 0.5 : f scalar
      %6 = mul %5, %4 : f elem
      %7 = add %6, %3 : f elem
      %8 = logsigmoid %0 : f elem
      %9 = sub %7, %8 : f elem
      %10 = input denom:scalar : f scalar
      %11 = reduce mean %9, %10 : f total
      %12 = output loss %11 : f total
      %13 = const 1.0 : f scalar
      %14 = div %13, %10 : f scalar
      %15 = neg %14 : f scalar
      %16 = neg %0 : f elem
      %17 = sigmoid %16 : f elem
      %18 = mul %15, %17 : f elem
      %19 = mul %14, %5 : f scalar
      %20 = mul %19, %3 : f elem
      %21 = add %14, %20 : f elem
      %22 = add %21, %20 : f elem
      %23 = sign %2 : f elem
      %24 = mul %22, %23 : f elem
      %25 = add %18, %24 : f elem
      %26 = output grad %25 : f elem
    }
  %4 = output grad %3 : f elem
  %5 = output loss %3 : f elem
}
""",
}


def test_pipeline_is_the_documented_list():
    assert [name for name, _ in PIPELINE] == ["specialize", "cse", "autodiff", "simplify",
                                              "cse_grad", "fuse"]


@pytest.mark.parametrize("stage", ["build"] + [name for name, _ in PIPELINE])
def test_toy_text_after_each_pass(stage):
    """The exact IR text after build and after every pass of PIPELINE."""
    assert stage in TOY, f"no expected text for stage {stage!r}: add it to TOY"
    assert stages(dict(type="_PassToy"))[stage].text() + "\n" == TOY[stage]


def test_str_of_a_graph_is_its_text():
    g = stages(dict(type="_PassToy"))["build"]
    assert str(g) == g.text() and repr(g) == f"<lossgraph.Graph _PassToy: {len(g)} nodes>"


# -- what each pass does -------------------------------------------------------------------------------

def ops_of(g: Graph) -> list[str]:
    return [g[i].op.value for i in g.topo()]


def test_specialize_gamma_two_becomes_a_product():
    """FocalLoss gamma=2: pow(pt, 2.0) becomes mul %pt, %pt, as torch evaluates x**2."""
    s = stages(dict(type="FocalLoss"))
    assert "pow" in ops_of(s["build"]) and "pow" not in ops_of(s["specialize"])
    g = s["specialize"]
    squares = [i for i in g.topo() if g[i].op is Op.MUL and g[i].srcs[0] == g[i].srcs[1]]
    assert len(squares) == 1
    num = g.numbering()
    x = num[g[squares[0]].srcs[0]]
    assert f"= mul %{x}, %{x} : f elem" in g.text()


@pytest.mark.parametrize("gamma, expect", [(0.0, None), (2.0, "mul"), (3.0, "mul"), (0.5, "sqrt"),
                                           (1.5, "pow"), (1.0, None)])
def test_specialize_pow_exponents(gamma, expect):
    """pow(x, c): c=0 -> 1, c=1 -> x, c=2 -> x*x, c=3 -> x*x*x, c=0.5 -> sqrt, else pow."""
    g = stages(dict(type="_PassToy", gamma=gamma))["specialize"]
    ops = ops_of(g)
    assert "pow" not in ops or expect == "pow"
    if expect == "sqrt":
        assert "sqrt" in ops
    if gamma == 3.0:
        assert ops.count("mul") == 3     # (d * d) * d, and 0.5 * that
    if gamma == 0.0:
        assert "abs" in ops and ops.count("mul") == 0   # 0.5 * 1 folded to 0.5; only |d| is left


def test_specialize_drops_unit_loss_weight_and_keeps_others():
    assert "scale" in ops_of(stages(dict(type="_PassToy"))["build"])
    assert "scale" not in ops_of(stages(dict(type="_PassToy"))["specialize"])
    g = stages(dict(type="_PassToy", loss_weight=2.0))["specialize"]
    assert "scale 2.0 %" in g.text()


def test_specialize_folds_constants_and_stabilizes_log_sigmoid():
    """Constant subexpressions fold; log(sigmoid(x)) and log(1 - sigmoid(x)) become logsigmoid."""
    @lg.register_loss("_FoldToy")
    def fold_toy(pred, target, a: float = 3.0):
        return (a * 2.0 - 1.0) * pred - lg.log(1 - lg.sigmoid(pred)) + lg.log(lg.sigmoid(pred))
    try:
        g = stages(dict(type="_FoldToy"))["specialize"]
    finally:
        lg.REGISTRY.pop("_FoldToy")
    text = g.text()
    assert "const 5.0" in text and "const 3.0" not in text and "const 2.0" not in text
    ops = ops_of(g)
    assert "log" not in ops and "sigmoid" not in ops
    assert ops.count("logsigmoid") == 2 and "neg %0" in text


def test_specialize_never_folds_x_times_zero():
    """x * 0.0 is NaN for x = inf: the fold pass keeps it (it never changes IEEE results)."""
    @lg.register_loss("_ZeroToy")
    def zero_toy(pred, target):
        return pred * 0.0 + target
    try:
        g = stages(dict(type="_ZeroToy"))["specialize"]
    finally:
        lg.REGISTRY.pop("_ZeroToy")
    assert "const 0.0" in g.text() and "mul %0, %" in g.text()


def test_cse_merges_duplicates():
    """The repeated abs(pred - target) is one node after cse; commutative operands are sorted."""
    s = stages(dict(type="_PassToy"))
    assert ops_of(s["specialize"]).count("abs") == 2 and ops_of(s["specialize"]).count("sub") == 3
    assert ops_of(s["cse"]).count("abs") == 1 and ops_of(s["cse"]).count("sub") == 2
    g = Graph("t")
    x, y = g.add(Op.INPUT, (), Load("pred", "elem")), g.add(Op.INPUT, (), Load("target", "elem"))
    a, b = g.add(Op.MUL, (x, y)), g.add(Op.MUL, (y, x))
    c, d = g.add(Op.SUB, (x, y)), g.add(Op.SUB, (y, x))
    g.add(Op.OUTPUT, (g.add(Op.ADD, (g.add(Op.ADD, (a, b)), g.add(Op.ADD, (c, d)))),), "loss")
    out = passes.cse(g, Variant())
    assert ops_of(out).count("mul") == 1 and ops_of(out).count("sub") == 2


def test_autodiff_adds_a_grad_output():
    s = stages(dict(type="_PassToy"))
    assert set(s["cse"].outputs()) == {"loss"}
    assert set(s["autodiff"].outputs()) == {"loss", "grad"}
    assert "output grad" in s["autodiff"].text()
    nograd = stages(dict(type="_PassToy"), Variant(grad=False))
    assert set(nograd["fuse"].outputs()) == {"loss"}
    assert "output grad" not in nograd["autodiff"].text()
    assert nograd["autodiff"].text() == nograd["cse"].text()


def test_simplify_and_cse_grad_shrink_the_gradient():
    s = stages(dict(type="FocalLoss"))
    assert len(s["simplify"]) <= len(s["autodiff"])
    assert len(s["cse_grad"]) < len(s["simplify"])
    assert "sigmoid %0" in s["cse_grad"].text()
    assert s["cse_grad"].text().count("= sigmoid %0 ") == 1    # the gradient reuses sigmoid(x)


def test_fuse_leaves_one_kernel_node():
    for cfg, v in [(dict(type="FocalLoss"), Variant(target="labels")),
                   (dict(type="CrossEntropyLoss"), Variant(target="labels", weight="row")),
                   (dict(type="L1Loss", loss_weight=2.0), Variant(reduction="none", weight="elem"))]:
        g = stages(cfg, v)["fuse"]
        assert ops_of(g).count("kernel") == 1
        assert set(ops_of(g)) == {"input", "kernel", "output"}
        body = passes.kernel_body(g)
        assert set(body.outputs()) == {"loss", "grad"}
        assert {ld.name for ld in g.inputs()} == {ld.name for ld in body.inputs()}


def test_weight_reduce_scale_stages_in_build():
    """The build appends weight, reduce (with the denominator for 'mean') and scale, in order."""
    g = stages(dict(type="L1Loss", loss_weight=2.0), Variant(weight="row", reduction="sum"))["build"]
    tail = [line.split(" = ")[1] for line in g.text().splitlines()[-6:-1]]
    assert tail == ["input weight:row : f row", "weight %3, %4 : f elem", "reduce sum %5 : f total",
                    "scale 2.0 %6 : f total", "output loss %7 : f total"]


def test_verify_rejects_broken_graphs():
    g = Graph("bad")
    x = g.add(Op.INPUT, (), Load("label", "row", "i"))
    g.add(Op.OUTPUT, (g.add(Op.EXP, (x,)),), "loss")
    with pytest.raises(VerifyError, match=r"bad: %1 = exp has a non-float operand"):
        verify(g)
    g = Graph("noloss")
    g.add(Op.OUTPUT, (g.add(Op.INPUT, (), Load("pred", "elem")),), "grad")
    with pytest.raises(VerifyError, match=r"noloss: no 'loss' output"):
        verify(g)
    g = Graph("cond")
    p = g.add(Op.INPUT, (), Load("pred", "elem"))
    g.add(Op.OUTPUT, (g.add(Op.WHERE, (p, p, p)),), "loss")
    with pytest.raises(VerifyError, match=r"cond: %1 = where condition is not boolean"):
        verify(g)


# -- every op has an entry in every rule table ------------------------------------------------------

# Ops a consumer handles in its own code rather than through its table.
AUTODIFF_SPECIAL = {Op.SCALE, Op.KERNEL}                   # scale by its attribute; after fusion
TORCHSCRIPT_SPECIAL = {Op.INPUT, Op.CONST, Op.OUTPUT, Op.REDUCE, Op.KERNEL}
C_SPECIAL = {Op.INPUT, Op.CONST, Op.OUTPUT, Op.REDUCE, Op.SCALE, Op.KERNEL, Op.ROWSUM, Op.ROWMAX}
C_DECOMPOSED = {Op.SIGMOID, Op.LOGSIGMOID, Op.SOFTPLUS, Op.BCE_LOGITS, Op.ROWLSE}


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.value)
def test_every_op_has_every_rule(op):
    assert op in reference.EVAL or op in reference.SPECIAL, f"{op}: no reference.EVAL entry"
    assert op in autodiff_rules.RULES or op in autodiff_rules.ZERO or op in AUTODIFF_SPECIAL, \
        f"{op}: no derivative rule (passes.autodiff.RULES or ZERO)"
    assert op in torchscript.TORCH or op in TORCHSCRIPT_SPECIAL, \
        f"{op}: no TorchScript expression (backends.torchscript.TORCH)"
    try:
        clower = importlib.import_module("lossgraph.backends.clower")
    except ImportError:
        return
    assert op in clower.C or op in C_SPECIAL or op in C_DECOMPOSED, \
        f"{op}: no C expression (backends.clower.C)"


def test_rule_tables_have_no_stray_entries():
    """No table holds both a rule and a zero/special marker for the same op."""
    assert not set(autodiff_rules.RULES) & set(autodiff_rules.ZERO)
    assert not set(reference.EVAL) & set(reference.SPECIAL)


# -- the reference interpreter: agrees with the kernels, and every pass keeps the value ----------

CASES = [
    (dict(type="FocalLoss", loss_weight=0.7), "labels", "row", "mean"),
    (dict(type="FocalLoss", gamma=1.5), "dense", "elem", "none"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 0.5, 3.0, 0.25]), "labels", "row", "sum"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True, ignore_index=2), "labels", None, "mean"),
    (dict(type="SmoothL1Loss", beta=0.5, loss_weight=2.0), "dense", "col", "mean"),
    (dict(type="BalancedL1Loss"), "dense", None, "none"),
    (dict(type="GaussianFocalLoss"), "dense", "elem", "sum"),
    (dict(type="VarifocalLoss", iou_weighted=False), "dense", "row", "mean"),
    (dict(type="_PassToy", gamma=1.5, loss_weight=3.0), "dense", "elem", "mean"),
]
ROWS, WIDTH = 6, 5


def case_inputs(cfg, target, weight, seed=0):
    """Inputs in the interpreter's layout: pred (R,K), label (R,), weight by access, denom."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(ROWS, WIDTH, generator=g, dtype=torch.float64) * 2
    if cfg["type"] == "GaussianFocalLoss":
        pred = torch.rand(ROWS, WIDTH, generator=g, dtype=torch.float64) * 0.9 + 0.05
    ins = {"pred": pred}
    if target == "labels":
        hi = WIDTH if cfg["type"] == "CrossEntropyLoss" and not cfg.get("use_sigmoid") else WIDTH + 1
        ins["label"] = torch.randint(0, hi, (ROWS,), generator=g)
    else:
        t = torch.rand(ROWS, WIDTH, generator=g, dtype=torch.float64)
        ins["target"] = torch.where(t < 0.3, torch.ones_like(t), t) if cfg["type"] != "FocalLoss" \
            else (t > 0.5).double()
    shape = {"elem": (ROWS, WIDTH), "row": (ROWS,), "col": (WIDTH,), None: None}[weight]
    if shape:
        # float32 values: CrossEntropyLoss rounds its weight with weight.float(), as mmdet does
        ins["weight"] = torch.rand(shape, generator=g).double()
    ins["denom"] = float(ROWS * WIDTH if cfg["type"] != "CrossEntropyLoss" or cfg.get("use_sigmoid")
                         else ROWS)
    return ins


def call_args(ins):
    """The same inputs as MMDetection-style forward arguments."""
    target = ins.get("label", ins.get("target"))
    w = ins.get("weight")
    if w is not None and w.shape == (ROWS,) and "target" in ins:
        w = w.reshape(ROWS, 1)         # a per-row weight of a dense loss
    return target, w


def _variant(target, weight, reduction, grad=True):
    return Variant(reduction=reduction, target=target, weight=weight, grad=grad, dtype="float64")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]['type']}-{c[3]}")
def test_every_pass_preserves_the_value(case):
    """Loss after every stage, and gradient after every stage from autodiff on, are unchanged
    (float64, up to rounding), and the autodiff gradient equals torch autograd on the build."""
    cfg, target, weight, reduction = case
    v = _variant(target, weight, reduction)
    ins = case_inputs(cfg, target, weight)
    all_stages = passes.run(build(parse(cfg), v), v)
    pred = ins["pred"].clone().requires_grad_(True)
    loss0 = reference.evaluate(all_stages[0][1], {**ins, "pred": pred})["loss"]
    seed = torch.rand(loss0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    auto, = torch.autograd.grad(loss0, pred, seed if loss0.dim() else None)
    for name, g in all_stages[1:]:
        out = reference.evaluate(g, ins)
        torch.testing.assert_close(out["loss"], loss0.detach(), rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"{name}: loss changed\n{m}")
        if "grad" in out:
            grad = out["grad"] * (seed if loss0.dim() else 1.0)
            grad = grad.expand_as(pred) if grad.dim() == pred.dim() else grad
            torch.testing.assert_close(grad.expand_as(pred), auto, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"{name}: grad != autograd\n{m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]['type']}-{c[3]}")
def test_reference_interpreter_agrees_with_kernels(case, backend):
    """reference.evaluate on the fused graph == the compiled kernel's loss and d/dpred."""
    cfg, target, weight, reduction = case
    v = _variant(target, weight, reduction)
    ins = case_inputs(cfg, target, weight, seed=2)
    fused = passes.run(build(parse(cfg), v), v)[-1][1]
    expect = reference.evaluate(fused, ins)
    loss = compiled(cfg, backend)
    tgt, w = call_args(ins)
    pred = ins["pred"].clone().requires_grad_(True)
    out = loss(pred, tgt, weight=w, reduction_override=reduction)
    seed = torch.ones_like(out) if out.dim() else torch.tensor(1.0, dtype=torch.float64)
    out.backward(seed)
    # in the result's dtype (sigmoid CE returns float32 as mmdet does; the math is float64)
    torch.testing.assert_close(out, expect["loss"].reshape(out.shape).to(out.dtype), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(pred.grad, expect["grad"].expand_as(pred), rtol=1e-12, atol=1e-14)
