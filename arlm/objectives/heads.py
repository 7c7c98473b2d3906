"""Scalar heads on the transformer's last hidden state: a reward model r_φ(x, y) (eq. 11) and
PPO's value head V(x, y_≤t) (eq. 12).

A head reads the last layer's residual stream h_t^(L), normalises it (RMS, no learned
scale) and applies w·h + b. The reward model is a backbone (a full arlm param tree, usually
initialised from the policy) plus a head read at each response's last real token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.log_probs import Batch, preference_rows

Array = jax.Array


def init_scalar_head(d_model: int) -> dict[str, Array]:
    """w = 0, b = 0: the head starts by predicting 0 everywhere."""
    return {"w": jnp.zeros((d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def scalar_head(head: dict[str, Array], hidden_BxTxD: Array) -> Array:
    """w · rms_normalise(h_t) + b at every position; [B, T] float32."""
    h = hidden_BxTxD.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)
    return h @ head["w"] + head["b"]


def last_token_index(mask_BxT: Array) -> Array:
    """Index of each row's last masked position (0 for an empty row); [B] int32."""
    t = mask_BxT.shape[-1]
    return jnp.max(jnp.where(mask_BxT > 0, jnp.arange(t)[None, :], 0), axis=-1).astype(jnp.int32)


def init_reward_model(backbone_params: Any, config: ModelConfig) -> dict[str, Any]:
    """{"backbone": model params, "head": scalar head}."""
    return {"backbone": backbone_params, "head": init_scalar_head(config.d_model)}


def reward_model_scores(config: ModelConfig, rm_params: dict[str, Any], batch: Batch) -> Array:
    """r_φ(x, y) for each sequence: the head at the last real token's hidden state; [B]."""
    out = apply_model(config, rm_params["backbone"], batch["tokens"], positions=batch["positions"],
                      attention_mask=batch["attention"], return_hidden=True)
    values_BxT = scalar_head(rm_params["head"], out.hidden_states[-1])
    return jnp.take_along_axis(values_BxT, last_token_index(batch["attention"])[:, None], axis=-1)[:, 0]


def pair_scores(config: ModelConfig, rm_params: dict[str, Any], pairs: Batch) -> Array:
    """r_φ(x, y_w) and r_φ(x, y_l) of a preference batch ([B, 2, T] arrays); [B, 2]."""
    return reward_model_scores(config, rm_params, preference_rows(pairs)).reshape(-1, 2)


def reward_model_loss(config: ModelConfig, rm_params: dict[str, Any], pairs: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 11 over a preference batch: mean −log σ(r_w − r_l), and the pair accuracy P[r_w > r_l]."""
    from arlm.objectives.preference import bradley_terry_loss

    r_Bx2 = pair_scores(config, rm_params, pairs)
    return jnp.mean(bradley_terry_loss(r_Bx2[:, 0], r_Bx2[:, 1])), \
        {"accuracy": jnp.mean((r_Bx2[:, 0] > r_Bx2[:, 1]).astype(jnp.float32))}
