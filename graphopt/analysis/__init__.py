"""Analyses: shape/type inference, cost (FLOPs, params, bytes), liveness, networkx views."""

from graphopt.analysis.cost import ModelStats, NodeCost, model_stats, node_cost
from graphopt.analysis.graphview import dominators, to_networkx
from graphopt.analysis.liveness import MemoryProfile, peak_memory
from graphopt.analysis.shapes import infer_shapes

__all__ = [
    "MemoryProfile", "ModelStats", "NodeCost", "dominators", "infer_shapes", "model_stats",
    "node_cost", "peak_memory", "to_networkx",
]
