"""graphopt's intermediate representation.

* :class:`Value` - an SSA value: a graph input, an initializer, or a node output. It knows its
  producer and every use ``(node, input_index)``; the mutation methods keep both up to date, so
  passes never rebuild producer/consumer maps by hand.
* :class:`Node` - one operator. Subgraphs (If/Loop/Scan bodies) are :class:`Graph` objects held
  in its attributes; they may read values of enclosing graphs directly (outer-scope references
  are ordinary uses of the outer :class:`Value`).
* :class:`Graph` - nodes kept in a doubly linked list (O(1) insert and remove anywhere), inputs,
  outputs, initializers, and :meth:`Graph.verify` for the invariants.
* :class:`Model` - the top graph plus opset imports, local functions and metadata.
"""

from __future__ import annotations

import copy as _copy
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto

from graphopt.errors import InvalidModelError, VerificationError
from graphopt.ir.tensor import Tensor, dtype_name, onnx_dtype

Dim = int | str | None
Shape = tuple[Dim, ...]

#: Ops whose subgraph attributes hold bodies (for documentation; any GRAPH attribute is handled).
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


class Value:
    """An SSA value. ``name`` is unique within its scope chain.

    ``dtype`` is an ONNX element type (``onnx.TensorProto.FLOAT``...) or None when unknown;
    ``shape`` is None (rank unknown) or a tuple of int (static), str (symbolic) or None (unknown)
    per dimension. ``const`` holds the data of an initializer.
    """

    __slots__ = (
        "__weakref__",
        "_type_sig",
        "_uses",
        "const",
        "doc_string",
        "dtype",
        "graph",
        "index",
        "meta",
        "name",
        "producer",
        "shape",
        "type_proto",
    )

    def __init__(
        self,
        name: str,
        dtype: int | None = None,
        shape: Sequence[Dim] | None = None,
        *,
        const: Tensor | None = None,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape: Shape | None = tuple(shape) if shape is not None else None
        self.producer: Node | None = None
        self.index: int = 0
        self._uses: dict[tuple[Node, int], None] = {}
        self.const = const
        if const is not None:
            self.dtype = const.dtype if dtype is None else dtype
            self.shape = const.shape if shape is None else self.shape
        self.graph: Graph | None = None
        self.doc_string = ""
        self.type_proto: onnx.TypeProto | None = None
        self._type_sig: tuple[Any, Any] | None = None
        self.meta: dict[str, Any] = {}

    # -- uses -----------------------------------------------------------------------------------
    @property
    def uses(self) -> list[tuple[Node, int]]:
        """Every ``(node, input_index)`` reading this value (including nodes in subgraphs)."""
        return list(self._uses)

    def consumers(self) -> list[Node]:
        """Distinct nodes reading this value, in first-use order."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    @property
    def num_uses(self) -> int:
        return len(self._uses)

    def is_graph_output(self) -> bool:
        """True if this value is an output of the graph that owns it."""
        g = self.graph
        return g is not None and any(o is self for o in g.outputs)

    def is_graph_input(self) -> bool:
        g = self.graph
        return g is not None and self.producer is None and any(i is self for i in g.inputs)

    def is_initializer(self) -> bool:
        g = self.graph
        return g is not None and g.initializers.get(self.name) is self

    def has_no_uses(self) -> bool:
        """No node reads it and it is not a graph output."""
        return not self._uses and not self.is_graph_output()

    # -- constants ------------------------------------------------------------------------------
    def const_value(self, *, allow_overridable: bool = False) -> np.ndarray | None:
        """The constant data of this value, or None when it is not a constant.

        Initializers and outputs of ``Constant`` nodes are constants. An initializer that is also
        a graph input is a default the caller may override, so it only counts with
        ``allow_overridable=True``.
        """
        if self.const is not None:
            if not allow_overridable and self.is_graph_input():
                return None
            return self.const.numpy()
        p = self.producer
        if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx"):
            return constant_node_value(p)
        return None

    def fill_value(self) -> tuple[tuple[int, ...], np.ndarray] | None:
        """``(shape, scalar)`` when this value is ``ConstantOfShape`` of a constant shape: a
        constant stored as a tiny producer. Size-aware passes keep such values unexpanded."""
        p = self.producer
        if p is None or p.op_type != "ConstantOfShape" or p.domain not in ("", "ai.onnx"):
            return None
        s = p.input(0)
        shp = s.const_value() if s is not None else None
        if shp is None:
            return None
        val = p.attr("value")
        scalar = val.numpy().reshape(-1)[:1].reshape(()) if val is not None else np.array(0.0, np.float32)
        return tuple(int(d) for d in np.ravel(shp)), scalar

    def is_const(self, *, allow_overridable: bool = False) -> bool:
        if self.const is not None:
            return allow_overridable or not self.is_graph_input()
        p = self.producer
        return p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx")

    # -- type -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def static_shape(self) -> tuple[int, ...] | None:
        """The shape if every dimension is a known size, else None (a negative int - PaddlePaddle
        writes ``-1`` for "any size" - is not a size)."""
        if self.shape is None or not all(isinstance(d, int) and d >= 0 for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        shp = "?" if self.shape is None else "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"%{self.name}:{dtype_name(self.dtype)}{shp}"


def constant_node_value(node: Node) -> np.ndarray | None:
    """Data of a ``Constant`` node, whichever attribute holds it (None for sparse values)."""
    for key, attr in node.attrs.items():
        v = attr.value
        if key == "value":
            return v.numpy() if isinstance(v, Tensor) else None
        if key == "value_float":
            return np.array(v, dtype=np.float32)
        if key == "value_floats":
            return np.array(v, dtype=np.float32)
        if key == "value_int":
            return np.array(v, dtype=np.int64)
        if key == "value_ints":
            return np.array(v, dtype=np.int64)
        if key == "value_string":
            return np.array(v, dtype=object)
        if key == "value_strings":
            return np.array(v, dtype=object)
    return None


_ATTR_GETTERS = {
    AttributeProto.FLOAT: lambda p, ctx: p.f,
    AttributeProto.INT: lambda p, ctx: p.i,
    AttributeProto.STRING: lambda p, ctx: p.s.decode("utf-8", errors="surrogateescape"),
    AttributeProto.FLOATS: lambda p, ctx: list(p.floats),
    AttributeProto.INTS: lambda p, ctx: list(p.ints),
    AttributeProto.STRINGS: lambda p, ctx: [s.decode("utf-8", errors="surrogateescape") for s in p.strings],
    AttributeProto.TENSOR: lambda p, ctx: Tensor(proto=p.t, base_dir=ctx),
    AttributeProto.TENSORS: lambda p, ctx: [Tensor(proto=t, base_dir=ctx) for t in p.tensors],
    AttributeProto.TYPE_PROTO: lambda p, ctx: p.tp,
    AttributeProto.TYPE_PROTOS: lambda p, ctx: list(p.type_protos),
    AttributeProto.SPARSE_TENSOR: lambda p, ctx: p.sparse_tensor,
    AttributeProto.SPARSE_TENSORS: lambda p, ctx: list(p.sparse_tensors),
}


class Attr:
    """A node attribute. Values decode lazily from the original proto; unmodified attributes are
    written back as they were read. Graph-valued attributes always hold :class:`Graph` objects.
    """

    __slots__ = ("_base_dir", "_proto", "_value", "doc_string", "name", "ref_attr_name", "type")

    def __init__(self, name: str, type: int, value: Any = None, *, ref_attr_name: str = "") -> None:
        self.name = name
        self.type = type
        self._value = value
        self._proto: AttributeProto | None = None
        self._base_dir: Any = None
        self.ref_attr_name = ref_attr_name
        self.doc_string = ""

    @classmethod
    def from_proto(cls, proto: AttributeProto, base_dir: Any, graphs: Any = None) -> Attr:
        a = cls(proto.name, proto.type, graphs, ref_attr_name=proto.ref_attr_name)
        a._proto = proto
        a._base_dir = base_dir
        a.doc_string = proto.doc_string
        return a

    @property
    def value(self) -> Any:
        if self._value is None and self._proto is not None and not self.ref_attr_name:
            getter = _ATTR_GETTERS.get(self.type)
            if getter is not None:
                self._value = getter(self._proto, self._base_dir)
        return self._value

    @value.setter
    def value(self, v: Any) -> None:
        self._value = v
        self._proto = None

    @property
    def proto(self) -> AttributeProto | None:
        """The original proto if the attribute is unmodified (never for graph attributes)."""
        return self._proto

    @staticmethod
    def infer_type(value: Any) -> int:
        """ONNX attribute type for a Python value."""
        if isinstance(value, bool | int | np.integer):
            return AttributeProto.INT
        if isinstance(value, float | np.floating):
            return AttributeProto.FLOAT
        if isinstance(value, str | bytes):
            return AttributeProto.STRING
        if isinstance(value, Tensor | np.ndarray):
            return AttributeProto.TENSOR
        if isinstance(value, Graph):
            return AttributeProto.GRAPH
        if isinstance(value, list | tuple):
            if not value:
                return AttributeProto.INTS
            first = value[0]
            if all(isinstance(x, bool | int | np.integer) for x in value):
                return AttributeProto.INTS
            if all(isinstance(x, int | float | np.integer | np.floating) for x in value):
                return AttributeProto.FLOATS
            if isinstance(first, str | bytes):
                return AttributeProto.STRINGS
            if isinstance(first, Tensor | np.ndarray):
                return AttributeProto.TENSORS
            if isinstance(first, Graph):
                return AttributeProto.GRAPHS
        raise TypeError(f"cannot infer an ONNX attribute type for {type(value).__name__}")

    def graphs(self) -> list[Graph]:
        if self.type == AttributeProto.GRAPH:
            return [self._value] if self._value is not None else []
        if self.type == AttributeProto.GRAPHS:
            return list(self._value or [])
        return []

    def __repr__(self) -> str:
        return f"{self.name}={self.value!r}"


class Node:
    """One operator application.

    Inputs are :class:`Value` objects (``None`` for an omitted optional input); outputs are Values
    this node produces (an output named ``""`` is an omitted optional output).
    Create nodes with :meth:`Graph.make_node` or ``Node(...)`` followed by :meth:`Graph.append`,
    :meth:`Graph.insert_before` or :meth:`Graph.insert_after`.
    """

    __slots__ = (
        "__weakref__",
        "_inputs",
        "_next",
        "_outputs",
        "_prev",
        "attrs",
        "doc_string",
        "domain",
        "graph",
        "meta",
        "metadata_props",
        "name",
        "op_type",
        "overload",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        outputs: Sequence[Value] | int = 1,
        attrs: dict[str, Any] | None = None,
        *,
        domain: str = "",
        name: str = "",
    ) -> None:
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.overload = ""
        self._inputs: list[Value | None] = []
        self._outputs: list[Value] = []
        self.attrs: dict[str, Attr] = {}
        self.doc_string = ""
        self.graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None
        self.metadata_props: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        for v in inputs:
            self.append_input(v)
        if isinstance(outputs, int):
            # unnamed (None) outputs get fresh names when the node joins a graph; "" would mean
            # an omitted optional output
            outputs = [Value(None) for _ in range(outputs)]  # type: ignore[arg-type]
        for v in outputs:
            self._add_output(v)
        for k, v in (attrs or {}).items():
            self.set_attr(k, v)

    # -- inputs ---------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    def input(self, i: int) -> Value | None:
        """Input ``i``, or None if absent or omitted."""
        return self._inputs[i] if i < len(self._inputs) else None

    def append_input(self, v: Value | None) -> None:
        i = len(self._inputs)
        self._inputs.append(v)
        if v is not None:
            v._uses[(self, i)] = None

    def set_input(self, i: int, v: Value | None) -> None:
        """Replace input ``i`` (extending with omitted inputs if needed), updating use lists."""
        while len(self._inputs) <= i:
            self.append_input(None)
        old = self._inputs[i]
        if old is v:
            return
        if old is not None:
            old._uses.pop((self, i), None)
        self._inputs[i] = v
        if v is not None:
            v._uses[(self, i)] = None

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        self._drop_inputs()
        for v in values:
            self.append_input(v)

    def _drop_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        self._inputs = []

    # -- outputs --------------------------------------------------------------------------------
    def _add_output(self, v: Value) -> None:
        if v.producer is not None:
            raise ValueError(f"value {v.name!r} already has a producer")
        v.producer = self
        v.index = len(self._outputs)
        self._outputs.append(v)
        if self.graph is not None:
            self.graph._adopt_value(v)

    def output(self, i: int = 0) -> Value:
        return self._outputs[i]

    # -- attributes -----------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """Value of attribute ``name`` (decoded), or ``default`` when absent."""
        a = self.attrs.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any, type: int | None = None) -> None:
        """Set an attribute; numpy arrays become tensors, the ONNX type is inferred if not given."""
        if isinstance(value, np.ndarray):
            value = Tensor(value)
        elif isinstance(value, list | tuple) and value and isinstance(value[0], np.ndarray):
            value = [Tensor(v) for v in value]
        t = type if type is not None else Attr.infer_type(value)
        if t == AttributeProto.STRING and isinstance(value, bytes):
            value = value.decode("utf-8", errors="surrogateescape")
        if t == AttributeProto.INTS:
            value = [int(x) for x in value]
        elif t == AttributeProto.FLOATS:
            value = [float(x) for x in value]
        elif t == AttributeProto.INT:
            value = int(value)
        elif t == AttributeProto.FLOAT:
            value = float(value)
        a = Attr(name, t, value)
        self.attrs[name] = a
        for g in a.graphs():
            g.parent = self
            if self.graph is not None:
                g._names = self.graph._names

    def subgraphs(self) -> list[Graph]:
        """Graphs held by this node's attributes (If branches, Loop/Scan bodies)."""
        out: list[Graph] = []
        for a in self.attrs.values():
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                out.extend(a.graphs())
        return out

    def outer_inputs(self) -> list[Value]:
        """Values of enclosing scopes that this node's subgraphs read (implicit inputs)."""
        found: dict[int, Value] = {}
        for g in self.subgraphs():
            local: set[int] = set()
            for sv in itertools.chain(g.inputs, g.initializers.values()):
                local.add(id(sv))
            for n in g.iter_nodes():
                for o in n._outputs:
                    local.add(id(o))
            for n in g.iter_nodes():
                for v in itertools.chain(n._inputs, n.outer_inputs()):
                    if v is not None and id(v) not in local:
                        found[id(v)] = v
            for o in g.outputs:
                if id(o) not in local:
                    found[id(o)] = o
        return list(found.values())

    def __repr__(self) -> str:
        dom = f"{self.domain}::" if self.domain else ""
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self._outputs)
        return f"{outs} = {dom}{self.op_type}({ins})" + (f"  # {self.name}" if self.name else "")


