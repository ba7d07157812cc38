"""Does a QDQ model from graphopt compile to integer kernels under TVM? (issue 4 asks)

Quantizes the bundled digits CNN, imports it with TVM's Relax ONNX frontend, and reports which
Relax ops appear and whether the convolutions/matmuls take int8 operands.

Run (needs the tvm extra):  pip install ".[tvm]" && python benchmarks/tvm_qdq_check.py
Measured with apache-tvm 0.27.0.post1: quantize/dequantize wrap *float32* conv2d and matmul -
the QDQ model runs in float under TVM (no integer kernels).
"""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path

import numpy as np

import graphopt


def main() -> None:
    from tvm.relax.frontend.onnx import from_onnx

    here = Path(__file__).resolve().parent
    m = graphopt.load(Path(graphopt.__file__).parent / "data" / "tinycnn.onnx")
    graphopt.optimize(m)
    cal = np.load(here.parent / "tests" / "fixtures" / "digits_calib.npz")["input"]
    graphopt.run_passes(m, ["quantize-static", "dce"],
                        graphopt.PassContext(calibration=[{"input": cal[i:i + 1]} for i in range(16)]))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "q.onnx"
        graphopt.save(m, p)
        import onnx

        mod = from_onnx(onnx.load(str(p)), keep_params_in_input=False)
    txt = mod.script()
    ops = collections.Counter(re.findall(r"R\.([a-z_.0-9]+)\(", txt))
    compute = [ln.strip() for ln in txt.splitlines() if re.search(r"R\.(nn\.conv2d|matmul)\(", ln)]
    int8 = [ln for ln in compute if "int8" in ln.split("=")[0]]
    print("Relax ops:", dict(ops))
    print(f"{len(compute)} conv2d/matmul calls, {len(int8)} with int8 results; first: {compute[0][:120]}")
    print("integer kernels:", "yes" if int8 else "no - QDQ runs as float under TVM's Relax frontend")


if __name__ == "__main__":
    main()
