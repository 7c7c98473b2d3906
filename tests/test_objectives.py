"""Tests for the alignment losses (eqs. 9–15): arlm.objectives.{kl, advantages, policy_gradient,
preference, rsft, heads, kl_regularized} and arlm.alignment.exact.

Every loss is compared with an independent float64 numpy implementation of its formula, written
here from the formulas (explicit loops where that is clearer), on random inputs.

Conventions checked (as documented by TRL where the brief asks for it):
  * GRPO advantage: A = (r − mean) / (std + ε) with the sample std (Bessel's correction,
    np.std(ddof=1); torch's `Tensor.std()` is unbiased) and ε = 1e-4 added to the std, as in
    TRL's GRPOTrainer; `scale_rewards=False` is r − mean (Dr. GRPO). ddof=0 is checked too.
  * GRPO k3 KL: exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ (TRL's `per_token_kl`); the clip
    indicator is TRL's `is_region_clipped`: (ρ < 1−ε and A < 0) or (ρ > 1+ε and A > 0).
  * DPO variants: TRL DPOTrainer's `loss_type` formulas, with h built from summed log-probs
    for every variant (TRL averages them for IPO; arlm documents the difference).
  * PPO (as TRL's PPOTrainer): per-token reward −β·KL_t plus the score at the last response
    token, GAE with V = 0 after the last token, returns = A + V before whitening,
    value loss ½·max(...), total = pg + vf_coef·vf. arlm's whitening uses the population
    variance (ddof = 0) with 1e-8 inside the sqrt; TRL's `masked_whiten` applies Bessel's
    correction. We check arlm's documented convention.
  * masked_mean(..., "sequence") leaves rows with no tokens out of the row average (TRL's
    "grpo" loss type would count them as 0); arlm's docstring defines the former.

Tolerances: elementwise formulas on float32 inputs use rtol 1e-5, atol 1e-6 (float32 ε ≈ 1.2e-7,
so that is ~80 ulps of room for a few chained ops, and atol covers results that cancel to ~0).
Where a float32 reduction or a forward pass sits in between, the tolerance is stated at the test.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from _params import random_params
from arlm.alignment import exact
from arlm.alignment.rollout import Rollout, pair_batch
from arlm.objectives import advantages as adv_lib
from arlm.objectives import heads
from arlm.objectives import kl as kl_lib
from arlm.objectives import policy_gradient as pg
from arlm.objectives import preference as pref
from arlm.objectives import rsft
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy, estimate_objective
from arlm.objectives.sequences import PolicyOutputs, sequence_batch

RTOL, ATOL = 1e-5, 1e-6


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _close(got, want, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(_f64(got), _f64(want), rtol=rtol, atol=atol, err_msg=err_msg)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = _f64(x)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_log_sigmoid(x) -> np.ndarray:
    return -np.logaddexp(0.0, -_f64(x))


def np_logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ============================================================================ 1. kl.py

def _logp_pair(seed, shape=(5, 9)):
    """Sampled-token log-probs of π_θ and π_ref, float32, Δ spread over about ±4."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.01, 1.0, shape))
    ref = logp + rng.normal(0.0, 1.5, shape)
    ref[0, :3] = logp[0, :3] + np.array([0.0, 1e-3, -1e-3])      # Δ = 0 and tiny Δ (k3's cancellation)
    return logp.astype(np.float32), np.minimum(ref, 0.0).astype(np.float32)


def np_k(name: str, logp, ref) -> np.ndarray:
    d = _f64(ref) - _f64(logp)
    return {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1.0}[name]


def np_exact_kl(logits, ref_logits) -> np.ndarray:
    lp, lq = np_log_softmax(logits), np_log_softmax(ref_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("seed", range(3))
def test_sample_estimators_match_numpy(seed):
    logp, ref = _logp_pair(seed)
    for name in ("k1", "k2", "k3"):
        got = getattr(kl_lib, name)(jnp.asarray(logp), jnp.asarray(ref))
        assert got.shape == logp.shape and got.dtype == jnp.float32
        _close(got, np_k(name, logp, ref), err_msg=name)
    assert np.all(np.asarray(kl_lib.k2(logp, ref)) >= 0) and np.all(np.asarray(kl_lib.k3(logp, ref)) >= 0)


@pytest.mark.parametrize("seed", range(3))
def test_exact_token_kl_matches_numpy_softmax_sums(seed):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal((3, 4, 13))).astype(np.float32)
    ref_logits = (logits + 2.0 * rng.standard_normal(logits.shape)).astype(np.float32)
    ref_logits[0, 0] = logits[0, 0]                                   # identical rows: KL = 0
    got = kl_lib.exact_token_kl(jnp.asarray(logits), jnp.asarray(ref_logits))
    assert got.shape == (3, 4)
    # KL values are O(1–10); the float32 log-softmax differences carry ~1e-6 absolute error.
    _close(got, np_exact_kl(logits, ref_logits), rtol=1e-5, atol=2e-6)
    assert abs(float(got[0, 0])) < 1e-6
    # bfloat16 logits are upcast, not computed in bfloat16
    got_bf16 = kl_lib.exact_token_kl(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ref_logits, jnp.bfloat16))
    assert got_bf16.dtype == jnp.float32


def test_kl_regularizer_dispatch_and_errors():
    logp, ref = _logp_pair(7, (2, 3))
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    ref_logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    for name in ("k1", "k2", "k3"):
        _close(kl_lib.KLRegularizer(0.1, name).per_token(logp, ref), np_k(name, logp, ref), err_msg=name)
    reg = kl_lib.KLRegularizer(0.1, "exact")
    _close(reg.per_token(logp, ref, logits, ref_logits), np_exact_kl(logits, ref_logits), atol=2e-6)
    # the default estimator is the objective's (None here; KLObjective resolves it, section 9)
    assert kl_lib.KLRegularizer().beta == 0.05 and kl_lib.KLRegularizer().estimator is None
    assert kl_lib.KLRegularizer(0.0).beta == 0.0                      # β = 0 is allowed
    with pytest.raises(ValueError, match="leaves the estimator to the objective"):
        kl_lib.KLRegularizer(0.1).per_token(logp, ref)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_lib.KLRegularizer(0.1, "k4")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_lib.per_token_kl("K3", logp, ref)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be finite and ≥ 0"):
            kl_lib.KLRegularizer(bad)
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match="beta must be a real number"):
            kl_lib.KLRegularizer(bad)
    with pytest.raises(ValueError, match="full logits"):
        reg.per_token(logp, ref)
    with pytest.raises(ValueError, match="full logits"):
        reg.per_token(logp, ref, logits, None)


def _categorical_pairs():
    rng = np.random.default_rng(11)
    pairs = [(np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6]))]
    for v in (2, 5, 11):
        pairs.append((rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v))))
    return pairs


def test_k1_k3_unbiased_k2_biased_closed_form():
    """E_{v~p}[k(v)] = Σ_v p(v) k(v) computed exactly: k1 and k3 give KL(p‖q), k2 does not."""
    for p, q in _categorical_pairs():
        kl_exact = float(np.sum(p * np.log(p / q)))
        # the estimators evaluated at every possible sampled token v (a [1, V] "batch")
        logp = np.log(p).astype(np.float32)[None]
        logq = np.log(q).astype(np.float32)[None]
        expect = {name: float(np.sum(p * _f64(getattr(kl_lib, name)(logp, logq))[0])) for name in ("k1", "k2", "k3")}
        # float32 inputs carry ~1e-7 relative error in log p, log q: the expectation keeps it
        assert expect["k1"] == pytest.approx(kl_exact, rel=1e-5, abs=1e-6)
        assert expect["k3"] == pytest.approx(kl_exact, rel=1e-5, abs=1e-6)
        assert abs(expect["k2"] - kl_exact) > 1e-2 * kl_exact, (expect, kl_exact)
        # the exact estimator sees the whole vocabulary: logits = log-probs
        got_exact = float(kl_lib.exact_token_kl(logp[None], logq[None])[0, 0])
        assert got_exact == pytest.approx(kl_exact, rel=1e-5, abs=1e-6)


