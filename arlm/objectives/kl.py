"""The KL regularizer of eq. 9, β KL(π_θ(·|x) ‖ π_ref(·|x)), and its per-token estimators.

A response's KL is the sum over its tokens of the per-token KL of the next-token
distributions (the chain rule). On a sampled token y_t ~ π_θ, with
Δ_t = log π_ref(y_t|·) − log π_θ(y_t|·), the usual estimators of that per-token term are

    k1 = −Δ                 unbiased, can be negative           (eq. 12's per-token penalty)
    k2 = Δ² / 2             biased, low variance, ≥ 0
    k3 = exp(Δ) − Δ − 1     unbiased, ≥ 0                       (eq. 15)

and `exact_token_kl` sums over the whole vocabulary instead of using the sample.
All are float32 [B, T]; masks are applied by the caller.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

ESTIMATORS = ("k1", "k2", "k3", "exact")


def k1(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """log π_θ − log π_ref at the sampled token."""
    return logp_BxT - ref_logp_BxT


def k2(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """(log π_ref − log π_θ)² / 2."""
    return 0.5 * jnp.square(ref_logp_BxT - logp_BxT)


def k3(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ (eq. 15)."""
    delta = ref_logp_BxT - logp_BxT
    return jnp.expm1(delta) - delta


def exact_token_kl(logits_BxTxV: Array, ref_logits_BxTxV: Array) -> Array:
    """Σ_v π_θ(v|·) [log π_θ(v|·) − log π_ref(v|·)] at every position, over the full vocabulary."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)


@dataclasses.dataclass(frozen=True)
class KLRegularizer:
    """β and the estimator of KL(π_θ ‖ π_ref) that an objective uses (eq. 9).

    `per_token` needs full logits only for the "exact" estimator.
    """

    beta: float = 0.05
    estimator: str = "k1"

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.estimator!r}; expected one of {ESTIMATORS}")

    def per_token(self, logp_BxT: Array, ref_logp_BxT: Array, logits_BxTxV: Array | None = None,
                  ref_logits_BxTxV: Array | None = None) -> Array:
        """The chosen estimate of the per-token KL, [B, T]."""
        if self.estimator == "exact":
            if logits_BxTxV is None or ref_logits_BxTxV is None:
                raise ValueError("the exact KL needs the policy's and the reference's full logits")
            return exact_token_kl(logits_BxTxV, ref_logits_BxTxV)
        return {"k1": k1, "k2": k2, "k3": k3}[self.estimator](logp_BxT, ref_logp_BxT)
