"""The whole map: embeddings (eq. 1) → L layer maps φ (eqs. 2–5) → next-token logits (eq. 6).

Layers are one `nn.scan` over a stacked parameter tree (`params["layers"]`
has a leading axis of length L), which keeps compile time flat in depth and
lets per-layer hidden states and attention probabilities come out as stacked
arrays.

Public functions are pure: `init_params(config, key)` and
`forward(config, params, tokens)`; `apply_model` returns everything else
(hidden states, attention probabilities, MoE load-balancing loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arlm.config import ModelConfig
from arlm.model.attention import Attention, causal_mask, window_mask
from arlm.model.layers import MoE, Mlp, Norm, normal_init, weight
from arlm.sharding import constrain

Array = jax.Array
Params = Any
LAYER_AXIS = "layers"     # the logical name of the stacked layer axis of params["layers"]


class Block(nn.Module):
    """Eq. 5, pre-norm layer map: h ← h + Attn(Norm(h)); h ← h + FFN(Norm(h)).

    With `residual_gain` γ < 1 the map is contractive along the identity path:
    h ← γ h + Attn(Norm(h)); h ← γ h + FFN(Norm(h)).

    With `sandwich_norm` (Gemma) each sub-layer's output is normalised once more before it is
    added: h ← h + Norm(Attn(Norm(h))). A layer with a sliding window (not global) attends
    with `local_mask_BxTxS`; `layer_id` is this layer's index (scanned).
    """

    config: ModelConfig
    return_attention: bool = False
    return_sublayers: bool = False     # also emit the attention and FFN outputs added to the residual

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], positions_BxT: Array, mask_BxTxS: Array,
                 local_mask_BxTxS: Array | None, cache_index: Array | None,
                 kv_cache: tuple[Array, Array] | None, layer_id: Array):
        cfg = self.config
        h_BxTxD, aux = carry
        h_BxTxD = constrain(h_BxTxD, "batch", None, None)     # on a mesh: rows split, D whole
        is_global = True
        if cfg.sliding_window is not None:
            is_global = (layer_id + 1) % cfg.global_every == 0 if cfg.global_every else False
            mask_BxTxS = jnp.where(is_global, mask_BxTxS, local_mask_BxTxS)
        attn_out, probs_BxHxTxS, kv_cache = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(h_BxTxD), positions_BxT, mask_BxTxS, kv_cache, cache_index, is_global,
            need_probs=self.return_attention)
        if cfg.sandwich_norm:
            attn_out = Norm(cfg, name="attn_post_norm")(attn_out)
        gain = jnp.float32(cfg.residual_gain)      # γ = 1: eq. 5; γ < 1: a contractive identity path
        h_BxTxD = (h_BxTxD if cfg.residual_gain == 1 else gain * h_BxTxD) + attn_out.astype(jnp.float32)
        x = Norm(cfg, name="mlp_norm")(h_BxTxD)
        if cfg.n_experts:
            ffn_out, layer_aux = MoE(cfg, name="moe")(x)
            aux = aux + layer_aux
        else:
            ffn_out = Mlp(cfg, name="mlp")(x)
        if cfg.sandwich_norm:
            ffn_out = Norm(cfg, name="mlp_post_norm")(ffn_out)
        h_BxTxD = (h_BxTxD if cfg.residual_gain == 1 else gain * h_BxTxD) + ffn_out.astype(jnp.float32)
        h_BxTxD = constrain(h_BxTxD, "batch", None, None)
        sublayers = (attn_out.astype(jnp.float32), ffn_out.astype(jnp.float32)) if self.return_sublayers else None
        per_layer = (h_BxTxD, probs_BxHxTxS if self.return_attention else None, kv_cache, sublayers)
        return (h_BxTxD, aux), per_layer


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _rematerialised(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block` under `nn.remat` with the `ModelConfig.remat` policy ("none": unchanged)."""
    if remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)   # no CSE to guard inside a scan


