"""Rollouts: K samples per prompt from `arlm.generate`, laid out as a sequence batch, and the
reward sources that score them (a verifier on decoded text, a learned reward model, or any
function of the token ids).

The batch is exactly what the sampler saw: the same left-padded prompt and the same response
tokens, so the trainer's recomputed log π_θ equals the sampler's `log_probs_BxN` (at τ = 1).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import jax
import numpy as np

from arlm.alignment.verifiers import Verifier, score
from arlm.config import ModelConfig
from arlm.inference import Sampler, generate
from arlm.inference.decoding import pad_prompts
from arlm.model.log_probs import sequence_batch
from arlm.objectives.heads import reward_model_scores

Array = jax.Array


@dataclasses.dataclass
class Rollout:
    """batch: a sequence batch (numpy) of G prompts × K samples (a prompt's samples in consecutive rows);
    prompt_index_B: which prompt each row answers; response_BxN / lengths_B / sampler_logp_BxN:
    `arlm.generate`'s tokens, lengths and log π_θ of each token (τ = 1)."""

    batch: dict[str, np.ndarray]
    prompt_index_B: np.ndarray
    response_BxN: np.ndarray
    lengths_B: np.ndarray
    sampler_logp_BxN: np.ndarray
    prompt_width: int

    def responses(self) -> list[list[int]]:
        return [list(r[:n]) for r, n in zip(self.response_BxN, self.lengths_B)]


def sample_rollout(config: ModelConfig, model_params: Any, prompts: Sequence[Sequence[int]], k: int, key: Array,
                   *, max_new_tokens: int, sampler: Sampler = Sampler(temperature=1.0), eos_id: int | None = None,
                   pad_id: int = 0) -> Rollout:
    """K samples for each prompt (rows g·K … g·K + K − 1 answer prompt g)."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    rows = [list(p) for p in prompts for _ in range(k)]
    out = generate(config, model_params, rows, key=key, max_new_tokens=max_new_tokens, sampler=sampler,
                   eos_id=eos_id, pad_id=pad_id, overflow="error")
    prompt_BxP, start_B = pad_prompts(config, rows, max_new_tokens, pad_id=pad_id, overflow="error")
    tokens, lengths, logp = jax.device_get((out.tokens_BxN, out.lengths_B, out.log_probs_BxN))
    batch = sequence_batch(prompt_BxP, start_B, tokens, lengths)
    return Rollout(batch, np.repeat(np.arange(len(prompts)), k), np.asarray(tokens), np.asarray(lengths),
                   np.asarray(logp), prompt_BxP.shape[1])


RewardSource = Callable[[Rollout], np.ndarray]


@dataclasses.dataclass(frozen=True)
class VerifierReward:
    """r = verifier(decoded response, target of its prompt) (eq. 15)."""

    verifier: Verifier
    decode: Callable[[Sequence[int]], str]
    targets: tuple[str, ...]

    def __call__(self, rollout: Rollout) -> np.ndarray:
        texts = [self.decode(r) for r in rollout.responses()]
        return score(self.verifier, texts, [self.targets[i] for i in rollout.prompt_index_B])


@dataclasses.dataclass(frozen=True)
class RewardModelReward:
    """r = r_φ(x, y), a learned Bradley–Terry reward model (eq. 11)."""

    config: ModelConfig
    params: Any

    def __call__(self, rollout: Rollout) -> np.ndarray:
        return np.asarray(_rm_scores(self.config, self.params, rollout.batch))


@partial(jax.jit, static_argnums=0)
def _rm_scores(config: ModelConfig, params: Any, batch: dict[str, Array]) -> Array:
    return reward_model_scores(config, params, batch)


def pair_batch(rollout: Rollout, chosen_B: np.ndarray, rejected_B: np.ndarray) -> dict[str, np.ndarray]:
    """Preference pairs [B, 2, T] (chosen at 0, rejected at 1) from rows of one rollout."""
    return {k: np.stack([v[chosen_B], v[rejected_B]], axis=1) for k, v in rollout.batch.items()}


def preference_pairs(rewards_B: np.ndarray, k: int, rng: np.random.Generator | None = None,
                     bradley_terry: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (chosen, rejected) of one pair per prompt from its K samples.

    Default: the best and the worst sample of each prompt, keeping only prompts whose
    rewards differ. With `bradley_terry`, two samples are drawn at random and labelled by
    P(a ≻ b) = σ(r_a − r_b) (eq. 11), for prompts with K ≥ 2.
    """
    r_GxK = rewards_B.reshape(-1, k)
    base = np.arange(r_GxK.shape[0]) * k
    if bradley_terry:
        rng = rng or np.random.default_rng(0)
        a = np.array([rng.choice(k, 2, replace=False) for _ in range(r_GxK.shape[0])])
        ra, rb = r_GxK[np.arange(len(a)), a[:, 0]], r_GxK[np.arange(len(a)), a[:, 1]]
        a_wins = rng.random(len(a)) < 1.0 / (1.0 + np.exp(-(ra - rb)))
        chosen = np.where(a_wins, a[:, 0], a[:, 1])
        rejected = np.where(a_wins, a[:, 1], a[:, 0])
        return base + chosen, base + rejected
    best, worst = r_GxK.argmax(-1), r_GxK.argmin(-1)
    keep = r_GxK.max(-1) > r_GxK.min(-1)
    return (base + best)[keep], (base + worst)[keep]
