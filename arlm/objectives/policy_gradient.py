"""Policy-gradient surrogates: what the train step differentiates to follow ∇J (eqs. 12, 15).

    REINFORCE / RLOO:  −A_i log π_θ(y_i|x)                                   (one sequence, A fixed)
    PPO-clip (eq. 12): −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),  ρ_t = π_θ(y_t|·) / π_old(y_t|·)
    value loss:        ½ max((V_t − R_t)², (clip(V_t, V_old ± ε_v) − R_t)²)

All are per-token [B, T] (or per-sequence [B]); reduce them with `masked_mean`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("token", "sequence")


def masked_mean(x_BxT: Array, mask_BxT: Array, reduction: str = "token") -> Array:
    """Mean over masked entries: "token" pools every token of the batch (DAPO/Dr. GRPO style);
    "sequence" averages each row's tokens, then the rows (the GRPO paper's 1/|o_i| Σ_t)."""
    mask = mask_BxT.astype(jnp.float32)
    if reduction == "token":
        return jnp.sum(x_BxT * mask) / jnp.maximum(mask.sum(), 1.0)
    if reduction == "sequence":
        per_row = jnp.sum(x_BxT * mask, axis=-1) / jnp.maximum(mask.sum(-1), 1.0)
        has_tokens = (mask.sum(-1) > 0).astype(jnp.float32)
        return jnp.sum(per_row * has_tokens) / jnp.maximum(has_tokens.sum(), 1.0)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def reinforce_loss(seq_logp_B: Array, advantages_B: Array) -> Array:
    """Score-function surrogate −A log π_θ(y|x) per sequence; its gradient is the REINFORCE estimate."""
    return -jax.lax.stop_gradient(advantages_B) * seq_logp_B


def clipped_surrogate_loss(logp_BxT: Array, old_logp_BxT: Array, advantages_BxT: Array,
                           clip_eps: float = 0.2) -> tuple[Array, Array]:
    """PPO's clipped objective, negated, per token (eq. 12); also returns where clipping was active."""
    ratio = jnp.exp(logp_BxT - old_logp_BxT)
    adv = jax.lax.stop_gradient(advantages_BxT)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def clipped_value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array,
                       clip_eps: float = 0.2) -> Array:
    """½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²) per token."""
    returns = jax.lax.stop_gradient(returns_BxT)
    v_clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip_eps, clip_eps)
    return 0.5 * jnp.maximum(jnp.square(values_BxT - returns), jnp.square(v_clipped - returns))
