"""The wheel must carry every built-in pass package: pyproject.toml lists them one by one (the
top-level ``passes/`` folder is installed as ``graphopt.passes``), and a package missing there
installs a graphopt whose every command fails at import (``passes/lower`` once did)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_passes_subpackage_is_installed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"graphopt.passes." + p.parent.name for p in (ROOT / "passes").glob("*/__init__.py")}
    assert on_disk, "no pass packages found"
    assert on_disk <= set(cfg["packages"]), sorted(on_disk - set(cfg["packages"]))
    for name in on_disk:
        assert cfg["package-dir"].get(name) == "passes/" + name.rsplit(".", 1)[1], name
    core = {"graphopt." + p.parent.name for p in (ROOT / "graphopt").glob("*/__init__.py")}
    assert core <= set(cfg["packages"]), sorted(core - set(cfg["packages"]))
