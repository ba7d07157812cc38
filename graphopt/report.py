"""Tables and reports: plain-text tables for the terminal, markdown and JSON reports."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphopt.transform import PassRecord


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (bytes: '1.18 MiB')."""
    if n is None:
        return "-"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or u == "T":
            return f"{n:.0f}{u}" if u == "" else f"{n:.2f}{u}"
        n /= 1000
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Align ``rows`` under ``headers`` (numbers right-aligned); markdown pipe table if asked."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_isnum(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def fmt(r: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    lines = [fmt(list(headers))]
    if markdown:
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                     for w, num in zip(widths, numeric, strict=True)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _isnum(s: str) -> bool:
    s = s.strip().rstrip("%KMGTx").replace(",", "").replace(" MiB", "").replace(" KiB", "").replace(" B", "")
    if s in ("-", ""):
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


PASS_HEADERS = ("pass", "changed", "nodes", "params", "bytes", "FLOPs", "time (ms)", "max abs err")


def pass_rows(records: Sequence[PassRecord], initial: PassRecord | None = None) -> list[list[Any]]:
    rows = []
    for r in ([initial] if initial else []) + list(records):
        rows.append([
            r.name, "yes" if r.changed else ("" if r.name == "(input)" else "no"),
            "-" if r.nodes is None else r.nodes, human(r.params), human(r.bytes, "B"), human(r.flops),
            f"{r.seconds * 1e3:.1f}", "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}",
        ])
    return rows


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_report(path: str | os.PathLike[str], summary: dict[str, Any], records: Sequence[PassRecord],
                 initial: PassRecord | None = None) -> None:
    """Write the per-pass report as JSON (``.json``) or markdown (anything else)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        data = {
            "summary": summary,
            "passes": [
                {k: getattr(r, k) for k in ("name", "changed", "seconds", "nodes", "params", "bytes", "flops",
                                            "max_abs_error")}
                for r in ([initial] if initial else []) + list(records)
            ],
        }
        write_atomic(p, json.dumps(data, indent=2, default=str) + "\n")
        return
    lines = ["# graphopt report", ""]
    lines.append(table(["", "before", "after"], [[k, *v] for k, v in summary.get("compare", {}).items()],
                       markdown=True))
    lines += ["", "## Passes", "", table(PASS_HEADERS, pass_rows(records, initial), markdown=True), ""]
    for k, v in summary.items():
        if k != "compare":
            lines.append(f"- **{k}**: {v}")
    write_atomic(p, "\n".join(lines) + "\n")
