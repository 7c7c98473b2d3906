"""Model configuration: one frozen, hashable dataclass for every family arlm runs.

GPT-2 and Llama are the two bases; Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and
Phi-3 are Llama plus a few options (`head_dim`, `qkv_bias`, `qk_norm`,
`sandwich_norm`, `scale_embeddings`, `attn_scale_dim`, soft-caps, sliding-window
layers with their own RoPE base, a gated-GELU MLP); the constructors
`ModelConfig.mistral(...)`, `.qwen2`, `.qwen3`, `.gemma2`, `.gemma3` name them.

`ModelConfig` is static under `jax.jit` (it is hashable) and is validated at
construction, so a bad value fails where it is written, not deep inside a trace.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

PosKind = Literal["learned", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu", "geglu"]
DTypeName = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the Δ-order autoregressive map (eqs. 1–6).

    Attributes:
      vocab_size: V, the number of token ids.
      d_model: D, the width of the residual stream h_t.
      n_layers: L, the number of layer maps φ (eq. 5).
      n_heads: H, attention heads per layer.
      n_kv_heads: heads for keys/values (grouped-query attention, eq. 4);
        defaults to n_heads (multi-head attention).
      d_ff: hidden width of the feed-forward block.
      max_seq_len: Δ, the context window (eq. 6); positions ≥ Δ are an error.
      pos_embedding: "learned" (GPT-2, eq. 1 with p_t) or "rope" (Llama).
      rope_theta: RoPE base θ.
      norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
      norm_eps: ε of the normalisation.
      mlp: "gelu" (GPT-2 MLP with tanh-approximated GELU), "swiglu" (Llama:
        silu(x W_gate) ⊙ x W_up) or "geglu" (Gemma: tanh-GELU(x W_gate) ⊙ x W_up).
      use_bias: biases in the attention and dense MLP projections (GPT-2); MoE experts have none.
      tie_embeddings: W_U = Eᵀ (the unembedding shares the embedding matrix).
      head_dim: K, the width of one head; default d_model // n_heads (Gemma and Qwen3 set it).
      qkv_bias: biases on the q, k and v projections only (Qwen2).
      qk_norm: RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3).
      sandwich_norm: also normalise each sub-layer's output before adding it to the
        residual stream (Gemma 2/3: h ← h + Norm(Attn(Norm(h)))).
      scale_embeddings: h^(0) = √D · E[x_t] (Gemma).
      attn_scale_dim: scores are q·k / √attn_scale_dim (eq. 2); default head_dim
        (Gemma's query_pre_attn_scalar).
      attn_softcap / logit_softcap: c·tanh(x / c) on attention scores / final logits (Gemma 2).
      sliding_window: W; when set, a query at t attends only to keys s with t − s < W, on
        every layer except the global ones (Mistral: all layers local).
      global_every: with a sliding window, layer ℓ (0-based) attends globally when
        (ℓ + 1) % global_every == 0 (Gemma 2: 2, Gemma 3: 6); 0 means no global layer.
      rope_local_theta: RoPE base of the sliding-window layers (Gemma 3); default rope_theta.
      rope_scaling: None, ("linear", factor) or ("llama3", factor, low_freq_factor,
        high_freq_factor, original_context): rescaled RoPE frequencies of the global layers
        (Llama 3.1/3.2, Gemma 3 ≥ 4B); see `arlm.model.layers.rope_inv_freq`.
      n_experts: 0 for a dense feed-forward block, otherwise the number of
        experts of a mixture-of-experts block (eq. 5).
      moe_top_k: experts per token.
      moe_aux_weight: weight of the load-balancing loss added to training losses.
      moe_impl: "dense" evaluates every expert on every token (the reference); "routed" dispatches each
        token to its top-k experts only, each expert taking at most
        C = ceil(moe_capacity_factor · tokens · k / n_experts) tokens per batch: the same output as dense
        when no token is dropped (`arlm.model.moe_dropped_fraction` reports how many are).
      dtype: compute dtype of matmuls; params, softmax and log-softmax stay float32.
      init_std: standard deviation of the normal initialisation.
      residual_gain: γ ∈ (0, 1] of a contractive residual map (the paper's open question 1): each
        sub-layer updates h ← γ h + f(Norm(h)) instead of h ← h + f(Norm(h)) (eq. 5), so the identity
        path through a layer scales a deviation by γ² rather than carrying it unchanged; 1 is eq. 5.
      attention_impl: "reference" computes eqs. 2–4 step by step and materialises α(t, s) [B, H, T, S];
        "fused" calls `jax.nn.dot_product_attention` (cuDNN flash attention on GPU where it applies,
        XLA elsewhere) and never forms α, except when attention probabilities are asked for
        (`return_attention=True`), which always takes the reference path. Same result either way.
      remat: what the backward pass recomputes instead of storing, per layer: "none" (store every
        activation), "full" (store only each layer's input, recompute the block), "dots" (store the
        weight matmuls' outputs, recompute the rest: `dots_with_no_batch_dims_saveable`). Same losses
        and gradients; less memory for more compute.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_kv_heads: int | None = None
    pos_embedding: PosKind = "rope"
    rope_theta: float = 10000.0
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: MlpKind = "swiglu"
    use_bias: bool = False
    tie_embeddings: bool = True
    n_experts: int = 0
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01
    dtype: DTypeName = "float32"
    init_std: float = 0.02
    head_dim: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    scale_embeddings: bool = False
    attn_scale_dim: float | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    sliding_window: int | None = None
    global_every: int = 0
    rope_local_theta: float | None = None
    rope_scaling: tuple | None = None
    residual_gain: float = 1.0
    attention_impl: str = "reference"
    remat: str = "none"
    moe_impl: str = "dense"
    moe_capacity_factor: float = 1.25

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            _set(self, name, _as_int(name, getattr(self, name), optional=name in ("n_kv_heads", "head_dim",
                                                                              "sliding_window")))
        for name in _BOOL_FIELDS:
            _set(self, name, _as_bool(name, getattr(self, name)))
        for name in _FLOAT_FIELDS:
            _set(self, name, _as_float(name, getattr(self, name),
                                       optional=name in ("attn_scale_dim", "attn_softcap", "logit_softcap",
                                                         "rope_local_theta")))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                     "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            _set(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly")
            _set(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads heads)"
            )
        _check_choice("pos_embedding", self.pos_embedding, ("learned", "rope"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, ("gelu", "swiglu", "geglu"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("attention_impl", self.attention_impl, ("reference", "fused"))
        _check_choice("remat", self.remat, ("none", "full", "dots"))
        _check_choice("moe_impl", self.moe_impl, ("dense", "routed"))
        if self.moe_capacity_factor <= 0:
            raise ValueError(f"ModelConfig.moe_capacity_factor must be > 0, got {self.moe_capacity_factor!r}")
        if self.attention_impl == "fused" and self.attn_softcap is not None:
            raise ValueError("ModelConfig.attention_impl='fused' cannot soft-cap attention scores (attn_softcap, "
                             "Gemma 2): use attention_impl='reference'")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "init_std", "attn_scale_dim", "attn_softcap", "logit_softcap",
                     "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {value!r}")
        if not 0 < self.residual_gain <= 1:
            raise ValueError(f"ModelConfig.residual_gain must be in (0, 1], got {self.residual_gain!r}")
        if self.n_experts < 0:
            raise ValueError(f"ModelConfig.n_experts must be ≥ 0, got {self.n_experts}")
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(
                f"ModelConfig.moe_top_k={self.moe_top_k} must be in [1, n_experts={self.n_experts}]"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window}")
        if self.global_every < 0:
            raise ValueError(f"ModelConfig.global_every must be ≥ 0, got {self.global_every}")
        if self.global_every and self.sliding_window is None:
            raise ValueError("ModelConfig.global_every needs a sliding_window (which layers are local?)")
        _set(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError("ModelConfig.rope_local_theta needs a sliding_window (it is the local layers' base)")

    def is_global_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) attends to the whole window Δ (True without a sliding window)."""
        if self.sliding_window is None:
            return True
        return bool(self.global_every) and (layer + 1) % self.global_every == 0

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; a head_dim that was the default d_model // n_heads follows new sizes."""
        if "head_dim" not in changes and self._default_head_dim() and {"d_model", "n_heads"} & set(changes):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def _default_head_dim(self) -> bool:
        return self.head_dim == self.d_model // self.n_heads

    @classmethod
    def gpt2(cls, **overrides: Any) -> "ModelConfig":
        """GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings."""
        base = dict(
            pos_embedding="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
            use_bias=True, tie_embeddings=True,
        )
        base.update(overrides)
        if "d_ff" not in base and "d_model" in base:
            base["d_ff"] = 4 * base["d_model"]
        return cls(**base)

    @classmethod
    def llama(cls, **overrides: Any) -> "ModelConfig":
        """Llama family: RoPE, RMSNorm, SwiGLU, no biases, optional GQA."""
        base = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def mistral(cls, **overrides: Any) -> "ModelConfig":
        """Mistral: Llama with an optional sliding window on every layer."""
        return cls.llama(**overrides)

    @classmethod
    def qwen2(cls, **overrides: Any) -> "ModelConfig":
        """Qwen2 / Qwen2.5: Llama with biases on the q, k, v projections."""
        return cls.llama(**{"qkv_bias": True, **overrides})

    @classmethod
    def qwen3(cls, **overrides: Any) -> "ModelConfig":
        """Qwen3: Llama with RMSNorm on each head's query and key."""
        return cls.llama(**{"qk_norm": True, **overrides})

    @classmethod
    def gemma2(cls, **overrides: Any) -> "ModelConfig":
        """Gemma 2: gated GELU, sandwich norms, √D embeddings, soft-capping, local/global layers."""
        base = dict(mlp="geglu", sandwich_norm=True, scale_embeddings=True, sliding_window=4096, global_every=2,
                    attn_softcap=50.0, logit_softcap=30.0, norm_eps=1e-6, tie_embeddings=True)
        return cls.llama(**{**base, **overrides})

    @classmethod
    def gemma3(cls, **overrides: Any) -> "ModelConfig":
        """Gemma 3 (text): Gemma 2 without soft-caps, with q/k norms, 5 local : 1 global layers, local RoPE base."""
        base = dict(mlp="geglu", sandwich_norm=True, scale_embeddings=True, qk_norm=True, sliding_window=4096,
                    global_every=6, rope_theta=1_000_000.0, rope_local_theta=10_000.0, norm_eps=1e-6,
                    tie_embeddings=True)
        return cls.llama(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; head_dim only when it is not the default d_model // n_heads."""
        d = dataclasses.asdict(self)
        if self._default_head_dim():
            d.pop("head_dim")
        return d


_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "n_kv_heads", "n_experts",
               "moe_top_k", "head_dim", "sliding_window", "global_every")
