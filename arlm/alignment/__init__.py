"""Alignment (eqs. 9–15): rollouts, rewards, verifiers and the methods that maximise J."""
