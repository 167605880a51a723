"""Exact error messages: configs, call arguments, and loss definitions.

Each message names the offending key, value, shape or dtype, so a user can fix the call without
reading lossgraph's code.
"""
from __future__ import annotations

import re

import pytest
import torch

import lossgraph as lg
from lossgraph import ConfigError, InputError

TS = "torchscript"


def compile_ts(cfg):
    return lg.compile(cfg, backend=TS)


def exact(msg: str) -> str:
    """A pattern matching exactly msg."""
    return "^" + re.escape(msg) + "$"


@pytest.fixture
def focal():
    return compile_ts(dict(type="FocalLoss"))


@pytest.fixture
def x():
    return torch.randn(4, 3)


@pytest.fixture
def y():
    return torch.tensor([0, 1, 2, 3])


# -- configs ---------------------------------------------------------------------------------------

def test_unknown_type_suggests_closest_names():
    with pytest.raises(ConfigError, match=r"^unknown loss type 'FocalLos'; did you mean 'FocalLoss' "
                                          r"or '\w+' or '\w+'\? \(known: [\w, ]+\)$"):
        compile_ts(dict(type="FocalLos"))
    with pytest.raises(ConfigError, match=r"^unknown loss type 'SmoothL1'; did you mean "
                                          r"'SmoothL1Loss'"):
        compile_ts(dict(type="SmoothL1"))
    with pytest.raises(ConfigError) as e:
        compile_ts(dict(type="Zzzzz"))
    assert "did you mean" not in str(e.value)
    known = str(e.value).split("(known: ")[1].rstrip(")").split(", ")
    assert known == sorted(known) and "FocalLoss" in known and "CrossEntropyLoss" in known


def test_config_shape_errors():
    with pytest.raises(ConfigError, match=exact("loss config has no 'type' key, "
                                                "e.g. dict(type='FocalLoss')")):
        compile_ts(dict(gamma=2.0))
    with pytest.raises(ConfigError, match=exact("loss config 'type' must be a string, got 3")):
        compile_ts(dict(type=3))
    with pytest.raises(ConfigError, match=exact("a loss config must be a dict such as "
                                                "dict(type='FocalLoss'), got list")):
        compile_ts(["FocalLoss"])


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=exact(
            "FocalLoss got unknown config key 'gama'; did you mean 'gamma'? (valid keys: activated, "
            "alpha, gamma, loss_weight, reduction, use_sigmoid)")):
        compile_ts(dict(type="FocalLoss", gama=2.0))
    with pytest.raises(ConfigError, match=r"^SmoothL1Loss got unknown config key 'betta'; did you "
                                          r"mean 'beta'\? \(valid keys: beta, loss_weight, "
                                          r"reduction\)$"):
        compile_ts(dict(type="SmoothL1Loss", betta=1.0))
    with pytest.raises(ConfigError, match=r"^L1Loss got unknown config key 'zzz' \(valid keys: "):
        compile_ts(dict(type="L1Loss", zzz=1))


@pytest.mark.parametrize("cfg, msg", [
    (dict(type="FocalLoss", gamma="2"), "FocalLoss: config key 'gamma' must be a number, got str '2'"),
    (dict(type="FocalLoss", gamma=True), "FocalLoss: config key 'gamma' must be a number, got bool True"),
    (dict(type="FocalLoss", alpha=None), "FocalLoss: config key 'alpha' must be a number, got NoneType None"),
    (dict(type="FocalLoss", activated=1), "FocalLoss: config key 'activated' must be a bool, got int 1"),
    (dict(type="FocalLoss", loss_weight="1"), "FocalLoss: config key 'loss_weight' must be a number, got '1'"),
    (dict(type="L1Loss", loss_weight=True), "L1Loss: config key 'loss_weight' must be a number, got True"),
    (dict(type="SmoothL1Loss", beta=[1.0]), "SmoothL1Loss: config key 'beta' must be a number, got list [1.0]"),
    (dict(type="VarifocalLoss", iou_weighted="yes"),
     "VarifocalLoss: config key 'iou_weighted' must be a bool, got str 'yes'"),
    (dict(type="CrossEntropyLoss", class_weight="abc"),
     "CrossEntropyLoss: config key 'class_weight' must be a number or a list of numbers or None, "
     "got str 'abc'"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, "a"]),
     "CrossEntropyLoss: config key 'class_weight' must be a number or a list of numbers or None, "
     "got list [1.0, 'a']"),
    (dict(type="CrossEntropyLoss", ignore_index=1.5),
     "CrossEntropyLoss: config key 'ignore_index' must be an integer or None, got float 1.5"),
    (dict(type="CrossEntropyLoss", avg_non_ignore=None),
     "CrossEntropyLoss: config key 'avg_non_ignore' must be a bool, got NoneType None"),
])
def test_wrong_value_types(cfg, msg):
    with pytest.raises(ConfigError, match=exact(msg)):
        compile_ts(cfg)


