"""TVM backend: compile, run, export/reload, default schedules, tuning cache, RPC, cross builds.

These need the ``tvm`` extra (``pip install ".[test,tvm]"``, what the README's test command and
CI install). Builds are small (the digits CNN, a random-weight squeezenet) so the module takes
about two minutes, most of it in the two tuning runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FIXTURES, light_models, make_model, vi
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import CompileError, InputSpecError
from graphopt.runtime import ort_session

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.backend import compile as tvm_compile
from graphopt.backend import load_compiled, resolve_target

DIGITS = {"input": [1, 1, 8, 8]}


def _ort(model, feed):
    sess = ort_session(model if not isinstance(model, graphopt.Model) else graphopt.to_proto(model))
    return sess.run(None, feed)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from graphopt.cli import example_model_path

    return tvm_compile(example_model_path(), "host", input_shapes=DIGITS, progress=False)


# -- targets ------------------------------------------------------------------------------------


def test_target_presets_and_errors() -> None:
    host = resolve_target("host")
    assert host.config["kind"] == "llvm" and host.config["mcpu"] and host.config["num-cores"] >= 1
    assert resolve_target("x86-64-v3").config["mcpu"] == "x86-64-v3"
    a64 = resolve_target("aarch64")
    assert a64.is_cross and a64.config["mtriple"].startswith("aarch64")
    cu = resolve_target("cuda:sm_90")
    assert cu.device == "cuda" and cu.config["arch"] == "sm_90"
    custom = resolve_target('{"kind": "llvm", "mcpu": "skylake-avx512"}')
    assert custom.config["mcpu"] == "skylake-avx512" and custom.tvm_target().kind.name == "llvm"
    for bad in ("tpu", "cuda:ampere", '{"kind": "llvm"', '{"kind": "metal"}'):
        with pytest.raises(CompileError):
            resolve_target(bad)
    assert resolve_target("host").key() == resolve_target("host").key() != resolve_target("x86-64").key()


# -- compile and run ----------------------------------------------------------------------------


def test_digits_cnn_matches_ort_and_keeps_accuracy(digits) -> None:
    from graphopt.cli import example_model_path

    data = np.load(FIXTURES / "digits_test.npz")
    x, y = data["x"].astype(np.float32), data["y"]
    sess = ort_session(str(example_model_path()))
    hits_tvm = hits_ort = 0
    for i in range(len(x)):
        feed = {"input": x[i:i + 1]}
        got = digits.run(feed)[0]
        ref = sess.run(None, feed)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        hits_tvm += int(got.argmax() == y[i])
        hits_ort += int(ref.argmax() == y[i])
    assert hits_tvm == hits_ort and hits_tvm / len(x) > 0.98
    # the heavy kernels got graphopt's schedules, nothing was left as naive loops
    kinds = set(digits.info.schedules.values())
    assert "naive" not in kinds and "tiled-reduction" in kinds, digits.info.schedules
    assert digits.info.layout == "NHWC"
    bench = digits.benchmark(rounds=5)
    assert bench["median_ms"] > 0


def test_run_reuses_its_input_buffers_safely(digits) -> None:
    """run() copies inputs into tensors kept between calls and hands back copies: earlier
    outputs never change, mutating an output changes nothing, and threads take turns."""
    import threading

    from graphopt.cli import example_model_path

    x = np.load(FIXTURES / "digits_test.npz")["x"].astype(np.float32)[:8]
    refs = [_ort(str(example_model_path()), {"input": x[i:i + 1]})[0] for i in range(len(x))]
    first = digits.run({"input": x[0:1]})[0]
    second = digits.run({"input": x[1:2]})[0]
    np.testing.assert_allclose(first, refs[0], rtol=1e-4, atol=1e-4)  # not overwritten by the second call
    second[:] = 1e9
    np.testing.assert_allclose(digits.run([x[1:2]])[0], refs[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(refs[0], refs[1], rtol=1e-3)  # the samples differ, so a stale buffer would show
    errors: list[str] = []

    def worker(k: int) -> None:
        for r in range(10):
            i = (k + r) % len(x)
            got = digits.run({"input": x[i:i + 1]})[0]
            if not np.allclose(got, refs[i], rtol=1e-4, atol=1e-4):
                errors.append(f"thread {k} sample {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_run_output_that_is_an_input_is_a_copy() -> None:
    """A model whose output is its input: the VM returns the input tensor itself, which run()
    refills on the next call, so the returned array must be a copy."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    cm = tvm_compile(graphopt.from_proto(m), "host", progress=False)
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), -np.ones((2, 3), np.float32)
    out_a = cm.run({"x": a})[0]
    out_b = cm.run({"x": b})[0]
    np.testing.assert_array_equal(out_a, a)
    np.testing.assert_array_equal(out_b, b)


