"""The pieces of the layer map φ (eq. 5) and of positions (eq. 1): norms, RoPE, MLPs, MoE.

Every module keeps its parameters in float32 and casts them to the compute
dtype where they meet activations; normalisation statistics are float32.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.sharding import constrain

Array = jax.Array


def normal_init(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def weight(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
           axes: tuple[str | None, ...]) -> Array:
    """Create parameter `name` of `module` with its logical axes declared beside it.

    `axes` names each dimension by its role ("embed", "heads", "kv_heads", "mlp", "vocab",
    "expert", or None for a dimension no rule splits); the layer scan prepends "layers".
    `arlm.model.partitioning` reads these declarations: weight sharding, the LoRA targets and
    the weight-decay mask all derive from them.
    """
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name} of shape {shape} declared with {len(axes)} axes {axes}")
    return module.param(name, nn.with_logical_partitioning(init, axes), shape)


def project(x_NxI: Array, w_IxO: Array) -> Array:
    """x @ W for x [..., I] and a 2-D W [I, O] → [..., O], computed as one [prod(...), I] @ [I, O] matmul.

    The same sums as `x @ W`, but XLA:CPU then runs a plain GEMM forward and backward instead of
    transposing activations around the dot. Used by the MLP projections: a SmolLM2 4×256 train step on
    one core (fused/dots/64) took 12.9–13.0 s against 13.9–14.5 s with `x @ W`. Tried on Q/K/V/W_O too,
    it gained no more and added 7% to the default step's XLA temporaries, so attention keeps its einsums.
    """
    if w_IxO.ndim != 2 or x_NxI.shape[-1] != w_IxO.shape[0]:
        raise ValueError(f"project: x {x_NxI.shape} and W {w_IxO.shape} need x [..., I] and W [I, O]")
    lead = x_NxI.shape[:-1]
    y_2d = x_NxI.reshape(math.prod(lead), w_IxO.shape[0]) @ w_IxO
    return y_2d.reshape(*lead, w_IxO.shape[1])


def trailing(v: Array, ndim: int) -> Array:
    """Reshape a per-feature vector/table to broadcast against the trailing axes of an ndim array."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32 (eq. 5), over the last axis.

    `features` is that axis' width: d_model by default, head_dim for the per-head q/k norms.
    Gemma writes its RMSNorm scale as (1 + w); arlm stores the product, so one Norm serves.
    """

    config: ModelConfig
    features: int | None = None

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg = self.config
        width = self.features or cfg.d_model
        x = x_BxTxD.astype(jnp.float32)
        scale_D = weight(self, "scale", nn.initializers.ones, (width,), (None,))
        if cfg.norm == "layernorm":
            bias_D = weight(self, "bias", nn.initializers.zeros, (width,), (None,))
            mean = x.mean(-1, keepdims=True)
            var = jnp.square(x - mean).mean(-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * trailing(scale_D, x.ndim) + trailing(bias_D, x.ndim)
        else:
            ms = jnp.square(x).mean(-1, keepdims=True)
            y = x * jax.lax.rsqrt(ms + cfg.norm_eps) * trailing(scale_D, x.ndim)
        return y.astype(cfg.compute_dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> Array:
    """Eq. 1 (RoPE variant): inverse frequencies θ^(−2i/K), i < K/2, float32, optionally rescaled.

    scaling: None; ("linear", factor): every frequency / factor; ("llama3", factor,
    low_freq_factor, high_freq_factor, original_context): Llama 3.1's rule, long wavelengths
    (> original/low) / factor, short ones (< original/high) kept, a smooth blend between.
    """
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq_K2
    if scaling[0] == "linear":
        return inv_freq_K2 / scaling[1]
    _, factor, low, high, original = scaling
    wavelen_K2 = 2 * math.pi / inv_freq_K2
    scaled = jnp.where(wavelen_K2 > original / low, inv_freq_K2 / factor, inv_freq_K2)
    smooth = (original / wavelen_K2 - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen_K2 >= original / high) & (wavelen_K2 <= original / low)
    return jnp.where(medium, blended, scaled)


def rope_angles(positions_BxT: Array, head_dim: int, theta: float,
                scaling: tuple | None = None) -> tuple[Array, Array]:
    """cos/sin tables [B, T, head_dim] for rotary positions (eq. 1, RoPE variant)."""
    inv_freq_K2 = rope_inv_freq(head_dim, theta, scaling)
    angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * trailing(inv_freq_K2, positions_BxT.ndim + 1)
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)
    return jnp.cos(angles_BxTxK), jnp.sin(angles_BxTxK)


def apply_rope(x_BxTxHxK: Array, cos_BxTxK: Array, sin_BxTxK: Array) -> Array:
    """Rotate query/key pairs (x_i, x_{i+K/2}) by position-dependent angles (half-split layout)."""
    x = x_BxTxHxK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_BxTxK[:, :, None, :], sin_BxTxK[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BxTxHxK.dtype)


def _dense(module: nn.Module, name: str, x: Array, shape: tuple[int, int], axes: tuple[str, str],
           std: float, bias: bool, dtype) -> Array:
    w = weight(module, name, normal_init(std), shape, axes)
    y = project(x, w.astype(dtype))
    if bias:
        out_axis = axes[1] if axes[1] != "embed" else None    # a D-wide bias is never split
        b = weight(module, name + "_bias", nn.initializers.zeros, (shape[1],), (out_axis,))
        y = y + trailing(b.astype(dtype), y.ndim)
    return y


class Mlp(nn.Module):
    """Feed-forward block: GELU MLP (GPT-2), SwiGLU (Llama) or gated tanh-GELU (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg = self.config
        dt = cfg.compute_dtype
        x = x_BxTxD.astype(dt)
        d, f = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if cfg.mlp == "gelu":
            pre_BxTxF = _dense(self, "w_in", x, (d, f), ("embed", "mlp"), cfg.init_std, cfg.use_bias, dt)
            hidden_BxTxF = jax.nn.gelu(pre_BxTxF, approximate=True)
        else:
            gate = _dense(self, "w_gate", x, (d, f), ("embed", "mlp"), cfg.init_std, cfg.use_bias, dt)
            up = _dense(self, "w_up", x, (d, f), ("embed", "mlp"), cfg.init_std, cfg.use_bias, dt)
            act = jax.nn.silu if cfg.mlp == "swiglu" else partial(jax.nn.gelu, approximate=True)
            hidden_BxTxF = act(gate) * up
        hidden_BxTxF = constrain(hidden_BxTxF, "batch", None, "mlp")
        return _dense(self, "w_out", hidden_BxTxF, (f, d), ("mlp", "embed"), out_std, cfg.use_bias, dt)


EXPERT_IN = ("expert", "embed", "mlp")


_EXPERT_EINSUMS = {"bt": ("btd,edf->btef", "btef,efd->bted"), "ec": ("ecd,edf->ecf", "ecf,efd->ecd")}


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor · tokens · k / n_experts): the slots each expert has per batch."""
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def routed_mixture(experts: Callable[[Array, str], Array], x_BxTxD: Array, top_idx_BxTxK: Array,
                   top_gates_BxTxK: Array, n_experts: int, capacity_factor: float) -> tuple[Array, Array]:
    """Eq. 5's mixture Σ_k g_k FFN_{e_k}(h) with each token dispatched to its top-k experts only (sort-based).

    The B·T·k assignments are sorted by expert (stably, so earlier tokens come first); an assignment's
    slot is its rank within its expert, and ranks ≥ C (`expert_capacity`) are dropped (contribute 0).
    Each expert then runs on its [C, D] slots: E·C·(FFN cost) instead of E·B·T. Returns the output and
    the fraction of assignments dropped."""
    b, t, d = x_BxTxD.shape
    k = top_idx_BxTxK.shape[-1]
    n_assign = b * t * k
    cap = expert_capacity(b * t, k, n_experts, capacity_factor)
    expert_A = top_idx_BxTxK.reshape(n_assign)
    token_A = jnp.arange(n_assign) // k                              # row of x_NxD each assignment reads
    order_A = jnp.argsort(expert_A, stable=True)
    counts_E = jnp.bincount(expert_A, length=n_experts)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_sorted_A = jnp.arange(n_assign) - starts_E[expert_A[order_A]]
    slot_A = jnp.zeros(n_assign, jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))
    kept_A = slot_A < cap
    slot_A = jnp.where(kept_A, slot_A, cap)                            # out of range: dropped by the scatter
    x_NxD = x_BxTxD.reshape(b * t, d)
    slots_ExCxD = jnp.zeros((n_experts, cap, d), x_BxTxD.dtype).at[expert_A, slot_A].set(
        x_NxD[token_A], mode="drop")
    out_ExCxD = experts(slots_ExCxD, "ec")
    gathered_AxD = out_ExCxD.at[expert_A, slot_A].get(mode="fill", fill_value=0)
    weighted_AxD = gathered_AxD * (top_gates_BxTxK.reshape(n_assign, 1) * kept_A[:, None]).astype(x_BxTxD.dtype)
    y_NxD = weighted_AxD.reshape(b * t, k, d).sum(1)
    return y_NxD.reshape(b, t, d), jnp.mean(~kept_A)


class MoE(nn.Module):
    """Mixture of experts `Σ_e g_e(h) FFN_e(h)` with top-k gating (eq. 5). Experts have no biases.

    The router is a linear map to E logits; each token keeps its top-k experts,
    whose gates are the softmax of those k logits. Every expert is evaluated on
    every token and unselected ones are weighted by zero: exact and simple,
    at E/k× the FLOPs of routed dispatch. `moe_impl="routed"` dispatches instead
    (`routed_mixture`), with a capacity per expert; it sows the dropped fraction
    under "intermediates" ("moe_dropped_fraction").

    Returns the output and the Switch-Transformer load-balancing loss
    `E · Σ_e f_e P_e`, with f_e the fraction of routing slots sent to expert e
    and P_e its mean router probability; it equals 1 for perfectly uniform routing.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> tuple[Array, Array]:
        cfg = self.config
        dt = cfg.compute_dtype
        e, k, d, f = cfg.n_experts, cfg.moe_top_k, cfg.d_model, cfg.d_ff
        x = x_BxTxD.astype(dt)
        router_DxE = weight(self, "router", normal_init(cfg.init_std), (d, e), ("embed", None))
        router_logits = x.astype(jnp.float32) @ router_DxE.astype(jnp.float32)  # [B, T, E], float32
        top_logits_BxTxK, top_idx_BxTxK = jax.lax.top_k(router_logits, k)
        top_gates = jax.nn.softmax(top_logits_BxTxK, axis=-1)
        onehot_BxTxKxE = jax.nn.one_hot(top_idx_BxTxK, e, dtype=jnp.float32)
        gates_BxTxE = jnp.einsum("btk,btke->bte", top_gates, onehot_BxTxKxE)

        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        init = normal_init(cfg.init_std)
        if cfg.mlp == "gelu":
            w_in = weight(self, "w_in", init, (e, d, f), EXPERT_IN).astype(dt)
        else:
            w_gate = weight(self, "w_gate", init, (e, d, f), EXPERT_IN).astype(dt)
            w_up = weight(self, "w_up", init, (e, d, f), EXPERT_IN).astype(dt)
        w_out = weight(self, "w_out", normal_init(out_std), (e, f, d), ("expert", "mlp", "embed")).astype(dt)

        def experts(x_in: Array, tokens: str) -> Array:
            """FFN_e of eq. 5 for every expert e: on every token (tokens="bt", x_in [B, T, D] → [B, T, E, D])
            or on each expert's own dispatched slots (tokens="ec", x_in [E, C, D] → [E, C, D])."""
            into, out = _EXPERT_EINSUMS[tokens]
            if cfg.mlp == "gelu":
                hidden = jax.nn.gelu(jnp.einsum(into, x_in, w_in), approximate=True)
            else:
                act = jax.nn.silu if cfg.mlp == "swiglu" else partial(jax.nn.gelu, approximate=True)
                hidden = act(jnp.einsum(into, x_in, w_gate)) * jnp.einsum(into, x_in, w_up)
            return jnp.einsum(out, hidden, w_out)

        if cfg.moe_impl == "routed":
            y_BxTxD, dropped = routed_mixture(experts, x, top_idx_BxTxK, top_gates.astype(dt), e,
                                              cfg.moe_capacity_factor)
            self.sow("intermediates", "moe_dropped_fraction", dropped)
        else:
            expert_out_BxTxExD = experts(x, "bt")
            y_BxTxD = jnp.einsum("bte,bted->btd", gates_BxTxE.astype(dt), expert_out_BxTxExD)

        probs_BxTxE = jax.nn.softmax(router_logits, axis=-1)
        frac_routed_E = onehot_BxTxKxE.sum(2).mean((0, 1)) / k
        mean_prob_E = probs_BxTxE.mean((0, 1))
        aux_loss = e * jnp.sum(frac_routed_E * mean_prob_E)
        return y_BxTxD, aux_loss
