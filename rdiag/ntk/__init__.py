"""Empirical NTKs: the public entry point, generic and structured implementations."""
