"""Alignment (eqs. 9–15): rollouts, rewards, verifiers and the methods that maximise J.

The losses and the `KLObjective` abstraction live in `arlm.objectives`; this package runs them:
`Trainer` (one jit-compiled step for any objective), `sample_rollout` (K samples per prompt from
`arlm.generate`), reward sources (verifiers, a learned reward model), the arithmetic task,
the exact π* study (`exact`, `convergence`) and the `experiments/align.py` job (`job`).
"""
from arlm.alignment.rollout import Rollout, RewardModelReward, VerifierReward, pair_batch, preference_pairs, sample_rollout
from arlm.alignment.trainer import Trainer
from arlm.alignment.verifiers import AllOf, ExactMatch, NumericAnswer, RegexFormat, Weighted, make_verifier

__all__ = ["AllOf", "ExactMatch", "NumericAnswer", "RegexFormat", "RewardModelReward", "Rollout", "Trainer",
           "VerifierReward", "Weighted", "make_verifier", "pair_batch", "preference_pairs", "sample_rollout"]
