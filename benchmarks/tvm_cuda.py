"""CUDA builds with graphopt's TVM backend: compile here, run on a machine with an NVIDIA GPU.

  python benchmarks/tvm_cuda.py build OUTDIR [--arch sm_90]   # here (needs the tvm extra + nvcc)
  python benchmarks/tvm_cuda.py run OUTDIR                     # on the GPU machine
  python benchmarks/tvm_cuda.py check [--arch sm_90]          # here: every light model, no GPU

``build`` compiles the digits CNN and random-weight light squeezenet/shufflenet for CUDA (DLight
default GPU schedules), exports ``.so`` libraries with their sidecars, and stores the inputs and
ONNX Runtime (CPU) reference outputs. It also checks each build without a GPU
(:mod:`graphopt.backend.gpucheck`): no private-memory hazards in the CUDA C, and the kernels run
serially on the CPU equal ORT. ``run`` needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``
works without the compiler library) and numpy: it loads each library on ``cuda(0)``, checks the
outputs against the references and times it; it prints a table and writes ``results.json``.
``check`` builds all of the onnx package's light models for CUDA here and checks each build
without a GPU (private-memory hazards in the CUDA C; kernels run serially on the CPU vs ORT);
it writes ``benchmarks/results/tvm_cuda_check.json``.

``check --corpus [NAMES]`` does the same for the real-model corpus (``benchmarks.corpus``; all
of it, smallest file first, or the comma-separated NAMES): each model is built for CUDA at the
realistic input shape ``benchmarks.tvm_realworld`` uses (scalar inputs such as silero's sample
rate pinned as ``const_inputs``), checked for private-memory hazards, and its kernels run serially
on the CPU on one realistic sample, compared with ONNX Runtime by graphopt's lossless check
(:func:`graphopt.runtime.compare`). Each model runs in a subprocess under ``--timeout`` seconds
(default 600): a model over it is recorded as not run, with the reason. A model graphopt refuses
is recorded with its one-line refusal. It writes ``benchmarks/results/tvm_cuda_check_corpus.json``
and ``.md`` (merged by model unless ``--fresh``). No GPU is used, so no GPU latency is measured.

  python -m benchmarks.tvm_cuda check --corpus [NAMES] [--arch sm_90] [--timeout 600] [--fresh]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _check_without_gpu(cm, m, feed: dict) -> tuple[int, float, list]:  # type: ignore[no-untyped-def]
    """For a CUDA build ``cm`` of ``m``: the kernels with private-memory hazards in its CUDA C,
    the max relative error of its kernels run serially on the CPU against ORT, and ORT's
    outputs (``feed`` is keyed by the build's input names; ORT gets them in order)."""
    from graphopt.backend.gpucheck import cuda_sources, private_memory_hazards, run_on_cpu
    from graphopt.runtime import ort_session

    names = [v.name for v in m.graph.inputs if v.const is None]
    ref = ort_session(m, optimize=True).run(None, {n: feed[i.name] for n, i in zip(names, cm.inputs, strict=True)})
    got = run_on_cpu(cm, feed)[0]
    rel = float(np.abs(got - ref[0]).max() / max(float(np.abs(ref[0]).max()), 1e-12))
    return len(private_memory_hazards(cuda_sources(cm.module))), rel, ref


def build(out: Path, arch: str) -> None:
    import graphopt
    from graphopt.backend import compile as tvm_compile
    from graphopt.testing import logits_outputs, randomize_weights

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import light_models

    out.mkdir(parents=True, exist_ok=True)
    models = {"digits_cnn": (graphopt.load(Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"),
                             {"input": [1, 1, 8, 8]})}
    for name in ("squeezenet", "shufflenet"):
        p = next(x for x in light_models() if name in str(x))
        models[name] = (logits_outputs(graphopt.optimize(randomize_weights(graphopt.load(p)))), None)
    for name, (m, shapes) in models.items():
        t = time.perf_counter()
        cm = tvm_compile(m, f"cuda:{arch}", input_shapes=shapes, progress=False)
        cm.export(out / f"{name}.so")
        built = time.perf_counter() - t
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(i.dtype) for i in cm.inputs}
        hazards, rel, ref = _check_without_gpu(cm, m, feed)
        np.savez(out / f"{name}.npz", **{f"in_{k}": v for k, v in feed.items()},
                 **{f"out_{i}": r for i, r in enumerate(ref)})
        print(f"{name}: built in {built:.1f} s; {cm.info.rewrites.get('rescheduled_gpu_kernels', 0)} kernels "
              f"rescheduled; private-memory hazards {hazards}; serial run on the CPU vs ORT: "
              f"max relative error {rel:.1e}")


def run(out: Path) -> None:
    import os

    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import ctypes

    import tvm
    from tvm import runtime

    # the runtime-only import does not load the CUDA runtime module; load it (its libcudart
    # must be on LD_LIBRARY_PATH)
    cuda_rt = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if cuda_rt.is_file():
        ctypes.CDLL(str(cuda_rt), mode=ctypes.RTLD_GLOBAL)
    import importlib.util

    # graphopt's nvcc hook, loaded by path: the GPU machine needs no graphopt install
    spec = importlib.util.spec_from_file_location(
        "graphopt_cuda", Path(__file__).resolve().parents[1] / "graphopt" / "backend" / "cuda.py")
    gcuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gcuda)
    dev = tvm.cuda(0)
    if not dev.exist:
        sys.exit("no CUDA device visible to TVM's runtime")
    rows = []
    for so in sorted(out.glob("*.so")):
        meta = json.loads(Path(str(so) + ".json").read_text())
        gcuda.install_load_hook(meta["target_config"].get("arch", "sm_90"))
        data = np.load(so.with_suffix(".npz"))
        t = time.perf_counter()
        lib = runtime.load_module(str(so))
        load_s = time.perf_counter() - t
        from tvm.runtime.vm import VirtualMachine

        vm = VirtualMachine(lib, dev)
        args = [runtime.tensor(data[f"in_{i['name']}"], dev) for i in meta["inputs"]]
        res = vm["main"](*args)
        outs = [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]
        ref = data["out_0"]
        err = float(np.abs(outs[0] - ref).max())
        top1 = bool(np.argmax(outs[0]) == np.argmax(ref))
        scale = float(np.abs(ref).max())
        fe = vm.time_evaluator("main", dev, number=20, repeat=5)
        ms = float(np.median(fe(*args).results)) * 1e3
        rows.append({"model": so.stem, "target": meta["target"], "median_ms": ms, "max_abs_err": err,
                     "ref_max": scale, "top1_equal": top1, "load_s": load_s})
        print(f"{so.stem:12s} {meta['target']:12s} {ms:8.3f} ms  max|err| {err:.2e} (|ref| {scale:.2e}) top-1 {'=' if top1 else 'DIFFERS'}"
              f"  load+nvcc {load_s:.1f} s")
    (out / "results.json").write_text(json.dumps({"device": str(dev), "rows": rows}, indent=1))


