"""Compression techniques and combinations side by side, in one run: file size ratio, ORT latency
ratio (ENABLE_ALL, 2 threads, interleaved, median), FLOPs ratio and accuracy (the trained digits
models - CNN, transformer, residual net - on the held-out split) or top-1 agreement with fp32 (ResNet-18-shaped net, random weights and inputs),
against the fp32 model (after graphopt's lossless pipeline) and ORT's own int8 alone. onnxsim has
no pruning or clustering API, so there is no onnxsim column.

Run:  python benchmarks/compress.py [--rounds 30]     Saves benchmarks/results/compress.json / .md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import graphopt
from graphopt.analysis import infer_shapes, model_stats
from graphopt.runtime import interleaved_latency, ort_session

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "tests" / "fixtures"

TECHNIQUES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "prune-50%-structured": [("prune-channels", {"ratio": 0.5})],
    "cluster-16 (4-bit palette)": [("cluster", {"clusters": 16, "min_size": 256})],
    "lowrank (FLOPs 0.5, whitened)": [("lowrank", {"energy": None, "flops": 0.5, "activation_aware": True})],
    "int8 (graphopt)": [("quantize-static", {})],
    "prune-50% + int8": [("prune-channels", {"ratio": 0.5}), ("quantize-static", {})],
    # channel counts rounded to ORT's SIMD channel block (8): fewer channels removed, faster
    "prune-50% x8": [("prune-channels", {"ratio": 0.5, "multiple_of": 8})],
    "prune-50% x8 + int8": [("prune-channels", {"ratio": 0.5, "multiple_of": 8}), ("quantize-static", {})],
    # as `graphopt compress --cluster 16 --int8`: per-tensor int8 scales keep the 16 centroids, which
    # palettize then stores as 4-bit indices + an int8 codebook
    "cluster-16 + int8": [("cluster", {"clusters": 16, "min_size": 256, "storage": "dense"}),
                          ("quantize-static", {"per_channel": False}), ("palettize", {"max_values": 16})],
    "lowrank + int8": [("lowrank", {"energy": None, "flops": 0.5, "activation_aware": True}), ("quantize-static", {})],
}


def flops(path: Path, shape: list[int]) -> int:
    m = graphopt.load(path)
    return model_stats(infer_shapes(m, {m.graph.inputs[0].name: shape})).flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    from int8 import Reader, resnet18_like  # same generated net and ORT calibration reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    digits = np.load(FIX / "digits_test.npz")
    calib_digits = [{"input": x[None]} for x in np.load(FIX / "digits_calib.npz")["input"]]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        dd = Path(d)
        resnet18_like(dd / "r18.onnx")
        rng = np.random.default_rng(0)
        cases = [
            ("digits CNN", Path(graphopt.__file__).parent / "data" / "tinycnn.onnx", calib_digits,
             {"input": digits["x"]}, [1, 1, 8, 8]),
            ("digits transformer", FIX / "digits_transformer.onnx", calib_digits, {"input": digits["x"]}, [1, 1, 8, 8]),
            ("digits ResNet", FIX / "digits_resnet.onnx", calib_digits, {"input": digits["x"]}, [1, 1, 8, 8]),
            ("resnet18-like 224", dd / "r18.onnx",
             [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)],
             {"input": rng.standard_normal((4, 3, 224, 224)).astype(np.float32)}, [1, 3, 224, 224]),
        ]
        for name, src, calib, evalset, shape in cases:
            base = graphopt.load(src)
            graphopt.optimize(base)
            graphopt.run_passes(base, ["compact-names"])  # every variant gets it too (as the CLI does)
            fp32 = dd / f"{name}_fp32.onnx"
            graphopt.save(base, fp32)
            variants: dict[str, Path] = {"fp32": fp32}
            errors: dict[str, str] = {}
            reports: dict[str, Any] = {}
            for tech, steps in TECHNIQUES.items():
                try:
                    m = graphopt.load(fp32)
                    ps = [graphopt.get_pass(p, **o) for p, o in steps]
                    graphopt.run_passes(m, ps + [graphopt.get_pass("dce"), graphopt.get_pass("compact-names")],
                                        graphopt.PassContext(calibration=calib))
                    out = dd / f"{name}_{len(variants)}.onnx"
                    graphopt.save(m, out)
                    variants[tech] = out
                    reports[tech] = {p.name: {k: v for k, v in getattr(p, "report", {}).items()
                                              if k in ("pruned", "factored", "matmul_flops_ratio", "index_bits",
                                                       "quantized_nodes")} for p in ps}
                except Exception as e:  # noqa: BLE001 - a technique that cannot apply is a result
                    errors[tech] = f"{type(e).__name__}: {str(e)[:150]}"
            try:
                quantize_static(str(fp32), str(dd / f"{name}_ort.onnx"), Reader(list(calib[:64])),
                                quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                variants["int8 (ORT quantize_static)"] = dd / f"{name}_ort.onnx"
            except Exception as e:  # noqa: BLE001
                errors["int8 (ORT quantize_static)"] = f"{type(e).__name__}: {str(e)[:150]}"
            sess = {k: ort_session(p, optimize=True, threads=2) for k, p in variants.items()}
            outs = {k: s.run(None, evalset)[0] for k, s in sess.items()}
            one = {"input": evalset["input"][:1]}
            lat = interleaved_latency(sess, one, args.rounds)
            f0 = flops(fp32, shape)
            row: dict[str, Any] = {"model": name, "errors": errors, "reports": reports, "tools": {}}
            for k, o in outs.items():
                metric = float((o.argmax(1) == digits["y"]).mean()) if name.startswith("digits") else \
                    float((o.argmax(1) == outs["fp32"].argmax(1)).mean())
                row["tools"][k] = {"size": variants[k].stat().st_size / fp32.stat().st_size,
                                   "latency": lat[k] / lat["fp32"],
                                   "flops": flops(variants[k], shape) / f0 if f0 else 1.0, "metric": metric}
            rows.append(row)
            print(name, {k: tuple(round(v[x], 3) for x in ("size", "latency", "flops", "metric"))
                         for k, v in row["tools"].items()}, errors, flush=True)
    lines = ["| model | technique | size vs fp32 | ORT latency vs fp32 | FLOPs vs fp32 | accuracy / agreement |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for k, t in r["tools"].items():
            lines.append(f"| {r['model']} | {k} | {t['size']:.3f} | {t['latency']:.2f} | {t['flops']:.2f} | "
                         f"{t['metric']:.4f} |")
        for k, e in r["errors"].items():
            lines.append(f"| {r['model']} | {k} | - | - | - | not applicable: {e} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compress.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (HERE / "results" / "compress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
