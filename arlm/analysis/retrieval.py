"""Retrieval-augmented generation (eq. 22): p_θ(y | x, retrieve(x)). A lexical retriever (BM25) and one
built on the model's own hidden states, and the study's three conditions: no context, the retrieved
passage, and a distractor (the best-ranked passage that is not the right one)."""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.rates import Rate
from arlm.analysis.textgen import generate_texts, prompt_ids
from arlm.checkpoints import LoadedModel
from arlm.model import apply_model

_STOP = frozenset("a an the of is was in on at to by for and or what who which when where how did does do "
                  "with from that this it its as be are were".split())


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.casefold()) if w not in _STOP]


class LexicalRetriever:
    """BM25 (k1 = 1.5, b = 0.75) over a fixed list of passages."""

    def __init__(self, passages: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.passages = list(passages)
        self.docs = [Counter(words(p)) for p in self.passages]
        self.lengths = np.asarray([sum(d.values()) for d in self.docs], np.float64)
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: np.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> np.ndarray:
        avg = self.lengths.mean() if len(self.lengths) else 1.0
        out = np.zeros(len(self.docs))
        for w in set(words(query)):
            if w not in self.idf:
                continue
            tf = np.asarray([d.get(w, 0) for d in self.docs], np.float64)
            out += self.idf[w] * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lengths / avg))
        return out

    def ranking(self, query: str) -> np.ndarray:
        return np.argsort(-self.scores(query), kind="stable")


class HiddenStateRetriever:
    """Cosine similarity of mean-pooled residual states h^(ℓ) (the model as its own embedder)."""

    def __init__(self, model: LoadedModel, passages: Sequence[str], layer: int = -1) -> None:
        self.model, self.layer, self.passages = model, layer, list(passages)
        self.keys = self.embed(self.passages)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors [N, D]: the mean of h^(layer) over each text's tokens (right-padded, one batch)."""
        ids = [self.model.tokenizer.encode(t) for t in texts]
        width = -(-max(len(i) for i in ids) // 16) * 16
        tokens = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), bool)
        for r, i in enumerate(ids):
            tokens[r, :len(i)], mask[r, :len(i)] = i, True
        v = np.asarray(_mean_hidden(self.model.config, self.model.params, jnp.asarray(tokens), jnp.asarray(mask),
                                    self.layer), np.float64)
        return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)

    def scores(self, query: str) -> np.ndarray:
        return self.keys @ self.embed([query])[0]

    def ranking(self, query: str) -> np.ndarray:
        return np.argsort(-self.scores(query), kind="stable")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _mean_hidden(config: Any, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array, layer: int) -> jax.Array:
    h_BxTxD = apply_model(config, params, tokens_BxT, attention_mask=mask_BxT, return_hidden=True).hidden_states[layer]
    m = mask_BxT.astype(jnp.float32)[..., None]
    return (h_BxTxD * m).sum(1) / m.sum(1)


def rag_messages(question: str, passage: str | None) -> str:
    if passage is None:
        return f"{question} Answer briefly."
    return f"Use this information: {passage}\n{question} Answer briefly."


def rag_study(model: LoadedModel, items: Sequence[dict[str, Any]], retriever_factory: Callable[[list[str]], Any],
              verifier: Callable[[str, str], float], *, key: jax.Array, max_new_tokens: int = 24,
              batch_size: int = 32, progress: Any = None) -> dict[str, Any]:
    """Accuracy with no context, with the retrieved passage (top-1), and with a distractor passage.

    items: {"facts": [...], "question", "answer"}; every item's facts join the passage pool.
    """
    passages = [" ".join(it["facts"]) for it in items]
    retriever = retriever_factory(passages)
    ranks = [retriever.ranking(it["question"]) for it in items]
    top = [int(r[0]) for r in ranks]
    distractor = [int(next(j for j in r if j != i)) for i, r in enumerate(ranks)]
    conditions = {"none": [None] * len(items), "retrieved": [passages[j] for j in top],
                  "distractor": [passages[j] for j in distractor]}
    out: dict[str, Any] = {"retrieval_accuracy": Rate.of([t == i for i, t in enumerate(top)]).value}
    for name, ctx in conditions.items():
        key, sub = jax.random.split(key)
        ids = [prompt_ids(model, rag_messages(it["question"], c)) for it, c in zip(items, ctx)]
        texts = generate_texts(model, ids, tau=0.0, max_new_tokens=max_new_tokens, key=sub, batch_size=batch_size,
                               progress=progress)
        rate = Rate.of([verifier(t, it["answer"]) >= 0.5 for t, it in zip(texts, items)])
        out[name] = rate.value
        out[f"{name}_ci95"] = list(rate.ci95)
        out[f"{name}_examples"] = texts[:3]
    out["n"] = len(items)
    return out
