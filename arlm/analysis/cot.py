"""Chain of thought (eq. 22): p(y | x) = Σ_c p_θ(c | x) p_θ(y | x, c), exactly by enumerating every chain
c when the vocabulary and the chain are small enough, and by Monte Carlo where they are not (sampled
chains: the answer marginal (1/K) Σ_k p(y | x, c_k), and the majority vote over sampled answers).
Retrieval-augmented generation lives in `arlm.analysis.retrieval`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.textgen import generate_texts, prompt_ids
from arlm.checkpoints import LoadedModel
from arlm.config import ModelConfig
from arlm.inference import generate
from arlm.inference.sampling import Sampler
from arlm.model.log_probs import sequence_log_prob

Array = jax.Array


def enumerate_sequences(vocab: int, length: int) -> np.ndarray:
    """All V^L token sequences [V^L, L] in lexicographic order (row r is r written in base V)."""
    if vocab ** length > 1 << 20:
        raise ValueError(f"{vocab}^{length} sequences are too many to enumerate; use Monte Carlo")
    r = np.arange(vocab ** length)
    return np.stack([(r // vocab ** (length - 1 - i)) % vocab for i in range(length)], axis=1).astype(np.int32)


def _seq_probs(config: ModelConfig, params: Any, prefix_P: Array, completions_NxL: Array) -> np.ndarray:
    """p_θ(completion | prefix) for each row; float64 [N]."""
    prefix = jnp.broadcast_to(jnp.asarray(prefix_P, jnp.int32), (completions_NxL.shape[0], len(prefix_P)))
    logp = _sequence_log_prob(config, params, prefix, jnp.asarray(completions_NxL))
    return np.exp(np.asarray(logp, np.float64))


_sequence_log_prob = jax.jit(sequence_log_prob, static_argnums=0)


def chain_marginal(config: ModelConfig, params: Any, prompt_P: Sequence[int], chain_len: int,
                   answer_len: int) -> dict[str, np.ndarray]:
    """Eq. 22 exactly: every chain c ∈ V^chain_len and answer y ∈ V^answer_len.

    Returns p_chain [C] = p(c | x), p_answer_given_chain [C, Y] = p(y | x, c), and the marginal
    p_answer [Y] = Σ_c p(c | x) p(y | x, c); rows of p_answer_given_chain and p_answer sum to 1.
    """
    v = config.vocab_size
    chains, answers = enumerate_sequences(v, chain_len), enumerate_sequences(v, answer_len)
    p_chain = _seq_probs(config, params, np.asarray(prompt_P), chains)
    p_y_given_c = np.stack([_seq_probs(config, params, np.concatenate([prompt_P, c]), answers) for c in chains])
    return {"chains": chains, "answers": answers, "p_chain": p_chain, "p_answer_given_chain": p_y_given_c,
            "p_answer": p_chain @ p_y_given_c}


def joint_answer_marginal(config: ModelConfig, params: Any, prompt_P: Sequence[int], chain_len: int,
                          answer_len: int) -> np.ndarray:
    """Σ_c p(c, y | x) [Y] from the joint probability of each whole (chain, answer) continuation: the
    quantity eq. 22's factorisation must reproduce."""
    v = config.vocab_size
    both = enumerate_sequences(v, chain_len + answer_len)
    return _seq_probs(config, params, np.asarray(prompt_P), both).reshape(v ** chain_len, v ** answer_len).sum(0)


def sample_chain_answers(config: ModelConfig, params: Any, prompt_P: Sequence[int], chain_len: int,
                         answer_len: int, n: int, key: Array, *, temperature: float = 1.0) -> np.ndarray:
    """n draws (c, y) ~ p_θ(c, y | x) by ancestral sampling (eq. 16); returns the answers' indices
    into `enumerate_sequences(V, answer_len)` [n]."""
    out = generate(config, params, [list(prompt_P)] * n, key=key, max_new_tokens=chain_len + answer_len,
                   sampler=Sampler(temperature=temperature))
    ys = np.asarray(out.tokens_BxN)[:, chain_len:]
    v = config.vocab_size
    return (ys * v ** np.arange(answer_len - 1, -1, -1)).sum(1)


def monte_carlo_marginal(config: ModelConfig, params: Any, prompt_P: Sequence[int], chains_KxL: np.ndarray,
                         answers_YxM: np.ndarray) -> np.ndarray:
    """(1/K) Σ_k p(y | x, c_k) over sampled chains, for each candidate answer y [Y] (unbiased for eq. 22)."""
    rows = [_seq_probs(config, params, np.concatenate([prompt_P, c]), answers_YxM) for c in chains_KxL]
    return np.mean(rows, axis=0)


def majority_vote(answers: Sequence[Any]) -> Any:
    """The most common answer (ties: the one seen first); None if there are none."""
    answers = [a for a in answers if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def last_number(text: str) -> str | None:
    """The last integer in a text (the answer a chain of thought ends on), or None."""
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1] if found else None


def cot_vs_direct(model: LoadedModel, items: Sequence[dict[str, str]], *, key: Array, n_chains: int = 5,
                  temperature: float = 0.7, max_new_tokens: int = 64, batch_size: int = 32,
                  progress: Any = None) -> dict[str, Any]:
    """Numeric questions answered directly (greedy) and by chain of thought: K sampled chains
    ("Let's think step by step"), each ending on a number; the answer is their majority vote (eq. 22 by
    Monte Carlo). Returns per-item correctness of both."""
    direct_p = [prompt_ids(model, it["prompt"] + " Answer with a number only.") for it in items]
    cot_p = [prompt_ids(model, it["prompt"] + " Let's think step by step, then give the final number.")
             for it in items]
    k1, k2 = jax.random.split(key)
    direct = generate_texts(model, direct_p, tau=0.0, max_new_tokens=12, key=k1, batch_size=batch_size,
                            progress=progress)
    chains = generate_texts(model, [p for p in cot_p for _ in range(n_chains)], tau=temperature,
                            max_new_tokens=max_new_tokens, key=k2, batch_size=batch_size, progress=progress)
    votes = [majority_vote([last_number(c) for c in chains[i * n_chains:(i + 1) * n_chains]])
             for i in range(len(items))]
    return {"direct_correct": [last_number(d) == it["answer"] for d, it in zip(direct, items)],
            "cot_correct": [v == it["answer"] for v, it in zip(votes, items)],
            "chain_correct": [last_number(c) == items[i // n_chains]["answer"] for i, c in enumerate(chains)],
            "examples": chains[:2]}