class Transformer(nn.Module):
    config: ModelConfig
    return_attention: bool = False
    return_sublayers: bool = False
    last_logits_only: bool = False     # prefill: unembed only the last position ([B, 1, V])

    def setup(self) -> None:
        cfg = self.config
        self.embed = weight(self, "embed", normal_init(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                            ("vocab", "embed"))
        if cfg.pos_embedding == "learned":
            self.pos_embed = weight(self, "pos_embed", normal_init(cfg.init_std / 2), (cfg.max_seq_len, cfg.d_model),
                                    (None, "embed"))
        if not cfg.tie_embeddings:
            self.unembed = weight(self, "unembed", normal_init(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"))
        scanned = nn.scan(
            _rematerialised(Block, cfg.remat), variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0), length=cfg.n_layers)
        self.layers = scanned(cfg, self.return_attention, self.return_sublayers)
        self.final_norm = Norm(cfg)

    def token_embeddings(self, tokens_BxT: Array) -> Array:
        """E[x_t] (eq. 1 without positions), float32."""
        return jnp.take(self.embed, tokens_BxT, axis=0)

    def next_token_logits(self, h_BxTxD: Array) -> Array:
        """Eq. 6 on last-layer states: z_t = W_U FinalNorm(h_t^(L)) (Gemma 2: c·tanh(z / c)), float32 [B, T, V].

        Reads only the head (final_norm, embed or unembed), but the module's setup declares every
        top-level weight, so pass all params except "layers", e.g.
        `Transformer(cfg).apply({"params": top_level}, h, method=Transformer.next_token_logits)`.
        """
        cfg = self.config
        x = self.final_norm(h_BxTxD)
        w_unembed = self.embed.T if cfg.tie_embeddings else self.unembed
        logits_BxTxV = jnp.einsum("btd,dv->btv", x, w_unembed.astype(cfg.compute_dtype),
                                  preferred_element_type=jnp.float32)   # eq. 6: W_U h_t^(L)
        if cfg.logit_softcap is not None:                                   # Gemma 2: c·tanh(z / c)
            logits_BxTxV = cfg.logit_softcap * jnp.tanh(logits_BxTxV / cfg.logit_softcap)
        return constrain(logits_BxTxV, "batch", None, "vocab")

    def __call__(self, embeddings_BxTxD: Array, positions_BxT: Array, mask_BxTxS: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 kv_positions_BxS: Array | None = None):
        """kv_cache: stacked per-layer (k, v), each [L, B, S, N, K]; see `Attention`.

        kv_positions_BxS: the position of every key slot (default: positions_BxT, no cache);
        only a sliding-window model needs it, to build its local mask.
        """
        cfg = self.config
        h0 = embeddings_BxTxD.astype(jnp.float32)
        if cfg.scale_embeddings:
            h0 = h0 * jnp.float32(cfg.d_model ** 0.5)                         # Gemma: √D · E[x_t]
        if cfg.pos_embedding == "learned":
            h0 = h0 + jnp.take(self.pos_embed, positions_BxT, axis=0)       # eq. 1: E[x_t] + p_t
        local_mask = None
        if cfg.sliding_window is not None:
            kv_pos = positions_BxT if kv_positions_BxS is None else kv_positions_BxS
            local_mask = mask_BxTxS & window_mask(positions_BxT, kv_pos, cfg.sliding_window)
        layer_ids_L = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        (h_L, aux), (hidden_LxBxTxD, probs_LxBxHxTxS, new_cache, sublayers) = self.layers(
            (h0, jnp.zeros((), jnp.float32)), positions_BxT, mask_BxTxS, local_mask, cache_index, kv_cache,
            layer_ids_L)
        logits_BxTxV = self.next_token_logits(h_L[:, -1:] if self.last_logits_only else h_L)
        hidden = jnp.concatenate([h0[None], hidden_LxBxTxD], axis=0)
        if kv_cache is not None:
            return logits_BxTxV, new_cache
        return logits_BxTxV, hidden, probs_LxBxHxTxS, aux, sublayers


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """Everything one forward pass can report.

    logits_BxTxV: float32 next-token logits (eq. 6, τ = 1).
    hidden_states: [L+1, B, T, D], h^(0) (embeddings + positions) then every layer's
      residual stream h^(ℓ) before the final norm; None unless requested.
    attention_probs: [L, B, H, T, S], α(t,s) of eq. 3; None unless requested.
    moe_aux_loss: the summed load-balancing loss over layers (0 for dense models).
    attention_out / mlp_out: [L, B, T, D], what each layer's attention (W_O z_t, eq. 4) and
      feed-forward block add to the residual stream (eq. 5), float32; None unless requested.
      h^(ℓ) = h^(ℓ-1) + attention_out[ℓ-1] + mlp_out[ℓ-1] (with residual_gain γ:
      γ² h^(ℓ-1) + γ attention_out[ℓ-1] + mlp_out[ℓ-1]).
    moe_dropped_fraction: [L], the fraction of each layer's token→expert assignments that routed
      dispatch dropped for lack of capacity (`moe_impl="routed"`); None unless requested.
    """

    logits_BxTxV: Array
    hidden_states: Array | None
    attention_probs: Array | None
    moe_aux_loss: Array
    attention_out: Array | None = None
    mlp_out: Array | None = None
    moe_dropped_fraction: Array | None = None


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=["logits_BxTxV", "hidden_states", "attention_probs", "moe_aux_loss",
                              "attention_out", "mlp_out", "moe_dropped_fraction"],
    meta_fields=[])


def init_params(config: ModelConfig, key: Array) -> Params:
    """A fresh float32 parameter pytree for `config` (a plain nested dict)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(config).init(key, tokens, method=_embed_and_run)
    return unbox(variables["params"])


def declared_params(config: ModelConfig) -> Params:
    """The abstract parameter tree of `config`, every leaf an `nn.LogicallyPartitioned` holding a
    ShapeDtypeStruct and the logical axes its module declared (`layers.weight`). Allocates nothing."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda k: Transformer(config).init(k, tokens, method=_embed_and_run),
                               jax.random.PRNGKey(0))
    return variables["params"]


