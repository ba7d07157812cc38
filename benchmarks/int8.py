"""graphopt INT8 vs onnxruntime.quantization (quantize_static QDQ per-channel U8S8, and
quantize_dynamic), in one run: size ratio, ORT latency ratio vs fp32 (ENABLE_ALL, 2 threads,
interleaved rounds, median), accuracy (digits CNN, held-out split) or top-1 agreement with fp32
(other models, random inputs), and failures.

Run:  python benchmarks/int8.py [--rounds 50]      Saves benchmarks/results/int8.json / int8.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt
from graphopt.runtime import interleaved_latency, ort_session

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "tests" / "fixtures"


class ConvBnNet:
    """Builds the generated benchmark CNNs: Conv + BatchNormalization (+ activation) layers with
    random He-scaled weights and trained-looking BN statistics, from one seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def fresh(self) -> int:
        self.k += 1
        return self.k

    def tensor(self, arr: np.ndarray, name: str) -> None:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))

    def conv_bn(self, x: str, cin: int, cout: int, ksz: int, stride: int, act: str | None, group: int = 1) -> str:
        """``act``: None, "relu" or "relu6" (Clip to [0, 6], as torch exports ReLU6)."""
        from onnx import helper

        p, rng = f"l{self.fresh()}_", self.rng
        self.tensor(rng.standard_normal((cout, cin // group, ksz, ksz)) * np.sqrt(2 / (cin // group * ksz * ksz)), p + "w")
        self.tensor(rng.uniform(0.5, 1.5, cout), p + "s")
        self.tensor(rng.uniform(-0.1, 0.1, cout), p + "b")
        self.tensor(rng.uniform(-0.1, 0.1, cout), p + "m")
        self.tensor(rng.uniform(0.5, 1.5, cout), p + "v")
        attrs = {"group": group} if group != 1 else {}
        self.nodes += [helper.make_node("Conv", [x, p + "w"], [p + "c"], strides=[stride, stride], pads=[ksz // 2] * 4,
                                        **attrs),
                       helper.make_node("BatchNormalization", [p + "c", p + "s", p + "b", p + "m", p + "v"], [p + "bn"])]
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [p + "bn"], [p + "r"]))
        elif act == "relu6":
            if not any(i.name == "six" for i in self.inits):
                self.tensor(np.array(0), "zero")
                self.tensor(np.array(6), "six")
            self.nodes.append(helper.make_node("Clip", [p + "bn", "zero", "six"], [p + "r"]))
        return p + "r" if act else p + "bn"

    def classifier(self, x: str, cin: int, scale: float) -> None:
        """GlobalAveragePool -> Flatten ("flat"), and the weights "fc_w" [cin, 1000] / "fc_b"."""
        from onnx import helper

        self.nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"])]
        self.tensor(self.rng.standard_normal((cin, 1000)) * scale, "fc_w")
        self.tensor(np.zeros(1000), "fc_b")

    def save(self, path: Path, name: str) -> None:
        from onnx import TensorProto, helper

        g = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1000])], self.inits)
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def resnet18_like(path: Path, width: int = 32) -> None:
    """A ResNet-18-shaped CNN at 224x224 (BasicBlocks, widths w..8w, BN after each conv),
    random weights with trained-looking BN statistics; written to ``path``."""
    from onnx import helper

    net = ConvBnNet()
    x = net.conv_bn("input", 3, width, 7, 2, "relu")
    net.nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool", width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for blk in range(2):
            stride = 2 if stage > 0 and blk == 0 else 1
            h = net.conv_bn(x, cin, cout, 3, stride, "relu")
            h = net.conv_bn(h, cout, cout, 3, 1, None)
            sc = net.conv_bn(x, cin, cout, 1, stride, None) if (stride != 1 or cin != cout) else x
            k = net.fresh()
            net.nodes += [helper.make_node("Add", [h, sc], [f"add{k}"]), helper.make_node("Relu", [f"add{k}"], [f"out{k}"])]
            x, cin = f"out{k}", cout
    net.classifier(x, cin, 0.05)
    net.nodes += [helper.make_node("MatMul", ["flat", "fc_w"], ["fc"]), helper.make_node("Add", ["fc", "fc_b"], ["output"])]
    net.save(path, "resnet18_like")


