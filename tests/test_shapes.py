"""Input shapes and call surfaces as MMDetection 3.3.0 has them: softmax CrossEntropyLoss over
(N, C, d1, ..., dk) (HTC's and SCNet's semantic heads), KD over dim 1, scoped type names, and the
forward signatures inspect and help() show."""
from __future__ import annotations

import copy
import inspect
import pickle
import pydoc
import warnings

import pytest
import torch
import torch.nn.functional as F

import lossgraph as lg
from lossgraph.errors import ConfigError, InputError

from conftest import check_case
from reference_losses import cross_entropy_loss, module_reduction
from reference_zoo import kd_loss


def _ce(cfg: dict, backend: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Default ``avg_non_ignore`` is False")
        return lg.compile(cfg, backend=backend)


def ce_nd_reference(cfg, x, y, weight=None, avg_factor=None, reduction_override=None):
    """The (M, C) reference on the class-last flattening; the weight broadcast against (N, d..)
    first, as weight_reduce_loss broadcasts it against the (N, d..) loss."""
    c = x.shape[1]
    w = None if weight is None else weight.expand(y.shape).reshape(-1)
    out = cross_entropy_loss(cfg, x.movedim(1, -1).reshape(-1, c), y.reshape(-1), w, avg_factor,
                             reduction_override)
    return out.reshape(y.shape) if module_reduction(cfg, reduction_override) == "none" else out


def _seg(shape=(2, 5, 3, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    y.view(-1)[::4] = 255
    return x, y


def test_htc_semantic_head_call_equals_f_cross_entropy(backend):
    """HTC/SCNet: CrossEntropyLoss(ignore_index=255, loss_weight=0.2)(randn(2,5,3,3), labels)."""
    cfg = dict(type="CrossEntropyLoss", ignore_index=255, loss_weight=0.2)
    loss = _ce(cfg, backend)
    x, y = _seg()
    p = x.clone().requires_grad_(True)
    out = loss(p, y)
    out.backward()
    r = x.clone().requires_grad_(True)
    ref = 0.2 * F.cross_entropy(r, y, ignore_index=255, reduction="none").mean()  # mmdet's mean
    ref.backward()
    assert out.shape == () and torch.allclose(out, ref, rtol=1e-12, atol=0)
    assert torch.allclose(p.grad, r.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("cfg,kw", [
    (dict(type="CrossEntropyLoss", ignore_index=255, reduction="none"), {}),
    (dict(type="CrossEntropyLoss", ignore_index=255, avg_non_ignore=True,
          class_weight=[1.0, 2.0, 0.5, 1.0, 3.0]), {}),
    (dict(type="CrossEntropyLoss", ignore_index=255), dict(weight="full", avg_factor=7.0)),
    (dict(type="CrossEntropyLoss", ignore_index=255, reduction="sum"), dict(weight="bcast")),
])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_softmax_ce_over_spatial_axes(backend, cfg, kw, dtype):
    loss = _ce(cfg, backend)
    x, y = _seg((2, 5, 3, 4), seed=1, dtype=dtype)
    kw = dict(kw)
    if kw.get("weight") == "full":
        kw["weight"] = torch.rand(y.shape)
    elif kw.get("weight") == "bcast":
        kw["weight"] = torch.rand(2, 1, 4)
    check_case(loss, cfg, x, y, reference_fn=ce_nd_reference, **kw)
    x3, y3 = _seg((3, 5, 7), seed=2, dtype=dtype)           # (N, C, L)
    check_case(loss, cfg, x3, y3, reference_fn=ce_nd_reference)


def test_softmax_ce_unbatched_and_shape_errors():
    loss = _ce(dict(type="CrossEntropyLoss"), "torchscript")
    x = torch.randn(5, dtype=torch.float64)
    out = loss(x, torch.tensor(2))
    assert out.shape == () and torch.allclose(out, F.cross_entropy(x, torch.tensor(2)))
    with pytest.raises(InputError, match=r"the classes are dim 1, as in F.cross_entropy, so "
                                         r"labels must have shape \(2, 3, 3\)"):
        loss(torch.randn(2, 5, 3, 3), torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        loss(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), bogus=1)


def test_kd_softmax_over_dim_1(backend):
    cfg = dict(type="KnowledgeDistillationKLDivLoss", T=2, reduction="none")
    loss = lg.compile(cfg, backend=backend)
    g = torch.Generator().manual_seed(5)
    x, t = (torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))

    def ref(cfg, pred, soft, **kw):   # the (N, K) reference on the class-last flattening
        out = kd_loss(cfg, pred.movedim(1, -1).reshape(-1, 4), soft.movedim(1, -1).reshape(-1, 4))
        return out.reshape(2, 3)
    check_case(loss, cfg, x, t, reference_fn=ref)


# -- scoped type names ------------------------------------------------------------------------

def test_scoped_type_names():
    x, y = torch.randn(4, 3), torch.randint(0, 4, (4,))
    plain = lg.compile(dict(type="FocalLoss"), backend="torchscript")(x, y)
    for name in ("mmdet.FocalLoss", "lossgraph.FocalLoss"):
        loss = lg.compile(dict(type=name), backend="torchscript")
        assert loss.spec.name == "FocalLoss" and torch.equal(loss(x, y), plain)
    with pytest.raises(ConfigError, match=r"loss type 'mmpretrain.FocalLoss' has scope "
                                          r"'mmpretrain'; .* use 'FocalLoss', 'mmdet.FocalLoss'"):
        lg.compile(dict(type="mmpretrain.FocalLoss"))
    with pytest.raises(ConfigError, match="unknown loss type 'NoSuchLoss'"):
        lg.compile(dict(type="mmdet.NoSuchLoss"))


# -- visible signatures -----------------------------------------------------------------------

SIGNATURES = {
    "FocalLoss": "(pred, target, weight=None, avg_factor=None, reduction_override=None)",
    "CrossEntropyLoss": "(cls_score, label, weight=None, avg_factor=None, "
                        "reduction_override=None, ignore_index=None, **kwargs)",
    "DiceLoss": "(pred, target, weight=None, reduction_override=None, avg_factor=None)",
    "GHMC": "(pred, target, label_weight, reduction_override=None, **kwargs)",
    "MultiPosCrossEntropyLoss": "(cls_score, label, weight=None, avg_factor=None, "
                                "reduction_override=None, **kwargs)",
    "TripletLoss": "(inputs, targets)",
    "AssociativeEmbeddingLoss": "(pred, target, match)",
    "EQLV2Loss": "(cls_score, label, weight=None, avg_factor=None, reduction_override=None)",
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_forward_signature_is_mmdetections(name):
    loss = lg.compile(dict(type=name), backend="torchscript")
    assert str(inspect.signature(loss.forward)) == SIGNATURES[name]
    text = pydoc.render_doc(loss, renderer=pydoc.plaintext)
    assert f"forward(self, {SIGNATURES[name][1:]}" in text
    assert repr(loss).startswith(f"CompiledLoss(type={name}")


def test_copies_keep_the_signature_and_the_numbers():
    loss = lg.compile(dict(type="FocalLoss", gamma=1.5), backend="torchscript")
    x, y = torch.randn(4, 3), torch.randint(0, 4, (4,))
    for other in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert type(other) is type(loss) and isinstance(other, lg.CompiledLoss)
        assert str(inspect.signature(other.forward)) == SIGNATURES["FocalLoss"]
        assert torch.equal(other(x, y), loss(x, y))