def test_export_and_reload_in_a_fresh_process(digits, tmp_path: Path) -> None:
    out = digits.export(tmp_path / "digits.so")
    assert out.is_file() and Path(str(out) + ".json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    feed = {"input": np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **feed)
    code = (
        "import numpy as np, sys; from graphopt.backend import load_compiled; "
        f"m = load_compiled({str(out)!r}); x = dict(np.load({str(tmp_path / 'in.npz')!r})); "
        f"np.save({str(tmp_path / 'out.npy')!r}, m.run(x)[0]); print(m)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CompiledModel(host" in proc.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), digits.run(feed)[0], rtol=1e-6, atol=1e-6)
    # loaded in this process too, with the signature from the sidecar
    again = load_compiled(out)
    assert [i.name for i in again.inputs] == ["input"] and again.inputs[0].shape == (1, 1, 8, 8)
    with pytest.raises(InputSpecError):
        again.run({"input": np.zeros((2, 1, 8, 8), np.float32)})
    with pytest.raises(InputSpecError):
        again.run({"image": feed["input"]})
    os.unlink(str(out) + ".json")
    with pytest.raises(CompileError, match="json"):
        load_compiled(out)


def test_real_model_squeezenet_default_schedules(tmp_path: Path) -> None:
    from graphopt.testing import randomize_weights

    m = randomize_weights(graphopt.load(next(p for p in light_models() if "squeezenet" in str(p))))
    graphopt.optimize(m)
    cm = tvm_compile(m, "host", progress=False)
    feed = {cm.inputs[0].name: np.random.default_rng(0).standard_normal(cm.inputs[0].shape).astype(np.float32)}
    ref = _ort(m, feed)[0]
    got = cm.run(feed)[0]
    assert got.shape == ref.shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    convs = {k: v for k, v in cm.info.schedules.items() if "conv2d" in k}
    assert len(convs) >= 10 and set(convs.values()) == {"tiled-reduction"}, cm.info.schedules
    # the weight panels were packed at compile time (split out and constant-folded)
    assert "naive" not in cm.info.schedules.values()


def test_naive_build_is_available_and_equal(digits) -> None:
    from graphopt.cli import example_model_path

    naive = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, default_schedules=False, progress=False)
    assert set(naive.info.schedules.values()) == {"naive"}
    feed = {"input": np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(naive.run(feed)[0], digits.run(feed)[0], rtol=1e-5, atol=1e-5)


def _shape_computed_model() -> onnx.ModelProto:
    """Flatten whose target shape is computed at run time (Shape -> Slice -> ReduceProd ->
    Concat -> Reshape), as exporters write it; TVM's frontend rejects it raw."""
    rng = np.random.default_rng(0)
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Slice", ["s", "one", "four", "zero"], ["chw"]),
             helper.make_node("ReduceProd", ["chw"], ["p"], keepdims=1),
             helper.make_node("Slice", ["s", "zero", "one", "zero"], ["b"]),
             helper.make_node("Concat", ["b", "p"], ["shp"], axis=0),
             helper.make_node("Reshape", ["r", "shp"], ["f"]),
             helper.make_node("MatMul", ["f", "G"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])],
                      [("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                       ("G", rng.standard_normal((256, 10)).astype(np.float32)),
                       ("zero", np.array([0])), ("one", np.array([1])), ("four", np.array([4]))], opset=13)


