"""`ModelConfig.attention_impl = "fused"` (`jax.nn.dot_product_attention`) against the reference path of
eqs. 2–4 on the same weights: forward, gradients, ragged (left-padded) batches, sliding windows, and
cached decoding, within float32 tolerance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.config import ModelConfig
from arlm.inference import GREEDY, generate
from arlm.model.attention import aggregate, bilinear_scores, causal_mask, causal_softmax, fused_attention
from arlm.objectives.lm import pretrain_loss

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
CONFIGS = {
    "llama_gqa": lambda impl: ModelConfig.llama(**BASE, n_kv_heads=2, attention_impl=impl),
    "gpt2": lambda impl: ModelConfig.gpt2(**BASE, attention_impl=impl),
    "sliding": lambda impl: ModelConfig.llama(**BASE, sliding_window=4, global_every=2, attention_impl=impl),
}
TOL = dict(rtol=2e-5, atol=2e-5)


def _pair(name):
    ref, fused = CONFIGS[name]("reference"), CONFIGS[name]("fused")
    return ref, fused, arlm.init_params(ref, jax.random.PRNGKey(0))


def test_fused_attention_equals_the_reference_functions_with_empty_rows():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
    pos_q = jnp.asarray([[2, 3, 4, 5, 6]] * 2)
    mask = causal_mask(pos_q, jnp.asarray([list(range(7))] * 2))
    mask = mask.at[1, :, :3].set(False).at[1, 0, :].set(False)      # padded keys; a row with no key at all
    want = aggregate(causal_softmax(bilinear_scores(q, k, 10.0), mask), v)
    got = fused_attention(q, k, v, mask, 10.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    assert np.all(np.asarray(got)[1, 0] == 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_on_ragged_batches(name):
    ref_cfg, fused_cfg, params = _pair(name)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (3, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] >= np.asarray([0, 3, 7])[:, None])    # left padding
    a = arlm.apply_model(ref_cfg, params, tokens, attention_mask=mask).logits_BxTxV
    b = arlm.apply_model(fused_cfg, params, tokens, attention_mask=mask).logits_BxTxV
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    ga = jax.grad(lambda p: pretrain_loss(ref_cfg, p, batch)[0])(params)
    gb = jax.grad(lambda p: pretrain_loss(fused_cfg, p, batch)[0])(params)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama_gqa", "sliding"])
def test_cached_decoding_matches(name):
    ref_cfg, fused_cfg, params = _pair(name)
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4], [8, 1, 2, 3, 4, 5, 6, 7, 9]]        # ragged
    outs = [generate(c, params, prompts, key=jax.random.PRNGKey(0), max_new_tokens=10, sampler=GREEDY)
            for c in (ref_cfg, fused_cfg)]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens_BxN), np.asarray(outs[0].tokens_BxN))
    np.testing.assert_allclose(np.asarray(outs[1].log_probs_BxN), np.asarray(outs[0].log_probs_BxN), **TOL)


def test_attention_probabilities_take_the_reference_path():
    ref_cfg, fused_cfg, params = _pair("llama_gqa")
    tokens = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
    a = arlm.apply_model(ref_cfg, params, tokens, return_attention=True).attention_probs
    b = arlm.apply_model(fused_cfg, params, tokens, return_attention=True).attention_probs
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_config_validates_the_choice():
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig.llama(**BASE, attention_impl="flash")
    with pytest.raises(ValueError, match="soft-cap"):
        ModelConfig.llama(**BASE, attn_softcap=50.0, attention_impl="fused")


def test_a_fused_model_saves_as_its_hugging_face_family(tmp_path):
    """The attention path is not in the weights: a fused config writes the same checkpoint."""
    from arlm.checkpoints.hf_config import config_to_hf
    ref_cfg, fused_cfg, _ = _pair("llama_gqa")
    assert config_to_hf(fused_cfg)[0] == config_to_hf(ref_cfg)[0]
