"""Alignment end to end (eqs. 9–15): rollouts → trainer → π*.

  * the trainer's recomputed log π_θ equals the sampler's, token for token (τ = 1, no truncation),
    for GPT-2 and a Llama with GQA, through `policy_outputs`, `KLObjective.prepare` and a LoRA
    policy under the `Trainer`;
  * with LoRA the reference policy is the base model with the adapter off: it never moves, only
    adapter leaves train, and the policy starts exactly at π_ref;
  * a Bradley–Terry reward model (eq. 11) learns a known reward from preference pairs;
  * every estimator (PPO, GRPO, RLOO, DPO, RSFT) moves π_θ toward π* ∝ π_ref exp(r/β) (eq. 10) on a
    problem small enough to compute KL(π_θ ‖ π*) and J exactly (`arlm.jobs.pistar`);
  * the errors that the estimators and rollout helpers promise.

Loss formulas against numpy and finite-difference gradients live in test_objectives.py and
test_alignment_grads.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _params import random_params

from arlm import ModelConfig, Sampler, apply_model, init_params
from arlm.alignment.rollout import preference_pairs, sample_rollout
from arlm.alignment.trainer import Trainer, exact_kl_to
from arlm.jobs import pistar
from arlm.model.log_probs import policy_outputs, sequence_batch
from arlm.model.lora import LoraConfig, count_lora_params, init_lora, merge_lora
from arlm.objectives.heads import init_reward_model, reward_model_scores
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import DPO, GRPO, RLOO, RSFT, KLObjective, Policy
from arlm.objectives.preference import bradley_terry_loss
from arlm.sharding import MeshConfig, batch_sharding, make_mesh
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

V, N_NEW, MAX_LEN = 13, 8, 16
EOS = 4
K = 3
# Ragged prompts of lengths 1..7 (and one more of 3 so that 8 prompts × K rows split over 8 devices).
PROMPTS = [[(5 * i + 3 * j + 1) % V for j in range(n)] for i, n in enumerate([1, 2, 3, 4, 5, 6, 7, 3])]
LOGP_TOL = 1e-5      # float32 KV-cache decode vs one full forward pass; measured ≤ 4e-6

FAMILIES = {
    # learned positions: a wrong position under left-padding changes every log-prob
    "gpt2": ModelConfig.gpt2(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=MAX_LEN),
    # RoPE, RMSNorm, SwiGLU, 2 key/value heads for 4 query heads, untied unembedding
    "llama_gqa": ModelConfig.llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                   max_seq_len=MAX_LEN, tie_embeddings=False),
}
LORA = LoraConfig(rank=2, alpha=4.0)


_policy_outputs = jax.jit(policy_outputs, static_argnums=0)


def one_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def model(name: str):
    config = FAMILIES[name]
    return config, random_params(config, seed=list(FAMILIES).index(name))


def random_adapter(params, seed: int, scale: float = 0.3):
    """A LoRA adapter with non-zero a and b (init's b = 0 would make the adapter invisible)."""
    lora = init_lora(LORA, params, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), lora)


def count_rewards(rollout, token: int = 3) -> np.ndarray:
    """Reward = how often `token` appears in each response (a simple function of the token ids)."""
    valid = np.arange(rollout.response_BxN.shape[1])[None, :] < rollout.lengths_B[:, None]
    return ((rollout.response_BxN == token) & valid).sum(-1).astype(np.float32)


def response_logp(logp_BxT, rollout) -> np.ndarray:
    """The trainer's [B, T − 1] target log-probs → [B, N] aligned with the sampler's response tokens.

    Target index t scores token t + 1, so response token j (at sequence index P + j) is target P − 1 + j.
    Also checks that nothing outside the response is scored."""
    logp = np.asarray(logp_BxT)
    p, n = rollout.prompt_width, rollout.response_BxN.shape[1]
    assert logp.shape == (len(rollout.lengths_B), p + n - 1)
    assert np.all(logp[:, :p - 1] == 0.0), "prompt positions must carry no log-prob"
    return logp[:, p - 1:]


