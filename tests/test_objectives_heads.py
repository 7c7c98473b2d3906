"""arlm.objectives.heads: scalar heads read at the last real token."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from _numerics import close as _close
from _numerics import np_scalar_head

from arlm.objectives import heads


def test_scalar_head_and_last_token_index():
    rng = np.random.default_rng(0)
    h = rng.normal(0, 3, (3, 5, 8)).astype(np.float32)
    head = {"w": jnp.asarray(rng.normal(size=8), jnp.float32), "b": jnp.asarray(0.7, jnp.float32)}
    _close(heads.scalar_head(head, jnp.asarray(h)), np_scalar_head(head, h), atol=2e-6)
    init = heads.init_scalar_head(8)
    assert np.all(np.asarray(heads.scalar_head(init, jnp.asarray(h))) == 0)
    mask = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    np.testing.assert_array_equal(np.asarray(heads.last_token_index(jnp.asarray(mask))), [2, 0, 4])
