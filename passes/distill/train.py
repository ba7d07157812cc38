"""Knowledge distillation of an ONNX student from an ONNX teacher, with PyTorch as the engine.

The teacher runs under ONNX Runtime once over the data (its outputs, and the intermediate
tensors matched for feature distillation, are kept); the student is lowered to a differentiable
:class:`~graphopt.passes.distill.lower.TorchGraph` and its float weights (and, for a QDQ student,
its integer weights through fake quantization) trained with Adam on:

* per matched output, by kind (:func:`output_kind`, overridable per output):

  - ``kl``: class-like outputs (probabilities over the last axis, e.g. a softmax classifier or
    a CTC recognizer's per-step distribution; or 2-D ``[N, C]`` logits): Hinton's softened
    KL divergence at temperature ``T``, scaled by ``T**2``;
  - ``mse``: maps and embeddings: mean squared error divided by the teacher's mean square
    (scale-free); ``cosine``: 1 - cosine similarity per sample;
  - ``ctc`` (on request only; ``ctc:B`` for blank index ``B``, default 0): sequence-level
    distillation of a CTC recognizer's ``[N, T, C]`` per-frame output: the teacher's output is
    decoded greedily per sample (argmax per frame, repeats collapsed, blanks dropped) and the
    student is trained with CTC on those label sequences, mixed with the per-frame ``kl`` term:
    ``(1 - ctc_weight) * KL + ctc_weight * CTC`` (``ctc_weight`` 0.5 by default). The CTC term
    only asks the student to *read the same text*, whatever frames it puts it on; the per-frame
    KL alone lets a student drift to all-blank frames while its loss falls;
  - ``framekl`` (on request only; ``framekl:B`` for blank index ``B``, default 0): the per-frame
    KL of a CTC recognizer's output with each frame weighted by the teacher's non-blank
    probability there, ``w = floor + (1 - floor) * (1 - p_blank)`` (``blank_floor``, 0.1 by
    default), as a weighted mean over frames. Most frames of a text line are blank and the
    teacher is sure of them, so the plain per-frame mean is dominated by frames that an all-blank
    student already gets right; this weighting puts the loss on the frames that carry the
    characters while still asking for the blanks between them;

* cross-entropy on labels when there are any (``alpha`` weighs distillation against it:
  ``alpha * KD + (1 - alpha) * CE``; ``alpha=0`` trains on the labels alone); a label of -1
  marks an unlabeled sample (extra transfer-set inputs, e.g. augmented ones): KD only;
* optional FitNets-style feature matching: normalized MSE between named (or automatically
  paired: same name, same shape) intermediate tensors of teacher and student.

Only the weights change: :func:`write_back` puts the trained arrays into the student's
initializers (or ``Constant`` nodes) and leaves every other part of the model as it was.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graphopt import Model, Tensor, to_proto
from graphopt.errors import GraphoptError, InputSpecError
from graphopt.runtime import collect_values, ort_session, run_ort

from .lower import TorchGraph

log = logging.getLogger("graphopt.distill")

LOSS_KINDS = ("kl", "mse", "cosine", "ctc", "framekl")
BLANK_KINDS = ("ctc", "framekl")  # kinds of a CTC output: ``kind:BLANK`` names its blank index
FRAME_KINDS = ("kl", "ctc", "framekl")  # KL over the last axis (class-like / per-frame outputs)
UNLABELED = -1  # the label of a sample that has none: distillation only, no cross-entropy


@dataclass
class DistillConfig:
    """Options of a distillation run (see the module docstring)."""

    temperature: float = 4.0
    alpha: float = 0.5
    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-3
    relative_lr: bool = True  # each tensor's step is lr x its RMS (else lr itself)
    batch: int = 8
    match: str | Sequence[tuple[str, str]] | None = None  # None, "auto", or [(teacher name, student name)]
    feature_weight: float = 1.0
    losses: Mapping[str, str] = field(default_factory=dict)  # output name -> kl|mse|cosine|ctc[:B]|framekl[:B]
    ctc_weight: float = 0.5  # a ``ctc`` output's loss: (1 - ctc_weight) * per-frame KL + ctc_weight * CTC
    blank_floor: float = 0.1  # a ``framekl`` frame's weight where the teacher is sure of blank
    seed: int = 0
    progress: bool = True
    weight_decay: float = 0.0
    # every snapshot_minutes of training, snapshot(a copy of the student with the weights so far,
    # step, seconds): to score a long run on held-out data over time without stopping it
    snapshot_minutes: float | None = None
    snapshot: Callable[[Model, int, float], None] | None = None


DEFAULT_STEPS = 300


def output_kind(values: Sequence[np.ndarray]) -> str:
    """``kl`` for class-like outputs (probabilities over the last axis on every sample, or 2-D
    ``[N, C]`` float logits with C >= 2), else ``mse``."""
    arrs = [np.asarray(v) for v in values]
    if not arrs or arrs[0].dtype.kind != "f" or arrs[0].ndim == 0 or arrs[0].shape[-1] < 2:
        return "mse"
    probs = all(a.size and np.all(a >= -1e-6) and np.all(a <= 1 + 1e-6)
                and np.allclose(a.sum(-1), 1.0, atol=1e-3) for a in arrs)
    if probs:
        return "kl"
    return "kl" if arrs[0].ndim == 2 else "mse"


def parse_kind(spec: str) -> tuple[str, int]:
    """``"ctc:3"`` -> ``("ctc", 3)`` (also ``framekl:B``); any other kind -> ``(kind, 0)``.

    Raises:
        InputSpecError: an unknown kind, or a blank index that is not an integer >= 0.
    """
    kind, sep, arg = spec.partition(":")
    if kind not in LOSS_KINDS or sep and kind not in BLANK_KINDS:
        raise InputSpecError(f"unknown loss {spec!r}: use one of {', '.join(LOSS_KINDS)} (ctc:BLANK or "
                             f"framekl:BLANK for a blank index other than 0)")
    if not sep:
        return kind, 0
    if not arg.strip().isdigit():
        raise InputSpecError(f"loss {spec!r}: the blank index after '{kind}:' must be an integer >= 0")
    return kind, int(arg)


def blank_frame_weights(teacher: torch.Tensor, blank: int, floor: float, probs: bool) -> torch.Tensor:
    """Per-frame weights of a ``framekl`` loss from the teacher's ``[..., C]`` output
    (probabilities if ``probs``, else logits): ``floor + (1 - floor) * (1 - p_blank)``, shape
    ``[...]``: ``floor`` on a frame the teacher is sure is blank, 1 on one it is sure is not."""
    p = teacher if probs else torch.softmax(teacher.float(), dim=-1)
    return floor + (1.0 - floor) * (1.0 - p[..., blank].clamp(0.0, 1.0))


def greedy_ctc_targets(probs: torch.Tensor, blank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy CTC decode of ``[N, T, C]`` per-frame scores (probabilities or logits): per sample,
    the argmax per frame with repeats collapsed and ``blank`` dropped.

    Returns:
        (labels of all samples concatenated, 1-D int64; length of each sample's labels, ``[N]``):
        the ``targets`` / ``target_lengths`` of :func:`torch.nn.functional.ctc_loss`. A sample
        whose frames are all blank gets an empty sequence (length 0).
    """
    best = probs.argmax(-1)  # [N, T]
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]  # the first frame of each run
    keep &= best != blank
    return best[keep], keep.sum(1)


