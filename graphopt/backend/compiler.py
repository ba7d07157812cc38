"""Compile an ONNX model with Apache TVM (Relax): import, lower, schedule, build, run, export.

The flow (``graphopt.compile``):

1. **Prepare** (graphopt): fix the input shapes (user hints resolve symbolic dims), run the
   lossless default pipeline so run-time shape computations (Shape -> Gather -> Concat ->
   Reshape) and ConstantOfShape weights fold into constants, rewrite n-ary Sum as Add, and name
   any op TVM's ONNX frontend does not convert - before TVM sees the model.
2. **Import** with ``tvm.relax.frontend.onnx.from_onnx`` (weights become constants).
3. **Lower**: for CPUs, convolutions go to NHWC activations / HWIO weights (weights are
   pre-transposed at compile time) so every heavy kernel vectorizes along channels; then
   legalization, constant folding and operator fusion.
4. **Schedule**: tuned records from the MetaSchedule database where there are any, graphopt's
   rule-based default schedules (:mod:`graphopt.backend.schedules`) for the rest on CPUs, TVM's
   DLight rules on GPUs.
5. **Build** with ``tvm.relax.build``; run through the Relax VM, export as a shared library
   (or ``.tar``), with a JSON sidecar recording the signature and target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import numbers
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import CompileError, GraphoptError, InputSpecError, RuntimeBackendError
from graphopt.ir import Model
from graphopt.ir.tensor import np_dtype

from .targets import TargetSpec, _first_line, _from_dict, check_toolchain, host_cores, resolve_target
from .vmvalues import flatten_outputs

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"


@dataclass
class IOSpec:
    """One model input or output of a compiled model."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class CompileInfo:
    """What happened during compilation (shown by the CLI, kept in the sidecar)."""

    target: str
    target_config: dict[str, Any]
    schedules: dict[str, str] = field(default_factory=dict)
    layout: str = "NCHW"
    tuning: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    from_build_cache: bool = False
    rewrites: dict[str, int] = field(default_factory=dict)
    #: inputs compiled as constants (``--const-input``): name -> value (nested lists); a feed
    #: may still hold them (a data file made for the original model) when it holds this value
    const_inputs: dict[str, Any] = field(default_factory=dict)
    #: kernels that kept TVM's naive loops (no parallel, vectorized or unrolled loop, no GPU
    #: threads) although they are big enough to need a schedule (:func:`schedules.is_naive`)
    naive_kernels: list[str] = field(default_factory=list)


# -- preparing and importing ------------------------------------------------------------------


def _load_model(model: Model | str | os.PathLike[str]) -> Model:
    import graphopt

    if isinstance(model, Model):
        return model.copy()
    return graphopt.load(model)


def fix_input_shapes(model: Model, hints: Mapping[str, Sequence[int]] | None) -> list[IOSpec]:
    """Give every model input a static shape (from ``hints`` for symbolic dims) in place.

    Raises :class:`CompileError` naming the input and dim when a dim is dynamic and no hint
    gives it: TVM compiles for static shapes.
    """
    from graphopt.runtime import dynamic_axes, model_inputs, resolve_input_shapes

    hints = dict(hints or {})
    dynamic = dynamic_axes(model)  # symbols, missing dims, -1 (and 0 where the input must hold data)
    for v in model_inputs(model):
        if v.name in hints:
            continue
        if v.shape is None:
            raise CompileError(f"input {v.name!r} has unknown rank; give input_shapes={{{v.name!r}: [D1, D2, ...]}}")
        if dynamic[v.name]:
            example = ",".join("N" if ax in dynamic[v.name] else str(d) for ax, d in enumerate(v.shape))
            raise CompileError(
                f"input {v.name!r} has dynamic dim {v.shape[dynamic[v.name][0]]!r}; TVM needs static shapes: give "
                f"input_shapes={{{v.name!r}: [{example.replace(',', ', ')}]}} (each N a number)"
            )
    resolved = resolve_input_shapes(model, hints)
    specs = []
    for v in model_inputs(model):
        v.shape = tuple(resolved[v.name])
        if v.dtype is None:
            raise CompileError(f"input {v.name!r} has no element type")
        specs.append(IOSpec(v.name, tuple(resolved[v.name]), str(np_dtype(v.dtype))))
    return specs


def supported_ops() -> set[str]:
    """ONNX op types TVM's Relax ONNX frontend converts."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map())


def pin_inputs(model: Model, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Make the named inputs constants of the given values, in place (they leave the signature);
    returns the pinned arrays (the input's dtype and, when static, shape).

    Why: a control input the caller always feeds the same value (a VAD's sample rate ``sr``)
    decides the model's ``If`` branches; pinned, the conditions fold and the branches inline,
    and TVM's frontend (which converts no ``If``) sees one straight graph.
    """
    from graphopt.runtime import model_inputs

    inputs = {v.name: v for v in model_inputs(model)}
    pinned: dict[str, np.ndarray] = {}
    for name, value in values.items():
        v = inputs.get(name)
        if v is None:
            raise CompileError(f"const_inputs: the model has no input {name!r} (inputs: {sorted(inputs)})")
        try:
            a = np.asarray(value, dtype=np_dtype(v.dtype))
            if v.shape is not None and all(isinstance(d, int) and d >= 0 for d in v.shape):
                a = a.reshape(v.shape)
        except (TypeError, ValueError) as exc:
            raise CompileError(f"const_inputs[{name!r}]: {exc}") from None
        c = model.graph.add_initializer(name + "_const", a)
        model.graph.replace_all_uses_with(v, c)
        model.graph.inputs = [i for i in model.graph.inputs if i is not v]
        pinned[name] = a
    return pinned


