"""Self-attention as the paper writes it: bilinear scores → causal softmax → linear aggregation.

Eq. 2  a(t,s) = (M h_t)ᵀ (N h_s) / √d_k            `bilinear_scores`
Eq. 3  α(t,s) = softmax_{s ≤ t} a(t,s), 0 for s > t  `causal_softmax`
Eq. 4  z_t = Σ_s α(t,s) V h_s, heads → W_O           `aggregate`

Grouped-query attention shares each key/value head among G = H / H_kv query
heads; query head h uses key/value head h // G (the Hugging Face layout).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model.layers import Norm, apply_rope, normal_init, rope_angles, trailing, weight
from arlm.sharding import constrain

Array = jax.Array


def bilinear_scores(q_BxTxHxK: Array, k_BxSxNxK: Array, scale_dim: float | None = None,
                    softcap: float | None = None) -> Array:
    """Eq. 2: scores_BxHxTxS[b,h,t,s] = q_t·k_s / √d_k, in float32.

    q has H heads and k has N ≤ H heads (N divides H); head h reads k head h // (H/N).
    `scale_dim` replaces d_k under the root (Gemma); `softcap` c maps a ↦ c·tanh(a / c) (Gemma 2).
    """
    b, t, h, dk = q_BxTxHxK.shape
    n = k_BxSxNxK.shape[2]
    q_BxTxNxGxK = q_BxTxHxK.reshape(b, t, n, h // n, dk)
    scores = jnp.einsum("btngk,bsnk->bngts", q_BxTxNxGxK, k_BxSxNxK,
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, t, -1) / math.sqrt(scale_dim or dk)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    return scores


def causal_softmax(scores_BxHxTxS: Array, mask_BxTxS: Array) -> Array:
    """Eq. 3: α = softmax over the allowed keys (mask True), exactly 0 elsewhere; float32.

    A row with no allowed key (only padding) returns all zeros instead of NaN.
    """
    scores = scores_BxHxTxS.astype(jnp.float32)
    allowed = mask_BxTxS[:, None, :, :]
    masked = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnorm = jnp.where(allowed, jnp.exp(masked - jax.lax.stop_gradient(row_max)), 0.0)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    return unnorm / jnp.where(denom > 0, denom, 1.0)


def aggregate(probs_BxHxTxS: Array, v_BxSxNxK: Array) -> Array:
    """Eq. 4: z_BxTxHxK[b,t,h] = Σ_s α(t,s) v_s (v head h // G for query head h)."""
    b, h, t, s = probs_BxHxTxS.shape
    n, dk = v_BxSxNxK.shape[2], v_BxSxNxK.shape[3]
    probs_BxNxGxTxS = probs_BxHxTxS.reshape(b, n, h // n, t, s).astype(v_BxSxNxK.dtype)
    z = jnp.einsum("bngts,bsnk->btngk", probs_BxNxGxTxS, v_BxSxNxK)
    return z.reshape(b, t, h, dk)


def fused_attention(q_BxTxHxK: Array, k_BxSxNxK: Array, v_BxSxNxK: Array, mask_BxTxS: Array,
                    scale_dim: float | None = None) -> Array:
    """Eqs. 2–4 in one `jax.nn.dot_product_attention` call: the z_BxTxHxK of
    `aggregate(causal_softmax(bilinear_scores(q, k), mask), v)` without materialising α. Grouped-query
    heads as there (head h reads key/value head h // G); a row with no allowed key gives 0, as
    `causal_softmax` makes it."""
    dtype = q_BxTxHxK.dtype
    z = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxNxK.astype(dtype), v_BxSxNxK.astype(dtype),
                                     mask=mask_BxTxS[:, None, :, :],
                                     scale=1.0 / math.sqrt(scale_dim or q_BxTxHxK.shape[-1]))
    any_key_BxT = jnp.any(mask_BxTxS, axis=-1)
    return jnp.where(any_key_BxT[:, :, None, None], z, jnp.zeros((), z.dtype)).astype(v_BxSxNxK.dtype)


def causal_mask(q_positions_BxT: Array, kv_positions_BxS: Array) -> Array:
    """True where key position s ≤ query position t (eq. 3's s ≤ t)."""
    return kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]