def test_k1_k3_unbiased_k2_biased_sampled():
    """Monte Carlo: the mean over 200k samples v ~ p is within 5 standard errors of KL for k1, k3;
    k2's bias (≈ 0.40 here) is far outside that band."""
    p, q = _categorical_pairs()[0]
    kl_exact = float(np.sum(p * np.log(p / q)))
    v = np.random.default_rng(0).choice(len(p), size=200_000, p=p)
    logp = np.log(p)[v].astype(np.float32)[None]
    logq = np.log(q)[v].astype(np.float32)[None]
    for name, unbiased in (("k1", True), ("k2", False), ("k3", True)):
        s = _f64(getattr(kl_lib, name)(logp, logq))[0]
        se = s.std(ddof=1) / math.sqrt(s.size)
        if unbiased:
            assert abs(s.mean() - kl_exact) < 5 * se, (name, s.mean(), kl_exact, se)
        else:
            assert abs(s.mean() - kl_exact) > 20 * se, (name, s.mean(), kl_exact, se)


# ============================================================================ 2. advantages.py

def np_grpo_advantages(r_GxK, eps=1e-4, ddof=1):
    out = np.empty(r_GxK.shape)
    for g, row in enumerate(_f64(r_GxK)):
        out[g] = (row - row.mean()) / (np.std(row, ddof=ddof) + eps)
    return out


def _group_rewards(seed, g=5, k=4):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(g, k))
    r[1] = 0.7                                                         # constant group: advantages 0
    r[2] = rng.integers(0, 2, k)                                       # binary verifier rewards
    r[3] = 100.0 + 1e-2 * rng.normal(size=k)                           # large offset, small spread
    return r.astype(np.float32)


@pytest.mark.parametrize("seed, k", [(0, 2), (1, 3), (2, 4), (3, 7)])
@pytest.mark.parametrize("ddof", [1, 0])
def test_group_relative_advantages(seed, k, ddof):
    r = _group_rewards(seed, k=k)
    got = adv_lib.group_relative_advantages(jnp.asarray(r), ddof=ddof)
    # row 3 has r ≈ 100 ± 0.01: the float32 rewards already quantise to ~8e-6 (ulp at 100),
    # i.e. ~1e-3 of the spread, so it is compared on its own with a looser tolerance.
    want = np_grpo_advantages(r, 1e-4, ddof)
    rows = [0, 1, 2, 4]
    _close(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=2e-6)
    _close(np.asarray(got)[3], want[3], rtol=1e-2, atol=1e-2)
    assert np.all(np.asarray(got)[1] == 0.0)
    if ddof == 1:                                                      # the default is TRL's convention
        _close(adv_lib.group_relative_advantages(jnp.asarray(r)), got, rtol=0, atol=0)
    _close(np.asarray(adv_lib.group_relative_advantages(jnp.asarray(r), eps=0.5, ddof=ddof))[rows],
           np_grpo_advantages(r, 0.5, ddof)[rows], rtol=1e-5, atol=2e-6)


def test_group_relative_advantages_errors():
    with pytest.raises(ValueError, match="K ≥ 2"):
        adv_lib.group_relative_advantages(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="K ≥ 3"):
        adv_lib.group_relative_advantages(jnp.ones((3, 2)), ddof=2)
    # K = 1 with the population std is defined: std 0, advantage 0
    _close(adv_lib.group_relative_advantages(jnp.full((3, 1), 2.0), ddof=0), np.zeros((3, 1)), atol=0)


@pytest.mark.parametrize("seed, k", [(0, 2), (1, 3), (2, 5)])
def test_leave_one_out_advantages(seed, k):
    r = _group_rewards(seed, k=k)
    want = np.empty(r.shape)
    for g in range(r.shape[0]):
        for i in range(k):
            others = [float(r[g, j]) for j in range(k) if j != i]
            want[g, i] = float(r[g, i]) - sum(others) / len(others)
    got = adv_lib.leave_one_out_advantages(jnp.asarray(r))
    rows = [0, 1, 2, 4]
    _close(np.asarray(got)[rows], want[rows], atol=2e-6)
    # row 3 (r ≈ 100): float32 sums at 100 carry ~1e-5 absolute error
    _close(np.asarray(got)[3], want[3], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="K ≥ 2"):
        adv_lib.leave_one_out_advantages(jnp.ones((2, 1)))


def _response_masks(seed, b=7, t=12):
    """Contiguous response runs that start after a prompt region; ragged, one empty, one to the end."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t), np.float32)
    spans = []
    for i in range(b):
        start = int(rng.integers(1, t - 1))
        length = int(rng.integers(1, t - start + 1))
        if i == 1:
            length = 0                                                 # all-masked row
        if i == 2:
            start, length = 3, t - 3                                   # runs to the last column
        if i == 3:
            start, length = t - 1, 1                                   # a single token at the end
        mask[i, start:start + length] = 1.0
        spans.append((start, length))
    return mask, spans


def np_gae_row(rewards, values, start, length, gamma, lam):
    """Explicit backward loop over one row's response tokens; V after the last token is 0."""
    adv = np.zeros(len(rewards))
    ret = np.zeros(len(rewards))
    running, v_next = 0.0, 0.0
    for t in reversed(range(start, start + length)):
        delta = rewards[t] + gamma * v_next - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
        ret[t] = running + values[t]
        v_next = values[t]
    return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("seed", range(2))
def test_gae_matches_backward_loop(gamma, lam, seed):
    mask, spans = _response_masks(seed)
    rng = np.random.default_rng(seed + 100)
    # rewards and values are garbage outside the mask: gae must ignore them
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    got_adv, got_ret = adv_lib.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    want_adv, want_ret = np.zeros(mask.shape), np.zeros(mask.shape)
    for i, (start, length) in enumerate(spans):
        want_adv[i], want_ret[i] = np_gae_row(_f64(rewards[i]), _f64(values[i]), start, length, gamma, lam)
    # sums of up to 12 O(1) float32 terms: a few 1e-7 relative each
    _close(got_adv, want_adv, rtol=1e-5, atol=2e-6)
    _close(got_ret, want_ret, rtol=1e-5, atol=2e-6)
    assert np.all(np.asarray(got_adv)[mask == 0] == 0) and np.all(np.asarray(got_ret)[mask == 0] == 0)
    # a bool mask means the same
    _close(adv_lib.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask > 0), gamma, lam)[0], got_adv,
           rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_whiten(seed):
    mask, _ = _response_masks(seed)
    x = (3.0 + 2.0 * np.random.default_rng(seed).normal(size=mask.shape)).astype(np.float32)
    sel = _f64(x)[mask > 0]
    want = np.where(mask > 0, (_f64(x) - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)
    got = adv_lib.whiten(jnp.asarray(x), jnp.asarray(mask))
    _close(got, want, rtol=1e-5, atol=5e-6)     # float32 mean/var over ~40 entries, outputs O(1)
    assert abs(float(np.asarray(got)[mask > 0].mean())) < 1e-5
    _close(adv_lib.whiten(jnp.asarray(x), jnp.zeros_like(jnp.asarray(mask))), np.zeros(mask.shape), atol=0)


# ============================================================================ 3. policy_gradient.py

def np_masked_mean(x, mask, reduction):
    x, mask = _f64(x), _f64(mask)
    if reduction == "token":
        n = mask.sum()
        return (x * mask).sum() / n if n > 0 else 0.0
    row_means = [(x[i] * mask[i]).sum() / mask[i].sum() for i in range(len(x)) if mask[i].sum() > 0]
    return float(np.mean(row_means)) if row_means else 0.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_masked_mean(seed, reduction):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 9)).astype(np.float32)
    mask = (rng.random((6, 9)) < 0.5).astype(np.float32)
    mask[2] = 0.0                                                      # a row with no tokens
    mask[4] = 1.0
    got = pg.masked_mean(jnp.asarray(x), jnp.asarray(mask), reduction)
    _close(got, np_masked_mean(x, mask, reduction))
    _close(pg.masked_mean(jnp.asarray(x), jnp.asarray(mask > 0), reduction), got, rtol=0, atol=0)
    assert float(pg.masked_mean(jnp.asarray(x), jnp.zeros((6, 9)), reduction)) == 0.0
    # the two reductions differ on ragged rows
    if reduction == "sequence":
        assert abs(float(got) - np_masked_mean(x, mask, "token")) > 1e-3
    with pytest.raises(ValueError, match="unknown reduction"):
        pg.masked_mean(jnp.asarray(x), jnp.asarray(mask), "batch")


