"""Drift (eq. 19) and intermediates: closed forms, numpy's SVD of the materialised Jacobian, finite
perturbations, and the residual-stream decomposition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params

import arlm
from arlm.analysis import drift, intermediates, lanczos

CFGS = {
    "llama": arlm.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=32,
                                    max_seq_len=16),
    "gpt2": arlm.ModelConfig.gpt2(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16),
}
TOKENS = jnp.asarray([[3, 17, 5, 22, 9, 31, 2, 11]], jnp.int32)


def _setup(name, std=0.3):
    cfg = CFGS[name]
    params = random_params(cfg, std=std)
    return cfg, params, arlm.embed_tokens(cfg, params, TOKENS)[0]


@pytest.mark.parametrize("name", CFGS)
def test_intermediates_decompose_the_residual_stream(name):
    cfg, params, _ = _setup(name)
    c = jax.jit(intermediates.run_with_cache, static_argnums=0)(cfg, params, TOKENS)
    out = arlm.apply_model(cfg, params, TOKENS, return_hidden=True, return_attention=True)
    np.testing.assert_allclose(c.logits_BxTxV, out.logits_BxTxV, atol=1e-5)      # lens at L = the logits
    np.testing.assert_allclose(c.residual_LxBxTxD, out.hidden_states, atol=1e-6)
    np.testing.assert_allclose(c.attention_LxBxHxTxS, out.attention_probs, atol=1e-6)
    h = np.asarray(c.residual_LxBxTxD, np.float64)
    parts = np.asarray(c.attention_out_LxBxTxD, np.float64) + np.asarray(c.mlp_out_LxBxTxD, np.float64)
    np.testing.assert_allclose(h[1:] - h[:-1], parts, atol=1e-5)                 # h^ℓ = h^ℓ-1 + attn + mlp
    # The logit lens of layer ℓ is W_U · FinalNorm(h^ℓ): recompute in float64 numpy (Llama: RMSNorm).
    if cfg.norm == "rmsnorm":
        x = h[1] / np.sqrt((h[1] ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
        x = x * np.asarray(params["final_norm"]["scale"], np.float64)
        ref = x @ np.asarray(params["embed"], np.float64).T
        np.testing.assert_allclose(c.logit_lens_LxBxTxV[1], ref, rtol=1e-4, atol=1e-4)
    assert c.attention_LxBxHxTxS.shape == (cfg.n_layers, 1, cfg.n_heads, 8, 8)


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_zeroed_output_projections_make_the_jacobian_the_identity(name):
    """With W_O and the MLP's output projection zeroed, h^ℓ = h^0: J_ℓ(t,t) = I and J_ℓ(t≠s) = 0."""
    cfg, params, emb = _setup(name)
    layers = params["layers"]
    layers["attn"]["wo"] = jnp.zeros_like(layers["attn"]["wo"])
    layers["mlp"]["w_out"] = jnp.zeros_like(layers["mlp"]["w_out"])
    if cfg.use_bias:
        layers["attn"]["wo_bias"] = jnp.zeros_like(layers["attn"]["wo_bias"])
        layers["mlp"]["w_out_bias"] = jnp.zeros_like(layers["mlp"]["w_out_bias"])
    L, T, S = drift.block_grid([1, cfg.n_layers], [(5, 5), (6, 2), (7, 0)])
    sigma, _ = drift.block_singular_values(cfg, params, emb, L, T, S, jax.random.PRNGKey(1), k=cfg.d_model,
                                           steps=cfg.d_model, normalisation="raw")
    sigma = np.asarray(sigma).reshape(2, 3, cfg.d_model)
    np.testing.assert_allclose(sigma[:, 0], 1.0, atol=1e-5)                      # t = s: every σ = 1
    np.testing.assert_allclose(sigma[:, 1:], 0.0, atol=1e-6)                     # t ≠ s: J = 0
    np.testing.assert_allclose(drift.jacobian_block(cfg, params, emb, 2 if cfg.n_layers > 2 else 1, 4, 4),
                               np.eye(cfg.d_model), atol=1e-6)


@pytest.mark.parametrize("name,normed", [("llama", False), ("llama", True),
                                         pytest.param("gpt2", False, marks=pytest.mark.slow)])
def test_matrix_free_singular_values_equal_numpy_svd(name, normed):
    cfg, params, emb = _setup(name)
    pairs = [(7, 7), (7, 3), (4, 0)]
    L, T, S = drift.block_grid([1, cfg.n_layers], pairs)
    norm = "final_norm" if normed else "raw"
    key = jax.random.PRNGKey(0)
    exact, _ = drift.block_singular_values(cfg, params, emb, L, T, S, key, k=4, steps=cfg.d_model,
                                           normalisation=norm)
    short, right = drift.block_singular_values(cfg, params, emb, L, T, S, key, k=2, steps=10, normalisation=norm)
    # (10 of 16 Lanczos steps resolve the top value and its right singular vector)
    h = np.asarray(drift.hidden_states(cfg, params, emb), np.float64)
    hn = np.asarray(drift.hidden_states(cfg, params, emb, normed=normed), np.float64)
    for i, (layer, t, s) in enumerate(zip(np.asarray(L), np.asarray(T), np.asarray(S))):
        J = np.asarray(drift.jacobian_block(cfg, params, emb, int(layer), int(t), int(s), normed=normed), np.float64)
        ref = np.linalg.svd(J, compute_uv=False)
        scale = 1.0 if norm == "raw" else np.linalg.norm(h[0, s]) / np.linalg.norm(hn[layer, t])
        np.testing.assert_allclose(exact[i], ref[:4] * scale, rtol=2e-4, atol=1e-5 * ref[0] * scale)
        np.testing.assert_allclose(short[i, 0], ref[0] * scale, rtol=1e-3)          # 10 of 16 steps: top value
        v = np.asarray(right[i], np.float64)
        np.testing.assert_allclose(np.linalg.norm(J @ v), ref[0], rtol=1e-3)         # its top right vector


