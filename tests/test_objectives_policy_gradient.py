"""arlm.objectives.policy_gradient: masked means, REINFORCE and the clipped surrogate and value
losses, against float64 numpy (TRL's conventions where it documents them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64

from arlm.objectives import policy_gradient as pg


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