def test_reinforce_loss_value_and_gradients():
    rng = np.random.default_rng(0)
    logp = -rng.uniform(1, 10, 6).astype(np.float32)
    a = rng.normal(size=6).astype(np.float32)
    _close(pg.reinforce_loss(jnp.asarray(logp), jnp.asarray(a)), -_f64(a) * _f64(logp))
    g_logp, g_a = jax.grad(lambda lp, aa: jnp.sum(pg.reinforce_loss(lp, aa)), argnums=(0, 1))(
        jnp.asarray(logp), jnp.asarray(a))
    _close(g_logp, -_f64(a))
    assert np.all(np.asarray(g_a) == 0)                                  # advantages are constants


def _ratio_inputs(seed, clip_eps, shape=(5, 8)):
    """log-probs whose ratios land on both sides of the clip range but never within 1e-3 of 1 ± ε
    (the clip indicator is discontinuous there)."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, shape)).astype(np.float32)
    ratio = rng.uniform(0.5, 1.6, shape)
    for bound in (1 - clip_eps, 1 + clip_eps):
        near = np.abs(ratio - bound) < 1e-3
        ratio[near] = bound + 2e-3
    new = (old + np.log(ratio)).astype(np.float32)
    a = rng.normal(size=shape).astype(np.float32)
    a[0, :2] = 0.0
    return new, old, a


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip_eps", [0.1, 0.2, 0.3])
def test_clipped_surrogate_loss(seed, clip_eps):
    new, old, a = _ratio_inputs(seed, clip_eps)
    ratio = np.exp(_f64(new) - _f64(old))
    want = np.empty(new.shape)
    want_clipped = np.empty(new.shape)
    for idx in np.ndindex(new.shape):                                     # per token, from the formula
        r, adv = ratio[idx], float(a[idx])
        want[idx] = -min(r * adv, min(max(r, 1 - clip_eps), 1 + clip_eps) * adv)
        want_clipped[idx] = float((r > 1 + clip_eps and adv > 0) or (r < 1 - clip_eps and adv < 0))
    loss, clipped = pg.clipped_surrogate_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(a), clip_eps)
    _close(loss, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(clipped), want_clipped)
    assert 0 < want_clipped.mean() < 1
    # gradient: −ρ A where the unclipped branch is active, 0 where clipped; none into A
    g_new, g_a = jax.grad(lambda lp, aa: jnp.sum(pg.clipped_surrogate_loss(lp, jnp.asarray(old), aa, clip_eps)[0]),
                          argnums=(0, 1))(jnp.asarray(new), jnp.asarray(a))
    _close(g_new, -ratio * _f64(a) * (1 - want_clipped), rtol=1e-5, atol=2e-6)
    assert np.all(np.asarray(g_a) == 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip_eps", [0.05, 0.2, 1.0])
def test_clipped_value_loss(seed, clip_eps):
    rng = np.random.default_rng(seed)
    v, v_old, ret = (rng.normal(size=(4, 7)).astype(np.float32) for _ in range(3))
    want = np.empty(v.shape)
    for idx in np.ndindex(v.shape):
        vv, vo, rr = float(v[idx]), float(v_old[idx]), float(ret[idx])
        v_clip = vo + min(max(vv - vo, -clip_eps), clip_eps)
        want[idx] = 0.5 * max((vv - rr) ** 2, (v_clip - rr) ** 2)
    _close(pg.clipped_value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(ret), clip_eps), want,
           rtol=1e-5, atol=2e-6)


# ============================================================================ 4. preference.py

def np_dpo_loss(h, beta, variant, eps):
    """TRL DPOTrainer's `loss_type` formulas, from the log-ratio margin h."""
    h = _f64(h)
    z = beta * h
    if variant == "sigmoid":
        return -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
    if variant == "robust":
        return (-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (1 - 2 * eps)
    if variant == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if variant == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise AssertionError(variant)


def _seq_logps(seed, n=16):
    rng = np.random.default_rng(seed)
    return [(-rng.uniform(1, 40, n)).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("seed", range(3))
def test_bradley_terry_and_margin(seed):
    rng = np.random.default_rng(seed)
    rw, rl = (rng.normal(0, 5, 20).astype(np.float32) for _ in range(2))
    rw[:2], rl[:2] = [60.0, -60.0], [-60.0, 60.0]                          # saturated: stable log σ
    _close(pref.bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl)), np.logaddexp(0.0, -(_f64(rw) - _f64(rl))),
           rtol=1e-5, atol=1e-6)
    lw, ll, rfw, rfl = _seq_logps(seed)
    want = (_f64(lw) - _f64(rfw)) - (_f64(ll) - _f64(rfl))
    # differences of O(40) float32 values: ~4e-6 absolute error
    _close(pref.dpo_margin(lw, ll, rfw, rfl), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_dpo_loss_matches_trl_formulas(variant, label_smoothing, beta):
    rng = np.random.default_rng(int(beta * 100) + int(label_smoothing * 10))
    h = rng.normal(0, 4, 30).astype(np.float32)
    h[:4] = [0.0, 50.0, -50.0, 1.0 / beta]                                # 0, saturated, the hinge kink
    got = pref.dpo_loss(jnp.asarray(h), beta, variant, label_smoothing)
    assert got.shape == h.shape
    want = np_dpo_loss(h, beta, variant, label_smoothing)
    # IPO squares h − 1/(2β) with |h| up to 50: float32 relative error of the square
    _close(got, want, rtol=1e-5, atol=1e-5 if variant == "ipo" else 1e-6)
    if label_smoothing == 0.0 and variant == "sigmoid":                   # eq. 13 itself
        _close(got, -np_log_sigmoid(beta * _f64(h)))


def test_dpo_loss_errors():
    h = jnp.zeros(3)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        pref.dpo_loss(h, 0.1, "kto")
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            pref.dpo_loss(h, 0.1, "sigmoid", bad)


# ============================================================================ 5. rsft.py

def np_best_of_k(r, min_reward=-np.inf):
    keep = np.zeros(r.shape, np.float32)
    for g, row in enumerate(r):
        best = 0
        for i in range(1, len(row)):
            if row[i] > row[best]:                                        # strict: ties keep the first
                best = i
        keep[g, best] = float(row[best] >= min_reward)
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_best_of_k_and_threshold(seed):
    rng = np.random.default_rng(seed)
    r = rng.integers(-2, 3, (8, 5)).astype(np.float32)                     # small integers: many ties
    r[0] = [1, 3, 3, 0, 3]
    r[1] = -1.0                                                            # all tied
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r))), np_best_of_k(r))
    for m in (-1.0, 0.0, 1.0, 2.5):
        np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r), m)), np_best_of_k(r, m))
        np.testing.assert_array_equal(np.asarray(rsft.threshold(jnp.asarray(r), m)), (r >= m).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r)))[0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(rsft.best_of_k(jnp.asarray(r)))[1], [1, 0, 0, 0, 0])


