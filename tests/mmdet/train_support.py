"""The optional job's training runs: a tiny synthetic COCO dataset, configs derived from
MMDetection's own (a ResNet-18 backbone with 32-channel FPN and head, 64x96 images), and
tools/train.py runs whose per-step losses are read back from mmengine's scalars.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# name -> (config under mmdet/.mim/configs, how lossgraph is switched on)
# 'env': the unchanged config with LOSSGRAPH_MMDET=all; 'scope': loss types rewritten to lossgraph.X
MODELS = {
    "retinanet": ("retinanet/retinanet_r50_fpn_1x_coco.py", "env",
                  ("loss_cls", "loss_bbox")),
    "fcos": ("fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", "scope",
             ("loss_cls", "loss_bbox", "loss_centerness")),
    "gfl": ("gfl/gfl_r50_fpn_1x_coco.py", "env", ("loss_cls", "loss_bbox", "loss_dfl")),
    "atss": ("atss/atss_r50_fpn_1x_coco.py", "scope",
             ("loss_cls", "loss_bbox", "loss_centerness")),
}
STEPS = 6


def mmdet_configs() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("mmdet")
    return Path(spec.origin).parent / ".mim" / "configs"


def write_dataset(root: Path, n_images: int = 4, h: int = 64, w: int = 96) -> None:
    """n_images random-noise PNGs with 1-3 boxes each of COCO classes person/bicycle/car."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", height=h, width=w))
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(rng.integers(1, 4)),
                             bbox=[x, y, bw, bh], area=bw * bh, iscrowd=0))
    cats = [dict(id=1, name="person"), dict(id=2, name="bicycle"), dict(id=3, name="car")]
    (root / "ann.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))


def write_config(path: Path, model: str, data: Path, lossgraph: bool, control: bool) -> None:
    """A config whose _base_ is MMDetection's, shrunk to a CPU-sized network and dataset."""
    base, mode, losses = MODELS[model]
    base_cfg = mmdet_configs() / base
    head = ""
    if lossgraph and mode == "scope":
        from mmengine.config import Config
        cfg = Config.fromfile(str(base_cfg))
        types = {k: cfg.model.bbox_head[k]["type"] for k in losses}
        head = "".join(f"{k}=dict(type='lossgraph.{t}'), " for k, t in types.items())
    hooks = "[dict(type='UlpPerturbHook')]" if control else "[]"
    path.write_text(f"""
_base_ = {str(base_cfg)!r}
custom_imports = dict(imports=['lossgraph.mmdet', 'ulp_hook'], allow_failed_imports=False)
model = dict(
    backbone=dict(depth=18, init_cfg=None, frozen_stages=-1),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1, {head}))
pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(96, 64), keep_ratio=True), dict(type='PackDetInputs')]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False), batch_sampler=None,
    dataset=dict(data_root={str(data) + '/'!r}, ann_file='ann.json', data_prefix=dict(img='imgs/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=pipeline))
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={STEPS})
param_scheduler = []
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=1000, by_epoch=False, save_last=False))
log_processor = dict(window_size=1, by_epoch=False)
custom_hooks = {hooks}
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='gloo'))
""")


def train(model: str, work: Path, data: Path, lossgraph: bool, control: bool = False,
          backend: str = "auto") -> tuple[list[dict], str]:
    """Run tools/train.py; return (per-step loss dicts, the run's log text)."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "config.py"
    write_config(cfg, model, data, lossgraph, control)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    env.pop("LOSSGRAPH_MMDET", None)
    env["LOSSGRAPH_MMDET_BACKEND"] = backend
    # one thread: on a small shared CPU, OpenMP's spinning threads make each step several times
    # slower; results do not depend on it (lossgraph's reductions are thread-count independent)
    env.setdefault("OMP_NUM_THREADS", "1")
    if lossgraph and MODELS[model][1] == "env":
        env["LOSSGRAPH_MMDET"] = "all"
    proc = subprocess.run([sys.executable, str(HERE / "run_train.py"), str(cfg), "--work-dir",
                           str(work)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{model} training failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    scalars = sorted(work.glob("*/vis_data/scalars.json"))[-1]
    steps = [json.loads(line) for line in scalars.read_text().splitlines()]
    log = sorted(work.glob("*/*.log"))[-1].read_text()
    return [s for s in steps if "loss" in s], log
