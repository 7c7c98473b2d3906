"""Eq. 23, continual learning: min_θ L^(k+1)(θ) + λ Ω(θ, θ^(k)).

θ^(k) (the anchor) is the model after corpus k. Ω penalises changes that distort what the
earlier corpus taught; the four penalties of the paper's list:

    "none"            Ω = 0
    "l2"              Ω = ½ Σ_i (θ_i − θ_i^(k))²
    "ewc"             Ω = ½ Σ_i F_i (θ_i − θ_i^(k))², F the diagonal Fisher on the earlier corpus
    "representation"  Ω = mean over layers ℓ, rows and positions of ‖h_t^(ℓ)(θ) − h_t^(ℓ)(θ^(k))‖² / D
                      on a batch of earlier data (the distortion of hidden representations)

`penalized(loss_fn, omega, lam, config)` composes any loss of `arlm.objectives`
(`loss_fn(params, batch) -> (loss, metrics)`, or with `frozen`) with λ Ω into a loss for the generic
train step: what Ω reads (θ^(k), F, the earlier tokens) enters as `frozen["continual"]`, an argument of
the compiled step, never a constant in it. With λ = 0 the step is the unpenalised one, bit for bit.

The fifth arm, training only a LoRA adapter (eq. 24), is `arlm.model.lora`: it needs no Ω.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.log_probs import token_log_probs

Array = jax.Array
Params = Any
Batch = dict[str, Array]
PENALTIES = ("none", "l2", "ewc", "representation")


def _sum_tree(tree: Any) -> Array:
    return sum((jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)), jnp.zeros((), jnp.float32))


def l2_penalty(params: Params, anchor: Params) -> Array:
    """Eq. 23's Ω_L2 = ½ Σ_i (θ_i − θ_i^(k))²."""
    return 0.5 * _sum_tree(jax.tree_util.tree_map(lambda p, a: jnp.square(p - a), params, anchor))


def ewc_penalty(params: Params, anchor: Params, fisher: Params) -> Array:
    """Eq. 23's Ω_EWC = ½ Σ_i F_i (θ_i − θ_i^(k))², F the diagonal Fisher of the earlier corpus (`fisher_diagonal`)."""
    return 0.5 * _sum_tree(jax.tree_util.tree_map(lambda p, a, f: f * jnp.square(p - a), params, anchor, fisher))


def sequence_log_likelihood(config: ModelConfig, params: Params, tokens_T: Array) -> Array:
    """log p_θ(x_2..x_T | x_1) = Σ_t log p_θ(x_{t+1} | x_≤t) of one sequence (eq. 7 without the mean)."""
    logits_1xTxV = apply_model(config, params, tokens_T[None, :-1]).logits_BxTxV
    return jnp.sum(token_log_probs(logits_1xTxV, tokens_T[None, 1:]))


def fisher_diagonal(config: ModelConfig, params: Params, batches: Iterable[Array]) -> Params:
    """EWC's weights for eq. 23: F_i = E_x[(∂ log p_θ(x) / ∂θ_i)²] over the sequences of `batches`
    (int [B, T] each): the empirical Fisher's diagonal at θ = θ^(k), one per-sequence gradient at a
    time (vmapped over a batch), averaged over every sequence."""
    grad_fn = jax.jit(jax.vmap(jax.grad(sequence_log_likelihood, argnums=1), in_axes=(None, None, 0)),
                      static_argnums=0)
    total, count = None, 0
    for tokens_BxT in batches:
        tokens_BxT = jnp.asarray(tokens_BxT)
        squares = jax.tree_util.tree_map(lambda g: jnp.sum(jnp.square(g), axis=0),
                                         grad_fn(config, params, tokens_BxT))
        total = squares if total is None else jax.tree_util.tree_map(jnp.add, total, squares)
        count += tokens_BxT.shape[0]
    if total is None:
        raise ValueError("fisher_diagonal needs at least one batch of earlier data")
    return jax.tree_util.tree_map(lambda s: s / count, total)


def representation_penalty(config: ModelConfig, params: Params, anchor: Params, tokens_BxT: Array) -> Array:
    """Eq. 23's Ω_rep = mean_{ℓ ≥ 1, b, t} ‖h_t^(ℓ)(θ) − h_t^(ℓ)(θ^(k))‖² / D on earlier tokens: how far
    training has moved the residual stream where the earlier corpus is read. 0, with zero
    gradient, at θ = θ^(k)."""
    # θ and θ^(k) run as two slices of one vmapped forward pass: the same program computes both, so
    # at θ = θ^(k) the difference is exactly 0 (two separately compiled passes differ by rounding).
    both = jax.tree_util.tree_map(lambda p, a: jnp.stack([p, jax.lax.stop_gradient(a)]), params, anchor)
    hidden_2xLxBxTxD = jax.vmap(
        lambda p: apply_model(config, p, tokens_BxT, return_hidden=True).hidden_states[1:])(both)
    diff = hidden_2xLxBxTxD[0] - hidden_2xLxBxTxD[1]
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1)) / config.d_model


def penalty(omega: str, config: ModelConfig, params: Params, continual: dict[str, Any]) -> Array:
    """Eq. 23's Ω(θ, θ^(k)) of kind `omega`; `continual` holds "anchor" (θ^(k)), "fisher" (for "ewc") and
    "earlier_BxT" (for "representation")."""
    if omega == "none":
        return jnp.zeros((), jnp.float32)
    if omega == "l2":
        return l2_penalty(params, continual["anchor"])
    if omega == "ewc":
        return ewc_penalty(params, continual["anchor"], continual["fisher"])
    if omega == "representation":
        return representation_penalty(config, params, continual["anchor"], continual["earlier_BxT"])
    raise ValueError(f"unknown continual-learning penalty {omega!r}; expected one of {PENALTIES}")


def _takes_frozen(loss_fn: Callable) -> bool:
    try:
        return len(inspect.signature(loss_fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def penalized(loss_fn: Callable, omega: str, lam: float | None, config: ModelConfig) -> Callable:
    """Eq. 23 as a loss for `arlm.train.step.make_train_step`: `loss(params, batch, frozen)` =
    loss_fn's loss + λ Ω(θ, θ^(k)), with frozen = {"continual": {...}, "task": loss_fn's own frozen}.
    Metrics gain "penalty" (Ω) and "task_loss" (loss_fn's loss).

    lam: a float fixed in the compiled step, or None to read λ from frozen["continual"]["lam"]
      (one compiled step then serves a whole sweep over λ).
    """
    if omega not in PENALTIES:
        raise ValueError(f"unknown continual-learning penalty {omega!r}; expected one of {PENALTIES}")
    if lam is not None and not lam >= 0:
        raise ValueError(f"λ must be ≥ 0, got {lam}")
    with_frozen = _takes_frozen(loss_fn)

    def loss(params: Params, batch: Batch, frozen: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
        task_loss, metrics = (loss_fn(params, batch, frozen.get("task")) if with_frozen
                              else loss_fn(params, batch))
        metrics = {**metrics, "task_loss": task_loss}
        if lam == 0:       # report Ω, but keep it out of the gradient: exactly the unpenalised step
            return task_loss, {**metrics, "penalty": jax.lax.stop_gradient(
                penalty(omega, config, params, frozen["continual"]))}
        omega_value = penalty(omega, config, params, frozen["continual"])
        weight = frozen["continual"]["lam"] if lam is None else lam
        return task_loss + weight * omega_value, {**metrics, "penalty": omega_value}

    return loss