_BOOL_FIELDS = ("use_bias", "tie_embeddings", "qkv_bias", "qk_norm", "sandwich_norm", "scale_embeddings")
_FLOAT_FIELDS = ("rope_theta", "norm_eps", "moe_aux_weight", "init_std", "attn_scale_dim", "attn_softcap",
                 "logit_softcap", "rope_local_theta", "residual_gain", "moe_capacity_factor")


def _set(cfg: ModelConfig, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)


def _as_int(name: str, value: Any, optional: bool = False) -> int | None:
    """A Python int from an int or numpy integer (not a bool, float or string)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {type(value).__name__} {value!r}")
    return int(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _as_float(name: str, value: Any, optional: bool = False) -> float | None:
    """A finite Python float from an int/float/numpy number (not a bool or string)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"ModelConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"ModelConfig.{name} must be finite, got {value!r}")
    return value


def _rope_scaling(value: Any) -> tuple | None:
    """A validated, hashable rope_scaling tuple (lists from JSON accepted)."""
    if value is None:
        return None
    arity = {"linear": 2, "llama3": 5}
    if (not isinstance(value, (tuple, list)) or not value or value[0] not in arity
            or len(value) != arity[value[0]]):
        raise ValueError(f"ModelConfig.rope_scaling must be None, ('linear', factor) or ('llama3', factor, "
                         f"low_freq_factor, high_freq_factor, original_context), got {value!r}")
    numbers = tuple(_as_float("rope_scaling", v) for v in value[1:])
    if any(v <= 0 for v in numbers) or (value[0] == "llama3" and numbers[2] <= numbers[1]):
        raise ValueError(f"ModelConfig.rope_scaling values must be > 0 (and high_freq_factor > low_freq_factor), "
                         f"got {value!r}")
    return (value[0], *numbers)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {choices}")