def check_matches_sampler(logp_BxT, rollout, what: str) -> float:
    resp = response_logp(logp_BxT, rollout)
    after = np.arange(resp.shape[1])[None, :] >= rollout.lengths_B[:, None]
    assert np.all(resp[after] == 0.0), f"{what}: log-probs after a row's stop must be exactly 0"
    assert np.all(rollout.sampler_logp_BxN[after] == 0.0)
    assert np.all(rollout.sampler_logp_BxN[~after] < 0.0)
    err = float(np.max(np.abs(resp - rollout.sampler_logp_BxN)))
    print(f"{what}: max |trainer − sampler| log-prob = {err:.2e}")
    assert err <= LOGP_TOL, f"{what}: trainer log-probs differ from the sampler's by {err}"
    return err


def check_rollout_shape(rollout):
    lengths = rollout.lengths_B
    assert rollout.response_BxN.shape == (len(PROMPTS) * K, N_NEW)
    np.testing.assert_array_equal(rollout.prompt_index_B, np.repeat(np.arange(len(PROMPTS)), K))
    # the EOS makes some rows stop early while others run to N_NEW: both cases are exercised
    assert np.any(lengths < N_NEW) and np.any(lengths == N_NEW), lengths
    for row, n in zip(rollout.response_BxN, lengths):
        assert (row[:n - 1] != EOS).all() and (n == N_NEW or row[n - 1] == EOS)
    # the batch holds exactly the sampled tokens after the (left-padded) prompt
    p = rollout.prompt_width
    valid = np.arange(N_NEW)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(np.where(valid, rollout.batch["tokens"][:, p:], -1),
                                  np.where(valid, rollout.response_BxN, -1))
    np.testing.assert_array_equal(rollout.batch["response_mask"][:, p:], valid.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# 1. The trainer's log-probs are the sampler's
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_trainer_logp_equals_sampler_logp(name):
    config, params = model(name)
    rollout = sample_rollout(config, params, PROMPTS, K, jax.random.PRNGKey(7), max_new_tokens=N_NEW,
                             sampler=Sampler(temperature=1.0), eos_id=EOS)
    check_rollout_shape(rollout)

    out = _policy_outputs(config, params, rollout.batch)
    check_matches_sampler(out.logp_BxT, rollout, f"{name} policy_outputs")
    np.testing.assert_array_equal(response_logp(out.mask_BxT, rollout),
                                  (np.arange(N_NEW)[None, :] < rollout.lengths_B[:, None]).astype(np.float32))

    # the "old_logp" (and, with π_θ = π_ref, the "ref_logp") that KLObjective.prepare stores
    objective = KLObjective(Policy(config), KLRegularizer(0.1), GRPO(group_size=K))
    prepared = jax.jit(objective.prepare)({"policy": params}, dict(rollout.batch, rewards=count_rewards(rollout)),
                                          {"ref": params})
    check_matches_sampler(prepared["old_logp"], rollout, f"{name} KLObjective.prepare old_logp")
    check_matches_sampler(prepared["ref_logp"], rollout, f"{name} KLObjective.prepare ref_logp")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trainer_logp_equals_sampler_logp_lora(name):
    """A LoRA policy under the Trainer (default mesh: the batch split over 8 devices): samples from
    Trainer.policy_params() (the merged weights), recomputes log π_θ through the adapter."""
    config, base = model(name)
    objective = KLObjective(Policy(config, LORA), KLRegularizer(0.1), GRPO(group_size=K))
    trainer = Trainer(objective, base, optax.sgd(0.0))
    adapter = random_adapter(base, seed=3)
    adapter = jax.tree_util.tree_map(lambda new, old: jax.device_put(new, old.sharding),
                                     adapter, trainer.state.params["policy"])
    trainer.state = trainer.state.replace(params={"policy": adapter})

    merged = trainer.policy_params()
    expected = merge_lora(LORA, base, adapter)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    rollout = trainer.rollout(PROMPTS, K, max_new_tokens=N_NEW, eos_id=EOS)
    check_rollout_shape(rollout)
    out = jax.jit(objective.policy.outputs)({"policy": adapter}, trainer.frozen, rollout.batch)
    check_matches_sampler(out.logp_BxT, rollout, f"{name} LoRA Policy.outputs")
    prepared = trainer.prepare(dict(rollout.batch, rewards=count_rewards(rollout)))
    check_matches_sampler(prepared["old_logp"], rollout, f"{name} LoRA Trainer.prepare old_logp")
    # the reference is the base model: the adapter must make a visible difference
    ref_gap = np.max(np.abs(response_logp(prepared["ref_logp"], rollout) - rollout.sampler_logp_BxN))
    assert ref_gap > 0.05, ref_gap


# ----------------------------------------------------------------------------------------------
# 2. LoRA: π_ref is the base model, frozen; only the adapter trains
# ----------------------------------------------------------------------------------------------

def _leaf_paths(tree):
    return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_lora_reference_policy():
    config, ref_params = model("gpt2")
    original = jax.tree_util.tree_map(np.array, ref_params)
    objective = KLObjective(Policy(config, LORA), KLRegularizer(0.1), GRPO(group_size=4))
    trainer = Trainer(objective, ref_params, optax.adam(1e-2), mesh=one_device_mesh())

    # only adapter leaves are trained: {"policy": {<weight path>: {"a", "b"}}}, one pair per target
    assert set(trainer.state.params) == {"policy"}
    trained = _leaf_paths(trainer.state.params["policy"])
    projections = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out", "w_in"}     # by hand, not from arlm
    targets = {p for p in _leaf_paths(ref_params) if p[-1] in projections}
    assert targets and {p[:-1] for p in trained} == targets
    assert all(p[-1] in ("a", "b") for p in trained) and len(trained) == 2 * len(targets)
    ref_leaves = _leaf_paths(ref_params)
    for w_path in targets:
        a, b = trained[w_path + ("a",)], trained[w_path + ("b",)]
        w = ref_leaves[w_path]
        assert a.shape[-1] == b.shape[-2] == LORA.rank and a.shape[:-2] == b.shape[:-2], (w_path, a.shape, b.shape)
        assert np.prod(a.shape[:-1]) * b.shape[-1] == w.size, (w_path, a.shape, b.shape, w.shape)
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(ref_params))
    assert count_lora_params(trainer.state.params["policy"]) < n_base / 4

    # b = 0 at init: π_θ is exactly π_ref
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (4, 10)), jnp.int32)
    fwd = jax.jit(lambda p: apply_model(config, p, tokens).logits_BxTxV)
    np.testing.assert_array_equal(np.asarray(fwd(trainer.policy_params())), np.asarray(fwd(ref_params)))

    prompts = [[1, 2], [7], [3, 3, 5], [11, 0, 9, 2]]
    for _ in range(4):
        rollout = trainer.rollout(prompts, 4, max_new_tokens=6)
        metrics = trainer.update(dict(rollout.batch, rewards=count_rewards(rollout)))
        assert np.isfinite(metrics["loss"])

    # π_ref did not move, bit for bit, and neither did the caller's params
    frozen = _leaf_paths(jax.device_get(trainer.frozen["ref"]))
    caller = _leaf_paths(jax.device_get(ref_params))
    for p, x in _leaf_paths(original).items():
        np.testing.assert_array_equal(frozen[p], x, err_msg=str(p))
        np.testing.assert_array_equal(caller[p], x, err_msg=str(p))
    np.testing.assert_array_equal(np.asarray(fwd(trainer.reference_params())), np.asarray(fwd(ref_params)))

    # the policy moved: the adapter's b is no longer 0, KL(π_θ ‖ π_ref) > 0 on its own samples,
    # and the rewarded token became more likely
    assert any(np.any(np.asarray(x) != 0) for p, x in _leaf_paths(trainer.state.params["policy"]).items()
               if p[-1] == "b")
    rollout = trainer.rollout(prompts, 4, max_new_tokens=6)
    kl = float(exact_kl_to(config, trainer.policy_params(), trainer.reference_params(), rollout.batch))
    ref_logp3 = _logp_first_token(config, ref_params, prompts, 3)
    logp3 = _logp_first_token(config, trainer.policy_params(), prompts, 3)
    print(f"LoRA policy after 4 updates: KL to ref = {kl:.4f}; mean log π(3 | prompt) {ref_logp3:.3f} → {logp3:.3f}")
    assert kl > 1e-3
    assert logp3 > ref_logp3 + 0.1


