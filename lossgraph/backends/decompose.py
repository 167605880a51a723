"""Native lowering pass: composite ops (sigmoid, logsigmoid, softplus, BCE-with-logits, logsumexp,
integer pow) rewritten into the primitives the C templates render, then folded and CSE'd again.

Runs after the shared pipeline (the derivative was already taken on the composite ops, with the
rules that mirror torch), so only the cpp and CUDA backends see these forms.
"""
from __future__ import annotations

import math

from ..build import Variant
from ..ir import Graph, Node
from ..ops import Op
from ..passes.cse import cse
from ..passes.fold import specialize

def _decompose_node(g: Graph, i: int, n: Node, shared: dict) -> Node | None:
    """Note [Shared exp(-|x|)]: sigmoid, logsigmoid, softplus and BCE-with-logits of the same x
    all reuse one e = exp(-|x|): sigmoid = 1/(1+e) for x >= 0, e/(1+e) below; logsigmoid =
    min(x,0) - log1p(e); softplus = max(x,0) + log1p(e). One exp and one log1p per element instead
    of two exps, and every form is exact at +-inf and propagates NaN.
    """
    def e_of(x):
        if x not in shared:
            shared[x] = g.add(Op.EXP, (g.add(Op.NEG, (g.add(Op.ABS, (x,)),)),))
        return shared[x]

    if n.op is Op.POW:
        return _integer_pow(g, n)
    one, zero = g.const(1.0), g.const(0.0)
    if n.op is Op.SIGMOID:
        x = n.srcs[0]
        e = e_of(x)
        r = g.add(Op.DIV, (one, g.add(Op.ADD, (one, e))))
        return Node(Op.WHERE, (g.add(Op.GE, (x, zero)), r, g.add(Op.MUL, (e, r))))
    if n.op is Op.LOGSIGMOID:
        x = n.srcs[0]
        return Node(Op.SUB, (g.add(Op.MINIMUM, (x, zero)), g.add(Op.LOG1P, (e_of(x),))))
    if n.op is Op.SOFTPLUS:
        x = n.srcs[0]
        return Node(Op.ADD, (g.add(Op.MAXIMUM, (x, zero)), g.add(Op.LOG1P, (e_of(x),))))
    if n.op is Op.BCE_LOGITS:
        # torch: (1 - t) * x - (1 + (pw - 1) * t) * log_sigmoid(x)
        x, t = n.srcs[:2]
        ls = g.add(Op.LOGSIGMOID, (x,))
        lw = ls if len(n.srcs) == 2 else g.add(Op.MUL, (g.add(Op.ADD, (g.add(Op.MUL, (
            g.add(Op.SUB, (n.srcs[2], one)), t)), one)), ls))
        return Node(Op.SUB, (g.add(Op.MUL, (g.add(Op.SUB, (one, t)), x)), lw))
    if n.op is Op.ROWLSE:
        # torch.logsumexp: the row max, with +-inf replaced by 0, is subtracted before exp
        x = n.srcs[0]
        m = g.add(Op.ROWMAX, (x,))
        m0 = g.add(Op.WHERE, (g.add(Op.EQ, (g.add(Op.ABS, (m,)), g.const(math.inf))), zero, m))
        s = g.add(Op.ROWSUM, (g.add(Op.EXP, (g.add(Op.SUB, (x, m0)),)),))
        return Node(Op.ADD, (g.add(Op.LOG, (s,)), m0))
    return None


def _integer_pow(g: Graph, n: Node) -> Node | None:
    """Note [Integer pow]: x**c for a whole c in [4, 16] becomes multiplications by repeated
    squaring (x**4 = (x*x)*(x*x)): exact to an ulp or two of powf, and no call that costs as much
    as an exp and a log (GaussianFocalLoss's (1 - t)**4). Exponents 2, 3, 0.5 were specialized by
    the fold pass already, exactly as torch evaluates them."""
    base, c = n.srcs[0], g[n.srcs[1]]
    if c.op is not Op.CONST or isinstance(c.arg, bool) or c.arg != int(c.arg) or not 4 <= c.arg <= 16:
        return None
    e, acc, sq = int(c.arg), None, base
    while e:
        if e & 1:
            acc = sq if acc is None else g.add(Op.MUL, (acc, sq))
        e >>= 1
        if e:
            sq = g.add(Op.MUL, (sq, sq))
    return g[acc]


def decompose(body: Graph, v: Variant) -> Graph:
    """Rewrite composite ops into primitives the C templates know, then fold and CSE again."""
    g = body.copy()
    shared: dict[int, int] = {}
    changed = True
    while changed:
        changed = False
        for i in g.topo():
            r = _decompose_node(g, i, g[i], shared)
            if r is not None:
                g.replace(i, r)
                changed = True
    return cse(specialize(g, v), v)
