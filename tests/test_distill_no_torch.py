"""Without PyTorch (the optional ``distill`` extra), ``graphopt distill`` says how to install it in
one line (exit 2) and writes nothing; the rest of graphopt does not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from graphopt.data import example_model_path

SCRIPT = """
import sys
sys.modules["torch"] = None  # as if PyTorch were not installed
from graphopt.cli import main
rc = main(["distill", sys.argv[1], "-o", sys.argv[2], "--teacher", sys.argv[1], "--data", sys.argv[3]])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch imported"
sys.exit(rc)
"""


def test_distill_without_torch_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((2, 1, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(example_model_path()), str(out), str(data)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and 'pip install "graphopt[distill]"' in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".graphopt-*"))
