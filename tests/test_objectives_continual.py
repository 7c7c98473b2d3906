"""Eq. 23 (`arlm.objectives.continual`): the penalties Ω against float64 numpy, the Fisher diagonal
against a loop over sequences, and the penalised train step's limits λ = 0 and λ large."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arlm
from arlm.config import ModelConfig
from arlm.objectives import make_lm_loss
from arlm.objectives.continual import (PENALTIES, ewc_penalty, fisher_diagonal, l2_penalty, penalized,
                                       representation_penalty, sequence_log_likelihood)
from arlm.sharding import MeshConfig, batch_sharding, make_mesh, replicated
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

CONFIG = ModelConfig.llama(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)


def _params(seed: int):
    return arlm.init_params(CONFIG, jax.random.PRNGKey(seed))


def _tokens(seed: int, b: int = 4, t: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (b, t)).astype(np.int32)


def _np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def test_fisher_diagonal_equals_a_loop_over_sequences():
    """F_i = mean over sequences of (∂ log p(x)/∂θ_i)², each sequence's gradient taken alone."""
    params = _params(0)
    batches = [_tokens(1), _tokens(2, b=3)]
    fisher = fisher_diagonal(CONFIG, params, batches)
    grad = jax.jit(jax.grad(sequence_log_likelihood, argnums=1), static_argnums=0)
    total, n = None, 0
    for tokens_BxT in batches:
        for row in tokens_BxT:
            squares = [g ** 2 for g in _np_leaves(grad(CONFIG, params, jnp.asarray(row)))]
            total = squares if total is None else [a + b for a, b in zip(total, squares)]
            n += 1
    for got, want in zip(_np_leaves(fisher), total):
        np.testing.assert_allclose(got, want / n, rtol=2e-4, atol=1e-10)
    # the per-sequence log-likelihood itself, against a float64 log-softmax
    logits = np.asarray(arlm.forward(CONFIG, params, jnp.asarray(batches[0][:1, :-1])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    want = logp[np.arange(8), batches[0][0, 1:]].sum()
    np.testing.assert_allclose(float(sequence_log_likelihood(CONFIG, params, jnp.asarray(batches[0][0]))), want,
                               rtol=1e-5)


def test_l2_and_ewc_penalties_equal_numpy():
    theta, anchor = _params(0), _params(1)
    fisher = jax.tree_util.tree_map(lambda x: jnp.abs(x) * 3.0, _params(2))
    t, a, f = _np_leaves(theta), _np_leaves(anchor), _np_leaves(fisher)
    np.testing.assert_allclose(float(l2_penalty(theta, anchor)),
                               0.5 * sum(np.sum((x - y) ** 2) for x, y in zip(t, a)), rtol=1e-5)
    np.testing.assert_allclose(float(ewc_penalty(theta, anchor, fisher)),
                               0.5 * sum(np.sum(w * (x - y) ** 2) for x, y, w in zip(t, a, f)), rtol=1e-5)


def test_representation_penalty_and_its_gradient_vanish_at_the_anchor():
    anchor, tokens = _params(0), jnp.asarray(_tokens(3))
    value, grads = jax.value_and_grad(representation_penalty, argnums=1)(CONFIG, anchor, anchor, tokens)
    assert float(value) == 0.0
    assert all(np.all(g == 0) for g in _np_leaves(grads))
    moved = jax.tree_util.tree_map(lambda x: x * 1.1, anchor)
    h0 = np.asarray(arlm.apply_model(CONFIG, anchor, tokens, return_hidden=True).hidden_states, np.float64)[1:]
    h1 = np.asarray(arlm.apply_model(CONFIG, moved, tokens, return_hidden=True).hidden_states, np.float64)[1:]
    np.testing.assert_allclose(float(representation_penalty(CONFIG, moved, anchor, tokens)),
                               np.mean(np.sum((h1 - h0) ** 2, -1)) / CONFIG.d_model, rtol=1e-4)


def _train(omega: str, lam: float, optimizer, steps: int = 5):
    """`steps` penalised updates on new data from the anchor θ^(k); returns (params, metrics)."""
    anchor = _params(0)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    continual = {"anchor": jax.tree_util.tree_map(jnp.copy, anchor),      # the state's own buffers are donated
                 "fisher": fisher_diagonal(CONFIG, anchor, [_tokens(4)]),
                 "earlier_BxT": jnp.asarray(_tokens(5))}
    frozen = {"continual": continual, "task": None}
    frozen_sharding = jax.tree_util.tree_map(lambda _: replicated(mesh), frozen)
    loss = penalized(make_lm_loss(CONFIG), omega, lam, CONFIG)
    state, sharding = state_from_params(anchor, optimizer, mesh, MeshConfig(data=1), seed=0)
    step = make_train_step(loss, optimizer, sharding, batch_sharding(mesh), frozen_sharding=frozen_sharding)
    metrics = None
    for i in range(steps):
        toks = _tokens(10 + i)
        state, metrics = step(state, {"inputs": toks[:, :-1], "targets": toks[:, 1:]}, frozen)
    return state.params, metrics


@pytest.fixture(scope="module")
def unpenalised():
    """The plain step's params (Ω = 0), trained once for every penalty's comparison."""
    return _train("none", 0.0, optax.adam(1e-2))[0]


@pytest.mark.parametrize("omega", PENALTIES)
def test_lambda_zero_is_exactly_the_unpenalised_step(omega, unpenalised):
    plain = unpenalised
    got, metrics = _train(omega, 0.0, optax.adam(1e-2))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(metrics["loss"]) == float(metrics["task_loss"])
    assert (float(metrics["penalty"]) > 0) == (omega != "none")     # Ω is still reported


def _dist(p, anchor) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(_np_leaves(p), _np_leaves(anchor)))))


def test_a_large_lambda_keeps_theta_at_the_anchor():
    """L2: SGD with step η and λ = 1/η restores θ^(k) every step up to η ∇L, θ − θ^(k) = −η ∇L(θ), so
    ‖θ − θ^(k)‖ ≤ η max‖∇L‖ < ε = 1e-3, while λ = 0 at a useful step moves ≥ 10 ε.
    EWC's stiffness spans ten decades of F here, too many for SGD; under Adam (lr 1e-3, 20 steps)
    λ = 1e8 keeps every coordinate within ε = 1e-3 of θ^(k), where λ = 0 moves one ≥ 10 ε."""
    eps = 1e-3
    anchor = _params(0)
    far, _ = _train("none", 0.0, optax.sgd(0.3))
    assert _dist(far, anchor) > 10 * eps, _dist(far, anchor)
    near, _ = _train("l2", 1e3, optax.sgd(1e-3))
    assert _dist(near, anchor) < eps, _dist(near, anchor)

    def max_move(p) -> float:
        return max(float(np.max(np.abs(x - y))) for x, y in zip(_np_leaves(p), _np_leaves(anchor)))
    free, _ = _train("ewc", 0.0, optax.adam(1e-3), steps=20)
    pinned, _ = _train("ewc", 1e8, optax.adam(1e-3), steps=20)
    assert max_move(free) > 10 * eps and max_move(pinned) < eps, (max_move(free), max_move(pinned))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown continual-learning penalty 'l1'"):
        penalized(make_lm_loss(CONFIG), "l1", 1.0, CONFIG)
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        penalized(make_lm_loss(CONFIG), "l2", -1.0, CONFIG)
    with pytest.raises(ValueError, match="at least one batch"):
        fisher_diagonal(CONFIG, _params(0), [])
