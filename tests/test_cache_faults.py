"""Cache faults, each followed by a fresh Python process using the cache: damaged, edited and
foreign artifacts, untrusted folders, read-only, full and disabled caches, lying compilers,
kill -9 in the middle of a build. Every later process must exit 0 with the reference numbers
and must not load foreign code (Note [Cache trust], Note [Cache degradation])."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lossgraph as lg
from lossgraph import cache, prune
from lossgraph.backends import cpp
from conftest import BACKENDS, assert_close
from reference_losses import reference

REPO = Path(__file__).resolve().parents[1]
# each scenario runs in fresh subprocesses (an import of torch each): the slow job runs them
pytestmark = pytest.mark.slow
CFG = dict(type="FocalLoss", gamma=1.5, alpha=0.3, loss_weight=0.9)
FOREIGN_UID = 12345
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="needs a C compiler")

CHILD = r"""
import json, os, sys, warnings
{prelude}
import torch, lossgraph as lg
from lossgraph import cache
warnings.simplefilter("always")
results = []
for cfg, backend in {jobs!r}:
    with warnings.catch_warnings(record=True) as caught:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g, requires_grad=True)
        args = (torch.randn(64, 8, generator=g), torch.rand(64, 8, generator=g)) \
            if cfg["type"] == "L1Loss" else (torch.randint(0, 9, (64,), generator=g),)
        before = dict(cache.STATS)
        loss = lg.compile(cfg, backend=backend)
        out = loss(x, *args)
        out.backward()
    ran = [getattr(loss.compiler, f"_compiled_{{i}}").backend.name
           for i in range(len(loss.compiler._variants))]
    results.append({{"cfg": cfg, "loss": out.item(), "grad": x.grad.flatten().tolist(),
                    "ran": ran, "stats": {{k: cache.STATS[k] - before[k] for k in before}},
                    "warnings": [str(w.message) for w in caught]}})
print(json.dumps({{"results": results, "private": str(cache._PRIVATE.get(os.getpid(), ""))}}))
"""


def cfgs(n: int) -> list[dict]:
    """n configs with different kernels (one cache entry each)."""
    return [{**CFG, "loss_weight": 0.5 + i / 8} for i in range(n)]


# Note: read-only and full disks are simulated by injecting the errno a real one gives (mount
# needs privileges CI does not have): os.open/os.mkdir/io.open for writing under the cache folder
# raise it, and for read-only os.access reports the folder unwritable, as on a read-only mount.
INJECT = r"""
import builtins, errno, io, os
ROOT, ERR = os.environ["LOSSGRAPH_CACHE_DIR"], errno.{errno}
def _inside(p):
    return os.path.abspath(os.fsdecode(p)).startswith(ROOT)
def _fail(p):
    raise OSError(ERR, os.strerror(ERR), os.fsdecode(p))
_open, _mkdir, _ioopen, _access = os.open, os.mkdir, io.open, os.access
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
os.open = lambda p, f, *a, **k: _fail(p) if _inside(p) and f & WRITE else _open(p, f, *a, **k)
os.mkdir = lambda p, *a, **k: _fail(p) if _inside(p) else _mkdir(p, *a, **k)
def _io(p, mode="r", *a, **k):
    if isinstance(p, (str, bytes, os.PathLike)) and _inside(p) and set(mode) & set("wax+"):
        _fail(p)
    return _ioopen(p, mode, *a, **k)
io.open = builtins.open = _io
if {readonly}:
    os.access = lambda p, m, *a, **k: False if _inside(p) and m & os.W_OK else _access(p, m, *a, **k)
"""


def child(root: Path, jobs: list, prelude: str = "", env: dict | None = None,
          wait: bool = True):
    """Run CHILD on jobs [(cfg, backend)] with the cache at root; it must exit 0 and every loss
    and gradient must equal the float64 reference. Returns what it printed."""
    full = {k: v for k, v in os.environ.items() if k != "LOSSGRAPH_DISABLE_CACHE"}
    full.update({"LOSSGRAPH_CACHE_DIR": str(root), **(env or {})})
    cmd = [sys.executable, "-c", CHILD.format(prelude=prelude, jobs=jobs)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"child died with {r.returncode}:\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for res in out["results"]:
        assert_reference(res)
    return out


def assert_reference(res: dict) -> None:
    """A child's loss and gradient equal the float64 reference (float32 tolerance)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g).double().requires_grad_(True)
    args = (torch.randn(64, 8, generator=g).double(), torch.rand(64, 8, generator=g).double()) \
        if res["cfg"]["type"] == "L1Loss" else (torch.randint(0, 9, (64,), generator=g),)
    ref = reference(res["cfg"], x, *args)
    ref.backward()
    what = f"{res['cfg']} on {res['ran']}"
    assert_close(torch.tensor(res["loss"]), ref, torch.float32, f"loss of {what}")
    assert_close(torch.tensor(res["grad"]), x.grad.flatten(), torch.float32, f"grad of {what}")


