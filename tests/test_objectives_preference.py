"""arlm.objectives.preference: Bradley–Terry and the DPO variants against TRL's formulas in numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64
from _numerics import np_dpo_loss, np_log_sigmoid

from arlm.objectives import preference as pref


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
