"""Model configuration: one frozen, hashable dataclass for the GPT-2 and Llama families.

`ModelConfig` is static under `jax.jit` (it is hashable) and is validated at
construction, so a bad value fails where it is written, not deep inside a trace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

PosKind = Literal["learned", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]
DTypeName = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the Δ-order autoregressive map (eqs. 1–6).

    Attributes:
      vocab_size: V, the number of token ids.
      d_model: D, the width of the residual stream h_t.
      n_layers: L, the number of layer maps φ (eq. 5).
      n_heads: H, attention heads per layer; head_dim = d_model // n_heads.
      n_kv_heads: heads for keys/values (grouped-query attention, eq. 4);
        defaults to n_heads (multi-head attention).
      d_ff: hidden width of the feed-forward block.
      max_seq_len: Δ, the context window (eq. 6); positions ≥ Δ are an error.
      pos_embedding: "learned" (GPT-2, eq. 1 with p_t) or "rope" (Llama).
      rope_theta: RoPE base θ.
      norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
      norm_eps: ε of the normalisation.
      mlp: "gelu" (GPT-2 MLP with tanh-approximated GELU) or "swiglu" (Llama).
      use_bias: biases in the attention and dense MLP projections (GPT-2); MoE experts have none.
      tie_embeddings: W_U = Eᵀ (the unembedding shares the embedding matrix).
      n_experts: 0 for a dense feed-forward block, otherwise the number of
        experts of a mixture-of-experts block (eq. 5).
      moe_top_k: experts per token.
      moe_aux_weight: weight of the load-balancing loss added to training losses.
      dtype: compute dtype of matmuls; params, softmax and log-softmax stay float32.
      init_std: standard deviation of the normal initialisation.
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

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads heads)"
            )
        _check_choice("pos_embedding", self.pos_embedding, ("learned", "rope"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, ("gelu", "swiglu"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be > 0")
        if self.n_experts < 0:
            raise ValueError(f"ModelConfig.n_experts must be ≥ 0, got {self.n_experts}")
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(
                f"ModelConfig.moe_top_k={self.moe_top_k} must be in [1, n_experts={self.n_experts}]"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

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
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {choices}")