def _logp_first_token(config, params, prompts, token) -> float:
    """Mean over prompts of log π(token | prompt) at the first response position."""
    batch = sequence_batch(*_left_pad(prompts), np.full((len(prompts), 1), token), np.ones(len(prompts), np.int32))
    return float(np.mean(np.asarray(_policy_outputs(config, params, batch).sequence_logp())))


def _left_pad(prompts):
    width = max(map(len, prompts))
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, width - len(p):] = p
    return out, np.asarray([width - len(p) for p in prompts], np.int32)


# ----------------------------------------------------------------------------------------------
# 3. A Bradley–Terry reward model learns a known reward (eq. 11)
# ----------------------------------------------------------------------------------------------

RM_V, RM_PROMPT, RM_RESPONSE = 12, 2, 6
RM_SCALE = 3.0       # reward units per raw point: P(correct label) = σ(3 · Δr) ≥ σ(1.5) = 0.82


def known_reward(tokens_BxT: np.ndarray) -> np.ndarray:
    """r = 3 · (#token 3 − #token 5 in the response + 0.5 · [first response token even])."""
    resp = tokens_BxT[:, RM_PROMPT:]
    return RM_SCALE * ((resp == 3).sum(-1) - (resp == 5).sum(-1) + 0.5 * (resp[:, 0] % 2 == 0))