@pytest.mark.parametrize("cfg, msg", [
    (dict(type="FocalLoss", use_sigmoid=False), "FocalLoss: Only sigmoid focal loss supported now."),
    (dict(type="VarifocalLoss", use_sigmoid=False),
     "VarifocalLoss: Only sigmoid varifocal loss supported now."),
    (dict(type="VarifocalLoss", alpha=-0.5), "VarifocalLoss: alpha must be >= 0, got -0.5"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True, use_mask=True),
     "CrossEntropyLoss: use_sigmoid and use_mask cannot both be True"),
])
def test_invalid_values(cfg, msg):
    with pytest.raises(ConfigError, match=exact(msg)):
        compile_ts(cfg)


def test_invalid_reduction_and_override(focal, x, y):
    with pytest.raises(ConfigError, match=exact(
            "FocalLoss: reduction must be one of 'none', 'mean', 'sum', got 'avg'")):
        compile_ts(dict(type="FocalLoss", reduction="avg"))
    with pytest.raises(ConfigError, match=exact(
            "L1Loss: reduction must be one of 'none', 'mean', 'sum', got None")):
        compile_ts(dict(type="L1Loss", reduction=None))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: reduction_override must be one of 'none', 'mean', 'sum', got 'Mean'")):
        focal(x, y, reduction_override="Mean")
    with pytest.raises(InputError, match=exact(
            "FocalLoss: reduction_override must be one of 'none', 'mean', 'sum', got ''")):
        focal(x, y, reduction_override="")


def test_errors_are_value_errors():
    """ConfigError and InputError are ValueErrors, as MMDetection's own checks raise."""
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)


def test_config_is_not_mutated():
    cfg = dict(type="FocalLoss", gamma=1.5)
    before = dict(cfg)
    compile_ts(cfg)
    assert cfg == before


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"^unknown backend 'cuda2'; choose one of .*'auto'$"):
        lg.compile(dict(type="FocalLoss"), backend="cuda2")


# -- call arguments ------------------------------------------------------------------------------------

def test_sum_with_avg_factor_is_a_value_error(focal, x, y):
    """mmdet-losses.md section 1.2: the one hard error of the pipeline, message as in mmdet."""
    msg = exact('avg_factor can not be used with reduction="sum"')
    with pytest.raises(ValueError, match=msg):
        focal(x, y, avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match=msg):
        compile_ts(dict(type="L1Loss", reduction="sum"))(x, x, avg_factor=torch.tensor(1.0))


