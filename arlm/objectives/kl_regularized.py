"""One objective, J(θ) = E_{x, y~π_θ(·|x)}[r(x, y)] − β KL(π_θ(·|x) ‖ π_ref(·|x))  (eq. 9),
and the estimators that RLHF, DPO, RSFT and RLVR use to maximise it (eqs. 11–15).

A `KLObjective` is three parts:

  * `Policy`        π_θ and its reference π_ref: frozen weights, or with LoRA (eq. 24) the base
                    weights with the adapter off;
  * `KLRegularizer` β and the KL estimator (k1, k2, k3 or exact, `arlm.objectives.kl`); its default
                    None means the estimator's own default (`default_kl`), resolved into
                    `KLObjective.kl_estimator`: k1 in PPO's and RLOO's rewards, k3 in GRPO's loss;
                    DPO, RSFT and SFT estimate no KL (β enters DPO's implicit reward and RSFT's
                    Boltzmann filter in closed form);
  * an estimator    of ∇J from a batch: `PPO` (eq. 12: KL in the per-token reward, GAE from a value
                    head, clipped ratio), `GRPO` (eq. 15: group-relative advantages, clipped ratio,
                    k3 KL in the loss), `RLOO` (leave-one-out REINFORCE, KL in the reward), `DPO`
                    (eq. 13, no sampling: β enters through the implicit reward), `RSFT` (eq. 14:
                    eq. 8 on filtered samples) and `SFT` (eq. 8).

The reward source (a verifier, a learned reward model, or preference pairs) is outside the loss:
rewards arrive in the batch, one per sequence. Every estimator follows the `Estimator` protocol:
two functions taking their arguments in the same order as the train step's loss,

  * `prepare(objective, params, batch, frozen, key) -> batch`: the pieces computed once per batch,
    without gradients: old and reference log-probs, KL terms, advantages, keep masks;
  * `loss(objective, params, batch, frozen) -> (loss, metrics)`: what the generic train step
    (`arlm.train.step.make_train_step(..., frozen_sharding=...)`) differentiates;

and three class attributes: `default_kl`, `kl_in_loss` and `needs_value_head`. A new estimator is
a frozen dataclass with these five names (see notebooks/compose_losses.ipynb).

Metrics name what they measure: `kl_seq_k1` is the mean over sequences of Σ_t k1 (the sampled
estimate of KL(π_θ ‖ π_ref) per sequence), `kl_token_<estimator>` the per-token mean of the KL
estimator a loss differentiates (GRPO's penalty).

params = {"policy": model params or a LoRA adapter, "value": value head (PPO only)};
frozen = {"ref": π_ref's model params}.
Online batches are sequence batches (`arlm.model.log_probs`) of G prompts × K samples, the
K samples of a prompt in consecutive rows, with "rewards" [B]. Preference batches hold pairs:
every array is [B, 2, …] with chosen at index 0 and rejected at 1 (`preference_rows` flattens
them into a sequence batch).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model.log_probs import Batch, PolicyOutputs, policy_outputs, preference_rows
from arlm.model.lora import LoraConfig, init_lora, merge_lora
from arlm.objectives import advantages as adv_lib
from arlm.objectives import policy_gradient as pg
from arlm.objectives import rsft
from arlm.objectives.heads import init_scalar_head, scalar_head
from arlm.objectives.kl import KLRegularizer, k1, per_token_kl
from arlm.objectives.lm import response_nll
from arlm.objectives.preference import dpo_loss, dpo_margin

Array = jax.Array
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Policy:
    """π_θ as a function of (trainable params, frozen weights); π_ref = the frozen weights.

    With `lora`, params["policy"] is an adapter and π_θ = π_ref with W = W_0 + (α/r) B A (eq. 24),
    so the reference is exactly the base weights with the adapter off.
    """

    config: ModelConfig
    lora: LoraConfig | None = None

    def init(self, ref_params: Any, key: Array, *, value_head: bool = False) -> dict[str, Any]:
        """Trainable params starting at π_θ = π_ref (a fresh adapter or a copy of the weights)."""
        policy = (init_lora(self.lora, ref_params, key) if self.lora is not None
                  else jax.tree_util.tree_map(jnp.array, ref_params))
        params = {"policy": policy}
        if value_head:
            params["value"] = init_scalar_head(self.config.d_model)
        return params

    def model_params(self, params: dict[str, Any], frozen: dict[str, Any]) -> Any:
        if self.lora is not None:
            return merge_lora(self.lora, frozen["ref"], params["policy"])
        return params["policy"]

    def outputs(self, params: dict[str, Any], frozen: dict[str, Any], batch: Batch, **kw: bool) -> PolicyOutputs:
        return policy_outputs(self.config, self.model_params(params, frozen), batch, **kw)

    def reference_outputs(self, frozen: dict[str, Any], batch: Batch, **kw: bool) -> PolicyOutputs:
        return jax.tree_util.tree_map(jax.lax.stop_gradient,
                                      policy_outputs(self.config, frozen["ref"], batch, **kw))


class Estimator(Protocol):
    """An estimator of ∇J (eq. 9): what `KLObjective` needs from PPO, GRPO, RLOO, DPO, RSFT, SFT or yours.

    Class attributes:
      default_kl        the KL estimator ("k1", "k2", "k3", "exact") it uses when the
                        `KLRegularizer` names none; None: it estimates no KL (DPO, RSFT, SFT).
      kl_in_loss        whether its loss differentiates the KL estimate (k1 there has zero expected
                        gradient, so KLObjective warns).
      needs_value_head  whether params carry a "value" head (PPO's critic); `KLObjective.init_params`
                        creates one when it is True.

    Methods (same argument order as the train step's `loss_fn(params, batch, frozen)`):
      prepare(obj, params, batch, frozen, key) -> batch   once per batch, no gradients
      loss(obj, params, batch, frozen) -> (loss, metrics)  differentiated w.r.t. params
    """

    default_kl: ClassVar[str | None]
    kl_in_loss: ClassVar[bool]
    needs_value_head: ClassVar[bool]

    def prepare(self, obj: "KLObjective", params: Any, batch: Batch, frozen: Any, key: Array) -> Batch: ...

    def loss(self, obj: "KLObjective", params: Any, batch: Batch, frozen: Any) -> tuple[Array, Metrics]: ...


@dataclasses.dataclass(frozen=True)
class KLObjective:
    """Eq. 9 with one estimator of its gradient; see the module docstring.

    `kl_estimator` is the KL estimator in use: `kl.estimator` if named, else the estimator's
    `default_kl` (None: this objective estimates no KL). k1 named for an estimator that
    differentiates its KL term (GRPO) is honoured, with a warning: its expected gradient is 0.
    """

    policy: Policy
    kl: KLRegularizer
    estimator: Any
    kl_estimator: str | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        chosen = self.kl.estimator
        if chosen is None:
            chosen = getattr(self.estimator, "default_kl", None)
        object.__setattr__(self, "kl_estimator", chosen)
        if chosen == "k1" and self.kl.beta > 0 and getattr(self.estimator, "kl_in_loss", False):
            warnings.warn(f"{type(self.estimator).__name__} with the k1 KL estimator: k1 inside a loss has zero "
                          f"expected gradient, so the β = {self.kl.beta} KL penalty does nothing; its default "
                          f"is {getattr(self.estimator, 'default_kl', None)!r} (k2 and exact also work)",
                          stacklevel=3)

    def init_params(self, ref_params: Any, key: Array) -> dict[str, Any]:
        return self.policy.init(ref_params, key, value_head=getattr(self.estimator, "needs_value_head", False))

    def prepare(self, params: Any, batch: Batch, frozen: Any, key: Array | None = None) -> Batch:
        """The estimator's once-per-batch pieces (no gradients); same argument order as `loss`."""
        key = jax.random.PRNGKey(0) if key is None else key
        return self.estimator.prepare(self, params, dict(batch), frozen, key)

    def loss(self, params: Any, batch: Batch, frozen: Any) -> tuple[Array, Metrics]:
        return self.estimator.loss(self, params, batch, frozen)

    def token_kl(self, out: PolicyOutputs, ref_logp_BxT: Array, ref: PolicyOutputs | None = None) -> Array:
        """The per-token KL estimate of `kl_estimator`, 0 off the response mask."""
        if self.kl_estimator is None:
            raise ValueError(f"{type(self.estimator).__name__} has no default KL estimator; name one in "
                             f"KLRegularizer(estimator=...)")
        ref_logits = None if ref is None else ref.logits_BxTxV
        kl_BxT = per_token_kl(self.kl_estimator, out.logp_BxT, ref_logp_BxT, out.logits_BxTxV, ref_logits)
        return kl_BxT * out.mask_BxT

    def needs_logits(self) -> bool:
        return self.kl_estimator == "exact"


def estimate_objective(rewards_B: Array, logp_BxT: Array, ref_logp_BxT: Array, beta: float) -> Array:
    """Monte Carlo estimate of J (eq. 9) from samples of π_θ: mean r − β mean Σ_t k1 (masked log-probs)."""
    return jnp.mean(rewards_B) - beta * jnp.mean(jnp.sum(k1(logp_BxT, ref_logp_BxT), axis=-1))


def _old_and_ref(obj: KLObjective, params: Any, frozen: Any, batch: Batch, **kw: bool):
    logits = obj.needs_logits()
    out = jax.tree_util.tree_map(jax.lax.stop_gradient, obj.policy.outputs(params, frozen, batch, logits=logits, **kw))
    ref = obj.policy.reference_outputs(frozen, batch, logits=logits)
    return out, ref


def _common_metrics(obj: KLObjective, out: PolicyOutputs, batch: Batch) -> Metrics:
    """kl_seq_k1: the mean over sequences of Σ_t k1 = log π_θ(y|x) − log π_ref(y|x)."""
    mask = out.mask_BxT
    return {"kl_seq_k1": jnp.mean(jnp.sum(k1(out.logp_BxT, batch["ref_logp"]) * mask, -1)),
            "response_tokens": jnp.mean(mask.sum(-1))}


@dataclasses.dataclass(frozen=True)
class PPO:
    """Eq. 12: r_t = −β KL_t + 1[t = T] r(x, y); GAE(γ, λ) from a value head; clipped ratio.

    The value head reads the policy's last hidden state through a stop-gradient (a critic head
    on shared features: the value loss does not move the policy's weights). KL_t is k1 by default
    (eq. 12's penalty): it enters the reward, not the differentiated loss."""

    default_kl: ClassVar[str] = "k1"
    kl_in_loss: ClassVar[bool] = False
    needs_value_head: ClassVar[bool] = True
    clip_eps: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    def prepare(self, obj, params, batch, frozen, key):
        out, ref = _old_and_ref(obj, params, frozen, batch, hidden=True)
        mask = out.mask_BxT
        kl_BxT = obj.token_kl(out, ref.logp_BxT, ref)
        last = jax.nn.one_hot(jnp.sum(mask, -1).astype(jnp.int32) - 1 + _first_index(mask), mask.shape[1])
        rewards_BxT = -obj.kl.beta * kl_BxT + last * batch["rewards"][:, None]
        values_BxT = scalar_head(params["value"], out.hidden_BxTxD) * mask
        advantages, returns = adv_lib.gae(rewards_BxT, values_BxT, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = adv_lib.whiten(advantages, mask)
        return dict(batch, old_logp=out.logp_BxT, ref_logp=ref.logp_BxT, old_values=values_BxT,
                    advantages=advantages, returns=returns)

    def loss(self, obj, params, batch, frozen):
        out = obj.policy.outputs(params, frozen, batch, hidden=True)
        mask = out.mask_BxT
        pg_BxT, clipped = pg.clipped_surrogate_loss(out.logp_BxT, batch["old_logp"], batch["advantages"],
                                                    self.clip_eps)
        values = scalar_head(params["value"], jax.lax.stop_gradient(out.hidden_BxTxD))
        v_BxT = pg.clipped_value_loss(values, batch["old_values"], batch["returns"], self.value_clip)
        pg_loss, v_loss = pg.masked_mean(pg_BxT, mask), pg.masked_mean(v_BxT, mask)
        metrics = dict(_common_metrics(obj, out, batch), pg_loss=pg_loss, value_loss=v_loss,
                       clip_fraction=pg.masked_mean(clipped, mask), tokens=mask.sum())
        return pg_loss + self.value_coef * v_loss, metrics


def _first_index(mask_BxT: Array) -> Array:
    return jnp.argmax(mask_BxT > 0, axis=-1).astype(jnp.int32)


def _grouped(x_B: Array, k: int) -> Array:
    if x_B.shape[0] % k:
        raise ValueError(f"batch of {x_B.shape[0]} sequences is not a whole number of groups of K={k}")
    return x_B.reshape(-1, k)


@dataclasses.dataclass(frozen=True)
class GRPO:
    """Eq. 15: A_i = (r_i − mean_j r_j)/(std_j r_j + ε) over the K samples of a prompt, the clipped
    ratio of eq. 12, and β · KL (k3 by default) in the loss, averaged per `reduction`.

    The KL term is differentiated: k3's expected gradient is that of KL(π_ref ‖ π_θ) (the same
    direction as ∇KL(π_θ ‖ π_ref) near π_ref), k2's and exact's that of KL(π_θ ‖ π_ref), and k1's
    is zero (warned at construction).

    `scale_rewards=False` drops the division by the std (Dr. GRPO; TRL's `scale_rewards=False`)."""

    default_kl: ClassVar[str] = "k3"
    kl_in_loss: ClassVar[bool] = True
    needs_value_head: ClassVar[bool] = False
    group_size: int
    clip_eps: float = 0.2
    eps: float = 1e-4
    ddof: int = 1
    reduction: str = "sequence"
    scale_rewards: bool = True

    def prepare(self, obj, params, batch, frozen, key):
        out, ref = _old_and_ref(obj, params, frozen, batch)
        r_GxK = _grouped(batch["rewards"], self.group_size)
        if self.scale_rewards:
            a_B = adv_lib.group_relative_advantages(r_GxK, self.eps, self.ddof).reshape(-1)
        else:
            a_B = (r_GxK - jnp.mean(r_GxK, axis=-1, keepdims=True)).reshape(-1)
        return dict(batch, old_logp=out.logp_BxT, ref_logp=ref.logp_BxT, advantages=a_B[:, None] * out.mask_BxT)

    def loss(self, obj, params, batch, frozen):
        out = obj.policy.outputs(params, frozen, batch, logits=obj.needs_logits())
        ref = obj.policy.reference_outputs(frozen, batch, logits=True) if obj.needs_logits() else None
        mask = out.mask_BxT
        pg_BxT, clipped = pg.clipped_surrogate_loss(out.logp_BxT, batch["old_logp"], batch["advantages"],
                                                    self.clip_eps)
        kl_BxT = obj.token_kl(out, batch["ref_logp"], ref)
        loss = pg.masked_mean(pg_BxT + obj.kl.beta * kl_BxT, mask, self.reduction)
        metrics = dict(_common_metrics(obj, out, batch), pg_loss=pg.masked_mean(pg_BxT, mask, self.reduction),
                       **{f"kl_token_{obj.kl_estimator}": pg.masked_mean(kl_BxT, mask, self.reduction)},
                       clip_fraction=pg.masked_mean(clipped, mask))
        return loss, metrics


@dataclasses.dataclass(frozen=True)
class RLOO:
    """REINFORCE with a leave-one-out baseline over K samples per prompt; the KL enters the reward,
    r̃ = r − β Σ_t KL_t, which makes −A log π_θ(y|x) an unbiased estimate of −∇J with KL_t = k1
    (the default: Σ_t k1 = log π_θ(y|x) / π_ref(y|x))."""

    default_kl: ClassVar[str] = "k1"
    kl_in_loss: ClassVar[bool] = False
    needs_value_head: ClassVar[bool] = False
    group_size: int

    def prepare(self, obj, params, batch, frozen, key):
        out, ref = _old_and_ref(obj, params, frozen, batch)
        shaped_B = batch["rewards"] - obj.kl.beta * jnp.sum(obj.token_kl(out, ref.logp_BxT, ref), -1)
        a_B = adv_lib.leave_one_out_advantages(_grouped(shaped_B, self.group_size)).reshape(-1)
        return dict(batch, old_logp=out.logp_BxT, ref_logp=ref.logp_BxT, advantages=a_B)

    def loss(self, obj, params, batch, frozen):
        out = obj.policy.outputs(params, frozen, batch)
        loss = jnp.mean(pg.reinforce_loss(out.sequence_logp(), batch["advantages"]))
        return loss, _common_metrics(obj, out, batch)


@dataclasses.dataclass(frozen=True)
class DPO:
    """Eq. 13 and its variants (`arlm.objectives.preference`) on preference pairs; β = the KL's β.
    No KL is estimated: β enters through the implicit reward β log π_θ/π_ref."""

    default_kl: ClassVar[None] = None
    kl_in_loss: ClassVar[bool] = False
    needs_value_head: ClassVar[bool] = False
    variant: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        dpo_loss(jnp.zeros((1,)), 1.0, self.variant, self.label_smoothing)    # validates both, eagerly

    def prepare(self, obj, params, batch, frozen, key):
        ref = obj.policy.reference_outputs(frozen, preference_rows(batch))
        return dict(batch, ref_seq_logp=ref.sequence_logp().reshape(-1, 2))

    def loss(self, obj, params, batch, frozen):
        logp_Bx2 = obj.policy.outputs(params, frozen, preference_rows(batch)).sequence_logp().reshape(-1, 2)
        ref_Bx2 = batch["ref_seq_logp"]
        margin = dpo_margin(logp_Bx2[:, 0], logp_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1])
        loss = jnp.mean(dpo_loss(margin, obj.kl.beta, self.variant, self.label_smoothing))
        implicit = obj.kl.beta * (logp_Bx2 - ref_Bx2)
        return loss, {"accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                      "reward_margin": jnp.mean(implicit[:, 0] - implicit[:, 1]),
                      "chosen_reward": jnp.mean(implicit[:, 0]), "rejected_reward": jnp.mean(implicit[:, 1])}


@dataclasses.dataclass(frozen=True)
class SFT:
    """Eq. 8 on the response tokens, weighted by batch["weights"] [B] if present. No KL term."""

    default_kl: ClassVar[None] = None
    kl_in_loss: ClassVar[bool] = False
    needs_value_head: ClassVar[bool] = False

    def prepare(self, obj, params, batch, frozen, key):
        return batch

    def loss(self, obj, params, batch, frozen):
        return response_nll(obj.policy.outputs(params, frozen, batch), batch.get("weights"))


@dataclasses.dataclass(frozen=True)
class RSFT(SFT):
    """Eq. 14: keep samples by `filter` ("best_of_k", "threshold", "boltzmann"), then eq. 8 on them.
    No KL is estimated: β enters the Boltzmann filter's acceptance exp((r − r_max)/β)."""

    group_size: int = 1
    filter: str = "best_of_k"
    threshold: float | None = None  # threshold filter: keep r ≥ threshold (required); best_of_k: if set,
                                    # keep the best sample only when its r ≥ threshold
    r_max: float = 1.0              # boltzmann filter: an upper bound of the reward

    def __post_init__(self) -> None:
        if self.filter not in rsft.FILTERS:
            raise ValueError(f"unknown RSFT filter {self.filter!r}; expected one of {rsft.FILTERS}")
        if self.filter == "threshold" and self.threshold is None:
            raise ValueError("RSFT(filter='threshold') needs a threshold")

    def prepare(self, obj, params, batch, frozen, key):
        r_GxK = _grouped(batch["rewards"], self.group_size)
        if self.filter == "best_of_k":
            keep = rsft.best_of_k(r_GxK, -jnp.inf if self.threshold is None else self.threshold)
        elif self.filter == "threshold":
            keep = rsft.threshold(r_GxK, self.threshold)
        else:
            keep = rsft.boltzmann(r_GxK, obj.kl.beta, self.r_max, key)
        return dict(batch, weights=keep.reshape(-1))
