"""Peak activation memory before and after memory-aware scheduling, on branchy nets.

For each model: the peak of the original model; then simplify with the default pipeline's
fixpoint group (fusions remove intermediate tensors), then run ``schedule-memory``; report the
peak live activation bytes of the simplified input order and of the scheduled order (sizes from
static shapes; batch 1), a lower bound no order can beat, and the pipeline's exactness.

Run:  python benchmarks/memory.py      Saves benchmarks/results/memory.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

import graphopt
from graphopt.runtime import compare, make_inputs

DATA = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
HERE = Path(__file__).resolve().parent


def level_order(g: graphopt.Graph) -> None:
    """Re-sort nodes breadth-first by depth (a valid topological order that interleaves
    branches, as some converters write graphs) - the kind of input order scheduling fixes."""
    depth: dict[graphopt.Node, int] = {}
    for n in g:
        ds = [depth[v.producer] + 1 for v in n.inputs if v is not None and v.producer in depth]
        depth[n] = max(ds, default=0)
    g.reorder(sorted(g.nodes, key=lambda n: depth[n]))


def main() -> None:
    import graphopt.passes as gp

    rows = []
    paths = [DATA / f"light_{n}.onnx" for n in ("inception_v1", "inception_v2", "densenet121", "squeezenet",
                                              "shufflenet", "resnet50")]
    paths += sorted((HERE / "models").glob("*.onnx"))
    cases = [(p, False) for p in paths] + [(p, True) for p in paths[:6]]
    for p, shuffle in cases:
        m = graphopt.load(p)
        orig = m.copy()
        from graphopt.analysis import infer_shapes, peak_memory

        graphopt.run_passes(orig, ["lift-initializer-inputs"])
        infer_shapes(orig, {v.name: [1 if not isinstance(d, int) else d for d in v.shape]
                            for v in orig.graph.inputs if v.const is None and v.shape is not None})
        orig_peak = peak_memory(orig.graph).peak_bytes
        feeds = make_inputs(m)
        ref = graphopt.run_ort(p, feeds)
        pipe = gp.default_pipeline()
        lift, simplify = pipe.passes[0], pipe.passes[1]
        graphopt.run_passes(m, [lift, simplify])
        if shuffle:
            level_order(m.graph)
        sched = graphopt.get_pass("schedule-memory")
        graphopt.run_passes(m, [sched])
        before, after = sched.last if sched.last else (0, 0)
        ok = compare(ref, graphopt.run_ort(m, feeds), rtol=1e-3, atol=1e-4).ok
        name = p.stem + (" (level order)" if shuffle else "")
        rows.append({"model": name, "original_peak": orig_peak, "peak_before": before, "peak_after": min(before, after), "bound": sched.bound,
                     "reduction": 1 - min(before, after) / before if before else 0.0, "outputs_equal": ok})
        print(f"| {name} | {orig_peak / 2**20:.2f} | {before / 2**20:.2f} | {min(before, after) / 2**20:.2f} | "
              f"{rows[-1]['reduction'] * 100:.1f}% | {(sched.bound or 0) / 2**20:.2f} | {'yes' if ok else 'NO'} |",
              flush=True)
    print("\nPatch-based inference (`--pipeline memory`: default, then tile-spatial, then schedule-memory); "
          "weights randomized, logits compared; ORT ENABLE_ALL latency, settled interleaving:\n")
    print("| model | default peak MiB | memory peak MiB | reduction | regions (bands) | extra FLOPs | nodes | "
          "ORT ms default | ORT ms memory | max abs diff |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|")
    tiled = [tile_row(p) for p in paths[:6]]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory.json").write_text(json.dumps({"scheduling": rows, "tiling": tiled}, indent=2) + "\n")


def tile_row(p: Path) -> dict:
    """The default pipeline's output vs the memory pipeline's on one model."""
    import graphopt.passes as gp

    from graphopt.analysis import peak_memory
    from graphopt.runtime import interleaved_timings, ort_session
    from graphopt.testing import logits_outputs, randomize_weights

    m = logits_outputs(randomize_weights(graphopt.load(p)))
    graphopt.run_passes(m, [gp.default_pipeline()])
    base = m.copy()
    tp = graphopt.get_pass("tile-spatial")
    graphopt.run_passes(m, [tp, "schedule-memory"])
    feeds = make_inputs(base)
    ra, rb = graphopt.run_ort(base, feeds), graphopt.run_ort(m, feeds)
    diff = max(float(abs(ra[k] - rb[k]).max()) for k in ra)
    sa, sb = ort_session(base, optimize=True), ort_session(m, optimize=True)
    t = interleaved_timings({"default": lambda: sa.run(None, feeds), "memory": lambda: sb.run(None, feeds)}, rounds=15)
    before, after = tp.report["peak_before"], peak_memory(m.graph).peak_bytes
    flops0 = tp.report["flops_before"]
    row = {"model": p.stem, "peak_default": before, "peak_memory": after, "reduction": 1 - after / before,
           "regions": [(r["region"], r["bands"]) for r in tp.report["regions"]],
           "extra_flops": tp.report["extra_flops"], "extra_flops_ratio": tp.report["extra_flops"] / flops0,
           "nodes": (len(base.graph), len(m.graph)), "ort_ms": (t["default"], t["memory"]), "max_abs_diff": diff}
    print(f"| {p.stem} | {before / 2**20:.2f} | {after / 2**20:.2f} | {row['reduction'] * 100:.0f}% | "
          f"{', '.join(f'{r[0]} ({r[1]})' for r in row['regions']) or '-'} | +{row['extra_flops_ratio'] * 100:.1f}% | "
          f"{len(base.graph)} -> {len(m.graph)} | {t['default']:.2f} | {t['memory']:.2f} | {diff:.1e} |", flush=True)
    return row


if __name__ == "__main__":
    print("| model | original model peak MiB | simplified, input order | scheduled | scheduling gain | lower bound MiB |"
          " outputs equal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    main()
