"""tools/train.py with MMDetection's losses and with lossgraph's: per-step losses agree within
the drift a 1-ulp perturbation causes, and the log lists every compiled loss.

Note [The 1-ulp control]: two float32 trainings that differ only in rounding drift apart, so no
fixed tolerance is right for every step. A third run (MMDetection's losses, every initial weight
and every input image moved one ulp up) measures that drift; for each logged loss, lossgraph's
distance to MMDetection's run must stay within the control's largest distance over the run, or
within 4 float32 ulps of the value (a reduction's rounding: at step 1 the control can agree
exactly while lossgraph's double accumulation differs in the last bits).
"""
from __future__ import annotations

import math

import pytest

import train_support as T

pytestmark = pytest.mark.mmdet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    T.write_dataset(root)
    return root


def ulp32(x: float) -> float:
    return 2.0 ** (math.frexp(abs(x))[1] - 24) if x else 2.0 ** -149


@pytest.mark.parametrize("model", list(T.MODELS))
def test_training_matches_mmdetection(model, data, tmp_path):
    mm, _ = T.train(model, tmp_path / "mmdet", data, lossgraph=False)
    lg, log = T.train(model, tmp_path / "lossgraph", data, lossgraph=True)
    ctrl, _ = T.train(model, tmp_path / "control", data, lossgraph=False, control=True)
    assert len(mm) == len(lg) == len(ctrl) == T.STEPS
    keys = [k for k in mm[0] if k.startswith("loss")]
    assert len(keys) == len(T.MODELS[model][2]) + 1, keys      # each head loss, then their sum
    for k in keys:
        drift = max(abs(c[k] - m[k]) for c, m in zip(ctrl, mm))
        print(f"{model} {k}: max |lossgraph - mmdet| {max(abs(a[k] - m[k]) for a, m in zip(lg, mm)):.2e}, "
              f"control drift {drift:.2e}, final mmdet {mm[-1][k]:.6f}")
        for step, (a, m) in enumerate(zip(lg, mm)):
            assert math.isfinite(a[k])
            bound = max(drift, 4 * ulp32(m[k]))
            assert abs(a[k] - m[k]) <= bound, (model, k, step, a[k], m[k], drift)
    compiled = [line.split("lossgraph: compiled ")[1] for line in log.splitlines()
                if "lossgraph: compiled " in line]
    assert len(compiled) == len(T.MODELS[model][2]), compiled