def prepare(model: Model | str | os.PathLike[str], input_shapes: Mapping[str, Sequence[int]] | None = None,
            *, optimize: bool = True, const_inputs: Mapping[str, Any] | None = None) -> tuple[Model, list[IOSpec]]:
    """Copy ``model``, pin ``const_inputs`` to constants, fix the other inputs' shapes, run the
    lossless pipeline, and check every op is one TVM converts. Returns the prepared model and its
    input specs."""
    import graphopt

    m = _load_model(model)
    if const_inputs:
        pin_inputs(m, const_inputs)
    specs = fix_input_shapes(m, input_shapes)
    shapes = {s.name: list(s.shape) for s in specs}
    ctx = graphopt.PassContext(input_shapes=shapes)
    if optimize:
        graphopt.run_passes(m, graphopt.get_pipeline("default"), ctx)
    graphopt.run_passes(m, [graphopt.get_pass("sum-to-add", max_inputs=1 << 16), "dce"],
                        graphopt.PassContext(input_shapes=shapes))
    # ops TVM's frontend lacks, rewritten as standard ONNX (passes registered by graphopt.passes:
    # LSTM/GRU/RNN unrolled, ORT integer ops as float/QDQ, ConvTranspose pads made explicit)
    lowering = graphopt.get_pipeline("lower-for-tvm")
    graphopt.run_passes(m, [lowering], graphopt.PassContext(input_shapes=shapes))
    left = {k: v for p in lowering.passes for k, v in (getattr(p, "report", None) or {}).get("left", {}).items()}
    control = _if_control_inputs(m)
    # TVM's C/CUDA code generators use input names as parameter names verbatim ("gpu_0/data_0"
    # breaks the CUDA source); inputs are positional in the build, so the copy gets identifiers.
    for v in m.graph.inputs:
        if v.name and not v.name.isidentifier():
            v.name = m.graph.fresh_name("in_" + "".join(c if c.isalnum() else "_" for c in v.name))
    # If is converted by the frontend itself (a Relax If on the condition's run-time value; its
    # branches are walked for unsupported ops below like the main graph), not through its map
    known = supported_ops() | {"If"}
    bad = [(n.name, n.op_type) for g in m.graph.all_graphs() for n in g.iter_nodes()
           if n.domain not in ("", "ai.onnx") or n.op_type not in known]
    if bad:
        name, op = bad[0]
        more = f" (and {len(bad) - 1} more: {sorted({o for _, o in bad[1:]})})" if len(bad) > 1 else ""
        why = f" ({left[name]})" if name in left else ""
        if op == "If" and control.get(name):
            why = (f" (its condition depends on the value of input {control[name][0]!r}: if you always feed it the "
                   f"same value, pin it with const_inputs={{{control[name][0]!r}: VALUE}})")
        raise CompileError(f"op {op} is not supported by TVM's ONNX frontend{why}{more}", node=name)
    return m, specs


def _if_control_inputs(model: Model) -> dict[str, list[str]]:
    """Main-graph ``If`` node name -> the model inputs its condition is computed from."""
    inputs = {id(v): v.name for v in model.graph.inputs}
    out: dict[str, list[str]] = {}
    for n in model.graph:
        if n.op_type != "If" or n.input(0) is None:
            continue
        seen, stack, found = set(), [n.input(0)], []
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in inputs:
                found.append(inputs[id(v)])
            elif v.producer is not None:
                stack.extend(i for i in v.producer.inputs if i is not None)
        out[n.name] = sorted(found)
    return out


def import_relax(model: Model) -> Any:
    """Convert a prepared model to a Relax IRModule (weights as constants)."""
    from tvm.relax.frontend.onnx import from_onnx

    import graphopt

    proto = graphopt.to_proto(model)
    failure = None
    # a failed conversion leaves TVM objects in the exception's frames whose C++ destructors log
    # warnings on fd 2 ("BlockBuilder destroyed with remaining blocks!") when they are freed - after
    # the CLI's error line unless they are freed here, with fds 1/2 captured into the log (the
    # frontend also prints "Error converting operator ..." to stdout)
    with _native_output_to_log():
        try:
            mod = from_onnx(proto, keep_params_in_input=False)
        except Exception as exc:  # noqa: BLE001 - the frontend raises anything; say it in one line
            failure = _first_line(exc)
        if failure is not None:
            import gc

            gc.collect()  # frames in reference cycles too
    if failure is not None:
        raise CompileError(f"TVM's ONNX frontend failed: {failure}") from None
    return mod


@contextlib.contextmanager
def _native_output_to_log() -> Iterator[None]:
    """Send what is written to fds 1 and 2 meanwhile (TVM's C++ log lines, its frontend's prints)
    to this module's log at debug level, so the CLI's own lines stay the only ones."""
    import sys

    with contextlib.ExitStack() as stack:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
                saved = os.dup(fd)
            except (OSError, ValueError, AttributeError):  # no usable fd: leave it
                continue
            tmp = stack.enter_context(tempfile.TemporaryFile())
            os.dup2(tmp.fileno(), fd)
            stack.callback(_restore_fd, fd, saved, stream, tmp)
        yield


def _restore_fd(fd: int, saved: int, stream: Any, tmp: Any) -> None:
    try:
        stream.flush()
    except (ValueError, AttributeError):
        pass
    os.dup2(saved, fd)
    os.close(saved)
    tmp.seek(0)
    text = tmp.read().decode(errors="replace").strip()
    if text:
        logger.debug("TVM (fd %d): %s", fd, text)


# -- lowering ---------------------------------------------------------------------------------

# conv2d_transpose pinned to NCHW/IOHW: TOPI legalizes only that layout, and ConvertLayout would
# otherwise carry the NHWC of the convs before it into it (left un-legalized: "CodeGenVM cannot
# emit this Relax operator")
CPU_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv1d": ["NWC", "WIO"],
               "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


