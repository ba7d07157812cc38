"""Knowledge distillation (``graphopt distill``, PyTorch engine) on real corpus models and a
smaller student architecture: what training recovers that compression alone loses.

Rows (each a separate experiment; run any subset):

- ``rec-prune``: ppocrv3_rec (PaddleOCR's CRNN-style text recognizer, PyPI rapidocr) after
  ``graphopt compress --prune 0.5 --structured`` (refit on the training lines), then
  ``graphopt distill`` from the original on the same unlabeled lines. Character accuracy on
  held-out rendered lines (``benchmarks.corpus.data``: calibration split for training, eval
  split for the score).
- ``cls-prune``: ppocr_cls (line orientation 0/180), the same two rows on its accuracy.
- ``rec-qat``: ppocrv3_rec quantized to int8 with every Conv/MatMul in int8 (graphopt's
  ``quantize-static`` with its narrow-channel rule off: what a plain post-training quantizer
  such as ORT's does), then quantization-aware distillation of that QDQ model (fake quant,
  straight-through) from the fp32 original; exported as the same QDQ model.
- ``digits``: sklearn's handwritten digits; a CNN teacher and a half-channels student built in
  ONNX (onnx.helper), both trained with ``graphopt distill`` itself: the teacher and a student on
  the labels alone, and a student distilled from the teacher (KL at T=4, alpha 0.9).

Training data for the line models: ``--train-n`` calibration lines; lines of several widths
(the recognizer's) are right-padded with zeros (what its own preprocessing pads with) to a width
multiple of 160 so they batch. ppocr_cls's lines are all 192 wide and stay so (the rows before the
``-fixedwidth`` ones padded them to 320: trained on inputs 40% zeros, scored on unpadded ones).
Commands are run as the CLI (subprocess) and timed; the machine has 2 cores shared with other
work, so the times are loaded wall-clock times, not speed claims.

"50% structured pruning" is read as half the parameters: ``--ratio`` is the fraction of channels
removed, and the ``params05`` rows use the ratio that leaves each model 0.5x its weights (0.32 of
ppocr_cls's channels, 0.37 of ppocrv3_rec's: a 3x3 conv loses ratio of its inputs and of its
outputs, and the recognizer's 6625-class head is never pruned); the table gives the parameter
ratio measured on the written files. ``--snapshot-every M`` saves the student every M minutes of
training (``graphopt distill --snapshot-every``) and scores each on the held-out lines: the
score-vs-time curve under the table says whether more minutes would help.

Run:  python -m benchmarks.distill_corpus [rec-prune cls-prune rec-qat digits digits-transfer] [--minutes 12]
Saves benchmarks/results/distill_corpus.json / .md (a run on a subset updates those rows only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
GRAPHOPT = [sys.executable, "-m", "graphopt.cli"]


def _run(cmd: list[str], log: list[str]) -> float:
    """Run a graphopt command; return its wall time (s)."""
    t0 = time.time()
    env = {**os.environ, "GRAPHOPT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.time() - t0
    log.append(" ".join(Path(c).name if c.startswith("/tmp") else c for c in cmd[3:]))
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    print(r.stdout[-2500:], flush=True)
    return dt


def _pad_width(x: np.ndarray, multiple: int = 160) -> np.ndarray:
    w = x.shape[-1]
    target = max(multiple, math.ceil(w / multiple) * multiple)
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, target - w)]) if target != w else x


def _write_dir(feeds: list[dict[str, np.ndarray]], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        np.savez(d / f"{i:05d}.npz", **{k: v[0] for k, v in f.items()})


def _score(task: Any, path: Path, n: int) -> dict[str, float]:
    from benchmarks.corpus.data import ort_runner

    r = task.evaluate(ort_runner(str(path), threads=1), n=n)
    return {"score": r.score, **{k: float(v) for k, v in r.extra.items()}}


def _params(path: Path) -> int:
    """Weight elements of a model: initializers and Constant-node tensors (paddle2onnx keeps its
    weights in Constant nodes)."""
    import onnx

    m = onnx.load(str(path))
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    return n + sum(int(np.prod(a.t.dims)) for nd in m.graph.node if nd.op_type == "Constant"
                   for a in nd.attribute if a.name == "value")


def _both_orientations(task: Any, n: int) -> list[dict[str, np.ndarray]]:
    """ppocr_cls's first ``n`` calibration lines, each rendered upright and turned over (the
    task's own rendering: the line is turned before it is fitted and padded, as the task does
    for its 180-degree lines): 2n unlabeled inputs, a transfer set that shows the student every
    text in both orientations (the teacher labels them)."""
    from benchmarks.corpus.data import _line_input, _render_line, _rng, _text_line

    out = []
    for i in range(n):
        rng = _rng(task.name, "calib", i)
        img = _render_line(rng, _text_line(rng, 3))
        for im in (img, img[::-1, ::-1].copy()):
            out.append({"x": _line_input(im, 48, 192, max_width=192)})
    return out


def line_model(name: str, kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Prune (or quantize) a line model, then distill it from the original; score each."""
    from benchmarks.corpus import fetch, model_path
    from benchmarks.corpus.data import task as get_task

    fetch([name])
    task = get_task(name)
    orig = Path(model_path(name))
    if args.both_orientations and name == "ppocr_cls":
        train = _both_orientations(task, args.train_n)
    else:
        train = task.calibration(args.train_n)
    if len({v.shape for f in train for v in f.values()}) > 1:  # lines of several widths: pad to a few
        train = [{k: _pad_width(v) for k, v in f.items()} for f in train]
    data = tmp / f"{name}_train"
    _write_dir(train, data)
    cmds: list[str] = []
    row: dict[str, Any] = {"model": name, "experiment": kind, "train_samples": len(train), "eval_samples": args.eval_n,
                           "metric": task.metric, "both_orientations": bool(args.both_orientations and name == "ppocr_cls")}
    row["fp32"] = _score(task, orig, args.eval_n)
    shape = ",".join(str(d) for d in task.calibration(1)[0]["x"].shape)
    student = tmp / f"{name}_{kind}.onnx"
    if kind == "prune":
        refit = tmp / f"{name}_refit"  # the refit's samples: the first --refit-n training ones
        _write_dir(train[: args.refit_n], refit)
        refit_mode = ["--refit", args.refit] if args.refit else []
        sens = ["--sensitivity", "--calibration", str(refit)] if args.sensitivity else []
        if args.student:  # the pruned student of an earlier run (--keep): the same start, without its minutes
            import shutil

            shutil.copy2(args.student, student)
            made = json.loads(Path(args.student).with_suffix(".json").read_text())
            cmds.append(made["command"])
            row["compress_s"], row["student_reused"] = made["compress_s"], str(args.student)
            row["channel_ratio"] = made["channel_ratio"]
        else:
            row["compress_s"] = _run([*GRAPHOPT, "compress", str(orig), "-o", str(student), "--prune", str(args.ratio),
                                      "--structured", "--inputs", str(refit), "--input-shape", f"x:{shape}",
                                      *refit_mode, *sens], cmds)
            row["channel_ratio"] = args.ratio
        row["params"] = [_params(orig), _params(student)]
        row["compressed"] = _score(task, student, args.eval_n)
        lr = args.lr_prune
    else:
        import graphopt
        from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

        t0 = time.time()
        m = graphopt.load(orig)
        run_passes(m, get_pipeline("default"))
        q = get_pass("quantize-static", min_channel_sqnr=-1e9)  # every Conv/MatMul int8 (plain PTQ)
        run_passes(m, [q, get_pass("dce")], PassContext(calibration=task.calibration(16)))
        graphopt.save(m, student)
        row["quantize_s"] = time.time() - t0
        cmds.append("(API) quantize-static min_channel_sqnr=-1e9 on 16 calibration samples: every Conv/MatMul int8")
        row["compressed"] = _score(task, student, args.eval_n)
        lr = args.lr_qat
    out = tmp / f"{name}_{kind}_distilled.onnx"
    extra = ["--match", "auto"] if kind == "prune" and args.match else []
    if args.labels and row["both_orientations"]:  # the rendered lines' truth: upright 0, turned over 1
        np.save(tmp / "labels.npy", np.tile(np.array([0, 1], np.int64), len(train) // 2))
        extra += ["--labels", str(tmp / "labels.npy"), "--alpha", str(args.alpha)]
    if args.loss:  # e.g. softmax_5.tmp_0=ctc: the recognizer's sequence-level (CTC) distillation
        extra += ["--loss", args.loss]
    snap = ["--snapshot-every", str(args.snapshot_every)] if args.snapshot_every else []
    row["distill_s"] = _run([*GRAPHOPT, "distill", str(student), "-o", str(out), "--teacher", str(orig),
                             "--data", str(data), "--minutes", str(args.minutes), "--lr", str(lr),
                             "--temperature", str(args.temperature), "--batch", str(args.batch), "--threads", "1",
                             *extra, *snap], cmds)
    row["distilled"] = _score(task, out, args.eval_n)
    if snap:  # the held-out score of the weights saved along the way: would more minutes help?
        row["curve"] = [{"seconds": int(f.name.split(".t")[-1].split("s.")[0]), **_score(task, f, args.eval_n)}
                        for f in sorted(tmp.glob(f"{out.stem}.t*s.onnx"))]
        row["curve"].append({"seconds": round(row["distill_s"]), "written": True, **row["distilled"]})
    row["commands"] = cmds
    if args.keep:  # the models themselves, to score them again later (e.g. on more held-out lines)
        import shutil

        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        for f in [student, out, *sorted(tmp.glob(f"{out.stem}.t*s.onnx"))]:
            shutil.copy2(f, keep / f.name)
        if kind == "prune":  # how the student was made, for --student
            (keep / student.name).with_suffix(".json").write_text(json.dumps(
                {"command": cmds[0], "compress_s": row["compress_s"], "channel_ratio": row["channel_ratio"]}))
        row["kept"] = str(keep)
    if kind == "qat":
        import onnx

        a, b = onnx.load(str(student)), onnx.load(str(out))
        row["same_graph"] = [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
        row["int8_weights"] = sum(t.data_type == onnx.TensorProto.INT8 for t in b.graph.initializer)
    return row


# ---------------------------------------------------------------------------------------------
# digits: a CNN and its half-channels student, built in ONNX
# ---------------------------------------------------------------------------------------------
def digits_cnn(c1: int, c2: int, hidden: int, seed: int) -> Any:
    """Conv(c1,3x3)-Relu-Conv(c2,3x3)-Relu-MaxPool(2)-Flatten-Gemm(hidden)-Relu-Gemm(10), random init."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", he((c1, 1, 3, 3), 9)), ("b1", np.zeros(c1, np.float32)),
        ("w2", he((c2, c1, 3, 3), 9 * c1)), ("b2", np.zeros(c2, np.float32)),
        ("w3", he((c2 * 16, hidden), c2 * 16)), ("b3", np.zeros(hidden, np.float32)),
        ("w4", he((hidden, 10), hidden)), ("b4", np.zeros(10, np.float32))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["rh"], name="relu3"),
        helper.make_node("Gemm", ["rh", "w4", "b4"], ["logits"], name="fc2"),
    ]
    g = helper.make_graph(nodes, "digits_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="distill_corpus")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def digits(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))
    n_train = args.digits_train
    tr, te = idx[:n_train], idx[n_train:]
    data = tmp / "digits_train.npz"
    np.savez(data, x=x[tr])
    labels = tmp / "digits_labels.npy"
    np.save(labels, y[tr])
    cmds: list[str] = []

    def acc(path: Path) -> float:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(s.run(None, {"x": x[te]})[0].argmax(-1) == y[te]))

    teacher0, student0 = tmp / "teacher_init.onnx", tmp / "student_init.onnx"
    onnx.save(digits_cnn(16, 32, 64, 0), teacher0)
    onnx.save(digits_cnn(8, 16, 32, 1), student0)  # half the channels, half the hidden units
    teacher, s_labels, s_kd = tmp / "teacher.onnx", tmp / "student_labels.onnx", tmp / "student_kd.onnx"
    steps = str(args.digits_steps)
    common = ["--data", str(data), "--steps", steps, "--lr", str(args.digits_lr), "--batch", "32", "--threads", "1"]
    row: dict[str, Any] = {"experiment": "digits", "train_samples": len(tr), "test_samples": len(te),
                           "steps": args.digits_steps}
    # labels alone (alpha 0: the teacher argument is not used)
    row["teacher_train_s"] = _run([*GRAPHOPT, "distill", str(teacher0), "-o", str(teacher), "--teacher",
                                   str(teacher0), "--labels", str(labels), "--alpha", "0", *common], cmds)
    row["student_labels_s"] = _run([*GRAPHOPT, "distill", str(student0), "-o", str(s_labels), "--teacher",
                                    str(teacher0), "--labels", str(labels), "--alpha", "0", *common], cmds)
    row["student_kd_s"] = _run([*GRAPHOPT, "distill", str(student0), "-o", str(s_kd), "--teacher", str(teacher),
                                "--labels", str(labels), "--alpha", "0.9", "--temperature", "4", *common], cmds)
    row["params_teacher"] = sum(int(np.prod(t.dims)) for t in onnx.load(str(teacher)).graph.initializer)
    row["params_student"] = sum(int(np.prod(t.dims)) for t in onnx.load(str(s_kd)).graph.initializer)
    row["acc_teacher"], row["acc_student_labels"], row["acc_student_kd"] = acc(teacher), acc(s_labels), acc(s_kd)
    row["commands"] = cmds
    return row


def _shifted(x: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Each image moved by one pixel in a random direction (zero fill), plus Gaussian noise."""
    out = np.zeros_like(x)
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for i, k in enumerate(rng.integers(len(moves), size=len(x))):
        dy, dx = moves[k]
        src = x[i, 0, max(0, -dy): 8 - max(0, dy), max(0, -dx): 8 - max(0, dx)]
        out[i, 0, max(0, dy): 8 - max(0, -dy), max(0, dx): 8 - max(0, -dx)] = src
    return np.clip(out + rng.normal(0, noise, out.shape), 0, 1).astype(np.float32)


def digits_transfer(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The digits students again, with what distillation has that labels alone do not: a
    transfer set. The teacher (trained on the 1000 labeled digits) labels extra inputs: two
    one-pixel-shifted, noisy copies of each training digit and 1000 mixup blends of two (a blend
    has no hard label). Per seed (student init and training order), four students of the same
    architecture, same steps and batch:

    - ``labels``: cross-entropy on the 1000 labeled digits alone (the earlier baseline);
    - ``labels+aug``: cross-entropy on the digits and their shifted copies, labeled with the
      original digit's class (plain data augmentation: the honest control for the extra inputs);
    - ``kd-plain``: KD (alpha, T) with the labels on the 1000 digits alone (no transfer set);
    - ``kd``: the digits with their labels (alpha weighs KD at temperature T against CE) plus the
      shifted copies and the blends unlabeled (label -1: the teacher's soft targets only).
    """
    from concurrent.futures import ThreadPoolExecutor

    import onnx
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[: args.digits_train], idx[args.digits_train:]
    xt, yt = x[tr], y[tr]
    cmds: list[str] = []

    def acc(path: Path) -> float:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(s.run(None, {"x": x[te]})[0].argmax(-1) == y[te]))

    steps = str(args.digits_steps)
    common = ["--steps", steps, "--lr", str(args.digits_lr), "--batch", "32", "--threads", "1"]
    np.savez(tmp / "dt_orig.npz", x=xt)
    np.save(tmp / "dt_orig_labels.npy", yt)
    n_lab = args.student_labels or len(xt)
    np.savez(tmp / "dt_lab.npz", x=xt[:n_lab])
    np.save(tmp / "dt_lab_labels.npy", yt[:n_lab])
    teacher0, teacher = tmp / "dt_teacher_init.onnx", tmp / "dt_teacher.onnx"
    onnx.save(digits_cnn(16, 32, 64, 0), teacher0)
    row: dict[str, Any] = {"experiment": "digits-transfer", "train_samples": len(tr), "test_samples": len(te),
                           "steps": args.digits_steps, "batch": 32, "temperature": args.digits_t,
                           "alpha": args.digits_alpha, "seeds": args.seeds, "copies": args.digits_copies,
                           "mixup": args.digits_mixup, "noise": args.digits_noise,
                           "student_labels": args.student_labels or len(tr)}
    row["teacher_train_s"] = _run([*GRAPHOPT, "distill", str(teacher0), "-o", str(teacher), "--teacher", str(teacher0),
                                   "--data", str(tmp / "dt_orig.npz"), "--labels", str(tmp / "dt_orig_labels.npy"),
                                   "--alpha", "0", *common], cmds)
    row["acc_teacher"] = acc(teacher)
    row["params_teacher"] = sum(int(np.prod(t.dims)) for t in onnx.load(str(teacher)).graph.initializer)

    jobs = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(100 + seed)
        copies = [_shifted(xt, rng, args.digits_noise) for _ in range(args.digits_copies)]
        shifted = np.concatenate([xt[:0], *copies])
        a, b = rng.integers(len(xt), size=(2, args.digits_mixup))
        lam = rng.beta(0.4, 0.4, size=(args.digits_mixup, 1, 1, 1)).astype(np.float32)
        blends = lam * xt[a] + (1 - lam) * xt[b]
        # the students' labels: the first n_lab digits (all by default); the rest are inputs only
        aug_x = np.concatenate([xt[:n_lab], *(c[:n_lab] for c in copies)])
        aug_y = np.concatenate([yt[:n_lab]] * (1 + args.digits_copies))
        kd_x = np.concatenate([xt, shifted, blends])
        kd_y = np.concatenate([yt[:n_lab], np.full(len(xt) - n_lab + len(shifted) + len(blends), -1, np.int64)])
        for name, dx, dy in (("aug", aug_x, aug_y), ("kd", kd_x, kd_y)):
            np.savez(tmp / f"dt_{name}_{seed}.npz", x=dx)
            np.save(tmp / f"dt_{name}_{seed}_labels.npy", dy)
        s0 = tmp / f"dt_student_init_{seed}.onnx"
        onnx.save(digits_cnn(8, 16, 32, 1 + seed), s0)
        seed_args = ["--seed", str(seed)]
        jobs += [
            (seed, "labels", [str(s0), "--teacher", str(teacher0), "--data", str(tmp / "dt_lab.npz"), "--labels",
                              str(tmp / "dt_lab_labels.npy"), "--alpha", "0"]),
            (seed, "labels+aug", [str(s0), "--teacher", str(teacher0), "--data", str(tmp / f"dt_aug_{seed}.npz"),
                                  "--labels", str(tmp / f"dt_aug_{seed}_labels.npy"), "--alpha", "0"]),
            (seed, "kd-plain", [str(s0), "--teacher", str(teacher), "--data", str(tmp / "dt_lab.npz"), "--labels",
                                str(tmp / "dt_lab_labels.npy"), "--alpha", str(args.digits_alpha),
                                "--temperature", str(args.digits_t)]),
            (seed, "kd", [str(s0), "--teacher", str(teacher), "--data", str(tmp / f"dt_kd_{seed}.npz"), "--labels",
                          str(tmp / f"dt_kd_{seed}_labels.npy"), "--alpha", str(args.digits_alpha),
                          "--temperature", str(args.digits_t)]),
        ]
        jobs[-4:] = [(sd, kind, [*a_, *seed_args]) for sd, kind, a_ in jobs[-4:]]

    def one(job: tuple[int, str, list[str]]) -> dict[str, Any]:
        seed, kind, a_ = job
        out = tmp / f"dt_{kind}_{seed}.onnx"
        log: list[str] = []
        dt = _run([*GRAPHOPT, "distill", a_[0], "-o", str(out), *a_[1:], *common], log)
        return {"seed": seed, "student": kind, "acc": acc(out), "train_s": dt, "command": log[0]}

    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        runs = list(ex.map(one, jobs))
    row["runs"] = runs
    row["params_student"] = sum(int(np.prod(t.dims)) for t in digits_cnn(8, 16, 32, 1).graph.initializer)
    row["summary"] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "accs": v}
                      for k in ("labels", "labels+aug", "kd-plain", "kd")
                      for v in [[r["acc"] for r in runs if r["student"] == k]]}
    row["commands"] = cmds + [r["command"] for r in runs if r["seed"] == 0]
    return row


def write_md(rows: dict[str, Any]) -> str:
    lines = ["# Distillation (graphopt distill, PyTorch CPU engine)", "",
             ("Generated by `python -m benchmarks.distill_corpus`. Times are wall-clock on a 2-core machine shared "
             "with other work (loaded): read them as orders of magnitude."), ""]
    line_rows = [{**r, "key": k} for k, r in rows.items() if not k.startswith("digits")]
    if line_rows:
        lines += [("| model | experiment | metric | fp32 | compressed | + distill | compress / distill time | "
                  "exact lines fp32 / compressed / distilled |"), "|---|---|---|---|---|---|---|---|"]
        for r in line_rows:
            ex = [r[k].get("exact_line") for k in ("fp32", "compressed", "distilled")]
            exact = " / ".join(f"{v:.3f}" for v in ex) if all(v is not None for v in ex) else "-"
            if r["experiment"] != "prune":
                what = "int8 (all convs) + QAT distill"
            elif "params" in r:  # the channel ratio, and the parameters it leaves
                what = (f"prune {r['channel_ratio']:g} of channels structured (params x"
                        f"{r['params'][1] / r['params'][0]:.2f})")
                if any("--sensitivity" in c for c in r["commands"]):
                    what += ", per-layer ratios by sensitivity"
            else:
                what = "prune 0.5 structured"
            if any("--refit block" in c for c in r["commands"]):
                what += " + block refit"
            lr = next((c.split("--lr ")[1].split()[0] for c in reversed(r["commands"]) if "--lr " in c), "?")
            what += f", lr {lr}"
            t = next((c.split("--temperature ")[1].split()[0] for c in reversed(r["commands"]) if "--temperature " in c), "?")
            if t not in ("?", "1.0"):
                what += f", T {t}"
            what += f", {r['train_samples']} lines"
            if r.get("both_orientations"):
                what += f" ({r['train_samples'] // 2} texts, each upright and turned over)"
            loss = next((c.split("--loss ")[1].split()[0] for c in reversed(r["commands"]) if "--loss " in c), None)
            if loss is not None:
                kind = loss.split("=")[-1]
                what += f", loss {kind}" + (" (greedy-transcript CTC + per-frame KL, 0.5/0.5)" if kind.startswith("ctc")
                                            else " (per-frame KL weighted by the teacher's non-blank probability)"
                                            if kind.startswith("framekl") else "")
            a = next((c.split("--alpha ")[1].split()[0] for c in r["commands"] if "--labels " in c), None)
            if a is not None:
                what += f", + true labels (alpha {a})"
            if r["model"] == "ppocr_cls" and "fixedwidth" not in r["key"] and "params" not in r:
                what += " (192-wide lines zero-padded to 320)"
            t_c = r.get("compress_s", r.get("quantize_s", 0.0))
            if r.get("note"):  # a row recorded by hand (e.g. a control run stopped early)
                what += f"; {r['note']}"
            if r.get("student_reused"):
                what += " (pruned student reused from an earlier run of the same compress command)"
            lines.append(f"| {r['model']} | {what} | {r['metric']} (n={r['eval_samples']}) | {r['fp32']['score']:.4f} | "
                         f"{r['compressed']['score']:.4f} | {r['distilled']['score']:.4f} | "
                         f"{t_c:.0f} s / {r['distill_s']:.0f} s | {exact} |")
        lines.append("")
        for r in line_rows:
            if r.get("curve"):
                lines.append(f"- {r['model']} {r['experiment']} ({r['key']}), held-out {r['metric']} during "
                             "distillation (minutes of training: score"
                             + (" / exact lines" if "exact_line" in r["curve"][0] else "") + "): "
                             + ", ".join(("written model" if c.get("written") or c is r["curve"][-1] else
                                          f"{c['seconds'] / 60:.0f} min") + f": {c['score']:.3f}"
                                         + (f" / {c['exact_line']:.3f}" if "exact_line" in c else "")
                                         for c in r["curve"]))
        for r in line_rows:
            lines.append(f"- {r['model']} {r['experiment']}: trained on {r['train_samples']} calibration lines; "
                         + "; ".join(f"`graphopt {c.removeprefix('graphopt.cli ')}`" if not c.startswith("(") else c
                                     for c in r["commands"]))
        lines.append("")
    if "digits" in rows:
        r = rows["digits"]
        lines += ["## Smaller student architecture (digits CNN, half the channels)", "",
                  "| model | params | test accuracy | training time |", "|---|---|---|---|",
                  f"| teacher (labels) | {r['params_teacher']} | {r['acc_teacher']:.4f} | {r['teacher_train_s']:.0f} s |",
                  (f"| student, labels alone | {r['params_student']} | {r['acc_student_labels']:.4f} | "
                  f"{r['student_labels_s']:.0f} s |"),
                  (f"| student, distilled from the teacher | {r['params_student']} | {r['acc_student_kd']:.4f} | "
                  f"{r['student_kd_s']:.0f} s |"), "",
                  f"{r['train_samples']} training / {r['test_samples']} test digits, {r['steps']} steps of 32 each.", ""]
    for key in [k for k in rows if k.startswith("digits-transfer")]:
        r = rows[key]
        n_lab = r.get("student_labels", r["train_samples"])
        unl = r["train_samples"] - n_lab
        names = {"labels": f"student, labels alone ({n_lab} labeled digits)",
                 "labels+aug": f"student, labels + {r['copies']} shifted/noisy labeled copies per labeled digit",
                 "kd-plain": (f"student, distilled (T={r['temperature']:g}, alpha {r['alpha']:g}) on the {n_lab} "
                              "labeled digits alone"),
                 "kd": (f"student, distilled (T={r['temperature']:g}, alpha {r['alpha']:g}) on the {n_lab} labeled "
                        + (f"+ {unl} unlabeled digits " if unl else "digits ")
                        + f"+ {r['copies']} shifted copies of all + {r['mixup']} mixup blends, teacher-labeled")}
        lines += [f"## Digits student with a transfer set ({r['seeds']} seeds, mean ± std, {r['steps']} steps"
                  + (f", the students get {n_lab} of the {r['train_samples']} labels" if unl else "") + ")", "",
                  "| model | params | test accuracy | per seed | training time (each) |", "|---|---|---|---|---|",
                  f"| teacher (labels) | {r['params_teacher']} | {r['acc_teacher']:.4f} | - | {r['teacher_train_s']:.0f} s |"]
        for k, label in names.items():
            sm = r["summary"][k]
            ts = [x["train_s"] for x in r["runs"] if x["student"] == k]
            lines.append(f"| {label} | {r['params_student']} | {sm['mean']:.4f} ± {sm['std']:.4f} | "
                         f"{' / '.join(f'{a:.4f}' for a in sm['accs'])} | {min(ts):.0f}-{max(ts):.0f} s |")
        lines += ["", (f"{r['train_samples']} training / {r['test_samples']} test digits; every student "
                       f"{r['steps']} steps of {r['batch']}, same architecture and init per seed; shifted copies: one "
                       f"pixel in a random direction plus Gaussian noise (std {r['noise']:g}); blends: "
                       "lambda ~ Beta(0.4, 0.4), unlabeled (label -1). Commands (seed 0; several ran in parallel, "
                       "so times are loaded):"), ""]
        lines += [f"- `graphopt {c.removeprefix('graphopt.cli ')}`" for c in r["commands"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="*", default=["rec-prune", "cls-prune", "rec-qat", "digits"])
    ap.add_argument("--minutes", type=float, default=12.0, help="distillation budget per line-model run")
    ap.add_argument("--train-n", type=int, default=256)
    ap.add_argument("--refit-n", type=int, default=64, help="samples for compress's refit (and its checks)")
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-prune", type=float, default=1e-3)
    ap.add_argument("--lr-qat", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="KL temperature for the line models")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="compress --prune R --structured: fraction of channels removed (0.32 leaves ppocr_cls "
                    "0.5x its parameters, 0.37 ppocrv3_rec)")
    ap.add_argument("--both-orientations", action="store_true",
                    help="cls-prune: train on every line upright and turned over (2x --train-n inputs)")
    ap.add_argument("--labels", action="store_true", help="with --both-orientations: the lines' true orientation "
                    "as --labels (cross-entropy, weighed by --alpha against distillation)")
    ap.add_argument("--alpha", type=float, default=0.5, help="with --labels: distillation vs cross-entropy")
    ap.add_argument("--snapshot-every", type=float, default=0.0,
                    help="distill --snapshot-every MIN: score the weights every MIN minutes (held-out curve)")
    ap.add_argument("--loss", help="distill --loss OUTPUT=KIND for the line models (rec-prune: "
                    "softmax_5.tmp_0=ctc trains on the teacher's greedy transcripts, CTC + per-frame KL)")
    ap.add_argument("--sensitivity", action="store_true", help="compress --sensitivity: per-layer ratios")
    ap.add_argument("--refit", choices=["layer", "block"], help="compress --refit for the pruned students")
    ap.add_argument("--match", action=argparse.BooleanOptionalAction, default=True,
                    help="--match auto (feature distillation) for the pruned students")
    ap.add_argument("--digits-train", type=int, default=1000)
    ap.add_argument("--digits-steps", type=int, default=600)
    ap.add_argument("--digits-lr", type=float, default=1e-2)
    ap.add_argument("--digits-t", type=float, default=4.0, help="digits-transfer: KD temperature")
    ap.add_argument("--digits-alpha", type=float, default=0.7, help="digits-transfer: KD weight vs labels")
    ap.add_argument("--digits-copies", type=int, default=2, help="digits-transfer: shifted copies per digit")
    ap.add_argument("--digits-mixup", type=int, default=1000, help="digits-transfer: unlabeled mixup blends")
    ap.add_argument("--digits-noise", type=float, default=0.05, help="digits-transfer: noise std on the copies")
    ap.add_argument("--student-labels", type=int, default=0,
                    help="digits-transfer: labeled digits the students get (default all; the teacher has all)")
    ap.add_argument("--seeds", type=int, default=3, help="digits-transfer: seeds per student")
    ap.add_argument("--tag", default="", help="row key suffix (keeps several configurations of an experiment)")
    ap.add_argument("--jobs", type=int, default=4, help="digits-transfer: training runs in parallel")
    ap.add_argument("--student", help="prune rows: start from this pruned student (saved by --keep, with its "
                    ".json) instead of pruning again")
    ap.add_argument("--keep", help="line models: copy the compressed, distilled and snapshot models to this folder")
    ap.add_argument("--out", default=str(RESULTS / "distill_corpus"))
    args = ap.parse_args()
    out = Path(args.out)
    rows: dict[str, Any] = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    with tempfile.TemporaryDirectory(prefix="graphopt-distill-bench-") as d:
        tmp = Path(d)
        for ex in args.experiments:
            t0 = time.time()
            if ex == "rec-prune":
                row = line_model("ppocrv3_rec", "prune", args, tmp)
            elif ex == "cls-prune":
                row = line_model("ppocr_cls", "prune", args, tmp)
            elif ex == "rec-qat":
                row = line_model("ppocrv3_rec", "qat", args, tmp)
            elif ex == "digits":
                row = digits(args, tmp)
            elif ex == "digits-transfer":
                row = digits_transfer(args, tmp)
            else:
                raise SystemExit(f"unknown experiment {ex!r}")
            row["total_s"] = time.time() - t0
            if args.tag:
                ex = f"{ex}-{args.tag}"
            rows[ex] = row
            print(json.dumps(row, indent=1), flush=True)
            # re-read: another experiment run in parallel may have written its rows meanwhile
            cur = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
            cur[ex] = row
            rows = cur
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
            out.with_suffix(".md").write_text(write_md(rows))


if __name__ == "__main__":
    main()
