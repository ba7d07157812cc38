"""The report model: every command's --report as JSON (against the shipped JSON Schema),
markdown and HTML; typed numbers; the console without dict reprs or zero counters."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import FIXTURES

from graphopt.report import (
    SCHEMA_ID,
    Candidate,
    Latency,
    LayerRow,
    ModelSummary,
    OutputCheck,
    PassRow,
    Report,
    load_schema,
    report_from_dict,
)

CALIB = FIXTURES / "digits_calib.npz"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], check=False, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=600)


# -- checking a document against the schema -------------------------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(v: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, int | float) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def check_schema(doc: Any, schema: dict, root: dict | None = None, where: str = "$") -> None:
    """The subset of JSON Schema the report schema uses (type, const, enum, minimum, maximum,
    properties, required, additionalProperties, items, anyOf, $ref); jsonschema is not a
    dependency. Raises AssertionError naming the path of the first violation."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        return check_schema(doc, root["$defs"][name], root, where)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return check_schema(doc, sub, root, where)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: matches none of anyOf: {errors}")
    if "const" in schema:
        assert doc == schema["const"], f"{where}: {doc!r} != {schema['const']!r}"
    if "enum" in schema:
        assert doc in schema["enum"], f"{where}: {doc!r} not in {schema['enum']}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_is(doc, t) for t in types), f"{where}: {doc!r} is not {types}"
    if _is(doc, "number"):
        if "minimum" in schema:
            assert doc >= schema["minimum"], f"{where}: {doc} < {schema['minimum']}"
        if "maximum" in schema:
            assert doc <= schema["maximum"], f"{where}: {doc} > {schema['maximum']}"
    if isinstance(doc, dict):
        for k in schema.get("required", []):
            assert k in doc, f"{where}: missing {k!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in doc.items():
            if k in props:
                check_schema(v, props[k], root, f"{where}.{k}")
            elif extra is False:
                raise AssertionError(f"{where}: unexpected property {k!r}")
            elif isinstance(extra, dict):
                check_schema(v, extra, root, f"{where}.{k}")
    if isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            check_schema(v, schema["items"], root, f"{where}[{i}]")


def validate(doc: dict) -> None:
    """Against the shipped schema: jsonschema where installed, and always the structural check."""
    schema = load_schema()
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(doc, schema)
    check_schema(doc, schema)


