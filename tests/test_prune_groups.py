"""Structured channel pruning through grouped convolutions, channel shuffles, FPN necks
(Resize/ConvTranspose), Split, squeeze-excite chains and fully connected layers.

Correctness by construction: the filters a prune removes are zeroed first (with their biases);
pruning that zeroed model must then give the zeroed model's outputs exactly (up to float
rounding), which checks every index the rewrite touches - weights, per-channel constants,
depthwise and grouped slices, shuffle and Split shapes, flatten rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from helpers import DATA, make_model, vi

# grouped convs' slices are balanced by scipy's MILP solver (without it prune-channels falls back to
# coarser joins, and these figures do not hold)
pytest.importorskip("scipy.optimize")
from onnx import helper, numpy_helper

import graphopt
from graphopt.analysis import infer_shapes, model_stats


def zero_pruned(model: Any, kept: dict[str, np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> Any:
    """``model`` with every filter the prune removed (all but ``kept[name]``) set to zero,
    bias included, in place. A depthwise conv or a per-channel constant Add after a dead
    channel would bring it back to life (its bias): with ``feeds``, those are zeroed too, where
    the model computes an all-zero channel, so the removed channels are dead all the way."""
    from graphopt.runtime import collect_values

    g = model.graph
    for n in [n for body in model.all_graphs() for n in body]:  # If/Loop bodies prune too
        if n.name not in kept:
            continue
        g = n.graph
        if n.op_type == "LSTM":  # a dead unit: its rows of every gate in W, R and B (h0 = c0 = 0)
            d, h = n.input(1).const_value().shape[0], n.input(2).const_value().shape[2]
            drop = np.setdiff1d(np.arange(d * h), kept[n.name])
            for i, blocks in ((1, 4), (2, 4), (3, 8)):
                if len(n.inputs) <= i or n.input(i) is None:
                    continue
                a = n.input(i).const_value().copy()
                for u in drop:
                    for b in range(blocks):
                        a[u // h, b * h + u % h] = 0
                n.set_input(i, g.add_initializer(n.input(i).name + "_zeroed", a))
            continue
        w = n.input(1).const_value().copy()
        axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(n.op_type, 0 if n.attr("transB", 0) else 1)
        drop = np.setdiff1d(np.arange(w.shape[axis]), kept[n.name])
        idx = [slice(None)] * w.ndim
        idx[axis] = drop
        w[tuple(idx)] = 0
        n.set_input(1, g.add_initializer(n.input(1).name + "_zeroed", w))
        if len(n.inputs) > 2 and n.input(2) is not None and n.input(2).const_value() is not None:
            b = n.input(2).const_value().copy()
            if b.size > 1:
                b.reshape(-1)[drop] = 0
                n.set_input(2, g.add_initializer(n.input(2).name + "_zeroed", b))
    g = model.graph
    for _ in range(4 if feeds is not None else 0):  # dead channels through depthwise biases / bias Adds
        sites = []
        for n in g:
            if n.op_type == "Conv" and (n.attr("group", 1) or 1) > 1 and len(n.inputs) > 2 and n.input(2) is not None \
                    and n.input(1).const_value().shape[1] == 1:
                sites.append((n, 2, 0))
            elif n.op_type == "BatchNormalization":  # its shift (beta - mean * gamma / std): beta and mean
                sites += [(n, 2, 0), (n, 3, 0)]
            elif n.op_type == "Add" and n.input(1) is not None and n.input(1).const_value() is not None \
                    and n.input(1).const_value().size > 1 and n.input(0).shape is not None:
                sites.append((n, 1, len(n.input(0).shape) - n.input(1).const_value().ndim
                              if len(n.input(0).shape) != 4 else 1 - (4 - n.input(1).const_value().ndim)))
        vals = collect_values(model, sorted({n.input(0).name for n, _, _ in sites}), [feeds])
        changed = False
        for n, i, axis in sites:
            x = vals[n.input(0).name]
            cax = 1 if x.ndim == 4 else x.ndim - 1
            dead = np.flatnonzero(np.abs(x).max(axis=tuple(a for a in range(x.ndim) if a != cax)) == 0)
            b = n.input(i).const_value().copy()
            if axis < 0 or b.shape[axis] != x.shape[cax] or not dead.size or not np.take(b, dead, axis=axis).any():
                continue
            idx = [slice(None)] * b.ndim
            idx[axis] = dead
            b[tuple(idx)] = 0
            n.set_input(i, g.add_initializer(n.input(i).name + "_zeroed", b))
            changed = True
        if not changed:
            break
    return model


def check_exact(model: Any, feeds: dict[str, np.ndarray], ratio: float = 0.5, rtol: float = 1e-4,
                **options: Any) -> tuple[Any, Any]:
    """Prune ``model`` once to learn which filters go, zero those in a copy, prune the zeroed copy
    and compare it with the zeroed model (exact up to rounding), and full-check the result.
    Returns (the pass that pruned the zeroed model, the pruned zeroed model)."""
    first = graphopt.get_pass("prune-channels", ratio=ratio, recover=False, **options)
    graphopt.run_passes(model.copy(), [first, "dce"])
    assert first.kept, first.report
    zeroed = zero_pruned(model.copy(), first.kept, feeds)
    p = graphopt.get_pass("prune-channels", ratio=ratio, recover=False, **options)
    pruned = zeroed.copy()
    graphopt.run_passes(pruned, [p, "dce"])
    assert {k: v.tolist() for k, v in p.kept.items()} == {k: v.tolist() for k, v in first.kept.items()}
    onnx.checker.check_model(graphopt.to_proto(pruned), full_check=True)
    ref, got = graphopt.run_ort(zeroed, feeds), graphopt.run_ort(pruned, feeds)
    for (k, a), b in zip(ref.items(), got.values(), strict=True):
        assert a.shape == b.shape, k
        scale = max(float(np.abs(a).max()), 1e-6)
        assert float(np.abs(a - b).max()) <= rtol * scale, (k, float(np.abs(a - b).max()), scale)
    # and it is not a no-op: the zeroed model differs from the unzeroed one
    return p, pruned


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _shuffle_block(opset: int = 13) -> onnx.ModelProto:
    """A ShuffleNet-v1 trunk: stem, a unit (grouped 1x1, channel shuffle of 4 groups, depthwise
    3x3, grouped 1x1, residual Add), a stride-2 unit (its branch concatenated with an average-pooled
    trunk), a global-pool + Gemm head. 24 channels in 4 groups: a shuffle group (6 channels) does
    not fill a slice of the next grouped conv, so shuffle groups straddle its slices."""
    rng = np.random.default_rng(5)
    inits = [("w0", _w(rng, 24, 3, 3, 3)), ("b0", _w(rng, 24)),
             ("wg1", _w(rng, 24, 6, 1, 1)), ("bg1", _w(rng, 24)), ("wd1", _w(rng, 24, 1, 3, 3)), ("bd1", _w(rng, 24)),
             ("wg2", _w(rng, 24, 6, 1, 1)), ("bg2", _w(rng, 24)),
             ("wg3", _w(rng, 24, 6, 1, 1)), ("bg3", _w(rng, 24)), ("wd3", _w(rng, 24, 1, 3, 3)), ("bd3", _w(rng, 24)),
             ("wg4", _w(rng, 24, 6, 1, 1)), ("bg4", _w(rng, 24)),
             ("fc", _w(rng, 10, 48)), ("fcb", _w(rng, 10)),
             ("s5", np.array([1, 4, 6, 8, 8], np.int64)), ("s4", np.array([1, 24, 8, 8], np.int64)),
             ("s5b", np.array([1, 4, 6, 8, 8], np.int64)), ("flat", np.array([1, -1], np.int64))]

    def shuffle(x: str, y: str, k: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Reshape", [x, "s5" if k == "a" else "s5b"], [f"{y}_5"], name=f"shuf_{k}1"),
                helper.make_node("Transpose", [f"{y}_5"], [f"{y}_t"], perm=[0, 2, 1, 3, 4], name=f"shuf_{k}2"),
                helper.make_node("Reshape", [f"{y}_t", "s4"], [y], name=f"shuf_{k}3")]

    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["t0"]),
             helper.make_node("Conv", ["t0", "wg1", "bg1"], ["g1"], name="g1", group=4),
             helper.make_node("Relu", ["g1"], ["g1r"]),
             *shuffle("g1r", "sh1", "a"),
             helper.make_node("Conv", ["sh1", "wd1", "bd1"], ["d1"], name="dw1", group=24, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d1", "wg2", "bg2"], ["g2"], name="g2", group=4),
             helper.make_node("Add", ["g2", "t0"], ["r1"], name="residual"),
             helper.make_node("Relu", ["r1"], ["t1"]),
             helper.make_node("Conv", ["t1", "wg3", "bg3"], ["g3"], name="g3", group=4),
             helper.make_node("Relu", ["g3"], ["g3r"]),
             *shuffle("g3r", "sh3", "b"),
             helper.make_node("Conv", ["sh3", "wd3", "bd3"], ["d3"], name="dw3", group=24, pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Conv", ["d3", "wg4", "bg4"], ["g4"], name="g4", group=4),
             helper.make_node("AveragePool", ["t1"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["g4", "pool"], ["cat"], axis=1, name="cat"),
             helper.make_node("Relu", ["cat"], ["t2"]),
             helper.make_node("GlobalAveragePool", ["t2"], ["gap"]),
             helper.make_node("Reshape", ["gap", "flat"], ["feat"], name="flatten"),
             helper.make_node("Gemm", ["feat", "fc", "fcb"], ["y"], name="head", transB=1)]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits=inits, opset=opset)


def test_shufflenet_block_prunes_through_the_shuffle_exactly() -> None:
    m = graphopt.from_proto(_shuffle_block())
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    p, pruned = check_exact(m, x)
    # every producer but the head (a graph output) prunes; grouped convs keep 4 groups
    assert set(p.report["pruned"]) == {"stem", "g1", "g2", "g3", "g4"}, p.report
    assert p.report["skipped"] == {"head": "reaches the graph output 'y'"}
    by = {n.name: n for n in pruned.graph}
    for k in ("g1", "g2", "g3", "g4"):
        assert by[k].attr("group") == 4
    # the shuffle still shuffles 4 groups of the kept channels, so whole columns went
    kept = int(p.report["pruned"]["g1"].split("/")[0])
    assert by["shuf_a1"].input(1).const_value().tolist() == [1, 4, kept // 4, 8, 8]
    assert by["shuf_a3"].input(1).const_value().tolist() == [1, kept, 8, 8]
    assert by["dw1"].attr("group") == kept
    m0 = model_stats(infer_shapes(graphopt.from_proto(_shuffle_block()))).params
    assert model_stats(infer_shapes(pruned.copy())).params <= 0.65 * m0
    # the prune is not empty of meaning: the removed filters were live in the original model
    full = graphopt.from_proto(_shuffle_block())
    graphopt.run_passes(full, [graphopt.get_pass("prune-channels", ratio=0.5, recover=False), "dce"])
    assert not graphopt.compare(graphopt.run_ort(_shuffle_block(), x), graphopt.run_ort(full, x),
                                rtol=1e-4, atol=1e-5).ok


def _fpn(rng_seed: int = 7) -> onnx.ModelProto:
    """A DBNet-like detector as PaddlePaddle exports it: weights in ``Constant`` nodes, HardSwish
    backbone with a squeeze-excite block (GlobalAveragePool, 1x1 convs, HardSigmoid, Mul), a
    YOLOv8-style C2f block (Split of a conv into halves, a conv on one half, Concat of all three),
    an FPN neck (lateral 1x1 convs, Resize x2 by constant scales, Add, Concat of the upsampled
    levels) and a head of Conv, two ConvTranspose x2 and a Sigmoid."""
    rng = np.random.default_rng(rng_seed)
    ws = {"w1": _w(rng, 16, 3, 3, 3), "b1": _w(rng, 16), "w2": _w(rng, 32, 16, 3, 3), "b2": _w(rng, 32),
          "wse1": _w(rng, 8, 32, 1, 1), "bse1": _w(rng, 8), "wse2": _w(rng, 32, 8, 1, 1), "bse2": _w(rng, 32),
          "wc": _w(rng, 32, 32, 1, 1), "bc": _w(rng, 32), "wm": _w(rng, 16, 16, 3, 3), "bm": _w(rng, 16),
          "wcv": _w(rng, 32, 48, 1, 1), "bcv": _w(rng, 32),
          "wl1": _w(rng, 16, 16, 1, 1), "wl2": _w(rng, 16, 32, 1, 1),
          "wo1": _w(rng, 8, 16, 3, 3), "wo2": _w(rng, 8, 16, 3, 3),
          "wh": _w(rng, 8, 16, 3, 3), "bh": _w(rng, 8), "wt1": _w(rng, 8, 8, 2, 2), "bt1": _w(rng, 8),
          "wt2": _w(rng, 8, 1, 2, 2), "bt2": _w(rng, 1),
          "scales": np.array([1, 1, 2, 2], np.float32), "split": np.array([16, 16], np.int64)}
    consts = [helper.make_node("Constant", [], [k], value=onnx.numpy_helper.from_array(v, k), name=f"const_{k}")
              for k, v in ws.items()]
    conv = lambda x, w, b, y, **kw: helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=y, **kw)
    nodes = consts + [
        conv("x", "w1", "b1", "c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["c1"], ["a1"]),
        conv("a1", "w2", "b2", "c2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["se_p"]),
        conv("se_p", "wse1", "bse1", "se1"), helper.make_node("Relu", ["se1"], ["se1r"]),
        conv("se1r", "wse2", "bse2", "se2"),
        helper.make_node("HardSigmoid", ["se2"], ["se_g"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["a2", "se_g"], ["se"], name="se_mul"),
        conv("se", "wc", "bc", "cv1"), helper.make_node("Relu", ["cv1"], ["cv1r"]),
        helper.make_node("Split", ["cv1r", "split"], ["h0", "h1"], axis=1, name="c2f_split"),
        conv("h1", "wm", "bm", "m1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["m1"], ["m1r"]),
        helper.make_node("Concat", ["h0", "h1", "m1r"], ["c2f"], axis=1, name="c2f_cat"),
        conv("c2f", "wcv", "bcv", "cv2"), helper.make_node("Relu", ["cv2"], ["p2"]),
        conv("a1", "wl1", None, "in1"), conv("p2", "wl2", None, "in2"),
        helper.make_node("Resize", ["in2", "", "scales"], ["in2_up"], mode="nearest", name="up2"),
        helper.make_node("Add", ["in1", "in2_up"], ["out1"], name="fpn_add"),
        conv("out1", "wo1", None, "p1o", pads=[1, 1, 1, 1]), conv("in2", "wo2", None, "p2o", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["p2o", "", "scales"], ["p2o_up"], mode="nearest", name="up_p2"),
        helper.make_node("Concat", ["p1o", "p2o_up"], ["fuse"], axis=1, name="fuse"),
        conv("fuse", "wh", "bh", "h", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("ConvTranspose", ["hr", "wt1", "bt1"], ["t1"], strides=[2, 2], name="t1"),
        helper.make_node("Relu", ["t1"], ["t1r"]),
        helper.make_node("ConvTranspose", ["t1r", "wt2", "bt2"], ["t2"], strides=[2, 2], name="t2"),
        helper.make_node("Sigmoid", ["t2"], ["y"])]
    return make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 1, 32, 32])], opset=14)


def test_dbnet_like_fpn_prunes_exactly() -> None:
    m = graphopt.from_proto(_fpn())
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    p, pruned = check_exact(m, x)
    # every conv prunes but the last ConvTranspose (its one channel is the graph output)
    assert set(p.report["pruned"]) == {"c1", "c2", "se1", "se2", "cv1", "m1", "cv2", "in1", "in2", "p1o", "p2o",
                                       "h", "t1"}, p.report
    assert p.report["skipped"] == {"t2": "reaches the graph output 'y'"}
    by = {n.name: n for n in pruned.graph}
    half = int(p.report["pruned"]["cv1"].split("/")[0])
    sizes = by["c2f_split"].input(1).const_value().tolist()
    assert sum(sizes) == half and min(sizes) >= 1
    # the SE gate multiplies the same channels it was computed from: c2 and se2 prune as one
    assert p.report["pruned"]["c2"] == p.report["pruned"]["se2"]
    # lateral in1 and upsampled in2 meet in an Add: one group
    assert p.report["pruned"]["in1"] == p.report["pruned"]["in2"]
    m0 = model_stats(infer_shapes(graphopt.from_proto(_fpn()))).params
    assert model_stats(infer_shapes(pruned.copy())).params <= 0.4 * m0


def test_constant_node_weights_and_what_stays() -> None:
    """A conv whose channels reach a Reshape into a sequence (an attention/LSTM input) keeps
    them - with the reason - while the convs feeding it still prune."""
    rng = np.random.default_rng(2)
    inits = [("w1", _w(rng, 16, 3, 3, 3)), ("w2", _w(rng, 8, 16, 3, 3)), ("seq", np.array([1, 8, -1], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["b", "seq"], ["s"], name="to_seq"),
             helper.make_node("Transpose", ["s"], ["y"], perm=[0, 2, 1])]
    mp = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 16, 8])], inits=inits)
    p = graphopt.get_pass("prune-channels", ratio=0.5, recover=False)
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, [p, "dce"])
    assert p.report["pruned"] == {"c1": "8/16"}
    assert p.report["skipped"] == {"c2": "read by Reshape 'to_seq', which must keep its channels aligned"}
    assert graphopt.run_ort(m, {"x": np.ones((1, 3, 4, 4), np.float32)})["y"].shape == (1, 16, 8)


@pytest.mark.parametrize("name", ["light_shufflenet", "light_squeezenet"])
def test_light_models_shrink_below_065_and_prune_exactly(name: str) -> None:
    """The onnx package's ShuffleNet (grouped 1x1 convs with 4 groups, channel shuffles, trunks
    joined by Concat and Add) and SqueezeNet, random weights: <= 0.65x parameters at ratio 0.5,
    and exact against the model with the removed filters zeroed (logits compared)."""
    from graphopt.testing import logits_outputs, randomize_weights

    m = randomize_weights(graphopt.load(DATA / "light" / f"{name}.onnx"))
    logits_outputs(m)
    graphopt.optimize(m)
    x = graphopt.make_inputs(m, seed=1)
    p, pruned = check_exact(m, x)
    before, after = model_stats(infer_shapes(m.copy())).params, model_stats(infer_shapes(pruned.copy())).params
    assert after <= 0.65 * before, (after / before, p.report["skipped"])


def test_crnn_prunes_conv_channels_into_the_lstm_and_its_units_exactly() -> None:
    """A CRNN as PyTorch exports it: conv features [N, C, H, W] -> Transpose to [W, N, C, H] ->
    Reshape to [W, N, C*H] -> bidirectional LSTM -> Reshape [W, 2*hidden] -> Gemm. The convs'
    channels become the LSTM's input features (H rows each); the LSTM's units shrink (equally
    many per direction), and so do the Gemm's rows."""
    rng = np.random.default_rng(4)
    hid = 8
    inits = [("w1", _w(rng, 16, 1, 3, 3)), ("b1", _w(rng, 16)), ("w2", _w(rng, 8, 16, 3, 3)), ("b2", _w(rng, 8)),
             ("W", _w(rng, 2, 4 * hid, 8 * 4)), ("R", _w(rng, 2, 4 * hid, hid)), ("B", _w(rng, 2, 8 * hid)),
             ("seq", np.array([6, 1, 32], np.int64)), ("flat", np.array([6, 2 * hid], np.int64)),
             ("fc", _w(rng, 5, 2 * hid)), ("fcb", _w(rng, 5))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2", "b2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Transpose", ["br"], ["t"], perm=[3, 0, 1, 2]),
             helper.make_node("Reshape", ["t", "seq"], ["s"], name="to_seq"),
             helper.make_node("LSTM", ["s", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hid,
                              direction="bidirectional"),
             helper.make_node("Reshape", ["Y", "flat"], ["f"], name="merge"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="head", transB=1)]
    mp = make_model(nodes, [vi("x", [1, 1, 4, 6])], [vi("y", [6, 5])], inits=inits)
    x = {"x": rng.standard_normal((1, 1, 4, 6)).astype(np.float32)}
    p, pruned = check_exact(graphopt.from_proto(mp), x)
    assert p.report["pruned"] == {"c1": "8/16", "c2": "4/8", "lstm": "8/16"}, p.report
    by = {n.name: n for n in pruned.graph}
    assert by["lstm"].attr("hidden_size") == 4 and by["lstm"].input(1).const_value().shape == (2, 16, 16)
    assert by["to_seq"].input(1).const_value().tolist() == [6, 1, 16]
    assert by["merge"].input(1).const_value().tolist() == [6, 8]
    assert by["head"].input(1).const_value().shape == (5, 8)


def _conv1d_net() -> onnx.ModelProto:
    """A 1-D conv stack like silero VAD's encoder: [N, C, T] tensors, rank-3 weights, biases."""
    rng = np.random.default_rng(5)
    inits = [("w1", _w(rng, 16, 4, 3)), ("b1", _w(rng, 16)), ("w2", _w(rng, 16, 16, 3)), ("b2", _w(rng, 16)),
             ("w3", _w(rng, 6, 16, 1)), ("b3", _w(rng, 6))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2", "b2"], ["b"], name="c2", pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w3", "b3"], ["y"], name="c3")]
    return make_model(nodes, [vi("x", [1, 4, 64])], [vi("y", [1, 6, 32])], inits=inits)


