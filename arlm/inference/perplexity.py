"""Perplexity of a long text with a sliding window: eq. 7's NLL, −Σ_t log p_θ(x_{t+1} | x_{≤t}), summed.

A text longer than the context window Δ is scored in windows of `context` tokens whose
starts advance by `stride` (the scheme of Hugging Face's perplexity guide): window k covers
ids[k·stride : k·stride + context], and only the targets the previous window did not reach
are scored in it. So every token but the first is scored exactly once, with between
context − stride and context − 1 tokens of left context (the first window's targets with
fewer). Windows are scored in batches of one fixed shape [min(batch_size, windows), min(context, len(ids))]
by one jit-compiled function: the last window is right-padded and the last batch filled with
empty windows, all masked out, so a whole text compiles once (causal attention keeps the
right-padding from touching any real position).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.config import ModelConfig
from arlm.inference.sampling import check_int
from arlm.model import forward
from arlm.model.log_probs import token_log_probs
from arlm.model.transformer import check_token_ids

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WindowedNLL:
    """total_nll: Σ −log p_θ over the scored tokens, in nats (float64 sum of float32 terms);
    n_tokens: tokens scored (len(ids) − 1); n_bytes: UTF-8 bytes those tokens stand for
    (None when no `token_bytes` was given)."""

    total_nll: float
    n_tokens: int
    n_bytes: int | None = None

    @property
    def nll_per_token(self) -> float:
        """Mean NLL in nats per scored token."""
        return self.total_nll / self.n_tokens

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per token)."""
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        """Total NLL in bits over the bytes of the scored tokens."""
        return None if not self.n_bytes else self.total_nll / math.log(2) / self.n_bytes


def window_spans(n_ids: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_target, end) of each window over n_ids ids: the window holds ids[begin:end]
    and scores targets first_target … end−1 (each predicted from the ids before it in the window)."""
    spans, scored_to, begin = [], 1, 0
    while scored_to < n_ids:
        end = min(begin + context, n_ids)
        spans.append((begin, scored_to, end))
        scored_to, begin = end, begin + stride
    return spans


@partial(jax.jit, static_argnums=0)
def _window_log_probs(config: ModelConfig, params: Any, tokens_BxW: Array, scored_BxW: Array) -> Array:
    """log p_θ(x_j | x_<j in the window) at scored positions j ≥ 1, 0 elsewhere: [B, W−1] float32."""
    logits_BxWxV = forward(config, params, tokens_BxW)
    logp_BxT = token_log_probs(logits_BxWxV[:, :-1], tokens_BxW[:, 1:])
    return jnp.where(scored_BxW[:, 1:], logp_BxT, 0.0)


def _check_window(config: ModelConfig, context: int, stride: int) -> None:
    """Named errors for a window setup that cannot score a text."""
    if context > config.max_seq_len:
        raise ValueError(f"context={context} exceeds the model's window Δ = max_seq_len = {config.max_seq_len}")
    if stride >= context:
        raise ValueError(f"stride={stride} must be < context={context}: a window's first token has no context "
                         "in it, so the window before must score it")


def windowed_nll(config: ModelConfig, params: Any, ids: Sequence[int] | np.ndarray, *, context: int,
                 stride: int | None = None, batch_size: int = 4,
                 token_bytes: Callable[[int], bytes] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> WindowedNLL:
    """Eq. 7's summed NLL of ids[1:] under the model, scored with a sliding window (module docstring).

    Args:
      ids: the token ids of the whole text (1-D).
      context: window length in tokens (≤ Δ = config.max_seq_len).
      stride: how far each window's start advances (< context); default context // 2.
      batch_size: windows per compiled call.
      token_bytes: `tokenizer.token_bytes`, to count the UTF-8 bytes of the scored tokens.
      on_batch: called after each batch with the number of tokens it scored (progress bars).
    """
    ids_N = np.asarray(ids)
    if ids_N.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids_N.shape}")
    if len(ids_N) < 2:
        raise ValueError(f"ids: need at least 2 token ids to score one, got {len(ids_N)}")
    check_token_ids(config, ids_N)
    context = check_int("context", context, minimum=2)
    stride = check_int("stride", context // 2 if stride is None else stride, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    _check_window(config, context, stride)
    spans = window_spans(len(ids_N), context, stride)
    width, rows = min(context, len(ids_N)), min(batch_size, len(spans))   # one shape for the whole text
    total, n_scored = 0.0, 0
    for first in range(0, len(spans), rows):
        tokens_BxW = np.zeros((rows, width), np.int32)
        scored_BxW = np.zeros((rows, width), bool)
        for row, (begin, target, end) in enumerate(spans[first:first + rows]):
            tokens_BxW[row, :end - begin] = ids_N[begin:end]
            scored_BxW[row, target - begin:end - begin] = True
        logp = _window_log_probs(config, params, jnp.asarray(tokens_BxW), jnp.asarray(scored_BxW))
        total -= float(np.asarray(logp, np.float64).sum())
        n_batch = int(scored_BxW.sum())
        n_scored += n_batch
        if on_batch is not None:
            on_batch(n_batch)
    n_bytes = None if token_bytes is None else sum(len(token_bytes(int(i))) for i in ids_N[1:])
    return WindowedNLL(total, n_scored, n_bytes)