def test_model_tvm_rejects_raw_compiles_after_graphopt() -> None:
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    proto = _shape_computed_model()
    onnx.checker.check_model(proto, full_check=True)
    with pytest.raises(Exception, match="Reshape"):
        mod = from_onnx(proto, shape_dict={"x": [1, 3, 8, 8]}, keep_params_in_input=False)
        with tvm.target.Target({"kind": "llvm"}):
            relax.build(relax.get_pipeline("zero")(mod), tvm.target.Target({"kind": "llvm"}))
    cm = tvm_compile(graphopt.from_proto(proto), "host", input_shapes={"x": [2, 3, 8, 8]}, progress=False)
    feed = {"x": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(cm.run(feed)[0], _ort(proto, feed)[0], rtol=1e-4, atol=1e-4)


def test_bad_input_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.cli import example_model_path

    # dynamic batch without a hint names the input and the dim
    with pytest.raises(CompileError, match=r"input 'input' has dynamic dim 'batch'.*input_shapes=\{'input': \[N, 1, 8, 8\]\}"):
        tvm_compile(example_model_path(), "host")
    # an op TVM's frontend does not convert (here an LSTM lower-recurrent cannot unroll: its
    # sequence lengths are a run-time input) is named with its node and the reason
    from onnx import helper

    lstm = make_model([helper.make_node("LSTM", ["x", "W", "R", "", "lens"], ["y"], hidden_size=4, name="my_lstm")],
                      [vi("x", [2, 1, 3]), vi("lens", [1], onnx.TensorProto.INT32)], [vi("y", [2, 1, 1, 4])],
                      [("W", np.zeros((1, 16, 3), np.float32)), ("R", np.zeros((1, 16, 4), np.float32))])
    with pytest.raises(CompileError, match="my_lstm.*LSTM.*sequence_lens"):
        tvm_compile(graphopt.from_proto(lstm), "host")
    # CUDA without nvcc
    from graphopt.backend import targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    monkeypatch.setattr(targets.os.path, "exists", lambda p: False)
    with pytest.raises(CompileError, match="nvcc"):
        tvm_compile(example_model_path(), "cuda:sm_80", input_shapes=DIGITS)
    # aarch64 shared library without the cross compiler: clear error, .tar still possible
    cm = tvm_compile(example_model_path(), "aarch64", input_shapes=DIGITS, progress=False)
    with pytest.raises(CompileError, match="aarch64-linux-gnu-gcc"):
        cm.export(tmp_path / "m.so")
    assert cm.export(tmp_path / "m.tar").is_file()
    with pytest.raises(Exception, match="cannot run here"):
        cm.run({"input": np.zeros((1, 1, 8, 8), np.float32)})


# -- cross and GPU builds -----------------------------------------------------------------------


def test_aarch64_cross_build(tmp_path: Path) -> None:
    import shutil

    from graphopt.cli import example_model_path

    cm = tvm_compile(example_model_path(), "aarch64", input_shapes=DIGITS, progress=False)
    tar = cm.export(tmp_path / "a64.tar")
    assert tar.stat().st_size > 10_000
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc absent (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    so = cm.export(tmp_path / "a64.so")
    head = so.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_cuda_build_artifact(tmp_path: Path) -> None:
    from graphopt.backend.cuda import compile_cuda_source, nvcc_path
    from graphopt.cli import example_model_path

    if nvcc_path() is None:
        pytest.skip("nvcc absent: CUDA builds need NVIDIA's CUDA toolkit")
    cm = tvm_compile(example_model_path(), "cuda:sm_80", input_shapes=DIGITS, progress=False)
    assert all(v.startswith("dlight:") for v in cm.info.schedules.values()), cm.info.schedules
    so = cm.export(tmp_path / "cuda.so")
    blob = so.read_bytes()
    assert b"__global__" in blob and b"fused_conv2d" in blob  # kernels travel with the library
    src = cm.module.mod.imports[0].imports[0].inspect_source("cuda")
    fatbin = compile_cuda_source(src, "sm_80")  # what loading on a GPU machine does
    assert len(fatbin) > 1000
    # running needs a GPU: benchmarks/tvm_cuda.py ran these builds on an H100


# -- tuning -------------------------------------------------------------------------------------


def test_tuning_interrupted_mid_search_keeps_the_default_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C after MetaSchedule committed a (slow) candidate of the task it searches: that task is
    # cached from then on, so graphopt's measured default must be committed with it, or the
    # cache's best stays the slow candidate
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backend.schedules import default_schedule
    from graphopt.backend.tuning import open_database
    from graphopt.cli import example_model_path

    searched = []

    def slow_record_then_interrupt(**kw):  # type: ignore[no-untyped-def]
        mod, db, tgt = kw["tasks"][0].mod, kw["database"], kw["tasks"][0].target
        searched.append(mod)
        sch, _ = default_schedule(mod["main"], tgt)  # (a record with an empty trace is not a candidate)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(mod), [10.0], tgt, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        raise KeyboardInterrupt

    monkeypatch.setattr(ms.tune, "tune_tasks", slow_record_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tvm_compile(example_model_path(), "host", input_shapes=DIGITS, trials=8, cache_dir=tmp_path, progress=False)
    assert len(searched) == 1
    db = open_database(resolve_target("host"), tmp_path, create=False)
    assert db is not None and db.has_workload(searched[0])
    best = db.get_top_k(db.commit_workload(searched[0]), 1)[0]
    assert max(float(s) for s in best.run_secs) < 1.0, best.run_secs  # graphopt's default, not the 10 s one


def test_tuning_cache_makes_second_compile_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an interrupted run keeps what it finished: stop it (Ctrl-C) when the second task starts
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backend.tuning import open_database
    from graphopt.cli import example_model_path

    real, calls = ms.tune.tune_tasks, []

    def interrupt_second(**kw):  # type: ignore[no-untyped-def]
        calls.append(kw["tasks"][0].task_name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(ms.tune, "tune_tasks", interrupt_second)
    # direct convs: the two heaviest tasks are convs, whose rule has variants (Winograd's transforms have none)
    with pytest.raises(KeyboardInterrupt):
        tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=16, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()  # the real search from here on
    assert len(calls) == 2
    # the heaviest task (tuned before the interruption) is in the cache: a one-task budget is free
    first = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=8, cache_dir=tmp_path,
                        progress=False)
    rep = first.info.tuning
    assert rep["trials"] == 0 and rep["cached"] == 1, rep
    assert "tuned" in first.info.schedules.values()
    db = open_database(resolve_target("host"), tmp_path, create=False)
    # records are on disk: 8 measured candidates plus graphopt's default schedule as a baseline
    assert db is not None and len(db) >= 9, len(db)
    second = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=16, cache_dir=tmp_path,
                         progress=False)  # the interrupted budget: one task cached, one more to tune
    assert second.info.tuning["trials"] == 8 and second.info.tuning["cached"] == 1, second.info.tuning
    third = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=16, cache_dir=tmp_path,
                        progress=False, build_cache=False)  # the tuning database alone, not the build cache
    assert third.info.tuning["trials"] == 0 and third.info.tuning["cached"] == 2, third.info.tuning
    fourth = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=16, cache_dir=tmp_path,
                         progress=False)  # nothing changed since the second compile stored its build
    assert fourth.info.from_build_cache
    feed = {"input": np.random.default_rng(4).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    ref = _ort(onnx.load(str(example_model_path())), feed)[0]
    np.testing.assert_allclose(second.run(feed)[0], ref, rtol=1e-4, atol=1e-4)
    # besides its default schedule, each tuned conv had other settings of graphopt's rule measured
    # (register tiles, loop order): more records than tasks, all in the database
    assert second.info.tuning["variant_records"] > 1, second.info.tuning
    with pytest.raises(CompileError):
        tvm_compile(example_model_path(), "host", input_shapes=DIGITS, winograd=False, trials=-1, cache_dir=tmp_path)


def test_threads_tunes_with_that_many_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile(threads=1)``: the target's num-cores is 1, every tuning candidate is timed on a
    1-worker pool (a schedule that wins on two cores can lose on one), and the records are kept
    apart from the all-core target's."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.support.popen_pool import PopenPoolExecutor

    from graphopt.backend.targets import host_cores
    from graphopt.backend.tuning import cache_path
    from graphopt.cli import example_model_path

    if host_cores() < 2:
        pytest.skip("one core: every build already runs on one thread")
    runners: list[dict] = []
    real_runner = ms.runner.LocalRunner

    def local_runner(**kw):  # type: ignore[no-untyped-def]
        runners.append(kw)
        return real_runner(**kw)

    monkeypatch.setattr(ms.runner, "LocalRunner", local_runner)
    monkeypatch.setattr(ms.tune, "tune_tasks", lambda **kw: None)  # graphopt's candidates only: fast
    cm = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, trials=8, cache_dir=tmp_path, progress=False,
                     threads=1)
    assert cm.info.target_config["num-cores"] == 1 and cm.info.tuning["threads"] == 1, cm.info.tuning
    assert cm.info.tuning["variant_records"] >= 1  # candidates were measured through that runner
    init = runners[-1]["initializer"]
    assert init is not None

    def pool_size() -> int:
        import tvm

        return int(tvm.get_global_func("runtime.NumThreads")())

    for initializer, want in ((None, host_cores()), (init, 1)):  # what a runner worker's pool holds
        pool = PopenPoolExecutor(max_workers=1, initializer=initializer)
        assert pool.submit(pool_size).result() == want
    one = cache_path(resolve_target(cm.info.target_config), tmp_path)
    assert one != cache_path(resolve_target("host"), tmp_path) and (one / "database_tuning_record.json").is_file()
    feed = {"input": np.random.default_rng(5).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    ref = _ort(onnx.load(str(example_model_path())), feed)[0]
    np.testing.assert_allclose(cm.run(feed)[0], ref, rtol=1e-4, atol=1e-4)
    # the all-core compile does not change its pool
    tvm_compile(example_model_path(), "host", input_shapes=DIGITS, trials=8, cache_dir=tmp_path, progress=False,
                build_cache=False)
    assert runners[-1]["initializer"] is None
    assert tvm_compile(example_model_path(), "host", input_shapes=DIGITS, threads=np.int64(1), progress=False,
                       cache_dir=tmp_path).info.target_config["num-cores"] == 1  # numpy integers are integers
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(CompileError, match="threads"):
            tvm_compile(example_model_path(), "host", input_shapes=DIGITS, threads=bad, progress=False)
    with pytest.raises(CompileError, match="not a CPU"):
        tvm_compile(example_model_path(), "cuda", input_shapes=DIGITS, threads=1, progress=False)


def test_cli_compile_threads_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import example_model_path, main

    out = tmp_path / "m.so"
    with pytest.raises(SystemExit) as e:
        main(["compile", str(example_model_path()), "-o", str(out), "--threads", "0"])
    assert e.value.code == 2 and "below 1" in capsys.readouterr().err
    assert main(["compile", str(example_model_path()), "-o", str(out), "--target", "cuda", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a CPU" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_cache_makes_recompiling_a_load(tmp_path: Path) -> None:
    """The same model, target and options compile once; the second compile loads the cached
    library (no import/lower/build), gives the same outputs and exports like a fresh build. A
    different option, or a tuning record added to the database, is a different build."""
    from graphopt.cli import example_model_path

    first = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, cache_dir=tmp_path, progress=False)
    assert not first.info.from_build_cache
    second = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, cache_dir=tmp_path, progress=False)
    assert second.info.from_build_cache and "import_lower_s" not in second.info.times
    x = {"input": np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(first.run(x)[0], second.run(x)[0])
    out = second.export(tmp_path / "again.so")
    np.testing.assert_array_equal(load_compiled(out).run(x)[0], first.run(x)[0])
    naive = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, cache_dir=tmp_path, progress=False,
                        default_schedules=False)
    assert not naive.info.from_build_cache
    db = tmp_path / resolve_target("host").key() / "database_workload.json"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text(db.read_text() + "\n" if db.exists() else "\n")  # the database changed
    third = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, cache_dir=tmp_path, progress=False)
    assert not third.info.from_build_cache
    off = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, cache_dir=tmp_path, progress=False,
                      build_cache=False)
    assert not off.info.from_build_cache