def test_shape_mismatches_name_the_shapes(focal, x, y):
    with pytest.raises(InputError, match=exact(
            "FocalLoss: labels of shape (3,) do not match pred of shape (4, 3): expected (4,)")):
        focal(x, y[:3])
    with pytest.raises(InputError, match=exact(
            "FocalLoss: target of shape (4, 2) does not match pred of shape (4, 3)")):
        focal(x, torch.rand(4, 2))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: weight of shape (5,) must have 4 or 12 elements (pred is (4, 3))")):
        focal(x, y, weight=torch.rand(5))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: weight of shape (4, 2) must have shape (4,) or (4, 3)")):
        focal(x, y, weight=torch.rand(4, 2))
    l1 = compile_ts(dict(type="L1Loss"))
    with pytest.raises(InputError, match=exact(
            "L1Loss: weight of shape (4,) does not broadcast to the loss shape (4, 3)")):
        l1(x, x, weight=torch.rand(4))
    with pytest.raises(InputError, match=exact(
            "L1Loss: weight of shape (2, 4, 3) does not broadcast to the loss shape (4, 3)")):
        l1(x, x, weight=torch.rand(2, 4, 3))
    ce = compile_ts(dict(type="CrossEntropyLoss"))
    with pytest.raises(InputError, match=exact(
            "CrossEntropyLoss: weight of shape (3,) must have one value per row (4)")):
        ce(x, torch.tensor([0, 1, 2, 0]), weight=torch.rand(3))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: avg_factor must be a number or a one-element tensor, got shape (2,)")):
        focal(x, y, avg_factor=torch.ones(2))