def test_boltzmann_acceptance_frequency():
    beta, r_max, m = 0.5, 1.0, 4000
    r = np.array([[1.0, 0.9, 0.5, 0.0], [-0.5, 1.0, -9.0, 1.7]], np.float32)   # 1.7 > r_max: clamped to 1
    p = np.exp(np.minimum(_f64(r) - r_max, 0.0) / beta)
    keys = jax.random.split(jax.random.PRNGKey(0), m)
    draws = np.asarray(jax.vmap(lambda k: rsft.boltzmann(jnp.asarray(r), beta, r_max, k))(keys))
    assert set(np.unique(draws)) <= {0.0, 1.0}
    freq = draws.mean(0)
    # binomial: |freq − p| ≤ 5 σ, σ = sqrt(p(1−p)/m); p = 1 must give exactly 1, p ≈ 0 exactly 0
    bound = 5 * np.sqrt(p * (1 - p) / m) + 1e-12
    assert np.all(np.abs(freq - p) <= bound), (freq, p, bound)
    assert freq[0, 0] == 1.0 and freq[1, 3] == 1.0 and freq[1, 2] == 0.0
    # the draw is the documented rule: keep where U[0, 1) < exp((r − r_max)/β)
    u = np.asarray(jax.random.uniform(keys[3], r.shape), np.float64)
    np.testing.assert_array_equal(draws[3], (u < p).astype(np.float32))


# ============================================================================ 6. heads.py

def np_scalar_head(head, h):
    h = _f64(h)
    hn = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6)
    return hn @ _f64(head["w"]) + float(head["b"])


def test_scalar_head_and_last_token_index():
    rng = np.random.default_rng(0)
    h = rng.normal(0, 3, (3, 5, 8)).astype(np.float32)
    head = {"w": jnp.asarray(rng.normal(size=8), jnp.float32), "b": jnp.asarray(0.7, jnp.float32)}
    _close(heads.scalar_head(head, jnp.asarray(h)), np_scalar_head(head, h), atol=2e-6)
    init = heads.init_scalar_head(8)
    assert np.all(np.asarray(heads.scalar_head(init, jnp.asarray(h))) == 0)
    mask = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    np.testing.assert_array_equal(np.asarray(heads.last_token_index(jnp.asarray(mask))), [2, 0, 4])


# ============================================================================ 7. composed estimators (kl_regularized.py)

MODEL_CONFIGS = {
    "gpt2": arlm.ModelConfig.gpt2(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16),
    "llama_gqa": arlm.ModelConfig.llama(vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                                        max_seq_len=16),
}
G, K, P, N = 3, 4, 5, 6                                 # 3 prompts × 4 samples = 12 rows; T = P + N = 11
B = G * K
STARTS = np.array([0, 4, 2, 1, 3, 0, 4, 2, 1, 3, 0, 2])          # left padding: row b's prompt starts at STARTS[b]
LENGTHS = np.array([3, 6, 1, 0, 4, 2, 5, 6, 2, 3, 1, 4])         # ragged responses, one empty, two full
REWARDS = np.array([-0.3, 0.2, -1.1, 0.4,                        # group 0: real-valued
                    1.0, 0.0, 1.0, 1.0,                          # group 1: verifier, ties at the max
                    1.0, 1.0, 1.0, 1.0], np.float32)             # group 2: constant (GRPO advantage 0)
CHOSEN, REJECTED = np.array([0, 4, 8, 2, 6, 10]), np.array([1, 5, 9, 3, 7, 11])   # DPO pairs (row 3 is empty)
PERTURB = 0.04          # π_old = π_ref + noise, π_θ = π_old + noise: ratios straddle the clip range

# Composed tolerance. The library runs the batch left-padded with shifted positions and an
# attention mask; the reference runs each row alone from position 0, a different float32
# computation whose log-probs differ by up to ~1e-6. Losses and metrics are O(0.1–3) sums/means of
# ~10 such terms, exp'd (ratios) or divided by a whitening std; the largest difference seen is
# ~3e-6 absolute (the IPO loss, ≈ 1.9), so rtol 1e-5 + atol 5e-6 leaves a margin of ~8×.
C_RTOL, C_ATOL = 1e-5, 5e-6


def _perturb(tree, seed, std):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape),
                                                        jnp.float32), tree)


@functools.partial(jax.jit, static_argnums=0)
def _forward_row(config, params, tokens_1xT):
    out = arlm.apply_model(config, params, tokens_1xT, return_hidden=True)
    return out.logits_BxTxV[0], out.hidden_states[-1][0]


@dataclasses.dataclass
class World:
    config: arlm.ModelConfig
    params: dict            # "ref", "old", "new": model params
    value: dict             # "old", "new": value heads
    batch: dict             # the sequence batch, with "rewards"
    pairs: dict             # the DPO pair batch [B/2, 2, T]
    logits: dict            # which -> per-row float64 [L_b, V]: the logits that predict each response token
    hidden: dict            # which -> per-row float64 [L_b, D]: h^(L) at the same positions
    last_hidden: dict       # which -> per-row float64 [D]: h^(L) at the row's last real token
    targets: list           # per-row response tokens [L_b]