def test_grouped_conv_widths_padded_to_whole_vectors() -> None:
    """ShuffleNet-style grouped 1x1 convs with 34-wide groups: the compile pads each group to
    whole vectors (exact: zero filters, sliced off again) and the build matches ORT."""
    def pad_group_widths(m, lanes):
        p = graphopt.get_pass("pad-group-widths", lanes=lanes)
        graphopt.run_passes(m, [p])
        return p.report["padded_convs"]

    rng = np.random.default_rng(5)
    w = rng.standard_normal((136, 34, 1, 1)).astype(np.float32) * 0.2
    b = rng.standard_normal(136).astype(np.float32)
    mp = make_model([onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], group=4, name="gconv"),
                     onnx.helper.make_node("Relu", ["c"], ["y"])],
                    [vi("x", [1, 136, 14, 14])], [vi("y", [1, 136, 14, 14])], inits=[("w", w), ("b", b)])
    feed = {"x": rng.standard_normal((1, 136, 14, 14)).astype(np.float32)}
    for opset in (9, 17):  # Slice-1 takes its bounds as attributes
        mp_o = make_model(list(mp.graph.node), list(mp.graph.input), list(mp.graph.output),
                          inits=[("w", w), ("b", b)], opset=opset)
        m = graphopt.from_proto(mp_o)
        assert pad_group_widths(m, 16) == 1
        conv = next(n for n in m.graph if n.op_type == "Conv")
        assert conv.input(1).const_value().shape == (4 * 48, 34, 1, 1) and conv.attr("group") == 4
        onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
        np.testing.assert_allclose(graphopt.run_ort(m, feed)["y"], _ort(mp, feed)[0], rtol=1e-5, atol=1e-5)
    # a plain conv with 1000 outputs (SqueezeNet's classifier): 8-lane -> 1008 channels, 16-lane
    w2 = rng.standard_normal((1000, 8, 1, 1)).astype(np.float32)
    m2 = graphopt.from_proto(make_model([onnx.helper.make_node("Conv", ["x", "w"], ["y"])], [vi("x", [1, 8, 3, 3])],
                                        [vi("y", [1, 1000, 3, 3])], inits=[("w", w2)]))
    assert pad_group_widths(m2, 16) == 1
    assert next(n for n in m2.graph if n.op_type == "Conv").input(1).const_value().shape[0] == 1008
    assert pad_group_widths(graphopt.from_proto(mp), 2) == 0  # 34 is already whole 2-lane vectors
    cm = tvm_compile(graphopt.from_proto(mp), "host", progress=False, build_cache=False)
    assert cm.info.rewrites == {"padded_convs": 1}
    np.testing.assert_allclose(cm.run(feed)[0], _ort(mp, feed)[0], rtol=1e-4, atol=1e-4)


