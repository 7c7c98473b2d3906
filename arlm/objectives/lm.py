"""Language-modelling losses: pretraining (eq. 7) and SFT with response masks (eq. 8).

Both are built as `loss_fn(params, batch) -> (loss, metrics)`, the shape every
objective in arlm takes so that one generic train step serves them all.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Batch], tuple[Array, dict[str, Array]]]


def token_log_probs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log p_θ(x_{t+1} | x_{≤t}) of each target, in float32: log_softmax then gather."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def masked_mean_nll(logp_BxT: Array, mask_BxT: Array | None) -> tuple[Array, Array]:
    """Mean negative log-likelihood over the tokens where mask is 1, and their count."""
    if mask_BxT is None:
        return -jnp.mean(logp_BxT), jnp.asarray(logp_BxT.size, jnp.float32)
    mask = mask_BxT.astype(jnp.float32)
    n_tokens = jnp.sum(mask)
    return -jnp.sum(logp_BxT * mask) / jnp.maximum(n_tokens, 1.0), n_tokens


def pretrain_loss(config: ModelConfig, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 7: L_PT(θ) = −(1/N) Σ_t log p_θ(x_{t+1} | x_{≤t}), plus the MoE load-balancing loss.

    batch: {"inputs": int[B, T], "targets": int[B, T]} with targets the inputs shifted by one;
    an optional "loss_mask": [B, T] turns this into eq. 8 (see `sft_loss`).
    """
    out = apply_model(config, params, batch["inputs"])
    logp_BxT = token_log_probs(out.logits_BxTxV, batch["targets"])
    nll, n_tokens = masked_mean_nll(logp_BxT, batch.get("loss_mask"))
    loss = nll + config.moe_aux_weight * out.moe_aux_loss if config.n_experts else nll
    return loss, {"nll": nll, "moe_aux": out.moe_aux_loss, "tokens": n_tokens}


def sft_loss(config: ModelConfig, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 8: the eq. 7 sum restricted to response tokens (batch["loss_mask"] = 1 there)."""
    if "loss_mask" not in batch:
        raise KeyError("SFT needs batch['loss_mask'] marking response tokens (eq. 8)")
    return pretrain_loss(config, params, batch)


def make_lm_loss(config: ModelConfig, kind: str = "pretrain") -> LossFn:
    """`loss_fn(params, batch)` for eq. 7 ("pretrain") or eq. 8 ("sft")."""
    fns = {"pretrain": pretrain_loss, "sft": sft_loss}
    if kind not in fns:
        raise ValueError(f"unknown LM loss {kind!r}; expected one of {sorted(fns)}")
    fn = fns[kind]
    return lambda params, batch: fn(config, params, batch)
