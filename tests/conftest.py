"""pytest fixtures (helpers live in helpers.py, importable because tests/ is on pythonpath)."""

import os
import tempfile

import pytest
from helpers import example_path, rng  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _private_tvm_cache():
    """TVM builds and tuning records go to a fresh cache for the test session, never the
    user's: every run compiles from scratch and leaves ~/.cache alone."""
    old = os.environ.get("GRAPHOPT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="graphopt-test-cache-") as d:
        os.environ["GRAPHOPT_CACHE_DIR"] = d
        yield d
    if old is None:
        os.environ.pop("GRAPHOPT_CACHE_DIR", None)
    else:
        os.environ["GRAPHOPT_CACHE_DIR"] = old