@functools.lru_cache(maxsize=None)
def _world(name: str) -> World:
    config = MODEL_CONFIGS[name]
    ref = random_params(config, seed=3)
    old = _perturb(ref, 1, PERTURB)
    new = _perturb(old, 2, PERTURB)
    d = config.d_model
    rng = np.random.default_rng(5)
    v_old = {"w": jnp.asarray(0.5 * rng.normal(size=d), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}
    v_new = {"w": v_old["w"] + jnp.asarray(0.05 * rng.normal(size=d), jnp.float32), "b": jnp.asarray(0.25, jnp.float32)}
    # random prompts and responses; the padding slots hold random non-zero ids too (sequence_batch must drop them)
    prompt = rng.integers(1, config.vocab_size, (B, P))
    response = rng.integers(1, config.vocab_size, (B, N))
    batch = sequence_batch(prompt, STARTS, response, LENGTHS)
    batch["rewards"] = REWARDS
    rollout = Rollout({k: v for k, v in batch.items() if k != "rewards"}, np.repeat(np.arange(G), K), response,
                      LENGTHS, np.zeros((B, N), np.float32), P)
    pairs = pair_batch(rollout, CHOSEN, REJECTED)

    # Reference log-probs: every row alone, its real tokens from position 0, no attention mask.
    # Rows are filled on the right with random tokens up to P + N so that one compiled forward
    # serves every row; the causal model's outputs at the real positions cannot see them.
    logits, hidden, last_hidden = {}, {}, {}
    targets = [response[b, :LENGTHS[b]] for b in range(B)]
    fill = rng.integers(0, config.vocab_size, P + N)
    for which, params in (("ref", ref), ("old", old), ("new", new)):
        logits[which], hidden[which], last_hidden[which] = [], [], []
        for b in range(B):
            seq = np.concatenate([prompt[b, STARTS[b]:], targets[b]])
            n_prompt = P - STARTS[b]
            padded = np.concatenate([seq, fill[len(seq):]]).astype(np.int32)
            lg, hd = (np.asarray(x, np.float64) for x in _forward_row(config, params, jnp.asarray(padded[None])))
            rows = slice(n_prompt - 1, n_prompt - 1 + LENGTHS[b])            # position t predicts token t + 1
            logits[which].append(lg[rows])
            hidden[which].append(hd[rows])
            last_hidden[which].append(hd[len(seq) - 1])
    return World(config, {"ref": ref, "old": old, "new": new}, {"old": v_old, "new": v_new}, batch, pairs,
                 logits, hidden, last_hidden, targets)


def _logp(w: World, which: str, b: int) -> np.ndarray:
    ls = np_log_softmax(w.logits[which][b])
    return ls[np.arange(LENGTHS[b]), w.targets[b]]


def _token_kl(w: World, which: str, b: int, estimator: str) -> np.ndarray:
    if estimator == "exact":
        return np_exact_kl(w.logits[which][b], w.logits["ref"][b])
    return np_k(estimator, _logp(w, which, b), _logp(w, "ref", b))


def _grid(rows) -> np.ndarray:
    """Per-row response values → the library's [B, T − 1] target layout (column P + j − 1 scores token j)."""
    out = np.zeros((B, P + N - 1))
    for b, r in enumerate(rows):
        out[b, P - 1:P - 1 + LENGTHS[b]] = r
    return out


def _token_mean(rows) -> float:
    flat = np.concatenate([np.asarray(r, np.float64) for r in rows])
    return float(flat.mean()) if flat.size else 0.0


def _seq_mean(rows) -> float:
    means = [np.mean(r) for r in rows if len(r)]
    return float(np.mean(means)) if means else 0.0


def _common(w: World) -> dict:
    return {"kl": np.mean([np.sum(_logp(w, "new", b) - _logp(w, "ref", b)) for b in range(B)]),
            "response_tokens": LENGTHS.mean()}


def _ratio_rows(w: World, clip_eps: float):
    rows = [np.exp(_logp(w, "new", b) - _logp(w, "old", b)) for b in range(B)]
    flat = np.concatenate(rows)
    # the clip indicator is discontinuous at 1 ± ε: make sure no ratio is near enough to flip in float32
    assert np.min(np.abs(flat[:, None] - np.array([1 - clip_eps, 1 + clip_eps])[None])) > 1e-4
    return rows


def np_ppo(w: World, est: PPO, beta: float, kl_est: str):
    adv, ret, v_old = [], [], []
    for b in range(B):
        length = LENGTHS[b]
        r = -beta * _token_kl(w, "old", b, kl_est)
        if length:
            r[length - 1] += float(REWARDS[b])
        v = np_scalar_head(w.value["old"], w.hidden["old"][b]) if length else np.zeros(0)
        a = np.zeros(length)
        running, v_next = 0.0, 0.0
        for t in reversed(range(length)):
            delta = r[t] + est.gamma * v_next - v[t]
            running = delta + est.gamma * est.lam * running
            a[t] = running
            v_next = v[t]
        adv.append(a)
        ret.append(a + v)
        v_old.append(v)
    if est.whiten_advantages:
        flat = np.concatenate(adv)
        adv = [(a - flat.mean()) / np.sqrt(flat.var() + 1e-8) for a in adv]
    ratios = _ratio_rows(w, est.clip_eps)
    pg_rows, vf_rows, clip_rows = [], [], []
    for b in range(B):
        rho, a = ratios[b], adv[b]
        pg_rows.append(-np.minimum(rho * a, np.clip(rho, 1 - est.clip_eps, 1 + est.clip_eps) * a))
        clip_rows.append(((rho > 1 + est.clip_eps) & (a > 0)) | ((rho < 1 - est.clip_eps) & (a < 0)))
        v_new = np_scalar_head(w.value["new"], w.hidden["new"][b]) if LENGTHS[b] else np.zeros(0)
        v_clip = v_old[b] + np.clip(v_new - v_old[b], -est.value_clip, est.value_clip)
        vf_rows.append(0.5 * np.maximum((v_new - ret[b]) ** 2, (v_clip - ret[b]) ** 2))
    pg_loss, vf_loss = _token_mean(pg_rows), _token_mean(vf_rows)
    metrics = dict(_common(w), pg_loss=pg_loss, value_loss=vf_loss, clip_fraction=_token_mean(clip_rows),
                   tokens=LENGTHS.sum())
    prepared = {"advantages": _grid(adv), "returns": _grid(ret), "old_values": _grid(v_old),
                "old_logp": _grid([_logp(w, "old", b) for b in range(B)]),
                "ref_logp": _grid([_logp(w, "ref", b) for b in range(B)])}
    return pg_loss + est.value_coef * vf_loss, metrics, prepared


def np_grpo(w: World, est: GRPO, beta: float, kl_est: str):
    a_b = []
    for g in range(G):
        r = _f64(REWARDS[g * K:(g + 1) * K])
        centred = r - r.mean()
        a_b.extend(centred / (np.std(r, ddof=est.ddof) + est.eps) if est.scale_rewards else centred)
    ratios = _ratio_rows(w, est.clip_eps)
    pg_rows, kl_rows, clip_rows = [], [], []
    for b in range(B):
        rho, a = ratios[b], a_b[b]
        pg_rows.append(-np.minimum(rho * a, np.clip(rho, 1 - est.clip_eps, 1 + est.clip_eps) * a))
        clip_rows.append(((rho > 1 + est.clip_eps) & (a > 0)) | ((rho < 1 - est.clip_eps) & (a < 0)))
        kl_rows.append(_token_kl(w, "new", b, kl_est))
    reduce = _token_mean if est.reduction == "token" else _seq_mean
    loss = reduce([p + beta * k for p, k in zip(pg_rows, kl_rows)])
    metrics = dict(_common(w), pg_loss=reduce(pg_rows), kl_penalty=reduce(kl_rows),
                   clip_fraction=_token_mean(clip_rows))
    prepared = {"advantages": _grid([np.full(LENGTHS[b], a_b[b]) for b in range(B)]),
                "old_logp": _grid([_logp(w, "old", b) for b in range(B)]),
                "ref_logp": _grid([_logp(w, "ref", b) for b in range(B)])}
    return loss, metrics, prepared


def np_rloo(w: World, est: RLOO, beta: float, kl_est: str):
    shaped = [float(REWARDS[b]) - beta * np.sum(_token_kl(w, "old", b, kl_est)) for b in range(B)]
    a = np.empty(B)
    for b in range(B):
        g = b // K
        others = [shaped[j] for j in range(g * K, (g + 1) * K) if j != b]
        a[b] = shaped[b] - np.mean(others)
    loss = np.mean([-a[b] * np.sum(_logp(w, "new", b)) for b in range(B)])
    return loss, _common(w), {"advantages": a}


def np_dpo(w: World, est: DPO, beta: float, kl_est: str):
    def seq(which, b):
        return float(np.sum(_logp(w, which, b)))
    ch = np.array([beta * (seq("new", c) - seq("ref", c)) for c in CHOSEN])
    rj = np.array([beta * (seq("new", r) - seq("ref", r)) for r in REJECTED])
    h = (ch - rj) / beta
    assert np.min(np.abs(h)) > 1e-4                                       # accuracy = mean(h > 0) is robust
    loss = np.mean(np_dpo_loss(h, beta, est.variant, est.label_smoothing))
    metrics = {"accuracy": np.mean(h > 0), "reward_margin": np.mean(ch - rj), "chosen_reward": np.mean(ch),
               "rejected_reward": np.mean(rj)}
    ref_seq = np.array([[seq("ref", c), seq("ref", r)] for c, r in zip(CHOSEN, REJECTED)])
    return loss, metrics, {"ref_seq_logp": ref_seq}


def _rsft_weights(est: RSFT) -> np.ndarray | None:
    r = REWARDS.reshape(G, K)
    if isinstance(est, RSFT) and est.filter == "best_of_k":
        return np_best_of_k(r, est.threshold).reshape(-1)
    if isinstance(est, RSFT) and est.filter == "threshold":
        return (r >= est.threshold).astype(np.float32).reshape(-1)
    return None                                                           # SFT, or boltzmann (random)


def np_sft(w: World, est: SFT, beta: float, kl_est: str, weights: np.ndarray | None = None):
    weights = np.ones(B) if weights is None else _f64(weights)
    n = float(sum(weights[b] * LENGTHS[b] for b in range(B)))
    loss = -sum(weights[b] * np.sum(_logp(w, "new", b)) for b in range(B)) / max(n, 1.0)
    prepared = {} if type(est) is SFT else {"weights": weights}
    return loss, {"tokens": n}, prepared


@dataclasses.dataclass(frozen=True)
class Variant:
    estimator: object
    beta: float = 0.1
    kl: str | None = None          # None: the objective's default (DPO, SFT, RSFT estimate no KL)


VARIANTS = {
    "ppo-k1": Variant(PPO(), 0.1, "k1"),
    "ppo-exact-gamma0.9-nowhiten": Variant(PPO(clip_eps=0.1, value_clip=0.05, value_coef=0.3, gamma=0.9, lam=0.8,
                                               whiten_advantages=False), 0.2, "exact"),
    # GRPO: each KL estimator with each of scale_rewards and reduction (a covering design of the
    # 2 × 2 × 2 grid: every level of every factor, every pair of levels of (kl, scale) and (kl, reduction))
    "grpo-k3-scaled-sequence": Variant(GRPO(K), 0.1, "k3"),
    "grpo-k3-unscaled-token": Variant(GRPO(K, reduction="token", scale_rewards=False), 0.1, "k3"),
    "grpo-exact-scaled-token": Variant(GRPO(K, reduction="token"), 0.1, "exact"),
    "grpo-exact-unscaled-sequence": Variant(GRPO(K, clip_eps=0.3, scale_rewards=False), 0.3, "exact"),
    "grpo-k2-ddof0-eps0.1": Variant(GRPO(K, eps=0.1, ddof=0), 0.3, "k2"),
    "rloo-k1": Variant(RLOO(K), 0.1, "k1"),
    "rloo-exact": Variant(RLOO(K), 0.2, "exact"),
    # DPO: every variant once; label smoothing 0.1 and 0.3 (the loss functions themselves are
    # checked on the whole grid above)
    "dpo-sigmoid-0.0": Variant(DPO("sigmoid"), 0.3),
    "dpo-sigmoid-0.1": Variant(DPO("sigmoid", 0.1), 0.3),
    "dpo-robust-0.3": Variant(DPO("robust", 0.3), 0.3),
    "dpo-hinge": Variant(DPO("hinge"), 0.3),
    "dpo-ipo": Variant(DPO("ipo"), 2.0),
    "sft": Variant(SFT()),
    "rsft-best_of_k-min0.3": Variant(RSFT(K, "best_of_k", threshold=0.3)),   # group 0's best (0.4) is kept
    "rsft-threshold": Variant(RSFT(K, "threshold", threshold=0.1)),
    "rsft-boltzmann": Variant(RSFT(K, "boltzmann", r_max=1.0), 0.5),
}
# The llama (GQA) model reruns one of each kind: the forward pass is what differs between models.
LLAMA_VARIANTS = ("ppo-k1", "grpo-exact-scaled-token", "rloo-k1", "dpo-sigmoid-0.1", "sft")
CASES = [("gpt2", v) for v in VARIANTS] + [("llama_gqa", v) for v in LLAMA_VARIANTS]
REFERENCE = {PPO: np_ppo, GRPO: np_grpo, RLOO: np_rloo, DPO: np_dpo, SFT: np_sft, RSFT: np_sft}


def _objective(w: World, variant: Variant) -> KLObjective:
    return KLObjective(Policy(w.config), kl_lib.KLRegularizer(variant.beta, variant.kl), variant.estimator)


@functools.lru_cache(maxsize=None)
def _library_results(name: str) -> dict:
    """prepare(params_old) then loss(params_new) for every variant of this model, in one jit
    (variants share the compiled forward passes; each would otherwise compile on its own)."""
    w = _world(name)
    names = list(VARIANTS) if name == "gpt2" else list(LLAMA_VARIANTS)
    objectives = {n: _objective(w, VARIANTS[n]) for n in names}

    def run(policy_old, policy_new, value_old, value_new, ref, batch, pairs, key):
        out = {}
        for n, obj in objectives.items():
            ppo = isinstance(obj.estimator, PPO)
            p_old = {"policy": policy_old, **({"value": value_old} if ppo else {})}
            p_new = {"policy": policy_new, **({"value": value_new} if ppo else {})}
            data = pairs if isinstance(obj.estimator, DPO) else batch
            prepared = obj.prepare(p_old, {"ref": ref}, data, key)
            loss, metrics = obj.loss(p_new, prepared, {"ref": ref})
            out[n] = (loss, metrics, prepared)
        return out

    res = jax.jit(run)(w.params["old"], w.params["new"], w.value["old"], w.value["new"], w.params["ref"],
                       w.batch, w.pairs, jax.random.PRNGKey(7))
    return jax.device_get(res)


@pytest.mark.parametrize("model, variant", CASES)
def test_composed_estimator_matches_numpy(model, variant):
    w = _world(model)
    spec = VARIANTS[variant]
    obj = _objective(w, spec)
    # init_params: π_θ starts at π_ref (a copy), with a zero value head for PPO only
    init = obj.init_params(w.params["ref"], jax.random.PRNGKey(1))
    assert set(init) == ({"policy", "value"} if isinstance(spec.estimator, PPO) else {"policy"})
    for a, b in zip(jax.tree_util.tree_leaves(init["policy"]), jax.tree_util.tree_leaves(w.params["ref"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if "value" in init:
        assert not np.any(np.asarray(init["value"]["w"])) and float(init["value"]["b"]) == 0.0

    loss, metrics, prepared = _library_results(model)[variant]
    reference = REFERENCE[type(spec.estimator)]
    if isinstance(spec.estimator, RSFT):
        weights = _rsft_weights(spec.estimator)
        if weights is None:                                              # boltzmann: the library's draw, checked
            weights = np.asarray(prepared["weights"])
            p = np.exp(np.minimum(_f64(REWARDS) - spec.estimator.r_max, 0.0) / spec.beta)
            assert set(np.unique(weights)) <= {0.0, 1.0}
            assert np.all(weights[p == 1.0] == 1.0)                      # r = r_max: always kept
            assert 0 < weights.sum() < B
        want_loss, want_metrics, want_prepared = reference(w, spec.estimator, spec.beta, spec.kl, weights)
    else:
        want_loss, want_metrics, want_prepared = reference(w, spec.estimator, spec.beta, spec.kl)

    _close(loss, want_loss, C_RTOL, C_ATOL, err_msg="loss")
    assert set(metrics) == set(want_metrics), (sorted(metrics), sorted(want_metrics))
    for key, want in want_metrics.items():
        _close(metrics[key], want, C_RTOL, C_ATOL, err_msg=key)
    for key, want in want_prepared.items():
        _close(prepared[key], want, C_RTOL, C_ATOL, err_msg=f"prepared[{key!r}]")
    # the case exercises what it should: ratios ≠ 1 with both clipped and unclipped tokens
    if isinstance(spec.estimator, (PPO, GRPO)):
        assert 0.0 < metrics["clip_fraction"] < 0.5, metrics["clip_fraction"]
    if isinstance(spec.estimator, DPO):
        assert 0.0 < metrics["accuracy"] < 1.0


def test_composed_batch_layout():
    """sequence_batch / pair_batch: left-padded prompts, positions from 0, masks — against the spec."""
    w = _world("gpt2")
    for b in range(B):
        n_prompt = P - STARTS[b]
        att = np.asarray(w.batch["attention"][b])
        assert att[:P].tolist() == [False] * STARTS[b] + [True] * n_prompt
        assert att[P:].tolist() == [True] * LENGTHS[b] + [False] * (N - LENGTHS[b])
        assert np.all(w.batch["tokens"][b][~att] == 0)
        np.testing.assert_array_equal(w.batch["tokens"][b, P:P + LENGTHS[b]], w.targets[b])
        np.testing.assert_array_equal(w.batch["positions"][b, STARTS[b]:], np.arange(P + N - STARTS[b]))
        assert w.batch["response_mask"][b].tolist() == [0.0] * P + [1.0] * LENGTHS[b] + [0.0] * (N - LENGTHS[b])
    for i, (c, r) in enumerate(zip(CHOSEN, REJECTED)):
        for key in ("tokens", "positions", "attention", "response_mask"):
            np.testing.assert_array_equal(w.pairs[key][i, 0], w.batch[key][c])
            np.testing.assert_array_equal(w.pairs[key][i, 1], w.batch[key][r])


def test_composed_errors():
    w = _world("gpt2")
    obj = _objective(w, Variant(RSFT(5)))                                 # 12 rows are not groups of 5
    with pytest.raises(ValueError, match="groups of K=5"):
        obj.prepare({"policy": w.params["old"]}, {"ref": w.params["ref"]}, w.batch)
    with pytest.raises(ValueError, match="unknown RSFT filter"):
        RSFT(K, "top_p")


@pytest.mark.parametrize("model", list(MODEL_CONFIGS))
def test_reward_model_scores_last_real_token(model):
    w = _world(model)
    rng = np.random.default_rng(9)
    head = {"w": jnp.asarray(rng.normal(size=w.config.d_model), jnp.float32), "b": jnp.asarray(-0.4, jnp.float32)}
    rm = heads.init_reward_model(w.params["ref"], w.config)
    assert not np.any(np.asarray(rm["head"]["w"]))
    rm["head"] = head
    got = jax.jit(heads.reward_model_scores, static_argnums=0)(w.config, rm, w.batch)
    # the head on h^(L) at each row's last real token (the prompt's last for the empty row)
    want = [np_scalar_head(head, w.last_hidden["ref"][b]) for b in range(B)]
    _close(got, want, C_RTOL, C_ATOL)


def test_estimate_objective():
    rng = np.random.default_rng(0)
    r = rng.normal(size=5).astype(np.float32)
    logp, ref = _logp_pair(3, (5, 6))
    mask = np.triu(np.ones((5, 6), np.float32))                                     # masked log-probs, as documented
    want = _f64(r).mean() - 0.2 * np.mean([np.sum((_f64(logp[i]) - _f64(ref[i])) * mask[i]) for i in range(5)])
    _close(estimate_objective(r, logp * mask, ref * mask, 0.2), want, atol=2e-6)


# ============================================================================ 8. arlm.alignment.exact

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_exact_optimal_policy_and_objective_identity(seed, beta):
    rng = np.random.default_rng(seed)
    x, y = 3, 9
    ref = np.log(rng.dirichlet(np.ones(y), size=x))
    reward = rng.normal(size=(x, y))
    pi = np.log(rng.dirichlet(np.ones(y), size=x))                        # an arbitrary policy
    ref32, reward32, pi32 = (a.astype(np.float32) for a in (ref, reward, pi))
    ref, reward, pi = (_f64(a) for a in (ref32, reward32, pi32))          # the float32 values, in float64

    # numpy, float64: π* = π_ref exp(r/β) / Z (eq. 10)
    unnorm = ref + reward / beta
    log_z = np_logsumexp(unnorm)
    log_opt = unnorm - log_z[:, None]

    def np_kl(lp, lq):
        return (np.exp(lp) * (lp - lq)).sum(-1)

    def np_j(lp):
        return float(np.mean((np.exp(lp) * reward).sum(-1) - beta * np_kl(lp, ref)))

    # the identity J(π) = β log Z − β KL(π ‖ π*) holds to rounding in float64 (for a normalised π;
    # the float32-rounded π sums to 1 only within ~1e-7)
    pi64 = pi - np_logsumexp(pi)[:, None]
    assert np_j(pi64) == pytest.approx(float(np.mean(beta * log_z - beta * np_kl(pi64, log_opt))), abs=1e-12)
    assert np_j(log_opt) == pytest.approx(beta * log_z.mean(), abs=1e-12)
    assert np_j(pi64) < np_j(log_opt)

    # log-probs are O(10) (r/β up to ~10): float32 log-sum-exp carries a few 1e-6 absolute
    got_opt, got_z = exact.optimal_log_probs(jnp.asarray(ref32), jnp.asarray(reward32), beta)
    _close(got_opt, log_opt, rtol=1e-5, atol=1e-5)
    _close(got_z, log_z, rtol=1e-5, atol=1e-5)
    _close(exact.kl_divergence(jnp.asarray(pi32), jnp.asarray(ref32)), np_kl(pi, ref), rtol=1e-5, atol=1e-5)
    _close(exact.objective_value(jnp.asarray(pi32), jnp.asarray(ref32), jnp.asarray(reward32), beta), np_j(pi),
           rtol=1e-5, atol=1e-5)
    # the identity through the library's own functions
    lhs = exact.objective_value(jnp.asarray(pi32), jnp.asarray(ref32), jnp.asarray(reward32), beta)
    rhs = beta * jnp.mean(got_z) - beta * jnp.mean(exact.kl_divergence(jnp.asarray(pi32), got_opt))
    _close(lhs, rhs, rtol=1e-5, atol=2e-5)
    _close(exact.objective_value(got_opt, jnp.asarray(ref32), jnp.asarray(reward32), beta), beta * log_z.mean(),
           rtol=1e-5, atol=2e-5)


# ============================================================================ 9. KL estimator defaults

# objective → (estimator built with its defaults, its documented KL estimator, KL differentiated in
# the loss?). PPO: eq. 12's per-token penalty in the reward; GRPO: eq. 15, k3 in the loss; RLOO: KL
# in the reward; DPO, SFT, RSFT estimate none (β enters DPO's implicit reward and RSFT's filter).
DEFAULT_KL = {"PPO": (PPO(), "k1", False), "GRPO": (GRPO(4), "k3", True), "RLOO": (RLOO(4), "k1", False),
              "DPO": (DPO(), None, False), "SFT": (SFT(), None, False), "RSFT": (RSFT(4), None, False)}
TINY_POLICY = Policy(arlm.ModelConfig.gpt2(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8))


@pytest.mark.parametrize("name", list(DEFAULT_KL))
def test_default_kl_estimator_of_each_objective(name):
    estimator, documented, _ = DEFAULT_KL[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no objective warns on its defaults
        obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1), estimator)
    assert obj.kl.estimator is None and obj.kl_estimator == documented
    assert f"kl_estimator={documented!r}" in repr(obj)                 # the default is visible
    assert obj.needs_logits() is False
    # a named estimator wins over the default
    for named in ("k2", "exact"):
        chosen = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1, named), estimator)
        assert chosen.kl_estimator == named and chosen.needs_logits() == (named == "exact")
    # replacing the estimator re-resolves a default (and keeps a named one)
    assert dataclasses.replace(obj, estimator=GRPO(4)).kl_estimator == "k3"
    assert dataclasses.replace(obj, estimator=RLOO(4)).kl_estimator == "k1"
    assert dataclasses.replace(chosen, estimator=PPO()).kl_estimator == "exact"
    if documented is None:                                              # nothing to estimate with
        out = PolicyOutputs(jnp.zeros((1, 2)), jnp.ones((1, 2)))
        with pytest.raises(ValueError, match=f"{name} has no default KL estimator"):
            obj.token_kl(out, jnp.zeros((1, 2)))


def test_k1_in_a_loss_warns_but_is_honoured():
    with pytest.warns(UserWarning, match="zero expected gradient"):
        obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1, "k1"), GRPO(4))
    assert obj.kl_estimator == "k1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # k1 in a reward is right: no warning
        for estimator in (PPO(), RLOO(4)):
            KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1, "k1"), estimator)
        KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.0, "k1"), GRPO(4))   # β = 0: no penalty to lose


