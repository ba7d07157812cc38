"""ONNX import and export.

Import turns a ``ModelProto`` into graphopt's IR; export turns it back. Everything no pass
touched survives the round trip: doc strings, metadata_props, value_info, local functions,
custom domains, training info, IR version, and tensors (unmodified tensors are written back
from their original protos, byte for byte). External data is read lazily, memory-mapped, and
only from inside the model's directory; large tensors can be saved externally, and models over
2 GB always are. Files are written atomically (temporary file + rename), so an interrupted save
never leaves a half-written model, and the input is never modified.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto

from graphopt.errors import CheckerError, InvalidModelError, ModelLoadError
from graphopt.ir.core import Attr, Function, Graph, Model, NameScope, Node, Value
from graphopt.ir.tensor import Tensor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building or serializing a large IR.

    Import allocates hundreds of thousands of linked objects; each allocation burst triggers
    a collection that walks all of them, which made import time grow quadratically-ish with
    model size. Nothing collectable is created while paused (the IR is live data).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

#: Protobuf cannot serialize messages over 2 GiB; stay clearly below.
_PROTO_LIMIT = 2_000_000_000
#: Tensors at least this large are written to external data when saving externally.
DEFAULT_EXTERNAL_THRESHOLD = 1024


# ---------------------------------------------------------------------------------------------
# types
# ---------------------------------------------------------------------------------------------
def shape_from_proto(shape: onnx.TensorShapeProto) -> tuple[int | str | None, ...]:
    """Dims of a ``TensorShapeProto``: int (static), str (symbolic) or None (unknown)."""
    dims: list[int | str | None] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


#: Element types ONNX defines (TensorProto.DataType), UNDEFINED (0) excluded.
_ELEM_TYPES = frozenset(v for v in TensorProto.DataType.values() if v)


def _check_elem_type(elem_type: Any, what: str) -> None:
    # (not an int at all: e.g. a Cast whose 'to' attribute has the wrong type, in a model loaded unchecked)
    if not isinstance(elem_type, int) or elem_type not in _ELEM_TYPES:
        raise InvalidModelError(f"{what} has element type {elem_type!r}, which ONNX does not define")


def _read_type(v: Value, tp: onnx.TypeProto) -> None:
    v.type_proto = tp
    if tp.HasField("tensor_type"):
        tt = tp.tensor_type
        if tt.elem_type:
            _check_elem_type(tt.elem_type, f"value {v.name!r}")
        v.dtype = tt.elem_type or None
        v.shape = shape_from_proto(tt.shape) if tt.HasField("shape") else None
    v._type_sig = (v.dtype, v.shape)


def _negative_dims(shape: tuple | None) -> bool:
    """A declared dim below 0: PaddlePaddle (and others) write -1 for "any size"."""
    return shape is not None and any(type(d) is int and d < 0 for d in shape)


def _dynamic_dim(dim: onnx.TensorShapeProto.Dimension, v: Value, axis: int, named: bool) -> None:
    """Write a declared negative dim as "any size": a symbol ``<value>_dim<axis>`` (``named``:
    main-graph inputs, so onnx's inference carries it to the outputs and a user can bind it, as
    with ORT's free dimension overrides) or an unknown dim."""
    if named:
        dim.dim_param = f"{v.name}_dim{axis}"
    else:
        dim.ClearField("dim_value")


def _write_type(v: Value, name_dynamic: bool = False) -> onnx.TypeProto | None:
    if v.type_proto is not None and v._type_sig == (v.dtype, v.shape):
        if not _negative_dims(v.shape):
            return v.type_proto
        # ONNX has no negative sizes: onnx's inference and full check read a declared -1 literally
        # (a Reshape to [0, -1] then "has" 0 columns), while ONNX Runtime treats it as unknown.
        # Written as a symbolic or unknown dim, which both read as "any size".
        tp = onnx.TypeProto()
        tp.CopyFrom(v.type_proto)
        for i, dim in enumerate(tp.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                _dynamic_dim(dim, v, i, name_dynamic)
        return tp
    if v.dtype is None and v.shape is None:
        if v.type_proto is not None and not v.type_proto.HasField("tensor_type"):
            return v.type_proto  # sequence/map/optional types are carried as they were
        return None
    tp = onnx.TypeProto()
    tt = tp.tensor_type
    if v.dtype:  # e.g. a Cast to a type ONNX does not define, in a model loaded unchecked
        _check_elem_type(v.dtype, f"value {v.name!r}")
    tt.elem_type = v.dtype or 0
    if v.shape is not None:
        shp = tt.shape
        shp.SetInParent()
        for i, d in enumerate(v.shape):
            dim = shp.dim.add()
            if isinstance(d, int):
                if d >= 0:
                    dim.dim_value = d
                else:  # "any size" (see above)
                    _dynamic_dim(dim, v, i, name_dynamic)
            elif isinstance(d, str):
                dim.dim_param = d
    return tp


def _value_info(v: Value, name_dynamic: bool = False) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = v.name
    tp = _write_type(v, name_dynamic)
    if tp is not None:
        vi.type.CopyFrom(tp)
    if v.doc_string:
        vi.doc_string = v.doc_string
    mp = v.meta.get("metadata_props")
    if mp:
        for k, val in mp.items():
            e = vi.metadata_props.add()
            e.key, e.value = k, val
    return vi


def _props(entries: Iterable[onnx.StringStringEntryProto]) -> dict[str, str]:
    return {e.key: e.value for e in entries}


def _set_props(target: Any, props: dict[str, str]) -> None:
    for k, val in props.items():
        e = target.add()
        e.key, e.value = k, val


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
def _proto_node_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every node name in ``nodes`` and in their subgraphs (one namespace in ONNX's checker)."""
    out: set[str] = set()
    stack = [nodes]
    while stack:
        for n in stack.pop():
            out.add(n.name)
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    stack.append(a.g.node)
                elif a.type == AttributeProto.GRAPHS:
                    stack.extend(g.node for g in a.graphs)
    return out


class _Importer:
    def __init__(self, model_proto: onnx.ModelProto, base_dir: str | None) -> None:
        self.mp = model_proto
        self.base_dir = base_dir
        self.names = NameScope()
        self.domains: set[str] = {o.domain for o in model_proto.opset_import}
        self.function_keys = {(f.domain, f.name) for f in model_proto.functions}
        # Node names seen so far in the current namespace (the model, or one function body), and
        # every node name the proto holds there: a repeated name (legal ONNX; spox writes them) is
        # given a fresh one that no node in the proto uses, so graphopt's IR keeps names unique.
        self.node_names: set[str] = set()
        self.proto_node_names: set[str] = set()
        self.renamed_nodes = 0

    def _node_name(self, name: str) -> str:
        if not name:
            return name
        if name in self.node_names:
            i = 1
            while f"{name}__{i}" in self.node_names or f"{name}__{i}" in self.proto_node_names:
                i += 1
            name = f"{name}__{i}"
            self.renamed_nodes += 1
        self.node_names.add(name)
        return name

    def _check_domain(self, np_: onnx.NodeProto, domains: set[str], where: str) -> None:
        d = np_.domain
        if d in ("", "ai.onnx"):
            if "" not in domains and "ai.onnx" not in domains:
                raise InvalidModelError(f"uses the default ONNX domain but {where} imports no opset for it",
                                        node=np_.name or np_.op_type)
            return
        if d not in domains and (d, np_.op_type) not in self.function_keys:
            raise InvalidModelError(
                f"op {d}::{np_.op_type} is in domain {d!r} which {where} does not import (unknown domain)",
                node=np_.name or np_.op_type,
            )

    def graph(self, gp: onnx.GraphProto, scopes: list[dict[str, Value]], domains: set[str],
              where: str = "the model") -> Graph:
        g = Graph(gp.name)
        g._names = self.names
        g.doc_string = gp.doc_string
        g.metadata_props = _props(gp.metadata_props)
        local: dict[str, Value] = {}
        chain = scopes + [local]

        def visible(name: str) -> Value | None:
            for s in reversed(chain):
                v = s.get(name)
                if v is not None:
                    return v
            return None

        def define(v: Value, what: str, node: str | None = None) -> None:
            if not v.name:
                return
            if visible(v.name) is not None:
                raise InvalidModelError(
                    f"value name {v.name!r} ({what}) is defined more than once", node=node,
                    field=None if node else f"graph {gp.name!r}",
                )
            local[v.name] = v
            g._adopt_value(v)

        input_ids: set[int] = set()
        for vi in gp.input:
            v = Value(vi.name)
            input_ids.add(id(v))
            _read_type(v, vi.type)
            v.doc_string = vi.doc_string
            if vi.metadata_props:
                v.meta["metadata_props"] = _props(vi.metadata_props)
            define(v, "graph input")
            g.inputs.append(v)
        for tp in gp.initializer:
            if tp.data_type:  # 0: Tensor.validate says "no data type"
                _check_elem_type(tp.data_type, f"initializer {tp.name!r}")
            t = Tensor(proto=tp, base_dir=self.base_dir)
            t.validate(tp.name)
            existing = local.get(tp.name)
            if existing is not None and id(existing) in input_ids and existing.const is None:
                existing.const = t  # old-style: initializer also listed as an input (a default)
                if existing.dtype is None:
                    existing.dtype = t.dtype
                if existing.shape is None:
                    existing.shape = t.shape
                g.initializers[tp.name] = existing
                continue
            v = Value(tp.name, const=t)
            v.doc_string = tp.doc_string
            define(v, "initializer")
            g.initializers[tp.name] = v
        g.sparse_initializers = list(gp.sparse_initializer)
        for sp in g.sparse_initializers:
            v = Value(sp.values.name)
            define(v, "sparse initializer")
            v.meta["sparse"] = sp
        g.quantization_annotation = list(gp.quantization_annotation)
        vinfo = {vi.name: vi for vi in gp.value_info}

        # pass 1: nodes and their outputs (forward references are allowed, sorted later)
        pairs: list[tuple[onnx.NodeProto, Node]] = []
        for np_ in gp.node:
            self._check_domain(np_, domains, where)
            node = Node(np_.op_type, domain=np_.domain, name=self._node_name(np_.name), outputs=0)
            node.overload = np_.overload
            node.doc_string = np_.doc_string
            if np_.metadata_props:
                node.metadata_props = _props(np_.metadata_props)
            for oname in np_.output:
                v = Value(oname)
                node._add_output(v)
                if oname:
                    define(v, "node output", np_.name or np_.op_type)
            pairs.append((np_, node))

        # pass 2: inputs, attributes, subgraphs
        for np_, node in pairs:
            for i, iname in enumerate(np_.input):
                if not iname:
                    node.append_input(None)
                    continue
                v = visible(iname)
                if v is None:
                    raise InvalidModelError(
                        f"input {i} reads {iname!r}, which no node, input or initializer defines",
                        node=np_.name or np_.op_type,
                    )
                node.append_input(v)
            for ap in np_.attribute:
                if ap.type == AttributeProto.GRAPH:
                    sub = self.graph(ap.g, chain, domains, where)
                    a = Attr.from_proto(ap, self.base_dir, sub)
                    a._proto = None
                    sub.parent = node
                elif ap.type == AttributeProto.GRAPHS:
                    subs = [self.graph(x, chain, domains, where) for x in ap.graphs]
                    a = Attr.from_proto(ap, self.base_dir, subs)
                    a._proto = None
                    for s in subs:
                        s.parent = node
                else:
                    a = Attr.from_proto(ap, self.base_dir)
                    if ap.type == AttributeProto.TENSOR:
                        if ap.t.data_type:
                            _check_elem_type(ap.t.data_type, f"node {np_.name or np_.op_type!r}: tensor attribute {ap.name!r}")
                        Tensor(proto=ap.t, base_dir=self.base_dir).validate(f"{np_.name or np_.op_type}.{ap.name}")
                node.attrs[ap.name] = a
            g.append(node)

        for vi in gp.output:
            v = visible(vi.name)
            if v is None:
                raise InvalidModelError(f"graph output {vi.name!r} is not produced by anything",
                                        field=f"graph {gp.name!r}")
            # outputs carry their own declared type; keep it on the value
            if v.type_proto is None or v.producer is not None:
                _read_type(v, vi.type)
            if vi.doc_string:
                v.doc_string = vi.doc_string
            g.outputs.append(v)
        for name, vi in vinfo.items():
            v = local.get(name)
            if v is None:
                v = visible(name)
                if v is None:
                    log.debug("dropping value_info for unknown value %r", name)
                    continue
            if v.type_proto is None:
                _read_type(v, vi.type)
            if vi.doc_string and not v.doc_string:
                v.doc_string = vi.doc_string
            if vi.metadata_props:
                v.meta["metadata_props"] = _props(vi.metadata_props)
            g.value_info.append(v)
        if not g.is_sorted():
            g.toposort()
        return g

    def function(self, fp: onnx.FunctionProto) -> Function:
        domains = {o.domain for o in fp.opset_import} or self.domains
        g = Graph(fp.name)
        g._names = NameScope()  # function bodies have their own namespace
        saved = self.names, self.node_names, self.proto_node_names
        self.names = g._names
        self.node_names, self.proto_node_names = set(), _proto_node_names(fp.node)
        try:
            gp = onnx.GraphProto()
            gp.name = fp.name
            for n in fp.input:
                gp.input.add().name = n
            for n in fp.output:
                gp.output.add().name = n
            gp.node.extend(fp.node)
            gp.value_info.extend(fp.value_info)
            body = self.graph(gp, [], domains, where=f"function {fp.domain}::{fp.name}")
        finally:
            self.names, self.node_names, self.proto_node_names = saved
        f = Function(fp.domain, fp.name, body, overload=fp.overload)
        f.opset_imports = {o.domain: o.version for o in fp.opset_import}
        f.attributes = list(fp.attribute)
        f.attribute_protos = list(fp.attribute_proto)
        f.doc_string = fp.doc_string
        f.metadata_props = _props(fp.metadata_props)
        return f

    def model(self) -> Model:
        mp = self.mp
        self.node_names, self.proto_node_names = set(), _proto_node_names(mp.graph.node)
        graph = self.graph(mp.graph, [], self.domains)
        if self.renamed_nodes:
            log.info("renamed %d repeated node names (NAME -> NAME__k) to keep names unique", self.renamed_nodes)
        m = Model(graph, ir_version=mp.ir_version, opset_imports={o.domain: o.version for o in mp.opset_import})
        m.producer_name = mp.producer_name
        m.producer_version = mp.producer_version
        m.domain = mp.domain
        m.model_version = mp.model_version
        m.doc_string = mp.doc_string
        m.metadata_props = _props(mp.metadata_props)
        m.training_info = list(mp.training_info)
        m.base_dir = self.base_dir
        m._opset_protos = (dict(m.opset_imports), list(mp.opset_import))
        m._present_fields = {f.name for f, _ in mp.ListFields()}
        for fp in mp.functions:
            f = self.function(fp)
            m.functions[f.key] = f
        return m


def from_proto(model_proto: onnx.ModelProto, *, base_dir: str | os.PathLike[str] | None = None,
               check: bool = True) -> Model:
    """Import a ``ModelProto`` into graphopt's IR.

    Args:
        model_proto: the model; tensors may reference external data relative to ``base_dir``.
        base_dir: directory external data is resolved against (and confined to).
        check: also run onnx's full check (``onnx.checker.check_model(m, full_check=True)``:
            structure, types and strict shape inference) and refuse a model it rejects. With
            ``False`` only graphopt's own import rules apply (what the CLI's ``--no-check`` does).

    Raises:
        InvalidModelError: undefined values, duplicate names, cycles, unknown domains, bad
            tensors, text that is not UTF-8, unknown element types, or anything the ONNX
            checker refuses (the checker's first line, and the node it names).
    """
    if not model_proto.HasField("graph") or not model_proto.opset_import:
        raise ModelLoadError("not an ONNX model (no graph or no opset_import)")
    if model_proto.ir_version <= 0:
        raise ModelLoadError("not an ONNX model (no ir_version)")
    if check:
        check_text(model_proto)
    bd = str(base_dir) if base_dir is not None else None
    with _gc_paused():
        model = _Importer(model_proto, bd).model()
    if check:
        _run_checker(model_proto, model)
    return model


def _bad_text(x: Any) -> bool:
    # upb hands back ``bytes`` for a string field that holds invalid UTF-8
    return isinstance(x, bytes)


def check_text(mp: onnx.ModelProto) -> None:
    """Refuse a model whose names or other text fields are not valid UTF-8 (ONNX strings are
    UTF-8; protobuf parses such fields as raw bytes, which nothing downstream can use).

    Tensor contents are not read (only tensor names and external-data entries)."""

    def fail(where: str, x: bytes, node: str | None) -> None:
        raise InvalidModelError(f"{where} is not valid UTF-8 ({bytes(x)[:40]!r})",
                                node=node if node and not _bad_text(node) else None)

    def tensor(t: TensorProto, where: str, node: str | None) -> None:
        for fld in ("name", "doc_string"):
            if _bad_text(getattr(t, fld)):
                fail(f"{where} {fld}", getattr(t, fld), node)
        for e in t.external_data:
            if _bad_text(e.key) or _bad_text(e.value):
                fail(f"{where} external data entry", e.key if _bad_text(e.key) else e.value, node)

    def message(msg: Any, where: str, node: str | None) -> None:
        if isinstance(msg, TensorProto):
            tensor(msg, where, node)
            return
        if isinstance(msg, onnx.NodeProto):
            node = msg.name or msg.op_type
        for fd, val in msg.ListFields():
            if fd.type == fd.TYPE_STRING:
                for i, x in enumerate(val if fd.is_repeated else [val]):
                    if _bad_text(x):
                        fail(f"{where}.{fd.name}" + (f"[{i}]" if fd.is_repeated else ""), x, node)
            elif fd.type == fd.TYPE_MESSAGE:
                for i, x in enumerate(val if fd.is_repeated else [val]):
                    message(x, f"{where}.{fd.name}" + (f"[{i}]" if fd.is_repeated else ""), node)

    message(mp, "model", None)


def _checker_message(e: Exception) -> str:
    """The checker's first line, trimmed, plus the node its context names (when the first
    line does not name one already)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if first.startswith("[ShapeInferenceError] Inference error(s):"):
        first = first[len("[ShapeInferenceError] Inference error(s):"):].strip()
    ctx = next((x for x in lines[1:] if "Name:" in x and "OpType:" in x), None)
    if ctx is not None and "node name" not in first:
        name, _, op = ctx.split("Name:", 1)[1].partition("OpType:")
        first += f" (node {name.strip()!r}, {op.strip()})"
    return first[:500]


def _standins(mp: onnx.ModelProto, keep_dims: bool) -> onnx.ModelProto:
    """A copy whose external tensors hold no data (graphopt validated them already): the
    checker's own external-data lookup resolves paths against the working directory and
    rejects symlinks. ``keep_dims=False`` makes them empty (the structural check counts data
    fields); shape inference needs their dims."""
    mp2 = onnx.ModelProto()
    mp2.CopyFrom(mp)
    for t in _iter_tensor_protos(mp2):
        if t.data_location == TensorProto.EXTERNAL:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
        elif _big_inline(t):
            t.ClearField("raw_data")  # validated by graphopt on import; serializing it costs more than the check
        else:
            continue
        if not keep_dims:
            del t.dims[:]
            t.dims.append(0)
    return mp2


#: inline tensors at least this big are checked as stand-ins (see :func:`_standins`)
_STANDIN_BYTES = 1 << 20


def _big_inline(t: TensorProto) -> bool:
    """An inline tensor whose data sits in ``raw_data`` and is at least ``_STANDIN_BYTES``."""
    if t.data_location == TensorProto.EXTERNAL or not t.HasField("raw_data"):
        return False
    n = 1
    for d in t.dims:
        n *= d
    return n * 4 >= _STANDIN_BYTES  # an estimate from the dims: reading raw_data's length copies it


def _check_beyond_checker(mp: onnx.ModelProto) -> None:
    """What onnx's checker lets through but no runtime loads: an opset newer than any ONNX
    defines, and a main graph with no outputs."""
    newest = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version(),
              "ai.onnx.ml": onnx.helper.VERSION_TABLE[-1][3]}
    for o in mp.opset_import:
        if o.domain in newest and not 1 <= o.version <= newest[o.domain]:
            raise CheckerError(f"ONNX: opset {o.version} of domain {o.domain or 'ai.onnx'!r} does not exist "
                               f"(ONNX defines 1 to {newest[o.domain]})")
    if not mp.graph.output:
        raise CheckerError(f"ONNX: graph {mp.graph.name!r} declares no outputs: there is nothing to compute")


def _declares_negative_dims(mp: onnx.ModelProto) -> bool:
    """Some input, output or value_info of the main graph declares a dim below 0."""
    g = mp.graph
    return any(d.HasField("dim_value") and d.dim_value < 0
               for vi in (*g.input, *g.output, *g.value_info) for d in vi.type.tensor_type.shape.dim)


def _run_checker(mp: onnx.ModelProto, model: Model | None = None) -> None:
    """Run onnx's full check (structure, then types and shapes under strict shape inference)
    and raise :class:`CheckerError` with its message. A graph that is only out of
    topological order is checked in graphopt's sorted order (graphopt sorts on import)."""
    tensors = list(_iter_tensor_protos(mp))
    bound = sum(8 * math.prod(t.dims) for t in tensors)  # at most 8 bytes an element (ByteSize itself costs)
    if bound >= _PROTO_LIMIT // 2 and mp.ByteSize() >= _PROTO_LIMIT:
        _check_beyond_checker(mp)
        return  # cannot be serialized for the checker in one piece
    external = any(t.data_location == TensorProto.EXTERNAL or _big_inline(t) for t in tensors)
    for attempt in range(2):
        try:
            if external:
                onnx.checker.check_model(_standins(mp, keep_dims=False))
                onnx.shape_inference.infer_shapes(_standins(mp, keep_dims=True), check_type=True, strict_mode=True)
            else:
                onnx.checker.check_model(mp, full_check=True)
            break
        except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, and what protobuf raises
            text = _checker_message(e)
            if attempt == 0 and model is not None and ("topologically sorted" in str(e) or _declares_negative_dims(mp)):
                # graphopt's sorted order; declared -1 dims ("any size" for ORT, a size of -1 for
                # onnx's inference) written as unknown dims
                mp = _Exporter(keep_external=True).model(model)
                continue
            raise CheckerError(f"ONNX checker: {text}") from None
    _check_beyond_checker(mp)


def load(path: str | os.PathLike[str], *, check: bool = True) -> Model:
    """Read an ONNX file into graphopt's IR (external data is mapped lazily, never copied).

    Raises:
        ModelLoadError: the path is missing, a directory, empty, or not an ONNX protobuf.
        ExternalDataError: external data missing, truncated, or outside the model directory.
        InvalidModelError: the model breaks ONNX rules.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"no such file: {str(p)!r}")
    if p.is_dir():
        raise ModelLoadError(f"{str(p)!r} is a directory, not an ONNX file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read {str(p)!r}: {e.strerror}") from None
    if not data:
        raise ModelLoadError(f"{str(p)!r} is empty")
    mp = onnx.ModelProto()
    try:
        mp.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{str(p)!r} is not a valid ONNX protobuf (truncated or another format): {e}") from None
    if not mp.HasField("graph") or not mp.opset_import or mp.ir_version <= 0:
        raise ModelLoadError(f"{str(p)!r} is not an ONNX model (no graph, opset_import or ir_version)")
    check_text(mp)  # even unchecked: names that are not UTF-8 cannot go anywhere
    return from_proto(mp, base_dir=p.resolve().parent, check=check)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
class _Exporter:
    def __init__(self, keep_external: bool, writer: Any = None, stub_over: int | None = None) -> None:
        self.keep_external = keep_external
        self.writer = writer
        self.stub_over = stub_over

    def tensor(self, t: Tensor, name: str) -> TensorProto:
        try:
            return self._tensor(t, name)
        except (NotImplementedError, TypeError, ValueError, OverflowError) as e:
            # e.g. a constant folded to a type a model loaded unchecked declared for it
            raise InvalidModelError(f"cannot be written: {str(e).splitlines()[0][:200]}",
                                    field=f"tensor {name!r}") from None

    def _tensor(self, t: Tensor, name: str) -> TensorProto:
        if self.stub_over is not None and t.size > self.stub_over:
            # type and dims only: enough for shape inference, which never reads big weights
            return TensorProto(name=name, data_type=t.dtype, dims=list(t.shape))
        if self.writer is not None:
            ext = self.writer(t, name)
            if ext is not None:
                return ext
            return t.to_proto(name, inline=True)  # small: embedded (never a stale reference)
        return t.to_proto(name, inline=not self.keep_external)

    def attr(self, a: Attr) -> AttributeProto:
        if a.proto is not None and a.type not in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            if not (a.type == AttributeProto.TENSOR and not self.keep_external
                    and a.proto.t.data_location == TensorProto.EXTERNAL):
                return a.proto
        ap = AttributeProto()
        ap.name = a.name
        ap.type = a.type
        if a.doc_string:
            ap.doc_string = a.doc_string
        if a.ref_attr_name:
            ap.ref_attr_name = a.ref_attr_name
            return ap
        v = a.value
        t = a.type
        if t == AttributeProto.FLOAT:
            ap.f = v
        elif t == AttributeProto.INT:
            ap.i = v
        elif t == AttributeProto.STRING:
            ap.s = v.encode("utf-8", errors="surrogateescape") if isinstance(v, str) else v
        elif t == AttributeProto.FLOATS:
            ap.floats.extend(v)
        elif t == AttributeProto.INTS:
            ap.ints.extend(v)
        elif t == AttributeProto.STRINGS:
            ap.strings.extend(x.encode("utf-8", errors="surrogateescape") if isinstance(x, str) else x for x in v)
        elif t == AttributeProto.TENSOR:
            ap.t.CopyFrom(self.tensor(v, v.proto.name if v.proto is not None else ""))
        elif t == AttributeProto.TENSORS:
            ap.tensors.extend(self.tensor(x, "") for x in v)
        elif t == AttributeProto.GRAPH:
            self.graph(v, ap.g)
        elif t == AttributeProto.GRAPHS:
            for x in v:
                self.graph(x, ap.graphs.add())
        elif t == AttributeProto.TYPE_PROTO:
            ap.tp.CopyFrom(v)
        elif t == AttributeProto.TYPE_PROTOS:
            ap.type_protos.extend(v)
        elif t == AttributeProto.SPARSE_TENSOR:
            ap.sparse_tensor.CopyFrom(v)
        elif t == AttributeProto.SPARSE_TENSORS:
            ap.sparse_tensors.extend(v)
        return ap

    def node(self, n: Node, np_: onnx.NodeProto | None = None) -> onnx.NodeProto:
        # filled in place when given (appending a built message to a repeated field copies it)
        np_ = onnx.NodeProto() if np_ is None else np_
        np_.op_type = n.op_type
        if n.domain:
            np_.domain = n.domain
        if n.name:
            np_.name = n.name
        if n.overload:
            np_.overload = n.overload
        if n.doc_string:
            np_.doc_string = n.doc_string
        ins = [("" if v is None else v.name) for v in n._inputs]
        while ins and ins[-1] == "":
            ins.pop()
        np_.input.extend(ins)
        np_.output.extend(v.name for v in n._outputs)
        for a in n.attrs.values():
            np_.attribute.append(self.attr(a))
        _set_props(np_.metadata_props, n.metadata_props)
        return np_

    def graph(self, g: Graph, gp: onnx.GraphProto | None = None) -> onnx.GraphProto:
        gp = onnx.GraphProto() if gp is None else gp  # in place: no copy of every weight
        gp.name = g.name
        if g.doc_string:
            gp.doc_string = g.doc_string
        for v in g.inputs:
            gp.input.append(_value_info(v, name_dynamic=g.parent is None))
        for _name, v in g.initializers.items():
            assert v.const is not None
            tp = self.tensor(v.const, v.name)
            if v.doc_string and not tp.doc_string:
                tp.doc_string = v.doc_string
            gp.initializer.append(tp)
        gp.sparse_initializer.extend(g.sparse_initializers)
        for n in g.iter_nodes():
            self.node(n, gp.node.add())
        for v in g.outputs:
            gp.output.append(_value_info(v))
        seen: set[int] = set()
        for v in g.value_info:
            if id(v) in seen or v.graph is not g:
                continue
            if v.producer is not None and v.producer.graph is not g:
                continue
            if v.producer is None and not v.is_initializer() and not v.is_graph_input():
                continue
            seen.add(id(v))
            gp.value_info.append(_value_info(v))
        gp.quantization_annotation.extend(g.quantization_annotation)
        _set_props(gp.metadata_props, g.metadata_props)
        return gp

    def function(self, f: Function) -> onnx.FunctionProto:
        fp = onnx.FunctionProto()
        fp.name = f.name
        fp.domain = f.domain
        if f.overload:
            fp.overload = f.overload
        fp.input.extend(v.name for v in f.graph.inputs)
        fp.output.extend(v.name for v in f.graph.outputs)
        fp.attribute.extend(f.attributes)
        fp.attribute_proto.extend(f.attribute_protos)
        for n in f.graph.iter_nodes():
            fp.node.append(self.node(n))
        for d, ver in f.opset_imports.items():
            o = fp.opset_import.add()
            o.domain, o.version = d, ver
        if f.doc_string:
            fp.doc_string = f.doc_string
        vis = self.graph_value_info(f.graph)
        fp.value_info.extend(vis)
        _set_props(fp.metadata_props, f.metadata_props)
        return fp

    def graph_value_info(self, g: Graph) -> list[onnx.ValueInfoProto]:
        out = []
        seen: set[int] = set()
        for v in g.value_info:
            if id(v) in seen or v.graph is not g:
                continue
            seen.add(id(v))
            out.append(_value_info(v))
        return out

    def model(self, m: Model) -> onnx.ModelProto:
        mp = onnx.ModelProto()
        mp.ir_version = m.ir_version
        orig = getattr(m, "_opset_protos", None)
        if orig is not None and orig[0] == m.opset_imports:
            mp.opset_import.extend(orig[1])  # unchanged: keep the entries exactly as read
        else:
            for d, ver in m.opset_imports.items():
                o = mp.opset_import.add()
                if d:
                    o.domain = d
                o.version = ver
        present = getattr(m, "_present_fields", set())
        for fld in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            val = getattr(m, fld)
            if val or fld in present:  # proto2 presence: write explicit empty fields back too
                setattr(mp, fld, val)
        self.graph(m.graph, mp.graph)
        _set_props(mp.metadata_props, m.metadata_props)
        for f in m.functions.values():
            mp.functions.append(self.function(f))
        mp.training_info.extend(m.training_info)
        return mp


def to_proto(model: Model, *, keep_external: bool = False, _stub_over: int | None = None) -> onnx.ModelProto:
    """Export the IR to a ``ModelProto``.

    With ``keep_external=False`` (default) external data is read and embedded, so the proto is
    self-contained; with ``True`` unmodified external tensors keep their references (relative to
    ``model.base_dir``), which is what :func:`save` and :meth:`Model.copy` use.
    """
    with _gc_paused():
        return _Exporter(keep_external, stub_over=_stub_over).model(model)


def _iter_tensor_protos(mp: onnx.ModelProto) -> Iterable[TensorProto]:
    def graph(gp: onnx.GraphProto) -> Iterable[TensorProto]:
        yield from gp.initializer
        for n in gp.node:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.GRAPH:
                    yield from graph(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        yield from graph(sg)

    yield from graph(mp.graph)
    for f in mp.functions:
        for n in f.node:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t


class _DataWriter:
    """Streams tensors of at least ``threshold`` bytes into an external data file and returns
    the proto that references them (page-aligned for large tensors, so they can be mapped)."""

    def __init__(self, f: Any, location: str, threshold: int) -> None:
        self.f = f
        self.location = location
        self.threshold = threshold
        self.offset = 0

    def __call__(self, t: Tensor, name: str) -> TensorProto | None:
        if t.dtype == TensorProto.STRING or t.nbytes < self.threshold:
            return None
        pad = (-self.offset) % 4096 if t.nbytes > 4096 else 0
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        p = t.proto
        if p is not None and p.data_location == TensorProto.EXTERNAL or p is not None and p.HasField("raw_data"):
            data: Any = t.raw_bytes()
        else:
            arr = np.require(t.numpy(), requirements="C")
            try:
                data = memoryview(arr).cast("B") if arr.dtype.byteorder in "=<|" and arr.dtype.kind in "biuf" \
                    else t.raw_bytes()
            except (TypeError, ValueError):
                data = t.raw_bytes()
        self.f.write(data)
        n = len(data) if isinstance(data, bytes) else data.nbytes
        self.offset += n
        out = TensorProto()
        out.name = name
        out.data_type = t.dtype
        out.dims.extend(t.shape)
        if t.doc_string:
            out.doc_string = t.doc_string
        _set_external(out, self.location, start, n)
        return out


def _ir_tensors(model: Model) -> Iterable[Tensor]:
    for g in model.all_graphs():
        for v in g.initializers.values():
            if v.const is not None:
                yield v.const
        for n in g.iter_nodes():
            for a in n.attrs.values():
                if a.type == AttributeProto.TENSOR and isinstance(a.value, Tensor):
                    yield a.value


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
    location: str | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        external_data: save tensors of at least ``external_threshold`` bytes to a side file
            (``location``, default ``<file name>.data``). None (default) does this when the
            model was loaded with external data or would not fit in one 2 GB protobuf.
        external_threshold: size in bytes from which a tensor goes to the side file.
        location: side file name, relative to the model's directory.

    Tensors are streamed to the side file straight from memory or their source file (never
    materialized in a protobuf). Both files are written under temporary names in the target
    directory and renamed into place, so readers never see a partial model and a failure
    leaves no trace.
    """
    out = Path(path)
    if out.is_dir():
        raise ModelLoadError(f"output path {str(out)!r} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = list(_ir_tensors(model))
    if external_data is None:
        total = sum(t.nbytes for t in tensors if t.dtype != TensorProto.STRING)
        external_data = any(t.is_external for t in tensors) or total >= int(_PROTO_LIMIT * 0.9)
    loc = location or (out.name + ".data")
    if Path(loc).is_absolute() or ".." in Path(loc).parts:
        raise ModelLoadError(f"external data location {loc!r} must be a plain name inside the output directory")
    tmp_files: list[tuple[str, Path]] = []
    try:
        if external_data:
            fd, data_tmp = tempfile.mkstemp(prefix=".graphopt-", suffix=".data.tmp", dir=out.parent)
            tmp_files.append((data_tmp, out.parent / loc))
            with os.fdopen(fd, "wb") as f, _gc_paused():
                mp = _Exporter(keep_external=True, writer=_DataWriter(f, loc, external_threshold)).model(model)
        else:
            with _gc_paused():
                mp = _Exporter(keep_external=False).model(model)
        fd, model_tmp = tempfile.mkstemp(prefix=".graphopt-", suffix=".onnx.tmp", dir=out.parent)
        tmp_files.append((model_tmp, out))
        with os.fdopen(fd, "wb") as f:
            f.write(mp.SerializeToString())
        for tmp, final in tmp_files:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        tmp_files = []
    finally:
        for tmp, _ in tmp_files:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    neg = [f"{v.name!r} dim {i}" for g in model.all_graphs() for v in (*g.inputs, *g.outputs)
           for i, d in enumerate(v.shape or ()) if type(d) is int and d < 0]
    if neg:
        log.info("declared negative dims (-1: 'any size', as PaddlePaddle writes them) saved as symbolic "
                 "(inputs: '<input>_dim<axis>') or unknown dims: %s", ", ".join(neg))
    log.info("saved %s%s", out, f" (+ external data {loc})" if external_data else "")
    return out


def _set_external(t: TensorProto, loc: str, offset: int, length: int) -> None:
    for fld in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(fld)
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", loc), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
