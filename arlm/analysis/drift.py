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
`jacobian_block` materialises one block, for small models and for checks; `jacobian_blocks`
materialises J_ℓ(t, s) for every target t and a list of sources s, `chunk` sources at a time.

The cost of materialising, for T positions, width D, and a forward pass costing F:
  * forward mode (`jacfwd`, what `jacobian_blocks` uses): one linearisation, then D jvps per
    source, each about one F, and each gives the blocks of *every* target t at once:
    D·S·F for S sources; memory per chunk of C sources is C·D tangents × [T, D] outputs.
  * reverse mode (`jacrev`): D vjps per *target*, each about 2–3 F plus the stored activations
    of the forward pass: D·T·(2–3)F for all targets. Causality zeroes t < s either way, so with
    many targets per source (drift: one source, all later steps) forward mode is the cheaper one;
    with one target and many sources (attribution of one prediction) reverse mode is.
Parameters are arguments of every jitted function here, never closed over: a closed-over
embedding (SmolLM2's is 49152 × 576) becomes an XLA constant that compilation folds and copies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.intermediates import final_norm, unembedding_DxV
from arlm.analysis.lanczos import top_singular_values
from arlm.config import ModelConfig
from arlm.model import apply_model, embed_tokens

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


def _first_layers(config: ModelConfig, params: Any, layer: int) -> tuple[ModelConfig, Any]:
    """The model cut after `layer` blocks (h^(0..layer) are unchanged): the layers are one scan, so
    without the cut a Jacobian at layer ℓ would push every tangent through all L layers."""
    if layer < 1 or layer >= config.n_layers:
        return config, params
    cut = dict(params, layers=jax.tree_util.tree_map(lambda x: x[:layer], params["layers"]))
    return dataclasses.replace(config, n_layers=layer), cut


@functools.partial(jax.jit, static_argnames=("config", "layer", "normed"))
def _jacobian_chunk(config: ModelConfig, params: Any, embeddings_TxD: Array, sources_C: Array, layer: int,
                    normed: bool) -> Array:
    """[C, T, D_out, D_in]: ∂h_t^(ℓ)/∂h_s^(0) for the C sources and every target t (forward mode)."""
    d = config.d_model
    config, params = _first_layers(config, params, layer)
    _, jvp = jax.linearize(lambda e: hidden_states(config, params, e, normed=normed)[layer], embeddings_TxD)
    eye_DxD = jnp.eye(d, dtype=embeddings_TxD.dtype)

    def one_source(s):
        tangents_DxTxD = jnp.zeros((d,) + embeddings_TxD.shape, embeddings_TxD.dtype).at[:, s].set(eye_DxD)
        cols_DinxTxDout = jax.vmap(jvp)(tangents_DxTxD)
        return jnp.transpose(cols_DinxTxDout, (1, 2, 0))          # [T, D_out, D_in]

    return jax.lax.map(one_source, sources_C)


def jacobian_blocks(config: ModelConfig, params: Any, embeddings_TxD: Array, layer: int,
                    sources: Sequence[int], *, chunk: int = 4, normed: bool = False) -> np.ndarray:
    """J_ℓ(t, s) = ∂h_t^(ℓ)/∂h_s^(0) (eq. 19) for every target t and each source s: [S, T, D, D] (host).

    Computed `chunk` sources per compiled call (the last chunk is padded and its padding dropped),
    so peak memory is chunk × D tangents of [T, D] whatever S is; see the module docstring for the
    cost of forward vs reverse mode. Only the first `layer` blocks run (the model is cut after
    them), so an early layer costs less than the last. Blocks with t < s are exactly 0 (causality)."""
    t_len = embeddings_TxD.shape[0]
    sources = [int(s) for s in sources]
    if not sources:
        raise ValueError("jacobian_blocks needs at least one source position")
    if any(not 0 <= s < t_len for s in sources):
        raise ValueError(f"source positions {sources} must lie in [0, {t_len})")
    if not 0 <= layer <= config.n_layers:
        raise ValueError(f"layer {layer} is not in [0, {config.n_layers}] (0: the input embeddings)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    blocks = []
    for i in range(0, len(sources), chunk):
        part = sources[i:i + chunk]
        padded = jnp.asarray(part + [part[-1]] * (chunk - len(part)), jnp.int32)
        blocks.append(np.asarray(_jacobian_chunk(config, params, embeddings_TxD, padded, layer, normed))[:len(part)])
    return np.concatenate(blocks, axis=0)


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


def top_singular_values_at_lags(config: ModelConfig, params: Any, tokens_T: np.ndarray,
                                lags: Sequence[int]) -> list[float]:
    """σ_max of J_L(T−1, T−1−lag) = ∂h_{T−1}^(L)/∂h_{T−1−lag}^(0) for each lag (eq. 19), through the
    whole depth L, from the dense blocks (small models: D×D per lag)."""
    emb_TxD = embed_tokens(config, params, jnp.asarray(tokens_T)[None])[0]
    t = len(tokens_T) - 1
    blocks_SxTxDxD = jacobian_blocks(config, params, emb_TxD, config.n_layers, [t - lag for lag in lags],
                                     chunk=len(lags))
    return [float(np.linalg.norm(blocks_SxTxDxD[i, t], ord=2)) for i in range(len(lags))]


def fraction_in_band(sigma: np.ndarray, band: tuple[float, float] = (0.5, 2.0)) -> float:
    """The fraction of singular values within a factor band of 1 (the "near-unit" of eq. 19)."""
    sigma = np.asarray(sigma, np.float64).ravel()
    return float(np.mean((sigma >= band[0]) & (sigma <= band[1]))) if sigma.size else float("nan")


def block_grid(layers: Sequence[int], pairs: Sequence[tuple[int, int]]) -> tuple[Array, Array, Array]:
    """Index arrays (layers_N, t_N, s_N) for every layer × (t, s) pair, ready for `block_singular_values`."""
    grid = [(layer, t, s) for layer in layers for t, s in pairs]
    arr = np.asarray(grid, np.int32).reshape(-1, 3)
    return jnp.asarray(arr[:, 0]), jnp.asarray(arr[:, 1]), jnp.asarray(arr[:, 2])