def _load_config(name: str):
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_alignment_job_and_convergence_kl_estimators():
    """The estimators the experiments actually run with: the alignment job (default config) and the
    π* convergence study."""
    from arlm.alignment import convergence, job
    cfg = _load_config("align")
    want_job = {"rlhf_ppo": "k1", "rlvr_ppo": "k1", "rlvr_grpo": "k3", "rlvr_rloo": "k1", "dpo": None, "rsft": None}
    assert set(want_job) == set(job.METHODS)
    for method, want in want_job.items():
        obj = job._objective(method, TINY_POLICY.config, cfg)
        assert obj.kl_estimator == want, method
        assert obj.kl.beta == cfg.beta[method]
    # the study names its estimators (k1 for DPO and RSFT is unused: they estimate no KL)
    want_study = {"ppo": "k1", "grpo": "k3", "grpo_unscaled_k2": "k2", "rloo": "k1", "dpo": "k1", "rsft": "k1"}
    assert set(want_study) == set(convergence.METHODS)
    for method, want in want_study.items():
        assert convergence.make_objective(method, convergence.Problem(), 4).kl_estimator == want, method


def _categorical(seed: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits θ_ref and θ = θ_ref + scale·noise of a categorical over V = 6 tokens (float32)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=6)
    return (ref + scale * rng.normal(size=6)).astype(np.float32), ref.astype(np.float32)