class NameScope:
    """Names handed out in a model, shared by a graph and its subgraphs, for fresh names."""

    __slots__ = ("_counters", "used")

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._counters: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        base = base or "v"
        if base not in self.used:
            self.used.add(base)
            return base
        i = self._counters.get(base, 0)
        while True:
            i += 1
            cand = f"{base}__{i}"
            if cand not in self.used:
                self._counters[base] = i
                self.used.add(cand)
                return cand


class Graph:
    """A computation graph: an ordered list of nodes with inputs, outputs and initializers.

    Node order is kept in a doubly linked list, so :meth:`insert_before`, :meth:`insert_after`
    and :meth:`remove` are O(1) and iteration tolerates removal of the current node.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.doc_string = ""
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        #: Intermediate values whose type is recorded in ``value_info`` on export.
        self.value_info: list[Value] = []
        self.sparse_initializers: list[onnx.SparseTensorProto] = []
        self.quantization_annotation: list[onnx.TensorAnnotation] = []
        self.metadata_props: dict[str, str] = {}
        self.parent: Node | None = None
        self._names = NameScope()
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return self.iter_nodes()

    def iter_nodes(self) -> Iterator[Node]:
        """Nodes in order; removing the current node while iterating is safe."""
        n = self._head
        while n is not None:
            nxt = n._next
            if n.graph is self:
                yield n
            n = nxt

    def reversed_nodes(self) -> Iterator[Node]:
        n = self._tail
        while n is not None:
            prv = n._prev
            if n.graph is self:
                yield n
            n = prv

    @property
    def nodes(self) -> list[Node]:
        """A snapshot list of the nodes in order."""
        return list(self.iter_nodes())

    def __len__(self) -> int:
        return self._count

    def all_nodes(self) -> Iterator[Node]:
        """Every node, recursing into subgraphs (parents before their bodies' nodes)."""
        for n in self.iter_nodes():
            yield n
            for g in n.subgraphs():
                yield from g.all_nodes()

    def all_graphs(self) -> Iterator[Graph]:
        """This graph and every nested subgraph."""
        yield self
        for n in self.iter_nodes():
            for g in n.subgraphs():
                yield from g.all_graphs()

    @property
    def root(self) -> Graph:
        g = self
        while g.parent is not None and g.parent.graph is not None:
            g = g.parent.graph
        return g

    # -- names ----------------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """A value/node name not used anywhere in the model, derived from ``base``."""
        return self._names.fresh(base)

    def _adopt_value(self, v: Value) -> None:
        v.graph = self
        if v.name is None:
            p = v.producer
            base = (p.name or p.op_type) if p is not None else "v"
            v.name = self.fresh_name(f"{base}_out{v.index}" if p is not None and len(p._outputs) > 1 else f"{base}_out")
            return
        if not v.name:
            return
        self._names.used.add(v.name)

    # -- construction ---------------------------------------------------------------------------
    def add_input(self, name: str, dtype: int | Any, shape: Sequence[Dim] | None) -> Value:
        dt = dtype if isinstance(dtype, int) else onnx_dtype(dtype)
        v = Value(self.fresh_name(name), dt, shape)
        self._adopt_value(v)
        self.inputs.append(v)
        return v

    def add_initializer(self, name: str, data: np.ndarray | Tensor) -> Value:
        """Add a constant (fresh name derived from ``name``) and return its value."""
        t = data if isinstance(data, Tensor) else Tensor(np.asarray(data))
        v = Value(self.fresh_name(name), const=t)
        self._adopt_value(v)
        self.initializers[v.name] = v
        return v

    def make_node(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        num_outputs: int = 1,
        domain: str = "",
        name: str | None = None,
        output_names: Sequence[str] | None = None,
        before: Node | None = None,
        after: Node | None = None,
    ) -> Node:
        """Create a node with fresh output names and insert it (at the end by default)."""
        base = name or op_type
        node_name = self.fresh_name(base) if name is None else name
        names = list(output_names) if output_names is not None else [
            f"{base}_out{i}" if num_outputs > 1 else f"{base}_out" for i in range(num_outputs)
        ]
        outs = [Value(self.fresh_name(n)) for n in names]
        node = Node(op_type, inputs, outs, attrs, domain=domain, name=node_name)
        if before is not None:
            self.insert_before(before, node)
        elif after is not None:
            self.insert_after(after, node)
        else:
            self.append(node)
        return node

    def _link(self, node: Node) -> None:
        if node.graph is not None:
            raise ValueError(f"node {node.name!r} already belongs to a graph")
        node.graph = self
        self._count += 1
        if node.name:
            self._names.used.add(node.name)
        for v in node._outputs:
            self._adopt_value(v)
        for g in node.subgraphs():
            g.parent = node
            for sg in g.all_graphs():
                sg._names = self._names
                for v in itertools.chain(sg.inputs, sg.initializers.values()):
                    if v.name:
                        self._names.used.add(v.name)
                for n in sg.iter_nodes():
                    for v in n._outputs:
                        if v.name:
                            self._names.used.add(v.name)

    def append(self, *nodes: Node) -> None:
        for node in nodes:
            self._link(node)
            node._prev = self._tail
            node._next = None
            if self._tail is not None:
                self._tail._next = node
            else:
                self._head = node
            self._tail = node

    def insert_before(self, ref: Node, *nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) immediately before ``ref``."""
        if ref.graph is not self:
            raise ValueError("reference node is not in this graph")
        for node in _flatten(nodes):
            self._link(node)
            node._prev = ref._prev
            node._next = ref
            if ref._prev is not None:
                ref._prev._next = node
            else:
                self._head = node
            ref._prev = node

    def insert_after(self, ref: Node, *nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) immediately after ``ref``."""
        if ref.graph is not self:
            raise ValueError("reference node is not in this graph")
        cur = ref
        for node in _flatten(nodes):
            self._link(node)
            node._prev = cur
            node._next = cur._next
            if cur._next is not None:
                cur._next._prev = node
            else:
                self._tail = node
            cur._next = node
            cur = node

    def remove(self, node: Node, *, safe: bool = True) -> None:
        """Unlink ``node`` and drop its uses of its inputs.

        With ``safe=True`` (default) it refuses to remove a node whose outputs are still used or
        are graph outputs, which would leave dangling references.
        """
        if node.graph is not self:
            raise ValueError(f"node {node.name!r} is not in this graph")
        if safe:
            for v in node._outputs:
                if v._uses or v.is_graph_output():
                    raise ValueError(f"cannot remove node {node.name!r}: output {v.name!r} is still used")
        node._drop_inputs()
        # keep inputs list of subgraph outer uses intact only if node survives; drop them here
        for g in node.subgraphs():
            for n in list(g.all_nodes()):
                for i, v in enumerate(n._inputs):
                    if v is not None and v.graph is not None and not _owned_by(v.graph, g):
                        v._uses.pop((n, i), None)
        self._unlink(node)

    def _unlink(self, node: Node) -> None:
        if node._prev is not None:
            node._prev._next = node._next
        else:
            self._head = node._next
        if node._next is not None:
            node._next._prev = node._prev
        else:
            self._tail = node._prev
        node._prev = node._next = None
        node.graph = None
        self._count -= 1

    def detach(self, node: Node) -> Node:
        """Unlink ``node`` but keep its inputs and their use lists, so it can be inserted into
        another graph (e.g. when inlining a subgraph into its parent)."""
        if node.graph is not self:
            raise ValueError(f"node {node.name!r} is not in this graph")
        self._unlink(node)
        return node

    def remove_initializer(self, name: str) -> None:
        v = self.initializers.pop(name)
        if any(i is v for i in self.inputs):
            self.inputs = [i for i in self.inputs if i is not v]
        v.graph = None

    # -- rewiring -------------------------------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Value, *, replace_graph_outputs: bool = True) -> None:
        """Make every reader of ``old`` read ``new`` instead (also inside subgraphs).

        When ``old`` is a graph output, ``new`` takes its place; if ``new`` is a node output not
        otherwise visible it also takes ``old``'s name, so the graph's interface keeps its names.
        """
        if old is new:
            return
        for node, i in list(old._uses):
            node.set_input(i, new)
        if replace_graph_outputs:
            g = old.graph
            while g is not None:
                for k, o in enumerate(g.outputs):
                    if o is old:
                        g.outputs[k] = new
                        if (
                            new.producer is not None
                            and new.graph is g
                            and not new.is_graph_input()
                            and sum(1 for x in g.outputs if x is new) == 1
                        ):
                            old_name = old.name
                            old.name = self.fresh_name(old_name + "_replaced")
                            new.name = old_name
                break

    # -- ordering -------------------------------------------------------------------------------
    def is_sorted(self) -> bool:
        """True if every node reads only values defined before it (one linear scan)."""
        seen: set[int] = set()
        for n in self.iter_nodes():
            for v in n._inputs:
                if v is not None and v.producer is not None and v.producer.graph is self and id(v.producer) not in seen:
                    return False
            if n.attrs:
                for v in n.outer_inputs():
                    p = v.producer
                    if p is not None and p.graph is self and id(p) not in seen:
                        return False
            seen.add(id(n))
        return True

    def toposort(self) -> None:
        """Reorder nodes topologically (stable: keeps the current order where legal).

        Raises :class:`InvalidModelError` naming nodes on a cycle. Subgraph reads of values
        produced in this graph count as dependencies.
        """
        nodes = self.nodes
        pos = {id(n): k for k, n in enumerate(nodes)}
        indeg = [0] * len(nodes)
        succ: list[list[int]] = [[] for _ in nodes]
        for k, n in enumerate(nodes):
            deps: set[int] = set()
            for v in itertools.chain(n._inputs, n.outer_inputs() if n.attrs else ()):
                if v is None:
                    continue
                p = v.producer
                if p is not None and p.graph is self and id(p) in pos:
                    deps.add(pos[id(p)])
            indeg[k] = len(deps)
            for d in deps:
                succ[d].append(k)
        import heapq

        ready = [k for k in range(len(nodes)) if indeg[k] == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            k = heapq.heappop(ready)
            order.append(k)
            for s in succ[k]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(ready, s)
        if len(order) != len(nodes):
            stuck = [nodes[k] for k in range(len(nodes)) if indeg[k] > 0]
            names = ", ".join(repr(n.name or n.op_type) for n in stuck[:5])
            raise InvalidModelError(f"graph {self.name!r} has a cycle through nodes {names}", node=stuck[0].name)
        if order == list(range(len(nodes))):
            return
        self._relink([nodes[k] for k in order])

    def _relink(self, ordered: list[Node]) -> None:
        prev: Node | None = None
        for n in ordered:
            n._prev = prev
            n._next = None
            if prev is not None:
                prev._next = n
            prev = n
        self._head = ordered[0] if ordered else None
        self._tail = ordered[-1] if ordered else None

    def reorder(self, ordered: Sequence[Node]) -> None:
        """Set the node order (must be a permutation of the current nodes)."""
        if len(ordered) != self._count or any(n.graph is not self for n in ordered):
            raise ValueError("reorder needs a permutation of this graph's nodes")
        self._relink(list(ordered))

    # -- invariants -----------------------------------------------------------------------------
    def verify(self) -> None:
        """Check IR invariants; raise :class:`VerificationError` naming the first violation.

        Checks: SSA (each name defined once per scope chain), topological order (acyclic, every
        input defined before use or in an enclosing scope), use lists consistent with node
        inputs, graph outputs defined, node names unique.
        """
        self._verify(outer=set(), outer_names=set(), node_names=set())

    def _verify(self, outer: set[int], outer_names: set[str], node_names: set[str]) -> None:
        defined: set[int] = set(outer)
        names: set[str] = set(outer_names)

        def define(v: Value, what: str, node: Node | None = None) -> None:
            if not v.name:
                return
            if v.name in names:
                raise VerificationError(
                    f"value {v.name!r} ({what}) is defined more than once (SSA)",
                    node=node.name if node else None,
                )
            names.add(v.name)
            defined.add(id(v))

        for v in self.inputs:
            define(v, "graph input")
        for name, v in self.initializers.items():
            if v.name != name:
                raise VerificationError(f"initializer key {name!r} does not match value name {v.name!r}")
            if not any(i is v for i in self.inputs):
                define(v, "initializer")
            else:
                defined.add(id(v))
        count = 0
        for n in self.iter_nodes():
            count += 1
            if n.name:
                if n.name in node_names:
                    raise VerificationError(f"node name {n.name!r} is used twice", node=n.name)
                node_names.add(n.name)
            for i, v in enumerate(n._inputs):
                if v is None:
                    continue
                if id(v) not in defined:
                    raise VerificationError(
                        f"input {i} reads {v.name!r} which is not defined before it (undefined value or cycle)",
                        node=n.name or n.op_type,
                    )
                if (n, i) not in v._uses:
                    raise VerificationError(f"use list of {v.name!r} misses input {i}", node=n.name)
            for g in n.subgraphs():
                if g.parent is not n:
                    raise VerificationError("subgraph parent pointer is wrong", node=n.name)
                g._verify(defined, names, node_names)
            for k, o in enumerate(n._outputs):
                if o.producer is not n or o.index != k:
                    raise VerificationError(f"output {o.name!r} has a wrong producer link", node=n.name)
                define(o, "node output", n)
        if count != self._count:
            raise VerificationError(f"graph {self.name!r} node count is inconsistent")
        for o in self.outputs:
            if id(o) not in defined:
                raise VerificationError(f"graph output {o.name!r} is not defined", field=f"graph {self.name!r}")
        # stale uses: every recorded use must be a live node input
        for n in self.iter_nodes():
            for v in n._outputs:
                for (u, i) in v._uses:
                    if u.graph is None or i >= len(u._inputs) or u._inputs[i] is not v:
                        raise VerificationError(f"use list of {v.name!r} holds a stale use", node=u.name)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {self._count} nodes)"

    def dump(self) -> str:
        """Readable text form, one node per line."""
        lines = [f"graph {self.name}({', '.join(map(repr, self.inputs))}) {{"]
        for n in self.iter_nodes():
            lines.append(f"  {n!r}")
        lines.append(f"  return {', '.join('%' + o.name for o in self.outputs)}")
        lines.append("}")
        return "\n".join(lines)


def _owned_by(owner: Graph, g: Graph) -> bool:
    """True if ``owner`` is ``g`` or nested inside it."""
    x: Graph | None = owner
    while x is not None:
        if x is g:
            return True
        x = x.parent.graph if x.parent is not None else None
    return False


def _flatten(items: Iterable[Any]) -> Iterator[Node]:
    for it in items:
        if isinstance(it, Node):
            yield it
        else:
            yield from it


class Function:
    """A model-local function (``FunctionProto``); its body is a :class:`Graph`."""

    def __init__(self, domain: str, name: str, graph: Graph, *, overload: str = "") -> None:
        self.domain = domain
        self.name = name
        self.overload = overload
        self.graph = graph
        self.opset_imports: dict[str, int] = {}
        #: attribute names without defaults, in order
        self.attributes: list[str] = []
        #: attributes with default values (original protos)
        self.attribute_protos: list[AttributeProto] = []
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.domain, self.name, self.overload)

    def __repr__(self) -> str:
        return f"Function({self.domain}::{self.name}, {len(self.graph)} nodes)"


