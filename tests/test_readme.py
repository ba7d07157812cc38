"""The README is checked: its links point at files in the repository, its Python API example runs
verbatim on the bundled model, and every flag its command-line summary shows exists in that
command's ``--help`` (the custom pass example runs in test_rewrite.py, the set-up command in CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _text() -> str:
    return README.read_text()


def test_links_point_at_files_in_the_repository() -> None:
    links = [t for t in re.findall(r"\]\(([^)#\s]+)\)", _text()) if "://" not in t]
    assert len(links) >= 8
    missing = [t for t in links if not (ROOT / t).exists()]
    assert missing == [], missing


def test_python_api_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(r"## Python API\s*```python\n(.*?)```", _text(), re.DOTALL)
    assert block, "README has no Python API block"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    assert (tmp_path / "optimized.onnx").stat().st_size > 0
    assert ns["res"] is not None and any(r.changed for r in ns["ctx"].records)


def _summary_lines() -> dict[str, set[str]]:
    block = re.search(r"## Command line\s*```text\n(.*?)```", _text(), re.DOTALL)
    assert block, "README has no command-line summary"
    flags: dict[str, set[str]] = {}
    cmd = ""
    for line in block.group(1).splitlines():
        m = re.match(r"graphopt (\w+)\b", line)
        if m:
            cmd = m.group(1)
        if line.startswith("graphopt ["):
            cmd, line = "", line.split("COMMAND")[0]  # the global options (before the command)
        flags.setdefault(cmd, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", line))
    return flags


def test_command_line_summary_flags_exist() -> None:
    env = {**os.environ, "GRAPHOPT_QUIET": "1"}
    flags = _summary_lines()
    assert {"optimize", "quantize", "compile", "distill"} <= set(flags)
    for cmd, fl in flags.items():
        args = [sys.executable, "-m", "graphopt.cli", *([cmd] if cmd else []), "--help"]
        out = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        missing = [f for f in fl if f not in out.stdout]
        assert missing == [], f"graphopt {cmd}: {missing} not in --help"
