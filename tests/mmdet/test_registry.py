"""lossgraph.mmdet in MMDetection's registry: the lossgraph scope, compile_all, what heads read,
state_dict keys both ways, DDP."""
from __future__ import annotations

import copy
import logging

import mmcv_ext_standin
import pytest
import torch

mmcv_ext_standin.install_unless_full()

import lossgraph  # noqa: E402
import lossgraph.mmdet as lm  # noqa: E402
from mmdet.models.losses import GHMC, FocalLoss, SeesawLoss  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402

pytestmark = pytest.mark.mmdet
FOCAL = dict(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)


@pytest.fixture
def swapped():
    lm.compile_all("torchscript")
    yield
    lm.restore()


def test_every_loss_is_in_the_lossgraph_scope():
    for name in lossgraph.known_losses():
        assert MODELS.get(f"lossgraph.{name}").lossgraph_type == name


def test_scoped_build_matches_mmdetection():
    loss = MODELS.build(dict(type="lossgraph.FocalLoss", backend="torchscript", **FOCAL))
    assert isinstance(loss, lossgraph.CompiledLoss) and loss.use_sigmoid
    ref = FocalLoss(**FOCAL)
    x = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (30,))
    w = torch.rand(30, dtype=torch.float64)
    a, b = loss(x, y, w, avg_factor=7.0), ref(x, y, w, avg_factor=7.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    ga, = torch.autograd.grad(a, x)
    gb, = torch.autograd.grad(b, x)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=0)


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match="by keyword"):
        MODELS.get("lossgraph.FocalLoss")(True)


def test_compile_all_swaps_and_restores(swapped, caplog):
    assert isinstance(MODELS.build(dict(type="FocalLoss", **FOCAL)), lossgraph.CompiledLoss)
    assert isinstance(MODELS.build(dict(type="GHMC")), lossgraph.CompiledLoss)
    lm.compile_all("torchscript")         # idempotent: restore() still finds the originals
    lm.restore()
    assert type(MODELS.build(dict(type="FocalLoss", **FOCAL))) is FocalLoss
    lm.compile_all("torchscript")


def test_each_build_logs_one_line(swapped):
    from mmengine.logging import MMLogger
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        MODELS.build(dict(type="L1Loss", loss_weight=2.0))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.getMessage().startswith("lossgraph")] == [
        "lossgraph: compiled L1Loss(loss_weight=2.0) for MMDetection's L1Loss, backend torchscript"]


def test_heads_read_the_loss_attributes(swapped):
    head = MODELS.build(dict(type="RetinaHead", num_classes=3, in_channels=8, feat_channels=8,
                             stacked_convs=1, anchor_generator=dict(
                                 type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                 ratios=[0.5, 1.0, 2.0], strides=[8]),
                             loss_cls=dict(type="FocalLoss", **FOCAL)))
    assert isinstance(head.loss_cls, lossgraph.CompiledLoss)
    assert head.use_sigmoid_cls and head.cls_out_channels == 3
    bbox = dict(type="Shared2FCBBoxHead", in_channels=4, fc_out_channels=8, roi_feat_size=2,
                num_classes=5)
    seesaw = MODELS.build(dict(bbox, loss_cls=dict(type="SeesawLoss", num_classes=5)))
    assert seesaw.custom_cls_channels and seesaw.fc_cls.out_features == 7
    assert seesaw.loss_cls.get_activation(torch.randn(2, 7)).shape == (2, 6)
    softmax = MODELS.build(dict(bbox, loss_cls=dict(type="CrossEntropyLoss")))
    assert softmax.fc_cls.out_features == 6 and not softmax.custom_cls_channels


@pytest.mark.parametrize("cfg, cls", [(dict(type="GHMC", momentum=0.75), GHMC),
                                      (dict(type="SeesawLoss", num_classes=4), SeesawLoss)])
def test_state_dict_loads_both_ways(cfg, cls):
    ours = lossgraph.compile(cfg, backend="torchscript")
    theirs = cls(**{k: v for k, v in cfg.items() if k != "type"})
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, t in theirs.state_dict().items():
        t.copy_(torch.rand_like(t))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(dict(ours.state_dict()), dict(theirs.state_dict()), rtol=0, atol=0)
    fresh = cls(**{k: v for k, v in cfg.items() if k != "type"})
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(dict(fresh.state_dict()), dict(ours.state_dict()), rtol=0, atol=0)


def test_ddp_and_deepcopy(swapped, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.loss_cls = MODELS.build(dict(type="FocalLoss", **FOCAL))

        def forward(self, x, y):
            return self.loss_cls(self.fc(x), y)

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    plain = Head()
    twin = copy.deepcopy(plain)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(twin)
        ddp(x, y).backward()
    finally:
        dist.destroy_process_group()
    plain(x, y).backward()
    torch.testing.assert_close(twin.fc.weight.grad, plain.fc.weight.grad, rtol=0, atol=0)
    assert isinstance(twin.loss_cls, lossgraph.CompiledLoss)
