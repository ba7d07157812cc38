"""LSTM, GRU and RNN unrolled into standard ONNX ops (MatMul, Add, Mul, activations, Split, Concat).

Why: TVM's Relax ONNX frontend converts none of the recurrent ops, and many real models carry
one (CRNN text recognizers, streaming VADs). With the sequence length fixed (the compile path
fixes input shapes) a recurrent op is a fixed chain of small dense steps, which every backend
compiles. The rewrite is exact up to float rounding (the same products, summed in a different
order).

What is covered: all three ops, every ``direction`` (forward, reverse, bidirectional), both
``layout`` values, ``initial_h``/``initial_c`` (absent = zeros), peepholes ``P``, ``clip``,
``input_forget`` (LSTM), ``linear_before_reset`` (GRU), every activation the spec allows
(Relu, Tanh, Sigmoid, Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign,
Softplus) with ``activation_alpha``/``activation_beta``, and ``sequence_lens`` absent or constant
and equal to the full length for every batch entry. Weights ``W``/``R``/``B``/``P`` must be
constants (they are after constant folding) or ``DequantizeLinear`` of constants (QDQ models);
the batch dim may stay symbolic.

A node it cannot lower (sequence length unknown, per-entry sequence lengths, weights computed at
run time, an unknown activation) is left unchanged, logged with the reason, and listed in the
pass's ``report['left']`` (node name -> reason).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from graphopt import Graph, Node, Value, register_pass
from graphopt.ir import np_dtype

from .base import NodeLowering
from .base import Refuse as _Refuse

#: gates per op, in the order ONNX stacks them in W, R and B
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: activations per direction, and their defaults
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
#: activations that read (alpha, beta) from activation_alpha/activation_beta, with ORT's defaults
_PARAMS: dict[str, tuple[float | None, float | None]] = {
    "affine": (1.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None), "scaledtanh": (1.0, 1.0),
    "hardsigmoid": (0.2, 0.5), "elu": (1.0, None),
}
_SIMPLE = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign", "softplus": "Softplus"}


class _Builder:
    """Emits nodes before one reference node, naming them after it."""

    def __init__(self, graph: Graph, ref: Node, opset: int, dtype: np.dtype) -> None:
        self.g, self.ref, self.opset, self.dtype = graph, ref, opset, dtype
        self.base = ref.name or ref.op_type.lower()
        self.quantize = False
        #: this direction's recurrent weight as (q [K, N], scale, zero point) when the products are integer
        self.int_r: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.int_cache: dict[tuple[int, int], tuple[Value, ...]] = {}

    def int_product(self, dql: Node, w: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Value:
        """``float(sum (xq - zx)(q - z)) * (x_scale * scale)`` of a ``DynamicQuantizeLinear``'s outputs
        and an integer weight ``(q [K, N], scale, zero point)``, as ORT's quantized LSTM computes it."""
        from .integer import integer_matmul

        q, scale, z = w
        acc = integer_matmul(self.g, self.ref, dql.output(0), dql.output(2), q, z, self.opset, self.int_cache)
        assert acc is not None  # checked by _integer_weights
        s = self.one("Mul", dql.output(1), self.const(np.asarray(scale, np.float32), "wscale"))
        return self.one("Mul", acc, s)

    def qdq(self, x: Value) -> Value:
        """``x`` through uint8 dynamic quantization (when this node's products are quantized)."""
        if not self.quantize:
            return x
        q = self.op("DynamicQuantizeLinear", [x], num_outputs=3)
        return self.one("DequantizeLinear", q.output(0), q.output(1), q.output(2))

    def const(self, a: np.ndarray, tag: str) -> Value:
        return self.g.add_initializer(f"{self.base}_{tag}", np.asarray(a))

    def op(self, op_type: str, inputs: list[Value | None], attrs: dict[str, Any] | None = None, *,
           num_outputs: int = 1) -> Node:
        return self.g.make_node(op_type, inputs, attrs or {}, num_outputs=num_outputs, before=self.ref,
                                name=self.g.fresh_name(f"{self.base}/{op_type}"))

    def one(self, op_type: str, *inputs: Value | None, **attrs: Any) -> Value:
        return self.op(op_type, list(inputs), attrs).output(0)

    def scalar(self, x: float) -> Value:
        return self.const(np.array(x, self.dtype), "k")

    def reshape(self, x: Value, shape: list[int]) -> Value:
        return self.one("Reshape", x, self.const(np.array(shape, np.int64), "shape"))

    def split(self, x: Value, sizes: list[int], axis: int) -> list[Value]:
        if len(sizes) == 1:
            return [x]
        if self.opset < 13:  # Split-2/11: sizes are an attribute
            n = self.op("Split", [x], {"axis": axis, "split": sizes}, num_outputs=len(sizes))
        else:
            n = self.op("Split", [x, self.const(np.array(sizes, np.int64), "sizes")], {"axis": axis},
                        num_outputs=len(sizes))
        return list(n.outputs)

    def clip(self, x: Value, c: float) -> Value:
        if self.opset < 11:
            return self.one("Clip", x, min=-c, max=c)
        return self.one("Clip", x, self.scalar(-c), self.scalar(c))

    def activation(self, x: Value, act: tuple[str, float | None, float | None]) -> Value:
        name, alpha, beta = act
        if name == "tanh" and self.quantize:
            # the state is quantized again every step, so an error of 1e-5 (TVM's fast_tanh, which
            # fast-math builds use) moves it across rounding steps of the next quantization; as
            # 2 * sigmoid(2x) - 1 the error stays ~1e-7 absolute with fast math too (ddddocr_ocr_int8:
            # 3.4e-4 of the range off ORT with Tanh, 2.3e-4 as without fast math)
            two = self.scalar(2.0)
            return self.one("Sub", self.one("Mul", self.one("Sigmoid", self.one("Mul", x, two)), two), self.scalar(1.0))
        if name in _SIMPLE:
            return self.one(_SIMPLE[name], x)
        if name == "affine":
            return self.one("Add", self.one("Mul", x, self.scalar(alpha)), self.scalar(beta))
        if name == "scaledtanh":
            return self.one("Mul", self.one("Tanh", self.one("Mul", x, self.scalar(beta))), self.scalar(alpha))
        if name == "leakyrelu":
            return self.one("LeakyRelu", x, alpha=float(alpha))
        if name == "elu":
            return self.one("Elu", x, alpha=float(alpha))
        if name == "hardsigmoid":
            return self.one("HardSigmoid", x, alpha=float(alpha), beta=float(beta))
        if name == "thresholdedrelu":  # ThresholdedRelu is opset 10+; as Mul(x, Greater(x, alpha)) everywhere
            mask = self.one("Cast", self.one("Greater", x, self.scalar(alpha)),
                            to=int(_onnx_dtype(self.dtype)))
            return self.one("Mul", x, mask)
        raise AssertionError(name)


