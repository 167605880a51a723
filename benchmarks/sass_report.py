"""Static SASS report of the CUDA kernels: registers, spills, and instructions per element of the
hot loop, from NVRTC cubins disassembled by cuobjdump. Needs no GPU.

    python benchmarks/sass_report.py [--arch sm_90] [--dump DIR] [--rows-only]

cuobjdump comes with a CUDA toolkit, or from the pip wheel nvidia-cuda-cuobjdump (its binary is
nvidia/cu13/bin/cuobjdump); set CUOBJDUMP=/path/to/cuobjdump when it is not on the PATH.

Method (Note [Counting the hot loop]): the SASS of the main kernel is parsed into instructions
with their addresses and branch targets. The hot loop is the backward branch whose range holds
the most global loads (ties: the longest). Within it, "path" is the shortest instruction path
from the loop head to its back edge (each executed instruction counts 1, a CALL to an
out-of-line slow path counts 1, NOPs count 0) among those that execute the most of the loop's
widest loads and enter no inner loop (see hot_path): the path a tile whose vectors all take the fast
branch executes (for FocalLoss with labels: no vector holds the row's label). "static" is every
instruction in the loop's range, the fast and the slow branches together. Both are divided by
the elements one loop iteration computes (launch unroll x vector width).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lossgraph.backends import cuda, nvrtc  # noqa: E402
from lossgraph.build import Variant  # noqa: E402
from lossgraph.compiler import Compiler  # noqa: E402
from lossgraph.config import parse  # noqa: E402

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
CASES = [
    ("FocalLoss labels, row weight, fp32", dict(type="FocalLoss"),
     dict(target="labels", weight="row")),
    ("FocalLoss labels, row weight, bf16", dict(type="FocalLoss"),
     dict(target="labels", weight="row", dtype="bfloat16")),
    ("FocalLoss labels, fp16, tensor avg", dict(type="FocalLoss"),
     dict(target="labels", weight="row", dtype="float16", denom="tensor")),
    ("FocalLoss dense target, fp32", dict(type="FocalLoss"), dict(target="dense", weight="elem")),
    ("FocalLoss labels, none, fp32", dict(type="FocalLoss", reduction="none"),
     dict(target="labels", reduction="none")),
    ("L1Loss elem weight, fp32", dict(type="L1Loss"), dict(target="dense", weight="elem")),
    ("SmoothL1Loss elem weight, bf16", dict(type="SmoothL1Loss"),
     dict(target="dense", weight="elem", dtype="bfloat16")),
    ("GIoULoss row weight, fp32", dict(type="GIoULoss"), dict(target="dense", weight="row")),
    ("IoULoss, fp32", dict(type="IoULoss"), dict(target="dense")),
    ("CrossEntropyLoss softmax, fp32", dict(type="CrossEntropyLoss"), dict(target="labels")),
]
# Row kernels (Note [Row groups]): their table gives the whole main function (instructions,
# double-precision instructions (D*), shuffles, global loads), then the long-row path's k-loops
# (k_loops), one per pass: instructions per global load of each (per element where an element
# loads one value, e.g. CE's pred), and the double-precision instructions in them.
ROW_CASES = [
    ("CrossEntropyLoss softmax, fp32", dict(type="CrossEntropyLoss"), dict(target="labels")),
    ("CrossEntropyLoss softmax, fp16", dict(type="CrossEntropyLoss"),
     dict(target="labels", dtype="float16")),
    ("CrossEntropyLoss class_weight, row weight, fp32",
     dict(type="CrossEntropyLoss", class_weight=[1.0] * 80 + [0.5]),
     dict(target="labels", weight="row")),
    ("DistributionFocalLoss, fp32", dict(type="DistributionFocalLoss"), dict(target="labels")),
    ("KnowledgeDistillationKLDivLoss, fp32", dict(type="KnowledgeDistillationKLDivLoss"),
     dict(target="dense")),
    ("SeesawLoss, fp32", dict(type="SeesawLoss"), dict(target="labels")),
]
DOUBLE_OPS = ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET", "F2F.F64", "F2F.F32.F64")


@dataclasses.dataclass
class Ins:
    addr: int
    pred: str
    op: str
    args: str


def cuobjdump() -> str:
    """The cuobjdump binary: $CUOBJDUMP, the PATH, or the nvidia-cuda-cuobjdump wheel."""
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    for p in sys.path:
        cand = Path(p) / "nvidia" / "cu13" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    raise SystemExit("cuobjdump not found: set CUOBJDUMP, put a CUDA toolkit's bin on the PATH, "
                     "or pip install nvidia-cuda-cuobjdump")


def parse_sass(text: str) -> list[Ins]:
    """The instructions of one function's SASS listing."""
    return [Ins(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
            for m in LINE.finditer(text)]


def _target(ins: Ins) -> int | None:
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if ins.op.startswith("BRA") and m else None


def hot_loop(code: list[Ins]) -> tuple[int, int] | None:
    """(first, last) indices of the loop with the most global loads, or None without loops."""
    at = {c.addr: i for i, c in enumerate(code)}
    best, key = None, None
    for i, c in enumerate(code):
        t = _target(c)
        if t is not None and t <= c.addr and t in at:
            j = at[t]
            loads = sum(x.op.startswith("LDG") for x in code[j:i + 1])
            k = (loads, i - j)
            if key is None or k > key:
                best, key = (j, i), k
    return best


def _width(ins: Ins) -> int:
    """Bytes one global load reads (LDG.E is 32-bit; .64/.128 and .U16 etc. say their width)."""
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", ins.op)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[m.group(1)] if m else 4


def hot_path(code: list[Ins], first: int, last: int) -> int:
    """Instructions on the loop's fast path: among the paths from code[first] to the back edge
    code[last] that execute the most of the loop's widest global loads (every element of the
    tile is loaded, none skipped), the shortest. The loop body minus its back edges is a DAG in
    address order, so one forward sweep finds it."""
    at = {c.addr: i for i, c in enumerate(code)}
    loads = [c for c in code[first:last + 1] if c.op.startswith("LDG")]
    widest = max((_width(c) for c in loads), default=0)
    inner = set()   # inner loops (a slow path's per-element loop) are off the fast path
    for i in range(first, last):
        t = _target(code[i])
        if t is not None and t <= code[i].addr and at.get(t, -1) > first:
            inner.update(range(at[t], i + 1))
    best: dict[int, tuple[int, int]] = {first: (0, 0)}
    for i in range(first, last + 1):
        if i not in best or i in inner:
            continue
        c = code[i]
        wide, n = best[i]
        here = (wide - (c.op.startswith("LDG") and _width(c) == widest), n + (c.op != "NOP"))
        if i == last:
            return here[1]
        t = _target(c)
        succ = []
        if t is not None and at.get(t, -1) > i:
            succ.append(at[t])
        if not ((t is not None or c.op.startswith(("EXIT", "RET"))) and not c.pred):
            succ.append(i + 1)
        for s in succ:
            if s <= last and (s not in best or here < best[s]):
                best[s] = here
    return -1


def resources(tool: str, cubin: Path, name: str) -> dict:
    """REG, STACK and LOCAL (spills) of one function, from cuobjdump -res-usage."""
    out = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", out)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", m.group(1))} if m else {}


