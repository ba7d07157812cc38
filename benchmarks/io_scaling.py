"""Import + export time of graphopt's IR on synthetic graphs of growing size and on the
largest light model, side by side with onnx's own load/save (protobuf parse/serialize only).

Run:  python benchmarks/io_scaling.py [--sizes 10000,50000,100000] [--repeat 3]
Saves benchmarks/results/io_scaling.json and prints a markdown table (best of --repeat runs;
the machine is shared, so compare the ratios within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt


def synthetic(n_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """A branchy graph of cheap ops with small weights: blocks of Mul(const) -> Add -> Relu
    with a skip connection every few nodes, so values have several readers."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, skip = "x", "x"
    k = 0
    while len(nodes) < n_nodes:
        c = f"c{k}"
        inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), c))
        nodes.append(helper.make_node("Mul", [prev, c], [f"m{k}"], name=f"mul{k}"))
        nodes.append(helper.make_node("Add", [f"m{k}", skip], [f"a{k}"], name=f"add{k}"))
        nodes.append(helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}"))
        if k % 4 == 0:
            skip = f"r{k}"
        prev = f"r{k}"
        k += 1
    g = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def best(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure(name: str, path: Path, repeat: int) -> dict:
    model = graphopt.load(path, check=False)
    n = len(list(model.graph.all_nodes()))
    t_onnx_load = best(lambda: onnx.load(str(path)), repeat)
    t_import = best(lambda: graphopt.load(path, check=False), repeat)
    t_import_checked = best(lambda: graphopt.load(path), 1)
    out = path.with_name(path.stem + "_out.onnx")
    t_export = best(lambda: graphopt.save(model, out), repeat)
    proto = onnx.load(str(path))
    t_onnx_save = best(lambda: onnx.save(proto, str(out) + ".ref"), repeat)
    return {
        "model": name, "nodes": n, "import_s": t_import, "import_checked_s": t_import_checked,
        "export_s": t_export, "onnx_load_s": t_onnx_load, "onnx_save_s": t_onnx_save,
        "us_per_node": (t_import + t_export) / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,50000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        light = Path(os.path.dirname(onnx.__file__)) / "backend/test/data/light"
        largest = max(light.glob("*.onnx"), key=lambda p: len(onnx.load(str(p)).graph.node))
        p = Path(d) / largest.name
        p.write_bytes(largest.read_bytes())
        rows.append(measure(largest.stem, p, args.repeat))
        for size in [int(s) for s in args.sizes.split(",")]:
            p = Path(d) / f"synthetic_{size}.onnx"
            onnx.save(synthetic(size), str(p))
            rows.append(measure(f"synthetic {size // 1000}k", p, args.repeat))
    print("| model | nodes | import (s) | import + checker (s) | export (s) | µs/node | onnx.load (s) | onnx.save (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['nodes']} | {r['import_s']:.3f} | {r['import_checked_s']:.3f} | {r['export_s']:.3f} "
              f"| {r['us_per_node']:.1f} | {r['onnx_load_s']:.3f} | {r['onnx_save_s']:.3f} |")
    out = Path(__file__).parent / "results" / "io_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