def _is_prob(values: Sequence[np.ndarray]) -> bool:
    return all(np.all(v >= -1e-6) and np.allclose(np.sum(v, -1), 1.0, atol=1e-3) for v in values)


def _log_probs(x: torch.Tensor, probs: bool, temperature: float) -> torch.Tensor:
    z = torch.log(x.clamp_min(1e-12)) if probs else x
    return torch.log_softmax(z / temperature, dim=-1)


class _Objective:
    """The loss of one batch: distillation per output, CE on labels, feature matching."""

    def __init__(self, kinds: Mapping[str, str], probs: Mapping[str, bool], cfg: DistillConfig,
                 label_output: str | None, mean_sq: Mapping[str, float], features: Sequence[tuple[str, str]],
                 feature_ms: Mapping[str, float], logits: Mapping[str, str] | None = None) -> None:
        self.kinds, self.probs, self.cfg = kinds, probs, cfg
        self.logits = dict(logits or {})
        self.label_output, self.mean_sq = label_output, mean_sq
        self.features, self.feature_ms = features, feature_ms
        self.blanks: dict[str, int] = {}  # a ctc output's blank index

    def __call__(self, out: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                 labels: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        t = cfg.temperature
        kd = torch.zeros(())
        for name, kind in self.kinds.items():
            s, y = out[name], teacher[name]
            if kind in FRAME_KINDS:
                lp_s = self._student_log_probs(out, name, t).reshape(-1, s.shape[-1])
                lp_t = _log_probs(y, self.probs[name], t).reshape(-1, y.shape[-1])
                per_frame = torch.sum(lp_t.exp() * (lp_t - lp_s), dim=-1)
                if kind == "framekl":  # frames weighted by the teacher's non-blank probability
                    w = blank_frame_weights(y, self.blanks.get(name, 0), cfg.blank_floor, self.probs[name]).reshape(-1)
                    kd = kd + t * t * torch.sum(w * per_frame) / torch.sum(w).clamp_min(1e-12)
                    continue
                kl = t * t * torch.sum(per_frame) / lp_s.shape[0]
                if kind == "kl":
                    kd = kd + kl
                else:
                    w = cfg.ctc_weight
                    kd = kd + (1 - w) * kl + w * self._ctc(out, name, y)
            elif kind == "mse":
                kd = kd + torch.mean((s - y) ** 2) / self.mean_sq[name]
            else:
                a, b = s.reshape(s.shape[0], -1), y.reshape(y.shape[0], -1)
                kd = kd + torch.mean(1 - torch.nn.functional.cosine_similarity(a, b, dim=1))
        loss = kd
        if labels is not None and self.label_output is not None:
            s = out[self.label_output]
            lp = self._student_log_probs(out, self.label_output, 1.0).reshape(-1, s.shape[-1])
            flat = labels.reshape(-1)
            # -1 marks an unlabeled sample (a transfer-set input only the teacher labels): no CE on it
            ce = (torch.nn.functional.nll_loss(lp, flat, ignore_index=UNLABELED) if bool((flat != UNLABELED).any())
                  else torch.zeros(()))
            loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
        for tname, sname in self.features:
            d = out[sname] - teacher[tname]
            loss = loss + cfg.feature_weight * torch.mean(d * d) / self.feature_ms[tname] / len(self.features)
        return loss

    def _ctc(self, out: Mapping[str, torch.Tensor], name: str, y: torch.Tensor) -> torch.Tensor:
        """CTC loss of the student's ``[N, T, C]`` output on the teacher's greedy transcripts (per
        target label, mean over the batch; a teacher transcript the student's frames cannot fit
        gives 0, not inf)."""
        s = out[name]
        if s.dim() != 3:
            raise InputSpecError(f"loss ctc for output {name!r}: needs [N, T, C] per-frame scores, got shape "
                                 f"{list(s.shape)}")
        targets, lengths = greedy_ctc_targets(y, self.blanks.get(name, 0))
        lp = self._student_log_probs(out, name, 1.0).float().transpose(0, 1)  # [T, N, C]
        frames = torch.full((s.shape[0],), s.shape[1], dtype=torch.long)
        return torch.nn.functional.ctc_loss(lp, targets, frames, lengths, blank=self.blanks.get(name, 0),
                                            reduction="mean", zero_infinity=True)

    def _student_log_probs(self, out: Mapping[str, torch.Tensor], name: str, t: float) -> torch.Tensor:
        """log-softmax of the student's logits where its output is a last-axis Softmax of them
        (log of a saturated softmax has no gradient), else of the log of its probabilities."""
        if name in self.logits:
            return torch.log_softmax(out[self.logits[name]] / t, dim=-1)
        return _log_probs(out[name], self.probs[name], t)


def _softmax_logits(tg: TorchGraph, kinds: Mapping[str, str], ranks: Mapping[str, int]) -> dict[str, str]:
    """{output: the input of the last-axis Softmax that makes it} for the class-like outputs."""
    found = {}
    for ctx, _ in tg.nodes:
        out = ctx.node.output[0]
        if ctx.op != "Softmax" or kinds.get(out) not in FRAME_KINDS:
            continue
        rank = ranks[out]
        axis = ctx.a("axis", -1 if ctx.opset >= 13 else 1)
        if axis % rank == rank - 1:
            found[out] = ctx.node.input[0]
    return found


def _pair_outputs(teacher: Model, student_outputs: Sequence[str]) -> list[tuple[str, str]]:
    t_out = [v.name for v in teacher.graph.outputs]
    common = [n for n in t_out if n in student_outputs]
    if common:
        return [(n, n) for n in common]
    if len(t_out) == len(student_outputs):
        log.info("no output names in common: teacher and student outputs paired by position")
        return list(zip(t_out, student_outputs, strict=True))
    raise InputSpecError(f"the student's outputs {list(student_outputs)} and the teacher's {t_out} share no name "
                         f"and differ in number: cannot pair them")


def _auto_features(teacher: Model, tg: TorchGraph, sample_t: Mapping[str, np.ndarray],
                   sample_s: Mapping[str, torch.Tensor], limit: int = 8) -> list[tuple[str, str]]:
    """Intermediate tensors of the same name and shape in both models (outputs of Conv, Gemm,
    MatMul or Add: block outputs), evenly spread over the student's graph, at most ``limit``."""
    t_names = {v.name for n in teacher.graph for v in n.outputs if n.op_type in ("Conv", "Gemm", "MatMul", "Add")}
    cands = [ctx.node.output[0] for ctx, _ in tg.nodes if ctx.op in ("Conv", "Gemm", "MatMul", "Add")
             and ctx.node.output[0] in t_names and ctx.node.output[0] not in tg.outputs]
    if not cands:
        return []
    with torch.no_grad():
        s_vals = tg(sample_s, capture=cands)
    t_vals = collect_values(teacher, cands, [sample_t])
    same = [n for n in cands if tuple(s_vals[n].shape) == tuple(t_vals[n].shape)]
    if len(same) > limit:
        same = [same[round(i * (len(same) - 1) / (limit - 1))] for i in range(limit)]
    return [(n, n) for n in same]


def _group_batches(feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(feeds):
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(f.items())), []).append(i)
    return groups


