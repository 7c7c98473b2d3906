"""Differentiating through sampling: pure functions that `jax.grad`, `jacfwd` and `jacrev` go through.

(a) `sequence_log_prob` (`arlm.model.log_probs`, re-exported here): log π_θ(y | x) of a sampled
    trajectory as a function of params — the
    score-function (REINFORCE) estimator ∇E[f(y)] = E[f(y) ∇ log π_θ(y|x)] uses it
    (`reinforce_surrogate`). From an `arlm.generate` output (ragged, left-padded prompts, rows
    that stopped early) in one call: `generated_log_prob`, `score_function_gradient`.
(b) `relaxed_rollout`: a Gumbel-softmax rollout; each step feeds the expected embedding
    ỹ_t E (or, straight-through, the hard one-hot's embedding with the soft gradient) back in,
    so gradients reach the params and the prompt embeddings.
(c) `rollout_hidden_states`: h^(ℓ) of prompt + continuation as a function of the prompt's input
    embeddings, for Jacobians ∂h_t^(ℓ)/∂h_s^(0) (eq. 19).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.inference.cache import forward_with_cache, init_cache
from arlm.inference.decoding import GenerateOutput
from arlm.model import apply_model, embed_tokens
from arlm.model.log_probs import sequence_log_prob

Array = jax.Array


def reinforce_surrogate(log_prob_B: Array, reward_B: Array, baseline: Array | float = 0.0) -> Array:
    """A scalar whose gradient is the score-function estimate of ∇_θ E[f(y)]: mean((f − b)·log π_θ(y))."""
    advantage = jax.lax.stop_gradient(reward_B - baseline)
    return jnp.mean(advantage * log_prob_B)


def generated_log_prob(config: ModelConfig, params: Any, out: GenerateOutput) -> Array:
    """log π_θ(y | x) [B] (eq. 16's sampled tokens) of what `arlm.generate` returned, differentiable in params.

    Reads `out.prompt_BxP` (left-padded), `out.tokens_BxN` and `out.completion_mask_BxN`: padding
    is masked out of attention and positions count from each row's first real token, as in the
    sampler, so the value equals Σ_t out.log_probs_BxN (τ = 1) up to float32 rounding.
    """
    if out.prompt_BxP is None or out.completion_mask_BxN is None:
        raise ValueError("this GenerateOutput carries no prompt_BxP / completion_mask_BxN; use arlm.generate's")
    return sequence_log_prob(config, params, out.prompt_BxP, out.tokens_BxN, out.completion_mask_BxN,
                             prompt_lengths_B=out.prompt_lengths_B)


def score_function_gradient(config: ModelConfig, params: Any, out: GenerateOutput, reward_B: Array,
                            baseline: Array | float = 0.0) -> Any:
    """The score-function (REINFORCE) estimate of ∇_θ E_{y∼π_θ (eq. 16)}[f(y)] from one `arlm.generate` batch.

    mean_b (f(y_b) − baseline) ∇_θ log π_θ(y_b | x_b), a pytree shaped like `params`; unbiased when
    `out` was sampled at τ = 1 without truncation and the baseline does not depend on y_b.
    """
    return jax.grad(lambda p: reinforce_surrogate(generated_log_prob(config, p, out), reward_B, baseline))(params)


def relaxed_rollout(config: ModelConfig, params: Any, prompt_embeddings_BxPxD: Array, key: Array,
                    steps: int, *, tau: float = 1.0, hard: bool = False) -> tuple[Array, Array]:
    """Gumbel-softmax rollout of `steps` tokens from input embeddings (differentiable end to end).

    Step t draws ỹ_t = softmax((z_t + g_t) / τ), g_t ~ Gumbel(0, 1); with `hard`, the forward pass
    uses one_hot(argmax ỹ_t) and the backward pass the gradient of ỹ_t (straight-through).
    The next input is ỹ_t E. Returns (soft or hard token vectors [B, steps, V], logits [B, steps, V]).
    """
    b, p, _ = prompt_embeddings_BxPxD.shape
    if p + steps > config.max_seq_len:
        raise ValueError(f"prompt {p} + steps {steps} exceeds the context window Δ = {config.max_seq_len}")
    embed_VxD = params["embed"]
    cache = init_cache(config, b, p + steps)
    logits, cache = forward_with_cache(config, params, cache, embeddings_BxTxD=prompt_embeddings_BxPxD,
                                       last_logits_only=True)

    def step(carry, key_t):
        cache, logits_BxV = carry
        gumbel = jax.random.gumbel(key_t, logits_BxV.shape, jnp.float32)
        y_soft = jax.nn.softmax((logits_BxV + gumbel) / tau, axis=-1)
        if hard:
            y_hard = jax.nn.one_hot(jnp.argmax(y_soft, -1), y_soft.shape[-1], dtype=y_soft.dtype)
            y = y_soft + jax.lax.stop_gradient(y_hard - y_soft)
        else:
            y = y_soft
        emb_Bx1xD = (y @ embed_VxD)[:, None, :]
        next_logits, cache = forward_with_cache(config, params, cache, embeddings_BxTxD=emb_Bx1xD)
        return (cache, next_logits[:, 0]), (y, logits_BxV)

    _, (ys, zs) = jax.lax.scan(step, (cache, logits[:, 0]), jax.random.split(key, steps))
    return jnp.swapaxes(ys, 0, 1), jnp.swapaxes(zs, 0, 1)


def rollout_hidden_states(config: ModelConfig, params: Any, prompt_embeddings_BxPxD: Array,
                          completion_BxN: Array) -> Array:
    """Hidden states h^(0..L) [L+1, B, P+N, D] of a prompt (given as input embeddings) followed by
    a fixed continuation, e.g. one sampled by `arlm.generate`; differentiate w.r.t. the prompt."""
    completion_emb = embed_tokens(config, params, completion_BxN)
    emb = jnp.concatenate([prompt_embeddings_BxPxD, completion_emb.astype(prompt_embeddings_BxPxD.dtype)], 1)
    return apply_model(config, params, embeddings=emb, return_hidden=True).hidden_states