class Model:
    """A model: the main graph, opset imports, local functions, metadata.

    Fields graphopt does not interpret (training_info) are kept as protos and written back.
    """

    def __init__(self, graph: Graph, *, ir_version: int = 10, opset_imports: dict[str, int] | None = None) -> None:
        self.graph = graph
        self.ir_version = ir_version
        self.opset_imports: dict[str, int] = dict(opset_imports or {"": 21})
        self.producer_name = "graphopt"
        self.producer_version = ""
        self.domain = ""
        self.model_version = 0
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.functions: dict[tuple[str, str, str], Function] = {}
        self.training_info: list[onnx.TrainingInfoProto] = []
        #: directory external data is read relative to (set by :func:`graphopt.load`)
        self.base_dir: str | None = None

    def opset(self, domain: str = "") -> int | None:
        """Imported version of ``domain`` ("" and "ai.onnx" are the same)."""
        if domain in ("", "ai.onnx"):
            return self.opset_imports.get("", self.opset_imports.get("ai.onnx"))
        return self.opset_imports.get(domain)

    def all_graphs(self) -> Iterator[Graph]:
        """Main graph, subgraphs, and function bodies."""
        yield from self.graph.all_graphs()
        for f in self.functions.values():
            yield from f.graph.all_graphs()

    def verify(self) -> None:
        """Check invariants of the main graph and every function body."""
        self.graph.verify()
        for f in self.functions.values():
            f.graph.verify()

    def copy(self) -> Model:
        """A deep copy of the IR: new graphs, nodes and values with the same names, types,
        attributes, node order and name scopes.

        Constant data is not shared mutably: tensors read from a file keep their (never
        modified) proto and decode again on first use, so external data stays lazily referenced;
        in-memory arrays are copied. Scratch annotations in ``meta`` are dropped, as a round trip
        through ONNX would drop them; ``metadata_props`` and sparse-initializer records are kept.
        """
        return _Cloner().model(self)

    def __repr__(self) -> str:
        return f"Model(opset={self.opset()}, ir={self.ir_version}, {len(self.graph)} nodes)"