def test_conv1d_prunes_exactly_and_refits_with_calibration() -> None:
    """Rank-3 convs (silero VAD crashed with 'operands could not be broadcast (4,64,2)
    (1,64,1,1)' in the refit): exact under zeroing, and with calibration data the refit runs
    on [N, C, T] activations and brings the output closer than plain cutting."""
    rng = np.random.default_rng(6)
    x = {"x": rng.standard_normal((1, 4, 64)).astype(np.float32)}
    p, _ = check_exact(graphopt.from_proto(_conv1d_net()), x)
    assert p.report["pruned"] == {"c1": "8/16", "c2": "8/16"}, p.report
    calib = [{"x": rng.standard_normal((1, 4, 64)).astype(np.float32)} for _ in range(8)]
    ref = graphopt.run_ort(graphopt.from_proto(_conv1d_net()), x)["y"]
    errs = {}
    for recover in (False, True):
        m = graphopt.from_proto(_conv1d_net())
        p = graphopt.get_pass("prune-channels", ratio=0.5, recover=recover)
        graphopt.run_passes(m, [p, "dce"], graphopt.PassContext(calibration=calib))
        assert p.report["pruned"] == {"c1": "8/16", "c2": "8/16"} and p.report["recovered"] == recover, p.report
        onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
        errs[recover] = float(np.linalg.norm(graphopt.run_ort(m, x)["y"] - ref) / np.linalg.norm(ref))
    assert 0 < errs[True] < 0.8 * errs[False], errs


