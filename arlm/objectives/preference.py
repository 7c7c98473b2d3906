"""Preference losses: the Bradley–Terry reward model (eq. 11) and DPO with its variants (eq. 13).

Bradley–Terry: P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), so L_RM = −log σ(r_w − r_l).

DPO puts eq. 10 solved for the reward, r = β log π_θ/π_ref + β log Z(x), into eq. 11.
With the log-ratio margin h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]
(sequence log-probs, summed over response tokens), the variants are, as TRL's
`DPOTrainer` documents them (`loss_type`):

    sigmoid  −(1−ε) log σ(βh) − ε log σ(−βh)          (ε = label smoothing, "conservative DPO")
    robust   [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)   (Chowdhury et al. 2024)
    hinge    max(0, 1 − βh)                            (SLiC)
    ipo      (h − 1/(2β))²                             (Azar et al. 2023)

Convention: h uses summed log-probs for every variant (TRL averages over tokens for IPO);
with equal-length responses the two differ only by a constant factor in h.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_VARIANTS = ("sigmoid", "robust", "hinge", "ipo")


def bradley_terry_loss(reward_chosen_B: Array, reward_rejected_B: Array) -> Array:
    """Eq. 11 per pair: −log σ(r_w − r_l)."""
    return -jax.nn.log_sigmoid(reward_chosen_B - reward_rejected_B)


def dpo_margin(logp_chosen_B: Array, logp_rejected_B: Array, ref_logp_chosen_B: Array,
               ref_logp_rejected_B: Array) -> Array:
    """h = log π_θ(y_w)/π_ref(y_w) − log π_θ(y_l)/π_ref(y_l), per pair."""
    return (logp_chosen_B - ref_logp_chosen_B) - (logp_rejected_B - ref_logp_rejected_B)


def dpo_loss(margin_B: Array, beta: float, variant: str = "sigmoid", label_smoothing: float = 0.0) -> Array:
    """Eq. 13 and its variants, per pair, from the log-ratio margin h (see the module docstring)."""
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; expected one of {DPO_VARIANTS}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * margin_B
    if variant == "sigmoid":
        return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    if variant == "robust":
        return (-(1 - label_smoothing) * jax.nn.log_sigmoid(z)
                + label_smoothing * jax.nn.log_sigmoid(-z)) / (1 - 2 * label_smoothing)
    if variant == "hinge":
        return jax.nn.relu(1.0 - z)
    return jnp.square(margin_B - 1.0 / (2.0 * beta))