_KEPT_META = ("metadata_props", "sparse")


class _Cloner:
    """Structural deep copy of a model (what :meth:`Model.copy` does).

    Values are mapped old -> new across nested scopes, so subgraphs that read outer values read
    the copies. A graph's nodes and their outputs are created first and their inputs and
    attributes filled second, so an unsorted graph copies too.
    """

    def __init__(self) -> None:
        self.vmap: dict[int, Value] = {}
        self.gmap: dict[int, Graph] = {}

    @staticmethod
    def tensor(t: Tensor) -> Tensor:
        nt = _copy.copy(t)
        if t._proto is not None:
            nt._array = None  # decoded again from the unmodified proto when first read
        elif t._array is not None:
            nt._array = t._array.copy()
        return nt

    def value(self, v: Value) -> Value:
        nv = Value(v.name, v.dtype, v.shape)
        nv.shape = v.shape
        nv.dtype = v.dtype
        if v.const is not None:
            nv.const = self.tensor(v.const)
        nv.doc_string = v.doc_string
        nv.type_proto = v.type_proto
        nv._type_sig = v._type_sig
        nv.meta = {k: v.meta[k] for k in _KEPT_META if k in v.meta}
        self.vmap[id(v)] = nv
        return nv

    def get(self, v: Value) -> Value:
        nv = self.vmap.get(id(v))
        if nv is None:
            # a value only nodes refer to (a sparse initializer): copy it into its graph's copy
            nv = self.value(v)
            ng = self.gmap.get(id(v.graph)) if v.graph is not None else None
            if ng is not None:
                ng._adopt_value(nv)
        return nv

    def attr(self, a: Attr) -> Attr:
        na = Attr(a.name, a.type, ref_attr_name=a.ref_attr_name)
        na.doc_string = a.doc_string
        if a.type == AttributeProto.GRAPH:
            na._value = self.graph(a._value) if a._value is not None else None
        elif a.type == AttributeProto.GRAPHS:
            na._value = [self.graph(g) for g in a._value or []]
        else:
            val = a._value
            if isinstance(val, Tensor):
                val = self.tensor(val)
            elif isinstance(val, np.ndarray):
                val = val.copy()
            elif isinstance(val, list):
                val = [self.tensor(x) if isinstance(x, Tensor) else x for x in val]
            na._value = val
            na._proto = a._proto
            na._base_dir = a._base_dir
        return na

    def graph(self, g: Graph, names: NameScope | None = None) -> Graph:
        ng = Graph(g.name)
        self.gmap[id(g)] = ng
        if names is not None:
            ng._names = names
        ng.doc_string = g.doc_string
        for v in g.inputs:
            nv = self.vmap.get(id(v)) or self.value(v)
            ng._adopt_value(nv)
            ng.inputs.append(nv)
        for name, v in g.initializers.items():
            nv = self.vmap.get(id(v)) or self.value(v)  # an initializer may also be an input
            ng._adopt_value(nv)
            ng.initializers[name] = nv
        ng.sparse_initializers = list(g.sparse_initializers)
        ng.quantization_annotation = list(g.quantization_annotation)
        ng.metadata_props = dict(g.metadata_props)
        pairs: list[tuple[Node, Node]] = []
        for n in g.iter_nodes():
            nn = Node(n.op_type, domain=n.domain, name=n.name, outputs=0)
            nn.overload = n.overload
            nn.doc_string = n.doc_string
            nn.metadata_props = dict(n.metadata_props)
            for v in n._outputs:
                nn._add_output(self.value(v))
            pairs.append((n, nn))
        for n, nn in pairs:
            for v in n._inputs:
                nn.append_input(None if v is None else self.get(v))
            for k, a in n.attrs.items():
                nn.attrs[k] = self.attr(a)
            ng.append(nn)  # links subgraphs (parent, shared name scope) too
        ng.outputs = [self.get(v) for v in g.outputs]
        ng.value_info = [self.vmap[id(v)] for v in g.value_info if id(v) in self.vmap]
        if names is not None or g.parent is None:
            # keep the name scope exactly: names handed out earlier stay taken in the copy
            ng._names.used |= g._names.used
            ng._names._counters.update(g._names._counters)
        return ng

    def model(self, m: Model) -> Model:
        graph = self.graph(m.graph)
        nm = Model(graph, ir_version=m.ir_version, opset_imports=dict(m.opset_imports))
        for fld in ("producer_name", "producer_version", "domain", "model_version", "doc_string", "base_dir"):
            setattr(nm, fld, getattr(m, fld))
        nm.metadata_props = dict(m.metadata_props)
        nm.training_info = list(m.training_info)
        for fld in ("_opset_protos", "_present_fields"):
            if hasattr(m, fld):
                setattr(nm, fld, getattr(m, fld))
        for key, f in m.functions.items():
            self.vmap = {}
            nf = Function(f.domain, f.name, self.graph(f.graph, NameScope()), overload=f.overload)
            nf.opset_imports = dict(f.opset_imports)
            nf.attributes = list(f.attributes)
            nf.attribute_protos = list(f.attribute_protos)
            nf.doc_string = f.doc_string
            nf.metadata_props = dict(f.metadata_props)
            nm.functions[key] = nf
        return nm
