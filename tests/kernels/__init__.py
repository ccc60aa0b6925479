"""Tests of rdiag.kernels (kernels/)."""
