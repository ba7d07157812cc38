"""graphopt's built-in passes (installed as ``graphopt.passes``).

They are written only against graphopt's public API, exactly as a user's pass would be.
Importing this package registers them and the named pipelines.
"""

from __future__ import annotations

from graphopt import Pipeline, register_pipeline

from .cleanup.dce import DeadCodeElimination
from .cleanup.noop import EliminateIdentity
from .fusion.conv_bn import FuseConvBatchNorm


def default_pipeline() -> Pipeline:
    """Cleanup and fusions, repeated until nothing changes (lossless)."""
    return Pipeline(
        [EliminateIdentity(), FuseConvBatchNorm(), DeadCodeElimination()],
        fixpoint=True,
        name="default",
    )


def cleanup_pipeline() -> Pipeline:
    """Dead-code and no-op elimination only."""
    return Pipeline([EliminateIdentity(), DeadCodeElimination()], fixpoint=True, name="cleanup")


register_pipeline("default", default_pipeline)
register_pipeline("cleanup", cleanup_pipeline)

__all__ = ["DeadCodeElimination", "EliminateIdentity", "FuseConvBatchNorm", "default_pipeline"]