def _onnx_dtype(dt: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def _activations(n: Node, dirs: int) -> list[tuple[str, float | None, float | None]]:
    """The node's activations per direction (flattened: dirs * per-op count), with parameters
    taken in order from activation_alpha/activation_beta as ONNX Runtime consumes them."""
    per = len(DEFAULT_ACTIVATIONS[n.op_type])
    names = n.attr("activations")
    if names is None:
        names = DEFAULT_ACTIVATIONS[n.op_type] * dirs
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in names]
    if len(names) == per and dirs == 2:
        names = names * 2
    if len(names) != per * dirs:
        raise _Refuse(f"{len(names)} activations for {dirs} direction(s) (expected {per * dirs})")
    alphas = list(n.attr("activation_alpha") or [])
    betas = list(n.attr("activation_beta") or [])
    out = []
    for a in names:
        key = a.lower()
        if key not in _SIMPLE and key not in _PARAMS:
            raise _Refuse(f"activation {a!r} is not one ONNX defines for {n.op_type}")
        alpha = beta = None
        if key in _PARAMS:
            da, db = _PARAMS[key]
            if da is not None:
                alpha = float(alphas.pop(0)) if alphas else da
            if db is not None:
                beta = float(betas.pop(0)) if betas else db
        out.append((key, alpha, beta))
    return out


def _dequantized_constant(v: Value) -> np.ndarray | None:
    """The float value of ``DequantizeLinear(constant, constant scale[, constant zero point])``
    (a QDQ model's weight), or None."""
    p = v.producer
    if p is None or p.op_type != "DequantizeLinear":
        return None
    q, s = p.input(0).const_value(), p.input(1).const_value()
    z = p.input(2).const_value() if len(p.inputs) > 2 and p.input(2) is not None else np.zeros((), np.int64)
    if q is None or s is None or z is None:
        return None
    shape = [1] * q.ndim
    if np.ndim(s) == 1 and q.ndim:
        shape[int(p.attr("axis", 1)) % q.ndim] = -1
    w = (q.astype(np.float64) - np.asarray(z, np.float64).reshape(shape if np.ndim(z) == 1 else ())) \
        * np.asarray(s, np.float64).reshape(shape if np.ndim(s) == 1 else ())
    return w.astype(np.asarray(s).dtype)


