"""Training objectives, eqs. 7–15: language modelling (eqs. 7–8) and the KL-regularized objective
J of eq. 9 with its estimators (`kl_regularized`: PPO, GRPO, RLOO, DPO, RSFT, SFT, or any class that
follows the `Estimator` protocol)."""
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import (DPO, GRPO, PPO, RLOO, RSFT, SFT, Estimator, KLObjective, Policy,
                                            estimate_objective, preference_rows)
from arlm.objectives.lm import make_lm_loss, masked_mean_nll, pretrain_loss, sft_loss

__all__ = ["DPO", "GRPO", "Estimator", "KLObjective", "KLRegularizer", "PPO", "Policy", "RLOO", "RSFT", "SFT",
           "estimate_objective", "make_lm_loss", "masked_mean_nll", "preference_rows", "pretrain_loss", "sft_loss"]
