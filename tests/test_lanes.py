"""The cpp lanes schedule (Note [Rows across lanes]): short rows batched LG_RB at a time, the rest
of a chunk row by row. Row counts around the group size and widths around LANES_K, against the
float64 references, with labels that miss every column, ignored labels and non-finite logits."""
from __future__ import annotations

import pytest
import torch

import lossgraph as lg
from lossgraph.backends import cpp
from lossgraph.backends.lanes import LANES_K
from conftest import assert_close
from reference_losses import reference
from reference_zoo import zoo_reference

pytestmark = pytest.mark.skipif(not cpp.available("cpu"), reason="no C compiler")


def _grad(loss, pred, *args, **kw):
    p = pred.detach().clone().requires_grad_(True)
    out = loss(p, *args, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), p.grad


def _check(cfg, ref_fn, pred, *args, **kw):
    """cpp float32 against the float64 reference, value and d/dpred."""
    out, grad = _grad(lg.compile(cfg, backend="cpp"), pred.float(), *args, **kw)
    ref_args = [a.double() if a.is_floating_point() else a for a in args]
    ref_kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kw.items()}
    rout, rgrad = _grad(lambda p, *a, **k: ref_fn(cfg, p, *a, **k), pred.double(), *ref_args,
                        **ref_kw)
    assert_close(out, rout, torch.float32, f"{cfg['type']} value")
    assert_close(grad, rgrad, torch.float32, f"{cfg['type']} d/dpred")


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 37])
@pytest.mark.parametrize("width", [1, 2, 21, LANES_K, LANES_K + 1])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softmax_ce_rows_and_widths(rows, width, reduction):
    g = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, width, (rows,), generator=g)
    y[::5] = -100                                  # ignored rows inside a group
    w = torch.rand(rows, generator=g, dtype=torch.float64)
    cfg = dict(type="CrossEntropyLoss", reduction=reduction, ignore_index=-100)
    _check(cfg, reference, x, y, weight=w)


@pytest.mark.parametrize("rows", [8, 13, 40])
def test_dfl_rows(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 17, generator=g, dtype=torch.float64)
    t = torch.rand(rows, generator=g, dtype=torch.float64) * 15.99
    t[3] = 15.999                                  # the last bin pair
    t[5] = 7.0                                     # a whole-number target
    _check(dict(type="DistributionFocalLoss"), zoo_reference, x, t,
           weight=torch.rand(rows, generator=g, dtype=torch.float64), avg_factor=3.0)


def test_kd_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 17, generator=g, dtype=torch.float64) * 2
    soft = torch.randn(21, 17, generator=g, dtype=torch.float64) * 2
    _check(dict(type="KnowledgeDistillationKLDivLoss", T=10, reduction="none"), zoo_reference,
           x, soft)


def test_non_finite_lanes_match_torch():
    """NaN and +-inf inside a lane group give what torch's float32 cross-entropy gives."""
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    x[1, 2], x[4, 0], x[9, :] = float("nan"), float("-inf"), float("-inf")
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(3))
    y[4] = 1
    out, grad = _grad(lg.compile(dict(type="CrossEntropyLoss", reduction="none"),
                                 backend="cpp"), x, y)
    ref = torch.nn.functional.cross_entropy(x, y, reduction="none")
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32, "finite rows")


def test_schedule_choice():
    """Row losses (softmax, the labels form of sigmoid losses) get the lanes section; flat
    losses and rows with a skip guard (Seesaw's background rows) do not."""
    def source(cfg, *args):
        loss = lg.compile(cfg, backend="cpp")
        loss(*args)
        return loss.source
    assert "Rows across lanes" in source(dict(type="DistributionFocalLoss"), torch.randn(9, 17),
                                         torch.rand(9) * 15)
    assert "lg_rl" in source(dict(type="FocalLoss"), torch.randn(9, 4), torch.randint(0, 5, (9,)))
    assert "lg_rl" not in source(dict(type="L1Loss"), torch.randn(9, 4), torch.randn(9, 4))
    seesaw = source(dict(type="SeesawLoss", num_classes=6), torch.randn(9, 8),
                    torch.randint(0, 7, (9,)))
    assert "Skipped rows" in seesaw and "lg_rl" not in seesaw


@pytest.mark.parametrize("bad", [-1.0, 16.0, float("nan"), float("inf")])
def test_dfl_target_check_native_pass(bad):
    """The one-pass native check of DFL targets (-1 < y < n) agrees with the torch check it
    skips: -0.5 (bin -0) and 15.999 pass, -1, n - 1, NaN and inf raise the same error."""
    from lossgraph.errors import InputError
    loss = lg.compile(dict(type="DistributionFocalLoss"), backend="cpp")
    x, t = torch.randn(9, 17), torch.rand(9) * 15
    t[0], t[1] = -0.5, 15.999
    loss(x, t)
    t[4] = bad
    with pytest.raises(InputError, match="targets must lie in"):
        loss(x, t)