def window_mask(q_positions_BxT: Array, kv_positions_BxS: Array, window: int) -> Array:
    """Eq. 3 restricted to a sliding window: True where t − s < W (the key is among the last W positions)."""
    return q_positions_BxT[:, :, None] - kv_positions_BxS[:, None, :] < window


class Attention(nn.Module):
    """One attention sub-layer: projections M, N, V (eq. 2/4), RoPE if configured, W_O."""

    config: ModelConfig

    def _proj(self, name: str, x: Array, head_axis: str, std: float) -> Array:
        """x @ W for W [D, heads, K]; `head_axis` is "heads" (queries) or "kv_heads" (keys, values)."""
        cfg = self.config
        heads = cfg.n_heads if head_axis == "heads" else cfg.n_kv_heads
        w = weight(self, name, normal_init(std), (cfg.d_model, heads, cfg.head_dim), ("embed", head_axis, None))
        y = jnp.einsum("btd,dhk->bthk", x, w.astype(cfg.compute_dtype))
        if cfg.use_bias or cfg.qkv_bias:
            bias = weight(self, name + "_bias", nn.initializers.zeros, (heads, cfg.head_dim), (head_axis, None))
            y = y + trailing(bias.astype(cfg.compute_dtype), y.ndim)
        return constrain(y, "batch", None, head_axis, None)

    @nn.compact
    def __call__(self, h_BxTxD: Array, positions_BxT: Array, mask_BxTxS: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 is_global: Array | bool = True, need_probs: bool = True):
        """Attend the T new tokens to themselves, or (with `kv_cache`) to every cached slot.

        kv_cache: (k_BxSxNxK, v_BxSxNxK) of this layer; the new keys/values are written at
        slots cache_index … cache_index+T-1 (eq. 17: S_{t+1} = S_t ∪ {(k_{t+1}, v_{t+1})}),
        and mask_BxTxS then ranges over all S slots. `is_global` (a traced bool under the layer
        scan) picks the global RoPE (base and scaling); a local layer uses `rope_local_theta` when set (the
        caller passes the sliding-window mask). Returns (out, probs, new_kv_cache); probs is None when
        `attention_impl == "fused"` and `need_probs` is False (the fused path never forms them).
        """
        cfg = self.config
        x = h_BxTxD.astype(cfg.compute_dtype)
        q = self._proj("wq", x, "heads", cfg.init_std)      # q_t = M h_t
        k = self._proj("wk", x, "kv_heads", cfg.init_std)   # k_s = N h_s
        v = self._proj("wv", x, "kv_heads", cfg.init_std)   # v_s = V h_s
        if cfg.qk_norm:                                          # per-head RMSNorm (Qwen3, Gemma 3)
            q = Norm(cfg, features=cfg.head_dim, name="q_norm")(q)
            k = Norm(cfg, features=cfg.head_dim, name="k_norm")(k)
        if cfg.pos_embedding == "rope":
            cos, sin = rope_angles(positions_BxT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_local_theta is not None:       # local layers: their own base, never rescaled
                cos_l, sin_l = rope_angles(positions_BxT, cfg.head_dim, cfg.rope_local_theta)
                cos, sin = jnp.where(is_global, cos, cos_l), jnp.where(is_global, sin, sin_l)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            zero = jnp.zeros((), jnp.asarray(cache_index).dtype)
            start = (zero, cache_index, zero, zero)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv_cache = (k, v)
        if cfg.attention_impl == "fused" and not need_probs:
            probs_BxHxTxS = None
            z_BxTxHxK = fused_attention(q, k, v, mask_BxTxS, cfg.attn_scale_dim)
        else:
            scores = bilinear_scores(q, k, cfg.attn_scale_dim, cfg.attn_softcap)
            probs_BxHxTxS = causal_softmax(scores, mask_BxTxS)
            z_BxTxHxK = aggregate(probs_BxHxTxS, v)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        wo = weight(self, "wo", normal_init(out_std), (cfg.n_heads, cfg.head_dim, cfg.d_model),
                    ("heads", None, "embed"))
        out = jnp.einsum("bthk,hkd->btd", z_BxTxHxK, wo.astype(cfg.compute_dtype))
        if cfg.use_bias:
            wo_bias = weight(self, "wo_bias", nn.initializers.zeros, (cfg.d_model,), (None,))
            out = out + trailing(wo_bias.astype(cfg.compute_dtype), out.ndim)
        return out, probs_BxHxTxS, kv_cache
