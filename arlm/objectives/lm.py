"""Language-modelling losses: pretraining (eq. 7) and SFT on response tokens (eq. 8).

Pretraining reads {"inputs", "targets"} token batches. SFT reads the one sequence-batch format of
`arlm.model.log_probs` (tokens, positions, attention, response_mask; optional per-row "weights"),
the format rollouts, preference pairs and `TaskIO.sft_batch` produce, and `response_nll` is the one
implementation of eq. 8: `sft_loss` here and the `SFT`/`RSFT` estimators of eq. 9 both call it.
Both losses are built as `loss_fn(params, batch) -> (loss, metrics)`, the shape every objective in
arlm takes so that one generic train step serves them all.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.log_probs import SEQUENCE_KEYS, PolicyOutputs, policy_outputs, token_log_probs

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Batch], tuple[Array, dict[str, Array]]]


def masked_mean_nll(logp_BxT: Array, mask_BxT: Array | None) -> tuple[Array, Array]:
    """Mean negative log-likelihood over the tokens where mask is 1, and their count."""
    if mask_BxT is None:
        return -jnp.mean(logp_BxT), jnp.asarray(logp_BxT.size, jnp.float32)
    mask = mask_BxT.astype(jnp.float32)
    n_tokens = jnp.sum(mask)
    return -jnp.sum(logp_BxT * mask) / jnp.maximum(n_tokens, 1.0), n_tokens


def pretrain_loss(config: ModelConfig, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 7: L_PT(θ) = −(1/N) Σ_t log p_θ(x_{t+1} | x_{≤t}), plus the MoE load-balancing loss.

    batch: {"inputs": int[B, T], "targets": int[B, T]} with targets the inputs shifted by one.
    """
    if "loss_mask" in batch or "response_mask" in batch:
        raise ValueError("pretrain_loss (eq. 7) scores every token; for eq. 8 use sft_loss on a sequence batch")
    out = apply_model(config, params, batch["inputs"])
    logp_BxT = token_log_probs(out.logits_BxTxV, batch["targets"])
    nll, n_tokens = masked_mean_nll(logp_BxT, None)
    loss = nll + config.moe_aux_weight * out.moe_aux_loss if config.n_experts else nll
    return loss, {"nll": nll, "moe_aux": out.moe_aux_loss, "tokens": n_tokens}


def response_nll(out: PolicyOutputs, weights_B: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Eq. 8: −Σ_t m_t log π_θ(y_t | x, y_<t) / Σ_t m_t over the response mask m (rows weighted by
    `weights_B` if given: RSFT's keep mask), and the number of scored tokens."""
    mask_BxT = out.mask_BxT if weights_B is None else out.mask_BxT * weights_B[:, None]
    nll, n_tokens = masked_mean_nll(out.logp_BxT, mask_BxT)
    return nll, {"tokens": n_tokens}


def sft_loss(config: ModelConfig, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 8 on a sequence batch (`arlm.model.log_probs`): the eq. 7 sum restricted to the response."""
    missing = set(SEQUENCE_KEYS) - set(batch)
    if missing:
        raise KeyError(f"SFT (eq. 8) needs a sequence batch; missing {sorted(missing)} "
                       f"(build one with arlm.model.log_probs.sequence_batch)")
    return response_nll(policy_outputs(config, params, batch), batch.get("weights"))


def make_lm_loss(config: ModelConfig, kind: str = "pretrain") -> LossFn:
    """`loss_fn(params, batch)` for eq. 7 ("pretrain") or eq. 8 ("sft")."""
    fns = {"pretrain": pretrain_loss, "sft": sft_loss}
    if kind not in fns:
        raise ValueError(f"unknown LM loss {kind!r}; expected one of {sorted(fns)}")
    fn = fns[kind]
    return lambda params, batch: fn(config, params, batch)