def lower(mod: Any, target: TargetSpec, *, layout: bool = True, int8_table: Mapping[str, Any] | None = None,
          int8_counts: dict[str, int] | None = None, fast_math: bool = False,
          winograd: bool = False, rewrites: dict[str, int] | None = None) -> tuple[Any, str]:
    """Relax-level lowering up to fused, legalized (still unscheduled) TIR functions.

    Returns the module and the activation layout used ("NHWC" where the conversion applied).
    ``int8_table`` (:func:`graphopt.backend.int8.weight_table`): QDQ convolutions and matmuls
    with these weights become integer kernels (counts into ``int8_counts``). ``fast_math`` (CPU):
    exp/erf/tanh/softmax/sigmoid as vectorizable approximations (:func:`layout.fast_math`).
    ``winograd`` (CPU, channels-last): eligible 3x3 convolutions as Winograd transforms and a
    batched matmul (:mod:`graphopt.backend.winograd`); their count goes into ``rewrites``.
    """
    import tvm
    from tvm import relax

    T = relax.transform
    tgt = target.tvm_target()
    head = [T.DecomposeOpsForInference(), T.CanonicalizeBindings()]
    tail = [T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant(), T.FuseOps(), T.FuseTIR(),
            T.AttachAttrLayoutFreeBuffers()]
    used = "NCHW"
    with tgt:
        mod = tvm.transform.Sequential(head)(mod)
        if int8_table:  # per-tensor quantize/dequantize as elementwise ops (layout conversion takes them),
            from .int8 import elementwise_qdq, rewrite_qdq  # integer matmuls before their widths are padded
            from .int8_arm import int8_activation_dtype

            acts = int8_activation_dtype(tgt) or "uint8"  # what the dot product reads (Arm sdot: int8)
            mod = elementwise_qdq(mod)
            mod, counts = rewrite_qdq(mod, int8_table, ("matmul",), activations=acts)
            if int8_counts is not None:
                int8_counts.update(counts)
        if target.device == "cpu":  # ConvTranspose as a sub-pixel convolution (then channels-last too)
            from .layout import conv_transpose_to_conv, dedupe_constants, pad_matmul_widths
            from .schedules import vector_lanes

            mod, n_ct, why_not = conv_transpose_to_conv(mod)
            if n_ct or why_not:
                logger.info("%d transposed convolutions rewritten as convolutions%s", n_ct,
                            f"; left as they were: {', '.join(sorted(set(why_not)))}" if why_not else "")
            from .intmatmul import native_integer_matmuls

            mod, n_int = native_integer_matmuls(mod)  # MatMulInteger: uint8 x int8, not int32 x int32
            if n_int and int8_counts is not None:
                int8_counts["integer_matmul"] = int8_counts.get("integer_matmul", 0) + n_int
            mod, _ = dedupe_constants(mod)  # one copy of an unrolled LSTM's weights (before padding)
            mod, padded = pad_matmul_widths(mod, vector_lanes(tgt))
            if padded:
                logger.info("matmul widths padded to whole vectors: %s", padded)
        if layout and target.device == "cpu":
            try:
                mod = T.ConvertLayout(CPU_LAYOUTS)(mod)
                used = "NHWC"
            except Exception as exc:  # noqa: BLE001 - one op's layout rule failed: convert conv by conv
                from .layout import convs_to_channels_last

                mod, n = convs_to_channels_last(mod)
                used = "NHWC (per conv)" if n else "NCHW"
                logger.info("graph-wide layout conversion failed (%s); %d convolutions made channels-last one by one",
                            _first_line(exc), n)
        if int8_table:  # integer convolutions, in the layout the convs now have; SiLU epilogues vectorized
            from .int8 import fast_sigmoid, lookup_tables, mark_lookups_elementwise, sink_quantize

            mod, counts = rewrite_qdq(mod, int8_table, ("conv2d",), activations=acts)
            mod, counts["quantize_sunk"] = sink_quantize(mod)  # concat/reshape/split move uint8, not float
            mod, counts["lookup_tables"] = lookup_tables(mod)  # quantized SiLU/sigmoid chains: table[xq]
            if counts["lookup_tables"]:  # elementwise for fusion: the lookup joins the conv's epilogue
                tail.insert(2, mark_lookups_elementwise())  # right after AnnotateTIROpPattern
            mod = fast_sigmoid(mod)
            if int8_counts is not None:
                for k, v in counts.items():
                    int8_counts[k] = int8_counts.get(k, 0) + v
        if winograd and target.device == "cpu" and used.startswith("NHWC"):
            from .winograd import mark_transforms, winograd_convs

            mod, wino = winograd_convs(mod)
            if wino:
                logger.info("%d 3x3 convolutions as Winograd F(m, 3): %s", len(wino),
                            ", ".join(f"{'x'.join(map(str, s))} m={m}" for s, m in wino))
                tail.insert(2, mark_transforms())  # right after AnnotateTIROpPattern
                if rewrites is not None:
                    rewrites["winograd_convs"] = len(wino)
        if fast_math and target.device == "cpu":  # after the layout conversion: TE kernels have no layout rule
            from .layout import fast_math as _fast_math

            mod = _fast_math(mod)
        mod = tvm.transform.Sequential(tail)(mod)
    _check_legalized(mod)
    return mod, used


def _check_legalized(mod: Any) -> None:
    """Raise a one-line :class:`CompileError` naming a Relax operator that legalization left
    as it is (TOPI refused its attributes, e.g. a layout it has no kernel for), instead of
    TVM's "CodeGenVM cannot emit this Relax operator" at build time."""
    import tvm
    from tvm import relax

    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", []):
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                        v.op.get_attr("FLegalize") is not None:
                    attrs = v.attrs
                    what = ", ".join(f"{k}={getattr(attrs, k)}" for k in ("data_layout", "kernel_layout", "out_layout")
                                     if attrs is not None and hasattr(attrs, k))
                    raise CompileError(f"TVM cannot lower {v.op.name}{f' ({what})' if what else ''} in "
                                       f"{gv.name_hint}: TOPI has no kernel for these attributes")


