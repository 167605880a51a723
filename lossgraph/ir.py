"""The IR: immutable nodes in a small DAG that owns a networkx.DiGraph, with a text and a dot form."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx

from .ops import INFO, Level, Op, stage_of

ACCESS_LEVEL = {"scalar": Level.SCALAR, "row": Level.ROW, "col": Level.ELEM, "elem": Level.ELEM}


@dataclass(frozen=True)
class Load:
    """How a kernel input is read: `access` is elem (r,k), row (r), col (k) or scalar."""

    name: str
    access: str
    kind: str = "f"               # 'f' float, 'i' int
    comp: int | None = None       # fixed column of a row (box coordinates), else None

    def __str__(self) -> str:
        comp = f"[{self.comp}]" if self.comp is not None else ""
        return f"{self.name}{comp}:{self.access}"


@dataclass(frozen=True)
class Node:
    """One IR node: an op, its ordered operands (node ids) and a hashable attribute."""

    op: Op
    srcs: tuple[int, ...] = ()
    arg: Any = None


@dataclass(frozen=True, eq=False)
class Kernel:
    """The fused body of a KERNEL node: a complete graph with its own inputs and outputs."""

    body: "Graph"
    meta: tuple = field(default=())

    def __hash__(self) -> int:
        return hash(self.body.digest())


def _fmt_arg(arg: Any) -> str:
    if isinstance(arg, float):
        return repr(arg)
    if arg is None or isinstance(arg, Kernel):
        return ""
    return str(arg)


class Graph:
    """A DAG of Nodes keyed by int ids; passes use these methods, never networkx directly."""

    def __init__(self, name: str = "loss", attrs: dict | None = None):
        self.name = name
        self.attrs = dict(attrs or {})
        self.tables: dict[str, tuple] = {}   # per-class constant vectors, by input name
        self._g = nx.DiGraph()
        self._next = 0

    # -- construction -------------------------------------------------------------------------
    def add(self, op: Op, srcs: Iterable[int] = (), arg: Any = None) -> int:
        """Append a node and return its id."""
        srcs = tuple(srcs)
        if len(srcs) not in INFO[op].arity:
            raise ValueError(f"{op.value} takes {INFO[op].arity} operands, got {len(srcs)}")
        i = self._next
        self._next += 1
        self._g.add_node(i, node=Node(op, srcs, arg))
        for s in srcs:
            self._g.add_edge(s, i)
        return i

    def const(self, value) -> int:
        """Add a constant node."""
        return self.add(Op.CONST, (), value)

    def copy(self) -> "Graph":
        """A structural copy (nodes are immutable, so sharing them is safe)."""
        g = Graph(self.name, self.attrs)
        g.tables = dict(self.tables)
        g._g = self._g.copy()
        g._next = self._next
        return g

    # -- queries --------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Node:
        return self._g.nodes[i]["node"]

    def __contains__(self, i: int) -> bool:
        return i in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def ids(self) -> list[int]:
        return list(self._g.nodes)

    def users(self, i: int) -> list[int]:
        return sorted(self._g.successors(i))

    def topo(self) -> list[int]:
        """Node ids in a deterministic topological order."""
        return list(nx.lexicographical_topological_sort(self._g))

    def outputs(self) -> dict[str, int]:
        """Output name -> OUTPUT node id."""
        return {self[i].arg: i for i in self.ids() if self[i].op is Op.OUTPUT}

    def inputs(self) -> dict[Load, int]:
        return {self[i].arg: i for i in self.ids() if self[i].op is Op.INPUT}

    def ancestors(self, i: int) -> set[int]:
        return nx.ancestors(self._g, i)

    def find(self, op: Op) -> list[int]:
        return [i for i in self.topo() if self[i].op is op]

    # -- mutation (used by passes on their own copy) --------------------------------------------
    def replace(self, i: int, node: Node) -> None:
        """Give node i a new op/operands/arg, keeping its users."""
        for s in list(self._g.predecessors(i)):
            self._g.remove_edge(s, i)
        self._g.nodes[i]["node"] = node
        for s in node.srcs:
            self._g.add_edge(s, i)

    def redirect(self, old: int, new: int) -> None:
        """Make every user of `old` use `new` instead."""
        if old == new:
            return
        for u in self.users(old):
            n = self[u]
            self.replace(u, Node(n.op, tuple(new if s == old else s for s in n.srcs), n.arg))

    def prune(self) -> None:
        """Remove every node that no output depends on."""
        live = set()
        for o in self.outputs().values():
            live.add(o)
            live |= nx.ancestors(self._g, o)
        self._g.remove_nodes_from([i for i in self.ids() if i not in live])

    # -- analyses -----------------------------------------------------------------------------------
    def levels(self) -> dict[int, Level]:
        """How often each value changes (scalar < row < elem; total after a full reduction)."""
        lv: dict[int, Level] = {}
        for i in self.topo():
            n = self[i]
            if n.op is Op.INPUT:
                lv[i] = ACCESS_LEVEL[n.arg.access] if n.arg.comp is None else Level.ROW
            elif n.op is Op.CONST:
                lv[i] = Level.SCALAR
            elif n.op is Op.IOTA:
                lv[i] = Level.ELEM
            elif n.op in (Op.ROWSUM, Op.ROWMAX, Op.ROWLSE):
                lv[i] = min(lv[n.srcs[0]], Level.ROW)
            elif n.op is Op.REDUCE and n.arg != "none":
                lv[i] = Level.TOTAL
            else:
                lv[i] = max((lv[s] for s in n.srcs), default=Level.SCALAR)
        return lv

    def kinds(self) -> dict[int, str]:
        """Result kind of each node: 'f' float, 'b' bool, 'i' int."""
        return {i: self.kind(i) for i in self.ids()}

    def kind(self, i: int) -> str:
        """Result kind of one node, from its op and operands."""
        n = self[i]
        if n.op is Op.INPUT:
            return n.arg.kind
        if n.op is Op.CONST:
            return "b" if isinstance(n.arg, bool) else "i" if isinstance(n.arg, int) else "f"
        k = INFO[n.op].kind
        return self.kind(n.srcs[0]) if k == "s" else k

    def depends_on(self, roots: Iterable[int]) -> set[int]:
        """Every node reachable from `roots` (roots included)."""
        out = set(roots)
        for r in list(out):
            out |= nx.descendants(self._g, r)
        return out

    # -- printing ---------------------------------------------------------------------------------
    def numbering(self) -> dict[int, int]:
        return {i: k for k, i in enumerate(self.topo())}

    def text(self, indent: str = "") -> str:
        """The readable text form: one `%k = op operands [arg] : kind level` line per node."""
        num, lv, kd = self.numbering(), self.levels(), self.kinds()
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        lines = [f"{indent}graph {self.name}({attrs}) {{"]
        for i in self.topo():
            n = self[i]
            ops = ", ".join(f"%{num[s]}" for s in n.srcs)
            arg = _fmt_arg(n.arg)
            head = " ".join(x for x in (n.op.value, arg, ops) if x)
            lines.append(f"{indent}  %{num[i]} = {head} : {kd[i]} {lv[i].name.lower()}")
            if n.op is Op.KERNEL:
                lines[-1] += " -> (" + ", ".join(n.arg.meta) + ")"
                lines.append(n.arg.body.text(indent + "    "))
        lines.append(f"{indent}}}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<lossgraph.Graph {self.name}: {len(self)} nodes>"

    def digest(self) -> str:
        """A structural hash of the graph (its canonical text)."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    def dot(self) -> str:
        """Graphviz source: nodes colored by pipeline stage, a fused kernel as a cluster."""
        head = [f'digraph "{self.name}" {{', "  rankdir=TB;",
                "  node [shape=box, style=filled, fontname=monospace];"]
        return "\n".join(head + self._dot_lines("") + ["}"])

    def _dot_lines(self, prefix: str) -> list[str]:
        colors = ["#dae8fc", "#d5e8d4", "#fff2cc", "#f8cecc", "#e1d5e7"]
        num, out = self.numbering(), []
        for i in self.topo():
            n = self[i]
            label = f"%{num[i]} {n.op.value} {_fmt_arg(n.arg)}".strip().replace('"', "'")
            out.append(f'  {prefix}n{i} [label="{label}", fillcolor="{colors[stage_of(n.op)]}"];')
            if n.op is Op.KERNEL:
                out.append(f'  subgraph cluster_{prefix}{i} {{ label="kernel %{num[i]}";')
                out += ["  " + line for line in n.arg.body._dot_lines(f"{prefix}k{i}_")]
                out.append("  }")
        for i in self.topo():
            out += [f"  {prefix}n{s} -> {prefix}n{i};" for s in self[i].srcs]
        return out
