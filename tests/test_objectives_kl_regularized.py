"""arlm.objectives.kl_regularized: every composed estimator of eq. 9 (PPO, GRPO, RLOO, DPO, RSFT,
SFT) against an independent float64 numpy implementation of its formulas.

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
Where a float32 reduction or a forward pass sits in between, the tolerance is stated at the test."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numerics import close as _close
from _numerics import f64 as _f64
from _numerics import logp_pair as _logp_pair
from _numerics import np_best_of_k, np_dpo_loss, np_exact_kl, np_k, np_log_softmax, np_scalar_head
from _params import random_params

import arlm
from arlm.alignment.rollout import Rollout, pair_batch
from arlm.model.log_probs import sequence_batch
from arlm.objectives import heads
from arlm.objectives import kl as kl_lib
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy, estimate_objective

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
    return {"kl_seq_k1": np.mean([np.sum(_logp(w, "new", b) - _logp(w, "ref", b)) for b in range(B)]),
            "response_tokens": LENGTHS.mean()}


def _ratio_rows(w: World, clip_eps: float):
    rows = [np.exp(_logp(w, "new", b) - _logp(w, "old", b)) for b in range(B)]
    flat = np.concatenate(rows)
    # the clip indicator is discontinuous at 1 ± ε: make sure no ratio is near enough to flip in float32
    assert np.min(np.abs(flat[:, None] - np.array([1 - clip_eps, 1 + clip_eps])[None])) > 1e-4
    return rows


def _np_clipped_surrogate(rho, a, eps):
    """Eq. 12's clipped surrogate per token, −min(ρA, clip(ρ, 1 ± ε)A), and TRL's clip indicator."""
    return (-np.minimum(rho * a, np.clip(rho, 1 - eps, 1 + eps) * a),
            ((rho > 1 + eps) & (a > 0)) | ((rho < 1 - eps) & (a < 0)))


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
        pg, clipped = _np_clipped_surrogate(ratios[b], adv[b], est.clip_eps)
        pg_rows.append(pg)
        clip_rows.append(clipped)
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
        pg, clipped = _np_clipped_surrogate(ratios[b], a_b[b], est.clip_eps)
        pg_rows.append(pg)
        clip_rows.append(clipped)
        kl_rows.append(_token_kl(w, "new", b, kl_est))
    reduce = _token_mean if est.reduction == "token" else _seq_mean
    loss = reduce([p + beta * k for p, k in zip(pg_rows, kl_rows)])
    metrics = dict(_common(w), pg_loss=reduce(pg_rows), **{f"kl_token_{kl_est}": reduce(kl_rows)},
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
            prepared = obj.prepare(p_old, data, {"ref": ref}, key)
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
        obj.prepare({"policy": w.params["old"]}, w.batch, {"ref": w.params["ref"]})
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
