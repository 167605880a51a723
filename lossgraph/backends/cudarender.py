"""Rendering of the CUDA backend: the fused body as the source of templates/cuda/kernel.cu.j2.

The element statements come from clower.lower (Note [CUDA kernel design] in cuda.py); the
'elem' schedule's vector tiles are cudavec.py's, the 'rows' schedule's groups cudarows.py's.
The launch facts the runtime needs are written into the source's `// lossgraph-launch:` line
(launch_info reads them back), so a kernel read from the disk cache needs no IR.
"""
from __future__ import annotations

import json
import re

from .. import codegen
from ..errors import BackendError
from . import cudarows, cudavec
from .base import KernelSource
from .clower import literal, lower, scalar_loads

BLOCK = 256          # threads per block (8 warps)
UNROLL = 4           # elements in flight per thread in the 'elem' schedule
STORAGE = {"float32": "float", "float64": "double", "float16": "lg_half", "bfloat16": "lg_bf16"}
LABEL_CTYPE = {"int64": "long long", "int32": "int", "int16": "short", "int8": "signed char",
               "uint8": "unsigned char"}
LAUNCH_LINE = re.compile(r"^// lossgraph-launch: (.*)$", re.M)


# -- rendering -------------------------------------------------------------------------------------

def render(src: KernelSource) -> str:
    """Render the fused body as CUDA: the loss/gradient kernel and, when reducing, its combine."""
    v = src.variant
    k = lower(src.body, v, src.fn_name)
    schedule = "rows" if k.passes else "elem"
    if schedule == "rows" and v.dtype != "float64":   # Note [Row values on CUDA] (cudarows)
        k = lower(src.body, v, src.fn_name, wide=True)
    accumulate = k.loss_mode.startswith("acc")
    params = [("S" if n == "pred" else t, n) for t, n, _ in k.params if n not in k.tables]
    tables = [(n, [literal(x) for x in k.tables[n]]) for _, n, _ in k.params if n in k.tables]
    box = schedule == "elem" and any(ld.comp is not None for ld in src.body.inputs())
    vec = cudavec.vec_width(STORAGE[v.dtype], box)
    unroll = cudavec.unroll_for(vec) if schedule == "elem" else UNROLL
    rescale = v.grad and accumulate and v.dtype in ("float16", "bfloat16")
    launch = {"schedule": schedule, "accumulate": accumulate, "block": BLOCK, "unroll": unroll,
              "vec": vec, "box": box, "params": params,
              "tables": {n: len(vals) for n, vals in tables}}
    if rescale:
        launch["rescale"] = True
    args = "".join(f"const {t}* __restrict__ p_{n}, " for t, n in params)
    hot = _hot(k)
    ctypes = {"pred": STORAGE[v.dtype], "T": "double" if v.dtype == "float64" else "float"}
    ctypes.update({n: ctypes["T"] for t, n in params if t == "T"})
    tiles = {}
    rows = {"short_rows": [], "long_rows": []}
    if schedule == "rows":
        hot_ns = None if hot is None else _Hot(**hot)
        rows = {"short_rows": cudarows.short_rows(k, hot_ns),
                "long_rows": cudarows.long_rows(k, hot_ns)}
    if schedule == "elem":
        hot_ns = None if hot is None else _Hot(**hot)
        tiles = {f"tile{'' if c > 1 else '1'}": cudavec.tile(k, hot_ns, params, ctypes, vec, c,
                                                            box, v.grad)
                 for c in (unroll, 1)}
        if unroll == 1:
            tiles["tile"] = tiles["tile1"]
    vectors = [f"p_{n}" for t, n, a in k.params if a == "elem" and n not in k.tables]
    vectors += ["grad_out"] * v.grad + ["loss_out"] * (k.loss_mode == "store_elem")
    aligned = " | ".join(f"(unsigned long long){p}" for p in ["p_pred", *vectors])
    return codegen.render("cuda/kernel.cu.j2", header=src.header("//"), k=k, hot=hot,
                          aligned=aligned, rescale=rescale, k_params=params,
                          slots=cudarows.SLOTS, **rows,
                          vec=vec, **({"tile": [], "tile1": []} | tiles),
                          block=BLOCK, unroll=unroll, schedule=schedule, accumulate=accumulate,
                          double=v.dtype == "float64", label_type=LABEL_CTYPE[v.label_dtype],
                          storage=STORAGE[v.dtype], tables=tables, tensor_args=args,
                          scalar_loads=scalar_loads(k.params),
                          launch=json.dumps(launch, sort_keys=True))


class _Hot:
    """The _hot dict with attribute access (cudavec reads index, common, body0, loss0, grad0)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _hot(k) -> dict | None:
    """The one-hot split of the element body (clower's Hot), with the statements both halves
    start with moved before the branch: the load and the shared math run unconditionally."""
    if k.hot is None:
        return None
    h = k.hot
    n = 0
    while n < min(len(h.body0), len(h.body1)) and h.body0[n] == h.body1[n]:
        n += 1
    return {"index": h.index, "common": h.body0[:n], "body0": h.body0[n:], "loss0": h.loss0,
            "grad0": h.grad0, "body1": h.body1[n:], "loss1": h.loss1, "grad1": h.grad1}


def launch_info(source: str) -> dict:
    """The launch facts a rendered source records in its `// lossgraph-launch:` line."""
    m = LAUNCH_LINE.search(source)
    if m is None:
        raise BackendError("CUDA source has no '// lossgraph-launch:' line")
    return json.loads(m.group(1))