def np_kl_gradients(theta, theta_ref) -> tuple[np.ndarray, np.ndarray]:
    """Closed forms in float64, w.r.t. the logits θ of π = softmax(θ), π_ref = softmax(θ_ref):
    ∇KL(π ‖ π_ref) = π ⊙ (log π − log π_ref − KL)  and  ∇KL(π_ref ‖ π) = π − π_ref."""
    lp, lq = np_log_softmax(theta), np_log_softmax(theta_ref)
    p, q = np.exp(lp), np.exp(lq)
    kl = float(np.sum(p * (lp - lq)))
    return p * (lp - lq - kl), p - q


def _token_rows(obj: KLObjective, theta, theta_ref):
    """The objective's per-token KL estimate for each possible sampled token v (row v, T = 1), and
    log π_θ(v): a [V] "batch" holding every outcome, for exact expectations by enumeration."""
    v = theta.shape[-1]
    logp_V = jax.nn.log_softmax(theta)
    ref_logp_V = jax.nn.log_softmax(theta_ref)
    out = PolicyOutputs(logp_V[:, None], jnp.ones((v, 1)), jnp.broadcast_to(theta, (v, 1, v)))
    ref = PolicyOutputs(ref_logp_V[:, None], jnp.ones((v, 1)), jnp.broadcast_to(theta_ref, (v, 1, v)))
    return obj.token_kl(out, ref_logp_V[:, None], ref)[:, 0], logp_V


