"""Declarative pattern rewriting.

A pattern describes a small subgraph by its *root* node and what feeds it::

    op("BatchNormalization", op("Conv", Var("x"), Const("w"), Opt(Const("b")), name="conv"),
       Const("scale"), Const("bias"), Const("mean"), Const("var"), name="bn")

* :func:`op` - a node: op type (or a tuple of alternatives), domain, inputs, attribute
  constraints (a value or a predicate), ``single_use`` (default for inner nodes: their output
  has exactly one reader and is not a graph output, so the rewrite may delete them),
  ``commutative`` (try both input orders of a binary op), ``check`` (a predicate on the node).
* :class:`Var` - captures any value; ``Const`` requires a constant; optional ``dtype``,
  ``rank`` and ``check`` predicates. The same name twice means the same value.
* ``Opt(p)`` on an input position - the input may be absent (omitted or missing);
  :func:`maybe` - an optional *node* that may sit on the edge or not (e.g. a Cast).

A :class:`Rule` pairs a pattern with ``rewrite(match, builder)`` returning replacement values
for the root's outputs (or None to decline). :func:`apply_rules` is the one greedy driver: a
worklist seeded with every node, rules indexed by root op type, each rewrite pushing the new
nodes and their readers back; it runs to a fixpoint in time near-linear in the graph size.
Matched nodes left without readers, and constants only they used, are removed.
:func:`explain` says why a rule did not match at a node.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.tensor import Tensor, dtype_name
from graphopt.transform import Pass, PassContext

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# pattern language
# ---------------------------------------------------------------------------------------------
class Var:
    """Matches any value (or, with ``const=True``, a constant) and binds it to ``name``."""

    def __init__(
        self,
        name: str,
        *,
        const: bool = False,
        dtype: int | Sequence[int] | None = None,
        rank: int | None = None,
        check: Callable[[Value], bool] | None = None,
    ) -> None:
        self.name = name
        self.const = const
        self.dtype = (dtype,) if isinstance(dtype, int) else tuple(dtype) if dtype is not None else None
        self.rank = rank
        self.check = check

    def __repr__(self) -> str:
        return f"{'Const' if self.const else 'Var'}({self.name!r})"


def Const(name: str, **kw: Any) -> Var:
    """A :class:`Var` that only matches constants (initializers or ``Constant`` outputs)."""
    return Var(name, const=True, **kw)


class Opt:
    """An input position that may be absent; when present it must match ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"Opt({self.inner!r})"


class OpPattern:
    """Matches a node (see :func:`op`)."""

    def __init__(
        self,
        op_type: str | Sequence[str],
        inputs: Sequence[Any],
        *,
        domain: str = "",
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
        single_use: bool | None = None,
        commutative: bool = False,
        variadic: bool = False,
        output: int = 0,
        check: Callable[[Node], bool] | None = None,
    ) -> None:
        self.op_types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        self.inputs = list(inputs)
        self.domain = domain
        self.attrs = dict(attrs or {})
        self.name = name
        self.single_use = single_use
        self.commutative = commutative
        self.variadic = variadic
        self.output = output
        self.check = check

    def __repr__(self) -> str:
        return f"op({'|'.join(self.op_types)}, {', '.join(map(repr, self.inputs))})"


def op(op_type: str | Sequence[str], *inputs: Any, **kw: Any) -> OpPattern:
    """A node pattern. Inputs are patterns, :class:`Var`, :class:`Opt`, strings (shorthand for
    ``Var(name)``) or ``None`` (anything). Keywords: ``domain``, ``attrs``, ``name``,
    ``single_use``, ``commutative``, ``variadic`` (extra node inputs allowed), ``output``
    (which output of this node feeds the parent), ``check`` (predicate on the node)."""
    return OpPattern(op_type, [Var(i) if isinstance(i, str) else i for i in inputs], **kw)


