"""The compile cache: memory hits, disk hits across processes, corrupt entries, named key parts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossgraph as lg
from lossgraph import cache
from conftest import BACKENDS

REPO = Path(__file__).resolve().parents[1]
CFG = dict(type="FocalLoss", gamma=1.5, alpha=0.3, loss_weight=0.9)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty cache folder for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("LOSSGRAPH_CACHE_DIR", str(d))
    monkeypatch.delenv("LOSSGRAPH_DISABLE_CACHE", raising=False)
    return d


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g), torch.tensor([0, 1, 4, 2, 3])


def stats_delta(fn):
    before = dict(cache.STATS)
    out = fn()
    return out, {k: cache.STATS[k] - before[k] for k in before}


def entries(d: Path, backend: str) -> list[Path]:
    return sorted(p.parent for p in (d / backend).glob("*/*/meta.json"))


def test_memory_hit(cache_dir, backend):
    loss = lg.compile(CFG, backend=backend)
    x, y = inputs()
    first, d1 = stats_delta(lambda: loss(x, y))
    second, d2 = stats_delta(lambda: loss(x, y))
    assert d1["misses"] == 1 and d1["renders"] == 1
    assert d2 == {"memory_hits": 1, "disk_hits": 0, "misses": 0, "renders": 0}
    assert torch.equal(first, second)


def test_disk_hit_in_the_same_process(cache_dir, backend):
    x, y = inputs()
    a, d1 = stats_delta(lambda: lg.compile(CFG, backend=backend)(x, y))
    b, d2 = stats_delta(lambda: lg.compile(CFG, backend=backend)(x, y))   # a new module
    assert d1["renders"] == 1
    assert d2["disk_hits"] == 1 and d2["renders"] == 0 and d2["misses"] == 0
    assert torch.equal(a, b)


SCRIPT = """
import json, torch, lossgraph as lg
from lossgraph import cache
g = torch.Generator().manual_seed(0)
x, y = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 4, 2, 3])
values = {{b: lg.compile({cfg!r}, backend=b)(x, y).item() for b in {backends!r}}}
print(json.dumps({{"stats": cache.STATS, "values": values}}))
"""


def test_disk_hit_in_a_second_process(cache_dir):
    """A second Python process with the same LOSSGRAPH_CACHE_DIR renders nothing (every backend
    in one child process: starting Python and torch is the slow part)."""
    x, y = inputs()
    cache.code_hash.cache_clear()      # hash lossgraph's sources now, as the child process will
    here = {b: lg.compile(CFG, backend=b)(x, y).item() for b in BACKENDS}
    env = {**os.environ, "LOSSGRAPH_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(cfg=CFG, backends=BACKENDS)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stats"]["renders"] == 0 and result["stats"]["misses"] == 0
    assert result["stats"]["disk_hits"] == len(BACKENDS)
    assert result["values"] == here


@pytest.mark.parametrize("damage", ["garbage meta", "empty meta", "meta without keys",
                                    "edited source", "missing source", "wrong schema"])
def test_corrupt_entry_is_a_miss_not_a_crash(cache_dir, damage, backend):
    x, y = inputs()
    good = lg.compile(CFG, backend=backend)(x, y)
    (entry,) = entries(cache_dir, backend)
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    source = entry / meta["source_file"]
    if damage == "garbage meta":
        meta_path.write_text("{not json")
    elif damage == "empty meta":
        meta_path.write_text("")
    elif damage == "meta without keys":
        meta_path.write_text(json.dumps({"schema": cache.SCHEMA}))
    elif damage == "edited source":
        source.write_text(source.read_text() + "\n# edited\n")
    elif damage == "missing source":
        source.unlink()
    else:
        meta_path.write_text(json.dumps({**meta, "schema": -1}))
    again, d = stats_delta(lambda: lg.compile(CFG, backend=backend)(x, y))
    assert d["misses"] == 1 and d["renders"] == 1 and d["disk_hits"] == 0
    assert torch.equal(again, good)
    # the entry was rewritten and is whole again
    fixed = json.loads(meta_path.read_text())
    assert fixed["source_sha256"] == cache.sha((entry / fixed["source_file"]).read_text())
    _, d = stats_delta(lambda: lg.compile(CFG, backend=backend)(x, y))
    assert d["disk_hits"] == 1 and d["renders"] == 0


def test_meta_json_holds_the_named_key_components(cache_dir, backend):
    x, y = inputs()
    loss = lg.compile(CFG, backend=backend)
    loss(x, y)
    (entry,) = entries(cache_dir, backend)
    meta = json.loads((entry / "meta.json").read_text())
    comps = meta["components"]
    for key in ("schema", "lossgraph", "backend", "spec", "variant", "torch"):
        assert key in comps, f"cache key component {key!r} missing from meta.json"
    assert comps["backend"] == backend and comps["lossgraph"] == lg.__version__
    assert comps["torch"] == torch.__version__ and comps["schema"] == cache.SCHEMA
    spec = json.loads(comps["spec"])
    assert spec["config"] == {**CFG, "activated": False, "use_sigmoid": True, "reduction": "mean"}
    assert "mean" in comps["variant"] and "labels" in comps["variant"]
    # the folder name is the digest of exactly these components
    assert entry.name == cache.digest(comps) and entry.parent.name == entry.name[:2]
    assert meta["source_sha256"] == cache.sha((entry / meta["source_file"]).read_text())
    assert not list(entry.glob(".*.tmp")), "a temporary file was left behind"


def test_key_changes_with_config_and_variant(cache_dir):
    x, y = inputs()
    lg.compile(CFG, backend="torchscript")(x, y)
    lg.compile({**CFG, "gamma": 2.5}, backend="torchscript")(x, y)
    lg.compile(CFG, backend="torchscript")(x, y, reduction_override="sum")
    lg.compile(CFG, backend="torchscript")(x.double(), y)
    assert len(entries(cache_dir, "torchscript")) == 4


def test_disable_cache_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("LOSSGRAPH_DISABLE_CACHE", "1")
    x, y = inputs()
    for backend in BACKENDS:
        _, d = stats_delta(lambda: lg.compile(CFG, backend=backend)(x, y))
        assert d["renders"] == 1
    # nothing at all in the cache folder: kernels went to this process's private folder,
    # which is removed at exit (tests/test_cache_faults.py checks that in a subprocess)
    assert not Path(cache_dir).exists()


def test_tests_never_use_the_home_cache():
    """conftest points the cache at a per-session temporary folder."""
    assert "LOSSGRAPH_CACHE_DIR" in os.environ
    assert not str(cache.cache_dir()).startswith(os.path.expanduser("~/.cache"))