def expected_in_loss_gradient(obj: KLObjective, theta, theta_ref) -> np.ndarray:
    """∇_θ E_{v~π_θ}[KL estimate(v)] with the samples held fixed (what a loss that adds β·KL_t at
    sampled tokens differentiates): Σ_v π(v) ∇ estimate(v), π(v) not differentiated."""
    def term(t):
        kl_V, logp_V = _token_rows(obj, t, jnp.asarray(theta_ref))
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp_V)) * kl_V)
    return _f64(jax.grad(term)(jnp.asarray(theta)))


def expected_reward_gradient(obj: KLObjective, theta, theta_ref) -> np.ndarray:
    """The score-function gradient of a KL that enters the reward: E_{v~π}[KL estimate(v) ∇log π(v)]."""
    def surrogate(t):
        kl_V, logp_V = _token_rows(obj, t, jnp.asarray(theta_ref))
        weight_V = jax.lax.stop_gradient(jnp.exp(logp_V) * kl_V)
        return jnp.sum(weight_V * logp_V)
    return _f64(jax.grad(surrogate)(jnp.asarray(theta)))


def _cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# float32 log-softmax and exp on O(1) logits: gradients of size O(0.1) to within ~1e-7 absolute.
G_RTOL, G_ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_default_kl_in_loss_has_the_kl_gradient(seed):
    """GRPO's default (k3) in the loss: its expected gradient, by enumeration over V = 6 tokens, is
    exactly ∇KL(π_ref ‖ π) (closed form), nonzero, and near π_ref points along ∇KL(π ‖ π_ref) (the KL
    that eq. 9 penalises). k2 and exact give ∇KL(π ‖ π_ref) itself; k1 gives 0 (why it is not the default)."""
    estimator, documented, in_loss = DEFAULT_KL["GRPO"]
    assert in_loss and documented == "k3"
    theta, theta_ref = _categorical(seed, scale=0.5)
    reverse, forward = np_kl_gradients(theta, theta_ref)
    assert np.linalg.norm(reverse) > 0.05                               # π is visibly off π_ref
    obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1), estimator)
    got = expected_in_loss_gradient(obj, theta, theta_ref)
    _close(got, forward, G_RTOL, G_ATOL)
    assert np.linalg.norm(got) > 0.5 * np.linalg.norm(reverse)
    assert _cosine(got, reverse) > 0.9
    for named in ("k2", "exact"):
        obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1, named), estimator)
        _close(expected_in_loss_gradient(obj, theta, theta_ref), reverse, G_RTOL, G_ATOL, err_msg=named)
    with pytest.warns(UserWarning, match="zero expected gradient"):
        obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1, "k1"), estimator)
    assert np.max(np.abs(expected_in_loss_gradient(obj, theta, theta_ref))) < G_ATOL


def test_k3_in_loss_direction_holds_only_near_the_reference():
    """The limit of "near π_ref": for a policy far from π_ref, k3's gradient (the forward KL's) can point
    against the reverse KL's. (A pair found by random search; k2 and exact have no such limit.)"""
    p = np.array([9.35e-2, 4.57e-6, 1.227e-2, 4.039e-2, 4.427e-4, 8.5339e-1])
    q = np.array([1.571e-3, 5.5963e-1, 3.974e-4, 8.185e-4, 4.1028e-1, 2.730e-2])
    theta, theta_ref = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    reverse, forward = np_kl_gradients(theta, theta_ref)
    obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1), GRPO(4))
    got = expected_in_loss_gradient(obj, theta, theta_ref)
    _close(got, forward, G_RTOL, G_ATOL)
    assert _cosine(got, reverse) < -0.4


@pytest.mark.parametrize("name", ["PPO", "RLOO"])
@pytest.mark.parametrize("seed", range(3))
def test_default_kl_in_reward_has_the_kl_gradient(name, seed):
    """PPO and RLOO put the KL in the reward: its score-function term E_{v~π}[k1(v) ∇log π(v)] is
    exactly ∇KL(π ‖ π_ref) (k1 summed over a response is log π_θ/π_ref, so this is REINFORCE on it)."""
    estimator, documented, in_loss = DEFAULT_KL[name]
    assert documented == "k1" and not in_loss
    theta, theta_ref = _categorical(seed, scale=1.0)
    reverse, _ = np_kl_gradients(theta, theta_ref)
    obj = KLObjective(TINY_POLICY, kl_lib.KLRegularizer(0.1), estimator)
    got = expected_reward_gradient(obj, theta, theta_ref)
    _close(got, reverse, G_RTOL, G_ATOL)
    assert np.linalg.norm(got) > 0.05