def check(arch: str) -> None:
    import graphopt
    from graphopt.backend import compile as tvm_compile
    from graphopt.testing import logits_outputs, randomize_weights

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import light_models

    rows = []
    print("| model | build s | kernels | rescheduled | hazards | serial CPU run vs ORT (max rel. error) |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in light_models():
        m = logits_outputs(graphopt.optimize(randomize_weights(graphopt.load(p))))
        t = time.perf_counter()
        cm = tvm_compile(m, f"cuda:{arch}", progress=False)
        built = time.perf_counter() - t
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(i.dtype) for i in cm.inputs}
        hazards, rel, _ = _check_without_gpu(cm, m, feed)
        rows.append({"model": p.stem, "build_s": built, "kernels": len(cm.info.schedules),
                     "rescheduled": cm.info.rewrites.get("rescheduled_gpu_kernels", 0), "hazards": hazards,
                     "max_rel_err": rel})
        print(f"| {p.stem} | {built:.1f} | {len(cm.info.schedules)} | {rows[-1]['rescheduled']} | {hazards} | "
              f"{rel:.1e} |", flush=True)
    out = Path(__file__).resolve().parent / "results" / "tvm_cuda_check.json"
    out.write_text(json.dumps({"arch": arch, "rows": rows}, indent=1) + "\n")