def test_private_memory_hazards_in_cuda_source() -> None:
    """The lint flags a thread-private array indexed by thread (directly or through a variable
    computed from threadIdx/blockIdx), and leaves loop-indexed private arrays and shared
    arrays alone."""
    from graphopt.backend.gpucheck import kernel_function, private_memory_hazards

    src = """
extern "C" __global__ void __launch_bounds__(224) f_kernel(float* __restrict__ y, float* __restrict__ x) {
  alignas(64) float acc[12];
  alignas(64) float out_local[168];
  __shared__ alignas(64) float red_buf0[224];
  for (int i = 0; i < 12; ++i) { acc[i] = x[i * 14 + ((int)threadIdx.x)]; }
  red_buf0[((int)threadIdx.x) * 16] = acc[0];
  for (int j = 0; j < 12; ++j) { out_local[j * 14 + ((int)threadIdx.x)] = red_buf0[j]; }
  y[((int)threadIdx.x)] = out_local[((int)threadIdx.x) * 12];
}
extern "C" __global__ void g_kernel(float* __restrict__ y) {
  float t[4];
  int cse_v1 = (((int)blockIdx.x) / 14);
  int k = 3;
  t[k] = 1.0f;
  t[cse_v1 % 4] = 2.0f;
  y[0] = t[0];
}
extern "C" __global__ void h_kernel_1(float* __restrict__ y) {
  float t[4];
  for (int i = 0; i < 4; ++i) { t[i] = y[i + ((int)threadIdx.x) * 4]; }
  y[((int)threadIdx.x)] = t[3];
}
"""
    assert private_memory_hazards(src) == {"f_kernel": ["out_local"], "g_kernel": ["t"]}
    assert kernel_function("h_kernel_1", ["h", "hh", "f"]) == "h" and kernel_function("zz_kernel", ["h"]) is None


