"""Stage 7: the on-disk cache. Entries are keyed by a hash of named components, written atomically.

Note [Cache keys]: the key is sha256 over a JSON dict of named components (schema, lossgraph
version and a hash of its own source files, backend, config + loss-definition fingerprint, variant, torch version and any backend
specifics such as the C compiler and its flags). The dict is stored beside the artifact as
meta.json, so a miss can be explained by diffing two of them. A write goes to a temporary file
that is renamed into place; an entry whose meta.json is missing, unreadable, or whose source no
longer matches its recorded hash is a miss, never a crash.

Note [Cache trust]: what is loaded from the cache runs as code (a dlopen'ed .so, an exec'd
TorchScript source, a cubin), so the cache is trusted the way pip's and Python's own caches are,
and a little more:
  - folders are created 0700; the cache folder, and every folder and file below it on the way
    to an artifact, must be owned by this user and not writable by group or others, and must
    not be a symlink. Otherwise nothing is loaded from it (one warning) and this process
    compiles into a private temporary folder instead (Note [Cache degradation]);
  - every binary artifact (.so, cubin) gets its sha256 written beside it (`<file>.sha256`,
    written before the artifact is renamed into place); the source's sha256 is in meta.json.
    A reader reads the whole file into memory and checks the hash there: a short, zeroed or
    edited file is a miss, rebuilt atomically under the folder lock, the damaged file moved to
    `quarantine/` first. A native library is then loaded from a fresh copy of those verified
    bytes in a process-private folder (backends/cpp.py), never from the cache path itself: no
    other process can change it between the check and dlopen, and a cache file truncated later
    cannot fault pages of an already loaded kernel (SIGBUS);
  - meta.json is a record for humans and for explaining misses: the loader re-derives every fact
    it acts on (parameter order, loss level, tables, access kinds) from lossgraph's code and
    from the verified source, and a meta.json that disagrees is a miss (compiler.py).

Note [Cache degradation]: the disk cache is an optimization, never a requirement. A cache folder
that cannot be created, is read-only, untrusted, or fills up (ENOSPC) means: one warning, then
every write of this process goes to a private temporary folder (0700, removed at exit); a warm
read-only cache is still read. LOSSGRAPH_DISABLE_CACHE=1 reads nothing and writes only into
that private folder. Temporary files (`*.tmp`) are removed when a write fails, and ones older
than TMP_STALE_S (left by a process killed mid-write) at the next maintenance, which runs at
most every MAINTAIN_EVERY_S at start-up and also bounds the cache (Note [Cache bound], prune.py);
the private folders of dead processes go when a process makes its own (prune.sweep_private).
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

SCHEMA = 3
STATS = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "renders": 0}
TMP_STALE_S = 600
MAINTAIN_EVERY_S = 3600
QUARANTINE = "quarantine"


class CacheWarning(UserWarning):
    """The disk cache could not be used as configured; lossgraph carries on without it."""


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    """A hash of lossgraph's own sources and templates: editing the compiler invalidates entries."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    tdirs = [root / "templates", root.parent / "templates"]
    files = sorted(root.rglob("*.py")) + sorted(p for d in tdirs if d.is_dir() for p in d.rglob("*.j2"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """$LOSSGRAPH_CACHE_DIR, else $XDG_CACHE_HOME/lossgraph, else ~/.cache/lossgraph."""
    env = os.environ.get("LOSSGRAPH_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lossgraph"


def enabled() -> bool:
    """False when LOSSGRAPH_DISABLE_CACHE is set (to anything but 0)."""
    return os.environ.get("LOSSGRAPH_DISABLE_CACHE", "") in ("", "0")


def digest(components: dict) -> str:
    """The cache key of a dict of named components."""
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def sha(text: str | bytes) -> str:
    """sha256 hex digest of a str (UTF-8) or bytes."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# -- where this process reads and writes -----------------------------------------------------------

@dataclass
class Place:
    """The configured cache folder and what this process may do with it."""

    root: Path
    read: bool          # entries may be loaded from root
    write: bool         # entries may be written into root
    why: str = ""       # why not, for the one warning


_PLACES: dict[tuple, Place] = {}
_WARNED: set[str] = set()


def place() -> Place:
    """The cache folder of this process, checked once per configuration (Note [Cache trust])."""
    key = (str(cache_dir()), enabled(), os.geteuid())
    p = _PLACES.get(key)
    if p is None:
        p = _PLACES[key] = _resolve(cache_dir())
        if p.why:
            _warn(p.why)
        if p.write:
            maintain(p.root)
    return p


def _resolve(root: Path) -> Place:
    if not enabled():
        return Place(root, False, False)
    try:
        _mkdirs(root)
        st = os.stat(root)
    except OSError as e:
        return Place(root, False, False, f"cannot create the cache folder {root} ({e.strerror})")
    if not _private(st):
        return Place(root, False, False, f"the cache folder {root} is not private to this user "
                     f"({_describe(st)}); nothing is loaded from it")
    if not os.access(root, os.W_OK):
        return Place(root, True, False, f"the cache folder {root} is read-only; new kernels are "
                     f"kept for this process only")
    return Place(root, True, True)


def _private(st: os.stat_result) -> bool:
    """A plain folder or file (lstat: not a symlink) of this user that only this user can write."""
    kind = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}"


def _warn(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"lossgraph: {msg}; compiling into a temporary folder instead",
                      CacheWarning, stacklevel=3)


def degrade(e: OSError) -> None:
    """A write into the cache failed (full, read-only): write privately for the rest of the run."""
    p = place()
    if p.write:
        p.write = False
        _warn(f"cannot write the cache folder {p.root} ({e.strerror or e})")


def _mkdirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every folder it creates (Note [Cache trust])."""
    if path.is_dir():
        return
    if path.parent != path:
        _mkdirs(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def trusted(path: Path) -> bool:
    """True when path and the folders between the cache folder (or private folder) and it are
    owned by this user, not writable by group or others, and not symlinks."""
    for base in _bases():
        try:
            rel = Path(path).relative_to(base)
        except ValueError:
            continue
        cur = base
        try:
            for part in rel.parts:
                cur = cur / part
                if not _private(os.lstat(cur)):
                    return False
        except OSError:
            return False
        return True
    return _outside_ok(Path(path))


def _outside_ok(path: Path) -> bool:
    """A path outside the cache (an ahead-of-time --out folder): the file and its folder."""
    try:
        return _private(os.lstat(path)) and _private(os.stat(path.parent))
    except OSError:
        return False


def _bases() -> list[Path]:
    mine = _PRIVATE.get(os.getpid())
    return ([place().root] if place().read else []) + ([mine] if mine else [])


# -- the private per-process folder ----------------------------------------------------------------

_PRIVATE: dict[int, Path] = {}
_PRIVATE_LOCK = threading.Lock()


def _private_root() -> Path:
    """A 0700 temporary folder of this process, removed when it exits."""
    pid = os.getpid()
    with _PRIVATE_LOCK:
        if pid not in _PRIVATE:
            from . import prune
            prune.sweep_private()
            _PRIVATE[pid] = Path(tempfile.mkdtemp(prefix=f"lossgraph-{pid}-"))
    return _PRIVATE[pid]


def private_mirror(folder: Path) -> Path:
    """Where a cache folder's files go when the cache cannot take them."""
    root = place().root
    try:
        rel = Path(folder).relative_to(root)
    except ValueError:
        rel = Path("other") / sha(str(folder))[:16]
    return _private_root() / rel


def scratch_dir() -> Path:
    """A process-private folder for files that must not outlive their use (loaded libraries)."""
    d = _private_root() / "scratch"
    _mkdirs(d)
    return d


@atexit.register
def _remove_private() -> None:
    d = _PRIVATE.get(os.getpid())
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


# -- reading and writing files ---------------------------------------------------------------------

def readable(folder: Path) -> list[Path]:
    """The folders a cache folder's files may be read from: itself, then its private mirror."""
    out = [Path(folder)] if place().read or not _under(folder, place().root) else []
    if os.getpid() in _PRIVATE:
        out.append(private_mirror(folder))
    return out


def writable(folder: Path) -> Path:
    """folder when this process may write the cache there, else its private mirror (created)."""
    folder, p = Path(folder), place()
    if not _under(folder, p.root):      # an ahead-of-time --out folder, or the private folder
        _mkdirs(folder)
        return folder
    if p.write:
        try:
            _mkdirs(folder)
            if trusted(folder):
                return folder
            _warn(f"the cache folder {folder} is not private to this user")
        except OSError as e:
            degrade(e)
    mirror = private_mirror(folder)
    _mkdirs(mirror)
    return mirror


def _under(path: Path, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def writing(folder: Path, fn):
    """fn(writable(folder)); when writing the cache fails (ENOSPC, EROFS), fn(private mirror)."""
    target = writable(folder)
    try:
        return fn(target)
    except OSError as e:
        if not _under(target, place().root):
            raise
        degrade(e)
        mirror = private_mirror(folder)
        _mkdirs(mirror)
        return fn(mirror)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path` (mode 0644
    less the umask, so that a warm cache can be shared read-only)."""
    path = Path(path)
    _mkdirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(path: Path) -> bytes | None:
    """The bytes of a trusted cache file, or None."""
    if not trusted(path):
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def put(path: Path, data: bytes) -> None:
    """Write an artifact and its sha256 (first: a reader never sees an artifact without one)."""
    write_atomic(Path(f"{path}.sha256"), sha(data) + "\n")
    write_atomic(path, data)


def get(path: Path) -> bytes | None:
    """The bytes of an artifact written by put() whose sha256 still matches, else None."""
    for folder in readable(Path(path).parent):
        p = folder / Path(path).name
        data, want = read(p), read(Path(f"{p}.sha256"))
        if data is not None and want is not None and \
                sha(data) == want.decode(errors="replace").strip():
            touch(p)
            return data
    return None


def set_aside(path: Path) -> None:
    """Move a damaged cache file (and its .sha256) into quarantine/, under the folder lock."""
    q = place().root / QUARANTINE
    for p in (Path(path), Path(f"{path}.sha256")):
        if p.exists() and _under(p, place().root):
            with contextlib.suppress(OSError):
                _mkdirs(q)
                os.replace(p, q / f"{int(time.time())}-{os.getpid()}-{p.parent.name[:16]}-{p.name}")


@contextlib.contextmanager
def lock(folder: Path):
    """An exclusive lock on a writable folder (several processes building one kernel)."""
    fd = os.open(Path(folder) / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- entries: meta.json + source -------------------------------------------------------------------

def entry_dir(backend: str, key: str) -> Path:
    """The folder of one entry in the configured cache."""
    return cache_dir() / backend / key[:2] / key


def load(backend: str, key: str) -> tuple[dict, str, Path] | None:
    """(meta, source, folder) of a complete, consistent, trusted entry, or None."""
    for d in readable(entry_dir(backend, key)):
        try:
            meta = json.loads(read(d / "meta.json") or b"")
            name = meta["source_file"]
            if Path(name).name != name:
                continue
            source = (read(d / name) or b"").decode()
            if meta.get("schema") != SCHEMA or sha(source) != meta["source_sha256"]:
                continue
        except (ValueError, KeyError, TypeError):
            continue
        touch(d / "meta.json")
        return meta, source, d
    return None


def store(backend: str, key: str, components: dict, source: str, source_file: str,
          extra: dict) -> Path:
    """Write source then meta.json (the entry counts as present only once meta.json exists);
    returns the folder written (the private mirror when the cache cannot take it)."""
    meta = {"schema": SCHEMA, "components": components, "source_file": source_file,
            "source_sha256": sha(source), **extra}

    def write(d: Path) -> Path:
        write_atomic(d / source_file, source)
        write_atomic(d / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
        return d
    return writing(entry_dir(backend, key), write)


def touch(path: Path) -> None:
    """Mark an entry used (for the age bound), at most once a day per entry; never fails."""
    try:
        if place().write and time.time() - os.stat(path).st_mtime > 86400:
            os.utime(path)
    except OSError:
        pass


def maintain(root: Path) -> None:
    """At most every MAINTAIN_EVERY_S: remove stale temporary files and apply the size/age bound."""
    stamp = root / ".maintained"
    try:
        if time.time() - os.stat(stamp).st_mtime < MAINTAIN_EVERY_S:
            return
    except OSError:
        pass
    try:
        write_atomic(stamp, "")
        from . import prune
        prune.sweep_temps(root)
        prune.prune(root)
    except OSError:
        pass