def _if_net() -> onnx.ModelProto:
    """Convs only inside If branches (as spox exports silero VAD): each branch a conv-relu-conv
    chain reading the outer input."""
    rng = np.random.default_rng(8)

    def branch(tag: str) -> onnx.GraphProto:
        inits = [numpy_helper.from_array(a, f"{tag}{k}") for k, a in
                 (("w1", _w(rng, 16, 3, 3, 3)), ("b1", _w(rng, 16)), ("w2", _w(rng, 4, 16, 3, 3)))]
        nodes = [helper.make_node("Conv", ["x", f"{tag}w1", f"{tag}b1"], [f"{tag}a"], name=f"{tag}c1", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", [f"{tag}a"], [f"{tag}ar"]),
                 helper.make_node("Conv", [f"{tag}ar", f"{tag}w2"], [f"{tag}y"], name=f"{tag}c2", pads=[1, 1, 1, 1])]
        return helper.make_graph(nodes, tag, [], [vi(f"{tag}y", [1, 4, 8, 8])], inits)

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("t_"), else_branch=branch("e_"))]
    return make_model(nodes, [vi("x", [1, 3, 8, 8]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", [1, 4, 8, 8])])


def test_convs_inside_if_branches_prune_exactly() -> None:
    """The channels of a branch's conv chain are coupled only inside the branch: both branches
    prune (their outputs stay whole), exact under zeroing for either condition. With calibration
    data, a branch's activations come out of the If: the branch the samples take is refit (its
    output closer to the original than plain cutting), the other is chosen by L1, said so."""
    rng = np.random.default_rng(9)
    for cond in (True, False):
        x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(cond)}
        p, _ = check_exact(graphopt.from_proto(_if_net()), x)
        assert p.report["pruned"] == {"t_c1": "8/16", "e_c1": "8/16"}, p.report
        assert p.report["skipped"] == {"t_c2": "reaches the graph output 't_y'", "e_c2": "reaches the graph output 'e_y'"}
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(True)} for _ in range(8)]
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(True)}
    ref = graphopt.run_ort(graphopt.from_proto(_if_net()), x)["y"]
    errs = {}
    for recover in (False, True):
        m = graphopt.from_proto(_if_net())
        p = graphopt.get_pass("prune-channels", ratio=0.5, recover=recover)
        graphopt.run_passes(m, [p, "dce"], graphopt.PassContext(calibration=calib))
        assert set(p.report["pruned"]) == {"t_c1", "e_c1"}, p.report
        onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
        errs[recover] = float(np.linalg.norm(graphopt.run_ort(m, x)["y"] - ref) / np.linalg.norm(ref))
    assert "1 of them chosen by L1 importance and not refit" in p.report["in_subgraphs"], p.report  # e_ took no sample
    assert 0 < errs[True] < 0.8 * errs[False], errs


