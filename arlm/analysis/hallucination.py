"""Hallucination (eq. 19): Hall(θ) = P_{x, y~π_θ}[verifier rejects y], the first experiment's temperature
sweep (eq. 16 at τ ∈ {0, 0.3, 0.7, 1.0, 1.5}: diversity against accuracy), and error injection:
force a wrong token where the answer begins and see whether the continuation follows the error
(the "neutral propagation" of eq. 19) or corrects it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from arlm.analysis.rates import Rate
from arlm.analysis.textgen import generate_texts, progress_bar, prompt_ids
from arlm.checkpoints import LoadedModel

Verifier = Callable[[str, str], float]
TAUS = (0.0, 0.3, 0.7, 1.0, 1.5)


def hallucination_rate(accepted: Sequence[bool] | np.ndarray) -> Rate:
    """Eq. 19: Hall(θ) = P[verifier rejects], the fraction of rejected samples, with its Wilson interval."""
    return Rate.of(~np.asarray(accepted, bool))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n diversity: unique word n-grams over all n-grams in the samples (Li et al. 2016)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def temperature_sweep(model: LoadedModel, items: Sequence[dict[str, str]], verifier: Verifier, *, key: jax.Array,
                      taus: Sequence[float] = TAUS, samples_per_item: int = 4, max_new_tokens: int = 24,
                      batch_size: int = 32, chat: bool = True, progress: bool = False) -> dict[str, Any]:
    """For each τ: accuracy (verifier accepts), Hall(θ) = 1 − accuracy with intervals, distinct-1/2.

    items: {"prompt", "answer"}; a sample is correct when `verifier(sample, answer)` accepts. τ = 0
    (greedy) draws one sample per item, since every draw is the same; for distinct-n that sample counts
    samples_per_item times, so that every τ's diversity is measured over pools of the same size.
    """
    prompts = [prompt_ids(model, it["prompt"], chat=chat) for it in items]
    total = sum(len(items) * (1 if tau == 0 else samples_per_item) for tau in taus)
    bar = progress_bar(total, "temperature sweep") if progress else None
    out: dict[str, Any] = {"tau": [], "accuracy": [], "ci95": [], "hallucination": [], "hallucination_ci95": [],
                           "distinct_1": [], "distinct_2": [], "n": [], "examples": {}}
    for tau in taus:
        reps = 1 if tau == 0 else samples_per_item
        key, sub = jax.random.split(key)
        batch = [p for p in prompts for _ in range(reps)]
        answers = [it["answer"] for it in items for _ in range(reps)]
        texts = generate_texts(model, batch, tau=tau, max_new_tokens=max_new_tokens, key=sub,
                               batch_size=batch_size, progress=bar)
        accepted = np.asarray([verifier(t, a) >= 0.5 for t, a in zip(texts, answers)])
        acc, hall = Rate.of(accepted), hallucination_rate(accepted)
        out["tau"].append(float(tau))
        out["accuracy"].append(acc.value)
        out["ci95"].append(list(acc.ci95))
        out["hallucination"].append(hall.value)
        out["hallucination_ci95"].append(list(hall.ci95))
        pool = texts * (samples_per_item // reps)       # greedy repeats itself: same pool size at every τ
        out["distinct_1"].append(distinct_n(pool, 1))
        out["distinct_2"].append(distinct_n(pool, 2))
        out["n"].append(acc.n)
        out["examples"][str(tau)] = texts[:3]
    if bar is not None:
        bar.close()
    return out


def _answer_start(model: LoadedModel, ids: Sequence[int], answer: str) -> int | None:
    """Index of the generated token where `answer` begins in the decoded text, or None if it is absent."""
    text = model.tokenizer.decode(list(ids))
    c = text.casefold().find(answer.casefold())
    if c < 0:
        return None
    for j in range(len(ids)):
        if len(model.tokenizer.decode(list(ids[:j + 1]))) > c:
            return j
    return None


def error_injection(model: LoadedModel, items: Sequence[dict[str, str]], verifier: Verifier, *, key: jax.Array,
                    max_new_tokens: int = 24, batch_size: int = 32, chat: bool = True,
                    progress: bool = False) -> dict[str, Any]:
    """Force a wrong token at the step where the model's own correct (greedy) answer begins, then let it
    continue greedily. Over the items it answers correctly, report how often the continuation still
    contains the right answer (recovers) or not (follows the error), with Wilson intervals.

    The wrong token is the first token of another item's answer, written the way the model wrote its
    own (with or without a leading space), e.g. "The capital of France is| Ber" → "lin …".
    """
    prompts = [prompt_ids(model, it["prompt"], chat=chat) for it in items]
    key, sub = jax.random.split(key)
    greedy = generate_texts(model, prompts, tau=0.0, max_new_tokens=max_new_tokens, key=sub, batch_size=batch_size)
    answers = [it["answer"] for it in items]
    prefixes, kept, forced_texts = [], [], []
    for i, (text, answer) in enumerate(zip(greedy, answers)):
        if verifier(text, answer) < 0.5:
            continue
        ids = model.tokenizer.encode(text)
        j = _answer_start(model, ids, answer)
        if j is None:
            continue
        piece = model.tokenizer.decode([ids[j]])
        space = " " if piece.startswith(" ") else ""
        for shift in range(1, len(items)):
            wrong = answers[(i + shift) % len(answers)]
            if wrong.casefold() == answer.casefold():
                continue
            forced = model.tokenizer.encode(space + wrong)[0]
            if forced != ids[j]:
                break
        else:
            continue
        prefixes.append(prompts[i] + ids[:j] + [forced])
        forced_texts.append(model.tokenizer.decode(ids[:j] + [forced]))
        kept.append(i)
    bar = progress_bar(len(prefixes), "error injection") if progress else None
    key, sub = jax.random.split(key)
    cont = generate_texts(model, prefixes, tau=0.0, max_new_tokens=max_new_tokens, key=sub, batch_size=batch_size,
                          progress=bar) if prefixes else []
    if bar is not None:
        bar.close()
    recovered = np.asarray([verifier(c, answers[i]) >= 0.5 for c, i in zip(cont, kept)], bool)
    rec = Rate.of(recovered)
    follow = Rate.of(~recovered)
    return {"baseline_accuracy": Rate.of([verifier(t, a) >= 0.5 for t, a in zip(greedy, answers)]).to_dict(),
            "n_injected": rec.n, "recovery_rate": rec.value, "recovery_ci95": list(rec.ci95),
            "follow_rate": follow.value, "follow_ci95": list(follow.ci95),
            "examples": [{"forced": f, "continuation": c} for f, c in zip(forced_texts[:5], cont[:5])]}
