"""RSFT (eq. 14): keep some of the K samples drawn for each prompt, then minimise eq. 8 on them.

Filters return a keep weight in {0, 1} per sample, [G, K] for G prompts × K samples:

    best_of_k    the highest-reward sample of each prompt (ties: the first), if its reward ≥ min_reward
    threshold    every sample with reward ≥ τ
    boltzmann    keep with probability exp((r − r_max)/β): from samples of π_ref, the kept ones are
                 exact draws from π* ∝ π_ref exp(r/β) (eq. 10), so RSFT on them fits π*
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

FILTERS = ("best_of_k", "threshold", "boltzmann")


def best_of_k(rewards_GxK: Array, min_reward: float = -jnp.inf) -> Array:
    best = jax.nn.one_hot(jnp.argmax(rewards_GxK, axis=-1), rewards_GxK.shape[-1], dtype=jnp.float32)
    return best * (rewards_GxK >= min_reward).astype(jnp.float32)


def threshold(rewards_GxK: Array, tau: float) -> Array:
    return (rewards_GxK >= tau).astype(jnp.float32)


def boltzmann(rewards_GxK: Array, beta: float, r_max: float, key: Array) -> Array:
    """Rejection sampling towards π* (eq. 10); r_max must bound the reward from above."""
    accept = jnp.exp(jnp.minimum(rewards_GxK - r_max, 0.0) / beta)
    return (jax.random.uniform(key, rewards_GxK.shape) < accept).astype(jnp.float32)