def check_corpus_one(name: str, arch: str) -> dict:
    """The CUDA build of corpus model ``name`` checked without a GPU (see the module docstring)."""
    from benchmarks.tvm_realworld import corpus_feeds
    from graphopt.backend import compile as tvm_compile
    from graphopt.backend.gpucheck import cuda_sources, private_memory_hazards, run_on_cpu
    from graphopt.errors import GraphoptError
    from graphopt.runtime import compare, ort_session

    path, (feed,), const, shapes = corpus_feeds(name, 1)
    res: dict = {"model": name, "inputs": {k: list(v.shape) for k, v in feed.items()},
                 "const_inputs": {k: np.asarray(v).tolist() for k, v in const.items()}}
    t = time.perf_counter()
    try:
        cm = tvm_compile(str(path), f"cuda:{arch}", input_shapes=shapes, const_inputs=const or None,
                         build_cache=False, progress=False)
    except GraphoptError as exc:
        res.update(build="refused", error=str(exc).splitlines()[0], build_s=time.perf_counter() - t)
        return res
    res.update(build="ok", build_s=time.perf_counter() - t, kernels=len(cm.info.schedules),
               rescheduled=cm.info.rewrites.get("rescheduled_gpu_kernels", 0))
    hazards = private_memory_hazards(cuda_sources(cm.module))
    res["hazards"] = len(hazards)
    res["hazard_kernels"] = sorted(hazards)[:5]
    sess = ort_session(str(path), optimize=True)
    out_names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(out_names, sess.run(None, feed), strict=True))
    t = time.perf_counter()
    got = dict(zip(out_names, run_on_cpu(cm, feed), strict=True))
    res["serial_s"] = time.perf_counter() - t
    c = compare(ref, got)
    worst = 0.0
    for k in out_names:
        a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        if a.shape == b.shape and a.size:
            worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12)))
    res.update(equal=bool(c.ok), max_err_of_range=worst)
    if c.problems:
        res["problems"] = c.problems[:2]
    return res


def _corpus_subprocess(name: str, arch: str, timeout: float) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="graphopt-cudacheck-") as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "benchmarks.tvm_cuda", "check-one", name, str(out), "--arch", arch]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                               timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"model": name, "build": "not run", "wall_s": time.perf_counter() - t,
                    "error": f"over the {timeout:.0f} s wall-clock limit per model (CUDA build, CPU build of "
                             "the serialized kernels and their serial run together)"}
        if p.returncode != 0 or not out.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"model": name, "build": "failure", "error": tail[0][:300], "wall_s": time.perf_counter() - t}
        r = json.loads(out.read_text())
        r["wall_s"] = time.perf_counter() - t
        return r


