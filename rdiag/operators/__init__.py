"""Curvature and kernel operators behind one LinearOperator interface."""
