"""The contractive residual map (`ModelConfig.residual_gain`, open question 1) and its study."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.analysis import contractive
from arlm.config import ModelConfig

BASE = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)


def test_residual_gain_is_validated_and_refused_by_save_hf(tmp_path):
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="residual_gain must be in"):
            ModelConfig.llama(**BASE, residual_gain=bad)
    from arlm.checkpoints.hf_config import config_to_hf
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        config_to_hf(ModelConfig.llama(**BASE, residual_gain=0.9))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_layer_is_gamma_h_plus_its_sublayers(family):
    """h^(ℓ) = γ² h^(ℓ−1) + γ attention_out + mlp_out, from the model's own sub-layer outputs; γ = 1 is eq. 5."""
    gamma = 0.6
    cfg = getattr(ModelConfig, family)(**BASE, residual_gain=gamma)
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)
    out = arlm.apply_model(cfg, params, tokens, return_hidden=True, return_sublayers=True)
    h = np.asarray(out.hidden_states, np.float64)
    attn, mlp = np.asarray(out.attention_out, np.float64), np.asarray(out.mlp_out, np.float64)
    for layer in range(cfg.n_layers):
        np.testing.assert_allclose(h[layer + 1], gamma ** 2 * h[layer] + gamma * attn[layer] + mlp[layer],
                                   rtol=1e-5, atol=1e-5)
    plain = arlm.forward(cfg.replace(residual_gain=1.0), params, tokens)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(arlm.forward(cfg.replace(residual_gain=1.0),
                                                                              params, tokens)))
    assert not np.allclose(np.asarray(plain), np.asarray(out.logits_BxTxV))


TINY = types.SimpleNamespace(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=48, batch_size=8, learning_rate=3e-3,
                             steps=120, corpus_chars=60_000, val_windows=8, jacobian_windows=2, seeds=(0,),
                             gains=(1.0, 0.5), lags=(0, 16, 32), inject_lags=(1, 8))


@pytest.mark.slow
def test_contraction_lowers_the_top_singular_value_at_long_lags():
    """Acceptance: on tiny byte models trained on the same KJV batches, γ = 0.5 has a smaller top
    singular value of J_L(t, s) than the standard map at lags 16 and 32; the study reports its loss."""
    out = contractive.run(TINY)
    standard, damped = out["gains"]
    assert standard["gain"] == 1.0 and damped["gain"] == 0.5
    for i, lag in enumerate(TINY.lags):
        if lag >= 16:
            assert damped["top_sigma"][i]["mean"] < standard["top_sigma"][i]["mean"], (lag, out)
    assert np.isfinite(damped["loss"]["mean"]) and np.isfinite(standard["loss"]["mean"])
    assert len(damped["excess"]) == len(TINY.inject_lags)
