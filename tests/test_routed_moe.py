"""`ModelConfig.moe_impl = "routed"`: sort-based dispatch of each token to its top-k experts with a
capacity per expert, equal to the dense evaluation (every expert on every token) when nothing is
dropped; the dropped fraction against a numpy count of the same rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.config import ModelConfig
from arlm.model.layers import expert_capacity
from arlm.objectives.lm import pretrain_loss

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, n_experts=4, moe_top_k=2)


def _configs(mlp="swiglu", capacity=None):
    dense = ModelConfig.llama(**BASE, mlp=mlp) if mlp != "gelu" else ModelConfig.gpt2(**BASE)
    routed = dense.replace(moe_impl="routed", moe_capacity_factor=capacity or float(BASE["n_experts"]))
    return dense, routed


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_routed_equals_dense_when_nothing_is_dropped(mlp):
    """Capacity factor E: C = tokens · k, no expert can overflow."""
    dense, routed = _configs(mlp)
    params = arlm.init_params(dense, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 10)), jnp.int32)
    a = arlm.apply_model(dense, params, tokens)
    b = arlm.apply_model(routed, params, tokens, return_moe_stats=True)
    np.testing.assert_allclose(np.asarray(b.logits_BxTxV), np.asarray(a.logits_BxTxV), rtol=2e-5, atol=2e-5)
    assert float(b.moe_aux_loss) == pytest.approx(float(a.moe_aux_loss), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(b.moe_dropped_fraction), np.zeros(BASE["n_layers"]))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    ga = jax.grad(lambda p: pretrain_loss(dense, p, batch)[0])(params)
    gb = jax.grad(lambda p: pretrain_loss(routed, p, batch)[0])(params)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_dropped_fraction_follows_the_capacity_rule():
    """With a small capacity, the dropped fraction equals a numpy count: per expert, assignments in
    token order (token-major, then k) beyond C = ceil(factor · tokens · k / E) are dropped."""
    dense, routed = _configs(capacity=0.5)
    params = arlm.init_params(dense, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    out = arlm.apply_model(routed, params, tokens, return_moe_stats=True)
    # the first layer's routing, recomputed: its input is Norm(h^(1)) after attention
    dense_out = arlm.apply_model(dense, params, tokens, return_hidden=True, return_sublayers=True)
    h1 = dense_out.hidden_states[0] + dense_out.attention_out[0]
    layer0 = jax.tree_util.tree_map(lambda x: x[0], params["layers"])
    from arlm.model.layers import Norm
    x = Norm(dense, name="mlp_norm").apply({"params": layer0["mlp_norm"]}, h1)
    logits = np.asarray(x, np.float64) @ np.asarray(layer0["moe"]["router"], np.float64)
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :BASE["moe_top_k"]].reshape(-1)
    cap = expert_capacity(tokens.size, BASE["moe_top_k"], BASE["n_experts"], 0.5)
    assert cap == math.ceil(0.5 * tokens.size * 2 / 4)
    seen = np.zeros(BASE["n_experts"], int)
    dropped = 0
    for e in top:
        dropped += seen[e] >= cap
        seen[e] += 1
    assert float(out.moe_dropped_fraction[0]) == pytest.approx(dropped / top.size)
    assert 0 < dropped < top.size


def test_moe_config_is_validated():
    with pytest.raises(ValueError, match="moe_impl"):
        ModelConfig.llama(**BASE, moe_impl="sparse")
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        ModelConfig.llama(**BASE, moe_impl="routed", moe_capacity_factor=0.0)
