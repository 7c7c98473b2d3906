"""arlm.alignment.exact: π* ∝ π_ref exp(r/β) and J on enumerable problems, against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64
from _numerics import np_logsumexp

from arlm.alignment import exact


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_exact_optimal_policy_and_objective_identity(seed, beta):
    rng = np.random.default_rng(seed)
    x, y = 3, 9
    ref = np.log(rng.dirichlet(np.ones(y), size=x))
    reward = rng.normal(size=(x, y))
    pi = np.log(rng.dirichlet(np.ones(y), size=x))                        # an arbitrary policy
    ref32, reward32, pi32 = (a.astype(np.float32) for a in (ref, reward, pi))
    ref, reward, pi = (_f64(a) for a in (ref32, reward32, pi32))          # the float32 values, in float64

    # numpy, float64: π* = π_ref exp(r/β) / Z (eq. 10)
    unnorm = ref + reward / beta
    log_z = np_logsumexp(unnorm)
    log_opt = unnorm - log_z[:, None]

    def np_kl(lp, lq):
        return (np.exp(lp) * (lp - lq)).sum(-1)

    def np_j(lp):
        return float(np.mean((np.exp(lp) * reward).sum(-1) - beta * np_kl(lp, ref)))

    # the identity J(π) = β log Z − β KL(π ‖ π*) holds to rounding in float64 (for a normalised π;
    # the float32-rounded π sums to 1 only within ~1e-7)
    pi64 = pi - np_logsumexp(pi)[:, None]
    assert np_j(pi64) == pytest.approx(float(np.mean(beta * log_z - beta * np_kl(pi64, log_opt))), abs=1e-12)
    assert np_j(log_opt) == pytest.approx(beta * log_z.mean(), abs=1e-12)
    assert np_j(pi64) < np_j(log_opt)

    # log-probs are O(10) (r/β up to ~10): float32 log-sum-exp carries a few 1e-6 absolute
    got_opt, got_z = exact.optimal_log_probs(jnp.asarray(ref32), jnp.asarray(reward32), beta)
    _close(got_opt, log_opt, rtol=1e-5, atol=1e-5)
    _close(got_z, log_z, rtol=1e-5, atol=1e-5)
    _close(exact.kl_divergence(jnp.asarray(pi32), jnp.asarray(ref32)), np_kl(pi, ref), rtol=1e-5, atol=1e-5)
    _close(exact.objective_value(jnp.asarray(pi32), jnp.asarray(ref32), jnp.asarray(reward32), beta), np_j(pi),
           rtol=1e-5, atol=1e-5)
    # the identity through the library's own functions
    lhs = exact.objective_value(jnp.asarray(pi32), jnp.asarray(ref32), jnp.asarray(reward32), beta)
    rhs = beta * jnp.mean(got_z) - beta * jnp.mean(exact.kl_divergence(jnp.asarray(pi32), got_opt))
    _close(lhs, rhs, rtol=1e-5, atol=2e-5)
    _close(exact.objective_value(got_opt, jnp.asarray(ref32), jnp.asarray(reward32), beta), beta * log_z.mean(),
           rtol=1e-5, atol=2e-5)
