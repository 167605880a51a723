"""Reading loss configs for the CLI: a dict literal, a .json/.py file with one loss dict, or an
MMDetection model config whose `loss_*` dicts are collected wherever they sit.

Note [Config files]: a dict literal on the command line is evaluated from its syntax tree
(literals and dict(...) calls only, never eval). A .py file is executed as MMEngine executes
configs: its `_base_` files (paths relative to it) are loaded first and merged, references
`{{_base_.x}}` and `_base_.x` read (or assign) the bases' values, then the file's own variables
are merged over the bases (dicts recursively, `_delete_=True` replaces); modules, functions,
classes and names starting with '_' are dropped. The newer `with read_base():` style is not
supported. Executing a config file runs its code, exactly as MMEngine does; only point the CLI at
configs you trust.
"""
from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE_REF = re.compile(r"\{\{\s*_base_\.([\w.]+)\s*\}\}|\b_base_\.(?=[A-Za-z_])")


def literal(text: str) -> Any:
    """The value of a Python literal such as "dict(type='FocalLoss', gamma=2.0)", without eval."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"CONFIG {text!r} is neither a file nor a valid dict literal "
                          f"({e.msg})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and \
            isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
            and not node.args and all(kw.arg for kw in node.keywords):
        return {kw.arg: _value(kw.value) for kw in node.keywords}
    raise ConfigError(f"CONFIG may hold only literals and dict(...) calls, not "
                      f"{ast.unparse(node)!r}")


def load(arg: str) -> Any:
    """The object CONFIG names: a file's contents (.py, .json) or a dict literal."""
    path = Path(arg)
    if path.suffix in (".py", ".json") and not path.is_file():
        raise ConfigError(f"config file {arg} does not exist")
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{arg} is not valid JSON ({e})") from None
    if path.suffix == ".py":
        return load_py(path)
    return literal(arg)


def load_py(path: Path, _seen: tuple = ()) -> Any:
    """A .py config: a bare dict expression, or MMEngine-style variables merged over `_base_`."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path} includes itself through _base_")
    if not path.is_file():
        raise ConfigError(f"_base_ file {path} (of {_seen[-1]}) does not exist")
    tree = _parse(path.read_text(), path)
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
        return _value(tree.body[0].value)
    bases = next((_value(n.value) for n in tree.body if isinstance(n, ast.Assign) and
                  any(isinstance(t, ast.Name) and t.id == "_base_" for t in n.targets)), [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, load_py(path.parent / base, _seen + (path,)))
    # {{_base_.a.b}} and _base_.a.b (MMEngine's references to base variables, which may also be
    # assigned or deleted) become attribute accesses on the merged bases
    text = BASE_REF.sub(lambda m: f"__lg_base__.{m.group(1)}" if m.group(1) else "__lg_base__.",
                        path.read_text())
    scope: dict[str, Any] = {"__file__": str(path), "__name__": "__lossgraph_config__",
                             "__lg_base__": _Attrs(merged, "_base_")}
    try:
        exec(compile(_parse(text, path), str(path), "exec"), scope)  # noqa: S102 - see Note
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a config's own error, reported on one line
        raise ConfigError(f"{path}: executing the config raised {type(e).__name__}: {e}") from None
    own = {k: _plain(v) for k, v in scope.items() if not k.startswith("_") and
           not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    return merge(merged, own)


def _parse(text: str, path: Path) -> ast.Module:
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}") from None


class _Attrs:
    """Attribute access to a dict, as MMEngine's ConfigDict gives `_base_.a.b` (get, set, del)."""

    def __init__(self, d: dict, name: str):
        object.__setattr__(self, "_d", d)
        object.__setattr__(self, "_name", name)

    def __getattr__(self, k: str) -> Any:
        d = object.__getattribute__(self, "_d")
        if k in d:
            return _Attrs(d[k], f"{self._name}.{k}") if isinstance(d[k], dict) else d[k]
        if hasattr(d, k):              # dict methods: _base_.model.copy()
            return getattr(d, k)
        raise AttributeError(f"{self._name} has no key {k!r}")

    def __setattr__(self, k: str, v: Any) -> None:
        object.__getattribute__(self, "_d")[k] = v

    def __delattr__(self, k: str) -> None:
        del object.__getattribute__(self, "_d")[k]

    __getitem__, __setitem__, __delitem__ = __getattr__, __setattr__, __delattr__


def _plain(v: Any) -> Any:
    """v with every _Attrs view replaced by its dict."""
    if isinstance(v, _Attrs):
        v = object.__getattribute__(v, "_d")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def merge(base: Any, over: Any) -> Any:
    """MMEngine's merge: dicts merge key by key unless over has `_delete_=True`; else over wins."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    if over.get("_delete_"):
        return {k: v for k, v in over.items() if k != "_delete_"}
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if k in base else v
    return out


def losses(obj: Any) -> list[tuple[str, dict]]:
    """(path, loss dict) pairs: obj itself if it is a loss dict, else, in reading order, every
    dict inside it (an MMDetection model config) under a `loss`/`loss_*` key with a 'type', or
    under any key with a registered loss type (TOOD's `initial_loss_cls`, 'mmdet.' scopes too)."""
    if isinstance(obj, dict) and "type" in obj:
        return [("", obj)]
    found: list[tuple[str, dict]] = []
    _walk(obj, "", found)
    if not found and isinstance(obj, dict):
        typed = [(k, v) for k, v in obj.items() if isinstance(v, dict) and "type" in v]
        if len(typed) == 1:          # a .py file holding one loss dict under any name
            return typed
    return found


def _registered(name: Any) -> bool:
    """True when `name` (scoped or not) is a registered loss type."""
    from .config import unscoped
    from .registry import REGISTRY
    try:
        return isinstance(name, str) and unscoped(name) in REGISTRY
    except ConfigError:
        return False


def _walk(obj: Any, path: str, found: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            named = isinstance(k, str) and (k == "loss" or k.startswith("loss_"))
            if isinstance(v, dict) and "type" in v and (named or _registered(v["type"])):
                found.append((p, v))
            else:
                _walk(v, p, found)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", found)
