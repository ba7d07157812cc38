"""Knowledge distillation: the original model teaches its compressed (or smaller) version.

The ``distill`` pass trains the model's float weights (and, for a QDQ model from ``graphopt
quantize``, its int8 weights through fake quantization) to reproduce a teacher model on the
calibration samples of the :class:`~graphopt.PassContext`. It needs PyTorch, an optional extra::

    pip install "graphopt[distill]"

and imports it only when it runs. The graph is lowered to torch functions op by op
(:mod:`.lower`; the covered ops are in :data:`SUPPORTED_OPS` once torch is installed), trained
by :func:`.train.distill`, and only the trained initializers are written back. See
docs/distillation.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

from graphopt import Model, Pass, PassContext, register_pass
from graphopt.errors import GraphoptError, PassError

TORCH_HINT = 'graphopt distill needs PyTorch (CPU): pip install "graphopt[distill]"'


def _torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise GraphoptError(TORCH_HINT) from None


@register_pass
class Distill(Pass):
    """Knowledge distillation: train the weights to match a teacher model on the calibration data (needs PyTorch).

    Options: ``teacher`` (a Model or a path), ``labels`` (class per calibration sample, or None),
    ``temperature``, ``alpha`` (distillation vs label cross-entropy), ``steps`` / ``minutes``,
    ``lr``, ``batch``, ``match`` (None, ``"auto"`` or [(teacher tensor, student tensor)]),
    ``feature_weight``, ``losses`` ({output: kl|mse|cosine|ctc[:B]|framekl[:B]}), ``blank_floor`` (framekl's
    weight of a sure-blank frame), ``seed``, ``progress``, ``snapshot`` (a
    callable given a copy of the model with the weights so far, the step and the seconds trained) every
    ``snapshot_minutes``.
    The report (``self.report``) holds the run's figures.
    """

    name = "distill"
    recursive = False
    default_options: ClassVar[dict[str, Any]] = {
        "teacher": None, "labels": None, "temperature": 4.0, "alpha": 0.5, "steps": None, "minutes": None,
        "lr": 1e-3, "relative_lr": True, "batch": 8, "match": None, "feature_weight": 1.0, "losses": None, "seed": 0, "progress": True,
        "weight_decay": 0.0, "snapshot_minutes": None, "snapshot": None, "blank_floor": 0.1,
    }

    def apply(self, model: Model, ctx: PassContext) -> bool:
        o = self.options
        if o["teacher"] is None:
            raise PassError("needs a teacher model (option teacher=)", field="pass 'distill'")
        if not ctx.calibration:
            raise PassError("needs data: PassContext(calibration=[feeds...])", field="pass 'distill'")
        _torch()
        from graphopt import load

        from .train import DistillConfig, distill

        teacher = o["teacher"] if isinstance(o["teacher"], Model) else load(o["teacher"])
        cfg = DistillConfig(temperature=o["temperature"], alpha=o["alpha"], steps=o["steps"], minutes=o["minutes"],
                            lr=o["lr"], relative_lr=o["relative_lr"], batch=o["batch"], match=o["match"], feature_weight=o["feature_weight"],
                            losses=dict(o["losses"] or {}), seed=o["seed"], progress=o["progress"],
                            weight_decay=o["weight_decay"], snapshot_minutes=o["snapshot_minutes"],
                            snapshot=o["snapshot"], blank_floor=o["blank_floor"])
        rep = distill(model, teacher, list(ctx.calibration), cfg, labels=o["labels"])
        self.result = rep
        self.report = {"rows": rep.rows(), "steps": rep.steps, "seconds": rep.seconds, "loss_first": rep.loss_first,
                       "loss_last": rep.loss_last}
        return rep.steps > 0


__all__ = ["TORCH_HINT", "Distill"]
