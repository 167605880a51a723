"""Inspection: write every stage of a compiled variant into a folder, numbered in stage order."""
from __future__ import annotations

import json
import os
from pathlib import Path


def dump_root(explicit: str | None) -> str | None:
    """dump_dir= if given, else $LOSSGRAPH_DUMP_DIR, else None."""
    return explicit or os.environ.get("LOSSGRAPH_DUMP_DIR") or None


def variant_folder(root: str | Path, loss: str, tag: str) -> Path:
    """root/<loss>/<tag>, refusing any path that would leave root (Note [Loss names])."""
    base = Path(root).resolve()
    folder = (base / loss / tag).resolve()
    if base not in folder.parents:
        raise ValueError(f"dump folder {folder} for loss {loss!r} would be outside {base}")
    return folder


def write_stages(folder: str | Path, config: dict, stages, source: str, suffix: str,
                 extra: dict[str, str] | None = None) -> list[str]:
    """00_config.json, NN_<stage>.txt/.dot for each stage, then the generated source."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    written = [d / "00_config.json"]
    written[0].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for k, (name, g) in enumerate(stages, start=1):
        (d / f"{k:02d}_{name}.txt").write_text(g.text() + "\n")
        (d / f"{k:02d}_{name}.dot").write_text(g.dot() + "\n")
        written += [d / f"{k:02d}_{name}.txt", d / f"{k:02d}_{name}.dot"]
    src = d / f"{len(stages) + 1:02d}_source{suffix}"
    src.write_text(source)
    written.append(src)
    for name, text in (extra or {}).items():
        (d / name).write_text(text)
        written.append(d / name)
    return [str(p) for p in written]