def _cat(arrays: Sequence[Any]) -> torch.Tensor:
    return torch.cat([a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a)) for a in arrays])


@dataclass
class DistillReport:
    """What a run did: steps, seconds, the loss at the start and the end, agreement with the teacher."""

    steps: int = 0
    seconds: float = 0.0
    loss_first: float = math.nan
    loss_last: float = math.nan
    losses: dict[str, str] = field(default_factory=dict)
    features: list[tuple[str, str]] = field(default_factory=list)
    trained: int = 0
    quantized: int = 0
    batched: bool = False
    agreement_before: float | None = None
    agreement_after: float | None = None
    error_before: float | None = None
    error_after: float | None = None
    curve: list[float] = field(default_factory=list)

    def rows(self) -> list[list[Any]]:
        rows: list[list[Any]] = [
            ["trained tensors", f"{self.trained} ({self.quantized} int8/int32 through fake quantization)"
             if self.quantized else self.trained],
            ["losses", ", ".join(f"{k}: {v}" for k, v in self.losses.items())],
            ["steps", f"{self.steps} in {self.seconds:.1f} s" + (" (batched)" if self.batched else " (per sample)")],
            ["loss (first 10 / last 10 steps)", f"{self.loss_first:.4g} -> {self.loss_last:.4g}"],
        ]
        if self.features:
            rows.append(["matched features", ", ".join(f"{a}={b}" if a != b else a for a, b in self.features)])
        if self.error_before is not None:
            rows.append(["output error vs teacher (rel. L2, <= 32 samples of the data)", f"{self.error_before:.4f} -> {self.error_after:.4f}"])
        if self.agreement_before is not None:
            rows.append(["top-1 agreement with teacher (<= 32 samples of the data)",
                         f"{self.agreement_before:.4f} -> {self.agreement_after:.4f}"])
        return rows