def mobilenetv2_like(path: Path, width: float = 1.0) -> None:
    """A MobileNetV2-shaped CNN at 224x224 (inverted residuals with expansion 6, depthwise 3x3,
    ReLU6 as Clip, BN after each conv), random weights with trained-looking BN statistics."""
    from onnx import helper

    net = ConvBnNet()
    ch = lambda c: max(8, int(c * width + 4) // 8 * 8)
    x, cin = net.conv_bn("input", 3, ch(32), 3, 2, "relu6"), ch(32)
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hid = cin * t
            h = net.conv_bn(x, cin, hid, 1, 1, "relu6") if t != 1 else x
            h = net.conv_bn(h, hid, hid, 3, stride, "relu6", group=hid)
            h = net.conv_bn(h, hid, ch(c), 1, 1, None)
            if stride == 1 and cin == ch(c):
                k = net.fresh()
                net.nodes.append(helper.make_node("Add", [h, x], [f"add{k}"]))
                h = f"add{k}"
            x, cin = h, ch(c)
    x = net.conv_bn(x, cin, 1280, 1, 1, "relu6")
    net.classifier(x, 1280, 0.03)
    net.nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"]))
    net.save(path, "mobilenetv2_like")


class Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    digits = np.load(FIX / "digits_test.npz")
    cases = [("digits_cnn (8x8)", Path(graphopt.__file__).parent / "data" / "tinycnn.onnx", "input", None)]
    for name in ("resnetish_op13", "mobilenetish_op13", "mobilenetish_op17", "encoder_op17"):
        cases.append((name, HERE / "models" / f"{name}.onnx", "input", None))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        dd = Path(d)
        resnet18_like(dd / "resnet18_like_224.onnx")
        cases.insert(2, ("resnet18-like 224x224 (generated)", dd / "resnet18_like_224.onnx", "input", None))
        mobilenetv2_like(dd / "mobilenetv2_like_224.onnx")
        cases.insert(3, ("mobilenetv2-like 224x224 (generated)", dd / "mobilenetv2_like_224.onnx", "input", None))
        for name, path, inp, _ in cases:
            m = graphopt.load(path)
            shape = [d if isinstance(d, int) else 1 for d in m.graph.inputs[0].shape]
            if name.startswith("digits"):
                calib = [{inp: x[None]} for x in np.load(FIX / "digits_calib.npz")["input"]]
                evalset = {inp: digits["x"]}
            else:
                rng = np.random.default_rng(0)
                calib = [{inp: rng.standard_normal(shape).astype(np.float32)} for _ in range(32)]
                evalset = {inp: rng.standard_normal([16] + shape[1:]).astype(np.float32)}
            fp32 = dd / f"{name}_fp32.onnx"
            graphopt.save(m, fp32)
            variants: dict[str, Any] = {"fp32": fp32}
            errors: dict[str, str] = {}
            # graphopt
            t0 = time.perf_counter()
            try:
                g = graphopt.load(path)
                graphopt.optimize(g)
                graphopt.run_passes(g, ["quantize-static", "dce"], graphopt.PassContext(calibration=calib))
                graphopt.save(g, dd / f"{name}_graphopt.onnx")
                variants["graphopt"] = dd / f"{name}_graphopt.onnx"
            except Exception as e:  # noqa: BLE001
                errors["graphopt"] = f"{type(e).__name__}: {e}"[:160]
            tg = time.perf_counter() - t0
            try:
                g = graphopt.load(path)
                graphopt.optimize(g)
                graphopt.run_passes(g, [graphopt.get_pass("quantize-dynamic"), "dce"])
                graphopt.save(g, dd / f"{name}_graphopt_dyn.onnx")
                variants["graphopt-dynamic"] = dd / f"{name}_graphopt_dyn.onnx"
            except Exception as e:  # noqa: BLE001
                errors["graphopt-dynamic"] = f"{type(e).__name__}: {e}"[:160]
            # ORT static (QDQ, per-channel, U8S8) on the ORT-preprocessed-free original
            try:
                quantize_static(str(fp32), str(dd / f"{name}_ort_static.onnx"), Reader(list(calib)),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
                ort_session(dd / f"{name}_ort_static.onnx", optimize=True, threads=2)
                variants["ort-static"] = dd / f"{name}_ort_static.onnx"
            except Exception as e:  # noqa: BLE001
                errors["ort-static"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            try:
                quantize_dynamic(str(fp32), str(dd / f"{name}_ort_dynamic.onnx"), weight_type=QuantType.QInt8)
                ort_session(dd / f"{name}_ort_dynamic.onnx", optimize=True, threads=2)
                variants["ort-dynamic"] = dd / f"{name}_ort_dynamic.onnx"
            except Exception as e:  # noqa: BLE001
                errors["ort-dynamic"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            sess = {k: ort_session(p, optimize=True, threads=2) for k, p in variants.items()}
            outs = {k: s.run(None, evalset)[0] for k, s in sess.items()}
            lat = interleaved_latency(sess, {inp: evalset[inp][:1]}, args.rounds)
            ref_lat = lat["fp32"]
            row: dict[str, Any] = {"model": name, "graphopt_seconds": tg, "errors": errors, "tools": {}}
            for k, o in outs.items():
                if name.startswith("digits"):
                    metric = float((o.argmax(1) == digits["y"]).mean())
                else:
                    metric = float((o.reshape(o.shape[0], -1).argmax(1) ==
                                    outs["fp32"].reshape(o.shape[0], -1).argmax(1)).mean())
                row["tools"][k] = {"size_ratio": variants[k].stat().st_size / fp32.stat().st_size,
                                   "latency_ratio": lat[k] / ref_lat, "latency_ms": lat[k], "metric": metric}
            rows.append(row)
            print(name, {k: (round(v["size_ratio"], 3), round(v["latency_ratio"], 3), round(v["metric"], 4))
                         for k, v in row["tools"].items()}, errors, flush=True)
    lines = ["| model | tool | size vs fp32 | ORT latency vs fp32 | accuracy / top-1 agreement | note |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        for k in ("fp32", "graphopt", "graphopt-dynamic", "ort-static", "ort-dynamic"):
            if k in r["tools"]:
                t = r["tools"][k]
                lines.append(f"| {r['model']} | {k} | {t['size_ratio']:.3f} | {t['latency_ratio']:.2f} "
                             f"({t['latency_ms']:.3f} ms) | {t['metric']:.4f} | |")
            else:
                lines.append(f"| {r['model']} | {k} | - | - | - | FAILED: {r['errors'].get(k, '')} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "int8.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "results" / "int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