def disassemble(src: str, fn_name: str, arch: str, tool: str, dump: Path | None):
    """(SASS text, resource usage) of one kernel compiled by NVRTC; the source and SASS are
    written to `dump` when given."""
    image, _ = nvrtc.compile(src, arch, f"{fn_name}.cu")
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(image)
        sass = subprocess.run([tool, "-sass", "-fun", fn_name, str(cubin)],
                              capture_output=True, text=True).stdout
        res = resources(tool, cubin, fn_name)
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{fn_name}.cu").write_text(src)
        (dump / f"{fn_name}.{arch}.sass").write_text(sass)
    return sass, res


def report(title: str, cfg: dict, kw: dict, arch: str, tool: str, dump: Path | None) -> str:
    """One table row for a loss config and variant."""
    v = Variant(device="cuda", reduction=cfg.get("reduction", "mean"), **{
        k: x for k, x in kw.items() if k != "reduction"})
    src, meta, _ = Compiler(parse(cfg), "cuda").generate(v, "cuda")
    launch = cuda.launch_info(src)
    sass, res = disassemble(src, meta.fn_name, arch, tool, dump)
    if launch["schedule"] == "rows":   # one warp per row: no per-element loop to count
        return (f"| {title} | rows | n/a | {res.get('REG', '?')} | {res.get('LOCAL', '?')} | "
                f"n/a | n/a | 0 | 0 |")
    code = parse_sass(sass)
    loop = hot_loop(code)
    per_iter = launch.get("unroll", 1) * launch.get("vec", 1)
    if launch["schedule"] == "box":
        per_iter = launch.get("unroll", 1) * launch.get("width", 4)
    body = code[loop[0]:loop[1] + 1] if loop else []
    path = hot_path(code, *loop) if loop else -1
    wide_ld = sum(c.op.startswith("LDG") and ".128" in c.op for c in body)
    wide_st = sum(c.op.startswith("STG") and ".128" in c.op for c in body)
    shown = f"{path / per_iter:.1f}" if path > 0 else "n/a"
    return (f"| {title} | {launch['schedule']} | {per_iter} | {res.get('REG', '?')} | "
            f"{res.get('LOCAL', '?')} | {shown} | {len(body) / per_iter:.1f} | "
            f"{wide_ld} | {wide_st} |")


