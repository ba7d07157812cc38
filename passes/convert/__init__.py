"""Precision conversion passes: float16 / bfloat16 weights (``float16-weights``) and compute
(``float16``)."""
