"""The node-by-node lowering loop shared by ``lower-recurrent`` and ``unroll-loops``."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from graphopt import Graph, Node, Pass, PassContext

log = logging.getLogger(__name__)


class Refuse(Exception):
    """This node cannot be lowered; the message says why."""


class NodeLowering(Pass):
    """Lowers each main-graph node whose op is in ``options['ops']`` with :meth:`lower_node`.

    A node it refuses (:class:`Refuse`) is left unchanged, logged with the reason and listed in
    ``report['left']`` (node name -> reason); the ones done are counted per op type in
    ``report[done_key]``."""

    done_key: ClassVar[str] = "lowered"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {self.done_key: {}, "left": {}}

    def lower_node(self, graph: Graph, n: Node, opset: int) -> None:
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        opset = (self.model.opset("") if self.model is not None else None) or 13
        done = self.report[self.done_key]
        for n in list(graph):
            if n.op_type not in self.options["ops"] or n.domain not in ("", "ai.onnx") or n.graph is not graph:
                continue
            try:
                self.lower_node(graph, n, opset)
            except Refuse as why:
                self.report["left"][n.name or n.op_type] = str(why)
                log.info("%s: node %r (%s) left as it is: %s", self.name, n.name, n.op_type, why)
                continue
            done[n.op_type] = done.get(n.op_type, 0) + 1
            changed = True
        return changed
