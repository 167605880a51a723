"""Native lowering pass: composite ops (sigmoid, logsigmoid, softplus, BCE-with-logits, logsumexp,
integer pow) rewritten into the primitives the C templates render, then folded and CSE'd again.

Runs after the shared pipeline (the derivative was already taken on the composite ops, with the
rules that mirror torch), so only the cpp and CUDA backends see these forms; the stable
logsumexp rewrite (stable_lse) is shared with the TorchScript backend.
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
    return None


def _integer_pow(g: Graph, n: Node) -> Node | None:
    """Note [Integer pow]: x**c for a whole c in [4, 16] becomes multiplications by repeated
    squaring (x**4 = (x*x)*(x*x)): exact to an ulp or two of powf, and no call that costs as much
    as an exp and a log (GaussianFocalLoss's (1 - t)**4). Exponents 2, 3, 0.5 were specialized by
    the fold pass already, exactly as torch evaluates them."""
    base, c = n.srcs[0], g[n.srcs[1]]
    if c.op is not Op.CONST or isinstance(c.arg, bool) or not 4 <= c.arg <= 16 or \
            c.arg != int(c.arg):   # the range test first: int() of a NaN or inf raises
        return None
    e, acc, sq = int(c.arg), None, base
    while e:
        if e & 1:
            acc = sq if acc is None else g.add(Op.MUL, (acc, sq))
        e >>= 1
        if e:
            sq = g.add(Op.MUL, (sq, sq))
    return g[acc]


def stable_lse(body: Graph) -> Graph:
    """Note [Stable logsumexp]: every row logsumexp L = m + log(s), m = rowmax(x),
    s = rowsum(exp(x - m)), is rewritten so that no large terms cancel where L is subtracted:
    a - L becomes (a - m) - log(s) (log_softmax, softmax's exp(x - L)) and L - b becomes
    log(s) - (b - m) (a cross-entropy), and exp(x - L) (softmax, the gradient of L) becomes
    exp(x - m) / s, torch's softmax form, whose exponentials are the row sum's own terms (the cpp
    kernel keeps them in a row buffer, Note [Row buffers]). With L formed first, a row [1e30, 1e30, 1e30] gave
    1e30 - 1e30 = 0 instead of log(3), and the relative error grew with |x| from 2^16 up.
    The shift is the raw max, as torch's log_softmax uses it: a row with +inf or with only -inf
    gives NaN (F.cross_entropy's value). Any other use of L keeps torch.logsumexp's value:
    m itself where m is +-inf, else m + log(s)."""
    g = body.copy()
    inf = g.const(math.inf)
    for i in g.find(Op.ROWLSE):
        x = g[i].srcs[0]
        m = g.add(Op.ROWMAX, (x,))
        e = g.add(Op.EXP, (g.add(Op.SUB, (x, m)),))
        s = g.add(Op.ROWSUM, (e,))
        ls = g.add(Op.LOG, (s,))
        for u in g.users(i):
            a, b = g[u].srcs if g[u].op is Op.SUB else (i, i)
            if b == i and a != i:
                g.replace(u, Node(Op.SUB, (g.add(Op.SUB, (a, m)), ls)))
                if a == x:   # softmax: exp(x - L) = exp(x - m) / s, the row sum's own terms
                    for w in g.users(u):
                        if g[w].op is Op.EXP:
                            g.replace(w, Node(Op.DIV, (e, s)))
            elif a == i and b != i:
                g.replace(u, Node(Op.SUB, (ls, g.add(Op.SUB, (b, m)))))
        if g.users(i):
            big = g.add(Op.EQ, (g.add(Op.ABS, (m,)), inf))
            g.replace(i, Node(Op.WHERE, (big, m, g.add(Op.ADD, (m, ls)))))
    g.prune()
    return g


def decompose(body: Graph, v: Variant) -> Graph:
    """Rewrite composite ops into primitives the C templates know, then fold and CSE again."""
    g = stable_lse(body)
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
