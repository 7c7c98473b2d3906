"""Eqs. 9–10 computed exactly on a problem small enough to enumerate every response.

With responses of N tokens from a vocabulary of V (V^N of them per prompt), log π(y|x) of every
response comes from one forward pass, and

    π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x)                                   (eq. 10)
    J(π)    = Σ_y π(y|x) r(x, y) − β KL(π(·|x) ‖ π_ref(·|x))  (eq. 9, averaged over prompts)
            = β log Z(x) − β KL(π(·|x) ‖ π*(·|x))

so J rises exactly as KL(π ‖ π*) falls, and J(π*) = β log Z is the maximum.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arlm.config import ModelConfig
from arlm.model.log_probs import policy_outputs, sequence_batch

Array = jax.Array


def all_responses(vocab: int, length: int) -> np.ndarray:
    """Every response of `length` tokens over ids 0 … vocab − 1, [V^N, N] int32 in lexicographic order."""
    return np.asarray(list(itertools.product(range(vocab), repeat=length)), np.int32)


def enumeration_batch(prompts_XxP: np.ndarray, responses_YxN: np.ndarray) -> dict[str, np.ndarray]:
    """A sequence batch of every (prompt, response) pair, prompt-major: row x·Y + y."""
    x, y = len(prompts_XxP), len(responses_YxN)
    prompt = np.repeat(prompts_XxP, y, axis=0)
    resp = np.tile(responses_YxN, (x, 1))
    return sequence_batch(prompt, np.zeros(x * y, np.int32), resp, np.full(x * y, resp.shape[1], np.int32))


@partial(jax.jit, static_argnums=(0, 3))
def response_log_probs(config: ModelConfig, params: Any, batch: dict[str, Array], n_prompts: int) -> Array:
    """log π(y|x) of every enumerated response, [X, Y] (each row sums to 1 in probability)."""
    return policy_outputs(config, params, batch).sequence_logp().reshape(n_prompts, -1)


def optimal_log_probs(ref_logp_XxY: Array, reward_XxY: Array, beta: float) -> tuple[Array, Array]:
    """Eq. 10: (log π*(y|x) [X, Y], log Z(x) [X])."""
    unnorm = ref_logp_XxY + reward_XxY / beta
    log_z = jax.scipy.special.logsumexp(unnorm, axis=-1)
    return unnorm - log_z[:, None], log_z


def kl_divergence(logp_XxY: Array, logq_XxY: Array) -> Array:
    """KL(p ‖ q) per prompt, [X]."""
    return jnp.sum(jnp.exp(logp_XxY) * (logp_XxY - logq_XxY), axis=-1)


def objective_value(logp_XxY: Array, ref_logp_XxY: Array, reward_XxY: Array, beta: float) -> Array:
    """Eq. 9 exactly: mean over prompts of E_π[r] − β KL(π ‖ π_ref)."""
    expected_r = jnp.sum(jnp.exp(logp_XxY) * reward_XxY, axis=-1)
    return jnp.mean(expected_r - beta * kl_divergence(logp_XxY, ref_logp_XxY))
