"""Random parameters for tests: init_params' structure with every leaf re-drawn far from init.

At the default init, zero biases, unit norms and near-uniform attention would hide
mapping mistakes; these draws make next-token distributions clearly non-uniform.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import arlm


def random_params(config: arlm.ModelConfig, seed: int = 0, std: float = 0.2, bias_std: float = 0.2) -> dict:
    """float32 params: norm scales 1 + N(0, 0.2²), biases N(0, bias_std²), other weights N(0, std²)."""
    shapes = jax.eval_shape(functools.partial(arlm.init_params, config), jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1000)

    def redraw(path, x):
        name = path[-1].key
        noise = rng.standard_normal(x.shape)
        value = 1.0 + 0.2 * noise if name == "scale" else (bias_std if name.endswith("bias") else std) * noise
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(redraw, shapes)
