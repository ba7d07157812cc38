"""Calibration memory: static quantization streams each sample's activations into running
statistics, so what it holds is O(tensors), not O(samples x tensors).

It once kept every quantized activation of up to 32 samples (for the SQNR report): ppocrv3_det
at 736x960 with 16 samples reached 7 GB RSS and was OOM-killed. The SQNR is now summed in a
streamed pass; these tests check the memory bound (numpy buffers, which tracemalloc sees) and that
the streamed SQNR is the direct computation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import collect_values, intermediate_session

C, HW, LAYERS = 16, 48, 6


def _conv_net(seed: int = 0) -> onnx.ModelProto:
    """Conv/Relu chain, C channels at HW x HW: each activation is C*HW*HW*4 bytes (147 KB)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
        b = (0.1 * rng.standard_normal(C)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, HW, HW])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, C, HW, HW)).astype(np.float32)} for _ in range(n)]


def _peak_bytes(n: int, monkeypatch: pytest.MonkeyPatch, **options: object) -> tuple[int, dict]:
    """Peak numpy/Python memory (tracemalloc) of quantize-static with ``n`` calibration samples,
    the samples themselves (made before tracing starts) not counted. ORT's output buffers are
    not numpy allocations (tracemalloc does not see them): the session's outputs are copied
    into numpy-owned arrays here, so that holding on to them shows."""
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run",
                        lambda self, *a, **k: [np.array(o, copy=True) for o in real_run(self, *a, **k)])
    m = graphopt.from_proto(_conv_net())
    cal = _samples(n)
    q = graphopt.get_pass("quantize-static", channel_check=False, **options)
    tracemalloc.start()
    try:
        graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, q.report


def test_calibration_memory_does_not_grow_with_sample_count(monkeypatch: pytest.MonkeyPatch) -> None:
    one_sample = 2 * LAYERS * C * HW * HW * 4  # every Conv and Relu output of one sample (1.8 MB)
    few, _ = _peak_bytes(4, monkeypatch)
    many, report = _peak_bytes(24, monkeypatch)
    assert report["calibration_samples"] == 24 and report["sqnr_db"]
    # holding activations per sample (as before: up to eval_samples=32 of them) made `many`
    # about 24 x one_sample (36 MB) against about 4 x at 4 samples
    assert many < few + one_sample, (many, few, one_sample)
    assert many < 6 * one_sample, (many, one_sample)


def test_histogram_methods_stream_too(monkeypatch: pytest.MonkeyPatch) -> None:
    few, _ = _peak_bytes(4, monkeypatch, method="percentile")
    many, _ = _peak_bytes(24, monkeypatch, method="percentile")
    assert many < few + 2 * LAYERS * C * HW * HW * 4, (many, few)


def test_streamed_sqnr_is_the_direct_computation() -> None:
    """The report's SQNR per tensor equals fake-quantizing the float activations of the eval
    samples with the Q/DQ parameters written into the model."""
    m = graphopt.from_proto(_conv_net())
    cal = _samples(12)
    q = graphopt.get_pass("quantize-static", channel_check=False, eval_samples=8)
    graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))
    qp = graphopt.to_proto(m)
    consts = {t.name: numpy_helper.to_array(t) for t in qp.graph.initializer}
    params = {n.input[0]: (consts[n.input[1]], consts[n.input[2]]) for n in qp.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in consts}
    names = sorted(set(q.report["sqnr_db"]) & set(params))
    assert len(names) >= LAYERS, (q.report["sqnr_db"], list(params))
    values = collect_values(graphopt.from_proto(_conv_net()), names, cal[:8])
    for n in names:
        x = values[n]
        scale, zp = float(params[n][0]), int(params[n][1])
        fq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        want = 10 * np.log10(np.sum(x ** 2) / np.sum((x - fq) ** 2))
        assert abs(q.report["sqnr_db"][n] - want) < 0.02, (n, q.report["sqnr_db"][n], want)


def test_calibration_session_has_no_arena() -> None:
    """A session returning every tensor cannot reuse buffers: ORT's arena would keep the sum of
    all activations reserved for the session's lifetime (and grow it by doubling)."""
    sess, outs = intermediate_session(graphopt.from_proto(_conv_net()), ["c0", "r0", "c3"])
    opts = sess.get_session_options()
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    assert {"c0", "r0", "c3"} <= set(outs)