def _integer_weights(w: dict[str, Any] | None, dirs: int, gh: int) -> dict[str, list[tuple]] | None:
    """Per direction ``(q [K, 4H], scale, zero point)`` of ``DynamicQuantizeLSTM`` weights, scales
    and zero points per direction or per channel; None when they do not fit (the float products
    of dequantized weights are used then)."""
    if not w:
        return None
    out: dict[str, list[tuple]] = {}
    for key in ("W", "R"):
        q, s, z = (np.asarray(a) for a in w[key])
        if q.ndim != 3 or q.shape[0] != dirs or q.shape[2] != gh or q.dtype not in (np.int8, np.uint8):
            return None
        per = []
        for d in range(dirs):
            sd = s.reshape(dirs, -1)[d] if s.size in (dirs, dirs * gh) else None
            zd = z.reshape(dirs, -1)[d] if z.size in (dirs, dirs * gh) else None
            if sd is None or zd is None:
                return None
            qz = q[d].astype(np.int64) - zd.astype(np.int64).reshape(1, -1)
            if np.any(qz.max(axis=0) - qz.min(axis=0) > 255):
                return None
            per.append((q[d], sd.reshape(-1) if sd.size > 1 else sd.reshape(()), zd.reshape(-1) if zd.size > 1
                        else zd.reshape(())))
        out[key] = per
    return out


def _const(n: Node, i: int, what: str) -> np.ndarray | None:
    v = n.input(i) if i < len(n.inputs) else None
    if v is None:
        return None
    c = v.const_value()
    if c is None:
        c = _dequantized_constant(v)
    if c is None:
        raise _Refuse(f"{what} ({v.name!r}) is computed at run time; only constant weights are lowered")
    return c


