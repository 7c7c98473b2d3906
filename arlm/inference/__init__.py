"""Inference, eqs. 16–18."""
