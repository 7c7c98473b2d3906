"""The KV cache as the recursive state of eq. 17, and one forward step over it.

    S_t = ∪_ℓ {(k_{ℓ,s}, v_{ℓ,s})}_{s ≤ t},   S_{t+1} = S_t ∪ {(k_{ℓ,t+1}, v_{ℓ,t+1})}

`KVCache` holds k and v for every layer and slot ([L, B, S, N, K]), the next
slot to write, and each row's first real slot (prompts are left-padded so that
a batch of ragged prompts shares one write index). A new token costs O(L d t):
its query attends to the cached keys instead of recomputing the prefix.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model.transformer import Transformer, embed_tokens

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """k, v: [L, B, S, N, K] in the compute dtype; index: int32 next slot; start_B: first real slot per row."""

    k: Array
    v: Array
    index: Array
    start_B: Array

    @property
    def size(self) -> int:
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, size: int, start_B: Array | None = None) -> KVCache:
    """An empty cache of `size` slots (memory O(L d Δ) at size Δ)."""
    if size > config.max_seq_len:
        raise ValueError(f"cache size {size} exceeds the context window Δ = {config.max_seq_len}")
    shape = (config.n_layers, batch, size, config.n_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.compute_dtype)
    start = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return KVCache(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32), start_B=start)


def grow_cache(cache: KVCache, size: int) -> KVCache:
    """The same cache with `size` ≥ cache.size slots; the new slots are empty and come after every
    written one, so no query attends to them before they are written."""
    if size < cache.size:
        raise ValueError(f"cannot shrink a cache of {cache.size} slots to {size}")
    pad = ((0, 0), (0, 0), (0, size - cache.size), (0, 0), (0, 0))
    return cache.replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


def forward_with_cache(config: ModelConfig, params: Any, cache: KVCache, tokens_BxT: Array | None = None,
                       *, embeddings_BxTxD: Array | None = None,
                       last_logits_only: bool = False) -> tuple[Array, KVCache]:
    """Run T new tokens (or input embeddings) through the model, reading and extending the cache.

    The new tokens occupy slots index … index+T-1; row b's positions count from its
    start slot, so left-padding does not shift RoPE or learned positions. Slots before
    a row's start (padding) and after the new tokens are never attended to.
    Returns (logits_BxTxV float32, cache with index advanced by T); with last_logits_only
    the logits are [B, 1, V] for the last new token only (a prefill needs no more).
    """
    if embeddings_BxTxD is None:
        embeddings_BxTxD = embed_tokens(config, params, tokens_BxT)
    b, t = embeddings_BxTxD.shape[:2]
    slots_T = cache.index + jnp.arange(t, dtype=jnp.int32)
    positions_BxT = jnp.maximum(slots_T[None, :] - cache.start_B[:, None], 0)
    kv_slots_S = jnp.arange(cache.size, dtype=jnp.int32)
    mask_BxTxS = ((kv_slots_S[None, None, :] <= slots_T[None, :, None])
                  & (kv_slots_S[None, None, :] >= cache.start_B[:, None, None]))
    kv_positions_BxS = kv_slots_S[None, :] - cache.start_B[:, None]
    logits, (k, v) = Transformer(config, last_logits_only=last_logits_only).apply(
        {"params": params}, embeddings_BxTxD, positions_BxT, mask_BxTxS, (cache.k, cache.v), cache.index,
        kv_positions_BxS)
    return logits, cache.replace(k=k, v=v, index=cache.index + t)
