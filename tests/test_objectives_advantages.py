"""arlm.objectives.advantages: group-relative and leave-one-out advantages, GAE and whitening,
against float64 numpy loops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64

from arlm.objectives import advantages as adv_lib


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
