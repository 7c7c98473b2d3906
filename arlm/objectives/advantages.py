"""Advantages for the policy-gradient estimators of eqs. 12 and 15, computed once per batch.

    GAE (eq. 12, PPO):  δ_t = r_t + γ V_{t+1} − V_t,   A_t = Σ_l (γλ)^l δ_{t+l}
    GRPO (eq. 15):      A_i = (r_i − mean_j r_j) / (std_j r_j + ε)   over the K samples of a prompt
    RLOO:               A_i = r_i − (1/(K−1)) Σ_{j≠i} r_j

Grouped rewards are [G, K] (G prompts × K samples each, the layout `arlm.generate`
gives when each prompt is repeated K times in a row).

Convention (GRPO): the std is the sample std with Bessel's correction (ddof = 1) and
ε = 1e-4, as in TRL's `GRPOTrainer` (`rewards.std()` in torch is unbiased); pass
`ddof=0` for the population std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def group_relative_advantages(rewards_GxK: Array, eps: float = 1e-4, ddof: int = 1) -> Array:
    """GRPO (eq. 15): rewards standardised within each prompt's group of K samples; [G, K]."""
    k = rewards_GxK.shape[-1]
    if k - ddof < 1:
        raise ValueError(f"a group of K={k} samples has no std with ddof={ddof}; use K ≥ {ddof + 1}")
    mean = jnp.mean(rewards_GxK, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(jnp.square(rewards_GxK - mean), axis=-1, keepdims=True) / (k - ddof))
    return (rewards_GxK - mean) / (std + eps)


def leave_one_out_advantages(rewards_GxK: Array) -> Array:
    """RLOO: each sample's reward minus the mean of the other K − 1 samples of its prompt; [G, K]."""
    k = rewards_GxK.shape[-1]
    if k < 2:
        raise ValueError(f"leave-one-out needs K ≥ 2 samples per prompt, got {k}")
    total = jnp.sum(rewards_GxK, axis=-1, keepdims=True)
    return rewards_GxK - (total - rewards_GxK) / (k - 1)


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
    """Generalised advantage estimation over each response's tokens (eq. 12).

    mask_BxT marks response tokens (one contiguous run per row); the value after a
    row's last token is 0 (the episode ends). Returns (advantages_BxT, returns_BxT =
    advantages + values), both 0 outside the mask.
    """
    mask = mask_BxT.astype(jnp.float32)
    values = values_BxT * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards_BxT + gamma * next_values - values) * mask

    def back(carry_B, x):
        delta_B, m_B = x
        adv_B = delta_B + gamma * lam * carry_B * m_B
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(back, jnp.zeros(rewards_BxT.shape[0], jnp.float32),
                              (deltas.T, jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], 1).T),
                              reverse=True)
    advantages = adv_TxB.T * mask
    return advantages, (advantages + values) * mask


def whiten(x_BxT: Array, mask_BxT: Array, eps: float = 1e-8) -> Array:
    """(x − mean) / std over the masked entries (PPO's advantage normalisation); 0 outside the mask."""
    mask = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    mean = jnp.sum(x_BxT * mask) / n
    var = jnp.sum(jnp.square(x_BxT - mean) * mask) / n
    return (x_BxT - mean) * jax.lax.rsqrt(var + eps) * mask
