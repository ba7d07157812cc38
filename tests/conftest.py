"""pytest fixtures (helpers live in helpers.py, importable because tests/ is on pythonpath)."""

from helpers import example_path, rng  # noqa: F401
