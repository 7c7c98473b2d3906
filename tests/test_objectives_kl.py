"""arlm.objectives.kl: the k1/k2/k3/exact estimators against float64 numpy and closed forms, and
which estimator each objective uses by default and why (its gradient is the KL's)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64
from _numerics import logp_pair as _logp_pair
from _numerics import np_exact_kl, np_k, np_log_softmax

import arlm
from arlm.model.log_probs import PolicyOutputs
from arlm.objectives import kl as kl_lib
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy


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
    from arlm.jobs import align as job
    from arlm.jobs import pistar as convergence
    cfg = _load_config("align")
    want_job = {"rlhf_ppo": "k1", "rlvr_ppo": "k1", "rlvr_grpo": "k3", "rlvr_rloo": "k1", "dpo": None, "rsft": None}
    assert set(want_job) == set(job.METHODS)
    for method, want in want_job.items():
        obj = job._objective(method, TINY_POLICY.config, cfg)
        assert obj.kl_estimator == want, method
        assert obj.kl.beta == cfg.beta[method]
    # the study builds its objectives from the same registry (arlm.alignment.methods)
    want_study = {"ppo": "k1", "grpo": "k3", "grpo_unscaled_k2": "k2", "rloo": "k1", "dpo": None, "rsft": None}
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