def unbox(tree: Any) -> Any:
    """Plain arrays from a tree of flax metadata boxes (no sharding constraint applied)."""
    return jax.tree_util.tree_map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                                  tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _embed_and_run(module: Transformer, tokens_BxT: Array):
    positions = jnp.zeros_like(tokens_BxT)
    return module(module.token_embeddings(tokens_BxT), positions, causal_mask(positions, positions))


def embed_tokens(config: ModelConfig, params: Params, tokens_BxT: Array) -> Array:
    """E[x_t], float32 [B, T, D]: the input to `forward(..., embeddings=...)`."""
    check_token_ids(config, tokens_BxT)
    # On a mesh: gather the table's FSDP split first (the lookup then splits rows like the batch).
    table_VxD = constrain(params["embed"], "vocab", None)
    return constrain(jnp.take(table_VxD, tokens_BxT, axis=0), "batch", None, None)


def apply_model(
    config: ModelConfig,
    params: Params,
    tokens: Array | None = None,
    *,
    embeddings: Array | None = None,
    positions: Array | None = None,
    attention_mask: Array | None = None,
    segment_ids: Array | None = None,
    return_hidden: bool = False,
    return_attention: bool = False,
    return_sublayers: bool = False,
    return_moe_stats: bool = False,
) -> ModelOutput:
    """Run eqs. 1–6 on tokens [B, T] or on input embeddings [B, T, D].

    Args:
      tokens: int token ids [B, T]; exactly one of tokens / embeddings.
      embeddings: E[x_t] [B, T, D] (positions are still added for learned p_t).
        Differentiate with respect to these for Jacobians (eq. 19).
      positions: int positions [B, T]; default 0..T-1. All must be < Δ.
      attention_mask: optional bool [B, T] marking real (non-pad) tokens; keys
        at pad positions are never attended to.
      segment_ids: optional int [B, T] for packed rows (`arlm.data.packing`): token t attends to
        key s only when both carry the same id, so no attention crosses a segment (with positions
        restarting at 0 in each segment, a packed row computes what its segments would alone).
      return_hidden / return_attention: also return h^(ℓ) and α(t,s).
      return_sublayers: also return each layer's attention and FFN outputs.
      return_moe_stats: also return each layer's dropped fraction under routed experts.
    """
    if (tokens is None) == (embeddings is None):
        raise ValueError("pass exactly one of tokens=[B, T] or embeddings=[B, T, D]")
    if tokens is not None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        embeddings = embed_tokens(config, params, tokens)
    elif embeddings.ndim != 3 or embeddings.shape[-1] != config.d_model:
        raise ValueError(f"embeddings must be [batch, time, d_model={config.d_model}], got {embeddings.shape}")
    b, t = embeddings.shape[:2]
    if positions is None:
        if t > config.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds the context window Δ = max_seq_len = {config.max_seq_len}; "
                "truncate the input (eq. 18)")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        if positions.shape != (b, t):
            raise ValueError(f"positions must have shape {(b, t)}, got {positions.shape}")
        _check_positions(config, positions)
    mask_BxTxS = causal_mask(positions, positions)
    if attention_mask is not None:
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask must have shape {(b, t)}, got {attention_mask.shape}")
        mask_BxTxS = mask_BxTxS & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must have shape {(b, t)}, got {segment_ids.shape}")
        mask_BxTxS = mask_BxTxS & same_segment(segment_ids)
    module = Transformer(config, return_attention=return_attention, return_sublayers=return_sublayers)
    dropped = None
    if return_moe_stats and config.n_experts and config.moe_impl == "routed":
        outputs, state = module.apply({"params": params}, embeddings, positions, mask_BxTxS, mutable=["intermediates"])
        dropped = state["intermediates"]["layers"]["moe"]["moe_dropped_fraction"][0]       # [L]
    else:
        outputs = module.apply({"params": params}, embeddings, positions, mask_BxTxS)
    logits, hidden, probs, aux, sublayers = outputs
    attn_out, mlp_out = sublayers if return_sublayers else (None, None)
    return ModelOutput(logits, hidden if return_hidden else None, probs, aux, attn_out, mlp_out, dropped)


def same_segment(segment_ids_BxT: Array) -> Array:
    """[B, T, T] True where query t and key s lie in the same packed segment."""
    return segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]


def forward(config: ModelConfig, params: Params, tokens: Array | None = None, **kwargs: Any) -> Array:
    """Next-token logits [B, T, V] in float32 (eqs. 1–6). See `apply_model` for options."""
    return apply_model(config, params, tokens, **kwargs).logits_BxTxV


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(config: ModelConfig, tokens: Array) -> None:
    """Integer ids in [0, vocab_size), else a TypeError/ValueError naming the offending range."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if _is_concrete(tokens) and tokens.size:
        tokens = np.asarray(tokens)
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token ids must be in [0, {config.vocab_size}); got min {lo}, max {hi}")


def _check_positions(config: ModelConfig, positions: Array) -> None:
    if _is_concrete(positions) and positions.size:
        positions = np.asarray(positions)
        hi = int(positions.max())
        if hi >= config.max_seq_len or int(positions.min()) < 0:
            raise ValueError(
                f"position {hi} is outside the context window [0, Δ = {config.max_seq_len}); "
                "truncate the input (eq. 18)")


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