def embedded_json(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="graphopt-report">(.*?)</script>', html, re.DOTALL)
    assert m, "no embedded report"
    return json.loads(m.group(1).replace("<\\/", "</"))


_NUMBERISH = re.compile(r"^\s*-?\d+(\.\d+)?(e-?\d+)?\s*(x|%|KiB|MiB|B|ms|s)?\s*$")


def no_number_strings(doc: Any, where: str = "$") -> None:
    """Numbers are numbers: no string value anywhere that is a formatted number ('1.751',
    '52.17 KiB', '0.27x'), except names and free text."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            no_number_strings(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            no_number_strings(v, f"{where}[{i}]")
    elif isinstance(doc, str) and not where.endswith((".name", ".path", ".input", ".output", ".graphopt_version")):
        assert not _NUMBERISH.match(doc) and "->" not in doc, f"{where}: number as text {doc!r}"


# -- the schema itself ------------------------------------------------------------------------------


def test_schema_validator_catches_violations() -> None:
    """The structural check is not vacuous: strings for numbers, a missing section, an unknown
    field and a bad schema id all fail."""
    good = Report("quantize", before=ModelSummary(nodes=3, size_bytes=100), after=ModelSummary(nodes=5),
                  passes=[PassRow("fold", changed=True, seconds=0.1, nodes_before=3, nodes_after=2)]).to_dict()
    validate(good)
    for mutate in (lambda d: d["before"].__setitem__("size_bytes", "100 B"),
                   lambda d: d["passes"][0].__setitem__("seconds", "0.1"),
                   lambda d: d.pop("layers"),
                   lambda d: d.__setitem__("extra", 1),
                   lambda d: d.__setitem__("schema", "graphopt.report/0"),
                   lambda d: d["passes"][0].__setitem__("nodes_after", -1)):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(AssertionError):
            check_schema(bad, load_schema())


def test_report_roundtrip_and_strict_json() -> None:
    """to_dict -> JSON -> report_from_dict gives the same report; NaN becomes null (strict JSON)."""
    r = Report("compress", input="a.onnx", output="b.onnx", seconds=1.5, input_shapes={"x": [1, 3, 8, 8]},
               before=ModelSummary(nodes=10, params=1000, size_bytes=4000, flops=10**6, ops={"Conv": 3}),
               after=ModelSummary(nodes=10, params=250, size_bytes=1000, flops=250000),
               passes=[PassRow("prune-channels", seconds=0.2, params_before=1000, params_after=250,
                               output_rel_error=float("nan"))],
               layers=[LayerRow("conv1", change="12/16 channels kept", kept_fraction=0.75, source="prune-channels")],
               candidates=[Candidate("after prune", size_bytes=1000, latency_ms=1.0, error=0.01, chosen=True)],
               latency=Latency(2.0, 1.0, rounds=15))
    r.add_counters("prune", {"groups": 3, "zero": 0, "skipped": {}, "nested": {"a": 1, "b": 0}, "names": ["x", "y"]})
    assert r.counters == {"prune.groups": 3, "prune.nested.a": 1, "prune.names": 2}
    text = r.to_json()
    d = json.loads(text)
    assert d["schema"] == SCHEMA_ID and d["passes"][0]["output_rel_error"] is None and d["latency"]["ratio"] == 0.5
    validate(d)
    back = report_from_dict(d)
    assert back.to_dict() == d


def test_output_check_numbers() -> None:
    import numpy as np

    c = OutputCheck("random")
    a = {"y": np.array([[1.0, 2.0, 3.0]]), "i": np.array([1, 2])}
    c.add(a, {"y": np.array([[1.0, 2.5, 3.0]]), "i": np.array([1, 2])})
    c.add(a, {"y": np.array([[1.0, 2.0, np.inf]]), "i": np.array([1, 2])})  # counted, left out of the rest
    c.add(a, {"y": np.array([[4.0, 2.0, 3.0]]), "i": np.array([2, 1])})  # the arg-max moved
    v = c.result()
    assert v.samples == 3 and v.max_abs_error == pytest.approx(3.0) and v.nonfinite_values == 1
    assert v.top1_agreement == pytest.approx(2 / 3)  # float outputs only: 'i' is not a score vector
    # mean over samples x outputs of ||got - ref|| / ||ref||: y .5/|1,2,3|, 0, 3/|1,2,3|; i 0, 0, |1,-1|/|1,2|
    assert v.output_rel_error == pytest.approx((0.5 / 14**0.5 + 3 / 14**0.5 + 2**0.5 / 5**0.5) / 6)
    # non-numeric outputs (a ZipMap's list of dicts, strings) are left out, not a crash
    c2 = OutputCheck("inputs")
    zipmap = [{0: 0.25, 1: 0.75}]
    c2.add({"y": np.array([1.0, 2.0]), "probs": zipmap, "label": np.array(["a"])},
           {"y": np.array([1.0, 2.5]), "probs": [{0: 0.5, 1: 0.5}], "label": np.array(["a"])})
    assert c2.result().max_abs_error == pytest.approx(0.5)
    # top-1 only where the last axis holds class scores: not a detector's map, not unit-norm
    # embeddings; a recognizer's per-step softmax [N, T, C] counts
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 8))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    c3 = OutputCheck("inputs")
    c3.add({"map": rng.random((1, 1, 4, 6)), "emb": emb}, {"map": rng.random((1, 1, 4, 6)), "emb": emb[::-1].copy()})
    assert c3.result().top1_agreement is None
    steps = np.exp(rng.standard_normal((1, 5, 7)))
    steps /= steps.sum(-1, keepdims=True)
    c4 = OutputCheck("inputs")
    c4.add({"probs": steps}, {"probs": steps})
    assert c4.result().top1_agreement == 1.0


# -- every command's report -------------------------------------------------------------------------


def test_optimize_report_json(tmp_path: Path, example_path: Path) -> None:
    rj = tmp_path / "r.json"
    r = cli("optimize", str(example_path), "-o", str(tmp_path / "o.onnx"), "--verify", "2",
            "--input-shape", "input:2,1,8,8", "--report", str(rj))
    assert r.returncode == 0, r.stderr
    d = json.loads(rj.read_text())
    validate(d)
    no_number_strings(d)
    assert d["command"] == "optimize" and d["before"]["nodes"] == 19 and d["after"]["nodes"] == 11
    assert d["before"]["ops"]["BatchNormalization"] == 3 and "BatchNormalization" not in d["after"]["ops"]
    bn = next(p for p in d["passes"] if p["name"] == "fuse-conv-bn")
    assert bn["changed"] and bn["nodes_after"] < bn["nodes_before"] and bn["seconds"] >= 0
    assert d["verification"]["samples"] == 2 and d["verification"]["passed"] is True
    assert d["input_shapes"] == {"input": [2, 1, 8, 8]} and d["shapes_fixed"] is True


def test_quantize_report_markdown_and_console(tmp_path: Path, example_path: Path) -> None:
    """The defects of issue 17: empty markdown tables, no passes, a dict-repr console, zero
    counters. Now: populated sections and a console of short lines."""
    rep = tmp_path / "r.md"
    r = cli("quantize", str(example_path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(CALIB),
            "--report", str(rep))
    assert r.returncode == 0, r.stderr
    text = rep.read_text()
    for section in ("## Model", "## Per pass", "## Output check", "## Layers", "## Counters"):
        assert section in text, section
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| quantize-static") for ln in rows)
    layer_rows = [ln for ln in rows if "| int8 " in ln]
    assert len(layer_rows) == 5  # 3 Conv + 2 Gemm of the example model
    size = next(ln for ln in rows if ln.startswith("| size"))
    assert "KiB" in size and "x |" in size
    out = r.stdout
    assert max(len(ln) for ln in out.splitlines()) < 200, "console lines must be short"
    assert "{" not in out and "Counter(" not in out
    assert not re.search(r"^\S+\s+0$", out, re.MULTILINE), "zero counters on the console"
    assert "quantized_nodes" in out and "top-1 agreement" in out and "SQNR" in out


def test_quantize_report_html_has_plots_and_valid_json(tmp_path: Path, example_path: Path) -> None:
    rep = tmp_path / "r.html"
    r = cli("quantize", str(example_path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(CALIB),
            "--report", str(rep))
    assert r.returncode == 0, r.stderr
    html = rep.read_text()
    d = embedded_json(html)
    validate(d)
    no_number_strings(d)
    assert d["passes"] and d["verification"]["samples"] > 0 and d["latency"]["before_ms"] > 0
    assert {x["precision"] for x in d["layers"]} == {"int8"} and all(x["sqnr_db"] > 20 for x in d["layers"])
    assert d["after"]["size_bytes"] < d["before"]["size_bytes"] / 3
    parsed = _svg_elements(html)
    assert parsed["layers-sqnr_db"]["bar"] == 5
    assert parsed["tradeoff-size-latency"]["point"] == 2
    assert parsed["pass-nodes_after"]["bar"] >= 3 and parsed["pass-seconds"]["bar"] >= 2
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # no network
    assert "https://" not in html


def test_compress_report_json_is_json(tmp_path: Path, example_path: Path) -> None:
    """compress --report c.json wrote markdown into the .json file."""
    rj = tmp_path / "c.json"
    r = cli("compress", str(example_path), "-o", str(tmp_path / "c.onnx"), "--cluster", "16", "--int8",
            "--calibration", str(CALIB), "--report", str(rj))
    assert r.returncode == 0, r.stderr
    d = json.loads(rj.read_text())
    validate(d)
    no_number_strings(d)
    assert [p["name"] for p in d["passes"]] == ["cluster", "quantize-static", "palettize", "total (written file)"]
    assert all(p["size_bytes_after"] > 0 and p["seconds"] > 0 for p in d["passes"])
    assert [c["chosen"] for c in d["candidates"]] == [False, False, False, True]
    assert d["counters"]["cluster.index_bits"] == 8 and d["verification"]["top1_agreement"] is not None
    assert any(x["change"] == "16 clusters" for x in d["layers"])
    assert any(x["precision"] == "int8" for x in d["layers"])
    # the console printed each pass's report dict as one table cell (rows of ~900 characters)
    assert "{" not in r.stdout and max(len(ln) for ln in r.stdout.splitlines()) < 200


def test_convert_report_json(tmp_path: Path, example_path: Path) -> None:
    rj = tmp_path / "h.json"
    r = cli("convert", str(example_path), "--fp16", "-o", str(tmp_path / "h.onnx"), "--block-ops", "Gemm",
            "--report", str(rj))
    assert r.returncode == 0, r.stderr
    d = json.loads(rj.read_text())
    validate(d)
    no_number_strings(d)
    assert d["settings"]["dtype"] == "float16" and d["after"]["size_bytes"] < 0.6 * d["before"]["size_bytes"]
    kept = [x for x in d["layers"] if x["precision"] == "float32"]
    assert len(kept) == 2 and all(x["reason"] for x in kept)  # the two Gemms, blocked
    assert d["verification"]["max_abs_error"] < 0.1


def test_bad_report_path_is_one_line_before_any_work(tmp_path: Path, example_path: Path) -> None:
    for rep, why in ((tmp_path / "r.txt", "unknown format"), (tmp_path / "no" / "r.json", "does not exist")):
        out = tmp_path / "q.onnx"
        r = cli("quantize", str(example_path), "-o", str(out), "--calibration", str(CALIB), "--report", str(rep))
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and not rep.exists() and r.stdout == ""


# -- compile (needs TVM) ------------------------------------------------------------------------------


def test_compile_report_json(tmp_path: Path, example_path: Path) -> None:
    pytest.importorskip("tvm")
    rj = tmp_path / "m.json"
    r = cli("compile", str(example_path), "--input-shape", "input:1,1,8,8", "-o", str(tmp_path / "m.so"),
            "--report", str(rj))
    assert r.returncode == 0, r.stderr
    d = json.loads(rj.read_text())
    validate(d)
    no_number_strings(d)
    assert d["shapes_fixed"] and d["input_shapes"] == {"input": [1, 1, 8, 8]}
    assert d["after"]["size_bytes"] == (tmp_path / "m.so").stat().st_size
    assert d["kernels"] and all(k["schedule"] for k in d["kernels"])
    assert sum(p["seconds"] for p in d["passes"]) > 0
    assert d["verification"]["max_abs_error"] < 1e-3 and d["latency"]["after_ms"] > 0


# -- helpers -------------------------------------------------------------------------------------------


class _Svg(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, int]] = {}
        self.current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.current = a.get("id") or f"svg{len(self.charts)}"
            self.charts[self.current] = {"bar": 0, "point": 0}
        elif self.current and a.get("class") in ("bar", "point"):
            assert a.get("data-value") or a.get("data-x"), a
            self.charts[self.current][a["class"]] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.current = None


def _svg_elements(html: str) -> dict[str, dict[str, int]]:
    p = _Svg()
    p.feed(html)
    return p.charts


def test_distill_report_html_and_json(tmp_path: Path) -> None:
    """distill --report: the teacher, the student before and after (error against the teacher)
    as candidates, the loss curve as a series; valid against the schema."""
    pytest.importorskip("torch")
    pytest.importorskip("graphopt.passes.distill")
    import numpy as np
    import onnx

    _data, cnn, perturbed = (getattr(pytest.importorskip("test_distill"), k) for k in ("_data", "cnn", "perturbed"))

    teacher, student = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(cnn(), teacher)
    onnx.save(perturbed(cnn()), student)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _data(16)]))
    rep = tmp_path / "r.html"
    r = cli("distill", str(student), "-o", str(tmp_path / "o.onnx"), "--teacher", str(teacher), "--data", str(data),
            "--steps", "20", "--lr", "3e-3", "--threads", "1", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    html = rep.read_text()
    d = embedded_json(html)
    validate(d)
    no_number_strings(d)
    before, after = (next(c for c in d["candidates"] if c["name"] == n) for n in ("student before", "student after"))
    assert after["chosen"] and after["error"] < before["error"]
    assert len(d["series"]["loss"]) == d["counters"]["steps"] == 20
    charts = _svg_elements(html)
    assert charts["series-loss"]["point"] == 20 and charts["distill-tradeoff-size-error"]["point"] == 3


def test_schema_ships_in_the_wheel() -> None:
    """pyproject's package-data for graphopt.data matches the schema file (an installed
    graphopt can load it, not only a checkout)."""
    import fnmatch
    import tomllib

    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["graphopt.data"]
    assert any(fnmatch.fnmatch("report.schema.json", p) for p in patterns), patterns
    assert load_schema()["properties"]["schema"]["const"] == SCHEMA_ID
