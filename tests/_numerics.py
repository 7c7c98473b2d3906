"""Float64 numpy references shared by the objective tests (and the tolerance convention they use:
elementwise formulas on float32 inputs get rtol 1e-5, atol 1e-6)."""

from __future__ import annotations

import numpy as np

RTOL, ATOL = 1e-5, 1e-6


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def close(got, want, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(f64(got), f64(want), rtol=rtol, atol=atol, err_msg=err_msg)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = f64(x)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_log_sigmoid(x) -> np.ndarray:
    return -np.logaddexp(0.0, -f64(x))


def np_logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def np_scalar_head(head, h):
    h = f64(h)
    hn = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6)
    return hn @ f64(head["w"]) + float(head["b"])


def logp_pair(seed, shape=(5, 9)):
    """Sampled-token log-probs of π_θ and π_ref, float32, Δ spread over about ±4."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.01, 1.0, shape))
    ref = logp + rng.normal(0.0, 1.5, shape)
    ref[0, :3] = logp[0, :3] + np.array([0.0, 1e-3, -1e-3])      # Δ = 0 and tiny Δ (k3's cancellation)
    return logp.astype(np.float32), np.minimum(ref, 0.0).astype(np.float32)


def np_k(name: str, logp, ref) -> np.ndarray:
    d = f64(ref) - f64(logp)
    return {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1.0}[name]


def np_exact_kl(logits, ref_logits) -> np.ndarray:
    lp, lq = np_log_softmax(logits), np_log_softmax(ref_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_dpo_loss(h, beta, variant, eps):
    """TRL DPOTrainer's `loss_type` formulas, from the log-ratio margin h."""
    h = f64(h)
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


def np_best_of_k(r, min_reward=-np.inf):
    keep = np.zeros(r.shape, np.float32)
    for g, row in enumerate(r):
        best = 0
        for i in range(1, len(row)):
            if row[i] > row[best]:                                        # strict: ties keep the first
                best = i
        keep[g, best] = float(row[best] >= min_reward)
    return keep
