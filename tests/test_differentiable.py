"""Tests of differentiating through sampling (`arlm/inference/differentiable.py`).

1. Score function (REINFORCE). With V = 3 and N = 3 there are 27 completions, so
   ∇_θ E_{y~π_θ}[f(y)] = ∇_θ Σ_y π_θ(y|x) f(y) is computed exactly by enumeration. The
   identity Σ_y π f ∇log π = that gradient must hold to float32 precision, and the Monte-Carlo
   estimate ∇ reinforce_surrogate(sequence_log_prob(samples), f) over samples of `arlm.generate`
   must converge to it at the rate its exact variance predicts (also computed by enumeration):
   rms relative error = σ / (√n ‖∇J‖), σ² = Σ_y π(y) ‖(f(y) − b) ∇log π(y) − ∇J‖².
2. `sequence_log_prob` = Σ_t of `generate`'s per-step log-probs (KV-cache path, left-padded
   prompts, EOS masking) = a float64 NumPy log-softmax of `arlm.forward`'s logits.
3. `relaxed_rollout`: soft-mode gradients w.r.t. params and prompt embeddings against central
   finite differences; hard (straight-through) mode forward values are one-hot Gumbel-max
   samples of the model, consistent with `arlm.forward`, with finite non-zero gradients.
4. Jacobians of `rollout_hidden_states` and `relaxed_rollout` w.r.t. the prompt embeddings:
   jacfwd = jacrev = finite differences, and causality (∂h_t/∂h_s^(0) = 0 exactly for t < s).

Precision. The model is float32 inside whatever the input dtype: the compute dtype is float32
(or bfloat16), the embeddings are cast to float32 and the norms, softmaxes and logits are float32;
under `jax.enable_x64` float64 inputs make at most the residual stream float64 (and
`relaxed_rollout` does not run under x64 at all: the KV-cache update mixes int64/int32 indices).
Finite differences are therefore taken of float32 functions, with a 6th-order central stencil so
that a large step h = 3e-2 can be used: the truncation error O(h⁶) is negligible and the rounding
error ≈ δ/h (δ ≈ 1e-6, the float32 noise of the objective) ≈ 3e-5. Tolerances below are stated
against that noise floor; measured errors are printed with `pytest -s`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params
from jax.flatten_util import ravel_pytree

import arlm
from arlm import ModelConfig, Sampler
from arlm.inference.differentiable import (reinforce_surrogate, relaxed_rollout, rollout_hidden_states,
                                           sequence_log_prob)

D, L, H, MAX_LEN = 16, 2, 2, 16

MODELS = {
    # Llama family (RoPE, RMSNorm, SwiGLU, untied head), V = 3: 3^3 = 27 completions to enumerate.
    "llama": (ModelConfig.llama(vocab_size=3, d_model=D, n_layers=L, n_heads=H, d_ff=32, max_seq_len=MAX_LEN,
                                tie_embeddings=False), 0.2),
    # GPT-2 family (learned positions, LayerNorm, biases, GELU, tied head), V = 4.
    "gpt2": (ModelConfig.gpt2(vocab_size=4, d_model=D, n_layers=L, n_heads=H, max_seq_len=MAX_LEN), 0.3),
}

# 6th-order central difference: f'(x) ≈ Σ_k c_k (f(x + k h) − f(x − k h)) / h, error O(h⁶).
STENCIL = ((1, 45 / 60), (2, -9 / 60), (3, 1 / 60))
FD_STEP = 3e-2



@functools.lru_cache(maxsize=None)
def model(name: str):
    config, std = MODELS[name]
    return config, random_params(config, seed=list(MODELS).index(name), std=std)


_slp = jax.jit(sequence_log_prob, static_argnums=0)
_forward = jax.jit(arlm.forward, static_argnums=0)
_rollout = jax.jit(relaxed_rollout, static_argnums=(0, 4), static_argnames="hard")   # tau is traced


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def rel_norm_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def rel_max_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def fd_err(fd, ref) -> float:
    """‖fd − ref‖ / max(1, ‖ref‖): relative, with an absolute floor for the float32 noise of O(1) outputs."""
    fd, ref = np.asarray(fd, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(fd - ref) / max(1.0, float(np.linalg.norm(ref))))


def central_diff(fun, x, index: int, h: float = FD_STEP) -> np.ndarray:
    """∂fun/∂x.ravel()[index] by the 6th-order stencil (fun: array → array, evaluated in float32)."""
    flat_x = x.ravel()

    def at(d):
        return np.asarray(fun(flat_x.at[index].add(d).reshape(x.shape)), np.float64)

    return sum(c * (at(k * h) - at(-k * h)) for k, c in STENCIL) / h


def directional_diff(fun, x, direction, h: float = FD_STEP) -> np.ndarray:
    """d/dε fun(x + ε·direction) at ε = 0 by the same stencil."""
    def at(d):
        return np.asarray(fun(x + d * direction), np.float64)

    return sum(c * (at(k * h) - at(-k * h)) for k, c in STENCIL) / h


# ----------------------------------------------------------------------------------------------
# 1. Score-function gradient against exact enumeration
# ----------------------------------------------------------------------------------------------

ENUM_PROMPT = (1, 2)
ENUM_N = 3
REWARD_OFFSET = 2.0     # E f ≈ 2 vs a spread of 1: the baseline b = E f cuts σ by ~40%
CHUNK = 2500            # samples per generate/grad call (one compiled shape)
N_SMALL, N_LARGE = 2500, 50000


def _expected_reward(params, prompts, ys, f):
    return jnp.sum(jnp.exp(sequence_log_prob(model("llama")[0], params, prompts, ys)) * f)


def _surrogate(params, prompts, ys, reward, baseline):
    return reinforce_surrogate(sequence_log_prob(model("llama")[0], params, prompts, ys), reward, baseline)


_exact_grad = jax.jit(jax.grad(_expected_reward))
_surrogate_grad = jax.jit(jax.grad(_surrogate))


@functools.lru_cache(maxsize=None)
def enumeration():
    """All V^N completions (lexicographic: index = Σ_t y_t V^(N-1-t)), a random reward table, π and ∇J."""
    config, params = model("llama")
    v = config.vocab_size
    ys = jnp.asarray(list(itertools.product(range(v), repeat=ENUM_N)), jnp.int32)
    prompts = jnp.broadcast_to(jnp.asarray([ENUM_PROMPT], jnp.int32), (len(ys), len(ENUM_PROMPT)))
    reward = jnp.asarray(REWARD_OFFSET + np.random.default_rng(7).standard_normal(len(ys)), jnp.float32)
    pi = np.exp(np.asarray(_slp(config, params, prompts, ys), np.float64))
    grad_j = flat(_exact_grad(params, prompts, ys, reward))
    # Per-sequence score vectors ∇log π(y): rows of the Jacobian of the 27 log-probs.
    jac = jax.jit(jax.jacrev(lambda p: sequence_log_prob(config, p, prompts, ys)))(params)
    scores = np.concatenate([np.asarray(x, np.float64).reshape(len(ys), -1)
                             for x in jax.tree_util.tree_leaves(jac)], axis=1)
    return dict(params=params, ys=ys, prompts=prompts, reward=reward, pi=pi, grad_j=grad_j, scores=scores)


def seq_index(tokens_BxN) -> np.ndarray:
    v = model("llama")[0].vocab_size
    return np.asarray(tokens_BxN) @ (v ** np.arange(ENUM_N - 1, -1, -1))


def test_enumeration_score_function_identity():
    """Σ_y π(y) (f(y) − b) ∇log π(y) = ∇ Σ_y π(y) f(y) for any constant b, to float32 precision."""
    e = enumeration()
    pi, f, g = e["pi"], np.asarray(e["reward"], np.float64), e["grad_j"]
    assert abs(pi.sum() - 1.0) < 1e-5
    assert pi.min() > 1e-3 and pi.max() < 0.5                    # a spread, non-degenerate policy
    assert np.linalg.norm(g) > 0.1

    # From the per-sequence scores: Σ π f ∇log π, and Σ π ∇log π = ∇ Σ π = 0.
    err_scores = rel_norm_err(pi @ (f[:, None] * e["scores"]), g)
    zero_mean = np.linalg.norm(pi @ e["scores"]) / np.linalg.norm(e["scores"][np.argmax(pi)])
    # Through reinforce_surrogate: mean_y of (K π f − K π b) log π over the K enumerated sequences.
    k = len(pi)
    weights = jnp.asarray(k * pi, jnp.float32)
    b = float(pi @ f)
    errs = {}
    for name, baseline in (("b=0", weights * 0.0), ("b=E f", weights * b)):
        g_sur = flat(_surrogate_grad(e["params"], e["prompts"], e["ys"], weights * e["reward"], baseline))
        errs[name] = rel_norm_err(g_sur, g)
    print(f"\nidentity: scores {err_scores:.2e}, surrogate {errs}, |Σ π ∇log π| / |∇log π| = {zero_mean:.2e}")
    assert err_scores < 1e-5
    assert zero_mean < 1e-5
    assert max(errs.values()) < 1e-5
    # The advantage is a constant to the gradient: none flows into the reward or the baseline.
    g_r, g_b = jax.grad(reinforce_surrogate, argnums=(1, 2))(jnp.log(weights), e["reward"], jnp.float32(b))
    assert not np.asarray(g_r).any() and float(g_b) == 0.0


def test_reinforce_estimate_converges_to_exact_gradient():
    """The REINFORCE estimate from `arlm.generate` samples (τ = 1) is unbiased: its relative error is within
    3× the rms error σ/(√n‖∇J‖) predicted from the exact per-sample variance, and shrinks with n."""
    config, _ = model("llama")
    e = enumeration()
    params, pi, f, g = e["params"], e["pi"], np.asarray(e["reward"], np.float64), e["grad_j"]
    b_exact = float(pi @ f)
    baselines = {"none": 0.0, "E f": b_exact}
    sigma = {}
    for name, b in baselines.items():
        per_sample = (f - b)[:, None] * e["scores"]
        sigma[name] = float(np.sqrt(pi @ np.sum(np.square(per_sample - g[None, :]), axis=1)))

    prompts = np.tile(np.asarray([ENUM_PROMPT], np.int32), (CHUNK, 1))
    key = jax.random.PRNGKey(2024)
    sums = {name: np.zeros_like(g) for name in baselines}
    counts = np.zeros(len(pi))
    errors: dict[str, dict[int, float]] = {name: {} for name in baselines}
    for i in range(N_LARGE // CHUNK):
        out = arlm.generate(config, params, prompts, key=jax.random.fold_in(key, i), max_new_tokens=ENUM_N,
                            sampler=Sampler(temperature=1.0))
        tokens = out.tokens_BxN
        idx = seq_index(tokens)
        counts += np.bincount(idx, minlength=len(pi))
        reward = e["reward"][idx]
        for name, b in baselines.items():
            sums[name] += flat(_surrogate_grad(params, jnp.asarray(prompts), tokens, reward, b))
            n = (i + 1) * CHUNK
            if n in (N_SMALL, 10000, N_LARGE):
                errors[name][n] = rel_norm_err(sums[name] / (i + 1), g)     # equal chunks: mean of means

    predicted = {name: {n: s / (np.sqrt(n) * np.linalg.norm(g)) for n in errors[name]}
                 for name, s in sigma.items()}
    print("\nREINFORCE relative error (measured / predicted rms):")
    for name in baselines:
        print(f"  baseline {name:5s}: " + ", ".join(
            f"n={n}: {errors[name][n]:.4f} / {predicted[name][n]:.4f}" for n in errors[name]))

    # The samples are draws from π (temperature 1, no truncation): every frequency within 5 standard errors.
    freq = counts / N_LARGE
    z = np.abs(freq - pi) / np.sqrt(pi * (1 - pi) / N_LARGE)
    print(f"  sample frequencies: max |freq − π| / s.e. = {z.max():.2f}")
    assert z.max() < 5.0

    assert sigma["E f"] < 0.7 * sigma["none"]                  # the baseline removes the offset's variance
    for name in baselines:
        for n in (N_SMALL, N_LARGE):
            assert errors[name][n] < 3.0 * predicted[name][n], (name, n)
        assert errors[name][N_LARGE] < errors[name][N_SMALL]
    assert errors["E f"][N_LARGE] < 0.1
    assert errors["E f"][N_LARGE] < 0.5 * errors["E f"][N_SMALL]     # √20 ≈ 4.5 fewer expected


# ----------------------------------------------------------------------------------------------
# 2. sequence_log_prob = Σ generate's per-step log-probs = float64 reference
# ----------------------------------------------------------------------------------------------

TOL_LOGP = 1e-5     # float32, relative to max(1, |log π|); measured ~1e-7


@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_log_prob_matches_generate_and_float64(name):
    config, params = model(name)
    v = config.vocab_size
    b, p, n = 64, 3, 6
    rng = np.random.default_rng(11)
    prompts = rng.integers(0, v, size=(b, p)).astype(np.int32)
    for eos in (None, 0):
        out = arlm.generate(config, params, prompts, key=jax.random.PRNGKey(5), max_new_tokens=n,
                            sampler=Sampler(temperature=1.0), eos_id=eos)
        tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
        mask = np.arange(n)[None, :] < lengths[:, None]
        if eos is None:
            assert mask.all()
        else:
            assert (~mask).any() and mask.all(axis=1).any()       # some rows stopped early, some did not
        logp = np.asarray(_slp(config, params, jnp.asarray(prompts), jnp.asarray(tokens),
                               None if eos is None else jnp.asarray(mask)), np.float64)

        # float64 reference from the full-sequence logits: log-softmax at positions P-1 … P+N-2.
        seq = np.concatenate([prompts, tokens], axis=1)
        logits = np.asarray(_forward(config, params, jnp.asarray(seq)), np.float64)[:, p - 1:-1]
        logits = logits - logits.max(-1, keepdims=True)
        ref_lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ref_steps = np.take_along_axis(ref_lp, tokens[..., None], -1)[..., 0] * mask
        gen_steps = np.asarray(out.log_probs_BxN, np.float64)

        err_ref = rel_max_err(logp, ref_steps.sum(1))
        err_gen = rel_max_err(logp, gen_steps.sum(1))
        err_steps = rel_max_err(gen_steps, ref_steps)
        print(f"\n{name} eos={eos}: |slp − float64| {err_ref:.1e}, |slp − Σ generate| {err_gen:.1e}, "
              f"per-step generate vs float64 {err_steps:.1e}")
        assert err_ref < TOL_LOGP and err_gen < TOL_LOGP and err_steps < TOL_LOGP

        if eos is not None:   # tokens after the stop do not enter: scramble them, the value is unchanged
            scrambled = np.where(mask, tokens, rng.integers(0, v, size=tokens.shape)).astype(np.int32)
            logp2 = np.asarray(_slp(config, params, jnp.asarray(prompts), jnp.asarray(scrambled), jnp.asarray(mask)))
            np.testing.assert_allclose(logp2, logp, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. Relaxed (Gumbel-softmax) rollout
# ----------------------------------------------------------------------------------------------

RR_B, RR_P, RR_N = 2, 3, 4
RR_KEY = jax.random.PRNGKey(7)
# FD vs AD for one parameter entry: |fd − ad| ≤ FD_ATOL + FD_RTOL·|ad|. The float32 objective (Σ of
# 32 terms of size ~1) has rounding noise δ ~ 1e-6, so the 6th-order stencil at h = 3e-2 has
# |error| ≈ 1.2 δ / h ~ 4e-5 (measured max ~2e-5..1.5e-4); a wrong gradient is off by O(|ad|).
FD_ATOL, FD_RTOL = 5e-4, 1e-3


def _rollout_objective(config, params, emb, key, r, tau, hard):
    y, _ = relaxed_rollout(config, params, emb, key, r.shape[1], tau=tau, hard=hard)
    return jnp.sum(y * r)


_rr_obj = jax.jit(_rollout_objective, static_argnums=0, static_argnames="hard")
_rr_grad = jax.jit(jax.grad(_rollout_objective, argnums=(1, 2)), static_argnums=0, static_argnames="hard")


@functools.lru_cache(maxsize=None)
def rollout_problem():
    config, params = model("gpt2")
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, size=(RR_B, RR_P)), jnp.int32)
    emb = arlm.embed_tokens(config, params, prompt)
    r = jnp.asarray(rng.standard_normal((RR_B, RR_N, config.vocab_size)), jnp.float32)
    return config, params, prompt, emb, r


def _gumbels(key, steps, shape):
    """The noise relaxed_rollout draws: step t uses jax.random.gumbel(split(key, steps)[t], [B, V])."""
    return np.stack([np.asarray(jax.random.gumbel(k, shape, jnp.float32)) for k in jax.random.split(key, steps)], 1)


def test_relaxed_rollout_soft_gradients_match_finite_differences():
    config, params, _, emb, r = rollout_problem()
    tau = 0.7
    grad_p, grad_e = _rr_grad(config, params, emb, RR_KEY, r, tau, hard=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = jax.tree_util.tree_leaves(grad_p)
    rng = np.random.default_rng(0)
    worst, worst_rel, n_checked = 0.0, 0.0, 0
    for j, ((path, leaf), g_leaf) in enumerate(zip(leaves, grad_leaves)):
        values = [x for _, x in leaves]

        def obj_of_leaf(new_leaf, j=j, values=values):
            values = list(values)
            values[j] = new_leaf
            return _rr_obj(config, jax.tree_util.tree_unflatten(treedef, values), emb, RR_KEY, r, tau, hard=False)

        for i in rng.choice(leaf.size, size=min(2, leaf.size), replace=False):
            ad = float(np.asarray(g_leaf).ravel()[i])
            fd = float(central_diff(obj_of_leaf, leaf, int(i)))
            err = abs(fd - ad)
            worst, worst_rel, n_checked = max(worst, err), max(worst_rel, err / max(abs(ad), 1e-3)), n_checked + 1
            assert err <= FD_ATOL + FD_RTOL * abs(ad), (jax.tree_util.keystr(path), int(i), ad, fd)
    for i in rng.choice(emb.size, size=8, replace=False):
        ad = float(np.asarray(grad_e).ravel()[i])
        fd = float(central_diff(lambda x: _rr_obj(config, params, x, RR_KEY, r, tau, hard=False), emb, int(i)))
        err = abs(fd - ad)
        worst, n_checked = max(worst, err), n_checked + 1
        assert err <= FD_ATOL + FD_RTOL * abs(ad), ("prompt embeddings", int(i), ad, fd)
    scale = max(np.abs(flat(grad_p)).max(), np.abs(np.asarray(grad_e)).max())
    print(f"\nrelaxed rollout FD: {n_checked} entries, max |fd − ad| = {worst:.1e} (max |grad| = {scale:.2f})")
    # Every leaf (and the prompt) gets gradient: the rollout is differentiable end to end.
    assert all(np.abs(np.asarray(x)).max() > 0 for x in grad_leaves)


def test_relaxed_rollout_hard_mode_is_gumbel_max_and_consistent_with_forward():
    config, params, prompt, emb, r = rollout_problem()
    tau = 0.7
    y_hard, z_hard = _rollout(config, params, emb, RR_KEY, RR_N, tau=tau, hard=True)
    y_soft, z_soft = _rollout(config, params, emb, RR_KEY, RR_N, tau=tau, hard=False)
    y_hard, z_hard, y_soft, z_soft = map(np.asarray, (y_hard, z_hard, y_soft, z_soft))
    gumbel = _gumbels(RR_KEY, RR_N, (RR_B, config.vocab_size))

    # Forward values of hard mode are exact one-hot rows: the Gumbel-max sample argmax(z_t + g_t).
    tokens = y_hard.argmax(-1)
    np.testing.assert_array_equal(y_hard, np.eye(config.vocab_size, dtype=np.float32)[tokens])
    np.testing.assert_array_equal(tokens, (z_hard + gumbel).argmax(-1))
    # Soft mode: y_t = softmax((z_t + g_t)/τ) with the same noise.
    s = (z_soft + gumbel) / tau
    ref_soft = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(y_soft, ref_soft / ref_soft.sum(-1, keepdims=True), rtol=0, atol=1e-6)

    # Hard tokens fed back through the cache-free model reproduce the rollout's logits.
    full = np.asarray(_forward(config, params, jnp.concatenate([prompt, jnp.asarray(tokens, jnp.int32)], 1)))
    err_hard = rel_max_err(z_hard, full[:, RR_P - 1:-1])
    # Soft vectors: the expected embeddings ỹ_t E fed to the cache-free model reproduce the logits too.
    soft_emb = jnp.concatenate([emb, jnp.asarray(y_soft) @ params["embed"]], 1)
    full_soft = np.asarray(jax.jit(functools.partial(arlm.forward, config))(params, embeddings=soft_emb))
    err_soft = rel_max_err(z_soft, full_soft[:, RR_P - 1:-1])
    print(f"\nrollout vs cache-free forward: hard {err_hard:.1e}, soft {err_soft:.1e}")
    assert err_hard < 1e-5 and err_soft < 1e-5

    # Straight-through gradients reach params and prompt embeddings, finite and non-zero.
    grad_p, grad_e = _rr_grad(config, params, emb, RR_KEY, r, tau, hard=True)
    gp, ge = flat(grad_p), np.asarray(grad_e)
    assert np.isfinite(gp).all() and np.isfinite(ge).all()
    assert np.linalg.norm(gp) > 1e-3 and np.linalg.norm(ge) > 1e-3
    # ... and they differ from the soft-mode gradient (the forward pass follows the hard path).
    gp_soft = flat(_rr_grad(config, params, emb, RR_KEY, r, tau, hard=False)[0])
    assert rel_norm_err(gp, gp_soft) > 1e-3

    # Small τ: the soft relaxation concentrates on the same Gumbel-max tokens.
    y_cold, _ = _rollout(config, params, emb, RR_KEY, RR_N, tau=0.05, hard=False)
    y_cold_hard, _ = _rollout(config, params, emb, RR_KEY, RR_N, tau=0.05, hard=True)
    y_cold, y_cold_hard = np.asarray(y_cold), np.asarray(y_cold_hard)
    np.testing.assert_array_equal(y_cold_hard, y_hard)           # hard samples do not depend on τ
    np.testing.assert_array_equal(y_cold.argmax(-1), tokens)
    print(f"τ = 0.05 soft rollout: mean max_v ỹ = {y_cold.max(-1).mean():.4f}, "
          f"max |ỹ − one_hot| = {np.abs(y_cold - y_hard).max():.3f}")
    assert y_cold.max(-1).mean() > 0.95


def test_relaxed_rollout_hard_samples_from_the_policy():
    """Hard-mode rollouts are exact samples of π_θ (Gumbel-max): sequence frequencies match enumeration."""
    config, params = model("llama")
    e = enumeration()
    n = 20000
    emb = arlm.embed_tokens(config, params, jnp.asarray([ENUM_PROMPT] * n, jnp.int32))
    y, _ = _rollout(config, params, emb, jax.random.PRNGKey(99), ENUM_N, tau=1.0, hard=True)
    freq = np.bincount(seq_index(np.asarray(y).argmax(-1)), minlength=len(e["pi"])) / n
    z = np.abs(freq - e["pi"]) / np.sqrt(e["pi"] * (1 - e["pi"]) / n)
    print(f"\nhard relaxed rollout: max |freq − π| / s.e. = {z.max():.2f} over {len(z)} sequences")
    assert z.max() < 5.0


# ----------------------------------------------------------------------------------------------
# 4. Jacobians w.r.t. the prompt embeddings
# ----------------------------------------------------------------------------------------------

TOL_JAC = 1e-5      # jacfwd vs jacrev, relative to max |J| (both exact up to float32 rounding)
# Directional FD (unit direction u, h = 3e-2) vs J·u: ‖fd − J·u‖ / max(1, ‖J·u‖). Measured ~2e-5; the
# step scan h = 0.3 … 1e-3 gives 2e-2 (truncation), 1e-5 (optimum), 6e-4 (rounding ∝ 1/h), and float64
# inputs give the same numbers (the model is float32 inside).
TOL_JAC_FD = 2e-4


def test_hidden_state_jacobians_and_causality():
    config, params = model("llama")
    p, n = 4, 3
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, p)), jnp.int32)
    completion = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, n)), jnp.int32)
    emb = arlm.embed_tokens(config, params, prompt) + 0.3 * jnp.asarray(rng.standard_normal((1, p, D)), jnp.float32)

    def hidden(x):
        return rollout_hidden_states(config, params, x, completion)

    h = jax.jit(hidden)(emb)
    assert h.shape == (L + 1, 1, p + n, D)
    j_fwd = np.asarray(jax.jit(jax.jacfwd(hidden))(emb))[:, 0, :, :, 0]     # [L+1, T, D, P, D]
    j_rev = np.asarray(jax.jit(jax.jacrev(hidden))(emb))[:, 0, :, :, 0]
    err_fr = float(np.abs(j_fwd - j_rev).max() / np.abs(j_rev).max())
    hidden_jit = jax.jit(hidden)
    fd_errs = []
    for _ in range(3):
        u = rng.standard_normal(emb.shape)
        u = jnp.asarray(u / np.linalg.norm(u), jnp.float32)                # unit direction: steps ≤ 3h = 0.09
        fd = directional_diff(hidden_jit, emb, u)[:, 0]                 # [L+1, T, D]
        ju = np.einsum("ltdse,se->ltd", j_rev, np.asarray(u[0], np.float64))
        fd_errs.append(fd_err(fd, ju))
    print(f"\nhidden-state Jacobian: |jacfwd − jacrev| / max|J| = {err_fr:.1e}, FD (directional) {max(fd_errs):.1e}")
    assert err_fr < TOL_JAC
    assert max(fd_errs) < TOL_JAC_FD

    # Causality: block ‖∂h_t^(ℓ)/∂e_s‖ is exactly 0 for t < s and non-zero for t ≥ s (ℓ ≥ 1);
    # h^(0)_t = e_t (RoPE: no additive positions) only depends on itself; completions on nothing at ℓ = 0.
    blocks = np.sqrt(np.square(j_rev).sum(axis=(2, 4)))                   # [L+1, T, P]
    t_idx, s_idx = np.meshgrid(np.arange(p + n), np.arange(p), indexing="ij")
    for layer in range(1, L + 1):
        assert (blocks[layer][t_idx < s_idx] == 0).all(), layer
        assert (blocks[layer][t_idx >= s_idx] > 1e-4 * blocks[layer].max()).all(), layer
    np.testing.assert_allclose(j_rev[0, :p], np.einsum("ts,de->tdse", np.eye(p), np.eye(D)), atol=0)
    assert (j_rev[0, p:] == 0).all()


def test_relaxed_rollout_jacfwd_matches_jacrev():
    config, params, _, emb, _ = rollout_problem()

    def rollout(x):
        return relaxed_rollout(config, params, x, RR_KEY, RR_N, tau=0.7, hard=False)

    y_fwd, z_fwd = jax.jit(jax.jacfwd(rollout))(emb)       # [B, N, V, B, P, D] each
    y_rev, z_rev = jax.jit(jax.jacrev(rollout))(emb)
    errs = [float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
            for a, b in ((y_fwd, y_rev), (z_fwd, z_rev))]
    print(f"\nrelaxed rollout Jacobians: |jacfwd − jacrev| / max|J| = {errs[0]:.1e} (ỹ), {errs[1]:.1e} (logits)")
    assert max(errs) < TOL_JAC
    y_rev = np.asarray(y_rev)
    # Rows of the batch do not interact; every step depends on the row's own prompt.
    for b in range(RR_B):
        for b2 in range(RR_B):
            block = np.abs(y_rev[b, :, :, b2]).reshape(RR_N, -1).max(-1)
            assert (block == 0).all() if b != b2 else (block > 0).all(), (b, b2)
    # The Jacobian agrees with a directional finite difference.
    u = np.random.default_rng(8).standard_normal(emb.shape)
    u = jnp.asarray(u / np.linalg.norm(u), jnp.float32)
    fd = directional_diff(jax.jit(lambda x: rollout(x)[0]), emb, u)
    ju = np.einsum("bnvcpd,cpd->bnv", y_rev, np.asarray(u, np.float64))
    err_fd = fd_err(fd, ju)
    print(f"relaxed rollout Jacobian vs directional FD: {err_fd:.1e}")
    assert err_fd < TOL_JAC_FD


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_score_function_gradient_from_a_generate_output_in_one_call(name):
    """`generated_log_prob` on a ragged, left-padded batch with early stops equals the sampler's own
    per-step log-probs (KV-cache path) summed; `score_function_gradient` equals the REINFORCE
    gradient built row by row from the unpadded prompts (`sequence_log_prob`, an independent path)."""
    from arlm.inference.differentiable import generated_log_prob, score_function_gradient

    config, params = model(name)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, config.vocab_size, size=k).tolist() for k in (1, 4, 2)]
    out = arlm.generate(config, params, prompts, key=jax.random.PRNGKey(2), max_new_tokens=5, sampler=Sampler(1.0),
                        eos_id=1, pad_id=-1)
    logp_B = np.asarray(jax.jit(generated_log_prob, static_argnums=0)(config, params, out))
    ref_B = np.where(np.asarray(out.completion_mask_BxN), np.asarray(out.log_probs_BxN), 0.0).sum(-1)
    np.testing.assert_allclose(logp_B, ref_B, rtol=1e-5, atol=1e-5)
    assert np.asarray(out.lengths_B).min() < 5           # a row stopped early: the mask matters

    reward_B = jnp.asarray([1.0, -0.5, 2.0])
    grads = jax.jit(score_function_gradient, static_argnums=0)(config, params, out, reward_B, 0.25)
    tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.completion_mask_BxN)

    def row_surrogate(p):
        total = 0.0
        for b, row in enumerate(prompts):
            y = jnp.asarray([tokens[b, mask[b]]], jnp.int32)
            total = total + (reward_B[b] - 0.25) * sequence_log_prob(config, p, jnp.asarray([row], jnp.int32), y)[0]
        return total / len(prompts)

    ref = jax.jit(jax.grad(row_surrogate))(params)
    flat, ref_flat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)
    scale = max(float(jnp.max(jnp.abs(g))) for g in ref_flat)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat, ref_flat)) <= 1e-5 * max(scale, 1.0)
