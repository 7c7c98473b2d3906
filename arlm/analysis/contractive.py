"""Open question 1, corrective dynamics: does a contractive residual map suppress drift?

`ModelConfig.residual_gain` γ < 1 makes each sub-layer h ← γ h + f(Norm(h)) (eq. 5 with a damped
identity path). For each γ, one small byte-level model per seed is trained on the bundled KJV text
(the same batches for every γ) and measured three ways:

* loss: validation NLL (nats per byte): what the contraction costs;
* drift (eq. 19): the top singular value of J_L(t, s) = ∂h_t^(L)/∂h_s^(0) at the last position t,
  against the lag t − s, averaged over validation windows;
* error injection: one byte at position s replaced by a random other byte; the excess NLL at
  positions s + k over the clean window, against k. Recovery means the excess decays.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis import drift
from arlm.analysis.continual import BYTE_VOCAB, corpus_a, mean_ci, runner, split, val_windows, windows
from arlm.config import ModelConfig
from arlm.model import apply_model, init_params
from arlm.model.log_probs import token_log_probs


def model_config(cfg: Any, gain: float) -> ModelConfig:
    return ModelConfig.llama(vocab_size=BYTE_VOCAB, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                             d_ff=cfg.d_ff, max_seq_len=cfg.seq_len, residual_gain=float(gain))


def injection_excess(config: ModelConfig, params: Any, tokens_BxT: np.ndarray, position: int, lags: tuple[int, ...],
                     rng: np.random.Generator) -> np.ndarray:
    """Excess NLL at positions position + k (k in lags) after replacing the byte at `position` by a
    random other byte, per window: [B, len(lags)]."""
    corrupt = tokens_BxT.copy()
    corrupt[:, position] = (corrupt[:, position] + rng.integers(1, BYTE_VOCAB, len(corrupt))) % BYTE_VOCAB

    def nll(toks: np.ndarray) -> np.ndarray:
        logits = apply_model(config, params, jnp.asarray(toks[:, :-1])).logits_BxTxV
        return -np.asarray(token_log_probs(logits, jnp.asarray(toks[:, 1:])))     # [B, T-1], nll of x_{i+1}

    clean, dirty = nll(tokens_BxT), nll(corrupt)
    # the byte at position + k is predicted at index position + k − 1
    return np.stack([dirty[:, position + k - 1] - clean[:, position + k - 1] for k in lags], axis=1)


def run(cfg: Any, progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Train every γ on every seed and measure loss, drift and recovery; per-γ means with 95% CIs."""
    a_train, a_val = split(corpus_a(cfg.corpus_chars))
    val = val_windows(a_val, cfg.val_windows, cfg.seq_len)
    val_tokens = np.concatenate([val["inputs"], val["targets"][:, -1:]], axis=1)       # [B, T + 1]
    lags, inject_lags = tuple(cfg.lags), tuple(cfg.inject_lags)
    position = cfg.seq_len - 1 - max(inject_lags)
    per_gain: dict[float, list[dict[str, Any]]] = {float(g): [] for g in cfg.gains}
    for seed in cfg.seeds:
        for gain in cfg.gains:
            config = model_config(cfg, gain)
            rng = np.random.default_rng(seed)
            train = runner(config, cfg.learning_rate)
            params = train.train(
                init_params(config, jax.random.PRNGKey(seed)),
                iter(lambda: windows(a_train, cfg.batch_size, cfg.seq_len, rng), None), cfg.steps)
            sigma = np.mean([drift.top_singular_values_at_lags(config, params, val_tokens[i, :cfg.seq_len], lags)
                             for i in range(cfg.jacobian_windows)], axis=0)
            excess = injection_excess(config, params, val_tokens, position, inject_lags,
                                      np.random.default_rng(100 + seed)).mean(0)
            loss = train.nll(params, val)
            per_gain[float(gain)].append({"seed": int(seed), "loss": loss, "top_sigma": sigma.tolist(),
                                          "excess": excess.tolist()})
            progress()
    rows = []
    for gain, runs in per_gain.items():
        rows.append({"gain": gain, "loss": mean_ci([r["loss"] for r in runs]),
                     "top_sigma": [mean_ci([r["top_sigma"][i] for r in runs]) for i in range(len(lags))],
                     "excess": [mean_ci([r["excess"][i] for r in runs]) for i in range(len(inject_lags))],
                     "runs": runs})
    return {"lags": list(lags), "inject_lags": list(inject_lags), "inject_position": position, "gains": rows}