def random_sequences(rng, n: int) -> np.ndarray:
    """Token 3 and 5 are drawn more often than the rest so that counts vary."""
    p = np.full(RM_V, 0.6 / (RM_V - 2))
    p[3] = p[5] = 0.2
    return rng.choice(RM_V, size=(n, RM_PROMPT + RM_RESPONSE), p=p).astype(np.int32)


def pair_arrays(a_BxT: np.ndarray, b_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Pairs [B, 2, T] (index 0 chosen) as sequence batches, full-length responses."""
    seqs = np.stack([a_BxT, b_BxT], 1).reshape(-1, a_BxT.shape[1])
    batch = sequence_batch(seqs[:, :RM_PROMPT], np.zeros(len(seqs), np.int32), seqs[:, RM_PROMPT:],
                           np.full(len(seqs), RM_RESPONSE, np.int32))
    return {k: v.reshape(-1, 2, v.shape[-1]) for k, v in batch.items() if k != "response_mask"}


@pytest.mark.slow
def test_reward_model_learns_known_reward():
    config = ModelConfig.gpt2(vocab_size=RM_V, d_model=32, n_layers=2, n_heads=4, max_seq_len=RM_PROMPT + RM_RESPONSE)
    rm_params = init_reward_model(init_params(config, jax.random.PRNGKey(0)), config)
    rng = np.random.default_rng(0)

    # training pairs, labelled by Bradley–Terry: P(a ≻ b) = σ(r_a − r_b)
    n_train = 8192
    a, b = random_sequences(rng, n_train), random_sequences(rng, n_train)
    a_wins = rng.random(n_train) < 1.0 / (1.0 + np.exp(-(known_reward(a) - known_reward(b))))
    chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    train = pair_arrays(chosen, rejected)

    def loss_fn(params, batch):
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
        s_Bx2 = reward_model_scores(config, params, flat).reshape(-1, 2)
        return jnp.mean(bradley_terry_loss(s_Bx2[:, 0], s_Bx2[:, 1])), {}

    mesh = one_device_mesh()
    optimizer = optax.adam(3e-3)
    state, sharding = state_from_params(rm_params, optimizer, mesh, MeshConfig(data=1), 0)
    step = make_train_step(loss_fn, optimizer, sharding, batch_sharding(mesh))
    batch_size, steps = 128, 200
    for i in range(steps):
        idx = rng.choice(n_train, batch_size, replace=False)
        state, metrics = step(state, {k: v[idx] for k, v in train.items()})
    final_loss = float(metrics["loss"])

    # held-out pairs of new sequences whose true rewards differ
    c, d = random_sequences(rng, 4000), random_sequences(rng, 4000)
    rc, rd = known_reward(c), known_reward(d)
    keep = rc != rd
    held = pair_arrays(c[keep], d[keep])
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in held.items()}
    scores = np.asarray(jax.jit(reward_model_scores, static_argnums=0)(config, state.params, flat)).reshape(-1, 2)
    accuracy = float(np.mean(np.sign(scores[:, 0] - scores[:, 1]) == np.sign(rc[keep] - rd[keep])))
    print(f"reward model: held-out accuracy {accuracy:.3f} on {keep.sum()} pairs; final train loss {final_loss:.3f}")
    assert accuracy > 0.90


# ----------------------------------------------------------------------------------------------
# 4. Every estimator moves π_θ toward π* (eq. 10), measured exactly
# ----------------------------------------------------------------------------------------------

# `pistar.run(method)` (defaults: 150 iterations, seed 0; deterministic on a given platform)
# records the exact KL(π_θ ‖ π*) and J(π_θ) after every update. Measured KL ratios
# (mean of the last 15 iterations / initial; seed 0, then the range over seeds 0–9 or 0–3) and the
# fraction of the gap J* − J_0 closed at the last iteration:
#
#   method            KL last-15 / KL_0            (J_final − J_0) / (J* − J_0)
#   ppo               0.084   [0.063, 0.088]        0.92   [0.92, 0.96]
#   rloo              0.016   [0.016, 0.021]        0.98   [0.98, 0.99]
#   grpo_unscaled_k2  0.084   [0.078, 0.086]        0.93   [0.89, 0.95]
#   dpo               0.223   [0.202, 0.353]        0.77   [0.65, 0.82]
#   rsft              0.333   [0.167, 0.434]        0.83   [0.46, 0.84]   (K = 64 per prompt; see below)
#   grpo              min over the first 60 iterations 0.327 [0.22, 0.39] (at iteration 19), then
#                     drifts back to ~1.0–1.2 × KL_0 (its fixed point is not π*; see pistar.py)
#
# Tolerances: the acceptance criteria are KL last-15 ≤ 0.35 KL_0 and J_final ≥ J_0 + 0.6 (J* − J_0).
# PPO, RLOO and mean-only GRPO with k2 sit 4× inside them, so they are held to a tighter 0.2 / 0.8
# (still 2× the worst seed). DPO keeps 0.35 / 0.6 (1.6× margin at seed 0). RSFT learns from the
# Boltzmann-accepted samples of π_ref (acceptance ≈ 5%); with K = 64 per prompt (about 6 kept per
# iteration) it met 0.35 / 0.6 at seed 0 only by 5% and missed it on 3 of 10 seeds, so the default
# is now K = 256 per prompt (about 25 kept), and it is held to the acceptance criteria 0.35 / 0.6.
# GRPO as eq. 15 writes it must first approach π* (min over the first 60 iterations ≤ 0.5 KL_0).
CONVERGENCE_TOL = {"ppo": (0.2, 0.8), "rloo": (0.2, 0.8), "grpo_unscaled_k2": (0.2, 0.8),
                   "dpo": (0.35, 0.6), "rsft": (0.35, 0.6)}
GRPO_MIN_KL_RATIO, GRPO_WINDOW = 0.5, 60


@pytest.mark.slow
@pytest.mark.parametrize("method", pistar.METHODS)
def test_each_method_moves_policy_toward_optimum(method):
    problem = pistar.Problem()
    history = pistar.run(method, problem)
    kl = np.asarray(history["kl_to_optimum"])
    j = np.asarray(history["objective"])
    j_star = history["optimum_objective"][0]
    assert len(kl) == len(j) == pistar.DEFAULT_RUNS[method].iterations + 1

    # every method starts at π_θ = π_ref, away from π*
    assert history["kl_to_ref"][0] <= 1e-6
    assert kl[0] > 0.1 and j[0] < j_star
    # the exact identity J(π) = J* − β KL(π ‖ π*) at every recorded point (eqs. 9–10)
    np.testing.assert_allclose(j, j_star - problem.beta * kl, rtol=0, atol=1e-4)

    ratio, closed = np.mean(kl[-15:]) / kl[0], (j[-1] - j[0]) / (j_star - j[0])
    i_min = int(np.argmin(kl[:GRPO_WINDOW + 1]))
    print(f"{method}: KL(π‖π*) {kl[0]:.4f} → last-15 mean {np.mean(kl[-15:]):.4f} (ratio {ratio:.3f}); "
          f"J {j[0]:.4f} → {j[-1]:.4f} of J* = {j_star:.4f} ({closed:.2f} of the gap); "
          f"min KL ratio in the first {GRPO_WINDOW}: {kl[i_min] / kl[0]:.3f} at iteration {i_min}")
    if method == "grpo":
        assert kl[i_min] <= GRPO_MIN_KL_RATIO * kl[0]
        assert j[i_min] > j[0]
        return
    max_ratio, min_closed = CONVERGENCE_TOL[method]
    assert ratio <= max_ratio, f"{method}: KL(π‖π*) only fell to {ratio:.3f} of its start"
    assert j[-1] > j[0] + min_closed * (j_star - j[0]), f"{method}: J closed only {closed:.2f} of the gap to J*"


# ----------------------------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------------------------

def _small_batch():
    """4 sequences (2-token prompts, 3-token responses), built directly: no sampling needed."""
    config, params = model("gpt2")
    tokens = np.arange(20, dtype=np.int32).reshape(4, 5) % V
    return config, params, sequence_batch(tokens[:, :2], np.zeros(4, np.int32), tokens[:, 2:], np.full(4, 3))


@pytest.mark.parametrize("estimator", [GRPO(group_size=3), RLOO(group_size=3), RSFT(group_size=3)])
def test_groups_must_divide_batch(estimator):
    config, params, batch = _small_batch()           # 4 rows: not a whole number of groups of 3
    objective = KLObjective(Policy(config), KLRegularizer(0.1), estimator)
    batch = dict(batch, rewards=np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match="whole number of groups"):
        objective.prepare({"policy": params}, batch, {"ref": params})


def test_unknown_rsft_filter():
    with pytest.raises(ValueError, match="unknown RSFT filter"):
        RSFT(group_size=2, filter="top_half")


def test_unknown_dpo_variant():
    """Caught when the estimator is built, before any trainer or compiled step exists."""
    with pytest.raises(ValueError, match="unknown DPO variant 'kto'"):
        DPO(variant="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(variant="robust", label_smoothing=0.5)


def test_sample_rollout_needs_k():
    config, params = model("gpt2")
    with pytest.raises(ValueError, match="k must be"):
        sample_rollout(config, params, [[1, 2]], 0, jax.random.PRNGKey(0), max_new_tokens=3)


def test_preference_pairs_drop_ties():
    rewards = np.asarray([1.0, 0.0, 2.0,     # group 0: best row 2, worst row 1
                          5.0, 5.0, 5.0,     # group 1: all equal → dropped
                          0.0, 3.0, 3.0,     # group 2: best row 7 (first max), worst row 6
                          -1.0, -1.0, -1.0], np.float32)
    chosen, rejected = preference_pairs(rewards, 3)
    np.testing.assert_array_equal(chosen, [2, 7])
    np.testing.assert_array_equal(rejected, [1, 6])
    assert np.all(rewards[chosen] > rewards[rejected])
