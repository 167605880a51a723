"""The command line: ahead-of-time compilation of loss configs, no GPU needed.

    python -m lossgraph compile "dict(type='FocalLoss')" --backend cuda --arch sm_90 --out DIR
    lossgraph compile configs/retinanet/retinanet_r50_fpn_1x_coco.py --backend cpp --out DIR
    lossgraph list
    lossgraph cache info|prune|clear
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import __version__, aot, configfile, dump
from .build import Variant
from .compiler import Compiler
from .config import parse, public_names
from .errors import BackendError, ConfigError

DTYPES = ("float32", "float16", "bfloat16", "float64")
WEIGHTS = ("none", "elem", "row", "col", "scalar")
LABEL_DTYPES = ("int64", "int32", "int16", "int8", "uint8")

EPILOG = """\
CONFIG is one of
  - a dict literal: "dict(type='FocalLoss', gamma=2.0)" (read from its syntax, never eval'd)
  - a .json or .py file holding one loss dict (a bare dict expression, or one variable)
  - an MMDetection model config (.py, MMEngine-style, with _base_ files; or .json): every
    `loss`/`loss_*` dict, and every dict of a registered loss type under any other key (TOOD's
    initial_loss_cls), found anywhere in it is compiled. A .py config is executed, as MMEngine
    does.

Which kernel is compiled (the variants), for each loss dict:
  inside a model config (--calls heads), the calls heads make: the config's reduction, class
  labels if the loss accepts them (else a same-shape target), without a weight and with the
  weight heads pass (label_weights (N,) or bbox_weights shaped like pred), avg_factor as a Python
  number and, for 'mean', as a device tensor; gradient on, float32. For a single loss dict
  (--calls plain) the plain call `loss(pred, target)`: no weight, avg_factor absent or a number.
  --target, --weight and --avg-factor select one call instead; --dtype may be repeated.

Every kernel also goes into the disk cache ($LOSSGRAPH_CACHE_DIR, as the training process
finds it): a training run on this machine (or one with the same lossgraph, torch, compiler and
NVRTC) loads these kernels without generating or compiling them.

Written into --out DIR, per kernel <name> (the loss type and its graph hash):
  <name>.cu + <name>.<arch>.cubin   (cuda; one cubin per --arch)
  <name>.c  + <name>.so             (cpp; built for this machine's CPU)
  <name>.py                         (torchscript)
  <name>/                           config, IR after each stage (.txt, .dot), source, logs
  manifest.json                     what was compiled from which part of CONFIG

Exit status: 0 when every loss dict compiled; 1 otherwise (one line on stderr per problem),
2 for bad command-line usage."""


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `lossgraph` command."""
    p = argparse.ArgumentParser(prog="lossgraph", description="lossgraph: compile MMDetection "
                                "loss configs into fused kernels.")
    p.add_argument("--version", action="version", version=f"lossgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="render and build kernels ahead of time (no GPU needed)",
                       description="Render and build the fused kernels of loss configs ahead of "
                       "time; no GPU is needed, even for --backend cuda.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", metavar="CONFIG", help="dict literal, .py or .json file (see below)")
    c.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    c.add_argument("--backend", "-b", choices=("cuda", "cpp", "torchscript"), default="cuda",
                   help="code generator (default: cuda)")
    c.add_argument("--arch", action="append", metavar="ARCH",
                   help="cuda target, e.g. sm_80, sm_90, sm_90a (cubin) or compute_90 (PTX); "
                   "repeat or comma-separate for several (default: this machine's GPU)")
    c.add_argument("--dtype", action="append", choices=DTYPES,
                   help="dtype of pred (default: float32); repeat for several")
    c.add_argument("--reduction", choices=("none", "mean", "sum"),
                   help="override the config's reduction")
    c.add_argument("--target", choices=("labels", "dense"),
                   help="class labels (N,) or a target shaped like pred (default: labels when "
                   "the loss accepts them)")
    c.add_argument("--label-dtype", choices=LABEL_DTYPES, default="int64",
                   help="dtype of class labels (default: int64)")
    c.add_argument("--calls", choices=("heads", "plain"),
                   help="which calls to compile: the ones detection heads make (heads: without "
                   "and with their weight, avg_factor as a number and as a tensor; the default "
                   "for the loss dicts of a model config) or the plain call loss(pred, target) "
                   "(plain: the default for a single loss dict); --target, --weight and "
                   "--avg-factor select one call instead")
    c.add_argument("--weight", choices=WEIGHTS,
                   help="weight broadcast form: per element, per row (N,), per class (C,), "
                   "scalar, or none (default)")
    c.add_argument("--avg-factor", choices=("value", "tensor"),
                   help="for 'mean': avg_factor as a Python number or absent (value, default), "
                   "or as a 0-d device tensor read by the kernel (tensor)")
    c.add_argument("--no-grad", action="store_true", help="forward only (no gradient output)")
    c.add_argument("--skip-unsupported", action="store_true",
                   help="in a model config, skip loss dicts lossgraph cannot compile (exit 0 "
                   "if any compiled)")
    sub.add_parser("list", help="list the loss types lossgraph knows")
    _cache_parser(sub)
    return p


def _cache_parser(sub) -> None:
    k = sub.add_parser("cache", help="show, prune or clear the kernel cache",
                       description="The on-disk kernel cache ($LOSSGRAPH_CACHE_DIR, default "
                       "~/.cache/lossgraph). It is pruned automatically to "
                       "$LOSSGRAPH_CACHE_MAX_MB (default 500) and entries unused for "
                       "$LOSSGRAPH_CACHE_MAX_DAYS (default 30) are removed.")
    ops = k.add_subparsers(dest="action", required=True)
    info = ops.add_parser("info", help="where the cache is, whether it is used, its size")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    prune = ops.add_parser("prune", help="remove entries beyond the size/age bound now")
    prune.add_argument("--max-mb", type=float, metavar="MB",
                       help="size bound (default: $LOSSGRAPH_CACHE_MAX_MB or 500; 0: none)")
    prune.add_argument("--max-days", type=float, metavar="DAYS",
                       help="age bound (default: $LOSSGRAPH_CACHE_MAX_DAYS or 30; 0: none)")
    ops.add_parser("clear", help="remove every entry")


def cache_command(args) -> int:
    """`lossgraph cache info|prune|clear`."""
    from . import cache, prune
    root = cache.cache_dir()
    if args.action == "info":
        facts = prune.info(root)
        if args.json:
            print(json.dumps(facts, indent=1))
            return 0
        state = "disabled" if not facts["enabled"] else \
            "read-write" if facts["writes"] else "read-only" if facts["loads"] else "not used"
        print(f"folder:  {root} ({state}{'; ' + facts['problem'] if facts['problem'] else ''})")
        print(f"size:    {facts['bytes'] / 1e6:.1f} MB in "
              f"{sum(facts['units'].values())} entries "
              f"({', '.join(f'{k}: {n}' for k, n in sorted(facts['units'].items())) or 'empty'})")
        print(f"bound:   {facts['bound']['max_mb']:g} MB, {facts['bound']['max_days']:g} days")
        return 0
    if cache.place().why or not cache.place().write:
        return _error(f"the cache folder {root} cannot be changed by this user "
                      f"({cache.place().why or 'disabled'})")
    if args.action == "prune":
        removed = prune.prune(root, args.max_mb, args.max_days)
        prune.sweep_temps(root)
        print(f"removed {len(removed)} entries ({sum(u.size for u in removed) / 1e6:.1f} MB)")
        return 0
    print(f"removed {prune.clear(root)} entries from {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lossgraph` and of the `lossgraph` console script."""
    args = parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(public_names()))
        return 0
    try:
        if args.command == "cache":
            return cache_command(args)
        return compile_command(args)
    except (ConfigError, BackendError, ValueError, OSError) as e:
        return _error(e)
    except Exception as e:  # noqa: BLE001 - still one line; LOSSGRAPH_DEBUG=1 shows the traceback
        if os.environ.get("LOSSGRAPH_DEBUG"):
            raise
        return _error(f"{type(e).__name__}: {e} (set LOSSGRAPH_DEBUG=1 for the traceback)")


def _error(e: BaseException | str) -> int:
    msg = str(e) if isinstance(e, str) else f"{e}"
    print(f"lossgraph: error: {' '.join(msg.split())}", file=sys.stderr)
    return 1


def compile_command(args) -> int:
    """`lossgraph compile`: every loss dict of CONFIG, every requested variant and arch."""
    archs = _archs(args) if args.backend == "cuda" else []
    found = configfile.losses(configfile.load(args.config))
    if not found:
        raise ConfigError(f"{args.config}: no loss dict found (expected a dict with 'type', or a "
                          f"model config with loss_* dicts)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, failed = [], 0
    for where, cfg in found:
        try:
            manifest += compile_loss(where, cfg, args, archs, out)
        except (ConfigError, BackendError, ValueError, TypeError, NotImplementedError) as e:
            failed += 1
            label = f"{where or 'CONFIG'} ({cfg.get('type')})"
            if args.skip_unsupported and len(found) > 1:
                print(f"lossgraph: skipped {label}: {' '.join(str(e).split())}", file=sys.stderr)
            else:
                _error(f"{label}: {e}" if len(found) > 1 else e)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if failed and not (args.skip_unsupported and manifest):
        return 1
    return 0


def _archs(args) -> list[str]:
    from .backends import nvrtc
    archs = [a.strip() for spec in args.arch or [] for a in spec.split(",") if a.strip()]
    if not archs:
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--arch is required for --backend cuda on a machine without a "
                              "GPU, e.g. --arch sm_90")
        archs = [nvrtc.target_for(torch.cuda.get_device_capability())]
    for a in archs:
        nvrtc.parse_arch(a)
    return archs


def compile_loss(where: str, cfg: dict, args, archs: list[str], out: Path) -> list[dict]:
    """Render and build every requested variant of one loss dict; returns manifest entries."""
    compiler = Compiler(parse(cfg), args.backend)
    entries = []
    for v in variants(compiler, args, where):
        source, meta, stages = compiler.generate(v, args.backend)
        stem = out / meta.fn_name
        folder = aot.store(compiler, v, args.backend, source, meta)   # for the training process
        files = {"cuda": _build_cuda, "cpp": _build_cpp, "torchscript": _build_torchscript}[
            args.backend](source, meta, stem, archs, folder)
        aot.place(folder, files["files"], args.backend)
        extra = {f"compile.{k}.log": log for k, log in files.pop("logs", {}).items() if log}
        extra["variant.json"] = json.dumps(dataclasses.asdict(v), indent=1) + "\n"
        dump.write_stages(stem, compiler.spec.config(), stages, source, compiler_suffix(args),
                          extra)
        written = [str(p.relative_to(out)) for p in files["files"]]
        for f in written:
            print(f"wrote {out / f}")
        entries.append({"where": where, "type": compiler.spec.name,
                        "config": compiler.spec.config(), "variant": v.tag(),
                        "avg_factor": v.denom,
                        "backend": args.backend, "kernel": meta.fn_name, "files": written,
                        "dump": meta.fn_name + "/"})
    return entries


def compiler_suffix(args) -> str:
    return {"cuda": ".cu", "cpp": ".c", "torchscript": ".py"}[args.backend]


def variants(compiler: Compiler, args, where: str = "") -> list[Variant]:
    """The variants the options ask for: the head calls of a loss inside a model config
    (aot.head_variants) or one call, each for every --dtype."""
    base = compiler.default_variant()
    declared = compiler.spec.loss.target
    if args.target == "labels" and declared == "dense":
        raise ConfigError(f"{compiler.spec.name} takes a target shaped like pred, not labels")
    if args.target == "dense" and declared == "labels":
        raise ConfigError(f"{compiler.spec.name} takes class labels, not a dense target")
    one_call = args.target or args.weight or args.avg_factor
    in_model = "." in where or "[" in where
    if (args.calls or ("heads" if in_model else "plain")) == "heads" and not one_call:
        bases = aot.head_variants(compiler, where)
    else:
        bases = [dataclasses.replace(base, target=args.target or base.target,
                                     weight=None if args.weight in (None, "none") else args.weight,
                                     denom=args.avg_factor or "value")]
    device = "cuda" if args.backend == "cuda" else "cpu"
    reduction = args.reduction or base.reduction
    out = [dataclasses.replace(b, reduction=reduction, grad=not args.no_grad, dtype=dtype,
                               label_dtype=args.label_dtype, device=device,
                               denom=b.denom if reduction == "mean" else "value")
           for b in bases for dtype in dict.fromkeys(args.dtype or ["float32"])]
    return list(dict.fromkeys(out))


def _build_cuda(source: str, meta, stem: Path, archs: list[str], folder: Path) -> dict:
    from .backends import nvrtc
    files, logs = [stem.with_suffix(".cu")], {}
    files[0].write_text(source)
    for arch in archs:
        try:
            image, logs[arch] = nvrtc.compile(source, arch, f"{meta.fn_name}.cu")
        except BackendError as e:
            _save_log(stem, f"compile.{arch}.log", e.log)
            raise
        kind = "cubin" if arch.startswith("sm") else "ptx"
        path = stem.parent / f"{meta.fn_name}.{arch}.{kind}"
        path.write_bytes(image)
        files.append(path)
    return {"files": files, "logs": logs}


def _build_cpp(source: str, meta, stem: Path, archs: list[str], folder: Path) -> dict:
    c_file = stem.with_suffix(".c")
    c_file.write_text(source)
    try:
        target = aot.build_cpp(source, folder, meta.fn_name, stem)
    except BackendError as e:
        _save_log(stem, "compile.log", e.log)
        raise
    return {"files": [c_file, target]}


def _build_torchscript(source: str, meta, stem: Path, archs: list[str], folder: Path) -> dict:
    from .backends import torchscript
    py_file = stem.with_suffix(".py")
    py_file.write_text(source)
    art = torchscript.load(meta, source, stem)
    return {"files": [py_file], "logs": {"torchscript": "" if art.info.get("scripted") else
                                         "TorchScript refused the source; it runs as Python\n"}}


def _save_log(stem: Path, name: str, log: str) -> None:
    if log:
        stem.mkdir(parents=True, exist_ok=True)
        (stem / name).write_text(log)
