"""`layers.project`, the 2-D matmul behind the MLP projections: equal to a float64 numpy x @ W for any
leading shape, its gradients equal to those of `x @ W`, and a clear error for mismatched axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arlm.model.layers import project


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 4), ()])
def test_project_equals_float64_matmul(lead):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 7))
    w = rng.standard_normal((7, 6))
    y = project(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert y.shape == (*lead, 6)
    np.testing.assert_allclose(np.asarray(y, np.float64), x @ w, rtol=1e-5, atol=1e-5)


def test_project_gradients_equal_plain_matmul():
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(1), 3)
    x, w = jax.random.normal(kx, (2, 3, 8)), jax.random.normal(kw, (8, 5))
    c = jax.random.normal(kc, (2, 3, 5))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * c)

    got = jax.grad(loss(project), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_project_refuses_mismatched_axes():
    with pytest.raises(ValueError, match=r"x \(2, 3\) and W \(4, 5\)"):
        project(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="W \\[I, O\\]"):
        project(jnp.ones((2, 4)), jnp.ones((4, 5, 1)))
