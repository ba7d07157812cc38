"""aarch64 integer INT8 kernels on Arm ``sdot`` (graphopt.backend.int8_arm).

* Cross builds (no Arm machine needed, only LLVM's AArch64 backend, which the PyPI TVM wheel
  has): a QDQ conv net and MLP built for ``aarch64-dotprod`` run their conv2d/matmul as int8 x
  int8 -> int32 kernels scheduled by ``int8-arm-dot``, and the assembly accumulates int32 lanes
  with ``sdot vD.4s, vA.16b, vB.16b``; plain ``aarch64`` (no dotprod) keeps float kernels.
* The arithmetic the Arm kernels use (uint8 activations shifted by -128, the zero point with
  them, ``(zx - 128) * sum(w)`` subtracted) checked natively on this machine: the same Relax
  rewrite built for the host (int32 kernels without a dot product) within one quantization step
  of ORT's integer result.
* Executed on aarch64: the exported libraries run under QEMU user-mode emulation with an aarch64
  Python (``python -m benchmarks.tvm_int8_arm --setup`` makes one); skipped where they are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")

from benchmarks import tvm_int8_arm as arm
from graphopt.backend import compile as tvm_compile
from graphopt.backend.int8_arm import has_arm_dot, int8_activation_dtype
from graphopt.backend.targets import resolve_target
from graphopt.runtime import ort_session


def _aarch64_llvm() -> bool:
    from tvm.target import codegen

    try:
        return "aarch64" in list(codegen.llvm_get_targets())
    except Exception:  # noqa: BLE001 - an LLVM too old to list its targets
        return False


needs_aarch64_llvm = pytest.mark.skipif(not _aarch64_llvm(), reason="TVM's LLVM has no AArch64 backend")


def _case(name: str) -> arm.Case:
    return next(c for c in arm.cases() if c.name == name)


def _kernel_dtypes(cm, kind: str) -> list[set[str]]:
    """Per PrimFunc whose name says ``kind`` (conv2d/matmul): the dtypes of its parameters'
    buffers (read from its signature in the built TIR)."""
    import re

    from tvm import tirx

    out = []
    for gv, f in cm.ir_module.functions_items():
        if isinstance(f, tirx.PrimFunc) and kind in gv.name_hint:
            text = f.script()
            start = text.index("def ")
            signature = text[start:text.index("):\n", start)]
            out.append(set(re.findall(r'\), "(\w+)"\)', signature)))
    return out


def test_aarch64_dotprod_target() -> None:
    spec = resolve_target("aarch64-dotprod")
    assert spec.is_cross and spec.config["mtriple"] == "aarch64-linux-gnu"
    assert "+dotprod" in spec.config["mattr"]
    if _aarch64_llvm():
        assert has_arm_dot(spec.tvm_target()) and int8_activation_dtype(spec.tvm_target()) == "int8"
        assert not has_arm_dot(resolve_target("aarch64").tvm_target())  # plain Armv8.0: no sdot
        assert has_arm_dot(resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                           "mcpu": "cortex-a76"}).tvm_target())
    assert not has_arm_dot(resolve_target("x86-64-v4").tvm_target())


@needs_aarch64_llvm
@pytest.mark.parametrize("name", ["conv_u8s8", "conv_silu_u8s8", "mlp_u8s8"])
def test_cross_build_runs_integer_kernels_on_sdot(tmp_path: Path, name: str) -> None:
    case = _case(name)
    qdq, _ = arm.quantize(case, tmp_path)
    cm = tvm_compile(str(qdq), target="aarch64-dotprod", build_cache=False, progress=False)
    kind = "conv2d" if name.startswith("conv") else "matmul"
    for k, v in case.expect.items():
        if k.startswith("int8_"):
            assert cm.info.rewrites.get(k) == v, cm.info.rewrites
    assert "float_kept" not in cm.info.rewrites
    assert sum(v == "int8-arm-dot" for v in cm.info.schedules.values()) == case.expect["int8-arm-dot"], \
        cm.info.schedules
    # the integer kernels read int8 activations (uint8 ones were shifted by -128) and write int32
    dense = [d for d in _kernel_dtypes(cm, kind) if "uint8" not in d and "int8" in d]
    assert len(dense) >= case.expect["int8-arm-dot"], _kernel_dtypes(cm, kind)
    asm = cm.module.mod.imports[0].inspect_source("asm")
    sdot = [ln.split() for ln in asm.splitlines() if ln.strip().startswith("sdot\t")]
    assert sdot, "no sdot in the aarch64 assembly"
    # vD.4s += vA.16b . vB.16b: 4 int32 accumulators, 16 int8 operands
    assert all(ops[1].endswith(".4s,") and ops[2].endswith(".16b,") and ops[3].endswith(".16b") for ops in sdot), \
        sdot[:3]
    assert "udot" not in asm
    assert not cm.info.naive_kernels
    # a quantized SiLU's table is read 16 lanes at a time with tbl + 3 tbx (64 table bytes each;
    # LLVM also uses tbl for its own byte shuffles, so the tbx count tells)
    tables = case.expect.get("lookup_tables", 0)
    assert cm.info.rewrites.get("lookup_tables", 0) == tables, cm.info.rewrites
    tbl, tbx = asm.count("tbl\t"), asm.count("tbx\t")
    assert (tbx > 0 and tbx % 3 == 0 and tbl >= tbx // 3) if tables else tbx == 0, (tbl, tbx)


@needs_aarch64_llvm
def test_aarch64_without_dotprod_keeps_float_kernels(tmp_path: Path) -> None:
    qdq, _ = arm.quantize(_case("mlp_u8s8"), tmp_path)
    cm = tvm_compile(str(qdq), target="aarch64", build_cache=False, progress=False)
    assert not any(k.startswith("int8") for k in cm.info.rewrites), cm.info.rewrites
    assert "sdot" not in cm.module.mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("name", ["conv_u8s8", "conv_s8s8", "conv_silu_u8s8", "mlp_u8s8"])
def test_signed_activation_rewrite_matches_ort_natively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        name: str) -> None:
    """The Arm kernels' arithmetic, run on this machine: the host build made with int8
    activations (what ``int8_activation_dtype`` gives an aarch64-dotprod target)."""
    from graphopt.backend import int8_arm

    monkeypatch.setattr(int8_arm, "int8_activation_dtype", lambda target: "int8")
    case = _case(name)
    qdq, feeds = arm.quantize(case, tmp_path)
    cm = tvm_compile(str(qdq), build_cache=False, progress=False)
    for k, v in case.expect.items():
        if k.startswith("int8_"):
            assert cm.info.rewrites.get(k) == v, cm.info.rewrites
    kind = "conv2d" if name.startswith("conv") else "matmul"
    dense = [d for d in _kernel_dtypes(cm, kind) if "uint8" not in d and "int8" in d]
    assert len(dense) >= case.expect["int8-arm-dot"], _kernel_dtypes(cm, kind)
    step = arm.output_step(qdq)
    sess = ort_session(str(qdq))
    for f in feeds:
        r = arm.compare(cm.run(f)[0], sess.run(None, f)[0], step)
        assert r["ok"], r


_missing = arm.arm_python_missing()


@needs_aarch64_llvm
@pytest.mark.skipif(_missing is not None, reason=f"the emulated aarch64 run needs: {_missing}")
def test_sdot_kernels_run_on_aarch64_and_match_ort(tmp_path: Path) -> None:
    """The exported aarch64 libraries, run under QEMU (about a minute: one emulated Python for
    all four cases), within one quantization step of ORT's integer result; the SiLU case reads
    its table with ``tbl``/``tbx``."""
    results = arm.check(tmp_path)
    assert set(results) == {c.name for c in arm.cases()}
    for name, r in results.items():
        assert r["sdot_in_asm"] > 0 and r["arm_dot_kernels"] > 0, (name, r)
        assert (r["tbx_in_asm"] > 0) == ("silu" in name), (name, r)
        assert r["ok"], (name, r)
        assert np.isfinite(r["max_steps"])
