"""A cache-free sampling loop (eq. 16): the reference that `arlm.generate` is tested against.

Each new token re-runs the whole window, O(L d t²) per token: the baseline
that the KV cache of eq. 17 removes. Tokens before the last Δ are dropped (eq. 18).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.config import ModelConfig
from arlm.model import forward


@partial(jax.jit, static_argnums=(0,))
def _last_logits(config: ModelConfig, params: Any, window_1xW: jax.Array, length: jax.Array) -> jax.Array:
    logits_1xWxV = forward(config, params, window_1xW)
    return jax.lax.dynamic_index_in_dim(logits_1xWxV[0], length - 1, keepdims=False)


def sample_tokens(
    config: ModelConfig,
    params: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    eos_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Sample continuation ids x_{t+1} ~ softmax(z_t / τ); τ = 0 is greedy."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        context = ids[-config.max_seq_len:]
        width = min(config.max_seq_len, 1 << max(4, (len(context) - 1).bit_length()))  # few compiles
        window = np.zeros((1, width), np.int32)
        window[0, :len(context)] = context
        logits_V = _last_logits(config, params, jnp.asarray(window), jnp.asarray(len(context)))
        key, sub = jax.random.split(key)
        if temperature == 0:
            nxt = int(jnp.argmax(logits_V))
        else:
            nxt = int(jax.random.categorical(sub, logits_V / temperature))
        ids.append(nxt)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out
