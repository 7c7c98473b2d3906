"""The KL regularizer of eq. 9, β KL(π_θ(·|x) ‖ π_ref(·|x)), and its per-token estimators.

A response's KL is the sum over its tokens of the per-token KL of the next-token
distributions (the chain rule). On a sampled token y_t ~ π_θ, with
Δ_t = log π_ref(y_t|·) − log π_θ(y_t|·), the usual estimators of that per-token term are

    k1 = −Δ                 unbiased, can be negative           (eq. 12's per-token penalty)
    k2 = Δ² / 2             biased, low variance, ≥ 0
    k3 = exp(Δ) − Δ − 1     unbiased, ≥ 0                       (eq. 15)

and `exact_token_kl` sums over the whole vocabulary instead of using the sample.
All are float32 [B, T]; masks are applied by the caller.

Where the estimate sits decides which one is right. In a reward (computed without gradients and
multiplied into a score-function term, PPO and RLOO) k1 is the unbiased choice: Σ_t k1 is the
sequence's log π_θ(y|x)/π_ref(y|x). Inside a loss (differentiated through log π_θ at tokens
sampled from π_θ, per token for a fixed prefix) the expected gradients are

    k1:     E[∇k1] = Σ_v ∇π_θ(v) = 0            the penalty does nothing
    k2:     E[∇k2] = ∇KL(π_θ ‖ π_ref)           the reverse KL's gradient
    k3:     E[∇k3] = ∇KL(π_ref ‖ π_θ)           the forward KL's: the same direction near π_ref
    exact:  ∇KL(π_θ ‖ π_ref)

so `KLRegularizer.estimator` defaults to None: each objective picks its documented default
(`arlm.objectives.kl_regularized`: k1 in PPO's and RLOO's rewards, k3 in GRPO's loss).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

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


def per_token_kl(estimator: str, logp_BxT: Array, ref_logp_BxT: Array, logits_BxTxV: Array | None = None,
                 ref_logits_BxTxV: Array | None = None) -> Array:
    """The per-token KL estimate named by `estimator` (one of ESTIMATORS), [B, T]; "exact" needs
    both full logits."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {ESTIMATORS}")
    if estimator == "exact":
        if logits_BxTxV is None or ref_logits_BxTxV is None:
            raise ValueError("the exact KL needs the policy's and the reference's full logits")
        return exact_token_kl(logits_BxTxV, ref_logits_BxTxV)
    return {"k1": k1, "k2": k2, "k3": k3}[estimator](logp_BxT, ref_logp_BxT)


@dataclasses.dataclass(frozen=True)
class KLRegularizer:
    """β and the estimator of KL(π_θ ‖ π_ref) that an objective uses (eq. 9).

    `estimator=None` (the default) leaves the choice to the objective: a `KLObjective` resolves it
    to its estimator's documented default (`KLObjective.kl_estimator`, shown in its repr); a
    named estimator always wins. `per_token` needs full logits only for the "exact" estimator.
    """

    beta: float = 0.05
    estimator: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
            raise TypeError(f"beta must be a real number, got {self.beta!r}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be finite and ≥ 0, got {self.beta}")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.estimator!r}; expected one of {ESTIMATORS} "
                             f"(or None: the objective's default)")

    def per_token(self, logp_BxT: Array, ref_logp_BxT: Array, logits_BxTxV: Array | None = None,
                  ref_logits_BxTxV: Array | None = None) -> Array:
        """The chosen estimate of the per-token KL, [B, T]."""
        if self.estimator is None:
            raise ValueError("KLRegularizer(estimator=None) leaves the estimator to the objective: use "
                             f"KLObjective.token_kl, or name one of {ESTIMATORS}")
        return per_token_kl(self.estimator, logp_BxT, ref_logp_BxT, logits_BxTxV, ref_logits_BxTxV)
