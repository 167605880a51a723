"""Keeping the disk cache bounded: what is in it, stale temporary files, pruning, clearing.

Note [Cache bound]: an entry is about 40 KB and a handful of files, one per compiled variant, and
nothing ever removed them, so a long-lived machine grew its cache without bound. Now the
cache's "units" (an entry folder; a loose file such as a toolchain record; a quarantined file) are
pruned by last use: first every unit unused for LOSSGRAPH_CACHE_MAX_DAYS (default 30), then the
least recently used ones until the whole is under LOSSGRAPH_CACHE_MAX_MB (default 500). A unit's
last use is the newest mtime of its files; a disk hit refreshes it at most once a day
(cache.touch). This runs by itself at most once an hour at start-up (cache.maintain) and on
demand as `lossgraph cache prune`. Removing an entry is always safe: loaded kernels were
copied out (Note [Cache trust]) and a process writing into a removed folder degrades to its
private folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import cache

DEFAULT_MAX_MB = 500
DEFAULT_MAX_DAYS = 30
BOOKKEEPING = {".maintained", ".build.lock"}


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


def limits() -> tuple[float, float]:
    """(max megabytes, max days) from the environment; 0 turns a bound off."""
    return (_env_number("LOSSGRAPH_CACHE_MAX_MB", DEFAULT_MAX_MB),
            _env_number("LOSSGRAPH_CACHE_MAX_DAYS", DEFAULT_MAX_DAYS))


@dataclass
class Unit:
    """A removable piece of the cache: an entry folder or a loose file."""

    path: Path
    size: int
    used: float


def units(root: Path) -> list[Unit]:
    """Every entry folder (one with a meta.json, an artifact's .sha256 or a build lock) and every
    other file (toolchain records, quarantined files), with size and last use."""
    out = []
    for folder, _, names in os.walk(root):
        here = Path(folder)
        files = [f for f in names if f not in BOOKKEEPING]
        if here != Path(root) and any(f == "meta.json" or f.endswith(".sha256") or
                                      f == ".build.lock" for f in names):
            stats = [s for s in (_lstat(here / f) for f in files) if s]
            out.append(Unit(here, sum(s.st_size for s in stats),
                            max((s.st_mtime for s in stats), default=0.0)))
        else:
            out += [u for u in (_file_unit(here / f) for f in files) if u]
    return out


def _lstat(path: Path):
    try:
        return os.lstat(path)
    except OSError:
        return None


def _file_unit(path: Path) -> Unit | None:
    st = _lstat(path)
    return Unit(path, st.st_size, st.st_mtime) if st else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def prune(root: Path, max_mb: float | None = None, max_days: float | None = None,
          now: float | None = None) -> list[Unit]:
    """Remove units unused for max_days, then the least recently used beyond max_mb."""
    env_mb, env_days = limits()
    max_mb = env_mb if max_mb is None else max_mb
    max_days = env_days if max_days is None else max_days
    now = time.time() if now is None else now
    live = sorted(units(root), key=lambda u: u.used)
    removed = [u for u in live if max_days and now - u.used > max_days * 86400]
    live = [u for u in live if u not in removed]
    total = sum(u.size for u in live)
    while max_mb and live and total > max_mb * 1e6:
        u = live.pop(0)
        total -= u.size
        removed.append(u)
    for u in removed:
        _remove(u.path)
    return removed


def sweep_temps(root: Path, older_than: float = cache.TMP_STALE_S) -> int:
    """Remove temporary files (`*.tmp`) older than `older_than` seconds: left by a process that
    was killed mid-write. Younger ones may still be in use by a running build."""
    n, now = 0, time.time()
    for folder, _, files in os.walk(root):
        for f in files:
            p = Path(folder) / f
            st = _lstat(p)
            if f.endswith(".tmp") and st and now - st.st_mtime > older_than:
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
    return n


def sweep_private() -> None:
    """Remove the private folders of processes of this user that died without cleaning up
    (kill -9), once they are cache.TMP_STALE_S old."""
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for d in base.glob("lossgraph-*-*"):
            with contextlib.suppress(OSError, ValueError):
                st = os.lstat(d)
                pid = int(d.name.split("-")[1])
                old = time.time() - st.st_mtime > cache.TMP_STALE_S
                if cache._private(st) and old and not _alive(pid):
                    shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def info(root: Path) -> dict:
    """What `lossgraph cache info` shows: the folder, its state, entries by backend, sizes."""
    p = cache.place()
    backends: dict[str, int] = {}
    total = 0
    for u in units(root) if root.is_dir() else []:
        total += u.size
        rel = u.path.relative_to(root).parts
        kind = rel[0] if len(rel) > 1 else "other"
        backends[kind] = backends.get(kind, 0) + 1
    max_mb, max_days = limits()
    return {"folder": str(root), "enabled": cache.enabled(), "loads": p.read, "writes": p.write,
            "problem": p.why, "bytes": total, "units": backends,
            "bound": {"max_mb": max_mb, "max_days": max_days}}


def clear(root: Path) -> int:
    """Remove everything in the cache folder; returns the number of units removed."""
    found = units(root) if root.is_dir() else []
    for child in (root.iterdir() if root.is_dir() else []):
        _remove(child)
    return len(found)
