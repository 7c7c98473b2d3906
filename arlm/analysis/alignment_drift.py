"""The paper's next check 2: does alignment that grounds in verifiable facts (RLVR) reduce the neutral
propagation of errors (eq. 19)?

π_ref and the policies the align job trains from it (PPO on a learned reward, DPO, RSFT, GRPO and
RLOO on the verifier's reward) are each measured three ways on held-out problems of the task:

* Hall(θ) = P_{x, y~π_θ}[verifier rejects y] (eq. 19), for sampled (τ = 1) and greedy answers,
  with Wilson intervals;
* error injection: on the problems whose greedy answer is right and has at least two digits, the
  answer's first digit is replaced by a wrong one and the policy continues greedily. The error is
  *corrected downstream* (recovered) when the digits after the forced one are still the right ones
  (for addition the units digit does not depend on the tens digit, so a model that computes it
  from the operands keeps it right); neutral propagation predicts the later digits drift with the
  error. recovery = P[continuation == answer[1:] | forced wrong first digit];
* drift: the top singular value of J_L(t, s) = ∂h_t^(L)/∂h_s^(0) at the last position of prompt +
  greedy answer, against the lag t − s (`drift.top_singular_values_at_lags`), averaged over problems.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np

from arlm.alignment.task_io import TaskIO, responses
from arlm.alignment.tasks import Problem
from arlm.analysis.drift import top_singular_values_at_lags
from arlm.analysis.rates import Rate
from arlm.config import ModelConfig

RLVR = ("rlvr_grpo", "rlvr_rloo", "rlvr_ppo")      # the methods whose reward is the verifier's


def hallucination(io: TaskIO, config: ModelConfig, params: Any, problems: Sequence[Problem], key: jax.Array, *,
                  tau: float, batch_size: int = 256) -> Rate:
    """Eq. 19: Hall(θ) = P[verifier rejects y], y ~ π_θ(·|x) at temperature τ (greedy at 0), one
    answer per problem so that the Wilson interval's draws are independent."""
    answers = responses(io, config, params, io.prompts(problems), key, tau=tau, batch_size=batch_size)
    return Rate.of(io.rewards(answers, problems) < 0.5)


def _answer_start(io: TaskIO, ids: Sequence[int], answer: str) -> int | None:
    """Index of the response token where `answer` begins in its decoded text (None if absent)."""
    c = io.decode(list(ids)).find(answer)
    if c < 0:
        return None
    return next((j for j in range(len(ids)) if len(io.decode(list(ids[:j + 1]))) > c), None)


def injection_prefixes(io: TaskIO, problems: Sequence[Problem], greedy: Sequence[Sequence[int]],
                       rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """For each problem whose greedy answer is right and has ≥ 2 digits: prompt + the response up to
    the answer + one token spelling a wrong first digit. Returns (prefixes, problem indices)."""
    if io.encode_text is None:
        raise ValueError("error injection needs TaskIO.encode_text to spell the forced digit")
    prefixes, kept = [], []
    rewards = io.rewards(greedy, problems)
    for i, (p, ids, ok) in enumerate(zip(problems, greedy, rewards)):
        if ok < 0.5 or len(p.answer) < 2 or not p.answer.isdigit():
            continue
        j = _answer_start(io, ids, p.answer)
        if j is None:
            continue
        space = " " if io.decode([ids[j]]).startswith(" ") else ""
        wrong = str(rng.choice([d for d in range(1, 10) if str(d) != p.answer[0]]))
        forced = io.encode_text(space + wrong)
        if len(forced) != 1 or forced[0] == ids[j]:
            continue                        # the digit is not one token here: nothing clean to force
        prefixes.append(io.encode_prompt(p) + list(ids[:j]) + forced)
        kept.append(i)
    return prefixes, kept


def recovered(text: str, answer: str) -> bool:
    """The continuation after the forced first digit spells the rest of the answer, and no more digits."""
    rest = answer[1:]
    return text.startswith(rest) and not text[len(rest):len(rest) + 1].isdigit()


def error_recovery(io: TaskIO, config: ModelConfig, params: Any, problems: Sequence[Problem], key: jax.Array,
                   seed: int = 0, *, batch_size: int = 256,
                   greedy: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Force a wrong first digit into each right greedy answer and continue greedily (module docstring);
    the recovery rate with its Wilson interval and a few examples. `greedy`: the policy's greedy
    responses to `problems`, if already generated."""
    if greedy is None:
        greedy = responses(io, config, params, io.prompts(problems), key, batch_size=batch_size)
    prefixes, kept = injection_prefixes(io, problems, greedy, np.random.default_rng(seed))
    cont = responses(io, config, params, prefixes, key, batch_size=batch_size) if prefixes else []
    texts = [io.decode(c) for c in cont]
    ok = [recovered(t, problems[i].answer) for t, i in zip(texts, kept)]
    n_forced_prompt = [len(io.encode_prompt(problems[i])) for i in kept]
    examples = [{"problem": problems[i].prompt, "answer": problems[i].answer,
                 "forced": io.decode(pre[n:]), "continuation": t}
                for pre, n, t, i in zip(prefixes[:5], n_forced_prompt, texts, kept)]
    return dict(Rate.of(ok).to_dict(), examples=examples)


def jacobian_spectrum(io: TaskIO, config: ModelConfig, params: Any, problems: Sequence[Problem],
                      lags: Sequence[int], key: jax.Array,
                      greedy: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Mean over problems of σ_max J_L(t, t − lag) at the last position of prompt + greedy answer (eq. 19);
    lags beyond a sequence's start are dropped for that sequence (the mean is over those that reach).
    `greedy`: the policy's greedy responses to `problems`, if already generated."""
    if greedy is None:
        greedy = responses(io, config, params, io.prompts(problems), key)
    sums, counts = np.zeros(len(lags)), np.zeros(len(lags))
    for p, ids in zip(problems, greedy):
        tokens = np.asarray(io.encode_prompt(p) + [i for i in ids if i != io.eos_id], np.int32)
        ok = [k for k, lag in enumerate(lags) if lag < len(tokens)]
        sig = top_singular_values_at_lags(config, params, tokens, [lags[k] for k in ok])
        sums[ok] += sig
        counts[ok] += 1
    return (sums / np.maximum(counts, 1)).tolist()


def measure(io: TaskIO, config: ModelConfig, params: Any, problems: Sequence[Problem], cfg: Any,
            key: jax.Array, seed: int = 0) -> dict[str, Any]:
    """Hall(θ) sampled and greedy, error recovery and the Jacobian spectrum of one policy; the greedy
    answers are generated once and serve all three greedy measurements."""
    k1, k2 = jax.random.split(key)
    greedy = responses(io, config, params, io.prompts(problems), k2)
    n_jac = cfg.jacobian_problems
    return {"hall_sampled": hallucination(io, config, params, problems, k1, tau=1.0).to_dict(),
            "hall_greedy": Rate.of(io.rewards(greedy, problems) < 0.5).to_dict(),
            "recovery": error_recovery(io, config, params, problems, k2, seed, greedy=greedy),
            "top_sigma": jacobian_spectrum(io, config, params, problems[:n_jac], cfg.lags, k2, greedy[:n_jac])}


def pooled(rates: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One rate over several `Rate.to_dict()`s (their k and n summed), with its Wilson interval: e.g. the
    recovery of several policies, or of one policy over seeds."""
    rates = list(rates)
    return Rate(sum(r["k"] for r in rates), sum(r["n"] for r in rates)).to_dict()
