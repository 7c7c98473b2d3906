"""Training objectives, eqs. 7–15."""
from arlm.objectives.lm import make_lm_loss, masked_mean_nll, pretrain_loss, sft_loss, token_log_probs

__all__ = ["make_lm_loss", "masked_mean_nll", "pretrain_loss", "sft_loss", "token_log_probs"]