def _grouped_shuffle_model() -> onnx.ModelProto:
    """ShuffleNet's unit in small: group-4 1x1 conv, channel shuffle, depthwise 3x3, group-4 1x1."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((48, 6, 1, 1)).astype(np.float32) * 0.3
    wd = rng.standard_normal((48, 1, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((24, 12, 1, 1)).astype(np.float32) * 0.3
    b1, b2 = rng.standard_normal(48).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    h = onnx.helper
    return make_model([h.make_node("Conv", ["x", "w1", "b1"], ["c1"], group=4, name="gconv1"),
                       h.make_node("Relu", ["c1"], ["r1"]),
                       h.make_node("Reshape", ["r1", "s1"], ["g"]),
                       h.make_node("Transpose", ["g"], ["gt"], perm=[0, 2, 1, 3, 4]),
                       h.make_node("Reshape", ["gt", "s2"], ["sh"]),
                       h.make_node("Conv", ["sh", "wd"], ["d"], group=48, pads=[1] * 4, name="dw"),
                       h.make_node("Conv", ["d", "w2", "b2"], ["c2"], group=4, name="gconv2"),
                       h.make_node("Add", ["c2", "x"], ["y"])],
                      [vi("x", [1, 24, 14, 14])], [vi("y", [1, 24, 14, 14])],
                      inits=[("w1", w1), ("b1", b1), ("wd", wd), ("w2", w2), ("b2", b2),
                             ("s1", np.array([1, 4, 12, 14, 14], np.int64)), ("s2", np.array([1, 48, 14, 14], np.int64))])


def test_cuda_build_free_of_private_memory_hazards_and_right_on_cpu() -> None:
    """TVM's DLight Reduction rule schedules a grouped 1x1 conv with a thread-private buffer that
    threads share (it computed ShuffleNet wrongly on an H100). graphopt's CUDA build finds such
    kernels in the generated CUDA C and schedules them again by the next rule; the kernels'
    loop nests, run serially on the CPU, equal ONNX Runtime."""
    from graphopt.backend.cuda import nvcc_path
    from graphopt.backend.gpucheck import cuda_sources, private_memory_hazards, run_on_cpu

    if nvcc_path() is None:
        pytest.skip("nvcc absent: CUDA builds need NVIDIA's CUDA toolkit")
    mp = _grouped_shuffle_model()
    cm = tvm_compile(graphopt.from_proto(mp), "cuda:sm_80", progress=False)
    assert cm.info.rewrites.get("rescheduled_gpu_kernels", 0) >= 1, cm.info
    assert "dlight:Reduction" not in {cm.info.schedules[k] for k in cm.info.schedules if "conv2d" in k}
    assert private_memory_hazards(cuda_sources(cm.module)) == {}
    feed = {"x": np.random.default_rng(1).standard_normal((1, 24, 14, 14)).astype(np.float32)}
    np.testing.assert_allclose(run_on_cpu(cm, feed)[0], _ort(mp, feed)[0], rtol=1e-4, atol=1e-4)


def test_tvm_thread_pool_uses_every_physical_core() -> None:
    """TVM halves the hardware threads on x86 (one thread on a 2-vCPU machine); importing
    graphopt.backend sizes the pool to the physical cores, unless the user set TVM_NUM_THREADS."""
    from graphopt.backend.targets import host_cores

    code = ("import graphopt.backend, tvm; "
            "print(tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == host_cores()
    env["TVM_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert int(out.stdout.split()[-1]) == 1  # the user's choice wins


def test_rpc_tuning_on_loopback(tmp_path: Path) -> None:
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (in the tvm extra)")
    from graphopt.cli import example_model_path

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        time.sleep(3)
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                   "--key", "loopback", "--host", "127.0.0.1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from tvm import rpc

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                summary = rpc.connect_tracker("127.0.0.1", port).summary()
                if any(q.get("free", 0) for k, q in summary["queue_info"].items() if k == "loopback"):
                    break
            except Exception:  # noqa: BLE001 - tracker still starting
                pass
            time.sleep(1)
        cm = tvm_compile(example_model_path(), "host", input_shapes=DIGITS, trials=8, cache_dir=tmp_path,
                         rpc=f"127.0.0.1:{port}:loopback", progress=False)
        # one task searched (Winograd's transforms get graphopt's measured schedule, unsearched)
        rep = cm.info.tuning
        assert len(set(rep["tuned"]) - set(rep["not_searched"])) == 1, rep
        logs = "".join(p.read_text() for p in (tmp_path).rglob("*.log"))
        assert "GFLOPs" in logs  # candidates were measured (through the RPC server)
    finally:
        for p in (server, tracker):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    with pytest.raises(CompileError, match="bad rpc 'localhost:port'"):
        tvm_compile(example_model_path(), "host", input_shapes=DIGITS, trials=8, rpc="localhost:port")


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_compile_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import example_model_path, main

    out = tmp_path / "m.so"
    assert main(["compile", "--example", "-o", str(out), "--input-shape", "input:1,1,8,8", "-q"]) == 0
    assert out.is_file() and "tiled-reduction" in capsys.readouterr().out
    assert main(["bench", str(example_model_path()), "--compiled", str(out), "--rounds", "5"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "ratio vs ORT" in text and "(ok)" in text
    assert "TVM host, 2 threads" in text and "±" in text  # both runtimes' thread count, the ratio's spread


def test_cli_bench_runs_tvm_on_the_threads_given(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench --threads 1`` times TVM on a pool of 1 thread, like ORT (TVM's pool is its own
    setting: before, a 1-thread library ran on every core next to a 1-thread ORT), and puts the
    pool back to TVM's default afterwards."""
    from graphopt.cli import example_model_path, main

    out = tmp_path / "m.so"
    assert main(["compile", "--example", "-o", str(out), "--input-shape", "input:1,1,8,8", "-q", "--threads", "1"]) == 0
    capsys.readouterr()
    calls: list[tuple[int, int]] = []
    real = tvm.get_global_func

    def get_global_func(name: str, *a, **k):  # type: ignore[no-untyped-def]
        f = real(name, *a, **k)
        if name != "runtime.config_threadpool":
            return f
        return lambda mode, n: (calls.append((mode, n)), f(mode, n))[1]

    monkeypatch.setattr(tvm, "get_global_func", get_global_func)
    assert main(["bench", str(example_model_path()), "--compiled", str(out), "--rounds", "3", "--threads", "1"]) == 0
    assert calls == [(1, 1), (1, 0)], calls
    assert "TVM host, 1 thread (" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
