"""Prompt + response sequences and the shared pieces every alignment loss needs, computed once.

A *sequence batch* is a dict of arrays, all [B, T] with T = P + N:

    tokens        int32  prompt (left-padded to P) then response (pad after its stop token)
    positions     int32  0 at each row's first real token (padding does not shift positions)
    attention     bool   real tokens (prompt and response up to its length)
    response_mask f32    1 on the response tokens that the objective scores

This is the layout `arlm.generate` samples in, so the trainer reads a rollout exactly as the
sampler produced it. `policy_outputs` runs the model once and returns, on the T − 1 target
positions (position t scores token t + 1), the float32 log-probs log π_θ(y_t | x, y_<t),
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
from arlm.model import apply_model
from arlm.objectives.lm import token_log_probs

Array = jax.Array
Batch = dict[str, Array]


def sequence_batch(prompt_BxP: Array, start_B: Array, response_BxN: Array, lengths_B: Array) -> dict[str, np.ndarray]:
    """A sequence batch from left-padded prompts (row b starts at start_B[b]) and responses of lengths_B."""
    prompt_BxP, start_B = np.asarray(prompt_BxP), np.asarray(start_B)
    response_BxN, lengths_B = np.asarray(response_BxN), np.asarray(lengths_B)
    b, p = prompt_BxP.shape
    n = response_BxN.shape[1]
    idx_T = np.arange(p + n)
    real_prompt = idx_T[None, :p] >= start_B[:, None]
    in_response = idx_T[None, :n] < lengths_B[:, None]
    attention = np.concatenate([real_prompt, in_response], axis=1)
    return {
        "tokens": np.where(attention, np.concatenate([prompt_BxP, response_BxN], 1), 0).astype(np.int32),
        "positions": np.maximum(idx_T[None, :] - start_B[:, None], 0).astype(np.int32),
        "attention": attention,
        "response_mask": np.concatenate([np.zeros((b, p), np.float32), in_response.astype(np.float32)], 1),
    }


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
    out = apply_model(config, params, tokens[:, :-1], positions=batch["positions"][:, :-1],
                      attention_mask=batch["attention"][:, :-1], return_hidden=hidden)
    mask_BxT = batch["response_mask"][:, 1:].astype(jnp.float32)
    logp_BxT = token_log_probs(out.logits_BxTxV, tokens[:, 1:]) * mask_BxT
    return PolicyOutputs(logp_BxT, mask_BxT, out.logits_BxTxV if logits else None,
                         out.hidden_states[-1] if hidden else None)
