"""Language-modelling losses: pretraining (eq. 7) and SFT on response tokens (eq. 8).

Pretraining reads {"inputs", "targets"} token batches. SFT reads the one sequence-batch format of
`arlm.model.log_probs` (tokens, positions, attention, response_mask; optional per-row "weights"),
the format rollouts, preference pairs and `TaskIO.sft_batch` produce, and `response_nll` is the one
implementation of eq. 8: `sft_loss` here and the `SFT`/`RSFT` estimators of eq. 9 both call it.
Both losses are built as `loss_fn(params, batch) -> (loss, metrics)`, the shape every objective in
arlm takes so that one generic train step serves them all.

`pretrain_loss(..., logits_chunk=c)` is the same loss with less memory: the head (final norm, W_U,
log-softmax) runs c positions at a time and its gradient is taken inside the forward pass, so one
[B, c, V] block of logits is live instead of the whole [B, T, V] and its gradient (`chunked_mean_nll`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from arlm.config import ModelConfig
from arlm.model import apply_model
from arlm.model.log_probs import SEQUENCE_KEYS, PolicyOutputs, policy_outputs, token_log_probs
from arlm.model.transformer import Transformer

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Batch], tuple[Array, dict[str, Array]]]


def masked_mean_nll(logp_BxT: Array, mask_BxT: Array | None) -> tuple[Array, Array]:
    """Mean negative log-likelihood over the tokens where mask is 1, and their count."""
    if mask_BxT is None:
        return -jnp.mean(logp_BxT), jnp.asarray(logp_BxT.size, jnp.float32)
    mask = mask_BxT.astype(jnp.float32)
    n_tokens = jnp.sum(mask)
    return -jnp.sum(logp_BxT * mask) / jnp.maximum(n_tokens, 1.0), n_tokens


def pretrain_loss(config: ModelConfig, params: Any, batch: Batch, *,
                  logits_chunk: int = 0) -> tuple[Array, dict[str, Array]]:
    """Eq. 7: L_PT(θ) = −(1/N) Σ_t log p_θ(x_{t+1} | x_{≤t}), plus the MoE load-balancing loss.

    batch: {"inputs": int[B, T], "targets": int[B, T]} with targets the inputs shifted by one.
    logits_chunk: 0 (default) forms the whole [B, T, V] logits; c > 0 (dividing T, or ≥ T: one chunk) the
    same loss and gradient, to float32 rounding, from c positions at a time (`chunked_mean_nll`).
    """
    if "loss_mask" in batch or "response_mask" in batch:
        raise ValueError("pretrain_loss (eq. 7) scores every token; for eq. 8 use sft_loss on a sequence batch")
    if logits_chunk:
        out = apply_model(config, params, batch["inputs"], return_hidden=True)
        nll = chunked_mean_nll(config, params, out.hidden_states[-1], batch["targets"], logits_chunk)
        n_tokens = jnp.asarray(batch["targets"].size, jnp.float32)
    else:
        out = apply_model(config, params, batch["inputs"])
        logp_BxT = token_log_probs(out.logits_BxTxV, batch["targets"])
        nll, n_tokens = masked_mean_nll(logp_BxT, None)
    loss = nll + config.moe_aux_weight * out.moe_aux_loss if config.n_experts else nll
    return loss, {"nll": nll, "moe_aux": out.moe_aux_loss, "tokens": n_tokens}


def chunked_mean_nll(config: ModelConfig, params: Any, h_BxTxD: Array, targets_BxT: Array, chunk: int) -> Array:
    """−(1/BT) Σ log p_θ(targets | h), the eq. 7 mean of `token_log_probs(forward(...))`, from the last
    layer's residual stream h (before the final norm), `chunk` positions at a time.

    The head (`Transformer.next_token_logits`: final norm, W_U, softcap) and its gradient are computed
    together, chunk by chunk, in the forward pass (a custom VJP whose backward only scales them by the
    incoming cotangent): one [B, chunk, V] block of logits and its gradient are live at a time and
    nothing is recomputed. Differentiable once.
    """
    b, t, d = h_BxTxD.shape
    chunk = min(chunk, t)
    if chunk <= 0 or t % chunk:
        raise ValueError(f"logits_chunk={chunk} must be a positive divisor of the sequence length {t} (or ≥ it)")
    # Every top-level weight but the layers: what `next_token_logits` reads, plus the embeddings its module
    # declares in setup (an untied embed, learned positions), whose gradient from the head is 0.
    head_params = {k: v for k, v in params.items() if k != "layers"}
    n_tokens = b * t

    def split(h: Array, targets: Array) -> tuple[Array, Array]:
        """[B, T, ...] → [T/c, B, c, ...]: the chunks, scanned over their leading axis."""
        return (jnp.swapaxes(h.reshape(b, t // chunk, chunk, d), 0, 1),
                jnp.swapaxes(targets.reshape(b, t // chunk, chunk), 0, 1))

    def chunk_nll_sum(hp: dict[str, Any], h_BxCxD: Array, targets_BxC: Array) -> Array:
        logits_BxCxV = Transformer(config).apply({"params": hp}, h_BxCxD, method=Transformer.next_token_logits)
        return -jnp.sum(token_log_probs(logits_BxCxV, targets_BxC))

    def value_and_grads(hp: dict[str, Any], h: Array, targets: Array) -> tuple[Array, tuple[Any, Array]]:
        grad_fn = jax.value_and_grad(chunk_nll_sum, argnums=(0, 1))

        def body(carry: tuple[Array, Any], xs: tuple[Array, Array]) -> tuple[tuple[Array, Any], Array]:
            total, g_hp = carry
            nll_sum, (g_hp_c, g_h_BxCxD) = grad_fn(hp, *xs)
            return (total + nll_sum, jax.tree_util.tree_map(jnp.add, g_hp, g_hp_c)), g_h_BxCxD

        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, hp))
        (total, g_hp), g_h_NxBxCxD = jax.lax.scan(body, zeros, split(h, targets))
        g_h_BxTxD = jnp.swapaxes(g_h_NxBxCxD, 0, 1).reshape(b, t, d)
        scale = jnp.float32(1.0 / n_tokens)
        return total * scale, jax.tree_util.tree_map(lambda g: g * scale, (g_hp, g_h_BxTxD))

    @jax.custom_vjp
    def mean_nll(hp: dict[str, Any], h: Array, targets: Array) -> Array:     # undifferentiated: values only
        sums_N = jax.lax.map(lambda xs: chunk_nll_sum(hp, *xs), split(h, targets))
        return jnp.sum(sums_N) / jnp.float32(n_tokens)

    def bwd(grads: tuple[Any, Array], g: Array) -> tuple[Any, Array, None]:
        g_hp, g_h = grads
        return jax.tree_util.tree_map(lambda x: (g * x).astype(x.dtype), g_hp), (g * g_h).astype(g_h.dtype), None

    mean_nll.defvjp(value_and_grads, bwd)     # forward: the value, and its gradients as residuals
    return mean_nll(head_params, h_BxTxD, targets_BxT)


def response_nll(out: PolicyOutputs, weights_B: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Eq. 8: −Σ_t m_t log π_θ(y_t | x, y_<t) / Σ_t m_t over the response mask m (rows weighted by
    `weights_B` if given: RSFT's keep mask), and the number of scored tokens."""
    mask_BxT = out.mask_BxT if weights_B is None else out.mask_BxT * weights_B[:, None]
    nll, n_tokens = masked_mean_nll(out.logp_BxT, mask_BxT)
    return nll, {"tokens": n_tokens}


def sft_loss(config: ModelConfig, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Eq. 8 on a sequence batch (`arlm.model.log_probs`): the eq. 7 sum restricted to the response."""
    missing = set(SEQUENCE_KEYS) - set(batch)
    if missing:
        raise KeyError(f"SFT (eq. 8) needs a sequence batch; missing {sorted(missing)} "
                       f"(build one with arlm.model.log_probs.sequence_batch)")
    return response_nll(policy_outputs(config, params, batch), batch.get("weights"))


def make_lm_loss(config: ModelConfig, kind: str = "pretrain") -> LossFn:
    """`loss_fn(params, batch)` for eq. 7 ("pretrain") or eq. 8 ("sft")."""
    fns = {"pretrain": pretrain_loss, "sft": sft_loss}
    if kind not in fns:
        raise ValueError(f"unknown LM loss {kind!r}; expected one of {sorted(fns)}")
    fn = fns[kind]
    return lambda params, batch: fn(config, params, batch)