class Maybe:
    """A node that may or may not sit on an edge (see :func:`maybe`)."""

    def __init__(self, pattern: OpPattern, through: int = 0) -> None:
        self.pattern = pattern
        self.through = through

    def __repr__(self) -> str:
        return f"maybe({self.pattern!r})"


def maybe(pattern: OpPattern, through: int = 0) -> Maybe:
    """Match ``pattern`` if its node is present on the edge, else its input ``through`` directly."""
    return Maybe(pattern, through)


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------
@dataclass
class Match:
    """A successful match: values and nodes by name, and every matched node (root first)."""

    root: Node
    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.bindings.get(key, default)

    def __contains__(self, key: str) -> bool:
        return self.bindings.get(key) is not None

    def const(self, key: str) -> np.ndarray:
        """numpy data of a bound constant value (a ``ConstantOfShape`` fill is expanded)."""
        v = self.bindings[key]
        arr = v.const_value()
        if arr is None:
            fill = v.fill_value()
            if fill is None:
                raise KeyError(f"{key!r} is not bound to a constant")
            arr = np.full(fill[0], fill[1], dtype=fill[1].dtype)
        return arr


class _Failure:
    """Deepest reason a match failed, for explanations."""

    def __init__(self) -> None:
        self.depth = -1
        self.reason = "no rule for this op type"

    def note(self, depth: int, reason: str) -> None:
        if depth >= self.depth:
            self.depth = depth
            self.reason = reason


_State = tuple[dict[str, Any], list[Node]]


def _score(st: _State, depth: int) -> int:
    """Rank of a failure: how much of the pattern had matched (then how deep), so explanations
    report the attempt that came closest."""
    return (len(st[0]) + len(st[1])) * 1000 + depth


def _vname(v: Value | None) -> str:
    return "<absent>" if v is None else repr(v.name)


def _match_input(p: Any, v: Value | None, st: _State, fail: _Failure, d: int, path: str) -> Iterator[_State]:
    if p is None:
        yield st
        return
    if isinstance(p, Opt):
        if v is None:
            yield st
            return
        yield from _match_input(p.inner, v, st, fail, d, path)
        return
    if v is None:
        fail.note(_score(st, d), f"{path}: input is absent")
        return
    if isinstance(p, Var):
        b, nodes = st
        if p.name in b:
            if b[p.name] is not v:
                fail.note(_score(st, d), f"{path}: {p.name!r} must be the same value as before, got {_vname(v)}")
                return
            yield st
            return
        if p.const and not v.is_const() and v.fill_value() is None:
            why = "a graph input (overridable)" if v.const is not None else (
                f"produced by {v.producer.op_type}" if v.producer is not None else "a graph input")
            fail.note(_score(st, d), f"{path}: {p.name!r} must be constant, but {_vname(v)} is {why}")
            return
        if p.dtype is not None and v.dtype not in p.dtype:
            fail.note(_score(st, d), f"{path}: {p.name!r} has dtype {dtype_name(v.dtype)}, needs one of "
                         f"{[dtype_name(t) for t in p.dtype]}")
            return
        if p.rank is not None and v.rank != p.rank:
            fail.note(_score(st, d), f"{path}: {p.name!r} has rank {v.rank}, needs {p.rank}")
            return
        if p.check is not None and not p.check(v):
            fail.note(_score(st, d), f"{path}: {p.name!r} ({_vname(v)}) fails its check")
            return
        nb = dict(b)
        nb[p.name] = v
        yield (nb, nodes)
        return
    if isinstance(p, Maybe):
        yield from _match_node(p.pattern, v, st, fail, d, path, inner=True)
        yield from _match_input(p.pattern.inputs[p.through], v, st, fail, d, path)
        return
    if isinstance(p, OpPattern):
        yield from _match_node(p, v, st, fail, d, path, inner=True)
        return
    raise TypeError(f"bad pattern element {p!r}")


