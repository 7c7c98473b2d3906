"""Eq. 16, x_{t+1} ~ softmax(z_t / τ), with greedy, top-k, nucleus (top-p) and min-p truncation.

A `Sampler` is a frozen, hashable dataclass (a static argument under jit) with
one job: turn a batch of logits and a key into tokens. `filtered_logits`
applies temperature and truncation; excluded tokens get −∞.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


def check_int(name: str, value: object, *, minimum: int) -> int:
    """`value` as a Python int ≥ minimum; numpy integers pass, bools, floats and strings are a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def check_real(name: str, value: object) -> float:
    """`value` as a finite Python float; bools and strings are a TypeError, NaN and ±inf a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 is greedy (the τ → 0 limit); top_k / top_p / min_p truncate before sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        # Normalised to plain Python numbers, so equal samplers hash equal (a static jit argument).
        set_field = partial(object.__setattr__, self)
        temperature = check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 is greedy), got {temperature}")
        set_field("temperature", temperature)
        if self.top_k is not None:
            set_field("top_k", check_int("top_k", self.top_k, minimum=1))
        if self.top_p is not None:
            top_p = check_real("top_p", self.top_p)
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
            set_field("top_p", top_p)
        if self.min_p is not None:
            min_p = check_real("min_p", self.min_p)
            if not 0 <= min_p < 1:
                raise ValueError(f"min_p must be in [0, 1), got {min_p}")
            set_field("min_p", min_p)

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
