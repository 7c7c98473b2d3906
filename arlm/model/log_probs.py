"""log π_θ(y | x): the one home of token and sequence log-probabilities (eqs. 7, 8, 16), for every
floor above the model: objectives (eqs. 7–15), inference (perplexity, score-function gradients)
and analysis.

A *sequence batch* is a dict of arrays, all [B, T] with T = P + N:

    tokens        int32  prompt (left-padded to P) then response (pad after its stop token)
    positions     int32  0 at each row's first real token (padding does not shift positions)
    attention     bool   real tokens (prompt and response up to its length)
    response_mask f32    1 on the response tokens that the objective scores
    segment_ids   int32  (optional, packed rows) which example each token belongs to; attention
                         never crosses a segment and positions restart at each (`arlm.data.packing`)

This is the layout `arlm.generate` samples in, so the trainer reads a rollout exactly as the
sampler produced it; `sequence_batch` builds it from left-padded prompts and responses (numpy in,
numpy out; jax arrays in, jax arrays out, so it also runs under `jit` and `grad`).
`policy_outputs` runs the model once and returns, on the T − 1 target positions (position t
scores token t + 1), the float32 log-probs log π_θ(y_t | x, y_<t),
the response mask, and optionally the full logits (exact KL) and the final hidden states
(value and reward heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arlm.config import ModelConfig
from arlm.model.transformer import apply_model

Array = jax.Array
Batch = dict[str, Array]

SEQUENCE_KEYS = ("tokens", "positions", "attention", "response_mask")    # the arrays of a sequence batch


def token_log_probs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log p_θ(x_{t+1} | x_{≤t}) of each target (eq. 6's law at the targets: the terms of eq. 7), in
    float32: log_softmax then gather."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def sequence_batch(prompt_BxP: Array, start_B: Array, response_BxN: Array, lengths_B: Array | None = None, *,
                   response_mask_BxN: Array | None = None) -> dict[str, Array]:
    """A sequence batch from left-padded prompts (row b's real tokens start at start_B[b]) and responses.

    Give the responses' `lengths_B` (tokens past a length are padding: not attended, zeroed), or a
    `response_mask_BxN` of the tokens to score (every response token is attended; in a causal model
    tokens after a stop do not change the log-probs before it). With neither, every token is scored.
    """
    xp = jnp if any(isinstance(a, jax.Array) for a in (prompt_BxP, start_B, response_BxN, lengths_B,
                                                          response_mask_BxN)) else np
    prompt_BxP, start_B, response_BxN = xp.asarray(prompt_BxP), xp.asarray(start_B), xp.asarray(response_BxN)
    b, p = prompt_BxP.shape
    n = response_BxN.shape[1]
    idx_T = xp.arange(p + n)
    real_prompt = idx_T[None, :p] >= start_B[:, None]
    if lengths_B is not None:
        in_response = idx_T[None, :n] < xp.asarray(lengths_B)[:, None]
        scored = in_response.astype(np.float32)
    else:
        in_response = xp.ones((b, n), bool)
        scored = (in_response if response_mask_BxN is None else xp.asarray(response_mask_BxN)).astype(np.float32)
    attention = xp.concatenate([real_prompt, in_response], axis=1)
    return {
        "tokens": xp.where(attention, xp.concatenate([prompt_BxP, response_BxN], 1), 0).astype(np.int32),
        "positions": xp.maximum(idx_T[None, :] - start_B[:, None], 0).astype(np.int32),
        "attention": attention,
        "response_mask": xp.concatenate([xp.zeros((b, p), np.float32), scored], 1),
    }


def preference_rows(batch: Batch) -> Batch:
    """A preference batch's [B, 2, T] pair arrays as a [2B, T] sequence batch (chosen, rejected,
    chosen, …); other keys are dropped. `.reshape(-1, 2)` on a per-row result gives [B, 2] back."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k in SEQUENCE_KEYS}


@dataclasses.dataclass(frozen=True)
class PolicyOutputs:
    """On the T − 1 target positions: logp_BxT (0 off the mask), mask_BxT, and, if asked,
    logits_BxTxV and hidden_BxTxD (the last layer's residual stream, before the final norm)."""

    logp_BxT: Array
    mask_BxT: Array
    logits_BxTxV: Array | None = None
    hidden_BxTxD: Array | None = None

    def sequence_logp(self) -> Array:
        """log π_θ(y | x) = Σ_t log π_θ(y_t | x, y_<t) over the response; [B]."""
        return jnp.sum(self.logp_BxT, axis=-1)


jax.tree_util.register_dataclass(PolicyOutputs, data_fields=["logp_BxT", "mask_BxT", "logits_BxTxV", "hidden_BxTxD"],
                                 meta_fields=[])


def policy_outputs(config: ModelConfig, params: Any, batch: Batch, *, logits: bool = False,
                   hidden: bool = False) -> PolicyOutputs:
    """One forward pass over a sequence batch: per-token log-probs of the response (float32)."""
    tokens = batch["tokens"]
    segments = batch.get("segment_ids")
    out = apply_model(config, params, tokens[:, :-1], positions=batch["positions"][:, :-1],
                      attention_mask=batch["attention"][:, :-1], return_hidden=hidden,
                      segment_ids=None if segments is None else segments[:, :-1])
    mask_BxT = batch["response_mask"][:, 1:].astype(jnp.float32)
    logp_BxT = token_log_probs(out.logits_BxTxV, tokens[:, 1:]) * mask_BxT
    return PolicyOutputs(logp_BxT, mask_BxT, out.logits_BxTxV if logits else None,
                         out.hidden_states[-1] if hidden else None)


def sequence_log_prob(config: ModelConfig, params: Any, prompt_BxP: Array, completion_BxN: Array,
                      completion_mask_BxN: Array | None = None, *, prompt_lengths_B: Array | None = None) -> Array:
    """log π_θ(y | x) = Σ_t log p_θ(y_t | x, y_<t) (eq. 6 chained over the completion) over the (masked)
    completion tokens; [B], float32.

    The one function for log π(y|x) of a batch of prompts and completions: prompts of equal length
    (`prompt_lengths_B=None`) or ragged and left-padded to P (row b's prompt is its last
    prompt_lengths_B[b] tokens; padding is masked out of attention and positions count from each
    row's first real token, as in `arlm.generate`). The mask drops tokens after a stop.
    Differentiable in `params`; `policy_outputs` gives the per-token terms.
    """
    p = prompt_BxP.shape[1]
    start_B = (jnp.zeros(prompt_BxP.shape[0], jnp.int32) if prompt_lengths_B is None
               else p - jnp.asarray(prompt_lengths_B, jnp.int32))
    batch = sequence_batch(jnp.asarray(prompt_BxP), start_B, jnp.asarray(completion_BxN),
                           response_mask_BxN=completion_mask_BxN)
    return policy_outputs(config, params, batch).sequence_logp()