@register_pass
class LowerRecurrent(NodeLowering):
    """LSTM/GRU/RNN unrolled over their (static) sequence length into standard ops.

    Options: ``ops`` (which of LSTM, GRU, RNN to lower), ``max_steps`` (refuse longer sequences:
    the unrolled graph grows linearly with the length), ``quantize_inputs`` (names of nodes whose
    input sequence and recurrent state are quantized to uint8 before each product with
    ``DynamicQuantizeLinear -> DequantizeLinear``, as ONNX Runtime's ``DynamicQuantizeLSTM`` does
    with its integer weights; set by ``lower-integer``), ``integer_weights`` (node name ->
    ``{"W": (q, scale, zero point), "R": ...}`` with ``q`` as ``DynamicQuantizeLSTM`` stores it,
    ``[dirs, K, 4H]``, and scales per direction: for those quantized nodes each product is the
    integer one ORT computes - ``MatMulInteger`` of the uint8 input or state with the int8
    weight, scaled once by ``x_scale * w_scale`` - rather than a float product of dequantized
    values, which rounds differently).
    """

    name = "lower-recurrent"
    default_options: ClassVar[dict[str, Any]] = {"ops": ("LSTM", "GRU", "RNN"), "max_steps": 4096,
                                                  "quantize_inputs": (), "integer_weights": {}}

    # -- one node ---------------------------------------------------------------------------
    def lower_node(self, graph: Graph, n: Node, opset: int) -> None:
        op = n.op_type
        G = GATES[op]
        H = int(n.attr("hidden_size") or 0)
        x = n.input(0)
        direction = n.attr("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else str(direction)
        if direction not in ("forward", "reverse", "bidirectional"):
            raise _Refuse(f"direction {direction!r} is not forward, reverse or bidirectional")
        dirs = 2 if direction == "bidirectional" else 1
        layout = int(n.attr("layout", 0) or 0)
        W, R, B = _const(n, 1, "W"), _const(n, 2, "R"), _const(n, 3, "B")
        if W is None or R is None:
            raise _Refuse("W or R is missing")
        if H <= 0:
            H = R.shape[-1]
        if W.shape[0] != dirs or W.shape[1] != G * H or R.shape != (dirs, G * H, H):
            raise _Refuse(f"W {list(W.shape)} / R {list(R.shape)} do not match {dirs} direction(s) of {G}x{H} gates")
        if x is None or x.shape is None or len(x.shape) != 3:
            raise _Refuse("the input's rank is unknown")
        seq = x.shape[1 if layout else 0]
        if not isinstance(seq, int) or seq <= 0:
            raise _Refuse(f"the sequence length ({seq!r}) is not static; fix the input shapes first")
        if seq > self.options["max_steps"]:
            raise _Refuse(f"sequence length {seq} is over max_steps={self.options['max_steps']}")
        lens = n.input(4) if len(n.inputs) > 4 else None
        if lens is not None:
            lv = lens.const_value()
            if lv is None:
                raise _Refuse("sequence_lens is computed at run time; only absent or full lengths are lowered")
            if np.any(np.asarray(lv) != seq):
                raise _Refuse(f"sequence_lens {np.asarray(lv).tolist()} are not all the full length {seq}")
        h0 = n.input(5) if len(n.inputs) > 5 else None
        c0 = n.input(6) if op == "LSTM" and len(n.inputs) > 6 else None
        P = _const(n, 7, "P") if op == "LSTM" else None
        acts = _activations(n, dirs)
        clip = n.attr("clip")
        input_forget = bool(n.attr("input_forget", 0)) if op == "LSTM" else False
        lbr = bool(n.attr("linear_before_reset", 0)) if op == "GRU" else False
        dtype = W.dtype
        if x.dtype is not None:
            dtype = np.dtype(np_dtype(x.dtype))
        b = _Builder(graph, n, opset, dtype)
        b.quantize = bool(n.name) and n.name in self.options["quantize_inputs"]
        ints = _integer_weights(self.options["integer_weights"].get(n.name), dirs, G * H) if b.quantize else None

        # time-major input [seq, batch, in]
        xt = b.one("Transpose", x, perm=[1, 0, 2]) if layout else x
        xq = b.op("DynamicQuantizeLinear", [xt], num_outputs=3) if ints is not None else None
        xt = b.qdq(xt) if ints is None else xt  # the whole sequence in one product: one scale (ORT's quantized LSTM)
        if h0 is not None and layout:
            h0 = b.one("Transpose", h0, perm=[1, 0, 2])
        if c0 is not None and layout:
            c0 = b.one("Transpose", c0, perm=[1, 0, 2])
        h0s = b.split(h0, [1] * dirs, 0) if h0 is not None else [None] * dirs
        c0s = b.split(c0, [1] * dirs, 0) if c0 is not None else [None] * dirs

        ys, hs, cs = [], [], []
        for d in range(dirs):
            reverse = direction == "reverse" or d == 1
            wb = B[d, :G * H] if B is not None else np.zeros(G * H, dtype)
            rb = B[d, G * H:] if B is not None else np.zeros(G * H, dtype)
            # every step's input projection in one MatMul (for GRU's h gate with
            # linear_before_reset the recurrent bias stays inside the reset product)
            bias = wb + rb
            if op == "GRU" and lbr:
                bias = np.concatenate([(wb + rb)[:2 * H], wb[2 * H:]])
            if ints is not None:
                b.int_r = ints["R"][d]
                proj = b.int_product(xq, ints["W"][d])
            else:
                proj = b.one("MatMul", xt, b.const(np.ascontiguousarray(W[d].T).astype(dtype), "W"))
            if B is not None:
                proj = b.one("Add", proj, b.const(bias.astype(dtype), "B"))
            steps = b.split(proj, [1] * seq, 0)
            steps = [b.reshape(s, [-1, G * H]) for s in steps]
            h = b.reshape(h0s[d], [-1, H]) if h0s[d] is not None else None
            c = b.reshape(c0s[d], [-1, H]) if c0s[d] is not None else None
            a = acts[d * len(DEFAULT_ACTIVATIONS[op]):(d + 1) * len(DEFAULT_ACTIVATIONS[op])]
            p = P[d] if P is not None else None
            out: list[Value | None] = [None] * seq
            for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
                if op == "LSTM":
                    h, c = self._lstm_step(b, steps[t], h, c, R[d], p, H, a, clip, input_forget, dtype)
                elif op == "GRU":
                    h = self._gru_step(b, steps[t], h, R[d], rb[2 * H:] if lbr else None, H, a, clip, lbr, dtype)
                else:
                    pre = steps[t] if h is None else b.one("Add", steps[t], b.one(
                        "MatMul", h, b.const(np.ascontiguousarray(R[d].T).astype(dtype), "R")))
                    h = b.activation(b.clip(pre, clip) if clip is not None else pre, a[0])
                out[t] = h
            ys.append(out)
            hs.append(h)
            cs.append(c)

        # outputs: Y [seq, dirs, batch, H], Y_h / Y_c [dirs, batch, H] (layout 1: batch first)
        want = [o for o in n.outputs]
        results: list[Value | None] = [None] * len(want)
        if want and want[0].consumers() or (want and want[0].is_graph_output()):
            per_dir = [b.one("Concat", *[b.reshape(v, [1, 1, -1, H]) for v in ys[d]], axis=0) if seq > 1
                       else b.reshape(ys[d][0], [1, 1, -1, H]) for d in range(dirs)]
            y = b.one("Concat", *per_dir, axis=1) if dirs > 1 else per_dir[0]
            results[0] = b.one("Transpose", y, perm=[2, 0, 1, 3]) if layout else y
        for k, states in ((1, hs), (2, cs)):
            if k >= len(want) or not (want[k].consumers() or want[k].is_graph_output()):
                continue
            parts = [b.reshape(s, [1, -1, H]) for s in states]
            v = b.one("Concat", *parts, axis=0) if dirs > 1 else parts[0]
            results[k] = b.one("Transpose", v, perm=[1, 0, 2]) if layout else v
        for old, new in zip(want, results, strict=True):
            if new is not None:
                new.dtype, new.shape = old.dtype, old.shape
                graph.replace_all_uses_with(old, new)
        graph.remove(n, safe=False)

    @staticmethod
    def _recurrent(b: _Builder, x: Value, h: Value | None, R: np.ndarray, tag: str) -> Value:
        if h is None:  # zero state: no recurrent term
            return x
        if b.int_r is not None:
            return b.one("Add", x, b.int_product(b.op("DynamicQuantizeLinear", [h], num_outputs=3), b.int_r))
        return b.one("Add", x, b.one("MatMul", b.qdq(h), b.const(np.ascontiguousarray(R.T), tag)))

    def _lstm_step(self, b: _Builder, xw: Value, h: Value | None, c: Value | None, R: np.ndarray,
                   p: np.ndarray | None, H: int, acts: list, clip: float | None, input_forget: bool,
                   dtype: np.dtype) -> tuple[Value, Value]:
        pre = self._recurrent(b, xw, h, R.astype(dtype), "R")
        i, o, f, g = b.split(pre, [H] * 4, 1)
        fa, ga, ha = acts

        def gate(v: Value, peep: np.ndarray | None, state: Value | None, act: tuple) -> Value:
            if peep is not None and state is not None:
                v = b.one("Add", v, b.one("Mul", state, b.const(peep.astype(dtype), "P")))
            if clip is not None:
                v = b.clip(v, clip)
            return b.activation(v, act)

        it = gate(i, p[:H] if p is not None else None, c, fa)
        ft = b.one("Sub", b.scalar(1.0), it) if input_forget else gate(f, p[2 * H:] if p is not None else None, c, fa)
        ct = gate(g, None, None, ga)
        new_c = b.one("Mul", it, ct)
        if c is not None:
            new_c = b.one("Add", b.one("Mul", ft, c), new_c)
        ot = gate(o, p[H:2 * H] if p is not None else None, new_c, fa)
        return b.one("Mul", ot, b.activation(new_c, ha)), new_c

    def _gru_step(self, b: _Builder, xw: Value, h: Value | None, R: np.ndarray, rbh: np.ndarray | None, H: int,
                  acts: list, clip: float | None, lbr: bool, dtype: np.dtype) -> Value:
        fa, ga = acts
        xz, xr, xh = b.split(xw, [H] * 3, 1)
        R = R.astype(dtype)
        if h is not None:
            zr = b.one("Add", b.one("Concat", xz, xr, axis=1),
                       b.one("MatMul", h, b.const(np.ascontiguousarray(R[:2 * H].T), "Rzr")))
            pz, pr = b.split(zr, [H, H], 1)
        else:
            pz, pr = xz, xr
        z = b.activation(b.clip(pz, clip) if clip is not None else pz, fa)
        r = b.activation(b.clip(pr, clip) if clip is not None else pr, fa)
        Rh = b.const(np.ascontiguousarray(R[2 * H:].T), "Rh")
        if lbr:  # Xt*Wh + rt (.) (Ht-1*Rh + Rbh) + Wbh
            rec = b.one("MatMul", h, Rh) if h is not None else None
            if rbh is not None:
                bias = b.const(rbh.astype(dtype), "Rbh")
                rec = b.one("Add", rec, bias) if rec is not None else b.one("Mul", r, bias)
                term = b.one("Mul", r, rec) if h is not None else rec
            else:
                term = b.one("Mul", r, rec) if rec is not None else None
        else:  # Xt*Wh + (rt (.) Ht-1)*Rh + Rbh + Wbh (both biases are in xh already)
            term = b.one("MatMul", b.one("Mul", r, h), Rh) if h is not None else None
        ph = b.one("Add", xh, term) if term is not None else xh
        hh = b.activation(b.clip(ph, clip) if clip is not None else ph, ga)
        # Ht = (1 - zt) (.) ht + zt (.) Ht-1
        new = b.one("Mul", b.one("Sub", b.scalar(1.0), z), hh)
        if h is not None:
            new = b.one("Add", new, b.one("Mul", z, h))
        return new
