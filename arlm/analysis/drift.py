"""Drift (eq. 19): how a deviation of the input state h_s^(0) reaches later states h_t^(ℓ).

The block J_ℓ(t, s) = ∂h_t^(ℓ) / ∂h_s^(0) is a D×D matrix. The paper's claim is that its
singular values sit near 1 "in semantic directions", so that a deviation at step s propagates
neither damped nor amplified. Raw residual states of trained models grow with depth and carry a
few huge directions, so a spectrum only means something with a stated normalisation:

  "raw"         J_ℓ(t, s) itself.
  "relative"    J · ‖h_s^(0)‖ / ‖h_t^(ℓ)‖: the gain of a *relative* perturbation.
  "final_norm"  the same for n(h_t^(ℓ)), the final norm that eq. 6 applies before W_U (what the
                logit lens and the next-token law see).
  "semantic"    "final_norm" restricted, on both sides, to the span P of the top-r left singular
                vectors of W_U (the directions the readout is most sensitive to), with the relative
                scale taken there too: Pᵀ J P · ‖Pᵀ h_s^(0)‖ / ‖Pᵀ n(h_t^(ℓ))‖.

Everything is matrix-free: the map e ↦ h^(0..L) is linearised once, and each block's top singular
values come from Lanczos (`lanczos.top_singular_values`) over its jvp/vjp; blocks are vmapped.
`jacobian_block` materialises one block, for small models and for checks.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.intermediates import final_norm, unembedding_DxV
from arlm.analysis.lanczos import top_singular_values
from arlm.config import ModelConfig
from arlm.model import apply_model

Array = jax.Array
NORMALISATIONS = ("raw", "relative", "final_norm", "semantic")


@functools.partial(jax.jit, static_argnames=("config", "normed"))
def hidden_states(config: ModelConfig, params: Any, embeddings_TxD: Array, *, normed: bool = False) -> Array:
    """h^(0..L) [L+1, T, D] of one sequence given its input embeddings E[x_t] (h^(0) = E[x_t] + p_t);
    with `normed`, the final norm applied to every state."""
    h = apply_model(config, params, embeddings=embeddings_TxD[None], return_hidden=True).hidden_states[:, 0]
    return final_norm(config, params, h) if normed else h


def semantic_basis(config: ModelConfig, params: Any, rank: int) -> Array:
    """[D, r]: the top-r left singular vectors of W_U [D, V], the readout's most sensitive directions."""
    u, _, _ = jnp.linalg.svd(unembedding_DxV(config, params).astype(jnp.float32), full_matrices=False)
    return u[:, :rank]


