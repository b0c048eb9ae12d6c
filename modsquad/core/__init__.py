"""Lowest layer: helpers every other part of modsquad may use (atomic file and folder writes)."""
