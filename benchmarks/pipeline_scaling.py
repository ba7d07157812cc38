"""Default pipeline wall time on synthetic graphs of growing size (near-linear growth wanted).

The synthetic graph repeats a block with work for every pass: a Conv+BatchNormalization to
fuse, an Identity and a Mul-by-one to remove, a duplicated branch for CSE, a constant
subexpression to fold, and a residual Add.

Run:  python benchmarks/pipeline_scaling.py [--sizes 10000,50000,100000]
Saves benchmarks/results/pipeline_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt


def block_model(n_nodes: int, c: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev, k = "x", 0
    while len(nodes) < n_nodes:
        p = f"b{k}_"
        inits += [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), p + "w"),
                  numpy_helper.from_array(rng.random(c).astype(np.float32) + 0.5, p + "s"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), p + "b"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), p + "m"),
                  numpy_helper.from_array(rng.random(c).astype(np.float32) + 0.5, p + "v"),
                  numpy_helper.from_array(np.ones(1, np.float32), p + "one"),
                  numpy_helper.from_array(np.full(1, 2.0, np.float32), p + "two")]
        nodes += [
            helper.make_node("Conv", [prev, p + "w"], [p + "c"]),
            helper.make_node("BatchNormalization", [p + "c", p + "s", p + "b", p + "m", p + "v"], [p + "bn"]),
            helper.make_node("Identity", [p + "bn"], [p + "id"]),
            helper.make_node("Mul", [p + "id", p + "one"], [p + "m1"]),
            helper.make_node("Relu", [p + "m1"], [p + "r1"]),
            helper.make_node("Relu", [p + "m1"], [p + "r2"]),  # duplicate for CSE
            helper.make_node("Mul", [p + "two", p + "two"], [p + "four"]),  # constant subexpression
            helper.make_node("Mul", [p + "r2", p + "four"], [p + "r2s"]),
            helper.make_node("Add", [p + "r1", p + "r2s"], [p + "sum"]),
            helper.make_node("Add", [p + "sum", prev], [p + "out"]),
        ]
        prev = p + "out"
        k += 1
    g = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, c, 4, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,50000,100000")
    args = ap.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        mp = block_model(size)
        t0 = time.perf_counter()
        m = graphopt.from_proto(mp, check=False)
        t1 = time.perf_counter()
        ctx = graphopt.PassContext()
        graphopt.optimize(m, ctx=ctx)
        t2 = time.perf_counter()
        graphopt.to_proto(m)
        t3 = time.perf_counter()
        per_pass: dict[str, float] = {}
        for r in ctx.records:
            per_pass[r.name] = per_pass.get(r.name, 0.0) + r.seconds
        rows.append({"nodes": len(mp.graph.node), "nodes_after": len(m.graph), "import_s": t1 - t0,
                     "pipeline_s": t2 - t1, "export_s": t3 - t2, "per_pass_s": per_pass})
        print(f"{len(mp.graph.node):7d} nodes -> {len(m.graph):6d}: import {t1 - t0:.2f}s  pipeline {t2 - t1:.2f}s  "
              f"export {t3 - t2:.2f}s  ({(t2 - t1) / len(mp.graph.node) * 1e6:.0f} us/node)", flush=True)
        top = sorted(per_pass.items(), key=lambda kv: -kv[1])[:5]
        print("         slowest passes: " + ", ".join(f"{k} {v:.2f}s" for k, v in top), flush=True)
    out = Path(__file__).parent / "results" / "pipeline_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
