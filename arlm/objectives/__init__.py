"""Training objectives, eqs. 7–15: language modelling (eqs. 7–8) and the KL-regularized objective
J of eq. 9 with its estimators (`kl_regularized`: PPO, GRPO, RLOO, DPO, RSFT, SFT)."""
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy
from arlm.objectives.lm import make_lm_loss, masked_mean_nll, pretrain_loss, sft_loss, token_log_probs

__all__ = ["DPO", "GRPO", "KLObjective", "KLRegularizer", "PPO", "Policy", "RLOO", "RSFT", "SFT",
           "make_lm_loss", "masked_mean_nll", "pretrain_loss", "sft_loss", "token_log_probs"]