def test_semantic_normalisation_is_the_projected_block():
    cfg, params, emb = _setup("llama")
    basis = np.asarray(drift.semantic_basis(cfg, params, 6), np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-5)
    L, T, S = drift.block_grid([2], [(6, 3)])
    sig, _ = drift.block_singular_values(cfg, params, emb, L, T, S, jax.random.PRNGKey(0), k=3, steps=6,
                                         normalisation="semantic", basis_DxR=jnp.asarray(basis, jnp.float32))
    J = np.asarray(drift.jacobian_block(cfg, params, emb, 2, 6, 3, normed=True), np.float64)
    h = np.asarray(drift.hidden_states(cfg, params, emb), np.float64)
    hn = np.asarray(drift.hidden_states(cfg, params, emb, normed=True), np.float64)
    scale = np.linalg.norm(basis.T @ h[0, 3]) / np.linalg.norm(basis.T @ hn[2, 6])     # relative, within P
    ref = np.linalg.svd(basis.T @ J @ basis, compute_uv=False)[:3] * scale
    np.testing.assert_allclose(sig[0], ref, rtol=2e-4)


def test_finite_perturbation_tends_to_the_top_singular_value():
    cfg, params, emb = _setup("llama")
    layer, t, s = 3, 7, 2
    L, T, S = drift.block_grid([layer], [(t, s)])
    sigma, right = drift.block_singular_values(cfg, params, emb, L, T, S, jax.random.PRNGKey(0), k=1, steps=16,
                                               normalisation="raw")
    scale = float(jnp.linalg.norm(emb[s]))
    errs = [abs(float(drift.perturbation_response(cfg, params, emb, s, right[0], e * scale)[layer, t])
                - float(sigma[0, 0])) / float(sigma[0, 0]) for e in (0.3, 3e-2, 3e-3)]
    assert errs[2] < errs[0] and errs[2] < 5e-3, errs
    resp = np.asarray(drift.perturbation_response(cfg, params, emb, s, right[0], 1e-2 * scale))
    np.testing.assert_array_equal(resp[:, :s], 0.0)                                  # causality: t < s untouched


def test_lanczos_on_explicit_matrices():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 20)).astype(np.float32)
    A[:, 5] = 0.0                                                                    # rank-deficient
    Aj = jnp.asarray(A)
    sig, right = lanczos.top_singular_values(lambda v: Aj @ v, lambda u: Aj.T @ u, 20, 30, k=5, steps=20,
                                             key=jax.random.PRNGKey(0))
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(sig, ref[:5], rtol=1e-5)
    np.testing.assert_allclose(np.abs(right[0] @ np.linalg.svd(A)[2][0]), 1.0, atol=1e-4)
    zero = jnp.zeros((8, 8))
    sig0, _ = lanczos.top_singular_values(lambda v: zero @ v, lambda u: zero.T @ u, 8, 8, k=3, steps=8,
                                          key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(sig0, 0.0)
    with pytest.raises(ValueError, match="k ≤ steps"):
        lanczos.top_singular_values(lambda v: v, lambda u: u, 4, 4, k=5, steps=10, key=jax.random.PRNGKey(0))


def test_fraction_in_band():
    assert drift.fraction_in_band([0.4, 0.5, 1.0, 2.0, 2.1]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="normalisation"):
        cfg, params, emb = _setup("llama")
        drift.block_singular_values(cfg, params, emb, *drift.block_grid([1], [(1, 1)]), jax.random.PRNGKey(0),
                                    normalisation="bogus")


def test_jacobian_blocks_in_chunks_equal_reverse_mode_and_finite_differences():
    """`jacobian_blocks` (forward mode, sources in padded chunks) against jax.jacrev of the same map
    (reverse mode, an independent path), a central finite difference in float64 numpy of one column,
    and causality (t < s blocks exactly 0); the chunk size does not change a bit of the result."""
    cfg, params, emb = _setup("llama")
    layer, sources = 2, [0, 3, 5, 7, 2]
    blocks = drift.jacobian_blocks(cfg, params, emb, layer, sources, chunk=2)
    assert blocks.shape == (5, 8, cfg.d_model, cfg.d_model)
    np.testing.assert_array_equal(blocks, drift.jacobian_blocks(cfg, params, emb, layer, sources, chunk=5))
    full = jax.jacrev(lambda e: drift.hidden_states(cfg, params, e)[layer])(emb)      # [T, D, T, D]
    for i, s in enumerate(sources):
        np.testing.assert_allclose(blocks[i], np.asarray(full[:, :, s, :]), atol=2e-5)
        assert np.all(blocks[i, :s] == 0)
    eps, t, s, j = 1e-2, 6, 3, 5
    plus = np.asarray(drift.hidden_states(cfg, params, emb.at[s, j].add(eps))[layer, t], np.float64)
    minus = np.asarray(drift.hidden_states(cfg, params, emb.at[s, j].add(-eps))[layer, t], np.float64)
    np.testing.assert_allclose(blocks[1, t, :, j], (plus - minus) / (2 * eps), atol=2e-3)
    for bad in (dict(sources=[8]), dict(sources=[]), dict(layer=cfg.n_layers + 1), dict(chunk=0)):
        kw = dict(layer=layer, sources=[1], chunk=2) | bad
        with pytest.raises(ValueError):
            drift.jacobian_blocks(cfg, params, emb, kw["layer"], kw["sources"], chunk=kw["chunk"])
