"""arlm.objectives.rsft: best-of-K, threshold and Boltzmann filters (eq. 14)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import f64 as _f64
from _numerics import np_best_of_k

from arlm.objectives import rsft


@pytest.mark.parametrize("seed", range(4))
def test_best_of_k_and_threshold(seed):
    rng = np.random.default_rng(seed)
    r = rng.integers(-2, 3, (8, 5)).astype(np.float32)                     # small integers: many ties
    r[0] = [1, 3, 3, 0, 3]
    r[1] = -1.0                                                            # all tied
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r))), np_best_of_k(r))
    for m in (-1.0, 0.0, 1.0, 2.5):
        np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r), m)), np_best_of_k(r, m))
        np.testing.assert_array_equal(np.asarray(rsft.threshold(jnp.asarray(r), m)), (r >= m).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r)))[0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r)))[1], [1, 0, 0, 0, 0])


def test_boltzmann_acceptance_frequency():
    beta, r_max, m = 0.5, 1.0, 4000
    r = np.array([[1.0, 0.9, 0.5, 0.0], [-0.5, 1.0, -9.0, 1.7]], np.float32)   # 1.7 > r_max: clamped to 1
    p = np.exp(np.minimum(_f64(r) - r_max, 0.0) / beta)
    keys = jax.random.split(jax.random.PRNGKey(0), m)
    draws = np.asarray(jax.vmap(lambda k: rsft.boltzmann(jnp.asarray(r), beta, r_max, k))(keys))
    assert set(np.unique(draws)) <= {0.0, 1.0}
    freq = draws.mean(0)
    # binomial: |freq − p| ≤ 5 σ, σ = sqrt(p(1−p)/m); p = 1 must give exactly 1, p ≈ 0 exactly 0
    bound = 5 * np.sqrt(p * (1 - p) / m) + 1e-12
    assert np.all(np.abs(freq - p) <= bound), (freq, p, bound)
    assert freq[0, 0] == 1.0 and freq[1, 3] == 1.0 and freq[1, 2] == 0.0
    # the draw is the documented rule: keep where U[0, 1) < exp((r − r_max)/β)
    u = np.asarray(jax.random.uniform(keys[3], r.shape), np.float64)
    np.testing.assert_array_equal(draws[3], (u < p).astype(np.float32))