def distill(student: Model, teacher: Model, data: Sequence[Mapping[str, np.ndarray]],
            cfg: DistillConfig | None = None, labels: np.ndarray | None = None) -> DistillReport:
    """Train ``student``'s weights to reproduce ``teacher`` on ``data`` and write them back in place.

    Args:
        student: the model to train (float, or QDQ from ``graphopt quantize``); changed in place:
            only its trained initializers / ``Constant`` tensors get new values.
        teacher: the reference model (run by ONNX Runtime).
        data: input feeds (every input of both models; extra names are ignored per model).
        cfg: options; steps default to :data:`DEFAULT_STEPS` unless ``minutes`` is given.
        labels: integer class per sample (aligned with ``data``) for cross-entropy on the first
            class-like output; -1 (:data:`UNLABELED`) for a sample without one (a transfer-set
            input: the teacher's outputs are its only target).

    Raises:
        UnsupportedModelError: an op of the student the torch lowering does not cover.
        InputSpecError: outputs that cannot be paired, labels that do not fit.
    """
    cfg = cfg or DistillConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if not data:
        raise InputSpecError("distillation needs data: no samples given")
    if not 0.0 <= cfg.blank_floor <= 1.0:
        raise InputSpecError(f"blank_floor must be in [0, 1], got {cfg.blank_floor}")
    tg = TorchGraph(to_proto(student))
    if not tg.param_names:
        raise GraphoptError("the student has no float (or QDQ) weights to train")
    s_in, t_in = set(tg.inputs), {v.name for v in teacher.graph.inputs if v.const is None}
    s_feeds = [{k: np.asarray(v) for k, v in f.items() if k in s_in} for f in data]
    t_feeds = [{k: np.asarray(v) for k, v in f.items() if k in t_in} for f in data]
    pairs = _pair_outputs(teacher, tg.outputs)
    # --- the teacher, once over the data
    sess = ort_session(teacher)
    t_outs = [run_ort(teacher, f, session=sess) for f in _progress(t_feeds, "teacher", cfg)]
    kinds: dict[str, str] = {}
    probs: dict[str, bool] = {}
    blanks: dict[str, int] = {}
    mean_sq: dict[str, float] = {}
    teacher_of = {s: t for t, s in pairs}
    for t_name, s_name in pairs:
        vals = [o[t_name] for o in t_outs]
        if np.asarray(vals[0]).dtype.kind != "f":
            log.info("output %r is not float: not distilled", s_name)
            continue
        spec = cfg.losses.get(s_name) or cfg.losses.get(t_name) or output_kind(vals)
        try:
            kind, blank = parse_kind(spec)
        except InputSpecError as e:
            raise InputSpecError(f"output {s_name!r}: {e}") from None
        if kind == "framekl":
            shape = np.shape(vals[0])
            if len(shape) < 2 or shape[-1] < 2 or blank >= shape[-1]:
                raise InputSpecError(f"loss {spec!r} for output {s_name!r}: needs per-frame class scores [..., C] "
                                     f"with the blank index below C; the teacher's output has shape {list(shape)}")
            blanks[s_name] = blank
        if kind == "ctc":
            shape = np.shape(vals[0])
            if len(shape) != 3 or shape[-1] < 2 or blank >= shape[-1]:
                raise InputSpecError(f"loss {spec!r} for output {s_name!r}: needs [N, T, C] per-frame scores with "
                                     f"the blank index below C; the teacher's output has shape {list(shape)}")
            blanks[s_name] = blank
        kinds[s_name] = kind
        probs[s_name] = _is_prob(vals)
        mean_sq[s_name] = max(float(np.mean([np.mean(np.square(v, dtype=np.float64)) for v in vals])), 1e-12)
    if not kinds:
        raise InputSpecError("no float output to distill")
    unknown = set(cfg.losses) - set(kinds) - {teacher_of.get(k) for k in kinds}
    if unknown:
        raise InputSpecError(f"losses= names {sorted(unknown)} are not outputs of the student "
                             f"(its outputs: {list(kinds)})")
    label_output = None
    if labels is not None:
        label_output = next((k for k, v in kinds.items() if v == "kl"), None)
        if label_output is None:
            raise InputSpecError("labels given but no class-like output (probabilities or [N, C] logits) to use them on")
        labels = np.asarray(labels).astype(np.int64).reshape(len(data), -1)
        n_cls = t_outs[0][teacher_of[label_output]].shape[-1]
        if labels.min() < UNLABELED or labels.max() >= n_cls:
            raise InputSpecError(f"labels must be class indices in [0, {n_cls}) (or {UNLABELED}: unlabeled) "
                                 f"for output {label_output!r}")
    # --- feature matching
    features: list[tuple[str, str]] = []
    if cfg.match == "auto":
        features = _auto_features(teacher, tg, t_feeds[0], _torch_feed(s_feeds[0]))
        if not features:
            log.warning("match='auto': no intermediate tensor has the same name and shape in both models")
    elif cfg.match:
        features = list(cfg.match)  # type: ignore[arg-type]
        t_names = {v.name for n in teacher.graph for v in n.outputs}
        s_names = {o for ctx, _ in tg.nodes for o in ctx.node.output}
        for a, b in features:
            if a not in t_names:
                raise InputSpecError(f"match: {a!r} is not a tensor of the teacher's main graph")
            if b not in s_names:
                raise InputSpecError(f"match: {b!r} is not a tensor computed by the student's main graph")
    t_feat: list[dict[str, np.ndarray]] = [{} for _ in data]
    feature_ms: dict[str, float] = {}
    if features:
        names = list(dict.fromkeys(a for a, _ in features))
        for i, f in enumerate(_progress(t_feeds, "teacher features", cfg)):
            vals = collect_values(teacher, names, [f])
            t_feat[i] = {k: v.astype(np.float32) for k, v in vals.items()}
        feature_ms = {k: max(float(np.mean([np.mean(np.square(t[k], dtype=np.float64)) for t in t_feat])), 1e-12)
                      for k in names}
    logits = _softmax_logits(tg, kinds, {s: np.ndim(t_outs[0][teacher_of[s]]) for s in kinds})
    objective = _Objective(kinds, probs, cfg, label_output, mean_sq, features, feature_ms, logits)
    objective.blanks = blanks
    capture = [b for _, b in features] + list(logits.values())

    def targets(idx: Sequence[int]) -> dict[str, torch.Tensor]:
        out = {s: _cat([t_outs[i][teacher_of[s]] for i in idx]) for s in kinds}
        for a, _ in features:
            out[a] = _cat([t_feat[i][a] for i in idx])
        return out

    # --- batching: samples of one shape concatenated along axis 0, if the student allows it
    groups = _group_batches(s_feeds)
    batched = cfg.batch > 1 and _can_batch(tg, s_feeds, groups, capture)
    report = DistillReport(losses=dict(kinds), features=features, trained=len(tg.param_names),
                           quantized=len(tg.qat_params), batched=batched)
    # agreement measured on at most 32 samples: on a large model each is a full forward pass
    probe = sorted(rng.choice(len(s_feeds), size=min(32, len(s_feeds)), replace=False).tolist())
    p_feeds, p_outs = [s_feeds[i] for i in probe], [t_outs[i] for i in probe]
    report.error_before, report.agreement_before = _agreement(tg, p_feeds, p_outs, pairs, kinds)
    # Adam's step is about lr whatever the gradient's size; trained weights differ in size by 1000x
    # (a folded conv's 0.02 vs a BN-scaled bias's 20), so each tensor's step is lr times its RMS:
    # --lr is a relative change per step (0.1% by default) on every tensor alike
    rms = [float(p.detach().pow(2).mean().sqrt()) for p in tg.weights.parameters()]
    floor = 0.1 * float(np.median([r for r in rms if r > 0])) if any(r > 0 for r in rms) else 1.0
    scales = [max(r, floor) if cfg.relative_lr else 1.0 for r in rms]
    opt = torch.optim.Adam([{"params": [p], "lr": cfg.lr * sc} for p, sc in zip(tg.weights.parameters(), scales,
                                                                                   strict=True)],
                           lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps if cfg.steps is not None else (None if cfg.minutes else DEFAULT_STEPS)
    budget = cfg.minutes * 60 if cfg.minutes else None
    # cosine decay over the steps (or over the time budget)
    start = time.monotonic()
    losses: list[float] = []
    keys = list(groups)
    weights = np.array([len(groups[k]) for k in keys], np.float64)
    lab = torch.from_numpy(labels) if labels is not None else None
    bar = _bar(steps, cfg)
    step = 0
    every = cfg.snapshot_minutes * 60 if cfg.snapshot and cfg.snapshot_minutes else None
    next_snap = every
    try:
        while True:
            elapsed = time.monotonic() - start
            if steps is not None and step >= steps or budget is not None and elapsed >= budget:
                break
            if next_snap is not None and elapsed >= next_snap:
                snap = student.copy()
                write_back(snap, tg)
                cfg.snapshot(snap, step, elapsed)  # type: ignore[misc]
                start += time.monotonic() - start - elapsed  # the snapshot's time is not training time
                next_snap += every  # type: ignore[operator]
            frac = step / steps if steps else min(elapsed / budget, 1.0) if budget else 0.0
            for g, sc in zip(opt.param_groups, scales, strict=True):
                g["lr"] = cfg.lr * sc * 0.5 * (1 + math.cos(math.pi * frac))
            members = groups[keys[rng.choice(len(keys), p=weights / weights.sum())]]
            idx = list(rng.choice(members, size=min(cfg.batch, len(members)), replace=False))
            opt.zero_grad()
            if batched:
                feed = {k: _cat([s_feeds[i][k] for i in idx]) for k in s_feeds[idx[0]]}
                loss = objective(tg(feed, capture), targets(idx), lab[idx] if lab is not None else None)
                loss.backward()
                value = float(loss.detach())
            else:
                value = 0.0
                for i in idx:
                    loss = objective(tg(_torch_feed(s_feeds[i]), capture), targets([i]),
                                     lab[[i]] if lab is not None else None) / len(idx)
                    loss.backward()
                    value += float(loss.detach())
            if not math.isfinite(value):
                raise GraphoptError(f"the loss became {value} at step {step}: lower lr")
            opt.step()
            losses.append(value)
            step += 1
            if bar is not None:
                bar.set_postfix(f"loss {np.mean(losses[-10:]):.4g}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    report.steps = step
    report.seconds = time.monotonic() - start
    report.curve = losses
    if losses:
        report.loss_first = float(np.mean(losses[:10]))
        report.loss_last = float(np.mean(losses[-10:]))
    report.error_after, report.agreement_after = _agreement(tg, p_feeds, p_outs, pairs, kinds)
    write_back(student, tg)
    return report


def _torch_feed(f: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in f.items()}


def _can_batch(tg: TorchGraph, feeds: Sequence[Mapping[str, np.ndarray]], groups: Mapping[tuple, list[int]],
               capture: Sequence[str]) -> bool:
    """Whether concatenating samples along axis 0 gives the concatenated outputs (a model with
    a batch dim fixed in a Reshape does not)."""
    members = max(groups.values(), key=len)
    if len(members) < 2 or any(np.asarray(v).ndim == 0 or np.asarray(v).shape[0] != 1
                               for v in feeds[members[0]].values()):
        return False
    idx = members[:2]
    try:
        with torch.no_grad():
            both = tg({k: _cat([feeds[i][k] for i in idx]) for k in feeds[idx[0]]}, capture)
            one = [tg(_torch_feed(feeds[i]), capture) for i in idx]
    except GraphoptError:
        return False
    for k, v in both.items():
        ref = torch.cat([o[k] for o in one]) if one[0][k].dim() else None
        if ref is None or ref.shape != v.shape or not torch.allclose(ref.float(), v.float(), rtol=1e-3, atol=1e-4):
            return False
    return True


def _agreement(tg: TorchGraph, feeds: Sequence[Mapping[str, np.ndarray]], t_outs: Sequence[Mapping[str, np.ndarray]],
               pairs: Sequence[tuple[str, str]], kinds: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(relative L2 error of the student's outputs vs the teacher's, top-1 agreement of the
    class-like outputs) over the data."""
    num = den = 0.0
    agree: list[float] = []
    with torch.no_grad():
        for f, t in zip(feeds, t_outs, strict=True):
            out = tg(_torch_feed(f))
            for tn, sn in pairs:
                if sn not in kinds:
                    continue
                a, b = out[sn].double().numpy(), np.asarray(t[tn], np.float64)
                if a.shape != b.shape:
                    continue
                num += float(np.sum((a - b) ** 2))
                den += float(np.sum(b ** 2))
                if kinds[sn] in FRAME_KINDS:
                    agree.append(float(np.mean(a.argmax(-1) == b.argmax(-1))))
    return (math.sqrt(num / den) if den else None), (float(np.mean(agree)) if agree else None)


def write_back(model: Model, tg: TorchGraph) -> None:
    """Put ``tg``'s trained weights into ``model``: each initializer (or ``Constant`` node tensor)
    it trained gets the new values, in its own dtype and shape; nothing else is touched."""
    arrays = tg.trained_arrays()
    producers = {o.name: n for n in model.graph for o in n.outputs}
    for name, arr in arrays.items():
        v = model.graph.initializers.get(name)
        if v is not None and v.const is not None:
            v.const = Tensor(arr)
            continue
        node = producers.get(name)
        if node is None or node.op_type != "Constant":
            raise GraphoptError(f"internal error: trained tensor {name!r} is neither an initializer nor a Constant")
        node.set_attr("value", Tensor(arr))


class _Plain:
    def __init__(self, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def set_postfix(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def update(self) -> None:
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _bar(total: int | None, cfg: DistillConfig) -> Any:
    if not cfg.progress:
        return None
    try:
        from graphopt.progress import progress
    except ImportError:
        return _Plain(total, "distill")
    return progress(total=total, desc="distill", unit="step")


def _progress(items: Sequence[Any], desc: str, cfg: DistillConfig) -> Any:
    if not cfg.progress:
        return items
    try:
        from graphopt.progress import progress
    except ImportError:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    return progress(items, desc=desc, unit="sample")