L1W = dict(type="L1Loss", loss_weight=2.0)    # with a weight: uses the native helper library
WARM = [(c, b) for c in cfgs(6) for b in BACKENDS] + [(L1W, "torchscript")]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache warmed once by a child process (six configs x backends); tests copy it."""
    root = tmp_path_factory.mktemp("warm") / "a" / "cache"
    child(root, WARM)
    return root


@pytest.fixture
def root(warm, tmp_path):
    """A private copy of the warm cache for one test."""
    d = tmp_path / "cache"
    shutil.copytree(warm, d, symlinks=True)
    return d


def entry(root: Path, backend: str, cfg: dict) -> Path:
    """The entry folder of cfg's default variant."""
    for meta in (root / backend).glob("*/*/meta.json"):
        if json.loads(json.loads(meta.read_text())["components"]["spec"])["config"][
                "loss_weight"] == cfg["loss_weight"]:
            return meta.parent
    raise AssertionError(f"no {backend} entry for {cfg}")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".build.lock"}


def test_new_cache_folders_are_private(warm):
    for d in [warm.parent, warm] + [p for p in warm.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


DAMAGES = ["truncated", "zeroed", "empty", "random", "edited", "foreign"]


def damage(so: Path, how: str) -> None:
    data = so.read_bytes()
    if how == "truncated":
        so.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":       # code pages zeroed, size unchanged
        so.write_bytes(data[:4096] + bytes(len(data) - 8192) + data[-4096:])
    elif how == "empty":
        so.write_bytes(b"")
    elif how == "random":
        so.write_bytes(os.urandom(len(data)))
    elif how == "edited":       # one byte of the code changed
        n = len(data) // 2
        so.write_bytes(data[:n] + bytes([data[n] ^ 0x40]) + data[n + 1:])
    else:                       # the right bytes, in a file another user could have written
        os.chown(so, FOREIGN_UID, FOREIGN_UID)


@needs_cpp
def test_damaged_kernels_are_rebuilt(root):
    """One damage per cached kernel, the helper library truncated, and one entry folder that
    group and others may write: one later process gets every number right."""
    sos = {}
    for cfg, how in zip(cfgs(6), DAMAGES):
        (sos[how],) = entry(root, "cpp", cfg).glob("kernel-*.so")
        damage(sos[how], how)
    (helper,) = (root / "cpp" / "helpers").glob("kernel-*.so")
    damage(helper, "truncated")
    shared = entry(root, "torchscript", cfgs(1)[0])
    os.chmod(shared, 0o777)
    out = child(root, [(c, "cpp") for c in cfgs(6)] + [(L1W, "torchscript"),
                                                       (cfgs(1)[0], "torchscript")])
    for res in out["results"][:6]:
        assert res["ran"] == ["cpp"] and res["stats"]["renders"] == 0   # the .so was rebuilt
    for how, so in [*sos.items(), ("helper", helper)]:
        assert cache.sha(so.read_bytes()) == Path(f"{so}.sha256").read_text().strip(), how
        assert os.stat(so).st_uid == os.geteuid(), how
    assert len(list((root / cache.QUARANTINE).iterdir())) >= 6, "damaged files not moved aside"
    assert out["results"][-1]["stats"]["renders"] == 1, "a group-writable entry was loaded"
    assert any("not private to this user" in w for w in out["results"][-1]["warnings"])


EDITS = ["params reversed", "param dropped", "loss level", "tables", "access"]


def test_meta_json_is_not_trusted(root):
    """Parameter order comes from the code; any other disagreement with the code is a miss."""
    jobs = []
    for cfg, edit in zip(cfgs(5), EDITS):
        for backend in BACKENDS:
            meta_path = entry(root, backend, cfg) / "meta.json"
            meta = json.loads(meta_path.read_text())
            if edit == "params reversed":
                meta["params"] = meta["params"][::-1]
            elif edit == "param dropped":
                meta["params"] = [p for p in meta["params"] if p != "label"]
            elif edit == "loss level":
                meta["loss_level"] = (meta["loss_level"] + 1) % 3
            elif edit == "tables":
                meta["tables"] = {"label": [1.0] * 8}
            else:
                meta["access"] = {k: "col" for k in meta["access"]}
            meta_path.write_text(json.dumps(meta))
            jobs.append((cfg, backend))
    out = child(root, jobs)
    for (cfg, backend), res in zip(jobs, out["results"]):
        assert res["ran"] == [backend]
        assert res["stats"]["renders"] == (cfg != cfgs(1)[0]), (cfg, backend)


@pytest.mark.parametrize("how", ["world-writable", "foreign owner"])
def test_untrusted_cache_is_not_loaded(root, how):
    if how == "world-writable":
        os.chmod(root, 0o777)
    else:
        os.chown(root, FOREIGN_UID, FOREIGN_UID)
    before = files(root)
    out = child(root, [(cfgs(1)[0], b) for b in BACKENDS])
    for res in out["results"]:
        assert res["stats"]["renders"] == 1 and res["stats"]["disk_hits"] == 0
    assert sum("not private to this user" in w for r in out["results"] for w in r["warnings"]) == 1
    assert files(root) == before, "an untrusted cache folder was written"


def inject(fault: str) -> str:
    return INJECT.format(errno="EROFS" if fault == "read-only" else "ENOSPC",
                         readonly=fault == "read-only")


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_read_only_or_full_cache(root, fault):
    """Warm kernels are loaded from it; new ones are compiled into the private folder after
    one warning; nothing in the cache changes and the private folder goes at exit."""
    before = files(root)
    new = {**CFG, "loss_weight": 3.0}
    out = child(root, [(c, b) for c in (cfgs(1)[0], new) for b in BACKENDS], inject(fault))
    warm, cold = out["results"][:len(BACKENDS)], out["results"][len(BACKENDS):]
    assert all(r["stats"]["disk_hits"] == 1 and r["stats"]["renders"] == 0 for r in warm)
    assert [r["ran"] for r in cold] == [[b] for b in BACKENDS]
    said = [w for r in out["results"] for w in r["warnings"]]
    assert sum("compiling into a temporary folder" in w for w in said) == 1, said
    assert files(root) == before, "a read-only/full cache was written"
    assert not list(root.rglob("*.tmp"))
    assert not Path(out["private"]).exists(), "the private folder outlived its process"


def test_disable_cache_writes_nothing_persistent(tmp_path):
    root = tmp_path / "cache"
    out = child(root, [(c, b) for c in cfgs(1) for b in BACKENDS],
                env={"LOSSGRAPH_DISABLE_CACHE": "1"})
    for res in out["results"]:
        assert res["stats"]["renders"] == 1
    assert out["private"] and not Path(out["private"]).exists()
    assert not root.exists()


FAKE_CC = """#!/bin/sh
# a C compiler that {what}
for a in "$@"; do case "$a" in --version) exec {gcc} --version;; esac; done
out=""; prev=""; src=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; case "$a" in *.c) src="$a";; esac; prev="$a"; done
case "$src" in */probe.c) exec {gcc} "$@";; esac
{body}
"""
LIES = {
    "garbage": ("exits 0 but writes garbage", 'head -c 20000 /dev/urandom > "$out"; exit 0'),
    "short": ("exits 0 but writes a truncated library",
              '{gcc} "$@" || exit 1; head -c 3000 "$out" > "$out.x"; mv "$out.x" "$out"; exit 0'),
}


def fake_cc(tmp_path: Path, lie: str, what: str = "", body: str = "") -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    what, body = LIES[lie] if lie in LIES else (what, body)
    path = tmp_path / f"cc-{lie}"
    path.write_text(FAKE_CC.format(what=what, gcc=gcc, body=body.format(gcc=gcc)))
    path.chmod(0o755)
    return str(path)


@needs_cpp
@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_compiler_falls_back_and_caches_no_library(tmp_path, lie):
    root = tmp_path / "cache"
    (res,) = child(root, [(CFG, "cpp")], env={"CC": fake_cc(tmp_path, lie)})["results"]
    assert res["ran"] == ["torchscript"]
    assert any("falling back to torchscript" in w for w in res["warnings"])
    assert not list(root.rglob("kernel-*.so")) and not list(root.rglob("*.tmp"))


@needs_cpp
def test_failed_toolchain_probe_is_retried(monkeypatch, tmp_path):
    """A failed probe is remembered for PROBE_RETRY_S, not forever."""
    monkeypatch.setenv("LOSSGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    cpp._toolchain.cache_clear()
    try:
        good = cpp._toolchain()
        (memo,) = (tmp_path / "cache" / "cpp").glob("toolchain-*.json")
        for age, expect in ((0, False), (cpp.PROBE_RETRY_S + 1, True)):
            memo.write_text(json.dumps({**good, "ok": False, "time": time.time() - age}))
            cpp._toolchain.cache_clear()
            assert cpp._toolchain()["ok"] is expect
    finally:
        cpp._toolchain.cache_clear()


SLOW = ("writes half a library, then hangs",
        '{gcc} "$@" || exit 1; head -c 3000 "$out" > "$out.x"; mv "$out.x" "$out"; sleep 120')


@needs_cpp
def test_kill_9_mid_build(tmp_path):
    """A process killed while building leaves a temporary file and a lock: the next process
    builds the kernel; the next maintenance removes stale temporary files and private folders."""
    root = tmp_path / "cache"
    proc = child(root, [(CFG, "cpp")], env={"CC": fake_cc(tmp_path, "slow", *SLOW)}, wait=False)
    deadline = time.time() + 120
    while not [p for p in root.rglob("*.so.tmp") if p.stat().st_size] and time.time() < deadline:
        assert proc.poll() is None, "the build finished instead of hanging"
        time.sleep(0.1)
    privates = list(Path(cache.tempfile.gettempdir()).glob(f"lossgraph-{proc.pid}-*"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(root.rglob("*.so.tmp"))
    assert stale and privates
    old = time.time() - 2 * cache.TMP_STALE_S
    for p in stale + privates:
        os.utime(p, (old, old))
    (root / ".maintained").unlink()
    (res,) = child(root, [(CFG, "cpp")])["results"]
    assert res["ran"] == ["cpp"]
    assert not list(root.rglob("*.tmp")) and not any(p.exists() for p in privates)


def test_prune_bounds_the_cache(root):
    units = prune.units(root)
    assert units and sum(u.size for u in units) > 0
    old = time.time() - 40 * 86400
    victim = units[0].path
    for p in [victim, *victim.rglob("*")] if victim.is_dir() else [victim]:
        os.utime(p, (old, old))
    removed = prune.prune(root, max_mb=500, max_days=30)
    assert [u.path for u in removed] == [victim] and not victim.exists()
    prune.prune(root, max_mb=1e-6, max_days=0)
    assert prune.units(root) == []


def test_cache_command(root, capsys, monkeypatch):
    from lossgraph.cli import main
    monkeypatch.setenv("LOSSGRAPH_CACHE_DIR", str(root))
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["folder"] == str(root) and info["loads"] and info["writes"]
    assert info["bytes"] > 0 and set(info["units"]) >= set(BACKENDS)
    assert info["bound"] == {"max_mb": prune.DEFAULT_MAX_MB, "max_days": prune.DEFAULT_MAX_DAYS}
    assert main(["cache", "info"]) == 0
    assert "read-write" in capsys.readouterr().out
    assert main(["cache", "prune", "--max-days", "0", "--max-mb", "0"]) == 0
    assert "removed 0 entries" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed" in capsys.readouterr().out and not list(root.iterdir())


def test_noexec_private_folder_falls_back_to_an_anonymous_copy(monkeypatch):
    """Note [Anonymous copy]: when the private copy cannot be written or mapped executable (a
    noexec TMPDIR), verified bytes are loaded from a memfd and the kernel runs."""
    from lossgraph.backends import elf
    if not cpp.available("cpu") or not hasattr(os, "memfd_create"):
        pytest.skip("needs a C compiler and memfd_create")

    def noexec(data, key):
        raise OSError("failed to map segment from shared object")
    monkeypatch.setattr(elf, "_from_private_copy", noexec)
    monkeypatch.setattr(elf, "_LOADED", {})
    loss = lg.compile(dict(type="L1Loss", loss_weight=3.0625), backend="cpp")   # a new kernel
    x, t = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(loss(x, t), 3.0625 * (x - t).abs().mean())
    assert loss._last.backend.name == "cpp"
    assert any(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:lossgraph-")
               for fd in elf._MEMFDS)
