"""Interop with onnx-graphsurgeon: convert a ``gs.Graph`` to graphopt's IR and back, so
graphsurgeon scripts can run graphopt passes in the middle of their own edits."""

from __future__ import annotations

from typing import Any

from graphopt.ir.core import Model


def from_graphsurgeon(graph: Any, *, check: bool = False) -> Model:
    """Import an ``onnx_graphsurgeon.Graph`` (through graphsurgeon's own ONNX export)."""
    import onnx_graphsurgeon as gs

    from graphopt.onnx_io import from_proto

    return from_proto(gs.export_onnx(graph), check=check)


def to_graphsurgeon(model: Model) -> Any:
    """Export to an ``onnx_graphsurgeon.Graph`` (external data is embedded first)."""
    import onnx_graphsurgeon as gs

    from graphopt.onnx_io import to_proto

    return gs.import_onnx(to_proto(model))