def _scalar_bias_net(pads: int) -> onnx.ModelProto:
    """PP-OCRv4's detector pattern: conv -> BN -> HardSwish -> Add(learnable scalar) -> conv.
    A removed channel is not zero after the Add but the scalar, which the next conv still reads."""
    rng = np.random.default_rng(10)
    inits = [("w1", _w(rng, 16, 3, 3, 3)), ("g", (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)),
             ("be", _w(rng, 16)), ("mu", _w(rng, 16)), ("var", (1 + rng.random(16)).astype(np.float32)),
             ("s", np.array([-0.37], np.float32)), ("w2", _w(rng, 8, 16, 3, 3)), ("b2", _w(rng, 8)),
             ("w3", _w(rng, 5, 8, 1, 1))]
    p = [pads] * 4
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=p),
             helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["an"]),
             helper.make_node("HardSwish", ["an"], ["ah"]),
             helper.make_node("Add", ["ah", "s"], ["aa"], name="scalar_bias"),
             helper.make_node("Conv", ["aa", "w2", "b2"], ["b"], name="c2", pads=p),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w3"], ["y"], name="c3")]
    hw = 12 - 4 * (1 - pads)
    return make_model(nodes, [vi("x", [1, 3, 12, 12])], [vi("y", [1, 5, hw, hw])], inits=inits)