def _match_node(p: OpPattern, v: Value, st: _State, fail: _Failure, d: int, path: str,
                *, inner: bool) -> Iterator[_State]:
    n = v.producer
    want = "|".join(p.op_types)
    if n is None:
        fail.note(_score(st, d), f"{path}: expected {want}, but {_vname(v)} is a graph input or constant")
        return
    if v.index != p.output:
        fail.note(_score(st, d), f"{path}: expected output {p.output} of {want}, got output {v.index}")
        return
    if n.op_type not in p.op_types or n.domain not in ((p.domain,) if p.domain else ("", "ai.onnx")):
        fail.note(_score(st, d), f"{path}: expected {want}, got {n.domain + '::' if n.domain else ''}{n.op_type}")
        return
    if inner and (p.single_use if p.single_use is not None else True):
        if v.num_uses != 1 or v.is_graph_output():
            fail.note(_score(st, d + 1), f"{path}: {n.op_type} {n.name!r} output {_vname(v)} has {v.num_uses} readers"
                             f"{' and is a graph output' if v.is_graph_output() else ''} (needs a single use)")
            return
    yield from _match_node_body(p, n, st, fail, d + 1, path)


def _match_node_body(p: OpPattern, n: Node, st: _State, fail: _Failure, d: int, path: str) -> Iterator[_State]:
    label = f"{n.op_type} {n.name!r}" if n.name else n.op_type
    b, nodes = st
    if any(x is n for x in nodes):
        fail.note(_score(st, d), f"{label}: node reached twice")
        return
    for k, want in p.attrs.items():
        have = n.attr(k)
        ok = want(have) if callable(want) else (have == want or (have is None and want is None))
        if not ok:
            fail.note(_score(st, d), f"{label}: attribute {k}={have!r} does not satisfy {want if not callable(want) else 'check'}")
            return
    if p.check is not None and not p.check(n):
        fail.note(_score(st, d), f"{label}: node check failed")
        return
    ins = list(n.inputs)
    while ins and ins[-1] is None:
        ins.pop()
    if len(ins) > len(p.inputs) and not p.variadic:
        fail.note(_score(st, d), f"{label}: has {len(ins)} inputs, pattern allows {len(p.inputs)}")
        return
    orders = [list(range(len(p.inputs)))]
    if p.commutative and len(p.inputs) == 2:
        orders.append([1, 0])
    st2: _State = (dict(b), nodes + [n])
    if p.name:
        st2[0][p.name] = n
    for order in orders:
        yield from _match_inputs(p, [ins[i] if i < len(ins) else None for i in order], st2, fail, d, label)


def _match_inputs(p: OpPattern, vals: list[Value | None], st: _State, fail: _Failure, d: int,
                  label: str, k: int = 0) -> Iterator[_State]:
    if k == len(p.inputs):
        yield st
        return
    for st2 in _match_input(p.inputs[k], vals[k], st, fail, d, f"{label} input {k}"):
        yield from _match_inputs(p, vals, st2, fail, d, label, k + 1)


def match(pattern: OpPattern, node: Node, fail: _Failure | None = None) -> Match | None:
    """Match ``pattern`` with ``node`` as its root; the first consistent match or None."""
    fail = fail or _Failure()
    if node.op_type not in pattern.op_types:
        fail.note(0, f"root: expected {'|'.join(pattern.op_types)}, got {node.op_type}")
        return None
    if node.domain not in ((pattern.domain,) if pattern.domain else ("", "ai.onnx")):
        fail.note(0, f"root: domain {node.domain!r} is not {pattern.domain!r}")
        return None
    for b, nodes in _match_node_body(pattern, node, ({}, []), fail, 0, "root"):
        return Match(node, b, nodes)
    return None