def test_cli_bench_of_a_cross_build_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Loading an aarch64 library on x86 fails in the dynamic loader with "no such file", which
    misleads: the error names the cross build's target instead."""
    from graphopt.cli import example_model_path, main

    out = tmp_path / "arm.so"
    assert main(["compile", "--example", "-o", str(out), "--input-shape", "input:1,1,8,8", "-q",
                 "--target", "aarch64"]) == 0
    capsys.readouterr()
    assert main(["bench", str(example_model_path()), "--compiled", str(out), "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cross build for aarch64" in err[0] and "No such file" not in err[0], err
    for argv, msg in (
        (["compile", "--example", "-o", str(out), "--target", "tpu"], "unknown target"),
        (["compile", str(example_model_path()), "-o", str(out)], "dynamic dim"),  # --example defaults batch 1
        (["compile", "--example", "-o", str(tmp_path / "m.bin"), "--input-shape", "input:1,1,8,8"], ".so"),
        (["compile", "--example", "-o", str(out), "--input-shape", "input:1,1,8,8", "--rpc", "nohost"], "--rpc"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("graphopt: error:") and msg in err[0], err


def test_sum_to_add_is_exact() -> None:
    from onnx import helper

    rng = np.random.default_rng(5)
    proto = make_model([helper.make_node("Sum", ["a", "b"], ["s"]), helper.make_node("Sum", ["s", "a", "c"], ["y"])],
                       [vi("a", [2, 3]), vi("b", [2, 3]), vi("c", [1, 3])], [vi("y", [2, 3])])
    m = graphopt.from_proto(proto)
    graphopt.run_passes(m, [graphopt.get_pass("sum-to-add")])
    ops = [n.op_type for n in m.graph]
    assert ops.count("Sum") == 1 and ops.count("Add") == 1  # only 2-input Sums by default
    graphopt.run_passes(m, [graphopt.get_pass("sum-to-add", max_inputs=8)])
    assert [n.op_type for n in m.graph] == ["Add", "Add", "Add"]
    onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("a", (2, 3)), ("b", (2, 3)), ("c", (1, 3)))}
    np.testing.assert_allclose(_ort(m, feed)[0], _ort(proto, feed)[0], rtol=1e-6, atol=1e-6)
    assert m.graph.outputs[0].name == "y"