def test_scalar_bias_after_activation_is_folded_into_the_next_conv() -> None:
    """The removed channels' constant (-0.37 after the scalar Add) times each filter's kernel sum
    goes into the next conv's bias: exact under zeroing without padding; with padding the
    constant is not seen at the borders, which the report says."""
    x = {"x": np.random.default_rng(11).standard_normal((1, 3, 12, 12)).astype(np.float32)}
    p, _ = check_exact(graphopt.from_proto(_scalar_bias_net(0)), x)
    assert p.report["pruned"] == {"c1": "8/16", "c2": "4/8"}, p.report
    assert p.report["folded"]["c2"] == "folded into the bias", p.report
    q = graphopt.get_pass("prune-channels", ratio=0.5, recover=False)
    graphopt.run_passes(graphopt.from_proto(_scalar_bias_net(1)), [q, "dce"])
    assert "approximate at the padded borders" in q.report["folded"]["c2"], q.report


def test_refit_is_bounded_in_collections_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed by construction (no timing): with calibration data, one activation collection for
    the targets plus at most ``MAX_COLLECTIONS`` for the refit inputs - not one ONNX Runtime
    session per pruned group - and no least-squares refit sees more than ``REFIT_ROWS`` rows,
    however large the feature maps."""
    from passes.compress import channels

    monkeypatch.setattr(channels, "REFIT_ROWS", 300)
    monkeypatch.setattr(channels, "MAX_COLLECTIONS", 2)
    calls, rows = [], []
    real_collect, real_ridge = channels.collect_values, channels._ridge
    monkeypatch.setattr(channels, "collect_values", lambda *a, **k: calls.append(1) or real_collect(*a, **k))
    monkeypatch.setattr(channels, "_ridge", lambda x, *a, **k: rows.append(len(x)) or real_ridge(x, *a, **k))
    m = graphopt.from_proto(_fpn())
    rng = np.random.default_rng(12)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    p = graphopt.get_pass("prune-channels", ratio=0.5)
    graphopt.run_passes(m, [p, "dce"], graphopt.PassContext(calibration=calib))
    assert p.report["groups"] > 3 and p.report["recovered"], p.report
    assert 1 < len(calls) <= 1 + 2, len(calls)
    assert rows and max(rows) <= 300 and min(rows) > 0, rows