# ---------------------------------------------------------------------------------------------
# building replacements
# ---------------------------------------------------------------------------------------------
class Builder:
    """Creates replacement nodes, inserted before the matched root, and constants."""

    def __init__(self, graph: Graph, anchor: Node) -> None:
        self.graph = graph
        self.anchor = anchor
        self.created: list[Node] = []
        self.constants: list[Value] = []

    def op(
        self,
        op_type: str,
        *inputs: Value | None,
        domain: str = "",
        num_outputs: int = 1,
        name: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Add ``op_type(*inputs, **attrs)``; returns its output (a tuple if several)."""
        base = name or f"{self.anchor.name or self.anchor.op_type}/{op_type}"
        node = self.graph.make_node(op_type, list(inputs), attrs, num_outputs=num_outputs, domain=domain,
                                    name=self.graph.fresh_name(base), before=self.anchor)
        self.created.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    #: uniform constants at least this large are stored as ConstantOfShape, not initializers
    FILL_BYTES = 4096

    def const(self, data: Any, name: str = "const", dtype: Any = None) -> Value:
        """A new constant holding ``data``: an initializer, or - for a large array whose
        elements are all equal - a ``ConstantOfShape`` node, so a rewrite that consumed a fill
        constant does not expand it into a big initializer."""
        arr = np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)
        base = f"{self.anchor.name or self.anchor.op_type}/{name}"
        if arr.nbytes >= self.FILL_BYTES and arr.dtype.kind in "fiub" and arr.size and np.all(arr == arr.flat[0]):
            shape = self.graph.add_initializer(base + "_shape", Tensor(np.array(arr.shape, np.int64)))
            self.constants.append(shape)
            node = self.graph.make_node("ConstantOfShape", [shape], {"value": arr.reshape(-1)[:1].copy()},
                                        name=self.graph.fresh_name(base), before=self.anchor)
            self.created.append(node)
            v = node.output(0)
            v.dtype, v.shape = Tensor(arr[:1]).dtype, tuple(arr.shape)
            return v
        v = self.graph.add_initializer(base, Tensor(arr))
        self.constants.append(v)
        return v

    def rollback(self) -> None:
        for n in reversed(self.created):
            if n.graph is self.graph:
                for o in n.outputs:
                    if o.num_uses:
                        break
                else:
                    self.graph.remove(n)
        for v in self.constants:
            if not v.num_uses and v.name in self.graph.initializers:
                self.graph.remove_initializer(v.name)
        self.created.clear()
        self.constants.clear()


RewriteFn = Callable[[Match, Builder], Any]


class Rule:
    """A pattern and its rewrite. ``where(match)`` may veto (return False, or a reason string)."""

    def __init__(
        self,
        name: str,
        pattern: OpPattern,
        rewrite: RewriteFn,
        where: Callable[[Match], bool | str] | None = None,
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.rewrite = rewrite
        self.where = where

    def try_match(self, node: Node, fail: _Failure | None = None) -> Match | None:
        m = match(self.pattern, node, fail)
        if m is None or self.where is None:
            return m
        verdict = self.where(m)
        if verdict is True or verdict is None:
            return m
        if fail is not None:
            fail.note(10**12, f"matched, but refused: {verdict if isinstance(verdict, str) else 'condition failed'}")
        return None

    def __repr__(self) -> str:
        return f"Rule({self.name})"


def explain(rule: Rule | OpPattern, node: Node) -> str:
    """Why ``rule`` does or does not apply at ``node``: ``"matches"`` or the deepest failure."""
    fail = _Failure()
    r = rule if isinstance(rule, Rule) else Rule("pattern", rule, lambda m, b: None)
    if r.try_match(node, fail) is not None:
        return "matches"
    return fail.reason


def _drop_dead(graph: Graph, nodes: Sequence[Node]) -> None:
    """Remove matched nodes whose outputs lost all readers, and constants only they used."""
    cands: list[Value] = []
    for n in nodes:  # root first: its inputs' producers die afterwards
        if n.graph is not graph:
            continue
        if any(o.num_uses or o.is_graph_output() for o in n.outputs):
            continue
        cands.extend(v for v in n.inputs if v is not None)
        graph.remove(n)
    for v in cands:
        if v.num_uses or v.is_graph_output():
            continue
        if v.const is not None and v.graph is graph and not v.is_graph_input() and v.name in graph.initializers:
            graph.remove_initializer(v.name)
        else:
            p = v.producer
            if p is not None and p.graph is graph and ((p.op_type == "Constant" and v.is_const())
                                                        or v.fill_value() is not None):
                shp = p.input(0) if p.op_type == "ConstantOfShape" else None
                graph.remove(p)
                if shp is not None and not shp.num_uses and shp.name in graph.initializers and not shp.is_graph_input():
                    graph.remove_initializer(shp.name)


def apply_rules(graph: Graph, rules: Sequence[Rule], *, max_rewrites: int | None = None) -> int:
    """Apply ``rules`` greedily until none matches; returns the number of rewrites.

    One worklist holds nodes to visit (initially all, in order). A successful rewrite pushes the
    new nodes and the readers of their outputs. Rules are indexed by root op type, so each visit
    tries only rules that can match.
    """
    index: dict[str, list[Rule]] = {}
    for r in rules:
        for t in r.pattern.op_types:
            index.setdefault(t, []).append(r)
    work: deque[Node] = deque(graph.iter_nodes())
    queued: set[int] = {id(n) for n in work}
    count = 0
    limit = max_rewrites if max_rewrites is not None else 50 * (len(graph) + 10)
    while work and count < limit:
        node = work.popleft()
        queued.discard(id(node))
        if node.graph is not graph:
            continue
        for r in index.get(node.op_type, ()):
            m = r.try_match(node)
            if m is None:
                continue
            b = Builder(graph, node)
            try:
                repl = r.rewrite(m, b)
            except Exception:
                b.rollback()
                raise
            if repl is None:
                b.rollback()
                continue
            repl_list = list(repl) if isinstance(repl, list | tuple) else [repl]
            if len(repl_list) != len(node.outputs):
                b.rollback()
                raise ValueError(f"rule {r.name} returned {len(repl_list)} values for {len(node.outputs)} outputs")
            for old, new in zip(node.outputs, repl_list, strict=True):
                if new is None or new is old:
                    continue
                _carry_type(old, new)
                graph.replace_all_uses_with(old, new)
            _drop_dead(graph, m.nodes)
            count += 1
            log.debug("rule %s rewrote %s", r.name, node.name or node.op_type)
            push: list[Node] = list(b.created)
            for new in repl_list:
                if new is not None:
                    push.extend(new.consumers())
            for v in repl_list:
                if v is not None and v.producer is not None:
                    push.append(v.producer)
            for n in push:
                if n.graph is graph and id(n) not in queued:
                    queued.add(id(n))
                    work.append(n)
            break
    return count


def _carry_type(old: Value, new: Value) -> None:
    if new.dtype is None:
        new.dtype = old.dtype
    if new.shape is None:
        new.shape = old.shape


class PatternPass(Pass):
    """A pass made of rewrite rules, run by the greedy driver on every graph.

    Subclass it and either set ``pattern`` and define ``rewrite(self, match, builder)``
    (plus an optional ``where(self, match)``), or override :meth:`rules`.
    """

    pattern: OpPattern | None = None

    def rules(self) -> list[Rule]:
        if self.pattern is None:
            raise NotImplementedError("set `pattern` or override rules()")
        where = getattr(self, "where", None)
        return [Rule(self.name, self.pattern, self.rewrite, where)]

    def rewrite(self, m: Match, b: Builder) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_rules(graph, self.rules()) > 0

    def explain(self, node: Node) -> str:
        """Why this pass's rules do or do not match at ``node`` (first matching rule wins)."""
        reasons = []
        for r in self.rules():
            why = explain(r, node)
            if why == "matches":
                return f"{r.name}: matches"
            reasons.append(f"{r.name}: {why}")
        return "; ".join(reasons)