def _corpus_markdown(res: dict) -> str:
    lines = [
        "# CUDA builds of the real-model corpus, checked without a GPU",
        "",
        (f"Generated {res['generated']}: `{res['command']}` (target cuda:{res['arch']}). No GPU was used: no "
        "GPU latency here. Each build's CUDA C is scanned for private-memory hazards (a thread-private "
        "array indexed by a thread- or block-dependent subscript), and its kernels run serially on the CPU "
        "(`graphopt.backend.gpucheck.run_on_cpu`) on one realistic sample (`benchmarks/corpus/data.py`, "
        "shapes as `benchmarks.tvm_realworld`), compared with ONNX Runtime (CPU, ENABLE_ALL) by "
        "`graphopt.runtime.compare` (rtol 1e-4 elementwise, or 3e-4 of the output's range). err = worst "
        "|serial CUDA kernels - ORT| / max|ORT| over the outputs. The machine was shared and loaded while "
         "this ran: build and serial-run seconds are indicative only (serial run s includes the "
         "LLVM build of the serialized kernels)."),
        "",
        "| model | inputs | build | equal (err of range) | kernels | rescheduled | hazards | build s | serial run s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in res["order"]:
        r = res["models"].get(name, {"model": name, "build": "not run", "error": "(the run was stopped before it)"})
        shp = "; ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in r.get("inputs", {}).items())
        if r.get("build") != "ok":
            err = str(r.get("error", "")).replace("|", "\\|")
            secs = f"{r['build_s']:.0f}" if "build_s" in r else ""
            lines.append(f"| {name} | {shp} | {r.get('build')}: {err} | | | | | {secs} | |")
            continue
        eq = "equal" if r.get("equal") else "DIFFERS"
        lines.append(f"| {name} | {shp} | ok | {eq} ({r['max_err_of_range']:.1e}) | {r['kernels']} | "
                     f"{r['rescheduled']} | {r['hazards']} | {r['build_s']:.0f} | {r['serial_s']:.1f} |")
    return "\n".join(lines) + "\n"


def check_corpus(names: list[str] | None, arch: str, timeout: float, fresh: bool) -> None:
    """Run :func:`check_corpus_one` for each corpus model (smallest file first) in a subprocess
    and merge the rows into ``results/tvm_cuda_check_corpus.{json,md}``."""
    import datetime as _dt

    from benchmarks.corpus import ENTRIES, fetch, model_path

    wanted = [e.name for e in ENTRIES if not names or e.name in names]
    unknown = sorted(set(names or ()) - set(wanted))
    if unknown:
        sys.exit(f"unknown corpus models: {unknown}")
    fetch(wanted)
    wanted.sort(key=lambda n: model_path(n).stat().st_size)
    out = Path(__file__).resolve().parent / "results" / "tvm_cuda_check_corpus.json"
    res = json.loads(out.read_text()) if out.exists() and not fresh else {"models": {}}
    order = sorted(set(res.get("order", [])) | set(wanted), key=lambda n: model_path(n).stat().st_size)
    res.update(arch=arch, order=order, command="python -m benchmarks.tvm_cuda " + " ".join(sys.argv[1:]),
               generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    for name in wanted:
        r = _corpus_subprocess(name, arch, timeout)
        res["models"][name] = r
        if r.get("build") == "ok":
            print(f"{name}: {'equal' if r['equal'] else 'DIFFERS'} err {r['max_err_of_range']:.1e}, "
                  f"{r['kernels']} kernels, {r['rescheduled']} rescheduled, {r['hazards']} hazards, "
                  f"build {r['build_s']:.0f} s, serial run {r['serial_s']:.1f} s", flush=True)
        else:
            print(f"{name}: {r.get('build')}: {r.get('error')}", flush=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(_corpus_markdown(res))


if __name__ == "__main__":
    arch = sys.argv[sys.argv.index("--arch") + 1] if "--arch" in sys.argv else "sm_90"
    if len(sys.argv) >= 4 and sys.argv[1] == "check-one":
        Path(sys.argv[3]).write_text(json.dumps(check_corpus_one(sys.argv[2], arch)))
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == "check" and "--corpus" in sys.argv:
        i = sys.argv.index("--corpus")
        arg = sys.argv[i + 1] if i + 1 < len(sys.argv) and not sys.argv[i + 1].startswith("--") else ""
        timeout = float(sys.argv[sys.argv.index("--timeout") + 1]) if "--timeout" in sys.argv else 600.0
        check_corpus([n for n in arg.split(",") if n] or None, arch, timeout, "--fresh" in sys.argv)
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        check(arch)
        sys.exit(0)
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), arch)
    else:
        run(Path(sys.argv[2]))
