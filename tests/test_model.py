"""Tests of the model (eqs. 1–6) against an independent float64 NumPy reference.

The reference below (`ref_apply`) is written from the equation sheet alone: it
imports nothing from `arlm.model` and only reads the parameter dict, converted
to float64 NumPy arrays. Parameters are re-drawn at a scale where attention is
far from uniform and biases / norm scales are far from their zero / one
initialisation, so that a wrong bias, norm, RoPE layout or GQA head mapping
shows up as an O(1) discrepancy, not as noise.

Tolerances (float32 model vs float64 reference): every comparison checks
    max |arlm − ref| ≤ TOL_F32 · max(1, max |ref|),    TOL_F32 = 2e-5,
i.e. ~170 float32 ulps of the largest value; measured errors are ~1e-7..1e-6
relative (see the report of `test_matches_float64_reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params

import arlm
from arlm import ModelConfig

V, D, L, H, MAX_LEN = 37, 32, 2, 4, 12
T = 10
TOL_F32 = 2e-5          # float32 forward vs float64 reference, relative to the output scale
TOL_BF16 = 8e-2         # bfloat16 compute vs float32 compute, relative to the logit scale
PARAM_STD = 0.2         # std of re-drawn weight matrices (attention logits O(1))


def _families() -> dict[str, ModelConfig]:
    return {
        # GPT-2: learned positions, LayerNorm with bias, GELU(tanh) MLP with biases, tied W_U = Eᵀ.
        "gpt2": ModelConfig.gpt2(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=MAX_LEN),
        # Llama: RoPE, RMSNorm, SwiGLU, GQA with 2 kv heads for 4 query heads, untied unembedding.
        "llama_gqa": ModelConfig.llama(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=2,
                                       d_ff=48, max_seq_len=MAX_LEN, tie_embeddings=False),
        # Llama with a mixture of experts (4 experts, top-2) and a non-default RoPE base.
        "llama_moe": ModelConfig.llama(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=2,
                                       d_ff=24, max_seq_len=MAX_LEN, n_experts=4, moe_top_k=2,
                                       rope_theta=500.0),
    }


FAMILIES = _families()
FAMILY_NAMES = list(FAMILIES)


# ----------------------------------------------------------------------------------------------
# Parameters and inputs
# ----------------------------------------------------------------------------------------------

def _map_with_names(fn, tree, path=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _map_with_names(fn, v, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)



def random_tokens(seed: int, batch: int = 2, length: int = T) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(batch, length)), jnp.int32)


def to_np64(tree) -> dict:
    return _map_with_names(lambda _, x: np.array(x, np.float64), tree)   # writable copies


# ----------------------------------------------------------------------------------------------
# Independent float64 NumPy reference of eqs. 1–6
# ----------------------------------------------------------------------------------------------

def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_norm(config, p, x):
    if config.norm == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + config.norm_eps) * p["scale"] + p["bias"]
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.norm_eps) * p["scale"]


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_silu(x):
    return x / (1.0 + np.exp(-x))


def ref_rope(x, positions, theta, interleaved=False):
    """Hugging Face Llama RoPE on x [B, T, H, K]: inv_freq_i = θ^(−2i/K), angles [f, f], rotate_half."""
    k = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, k, 2, dtype=np.float64) / k)            # [K/2]
    f = positions[:, :, None].astype(np.float64) * inv_freq                     # [B, T, K/2]
    if interleaved:  # the *other* convention (pairs (x_2i, x_2i+1)); only used to show the test bites
        ang = np.repeat(f, 2, axis=-1)[:, :, None, :]
        rot = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    else:
        ang = np.concatenate([f, f], axis=-1)[:, :, None, :]
        rot = np.concatenate([-x[..., k // 2:], x[..., : k // 2]], axis=-1)   # rotate_half
    return x * np.cos(ang) + rot * np.sin(ang)


def ref_attention(config, p, x, positions, key_mask, variant=()):
    """Eqs. 2–4 head by head. Returns (output [B,T,D], α [B,H,T,S])."""
    b, t, d = x.shape
    nh, nkv = config.n_heads, config.n_kv_heads
    dk = d // nh
    group = nh // nkv
    q = np.einsum("btd,dhk->bthk", x, p["wq"])
    k = np.einsum("btd,dhk->bthk", x, p["wk"])
    v = np.einsum("btd,dhk->bthk", x, p["wv"])
    if config.use_bias:
        q, k, v = q + p["wq_bias"], k + p["wk_bias"], v + p["wv_bias"]
    if config.pos_embedding == "rope":
        inter = "interleaved_rope" in variant
        q = ref_rope(q, positions, config.rope_theta, inter)
        k = ref_rope(k, positions, config.rope_theta, inter)
    # eq. 3: only s ≤ t (by index), and only real (non-pad) keys.
    allowed = np.tril(np.ones((t, t), bool))[None] & key_mask[:, None, :]       # [B, T, S]
    out = np.zeros((b, t, d))
    probs = np.zeros((b, nh, t, t))
    for h in range(nh):
        kv = h % nkv if "gqa_modulo" in variant else h // group                   # GQA: head h → kv h // G
        scores = np.einsum("btk,bsk->bts", q[:, :, h], k[:, :, kv]) / math.sqrt(dk)  # eq. 2
        masked = np.where(allowed, scores, -np.inf)
        row_max = masked.max(-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        e = np.where(allowed, np.exp(masked - row_max), 0.0)
        denom = e.sum(-1, keepdims=True)
        alpha = e / np.where(denom > 0, denom, 1.0)                              # eq. 3
        z = np.einsum("bts,bsk->btk", alpha, v[:, :, kv])                       # eq. 4
        out += z @ p["wo"][h]                                                    # W_O, head block h
        probs[:, h] = alpha
    if config.use_bias:
        out = out + p["wo_bias"]
    return out, probs


def ref_ffn(config, p, x, expert=None):
    """GELU(tanh) MLP or SwiGLU; `expert` picks one expert of stacked MoE weights (no biases there)."""
    def w(name):
        return p[name] if expert is None else p[name][expert]

    def b(name):
        return p[name + "_bias"] if (config.use_bias and expert is None) else 0.0

    if config.mlp == "gelu":
        hidden = ref_gelu_tanh(x @ w("w_in") + b("w_in"))
    else:
        hidden = ref_silu(x @ w("w_gate") + b("w_gate")) * (x @ w("w_up") + b("w_up"))
    return hidden @ w("w_out") + b("w_out")


def ref_moe(config, p, x, routing=None):
    """Σ_e g_e FFN_e with top-k gating; Switch load-balancing loss E·Σ_e f_e P_e.

    With `routing` (a list), the chosen experts are appended to it instead of checking margins.
    """
    b, t, d = x.shape
    n, e_count, k = b * t, config.n_experts, config.moe_top_k
    xf = x.reshape(n, d)
    logits = xf @ p["router"]                                                   # [N, E]
    order = np.argsort(-logits, axis=-1, kind="stable")
    top = order[:, :k]
    # float32 must select the same experts: require a clear margin at the k-th place.
    srt = np.take_along_axis(logits, order, -1)
    if routing is not None:
        routing.append(np.sort(top, axis=-1))
    elif k < e_count:
        assert (srt[:, k - 1] - srt[:, k]).min() > 1e-4, "router top-k too close to a tie for a fair test"
    gates_k = ref_softmax(np.take_along_axis(logits, top, -1))                  # softmax over the k chosen
    gates = np.zeros((n, e_count))
    np.put_along_axis(gates, top, gates_k, -1)
    y = np.zeros((n, d))
    for e in range(e_count):
        y += gates[:, e:e + 1] * ref_ffn(config, p, xf, expert=e)
    f = np.bincount(top.ravel(), minlength=e_count) / (n * k)
    prob = ref_softmax(logits).mean(0)
    return y.reshape(b, t, d), e_count * np.sum(f * prob)


def ref_apply(config, params, tokens=None, *, embeddings=None, positions=None, key_mask=None,
              variant=(), routing=None):
    """Eqs. 1–6 in float64. Returns (logits, hidden [L+1,B,T,D], α [L,B,H,T,S], aux)."""
    p = params if isinstance(params.get("embed"), np.ndarray) else to_np64(params)
    if embeddings is None:
        embeddings = p["embed"][np.asarray(tokens)]                              # E[x_t]
    h = np.asarray(embeddings, np.float64)
    b, t, _ = h.shape
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    key_mask = np.ones((b, t), bool) if key_mask is None else np.asarray(key_mask, bool)
    if config.pos_embedding == "learned":
        h = h + p["pos_embed"][positions]                                        # eq. 1: + p_t
    hidden, probs, aux = [h], [], 0.0
    for layer in range(config.n_layers):
        lp = _map_with_names(lambda _, x: x[layer], p["layers"])
        a, alpha = ref_attention(config, lp["attn"], ref_norm(config, lp["attn_norm"], h), positions,
                                 key_mask, variant)
        h = h + a                                                                # eq. 5, pre-norm residual
        x = ref_norm(config, lp["mlp_norm"], h)
        if config.n_experts:
            y, layer_aux = ref_moe(config, lp["moe"], x, routing)
            aux += layer_aux
        else:
            y = ref_ffn(config, lp["mlp"], x)
        h = h + y
        hidden.append(h)
        probs.append(alpha)
    x = ref_norm(config, p["final_norm"], h)
    w_u = p["embed"].T if config.tie_embeddings else p["unembed"]
    return x @ w_u, np.stack(hidden), np.stack(probs), aux                      # eq. 6


def ref_loss(config, params, tokens, targets, **kw) -> float:
    logits = ref_apply(config, params, tokens, **kw)[0]
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    return float(np.mean(logz - picked))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def diff_stats(actual, ref):
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    abs_diff = float(np.max(np.abs(actual - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    return abs_diff, abs_diff / scale


def assert_close_scaled(actual, ref, tol, what=""):
    assert np.shape(actual) == np.shape(ref), (what, np.shape(actual), np.shape(ref))
    abs_diff, rel = diff_stats(actual, ref)
    assert rel <= tol, f"{what}: max|Δ|={abs_diff:.3e}, relative to scale {rel:.3e} > {tol:.1e}"
    return abs_diff, rel


def mean_xent(logits_BxTxV, targets_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1))


@functools.lru_cache(maxsize=None)
def _cached_params(name: str, seed: int = 0):
    return random_params(FAMILIES[name], seed, std=PARAM_STD)


@functools.lru_cache(maxsize=None)
def jit_apply(config: ModelConfig, return_hidden: bool = False, return_attention: bool = False):
    """apply_model jitted for one config (eager flax is slow on small CPUs); inputs are traced."""
    return jax.jit(functools.partial(arlm.apply_model, config, return_hidden=return_hidden,
                                     return_attention=return_attention))


def jit_forward(config, params, tokens=None, **kw):
    return jit_apply(config)(params, tokens, **kw).logits_BxTxV


# ----------------------------------------------------------------------------------------------
# 1. Agreement with the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_matches_float64_reference(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(1)
    out = jit_apply(cfg, True, True)(params, tokens)
    ref_logits, ref_hidden, ref_probs, ref_aux = ref_apply(cfg, params, tokens)

    assert out.logits_BxTxV.dtype == jnp.float32
    assert out.logits_BxTxV.shape == (2, T, V)
    assert out.hidden_states.shape == (L + 1, 2, T, D)
    assert out.attention_probs.shape == (L, 2, H, T, T)
    # The test is only meaningful if attention is far from uniform and logits are O(1).
    assert np.max(ref_probs[:, :, :, 1:]) > 0.5 and np.std(ref_logits) > 0.3

    stats = {
        "logits": assert_close_scaled(out.logits_BxTxV, ref_logits, TOL_F32, "logits"),
        "hidden": assert_close_scaled(out.hidden_states, ref_hidden, TOL_F32, "hidden_states"),
        "probs": assert_close_scaled(out.attention_probs, ref_probs, TOL_F32, "attention_probs"),
        "aux": assert_close_scaled(out.moe_aux_loss, ref_aux, TOL_F32, "moe_aux_loss"),
    }
    if not cfg.n_experts:
        assert float(out.moe_aux_loss) == 0.0
    else:
        assert float(out.moe_aux_loss) > 0.5 * cfg.n_layers  # ≈ 1 per layer for near-uniform routing
    print(f"\n{name}: " + ", ".join(f"{k} max|Δ|={a:.2e} rel={r:.2e}" for k, (a, r) in stats.items()))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_matches_reference_with_explicit_positions(name):
    """Positions other than 0..T-1 (learned p_t lookup and RoPE angles) follow the reference too."""
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(2, length=6)
    positions = jnp.asarray([[3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8, 11]], jnp.int32)
    logits = jit_forward(cfg, params, tokens, positions=positions)
    assert_close_scaled(logits, ref_apply(cfg, params, tokens, positions=np.asarray(positions))[0],
                        TOL_F32, "logits")


def test_reference_comparison_is_discriminative():
    """Plausible wrong conventions (interleaved RoPE, GQA head h → kv h mod N) miss by ≫ TOL_F32."""
    cfg, params = FAMILIES["llama_gqa"], _cached_params("llama_gqa")
    tokens = random_tokens(3)
    logits = np.asarray(jit_forward(cfg, params, tokens))
    for variant in ("interleaved_rope", "gqa_modulo"):
        wrong = ref_apply(cfg, params, tokens, variant=(variant,))[0]
        assert diff_stats(logits, wrong)[1] > 100 * TOL_F32, variant


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bfloat16_compute(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(4)
    cfg_bf16 = cfg.replace(dtype="bfloat16")
    out = jit_apply(cfg_bf16, True, True)(params, tokens)
    logits32 = jit_forward(cfg, params, tokens)
    assert out.logits_BxTxV.dtype == jnp.float32
    assert out.attention_probs.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out.logits_BxTxV)))
    abs_diff, rel = assert_close_scaled(out.logits_BxTxV, logits32, TOL_BF16, "bf16 vs f32 logits")
    assert rel > 0.0  # bfloat16 really was used
    # Params made for a bfloat16 config are still float32.
    fresh = jax.eval_shape(functools.partial(arlm.init_params, cfg_bf16), jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
    print(f"\n{name} bf16: max|Δ|={abs_diff:.2e} rel={rel:.2e}")


def test_init_params_layers_are_independent_and_scaled():
    cfg = FAMILIES["gpt2"].replace(n_layers=3)
    params = jax.jit(arlm.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    wq = np.asarray(params["layers"]["attn"]["wq"])
    assert wq.shape == (3, D, H, D // H)
    assert not np.allclose(wq[0], wq[1]) and not np.allclose(wq[1], wq[2])
    assert abs(wq.std() / cfg.init_std - 1) < 0.1
    assert np.all(np.asarray(params["layers"]["attn_norm"]["scale"]) == 1.0)
    assert arlm.count_params(params) == sum(x.size for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------
# 2. Causality
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_causality(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(5)
    base = np.asarray(jit_forward(cfg, params, tokens))
    for s in (0, 3, T - 1):
        changed = tokens.at[:, s].set((tokens[:, s] + 1) % V)
        logits = np.asarray(jit_forward(cfg, params, changed))
        np.testing.assert_array_equal(logits[:, :s], base[:, :s])   # the past is exactly untouched
        moved = np.any(logits[:, s:] != base[:, s:], axis=-1)      # [B, T - s]
        assert moved.all(), f"s={s}: some t ≥ s ignored the change: {moved}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_attention_probabilities_are_causal_distributions(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    probs = np.asarray(jit_apply(cfg, False, True)(params, random_tokens(6)).attention_probs)
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(probs[..., upper] == 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-6)
    assert np.all(probs >= 0.0)
    np.testing.assert_array_equal(probs[..., 0, 0], 1.0)   # the first token can only see itself


# ----------------------------------------------------------------------------------------------
# 3. Gradients
# ----------------------------------------------------------------------------------------------

def _sample_entries(params, rng, per_leaf=1):
    """(path, index) pairs: `per_leaf` random entries of every leaf."""
    entries = []

    def visit(path, x):
        for _ in range(per_leaf):
            entries.append((path, tuple(int(rng.integers(0, n)) for n in x.shape)))
        return x

    _map_with_names(visit, params)
    return entries


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# jax.grad (float32) vs central differences of the float64 reference (step 1e-6, error ~1e-10):
#   |g_arlm − g_fd| ≤ GRAD_TOL · max(1e-2, max |g_fd| over the sampled entries)  (measured ≤ 7e-7).
GRAD_TOL = 2e-5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_param_grad_matches_reference_finite_differences(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens, targets = random_tokens(7, length=6), random_tokens(8, length=6)
    grads = jax.jit(jax.grad(lambda p, x, y: mean_xent(arlm.forward(cfg, p, x), y)))(params, tokens, targets)
    p64 = to_np64(params)
    step = 1e-6
    got, want = [], []
    for path, idx in _sample_entries(p64, np.random.default_rng(9)):
        leaf = _get(p64, path)
        orig = leaf[idx]
        leaf[idx] = orig + step
        up = ref_loss(cfg, p64, tokens, targets)
        leaf[idx] = orig - step
        down = ref_loss(cfg, p64, tokens, targets)
        leaf[idx] = orig
        want.append((up - down) / (2 * step))
        got.append(float(np.asarray(_get(grads, path))[idx]))
    got, want = np.array(got), np.array(want)
    scale = max(1e-2, np.abs(want).max())
    err = np.abs(got - want).max()
    assert np.count_nonzero(np.abs(want) > 1e-4) >= len(want) // 2  # mostly non-trivial entries
    assert err <= GRAD_TOL * scale, f"max|Δg|={err:.3e}, scale {scale:.3e}"
    print(f"\n{name}: {len(want)} entries, max|Δg|={err:.2e}, rel={err / scale:.2e}")


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_embedding_grad_matches_reference_finite_differences(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens, targets = random_tokens(10, length=6), random_tokens(11, length=6)
    emb = arlm.embed_tokens(cfg, params, tokens)
    g = np.asarray(jax.jit(jax.grad(lambda e, p, y: mean_xent(arlm.forward(cfg, p, embeddings=e), y)))(
        emb, params, targets))
    emb64 = np.asarray(emb, np.float64)
    p64 = to_np64(params)
    rng = np.random.default_rng(12)
    step = 1e-6
    got, want = [], []
    for _ in range(8):
        idx = (int(rng.integers(2)), int(rng.integers(6)), int(rng.integers(D)))
        e_up, e_down = emb64.copy(), emb64.copy()
        e_up[idx] += step
        e_down[idx] -= step
        want.append((ref_loss(cfg, p64, None, targets, embeddings=e_up)
                     - ref_loss(cfg, p64, None, targets, embeddings=e_down)) / (2 * step))
        got.append(g[idx])
    got, want = np.array(got), np.array(want)
    scale = max(1e-2, np.abs(want).max())
    err = np.abs(got - want).max()
    assert err <= GRAD_TOL * scale, f"max|Δg|={err:.3e}, scale {scale:.3e}"


# Under jax_enable_x64 with float64 params, jax.grad vs central differences of arlm's own loss.
# arlm computes internally in float32 whatever the param dtype (norms, RoPE, scores, softmax
# and the logit matmul cast to float32 by design), so the loss carries float32 rounding
# (~1e-6 absolute) and the finite difference cannot be as tight as a float64 one. A fourth-order
# stencil with step 3e-2 on O(0.2) entries balances truncation and rounding (measured
# |Δg| ≤ 1.2e-4 · max|g|); we require |Δg| ≤ 1e-3 · max(1e-2, max|g|).
X64_GRAD_TOL = 1e-3


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_param_grad_finite_differences_x64(name):
    cfg = FAMILIES[name]
    tokens, targets = random_tokens(13, length=6), random_tokens(14, length=6)
    was_x64 = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        params = _map_with_names(lambda _, x: jnp.asarray(x, jnp.float64), _cached_params(name))
        value_and_grad = jax.jit(jax.value_and_grad(
            lambda p, x, y: mean_xent(arlm.forward(cfg, p, x), y).astype(jnp.float64)))

        def loss(p):
            return value_and_grad(p, tokens, targets)[0]

        grads = value_and_grad(params, tokens, targets)[1]
        assert _get(grads, ("embed",)).dtype == jnp.float64
        rng = np.random.default_rng(15)
        step = 3e-2
        p64 = to_np64(params)

        def routing_at(path, idx, delta):
            leaf = _get(p64, path)
            orig = leaf[idx]
            leaf[idx] = orig + delta
            routing = []
            ref_apply(cfg, p64, tokens, routing=routing)
            leaf[idx] = orig
            return np.stack(routing) if routing else None

        def routing_is_stable(path, idx):
            """MoE routing is piecewise constant: the stencil must not cross a top-k switch."""
            base = routing_at(path, idx, 0.0)
            return base is None or all(np.array_equal(base, routing_at(path, idx, m * step))
                                       for m in (-2, -1, 1, 2))

        got, want = [], []
        for path, idx in _sample_entries(params, rng, per_leaf=3 if cfg.n_experts else 2):
            if not routing_is_stable(path, idx):
                continue
            leaf = np.asarray(_get(params, path))

            def shifted(delta, path=path, idx=idx, leaf=leaf):
                new = dict(params)
                node = new
                for k in path[:-1]:
                    node[k] = dict(node[k])
                    node = node[k]
                moved = leaf.copy()
                moved[idx] += delta
                node[path[-1]] = jnp.asarray(moved)
                return float(loss(new))

            want.append((-shifted(2 * step) + 8 * shifted(step) - 8 * shifted(-step) + shifted(-2 * step))
                        / (12 * step))
            got.append(float(_get(grads, path)[idx]))
        got, want = np.array(got), np.array(want)
        assert len(want) >= 20
        scale = max(1e-2, np.abs(want).max())
        err = np.abs(got - want).max()
        assert err <= X64_GRAD_TOL * scale, f"max|Δg|={err:.3e}, scale {scale:.3e}"
        print(f"\n{name} x64: {len(want)} entries, max|Δg|={err:.2e}, rel={err / scale:.2e}")
    assert jax.config.jax_enable_x64 == was_x64


def test_grad_is_finite_with_fully_masked_rows():
    """Left padding makes rows with no allowed key; gradients through them must not be NaN."""
    cfg, params = FAMILIES["llama_gqa"], _cached_params("llama_gqa")
    tokens = random_tokens(16, length=6)
    mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
    grads = jax.jit(jax.grad(lambda p, x, m: mean_xent(arlm.forward(cfg, p, x, attention_mask=m), x)))(
        params, tokens, mask)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# 4. Embeddings as input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_from_embeddings_equals_forward_from_tokens(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(17)
    emb = arlm.embed_tokens(cfg, params, tokens)
    assert emb.shape == (2, T, D) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(params["embed"])[np.asarray(tokens)])
    np.testing.assert_array_equal(np.asarray(jit_forward(cfg, params, embeddings=emb)),
                                  np.asarray(jit_forward(cfg, params, tokens)))


# ----------------------------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------------------------

def test_errors():
    cfg, params = FAMILIES["gpt2"], _cached_params("gpt2")
    with pytest.raises(ValueError, match="context window"):
        arlm.forward(cfg, params, random_tokens(0, length=MAX_LEN + 1))
    with pytest.raises(ValueError, match="context window"):
        arlm.forward(cfg, params, embeddings=jnp.zeros((1, MAX_LEN + 1, D)))
    with pytest.raises(ValueError, match="context window"):
        jax.jit(arlm.forward, static_argnums=0)(cfg, params, random_tokens(0, length=MAX_LEN + 1))
    with pytest.raises(ValueError, match="context window"):
        arlm.forward(cfg, params, random_tokens(0, batch=1, length=3),
                     positions=jnp.asarray([[MAX_LEN - 2, MAX_LEN - 1, MAX_LEN]], jnp.int32))
    with pytest.raises(ValueError):
        arlm.forward(cfg, params, random_tokens(0, batch=1, length=2), positions=jnp.asarray([[-1, 0]]))
    for bad in (V, V + 5, -1):
        with pytest.raises(ValueError, match="token ids"):
            arlm.forward(cfg, params, jnp.asarray([[0, bad, 1]], jnp.int32))
    with pytest.raises(ValueError, match="token ids"):
        arlm.embed_tokens(cfg, params, jnp.asarray([[V]], jnp.int32))
    tokens = random_tokens(0)
    with pytest.raises(ValueError, match="exactly one"):
        arlm.forward(cfg, params, tokens, embeddings=arlm.embed_tokens(cfg, params, tokens))
    with pytest.raises(ValueError, match="exactly one"):
        arlm.forward(cfg, params)
    # A full context window (T = Δ) is fine.
    assert jax.eval_shape(functools.partial(arlm.forward, cfg), params,
                          random_tokens(0, length=MAX_LEN)).shape == (2, MAX_LEN, V)


# ----------------------------------------------------------------------------------------------
# 6. jit and attention masks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_jit_matches_eager(name):
    cfg, params = FAMILIES[name], _cached_params(name)
    tokens = random_tokens(18)
    eager = arlm.apply_model(cfg, params, tokens, return_hidden=True, return_attention=True)
    jitted_fn = jax.jit(functools.partial(arlm.apply_model, cfg, return_hidden=True, return_attention=True))
    jitted = jitted_fn(params, tokens)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # The config is a static argument of jit.
    fwd = jax.jit(arlm.forward, static_argnums=0)
    np.testing.assert_allclose(np.asarray(fwd(cfg, params, tokens)), np.asarray(eager.logits_BxTxV),
                               rtol=1e-5, atol=1e-5)


def test_jit_with_closed_over_concrete_inputs():
    """A jitted loss that closes over a concrete batch (the usual loss-factory pattern) must trace.

    Concrete arrays captured by a jitted function are staged, so the range checks on token ids
    and positions cannot read their values there and must be skipped (or done with NumPy).
    """
    cfg, params = FAMILIES["llama_gqa"], _cached_params("llama_gqa")
    tokens = random_tokens(20)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    eager = np.asarray(jit_forward(cfg, params, tokens))
    jitted = jax.jit(lambda p: arlm.forward(cfg, p, tokens))(params)
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda p, x: arlm.forward(cfg, p, x, positions=positions))(params, tokens)
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_attention_mask_padding(name):
    """Pad keys get exactly zero probability; left-padded rows reproduce the unpadded logits."""
    cfg, params = FAMILIES[name], _cached_params(name)
    n_pad, n_real = 3, 6
    real = random_tokens(19, batch=1, length=n_real)
    pad = jnp.zeros((1, n_pad), jnp.int32)
    tokens = jnp.concatenate([jnp.concatenate([pad, real], axis=1),                 # left padding
                              jnp.concatenate([real, pad], axis=1)], axis=0)       # right padding
    mask = jnp.asarray([[False] * n_pad + [True] * n_real, [True] * n_real + [False] * n_pad])
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    out = jit_apply(cfg, False, True)(params, tokens, positions=positions, attention_mask=mask)
    probs = np.asarray(out.attention_probs)                                          # [L, B, H, T, S]
    mask_np = np.asarray(mask)
    for b in range(2):
        assert np.all(probs[:, b][..., ~mask_np[b]] == 0.0)                      # pad keys: exactly 0
        np.testing.assert_allclose(probs[:, b][:, :, mask_np[b]].sum(-1), 1.0, atol=1e-6)
    alone = np.asarray(jit_forward(cfg, params, real))[0]
    logits = np.asarray(out.logits_BxTxV)
    assert_close_scaled(logits[0, n_pad:], alone, TOL_F32, "left-padded logits")
    assert_close_scaled(logits[1, :n_real], alone, TOL_F32, "right-padded logits")
    # And the reference with the same key mask agrees on the real rows.
    ref = ref_apply(cfg, params, tokens, positions=np.asarray(positions), key_mask=mask_np)[0]
    assert_close_scaled(logits[0, n_pad:], ref[0, n_pad:], TOL_F32, "reference, left padding")
    assert_close_scaled(logits[1, :n_real], ref[1, :n_real], TOL_F32, "reference, right padding")