def k_loops(code: list[Ins]) -> list[tuple[int, int]]:
    """(first, last) of each loop that loads from global memory, exchanges nothing between
    lanes and holds no such inner loop: the long-row path's k-loops (Note [Row groups]), one
    per pass, in address order (the row loops around them shuffle, in their butterflies)."""
    at = {c.addr: i for i, c in enumerate(code)}
    loops = [(at[t], i) for i, c in enumerate(code)
             if (t := _target(c)) is not None and t <= c.addr and t in at]
    loads = [(j, i) for j, i in loops if any(x.op.startswith("LDG") for x in code[j:i + 1])
             and not any(x.op.startswith("SHFL") for x in code[j:i + 1])]
    return sorted((j, i) for j, i in loads
                  if not any((a, b) != (j, i) and j <= a and b <= i for a, b in loads))


def row_report(title: str, cfg: dict, kw: dict, arch: str, tool: str, dump: Path | None) -> str:
    """One row of the row-kernel table: the main function as a whole."""
    v = Variant(device="cuda", reduction=cfg.get("reduction", "mean"), **kw)
    try:
        src, meta, _ = Compiler(parse(cfg), "cuda").generate(v, "cuda")
    except Exception as e:   # noqa: BLE001 - a loss this tree cannot build: say so in the row
        return f"| {title} | {type(e).__name__} | | | | | | | | |"
    sass, res = disassemble(src, meta.fn_name, arch, tool, dump)
    code = [c for c in parse_sass(sass) if c.op != "NOP"]
    dops = sum(c.op.startswith(DOUBLE_OPS) for c in code)
    shfl = sum(c.op.startswith("SHFL") for c in code)
    ldg = sum(c.op.startswith("LDG") for c in code)
    mufu = sum(c.op.startswith("MUFU") for c in code)
    per, kd = [], 0
    for j, i in k_loops(code):   # instructions per global load of each k-loop (unrolled)
        body = code[j:i + 1]
        per.append(len(body) / sum(x.op.startswith("LDG") for x in body))
        kd += sum(x.op.startswith(DOUBLE_OPS) for x in body)
    return (f"| {title} | {res.get('REG', '?')} | {res.get('LOCAL', '?')} | {len(code)} | "
            f"{dops} | {shfl} | {ldg} | {mufu} | {' + '.join(f'{x:.1f}' for x in per)} | {kd} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dump", type=Path, default=None, help="write each .cu and its SASS here")
    ap.add_argument("--rows-only", action="store_true", help="only the row-kernel table")
    args = ap.parse_args(argv)
    if args.rows_only:
        CASES.clear()
    tool = cuobjdump()
    print(f"NVRTC {'.'.join(map(str, nvrtc.version()))}, {args.arch}, {tool}")
    print("| kernel | schedule | elems/iter | regs | local (spill) bytes | instr/elem (path) | "
          "instr/elem (static) | LDG.128 | STG.128 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for title, cfg, kw in CASES:
        print(report(title, cfg, kw, args.arch, tool, args.dump), flush=True)
    print()
    print("| row kernel | regs | local (spill) bytes | instructions | double-precision | SHFL | "
          "LDG | MUFU | long rows: k-loop instr/load | k-loop double-precision |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for title, cfg, kw in ROW_CASES:
        print(row_report(title, cfg, kw, args.arch, tool, args.dump), flush=True)


if __name__ == "__main__":
    main()
