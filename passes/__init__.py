"""graphopt's built-in passes (installed as ``graphopt.passes``).

They are written only against graphopt's public API, exactly as a user's pass would be.
Importing this package registers them and the named pipelines:

* ``default`` - the lossless pipeline: lift old-style initializer inputs, then constant
  folding, If inlining, no-op elimination, 2-input Sum as Add, CSE, fusions, algebraic reordering and DCE repeated
  to a fixpoint, then memory-aware scheduling.
* ``fold-only`` - constant folding and DCE.
* ``cleanup`` - no-op elimination, CSE and DCE.
* ``memory`` - ``default``, then patch-based inference (``tile-spatial``: the peak-memory
  stretch of a CNN computed in bands of rows) and scheduling again. Exact; trades nodes and
  some recomputed halo rows for a lower peak.
"""

from __future__ import annotations

from graphopt import Pipeline, register_pipeline

from . import lower as _lower  # noqa: F401 - registers lower-recurrent, lower-integer, explicit-conv-transpose, lower-for-tvm
from .cleanup.canonicalize import SumToAdd
from .cleanup.constant_folding import ConstantFolding, InlineConstantIf, LiftInitializerInputs
from .cleanup.cse import CommonSubexpressionElimination
from .cleanup.dce import DeadCodeElimination
from .cleanup.names import CompactNames
from .cleanup.noop import EliminateIdentity, EliminateNoOps
from .cleanup.shapes import ResolveDynamicReshape
from .compress.channels import ChannelPruning
from .compress.cluster import Palettize, WeightClustering
from .compress.lowrank import LowRankFactorization
from .compress.prune import MagnitudePruning
from .compress.reconstruct import RefitBlocks
from .convert.float16 import Float16, Float16Weights
from .distill import Distill
from .fusion.activations import FuseActivations
from .fusion.conv_affine import FuseConvAffine
from .fusion.conv_bn import FuseConvBatchNorm
from .fusion.gemm import FuseGemm
from .fusion.layout import FuseLayoutChains
from .fusion.pad_conv import FusePadIntoConv
from .quantize.dynamic import QuantizeDynamic
from .quantize.equalize import CrossLayerEqualization
from .quantize.requantize import DequantizeInteger
from .quantize.static import QuantizeStatic
from .reorder.algebraic import AlgebraicReorder
from .reorder.schedule import MemoryAwareSchedule
from .reorder.tiling import SpatialTiling
from .reorder.transpose import SinkTransposes


def default_pipeline() -> Pipeline:
    """Lossless: folding, cleanup, fusions and reordering to a fixpoint, then scheduling."""
    core = Pipeline(
        [
            ConstantFolding(), ResolveDynamicReshape(), InlineConstantIf(), EliminateIdentity(), EliminateNoOps(),
            SumToAdd(),
            CommonSubexpressionElimination(), FuseConvBatchNorm(), FuseConvAffine(), FuseGemm(),
            FusePadIntoConv(), SinkTransposes(), FuseLayoutChains(), FuseActivations(), AlgebraicReorder(),
            DeadCodeElimination(),
        ],
        fixpoint=True,
        max_iterations=8,
        name="simplify",
    )
    return Pipeline([LiftInitializerInputs(), core, MemoryAwareSchedule()], name="default")


def fold_only_pipeline() -> Pipeline:
    """Constant folding (shape computations included) and dead-code elimination only."""
    return Pipeline([LiftInitializerInputs(), Pipeline([ConstantFolding(), DeadCodeElimination()], fixpoint=True,
                                                       name="fold")], name="fold-only")


def cleanup_pipeline() -> Pipeline:
    """No-op elimination, CSE and dead-code elimination."""
    return Pipeline([EliminateIdentity(), EliminateNoOps(), CommonSubexpressionElimination(), DeadCodeElimination()],
                    fixpoint=True, name="cleanup")


register_pipeline("default", default_pipeline)
register_pipeline("fold-only", fold_only_pipeline)
register_pipeline("cleanup", cleanup_pipeline)


def memory_pipeline() -> Pipeline:
    """The default pipeline, then band-wise computation of the peak-memory stretch, rescheduled."""
    return Pipeline([default_pipeline(), SpatialTiling(), MemoryAwareSchedule()], name="memory")


register_pipeline("memory", memory_pipeline)

__all__ = [
    "AlgebraicReorder",
    "ChannelPruning",
    "CommonSubexpressionElimination",
    "CompactNames",
    "ConstantFolding",
    "CrossLayerEqualization",
    "DeadCodeElimination",
    "DequantizeInteger",
    "Distill",
    "EliminateIdentity",
    "EliminateNoOps",
    "Float16",
    "Float16Weights",
    "FuseActivations",
    "FuseConvAffine",
    "FuseConvBatchNorm",
    "FuseGemm",
    "FuseLayoutChains",
    "FusePadIntoConv",
    "InlineConstantIf",
    "LiftInitializerInputs",
    "LowRankFactorization",
    "MagnitudePruning",
    "MemoryAwareSchedule",
    "Palettize",
    "QuantizeDynamic",
    "QuantizeStatic",
    "RefitBlocks",
    "ResolveDynamicReshape",
    "SinkTransposes",
    "SpatialTiling",
    "SumToAdd",
    "WeightClustering",
    "cleanup_pipeline",
    "default_pipeline",
    "fold_only_pipeline",
    "memory_pipeline",
]
