"""Compression passes: low-rank factorization, weight clustering."""
