"""Stage 7: the on-disk cache. Entries are keyed by a hash of named components, written atomically.

Note [Cache keys]: the key is sha256 over a JSON dict of named components (schema, lossgraph
version and a hash of its own source files, backend, config + loss-definition fingerprint, variant, torch version and any backend
specifics such as the C compiler and its flags). The dict is stored beside the artifact as
meta.json, so a miss can be explained by diffing two of them. A write goes to a temporary file
that is renamed into place; an entry whose meta.json is missing, unreadable, or whose source no
longer matches its recorded hash is a miss, never a crash.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

SCHEMA = 2
STATS = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "renders": 0}


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
    return os.environ.get("LOSSGRAPH_DISABLE_CACHE", "") in ("", "0")


def digest(components: dict) -> str:
    """The cache key of a dict of named components."""
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def entry_dir(backend: str, key: str) -> Path:
    return cache_dir() / backend / key[:2] / key


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(backend: str, key: str) -> tuple[dict, str] | None:
    """(meta, source) of a complete, consistent entry, or None."""
    if not enabled():
        return None
    d = entry_dir(backend, key)
    try:
        meta = json.loads((d / "meta.json").read_text())
        source = (d / meta["source_file"]).read_text()
        if meta.get("schema") != SCHEMA or sha(source) != meta["source_sha256"]:
            return None
        return meta, source
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(backend: str, key: str, components: dict, source: str, source_file: str,
          extra: dict) -> Path:
    """Write source then meta.json (the entry counts as present only once meta.json exists)."""
    d = entry_dir(backend, key)
    if not enabled():
        return d
    write_atomic(d / source_file, source)
    meta = {"schema": SCHEMA, "components": components, "source_file": source_file,
            "source_sha256": sha(source), **extra}
    write_atomic(d / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    return d
