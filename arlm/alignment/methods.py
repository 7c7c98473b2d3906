"""The registry of alignment methods: each name is one estimator of ∇J (eq. 9) with its settings.

The alignment job (`arlm.jobs.align`) and the π* convergence study (`arlm.jobs.pistar`) both build
their objectives here, so a method means the same estimator in both:

  ppo               PPO (eq. 12), k1 KL in the per-token reward, a value head
  grpo              GRPO (eq. 15), std-scaled group advantages, k3 KL in the loss
  grpo_unscaled_k2  GRPO without the std scaling (Dr. GRPO), k2 KL in the loss
  rloo              REINFORCE with a leave-one-out baseline, k1 KL in the reward
  dpo               DPO (eq. 13) on preference pairs
  rsft              rejection-sampling fine-tuning (eq. 14), eq. 8 on the kept samples
  sft               eq. 8 on given responses

What a method learns from (its own rollouts, pairs, π_ref's samples) and where its reward comes
from (a verifier, a reward model) are the job's business, not the registry's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from arlm.config import ModelConfig
from arlm.model.lora import LoraConfig
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy


@dataclasses.dataclass(frozen=True)
class Method:
    """An estimator class, whether it takes the group size K, its fixed options, and the KL
    estimator it names (None: the estimator's own `default_kl`)."""

    estimator: type
    grouped: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    kl_estimator: str | None = None


METHODS: dict[str, Method] = {
    "ppo": Method(PPO),
    "grpo": Method(GRPO, grouped=True),
    "grpo_unscaled_k2": Method(GRPO, grouped=True, options=(("scale_rewards", False),), kl_estimator="k2"),
    "rloo": Method(RLOO, grouped=True),
    "dpo": Method(DPO),
    "rsft": Method(RSFT, grouped=True),
    "sft": Method(SFT),
}


def make_estimator(name: str, group_size: int = 1, **options: Any) -> Any:
    """The estimator registered as `name`, with K = `group_size` where it groups samples and
    `options` (estimator fields, e.g. DPO's variant, RSFT's filter) over the registered ones."""
    if name not in METHODS:
        raise ValueError(f"unknown alignment method {name!r}; expected one of {sorted(METHODS)}")
    method = METHODS[name]
    fields = dict(method.options, **options)
    if method.grouped:
        fields["group_size"] = group_size
    return method.estimator(**fields)


def make_objective(name: str, model_config: ModelConfig, beta: float, *, group_size: int = 1,
                   lora: LoraConfig | None = None, **options: Any) -> KLObjective:
    """Eq. 9's objective for method `name`: π_θ (with `lora`, an adapter on π_ref), β, the
    method's KL estimator, and its estimator (`make_estimator`)."""
    estimator = make_estimator(name, group_size, **options)
    return KLObjective(Policy(model_config, lora), KLRegularizer(beta, METHODS[name].kl_estimator), estimator)