def schedule(mod: Any, target: TargetSpec, *, database: Any = None, default_schedules: bool = True,
             avoid: Mapping[str, set[str]] | None = None) -> tuple[Any, dict[str, str]]:
    """Apply tuned records from ``database``, then default schedules to what is left.

    For CUDA the default schedules are TVM's DLight rules, tried in order per function;
    ``avoid`` names rules not to use for given functions (see :func:`_fix_gpu_hazards`).
    """
    from tvm import relax, s_tir, tirx

    tgt = target.tvm_target()
    with tgt:
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        if not default_schedules:
            return mod, {gv.name_hint: ("tuned" if _scheduled(f) else "naive")
                         for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        if target.device == "cuda":
            # DLight's rules applied here rather than through dlight.ApplyDefaultSchedule: that
            # pass neither says which rule scheduled a function nor can skip one for it
            used = {}
            for gv, f in list(mod.functions_items()):
                if not isinstance(f, tirx.PrimFunc):
                    continue
                name, used[gv.name_hint] = gv.name_hint, "tuned" if _scheduled(f) else "naive"
                if _scheduled(f):
                    continue
                for rule in gpu_rules():
                    if type(rule).__name__ in (avoid or {}).get(name, ()):
                        continue
                    try:
                        space = rule.apply(f, tgt, False)
                    except Exception as exc:  # noqa: BLE001 - a DLight rule that fails on a kernel
                        # (its Matmul rule on ddddocr_int8's integer matmul: "The block no longer
                        # exists") is one that does not apply: the next rule gets the kernel
                        logger.debug("DLight %s failed on %s: %s", type(rule).__name__, name, _first_line(exc))
                        space = None
                    if space is not None:
                        sch = space if isinstance(space, s_tir.Schedule) else space[0]
                        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                        used[name] = f"dlight:{type(rule).__name__}"
                        break
            return mod, used
        from .schedules import apply_default_schedules

        mod, used = apply_default_schedules(mod, tgt)
        # weight packing blocks become separate functions on constants, folded right here
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
        mod = relax.transform.FoldConstant()(mod)
        from .layout import dedupe_constants

        mod, _ = dedupe_constants(mod)  # folding packed each call's copy of a shared weight anew
        mod = relax.transform.DeadCodeElimination()(mod)
        return mod, used


def gpu_rules() -> list[Any]:
    """TVM's DLight rules for GPU kernels, in the order they are tried."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def _fix_gpu_hazards(mod: Any, pristine: Mapping[str, Any], used: dict[str, str], ex: Any, target: TargetSpec
                     ) -> tuple[Any, Any, dict[str, str], list[str]]:
    """Rebuild kernels that share thread-private memory across threads (wrong on a GPU; see
    :mod:`graphopt.backend.gpucheck`), each scheduled again by the next DLight rule that
    applies, until the generated CUDA C is clean. Returns the module, the executable, the
    schedules used and the functions rescheduled; raises if a kernel stays hazardous."""
    from .gpucheck import cuda_sources, kernel_function, private_memory_hazards

    avoid: dict[str, set[str]] = {}
    tries = len(gpu_rules())
    for attempt in range(tries + 1):
        hazards = private_memory_hazards(cuda_sources(ex))
        if not hazards:
            return mod, ex, used, sorted(avoid)
        if attempt == tries:
            raise CompileError(f"CUDA kernel {next(iter(hazards))} shares thread-private memory across threads "
                               "under every DLight rule (it would compute wrong values on a GPU)")
        for kernel, arrays in hazards.items():
            fn = kernel_function(kernel, list(pristine))
            if fn is None:
                raise CompileError(f"CUDA kernel {kernel} shares thread-private memory ({', '.join(arrays)}) "
                                   "across threads and graphopt cannot tell which function made it")
            rule = used.get(fn, "")
            avoid.setdefault(fn, set()).add(rule.split(":", 1)[1] if rule.startswith("dlight:") else "")
            logger.info("kernel %s (%s) indexes thread-private %s by thread; scheduling it again without %s",
                        kernel, fn, ", ".join(arrays), rule)
            mod[fn] = pristine[fn]
        mod, again = schedule(mod, target, avoid=avoid)
        used = {**used, **{fn: again[fn] for fn in avoid}}
        ex = build(mod, target)
    raise AssertionError("unreachable")


def _scheduled(func: Any) -> bool:
    return "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def build(mod: Any, target: TargetSpec) -> Any:
    """``relax.build`` for the target; one-line error on failure.

    CUDA kernels stay CUDA C inside the module (TVM 0.27's wheel compiles them when the library
    is loaded; see :mod:`graphopt.backend.cuda`).
    """
    from tvm import relax

    from .lut import tir_pipeline

    try:
        tgt = target.tvm_target()
        # x86 with AVX-512 VBMI, AArch64: byte-table reads (quantized SiLU/HardSwish) as permutes
        return relax.build(mod, target=tgt, tir_pipeline=tir_pipeline(tgt))
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"TVM build failed for {target.name}: {_first_line(exc)}") from None


# -- the compiled model -----------------------------------------------------------------------


class CompiledModel:
    """A model compiled by TVM: run it, time it, export it.

    ``run`` takes a dict (input name -> array) or a list in input order and returns the outputs
    as a list of numpy arrays in the ONNX model's output order.
    """

    def __init__(self, module: Any, target: TargetSpec, inputs: list[IOSpec], outputs: list[IOSpec],
                 info: CompileInfo, *, path: Path | None = None) -> None:
        self.module = module
        self.target = target
        self.inputs = inputs
        self.outputs = outputs
        self.info = info
        self.path = path
        self._library = path  # loaded from this library (not built in this process)
        self._vm: Any = None
        self._host_io: Any = None  # (entry, tensors, numpy views) or False: see run()
        self._run_lock = threading.Lock()
        #: the scheduled Relax IRModule that was built (None for a loaded library); for
        #: inspection, and for :func:`graphopt.backend.gpucheck.run_on_cpu` on GPU builds
        self.ir_module: Any = None

    def __repr__(self) -> str:
        sig = ", ".join(f"{i.name}:{list(i.shape)}" for i in self.inputs)
        return f"CompiledModel({self.target.name}, inputs=[{sig}])"

    # running ------------------------------------------------------------------------------
    def _device(self) -> Any:
        import tvm

        if self.target.is_cross:
            raise RuntimeBackendError(f"this build is for {self.target.name}; it cannot run here (export it and run "
                                      "it on the target machine)")
        if self.target.device == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise RuntimeBackendError("this build is for CUDA but no NVIDIA GPU is visible")
            return dev
        return tvm.cpu(0)

    def vm(self) -> Any:
        """The Relax virtual machine running this build (created on first use)."""
        if self._vm is None:
            from tvm import relax

            self._vm = relax.VirtualMachine(self.module, self._device())
        return self._vm

    def _arguments(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[Any]:
        import tvm

        dev = self._device()
        return [tvm.runtime.tensor(a, dev) for a in self.checked_inputs(inputs)]

    def checked_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """The inputs in the compiled model's order, contiguous; raises :class:`InputSpecError`
        when names, count, shapes or dtypes do not match what the model was compiled for."""
        if isinstance(inputs, Mapping):
            inputs = self._without_pinned(inputs)
            missing = [i.name for i in self.inputs if i.name not in inputs]
            extra = sorted(set(inputs) - {i.name for i in self.inputs})
            if missing or extra:
                what = [f"{label} {names}" for label, names in (("missing", missing), ("unknown", extra)) if names]
                raise InputSpecError(f"inputs do not match the compiled model: {', '.join(what)}")
            arrays = [inputs[i.name] for i in self.inputs]
        else:
            arrays = list(inputs)
            if len(arrays) != len(self.inputs):
                raise InputSpecError(f"expected {len(self.inputs)} inputs, got {len(arrays)}")
        out = []
        for spec, a in zip(self.inputs, arrays, strict=True):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(spec.shape):
                raise InputSpecError(f"input {spec.name!r} has shape {list(a.shape)}; compiled for {list(spec.shape)}")
            if a.dtype != np.dtype(spec.dtype):
                raise InputSpecError(f"input {spec.name!r} has dtype {a.dtype}; compiled for {spec.dtype}")
            out.append(np.require(a, requirements="C"))  # (ascontiguousarray makes a scalar 1-d)
        return out

    def _without_pinned(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """``inputs`` less the ones compiled as constants, which must hold the pinned value: the
        same data then feeds the original model (under ONNX Runtime) and this build."""
        if not self.info.const_inputs:
            return inputs
        names = {i.name for i in self.inputs}
        pinned = {k: v for k, v in self.info.const_inputs.items() if k not in names}
        if not pinned or not set(inputs) & set(pinned):
            return inputs
        for name in sorted(set(inputs) & set(pinned)):
            got = np.asarray(inputs[name])
            try:  # cast as pin_inputs cast the value to the input's dtype (which a right feed has)
                want = np.asarray(pinned[name]).astype(got.dtype)
            except (TypeError, ValueError):
                want = np.asarray(pinned[name])
            if want.size != got.size or not np.array_equal(np.ravel(want), np.ravel(got)):
                shown = got.ravel()[:8].tolist() if got.size <= 8 else f"an array of shape {list(got.shape)}"
                raise InputSpecError(f"input {name!r} was compiled as the constant {want.ravel().tolist()} "
                                     f"(const_inputs) but the feed holds {shown}; compile again with "
                                     f"const_inputs={{{name!r}: VALUE}} for this value, or without it")
        return {k: v for k, v in inputs.items() if k not in pinned}

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run once; outputs as numpy arrays (copies the caller owns), in the model's output order.

        On the CPU the inputs are copied into TVM tensors kept from the first call (through numpy
        views of them) and the outputs are read back through DLPack: on a Silero VAD (0.05 ms of
        kernels) a call adds about 23 us of Python, input checks included, where fresh tensors and
        ``Tensor.numpy()`` added 75. Calls from several threads take turns (the VM runs one call
        at a time)."""
        arrays = self.checked_inputs(inputs)
        with self._run_lock:
            if self._host_io is None and self.target.device == "cpu":
                self._host_io = self._host_buffers(arrays)
            if not self._host_io:  # a GPU build, or an input dtype DLPack cannot carry
                import tvm

                dev = self._device()
                return flatten_outputs(self.vm()["main"](*[tvm.runtime.tensor(a, dev) for a in arrays]),
                                       host=self.target.device == "cpu")
            main, tensors, views = self._host_io
            for view, a in zip(views, arrays, strict=True):
                np.copyto(view, a)
            return flatten_outputs(main(*tensors), host=True)

    def _host_buffers(self, arrays: Sequence[np.ndarray]) -> Any:
        """The VM's entry, one CPU tensor per input and a writable numpy view of each; ``False``
        where an input's dtype has no DLPack view (then every call makes fresh tensors)."""
        import tvm

        dev = self._device()
        tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
        try:
            views = [np.from_dlpack(t) for t in tensors]
        except (BufferError, TypeError, ValueError, RuntimeError):
            return False
        if not all(v.flags.writeable and v.shape == a.shape and v.dtype == a.dtype
                   for v, a in zip(views, arrays, strict=True)):
            return False
        return (self.vm()["main"], tensors, views)

    def benchmark(self, inputs: Mapping[str, np.ndarray] | None = None, *, rounds: int = 30, number: int = 1
                  ) -> dict[str, float]:
        """Latency in ms (median, mean, min over ``rounds``) with TVM's time evaluator."""
        if inputs is None:
            inputs = example_inputs(self.inputs)
        args = self._arguments(inputs)
        fe = self.vm().time_evaluator("main", self._device(), number=number, repeat=rounds, min_repeat_ms=0)
        res = fe(*args)
        times = [t * 1e3 for t in res.results]
        return {"median_ms": float(np.median(times)), "mean_ms": float(np.mean(times)), "min_ms": float(min(times))}

    # exporting ----------------------------------------------------------------------------
    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the build as a shared library (``.so``) or an archive (``.tar``), atomically,
        plus ``<path>.json`` describing inputs, outputs and target. Returns the path."""
        path = Path(path)
        if path.suffix not in (".so", ".tar", ".dylib"):
            raise CompileError(f"export path {str(path)!r} must end in .so or .tar")
        if path.suffix == ".so":
            check_toolchain(self.target, for_export=True)
        if self._library is not None and self._library.suffix != path.suffix:
            raise CompileError(f"this build was loaded from {str(self._library)!r}; it can only be copied "
                               f"as a {self._library.suffix} file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            kwargs: dict[str, Any] = {}
            if path.suffix == ".so" and self.target.cross_compiler:
                from tvm.support import cc

                kwargs["fcompile"] = cc.cross_compiler(self.target.cross_compiler)
            try:
                if self._library is None:
                    self.module.export_library(tmp, **kwargs)
                else:  # loaded from a library (the build cache): the library is the export
                    shutil.copyfile(self._library, tmp)
            except OSError as exc:
                raise CompileError(f"export failed: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                raise CompileError(f"export failed: {_first_line(exc)}") from None
            meta = {
                "format": "graphopt-tvm/1",
                "target": self.target.name,
                "target_config": self.target.config,
                "device": self.target.device,
                "cross": self.target.is_cross,
                "inputs": [asdict(i) for i in self.inputs],
                "outputs": [asdict(o) for o in self.outputs],
                "info": asdict(self.info),
            }
            side_tmp = tmp + SIDECAR_SUFFIX
            Path(side_tmp).write_text(json.dumps(meta, indent=1, default=str))
            os.chmod(tmp, 0o755 if path.suffix == ".so" else 0o644)
            os.replace(tmp, path)
            os.replace(side_tmp, str(path) + SIDECAR_SUFFIX)
        finally:
            for t in (tmp, tmp + SIDECAR_SUFFIX):
                if os.path.exists(t):
                    os.unlink(t)
        self.path = path
        return path


def example_inputs(specs: Sequence[IOSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching ``specs`` (as :func:`graphopt.runtime.make_inputs` draws them)."""
    from graphopt.runtime import random_array

    rng = np.random.default_rng(seed)
    return {s.name: random_array(s.shape, s.dtype, rng) for s in specs}


def load_compiled(path: str | os.PathLike[str]) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export` (with its ``.json`` sidecar)."""
    from graphopt.errors import require_extra

    tvm: Any = require_extra("tvm", "loading a compiled model")

    path = Path(path)
    side = Path(str(path) + SIDECAR_SUFFIX)
    if not path.is_file():
        raise CompileError(f"no compiled model at {str(path)!r}")
    if not side.is_file():
        raise CompileError(f"{str(side)!r} is missing: it records the compiled model's inputs and target")
    try:
        meta = json.loads(side.read_text())
        inputs = [IOSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in meta["inputs"]]
        outputs = [IOSpec(o["name"], tuple(o["shape"]), o["dtype"]) for o in meta["outputs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CompileError(f"{str(side)!r} is not a graphopt compile sidecar: {exc}") from None
    target = _from_dict(dict(meta["target_config"]), name=meta["target"])
    if path.suffix == ".tar":
        raise CompileError("a .tar export must be linked on the target machine before loading; load a .so")
    if target.device == "cuda":
        from .cuda import install_load_hook

        install_load_hook(str(target.config.get("arch", "sm_80")))
    try:
        module = tvm.runtime.load_module(str(path))
    except Exception as exc:  # noqa: BLE001
        if meta.get("cross"):  # the loader's own message ("no such file") misleads here
            raise CompileError(f"cannot load {str(path)!r} here: it is a cross build for {meta['target']} "
                               f"({target.config.get('mtriple', '?')}); load it on that machine") from None
        raise CompileError(f"cannot load {str(path)!r}: {_first_line(exc)}") from None
    info = CompileInfo(**meta.get("info", {"target": meta["target"], "target_config": meta["target_config"]}))
    return CompiledModel(module, target, inputs, outputs, info, path=path)


# -- the entry point --------------------------------------------------------------------------


def compile(
    model: Model | str | os.PathLike[str],
    target: str | dict[str, Any] | TargetSpec = "host",
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trials: int = 0,
    minutes: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rpc: str | None = None,
    default_schedules: bool = True,
    layout: bool = True,
    optimize: bool = True,
    progress: bool = True,
    build_cache: bool = True,
    const_inputs: Mapping[str, Any] | None = None,
    int8_kernels: bool = True,
    fast_math: bool = True,
    winograd: bool = True,
    threads: int | None = None,
) -> CompiledModel:
    """Compile an ONNX model (path or :class:`graphopt.Model`) for ``target`` with TVM.

    ``trials``/``minutes`` set a MetaSchedule tuning budget (0 / None: no tuning; graphopt's
    default schedules are used). Tuning records go to a persistent database per target under
    ``cache_dir`` (default: the user cache dir), so compiling the same workloads again reuses
    them without measuring. ``rpc="host:port:key"`` measures on devices registered with a TVM
    RPC tracker instead of locally. ``default_schedules=False`` builds TVM's unscheduled
    (naive) kernels, for comparison.

    ``build_cache`` (CPU targets, not cross): the built library is kept in the cache too, keyed
    by the prepared model, the target, the options, graphopt's backend code and the state of the
    tuning database. Compiling the same model again with nothing changed loads it instead of
    importing, lowering and building again (TVM's own steps take 10-30 s on real CNNs).

    ``const_inputs`` (name -> value): inputs compiled as constants (see :func:`pin_inputs`); the
    build no longer takes them.

    ``int8_kernels`` (CPU targets with AVX-512 VNNI or Arm dotprod): a QDQ model's convolutions and
    matmuls run as int8 x int8 -> int32 kernels with requantization (:mod:`graphopt.backend.int8`,
    :mod:`graphopt.backend.int8_arm`) instead of
    dequantize, float kernel, quantize; False keeps them float.

    ``fast_math`` (CPU targets, float32): ``exp``, ``erf``, ``tanh``, softmax and ``sigmoid`` as
    TOPI's vectorizable polynomials (:func:`layout.fast_math`: within 3e-7 relative of float64 for
    exp, 5e-7 sigmoid, 1e-5 tanh, 4e-6 erf; ONNX Runtime's own kernels are approximations of the
    same kind). On by default: every corpus model stays equal to ORT under the lossless check, and
    SiLU/softmax/erf-heavy ones gain most (nudenet_320n 1.56x -> 1.08x of ORT on one thread).
    ``fast_math=False`` keeps TVM's exact (scalar) calls.

    ``winograd`` (CPU targets, float32): 3x3 stride-1 convolutions with a constant weight as
    Winograd F(4x4, 3x3), or F(2x2, 3x3) on small maps (:mod:`graphopt.backend.winograd`): input transform, batched matmul,
    output transform, with 4x fewer multiplies. SqueezeNet on one core: 1.08x -> 0.93x of ORT's
    latency. The sums are reassociated (about 1e-6 of the output's range on SqueezeNet, inside
    the lossless check); ``winograd=False`` keeps them direct.

    ``threads`` (CPU targets): the cores the model will run on, when not all of this machine's
    (a server running one model per core, a 1-thread deployment). It becomes the target's
    ``num-cores``, so tuning measures every candidate with that many threads (a schedule that
    wins on two cores can lose on one) and keeps its records apart from other thread counts.
    Without a tuning budget it changes only the cache key (the default schedules do not depend
    on it). Run the build with as many threads (``TVM_NUM_THREADS``): the library does not set
    its runtime's pool itself.
    """
    from graphopt.errors import require_extra

    require_extra("tvm", "compiling")
    spec = resolve_target(target)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise CompileError(f"must be a whole number >= 1, not {threads!r}", field="threads")
        n_threads = int(threads)
        if spec.device != "cpu":
            raise CompileError(f"sets the CPU cores a build runs on; target {spec.name} is not a CPU", field="threads")
        if n_threads > host_cores() and not spec.is_cross and rpc is None and (trials or minutes):
            logger.warning("threads=%d is more than this machine's %d cores: tuning measures candidates on %d",
                           n_threads, host_cores(), host_cores())
        spec = dataclasses.replace(spec, config={**spec.config, "num-cores": n_threads}, notes=list(spec.notes))
    if rpc is not None:
        from .tuning import parse_rpc

        parse_rpc(rpc)
        if not (trials or minutes):
            raise CompileError("rpc measures tuning candidates on remote devices; give trials or minutes too")
    if spec.device == "cuda":
        check_toolchain(spec, for_export=False)
    from graphopt.progress import progress as _progress

    t0 = time.perf_counter()
    # one bar over the stages (closed on return; on an error it goes with the frame)
    bar = _progress(total=4, desc=f"compiling for {spec.name}", unit="stage", disable=not progress)
    bar.set_postfix("prepare (lossless passes, shapes)")
    lanes = 0
    if spec.device == "cpu" and default_schedules:
        from .schedules import vector_lanes

        lanes = vector_lanes(spec.tvm_target())
    int8_table = {}
    from .int8 import weight_table
    from .int8_arm import int8_activation_dtype

    # the int8 weights, read before the pipeline folds their DequantizeLinear; only where the CPU has
    # integer dot products (VNNI, Arm dotprod): without them int32 multiply-adds are no faster than float ones
    if int8_kernels and spec.device == "cpu" and int8_activation_dtype(spec.tvm_target()) is not None:
        if not isinstance(model, Model):
            model = _load_model(model)  # loaded once (prepare copies it)
        int8_table = weight_table(model)
    prepared, inputs = prepare(model, input_shapes, optimize=optimize, const_inputs=const_inputs)
    pinned = {k: np.asarray(v).tolist() for k, v in (const_inputs or {}).items()}  # recorded in the sidecar
    # whole vectors of output channels (not for the int8 kernels: they pad their channels to 16 themselves,
    # and a padded weight would no longer be found among the model's int8 weights)
    padded = 0
    if lanes > 1 and not int8_table:  # the pass (passes/lower) through the registry: graphopt/ never imports passes/
        import graphopt

        pad = graphopt.get_pass("pad-group-widths", lanes=lanes)
        graphopt.run_passes(prepared, [pad])
        padded = int(pad.report["padded_convs"])
    t1 = time.perf_counter()
    cacheable = build_cache and spec.device == "cpu" and not spec.is_cross \
        and os.environ.get("GRAPHOPT_NO_BUILD_CACHE", "") in ("", "0")
    key = _build_key(prepared, inputs, spec, {"default_schedules": default_schedules, "layout": layout,
                                               "trials": trials, "minutes": minutes,
                                               "int8_kernels": bool(int8_table), "fast_math": fast_math,
                                               "winograd": winograd}) \
        if cacheable else ""
    if cacheable:
        hit = _cached_build(spec, cache_dir, key)
        if hit is not None:
            hit.info.from_build_cache = True
            hit.info.const_inputs = pinned
            hit.info.times = {"prepare_s": t1 - t0, "load_cached_s": time.perf_counter() - t1}
            logger.info("loaded the cached build for %s (%.1f s)", spec.name, time.perf_counter() - t0)
            bar.close()
            return hit
    bar.update()
    bar.set_postfix("import into Relax, lower")
    mod = import_relax(prepared)
    outputs = _output_specs(mod, prepared)
    int8_counts: dict[str, int] = {}
    mod, used_layout = lower(mod, spec, layout=layout, int8_table=int8_table, int8_counts=int8_counts,
                             fast_math=fast_math, winograd=winograd, rewrites=int8_counts)
    t2 = time.perf_counter()
    bar.update()
    bar.set_postfix("tune" if trials or minutes else "tuning records")
    info = CompileInfo(target=spec.name, target_config=spec.config, layout=used_layout, const_inputs=pinned)
    if padded:
        info.rewrites["padded_convs"] = padded
    info.rewrites.update({k: v for k, v in int8_counts.items() if v})
    database = None
    if trials or minutes:
        from .tuning import tune

        database, info.tuning = tune(mod, spec, trials=trials, minutes=minutes, cache_dir=cache_dir, rpc=rpc,
                                     progress=progress)
    else:  # apply what the cache holds for these workloads, if anything
        from .tuning import open_database

        database = open_database(spec, cache_dir, create=False, best=True) or open_database(spec, cache_dir,
                                                                                           create=False)
    t3 = time.perf_counter()
    bar.update()
    bar.set_postfix("schedule, build")
    pristine = {gv.name_hint: f for gv, f in mod.functions_items()} if spec.device == "cuda" else {}
    mod, info.schedules = schedule(mod, spec, database=database, default_schedules=default_schedules)
    ex = build(mod, spec)
    if spec.device == "cuda":
        mod, ex, info.schedules, fixed = _fix_gpu_hazards(mod, pristine, info.schedules, ex, spec)
        if fixed:
            info.rewrites["rescheduled_gpu_kernels"] = len(fixed)
    t4 = time.perf_counter()
    bar.update()
    from .schedules import naive_kernels

    info.naive_kernels = naive_kernels(mod)
    info.times = {"prepare_s": t1 - t0, "import_lower_s": t2 - t1, "tune_s": t3 - t2, "schedule_build_s": t4 - t3}
    logger.info("compiled for %s in %.1f s (%s; %d naive kernels%s)", spec.name, t4 - t0,
                ", ".join(f"{k} {v}" for k, v in _count(info.schedules).items()), len(info.naive_kernels),
                f": {', '.join(info.naive_kernels[:5])}" if info.naive_kernels else "")
    compiled = CompiledModel(ex, spec, inputs, outputs, info)
    compiled.ir_module = mod
    if cacheable:
        _store_build(compiled, spec, cache_dir, key)
    bar.close()
    return compiled


# -- the build cache --------------------------------------------------------------------------


def _builds_dir(spec: TargetSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
    from .tuning import cache_path

    return cache_path(spec, cache_dir) / "builds"


def _database_state(spec: TargetSpec, cache_dir: str | os.PathLike[str] | None) -> str:
    """Names, sizes and mtimes of the tuning database files: changes whenever a record is added."""
    from .tuning import cache_path

    root = cache_path(spec, cache_dir)
    if not root.is_dir():
        return "empty"
    parts = []
    for f in sorted(root.rglob("*.json")):
        rel = f.relative_to(root)
        if rel.parts[0] in ("builds", "logs"):
            continue
        st = f.stat()
        parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else "empty"


def _build_key(prepared: Model, inputs: Sequence[IOSpec], spec: TargetSpec, options: Mapping[str, Any]) -> str:
    """Everything a build depends on except the database state (added at lookup/store time)."""
    import tvm

    from graphopt.onnx_io import to_proto

    h = hashlib.sha256()
    h.update(to_proto(prepared).SerializeToString(deterministic=True))
    h.update(json.dumps({"inputs": [asdict(i) for i in inputs], "target": spec.config, "options": dict(options),
                         "tvm": getattr(tvm, "__version__", "?")}, sort_keys=True, default=str).encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):  # graphopt's schedules and lowering
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _build_path(spec: TargetSpec, cache_dir: str | os.PathLike[str] | None, key: str) -> Path:
    """Where the build with ``key`` lives for the tuning database as it is now."""
    return _builds_dir(spec, cache_dir) / f"{key}-{_database_state(spec, cache_dir)[:16]}.so"


def _cached_build(spec: TargetSpec, cache_dir: str | os.PathLike[str] | None, key: str) -> CompiledModel | None:
    path = _build_path(spec, cache_dir, key)
    if not path.is_file():
        return None
    try:
        return load_compiled(path)
    except CompileError as exc:  # a damaged entry is rebuilt, not fatal
        logger.warning("ignoring the cached build %s: %s", path, exc)
        return None


def _store_build(compiled: CompiledModel, spec: TargetSpec, cache_dir: str | os.PathLike[str] | None,
                 key: str) -> None:
    """Export into the cache under the database state *after* tuning, which is what the next
    compile of the same model finds (best effort: a failure only costs the next compile time)."""
    path = _build_path(spec, cache_dir, key)
    d = path.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob(f"{key}-*.so*"):  # older database states of this build are stale now
            old.unlink()
        compiled.export(path)
        compiled.path = None  # where the user exports it is still theirs to choose
    except (OSError, CompileError) as exc:
        logger.warning("could not cache the build: %s", exc)


def _count(d: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in d.values():
        out[v] = out.get(v, 0) + 1
    return out


def _output_specs(mod: Any, model: Model) -> list[IOSpec]:
    from tvm import relax

    ret = mod["main"].ret_ty
    infos = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in model.graph.outputs]
    out = []
    for i, si in enumerate(infos):
        shp = getattr(si, "shape", None)
        shape = tuple(int(d) for d in shp.values) if shp is not None and hasattr(shp, "values") else ()
        out.append(IOSpec(names[i] if i < len(names) else f"output_{i}", shape, str(si.dtype)))
    return out
