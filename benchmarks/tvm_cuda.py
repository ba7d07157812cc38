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


if __name__ == "__main__":
    arch = sys.argv[sys.argv.index("--arch") + 1] if "--arch" in sys.argv else "sm_90"
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        check(arch)
        sys.exit(0)
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), arch)
    else:
        run(Path(sys.argv[2]))
