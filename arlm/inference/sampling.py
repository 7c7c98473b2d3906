"""Eq. 16, x_{t+1} ~ softmax(z_t / τ), with greedy, top-k, nucleus (top-p) and min-p truncation.

A `Sampler` is a frozen, hashable dataclass (a static argument under jit) with
one job: turn a batch of logits and a key into tokens. `filtered_logits`
applies temperature and truncation; excluded tokens get −∞.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 is greedy (the τ → 0 limit); top_k / top_p / min_p truncate before sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filtered_logits(self, logits_BxV: Array) -> Array:
        """log of the (unnormalised) sampling distribution: z/τ with truncated tokens at −∞."""
        z = logits_BxV.astype(jnp.float32) / (self.temperature if self.temperature > 0 else 1.0)
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = jax.lax.top_k(z, self.top_k)[0][..., -1:]
            z = jnp.where(z < kth, -jnp.inf, z)
        if self.top_p is not None and self.top_p < 1:
            z = top_p_filter(z, self.top_p)
        if self.min_p is not None and self.min_p > 0:
            logp = jax.nn.log_softmax(z, axis=-1)
            z = jnp.where(logp < jnp.log(self.min_p) + logp.max(-1, keepdims=True), -jnp.inf, z)
        return z

    def __call__(self, logits_BxV: Array, key: Array) -> Array:
        if self.greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filtered_logits(logits_BxV), axis=-1).astype(jnp.int32)

    def log_probs(self, logits_BxV: Array) -> Array:
        """log of the distribution tokens are actually drawn from (a point mass when greedy)."""
        if self.greedy:
            return jnp.where(jax.nn.one_hot(jnp.argmax(logits_BxV, -1), logits_BxV.shape[-1]) > 0, 0.0, -jnp.inf)
        return jax.nn.log_softmax(self.filtered_logits(logits_BxV), axis=-1)


GREEDY = Sampler(temperature=0.0)


def top_p_filter(z_BxV: Array, top_p: float) -> Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    order = jnp.argsort(-z_BxV, axis=-1)
    z_sorted = jnp.take_along_axis(z_BxV, order, axis=-1)
    probs = jax.nn.softmax(z_sorted, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p                      # the first token is always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z_BxV.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, z_BxV, -jnp.inf)
