"""The first experiment: trace one generation step. A prompt's path from token ids through the
embeddings (eq. 1), each layer map (eqs. 2–5), the logits and softmax at τ (eq. 6), to a sample (eq. 16)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.intermediates import run_with_cache
from arlm.config import ModelConfig


_run_with_cache = jax.jit(run_with_cache, static_argnums=0)


def trace_step(config: ModelConfig, params: Any, tokens_T: Sequence[int], *, tau: float, key: jax.Array,
               top: int = 5) -> dict[str, Any]:
    """Everything one step computes for the last position of a prompt, as plain numpy.

    Returns token_ids; embedding_norms [T] (‖h_t^(0)‖); residual_norms [L+1] (‖h_T^(ℓ)‖);
    attention_out_norms / mlp_out_norms [L]; lens_top [L+1] (the logit lens' top token id at each
    layer); logits [V]; probs [V] = softmax(logits/τ) (τ = 0: a point mass on the argmax); prob_sum;
    top_ids / top_probs; sampled (the token drawn, x_{t+1} ~ probs).
    """
    if tau < 0:
        raise ValueError(f"tau must be ≥ 0, got {tau}")
    ids = jnp.asarray([list(tokens_T)], jnp.int32)
    c = _run_with_cache(config, params, ids)
    logits_V = np.asarray(c.logits_BxTxV[0, -1], np.float64)
    if tau == 0:
        probs_V = np.zeros_like(logits_V)
        probs_V[int(np.argmax(logits_V))] = 1.0
        sampled = int(np.argmax(logits_V))
    else:
        z = logits_V / tau
        probs_V = np.exp(z - z.max())
        probs_V /= probs_V.sum()
        sampled = int(jax.random.categorical(key, jnp.asarray(logits_V / tau, jnp.float32)))
    order = np.argsort(-probs_V)[:top]
    return {
        "token_ids": [int(t) for t in tokens_T],
        "embedding_norms": np.linalg.norm(np.asarray(c.residual_LxBxTxD[0, 0]), axis=-1).tolist(),
        "residual_norms": np.linalg.norm(np.asarray(c.residual_LxBxTxD[:, 0, -1]), axis=-1).tolist(),
        "attention_out_norms": np.linalg.norm(np.asarray(c.attention_out_LxBxTxD[:, 0, -1]), axis=-1).tolist(),
        "mlp_out_norms": np.linalg.norm(np.asarray(c.mlp_out_LxBxTxD[:, 0, -1]), axis=-1).tolist(),
        "lens_top": np.asarray(jnp.argmax(c.logit_lens_LxBxTxV[:, 0, -1], -1)).tolist(),
        "logits": logits_V,
        "probs": probs_V,
        "prob_sum": float(probs_V.sum()),
        "top_ids": order.tolist(),
        "top_probs": probs_V[order].tolist(),
        "sampled": sampled,
        "tau": float(tau),
    }