@functools.partial(jax.jit, static_argnames=("config", "normed"))
def jacobian_block(config: ModelConfig, params: Any, embeddings_TxD: Array, layer: int, t: int, s: int,
                   *, normed: bool = False) -> Array:
    """J_ℓ(t, s) = ∂h_t^(ℓ)/∂h_s^(0) materialised [D, D] (eq. 19), by forward mode over D tangents."""
    def f(delta_D):
        return hidden_states(config, params, embeddings_TxD.at[s].add(delta_D), normed=normed)[layer, t]
    return jax.jacfwd(f)(jnp.zeros((config.d_model,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "k", "steps", "normalisation"))
def block_singular_values(config: ModelConfig, params: Any, embeddings_TxD: Array, layers_N: Array,
                          t_N: Array, s_N: Array, key: Array, *, k: int = 4, steps: int = 24,
                          normalisation: str = "relative", basis_DxR: Array | None = None) -> tuple[Array, Array]:
    """Top-k singular values [N, k] of the N blocks J_{layers[i]}(t[i], s[i]) and their top right singular
    vectors [N, D] (input directions in h_s^(0) space), matrix-free (see the module docstring).

    basis_DxR: the subspace of the "semantic" normalisation (default: `semantic_basis` with
      r = max(D/8, min(D, 4k))).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    normed = normalisation in ("final_norm", "semantic")
    if normalisation == "semantic" and basis_DxR is None:
        basis_DxR = semantic_basis(config, params, max(config.d_model // 8, min(config.d_model, 4 * k)))
    if normalisation != "semantic":
        basis_DxR = None
    f = functools.partial(hidden_states, config, params, normed=normed)
    out_LxTxD, jvp = jax.linearize(f, embeddings_TxD)
    vjp = jax.linear_transpose(jvp, embeddings_TxD)
    width = config.d_model if basis_DxR is None else basis_DxR.shape[1]
    lift = (lambda x: x) if basis_DxR is None else (lambda x: basis_DxR @ x)
    drop = (lambda x: x) if basis_DxR is None else (lambda x: basis_DxR.T @ x)

    def one_block(layer, t, s, key):
        matvec = lambda v: drop(jvp(jnp.zeros_like(embeddings_TxD).at[s].set(lift(v)))[layer, t])  # noqa: E731
        rmatvec = lambda u: drop(vjp(jnp.zeros_like(out_LxTxD).at[layer, t].set(lift(u)))[0][s])  # noqa: E731
        sigma, right = top_singular_values(matvec, rmatvec, width, width, k=k, steps=steps, key=key)
        return sigma, lift(right[0])

    keys = jax.random.split(key, layers_N.shape[0])
    sigma_NxK, right_NxD = jax.vmap(one_block)(layers_N, t_N, s_N, keys)
    if normalisation != "raw":
        sigma_NxK = sigma_NxK * relative_scale(config, params, embeddings_TxD, layers_N, t_N, s_N,
                                               normed=normed, basis_DxR=basis_DxR)[:, None]
    return sigma_NxK, right_NxD


@functools.partial(jax.jit, static_argnames=("config", "normed"))
def relative_scale(config: ModelConfig, params: Any, embeddings_TxD: Array, layers_N: Array, t_N: Array, s_N: Array,
                   *, normed: bool = False, basis_DxR: Array | None = None) -> Array:
    """‖h_s^(0)‖ / ‖h_t^(ℓ)‖ for each block [N] (the final norm applied to h_t^(ℓ) when `normed`; both
    states projected on the basis when one is given): the factor that turns a block's singular values
    into gains of relative perturbations."""
    h = hidden_states(config, params, embeddings_TxD)
    out = hidden_states(config, params, embeddings_TxD, normed=True) if normed else h
    h_in, h_out = h[0, s_N], out[layers_N, t_N]
    if basis_DxR is not None:
        h_in, h_out = h_in @ basis_DxR, h_out @ basis_DxR
    return jnp.linalg.norm(h_in, axis=-1) / jnp.linalg.norm(h_out, axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def perturbation_response(config: ModelConfig, params: Any, embeddings_TxD: Array, s: int, direction_D: Array,
                          eps: float) -> Array:
    """‖h_t^(ℓ)(h_s^(0) + ε u) − h_t^(ℓ)(h_s^(0))‖ / ε for a unit u: [L+1, T] (eq. 19's finite version).

    As ε → 0 this tends to ‖J_ℓ(t, s) u‖ (the top singular value when u is the top right singular
    vector); for larger ε it shows whether the nonlinearity damps or amplifies a real deviation.
    """
    u = direction_D / jnp.linalg.norm(direction_D)
    h = hidden_states(config, params, embeddings_TxD)
    h_eps = hidden_states(config, params, embeddings_TxD.at[s].add(eps * u))
    return jnp.linalg.norm(h_eps - h, axis=-1) / eps


def fraction_in_band(sigma: np.ndarray, band: tuple[float, float] = (0.5, 2.0)) -> float:
    """The fraction of singular values within a factor band of 1 (the "near-unit" of eq. 19)."""
    sigma = np.asarray(sigma, np.float64).ravel()
    return float(np.mean((sigma >= band[0]) & (sigma <= band[1]))) if sigma.size else float("nan")


def block_grid(layers: Sequence[int], pairs: Sequence[tuple[int, int]]) -> tuple[Array, Array, Array]:
    """Index arrays (layers_N, t_N, s_N) for every layer × (t, s) pair, ready for `block_singular_values`."""
    grid = [(layer, t, s) for layer in layers for t, s in pairs]
    arr = np.asarray(grid, np.int32).reshape(-1, 3)
    return jnp.asarray(arr[:, 0]), jnp.asarray(arr[:, 1]), jnp.asarray(arr[:, 2])