def test_labels_out_of_range(focal, x):
    with pytest.raises(InputError, match=exact(
            "FocalLoss: labels must be in [0, 3] (3 = background), got values in [0, 4]")):
        focal(x, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: labels must be in [0, 3] (3 = background), got values in [-1, 2]")):
        focal(x, torch.tensor([0, 1, 2, -1]))
    ce = compile_ts(dict(type="CrossEntropyLoss"))
    with pytest.raises(InputError, match=exact(
            "CrossEntropyLoss: labels must be in [0, 2] (ignore_index -100 excepted), got values "
            "in [0, 3]")):
        ce(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(InputError, match=exact(
            "CrossEntropyLoss: labels must be in [0, 2] (ignore_index -100 excepted), got values "
            "in [-1, 2]")):
        ce(x, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(InputError, match=exact(
            "CrossEntropyLoss: labels must be in [0, 2] (ignore_index 1 excepted), got values "
            "in [0, 5]")):
        ce(x, torch.tensor([0, 1, 5, 2]), ignore_index=1)
    # the sigmoid path takes any label: negative and >= C rows are zero / background rows
    sig = compile_ts(dict(type="CrossEntropyLoss", use_sigmoid=True))
    assert torch.isfinite(sig(x, torch.tensor([-7, 3, 9, 0])))


def test_wrong_dtypes(focal, x, y):
    with pytest.raises(InputError, match=exact(
            "FocalLoss: pred must be a floating tensor (float16/bfloat16/float32/float64), "
            "got torch.int64")):
        focal(y.reshape(4, 1).expand(4, 3), y)
    with pytest.raises(InputError, match=exact(
            "FocalLoss: labels must be an integer tensor, got torch.float32")):
        focal(x, y.float())
    with pytest.raises(InputError, match=exact(
            "FocalLoss: weight must be a numeric tensor, got torch.complex64")):
        focal(x, y, weight=torch.ones(4, dtype=torch.complex64))
    with pytest.raises(InputError, match=exact(
            "L1Loss: target must be a numeric tensor, got torch.complex64")):
        compile_ts(dict(type="L1Loss"))(x, torch.ones(4, 3, dtype=torch.complex64))
    with pytest.raises(InputError, match=exact(
            "CrossEntropyLoss: the softmax loss takes integer labels: (N,) for a (N, C) cls_score, "
            "(N, d1, ..., dk) for (N, C, d1, ..., dk); got a float tensor of shape (4, 3)")):
        compile_ts(dict(type="CrossEntropyLoss"))(x, torch.rand(4, 3))


def test_wrong_argument_types(focal, x, y):
    with pytest.raises(InputError, match=exact("FocalLoss: pred must be a torch.Tensor, got list")):
        focal([1.0], y)
    with pytest.raises(InputError, match=exact("FocalLoss: target must be a torch.Tensor, got list")):
        focal(x, [0, 1])
    with pytest.raises(InputError, match=exact(
            "FocalLoss: weight must be a torch.Tensor or None, got list")):
        focal(x, y, weight=[1.0] * 4)
    with pytest.raises(InputError, match=exact(
            "FocalLoss: avg_factor must be a number or a tensor, got str")):
        focal(x, y, avg_factor="2")
    with pytest.raises(InputError, match=exact(
            "FocalLoss: pred must have at least one dimension, got a 0-d tensor")):
        focal(torch.tensor(1.0), y)


def test_forward_signature_errors(focal, x, y):
    with pytest.raises(TypeError, match=exact(
            "FocalLoss.forward(pred, target, weight=None, avg_factor=None, reduction_override=None): "
            "got an unexpected keyword argument 'label_weight'")):
        focal(x, y, label_weight=torch.ones(4))
    with pytest.raises(TypeError, match=exact(
            "FocalLoss.forward(pred, target, weight=None, avg_factor=None, reduction_override=None): "
            "missing a required argument: 'target'")):
        focal(x)
    with pytest.raises(TypeError, match=r"too many positional arguments"):
        focal(x, y, None, None, None, None)


def test_activated_focal_needs_probabilities(x, y):
    loss = compile_ts(dict(type="FocalLoss", activated=True))
    with pytest.raises(InputError, match=exact(
            "FocalLoss: with activated=True, pred must hold probabilities in [0, 1]")):
        loss(x * 10, y)


# -- loss definitions ----------------------------------------------------------------------------------

@pytest.fixture
def registry_guard():
    """Remove whatever a test registers."""
    before = set(lg.REGISTRY)
    yield
    for name in set(lg.REGISTRY) - before:
        del lg.REGISTRY[name]


def test_bad_register_loss_definitions(registry_guard):
    with pytest.raises(ValueError, match=exact("target must be 'dense', 'labels' or 'any', got 'rows'")):
        lg.register_loss("_Bad", target="rows")
    with pytest.raises(TypeError, match=exact("loss '_Bad' must take (pred, target, **hyperparameters)")):
        lg.register_loss("_Bad")(lambda pred: pred)
    with pytest.raises(TypeError, match=exact("loss '_Bad': hyperparameter 'beta' needs a default value")):
        @lg.register_loss("_Bad")
        def bad(pred, target, beta):
            return pred
    with pytest.raises(TypeError, match=exact(
            "loss '_Bad': 'loss_weight' is a pipeline key, not a hyperparameter")):
        @lg.register_loss("_Bad")
        def bad2(pred, target, loss_weight: float = 1.0):
            return pred
    with pytest.raises(ValueError, match=exact(
            "'FocalLoss' is a built-in lossgraph loss; choose another name")):
        @lg.register_loss("FocalLoss")
        def focal_again(pred, target):
            return pred
    assert "_Bad" not in lg.REGISTRY


def test_non_symbolic_returns(registry_guard):
    @lg.register_loss("_ReturnsFloat")
    def returns_float(pred, target):
        return 1.0

    with pytest.raises(TypeError, match=exact(
            "loss '_ReturnsFloat' must return a symbolic value computed from pred, got float")):
        compile_ts(dict(type="_ReturnsFloat"))

    @lg.register_loss("_ReturnsTensor")
    def returns_tensor(pred, target):
        return torch.zeros(3)

    with pytest.raises(TypeError, match=exact(
            "loss '_ReturnsTensor' must return a symbolic value computed from pred, got Tensor")):
        compile_ts(dict(type="_ReturnsTensor"))


def test_if_on_a_symbolic_value(registry_guard):
    @lg.register_loss("_UsesIf")
    def uses_if(pred, target, beta: float = 1.0):
        d = lg.abs(pred - target)
        if d < beta:
            return 0.5 * d * d
        return d

    with pytest.raises(TypeError, match=exact(
            "a symbolic lossgraph value has no truth value: use lg.where(cond, a, b) instead of "
            "if/and/or on tensors")):
        compile_ts(dict(type="_UsesIf"))

    @lg.register_loss("_UsesAnd")
    def uses_and(pred, target):
        return (pred > 0) and (target > 0)

    with pytest.raises(TypeError, match=r"^a symbolic lossgraph value has no truth value"):
        compile_ts(dict(type="_UsesAnd"))


def test_other_definition_mistakes(registry_guard):
    @lg.register_loss("_StrMath")
    def str_math(pred, target, mode: str = "log"):
        return pred * mode

    with pytest.raises(TypeError, match=exact(
            "cannot use str 'log' in a lossgraph expression; use numbers or symbolic values")):
        compile_ts(dict(type="_StrMath"))

    @lg.register_loss("_IndexMath")
    def index_math(pred, target):
        return (pred - target)[0]

    with pytest.raises(TypeError, match=exact(
            "only a loss input can be indexed by a fixed column, e.g. pred[0]")):
        compile_ts(dict(type="_IndexMath"))
    with pytest.raises(RuntimeError, match=exact(
            "lg.per_class can only be called inside a loss definition being compiled")):
        lg.per_class("w", [1.0])
    with pytest.raises(TypeError, match=exact("lg.clamp needs a symbolic value")):
        lg.clamp(2.0, 0.0, 1.0)


# -- MMDetection's exception classes (Note [Exception compatibility]) ------------------------------

@pytest.mark.parametrize("cfg, msg", [
    (dict(type="FocalLoss", use_sigmoid=False), "FocalLoss: Only sigmoid focal loss supported now."),
    (dict(type="FocalCustomLoss", num_classes=-1), "FocalCustomLoss: num_classes must be set (it is -1)"),
    (dict(type="QualityFocalLoss", use_sigmoid=False), "QualityFocalLoss: Only sigmoid in QFL supported now."),
    (dict(type="VarifocalLoss", alpha=-0.5), "VarifocalLoss: alpha must be >= 0, got -0.5"),
    (dict(type="KnowledgeDistillationKLDivLoss", T=0.5), "KnowledgeDistillationKLDivLoss: T must be >= 1, got 0.5"),
    (dict(type="SeesawLoss", use_sigmoid=True),
     "SeesawLoss: use_sigmoid=True is not supported: SeesawLoss is a softmax loss"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True, use_mask=True),
     "CrossEntropyLoss: use_sigmoid and use_mask cannot both be True"),
    (dict(type="CrossEntropyCustomLoss"), "CrossEntropyCustomLoss: num_classes must be set (it is -1)"),
])
def test_build_time_asserts_are_assertion_errors(cfg, msg):
    """MMDetection asserts these in __init__: building raises ConfigError and AssertionError."""
    with pytest.raises(lg.ConfigAssertion, match=exact(msg)) as e:
        compile_ts(cfg)
    assert isinstance(e.value, AssertionError) and isinstance(e.value, ConfigError)


def test_ghmc_softmax_is_not_implemented_at_build():
    with pytest.raises(NotImplementedError) as e:
        compile_ts(dict(type="GHMC", use_sigmoid=False))
    assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize("cfg, msg", [
    (dict(type="SmoothL1Loss", beta=0), "SmoothL1Loss: beta must be > 0, got 0.0"),
    (dict(type="BalancedL1Loss", beta=-1.0), "BalancedL1Loss: beta must be > 0, got -1.0"),
])
def test_beta_is_asserted_at_the_call(cfg, msg, x):
    """smooth_l1_loss / balanced_l1_loss assert beta > 0 when called, so building succeeds."""
    loss = compile_ts(cfg)
    for _ in range(2):      # every call raises, not only the first
        with pytest.raises(AssertionError, match=exact(msg)) as e:
            loss(x, x)
        assert isinstance(e.value, ConfigError)


def test_dice_softmax_is_not_implemented_at_the_call():
    loss = compile_ts(dict(type="DiceLoss", use_sigmoid=False, activate=True))
    with pytest.raises(NotImplementedError, match="softmax is not implemented") as e:
        loss(torch.randn(2, 3, 3), torch.rand(2, 3, 3))
    assert isinstance(e.value, ConfigError)
    unactivated = compile_ts(dict(type="DiceLoss", use_sigmoid=False, activate=False))
    assert torch.isfinite(unactivated(torch.rand(2, 3, 3), torch.rand(2, 3, 3)))


@pytest.mark.parametrize("cfg", [dict(type="FocalLoss"), dict(type="L1Loss"), dict(type="GHMC"),
                                 dict(type="DiceLoss"), dict(type="GaussianFocalLoss"),
                                 dict(type="SeesawLoss", num_classes=3)])
def test_invalid_reduction_override_is_asserted_first(cfg):
    """Every MMDetection forward asserts reduction_override before it looks at its tensors."""
    with pytest.raises(AssertionError, match="reduction_override must be one of") as e:
        compile_ts(cfg)(torch.rand(4, 5), (torch.rand(4, 5),), None, reduction_override=True)
    assert isinstance(e.value, InputError)


def test_shape_errors_are_assertion_and_runtime_errors(focal, x, y):
    """MMDetection asserts some shapes and lets torch's broadcasting raise RuntimeError on others."""
    cases = [lambda: compile_ts(dict(type="L1Loss"))(x, x[:3]),
             lambda: focal(x, y, torch.rand(4, 2)),
             lambda: compile_ts(dict(type="GIoULoss"))(torch.rand(4, 4), torch.rand(4, 4), torch.rand(4, 2)),
             lambda: compile_ts(dict(type="DiceLoss"))(x, x, torch.rand(2, 8)),
             lambda: compile_ts(dict(type="MSELoss"))(x, x, torch.rand(5))]
    for case in cases:
        with pytest.raises(lg.InputShapeError) as e:
            case()
        assert isinstance(e.value, (AssertionError)) and isinstance(e.value, RuntimeError)
        assert isinstance(e.value, InputError)


def test_call_time_asserts(x):
    mask = compile_ts(dict(type="CrossEntropyLoss", use_mask=True))
    rois = torch.randn(4, 3, 2, 2)
    with pytest.raises(AssertionError, match="no avg_factor"):
        mask(rois, torch.rand(4, 2, 2), torch.tensor([0, 1, 2, 0]), avg_factor=2.0)
    with pytest.raises(AssertionError, match="pos_labels must be given"):
        compile_ts(dict(type="GaussianFocalLoss"))(x.sigmoid(), x.sigmoid(), torch.tensor([0]))
    with pytest.raises(AssertionError, match="tuple of two elements"):
        compile_ts(dict(type="QualityFocalLoss"))(x, (torch.tensor([0, 1, 2, 3]),))
    with pytest.raises(AssertionError, match="get_cls_channels"):
        compile_ts(dict(type="CrossEntropyCustomLoss", num_classes=3)).get_cls_channels(4)


def test_config_keys_and_types_are_type_errors():
    """An unknown keyword is a TypeError in MMDetection's __init__; a Literal choice an assert."""
    with pytest.raises(TypeError, match="got unknown config key 'bogus'") as e:
        compile_ts(dict(type="FocalLoss", bogus=1))
    assert isinstance(e.value, ConfigError)
    with pytest.raises(lg.ConfigTypeError, match="config key 'gamma' must be a number"):
        compile_ts(dict(type="FocalLoss", gamma="a"))
    with pytest.raises(AssertionError, match=exact(
            "IoULoss: config key 'mode' must be one of 'linear', 'square', 'log', got str 'bad'")):
        compile_ts(dict(type="IoULoss", mode="bad"))


def test_multipos_ce_takes_integer_scores_as_mmdetection():
    """MMDetection 3.3.0's own test passes an int64 cost matrix; its first op makes it float32."""
    loss = compile_ts(dict(type="MultiPosCrossEntropyLoss"))
    costs = torch.tensor([[1, 0], [0, 1]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = loss(costs, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(costs.float(), labels), rtol=0, atol=0)
