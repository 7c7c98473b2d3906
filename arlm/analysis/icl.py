"""In-context learning (eq. 21): p_θ(y | P, x) with P a prompt of k demonstration pairs; accuracy as a
function of k, with the random-label control of Min et al. (2022), and the per-position ICL score of
Olsson et al. (2022): the loss late in a context minus the loss early in it.

Prompts are plain text, one pair a line: "hot -> cold\\nbig -> small\\nup ->". Demonstrations are drawn
without replacement from the other items (never the query itself, unless include_query).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.rates import Rate
from arlm.analysis.textgen import generate_texts
from arlm.checkpoints import LoadedModel
from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.log_probs import token_log_probs

Predictor = Callable[[Sequence[str]], Sequence[str]]
KS = (0, 1, 2, 4, 8, 16)
SEP = " ->"


def icl_prompt(demos: Sequence[tuple[str, str]], query: str) -> str:
    """k demonstration lines then the query: "a -> b\\n" * k + "x ->"."""
    return "".join(f"{i}{SEP} {o}\n" for i, o in demos) + f"{query}{SEP}"


def parse_demos(prompt: str) -> tuple[dict[str, str], str]:
    """The inverse of `icl_prompt`: ({input: output} of the demonstrations, the query)."""
    lines = prompt.split("\n")
    demos = dict(line.split(f"{SEP} ", 1) for line in lines[:-1])
    return demos, lines[-1][: -len(SEP)]


def _norm(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).casefold().split("\n")[0].strip()


def is_correct(prediction: str, output: str) -> bool:
    """The first line of the prediction begins with the expected output's words (case and punctuation aside)."""
    pred, want = _norm(prediction.strip().split("\n")[0]).split(), _norm(output).split()
    return bool(want) and pred[:len(want)] == want


def build_trials(items: Sequence[dict[str, str]], k: int, n_queries: int, rng: np.random.Generator, *,
                 random_labels: bool = False, include_query: bool = False) -> list[dict[str, Any]]:
    """n_queries prompts with k demonstrations each. With random_labels, each demonstration's output is
    replaced by the output of a uniformly drawn item (Min et al.'s control); the query's answer stays gold."""
    n = len(items)
    pool_size = n if include_query else n - 1
    if k > pool_size:
        raise ValueError(f"k = {k} demonstrations need at least {k + (0 if include_query else 1)} items, got {n}")
    trials = []
    for q in rng.choice(n, size=n_queries, replace=n_queries > n):
        others = np.arange(n) if include_query else np.delete(np.arange(n), q)
        idx = rng.choice(others, size=k, replace=False)
        outs = ([items[j]["output"] for j in rng.integers(0, n, size=k)] if random_labels
                else [items[j]["output"] for j in idx])
        demos = [(items[j]["input"], o) for j, o in zip(idx, outs)]
        trials.append({"prompt": icl_prompt(demos, items[q]["input"]), "answer": items[q]["output"],
                       "query_in_demos": bool(q in idx)})
    return trials


def icl_curve(predict: Predictor, items: Sequence[dict[str, str]], *, ks: Sequence[int] = KS, n_queries: int = 50,
              seed: int = 0, random_labels: bool = False, include_query: bool = False) -> dict[str, Any]:
    """Accuracy (with Wilson intervals) against k (eq. 21). `predict` maps prompts to continuations."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"k": list(ks), "accuracy": [], "ci95": [], "n": [], "trials": []}
    for k in ks:
        trials = build_trials(items, k, n_queries, rng, random_labels=random_labels, include_query=include_query)
        preds = predict([t["prompt"] for t in trials])
        hits = [is_correct(p, t["answer"]) for p, t in zip(preds, trials)]
        rate = Rate.of(hits)
        out["accuracy"].append(rate.value)
        out["ci95"].append(list(rate.ci95))
        out["n"].append(rate.n)
        out["trials"].append([dict(t, prediction=p, correct=h) for t, p, h in zip(trials, preds, hits)])
    return out


def model_predictor(model: LoadedModel, *, key: jax.Array, max_new_tokens: int = 6, batch_size: int = 32,
                    progress: Any = None) -> Predictor:
    """Greedy continuations of plain-text prompts (no chat template), stopped at a newline token if one
    exists; the first line is the prediction."""
    newline = model.tokenizer.encode("\n")
    stops = newline[:1] if len(newline) == 1 else []

    def predict(prompts: Sequence[str]) -> list[str]:
        ids = [model.tokenizer.encode(p) for p in prompts]
        return generate_texts(model, ids, tau=0.0, max_new_tokens=max_new_tokens, key=key, batch_size=batch_size,
                              stop_ids=stops, progress=progress)
    return predict


def per_position_loss(config: ModelConfig, params: Any, tokens_BxT: jax.Array) -> jax.Array:
    """Mean next-token loss at each position t over a batch of contexts: [T-1], float32 (eq. 7 per t)."""
    logits = apply_model(config, params, tokens_BxT[:, :-1]).logits_BxTxV
    return -jnp.mean(token_log_probs(logits, tokens_BxT[:, 1:]), axis=0)


def icl_score(loss_T: np.ndarray | jax.Array, early: tuple[int, int], late: tuple[int, int]) -> float:
    """Olsson et al.'s in-context learning score: mean loss over positions [late) − over [early).
    Negative when later tokens are predicted better, i.e. the context is being used."""
    loss = np.asarray(loss_T, np.float64)
    if not (0 <= early[0] < early[1] <= len(loss) and 0 <= late[0] < late[1] <= len(loss)):
        raise ValueError(f"windows {early} and {late} must lie within the {len(loss)} scored positions")
    return float(loss[late[0]:late[1]].mean() - loss[early[0]:early[1]].mean())
