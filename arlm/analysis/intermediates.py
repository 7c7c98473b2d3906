"""Every intermediate of one forward pass (eqs. 1–6), as TransformerLens's `run_with_cache` gives,
but as one pure, jit-able function of (config, params, tokens) that returns a pytree.

`run_with_cache` returns the residual stream h^(0..L), the attention probabilities α(t, s) (eq. 3),
what each layer's attention (eq. 4) and feed-forward block (eq. 5) add to the stream, and the
logit lens: the final norm and the unembedding (eq. 6) applied to every h^(ℓ), so that layer ℓ's
"current guess" of the next token can be read as a distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.layers import Norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Intermediates:
    """residual_LxBxTxD: [L+1, B, T, D], h^(0) then h^(ℓ) after each layer (before the final norm).
    attention_LxBxHxTxS: [L, B, H, T, T], α(t, s) of eq. 3.
    attention_out_LxBxTxD / mlp_out_LxBxTxD: [L, B, T, D], the attention and FFN contributions.
    logit_lens_LxBxTxV: [L+1, B, T, V] float32, W_U · FinalNorm(h^(ℓ)); its last entry is the logits.
    """

    residual_LxBxTxD: Array
    attention_LxBxHxTxS: Array
    attention_out_LxBxTxD: Array
    mlp_out_LxBxTxD: Array
    logit_lens_LxBxTxV: Array | None

    @property
    def logits_BxTxV(self) -> Array:
        return self.logit_lens_LxBxTxV[-1]


jax.tree_util.register_dataclass(
    Intermediates, data_fields=["residual_LxBxTxD", "attention_LxBxHxTxS", "attention_out_LxBxTxD",
                                "mlp_out_LxBxTxD", "logit_lens_LxBxTxV"], meta_fields=[])


def final_norm(config: ModelConfig, params: Any, h_NxD: Array) -> Array:
    """The model's final norm (the one eq. 6 applies before W_U) on any [..., D] states, float32."""
    return Norm(config).apply({"params": params["final_norm"]}, h_NxD).astype(jnp.float32)


def unembedding_DxV(config: ModelConfig, params: Any) -> Array:
    """W_U as a [D, V] matrix (Eᵀ when the embeddings are tied)."""
    return params["embed"].T if config.tie_embeddings else params["unembed"]


def logit_lens(config: ModelConfig, params: Any, h_NxD: Array) -> Array:
    """W_U · FinalNorm(h) for states of any layer: eq. 6 read off early (float32 logits [..., V])."""
    x = final_norm(config, params, h_NxD).astype(config.compute_dtype)
    return jnp.einsum("...d,dv->...v", x, unembedding_DxV(config, params).astype(config.compute_dtype),
                      preferred_element_type=jnp.float32)


def run_with_cache(config: ModelConfig, params: Any, tokens_BxT: Array | None = None, *,
                   embeddings_BxTxD: Array | None = None, attention_mask_BxT: Array | None = None,
                   with_logit_lens: bool = True) -> Intermediates:
    """One forward pass returning every layer's intermediates (see `Intermediates`).

    Pure and jit-able: `jax.jit(run_with_cache, static_argnums=0)`. The logit lens costs
    (L+1)·B·T·V floats; pass with_logit_lens=False for long inputs and take `logit_lens`
    of the layers you need.
    """
    out = apply_model(config, params, tokens_BxT, embeddings=embeddings_BxTxD,
                      attention_mask=attention_mask_BxT, return_hidden=True, return_attention=True,
                      return_sublayers=True)
    lens = logit_lens(config, params, out.hidden_states) if with_logit_lens else None
    return Intermediates(out.hidden_states, out.attention_probs, out.attention_out, out.mlp_out, lens)


__all__ = ["Intermediates", "final_norm", "logit_lens", "run_with_cache", "unembedding_DxV"]
