"""Gradients of the alignment losses against finite differences on tiny models.

Covered: every estimator of the KL-regularized objective (eq. 9, `arlm/objectives/kl_regularized.py`):
PPO, GRPO (KL k3 / k2 / exact × reduction token / sequence), RLOO, DPO (sigmoid, robust, hinge, ipo),
SFT and RSFT; the Bradley–Terry reward-model loss (eq. 11); and a LoRA policy (eq. 24, gradients
w.r.t. the adapter only). Each loss ℓ(θ) = objective.loss(θ, prepare(θ_old, batch), {"ref": π_ref})
is taken at θ, θ_old and π_ref all different (ratios ≠ 1, KL ≠ 0), on sequence batches with
left-padded prompts and ragged responses, on a GPT-2 and a Llama (grouped-query attention) model.

The check. With g = jax.grad(ℓ)(θ), for unit directions d in parameter space,
    ⟨g, d⟩ = d/dt ℓ(θ + t d)|₀,
the right side by finite differences. Directions: random ones over all leaves at once, the gradient
direction g/‖g‖ (a wrong magnitude or a missing term shows up at full size there) and, per leaf, a
random direction and the leaf's own gradient direction (so every leaf's block of g is checked).

Precision. The model computes in float32 whatever the input dtype (see tests/test_differentiable.py),
so these are finite differences of a float32 function. A 6th-order central stencil keeps truncation
(O(h⁶)) small at a step h = 4e-3, where the rounding error ≈ δ/h (δ ~ 1e-7, the float32 noise of ℓ)
is ~1e-5 of ‖g‖. Scanning h, the worst max |fd − ad| / ‖g‖ over all cases was 9e-5 (h = 2e-3),
4e-5 (3e-3 and 4e-3), 5e-5 (5e-3) and 3e-4 (7e-3; truncation grows as h⁶ where ‖g‖ is large).
The tolerance is relative to ‖g‖, not to |⟨g, d⟩|: the FD error is an absolute noise that does not
shrink with the directional derivative (a random direction in n dimensions sees only ~‖g‖/√n of
the gradient), while ‖g‖ is the largest directional derivative, the one g/‖g‖ measures. TOL = 4e-4
is 10× the worst error measured at h = 4e-3 (3.8e-5). Wrong gradients are far above it: injecting
errors (by monkeypatching, while writing this test) gave max |fd − ad| / ‖g‖ = 3.5e-2 for the k3
KL's gradient dropped, 1.6e-2 for the exact KL's probabilities stop-gradiented, 0.65 for a
straight-through clip, 1.0 for a halved DPO gradient, 6.8e-2 for no gradient to LoRA's b and
1.0e-3 for a 1% error in the 16 entries of the reward head's w; the PPO control below is 1.4e-2.

Genericity. FD only measures the gradient where ℓ is smooth over the whole stencil θ ± 3h d, and
some losses bend: the clipped ratio of PPO/GRPO at ρ = 1 ± ε (the side the advantage's sign picks),
PPO's clipped value loss at |V − V_old| = ε_v (and, outside, where its two squares are equal), the
hinge DPO loss at βh = 1. There, every kink quantity must be away from its kink at θ (ρ by ≥ 1e-2,
V − V_old by ≥ 1e-2, βh by ≥ 0.05) and keep its sign at every stencil point, so FD and AD see the
same smooth piece; and both sides of each kink must occur (some tokens clipped, some not; some hinge
pairs active, some not), so the zero-gradient branches are checked too. PPO/GRPO's ε and ε_v
(which `prepare` does not read) are picked from a grid as far as possible from the batch's ratios.

Stop-gradients. PPO's value head reads the policy's hidden state through a stop-gradient (the value
loss does not move the policy's weights; see the PPO docstring). AD of the PPO loss is therefore the
gradient of pg_loss(θ_policy) + c·v_loss(θ_value; hidden held at θ), and that is the function
differentiated numerically: the pg_loss metric along d, plus the loss along d's value-head part. The
frozen reference π_ref gets exactly zero gradient (differentiating w.r.t. frozen too); with LoRA the
frozen base weights are inside π_θ, so there they get a gradient (which shows the check is not vacuous).

Measured errors are printed with `pytest -s`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params
from jax.flatten_util import ravel_pytree

from arlm import ModelConfig
from arlm.model.log_probs import sequence_batch
from arlm.model.lora import LoraConfig
from arlm.objectives.heads import init_reward_model, reward_model_scores, scalar_head
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import DPO, GRPO, PPO, RLOO, RSFT, SFT, KLObjective, Policy, preference_rows
from arlm.objectives.preference import bradley_terry_loss, dpo_margin

V = 11
MODELS = {
    # GPT-2 family: learned positions, LayerNorm with biases, GELU MLP, tied embeddings.
    "gpt2": ModelConfig.gpt2(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16),
    # Llama family: RoPE, RMSNorm, SwiGLU, untied head, 4 query heads sharing 2 key/value heads (GQA).
    "llama": ModelConfig.llama(vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                               max_seq_len=16, tie_embeddings=False),
}
G, K, P, N = 2, 3, 4, 5          # G prompts × K samples; prompts left-padded to P; responses of 1..N tokens
PAIRS = 4                        # preference pairs

# 6th-order central difference: f'(0) ≈ Σ_k c_k (f(k h) − f(−k h)) / h, error O(h⁶); see the docstring.
STENCIL = ((1, 45 / 60), (2, -9 / 60), (3, 1 / 60))
FD_STEP = 4e-3
OFFSETS = (-3, -2, -1, 0, 1, 2, 3)       # the stencil's points in units of h (0: where kinks are checked)
TOL = 4e-4                               # |fd − ad| ≤ TOL ‖g‖ for every unit direction
N_RANDOM = 3                             # random unit directions over all leaves at once
RATIO_MARGIN = VALUE_MARGIN = 1e-2       # no ρ within 1e-2 of its kink 1 ± ε, no V − V_old within 1e-2 of ±ε_v
HINGE_MARGIN = 0.05                      # no βh within 0.05 of 1
CLIP_RANGES = tuple(float(x) for x in np.round(np.arange(0.10, 0.405, 0.01), 2))   # candidate ε and ε_v

# A tiny model's loss takes seconds to compile on CPU and well under a millisecond to run: each
# function is compiled once per case, without XLA's costlier CPU passes (a ~4× faster compile,
# the same float32 arithmetic up to rounding).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                    "xla_cpu_use_fusion_emitters": False}


def _compile(fun, *args):
    lowered = jax.jit(fun).lower(*args)
    try:
        return lowered.compile(compiler_options=COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:      # an XLA that no longer knows one of these options
        return lowered.compile()


# ----------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------

def _noise_like(tree, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), tree)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


@functools.lru_cache(maxsize=None)
def reference(model: str):
    """(config, π_ref's params): random, far from init (tests/_params.py)."""
    config = MODELS[model]
    return config, random_params(config, seed=list(MODELS).index(model))


def _sequences(rng, prompts, starts) -> dict:
    """Sequence batch: the left-padded prompts (row b starts at starts[b]), random responses of 1..N tokens."""
    b = len(prompts)
    return sequence_batch(prompts, starts, rng.integers(0, V, size=(b, N)), rng.integers(1, N + 1, size=b))


def _jnp(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def online_batch(seed: int = 0) -> dict:
    """G prompts × K samples (a prompt's K samples in consecutive rows), rewards [B]."""
    rng = np.random.default_rng(100 + seed)
    prompts = np.repeat(rng.integers(0, V, size=(G, P)), K, axis=0)
    starts = np.repeat(rng.integers(0, 3, size=G), K)
    batch = _sequences(rng, prompts, starts)
    batch["rewards"] = rng.standard_normal(G * K).astype(np.float32)
    return _jnp(batch)


@functools.lru_cache(maxsize=None)
def pair_batches(seed: int = 0) -> tuple[dict, dict]:
    """(chosen, rejected): two sequence batches [PAIRS, T] with the same prompts."""
    rng = np.random.default_rng(200 + seed)
    prompts, starts = rng.integers(0, V, size=(PAIRS, P)), rng.integers(0, 3, size=PAIRS)
    return _jnp(_sequences(rng, prompts, starts)), _jnp(_sequences(rng, prompts, starts))


def pair_batch(seed: int = 0) -> dict:
    """A preference batch: the two stacked on axis 1, every array [PAIRS, 2, T], chosen at index 0."""
    chosen, rejected = pair_batches(seed)
    return {k: jnp.stack([chosen[k], rejected[k]], axis=1) for k in chosen}


# ----------------------------------------------------------------------------------------------
# Kinks: signed distances from each sample to where the loss bends (inf for samples with none)
# ----------------------------------------------------------------------------------------------

def _ratio_kinks(ratio, adv, mask, clip_eps):
    """−min(ρA, clip(ρ, 1 − ε, 1 + ε)A) bends at ρ = 1 + ε where A > 0 and at ρ = 1 − ε where A < 0."""
    edge = jnp.where(adv > 0, 1.0 + clip_eps, 1.0 - clip_eps)
    return jnp.where((mask > 0) & (adv != 0), ratio - edge, jnp.inf).ravel()


def _clipped(ratio, adv, mask, clip_eps):
    """Where the clipped term is the minimum (PPO's clip_fraction), on the mask."""
    return ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))


def _value_kinks(v, old_v, returns, mask, value_clip):
    """½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²) bends at |V − V_old| = ε_v and, outside
    that range, where the two squares are equal (inside it they are the same function of V)."""
    dv = v - old_v
    v_clipped = old_v + jnp.clip(dv, -value_clip, value_clip)
    gap = jnp.square(v - returns) - jnp.square(v_clipped - returns)
    live = mask > 0
    return jnp.concatenate([jnp.where(live, jnp.abs(dv) - value_clip, jnp.inf).ravel(),
                            jnp.where(live & (jnp.abs(dv) > value_clip), gap, jnp.inf).ravel()])


def _most_generic(distances: Callable[[float], Any]) -> float:
    """The clip range in CLIP_RANGES whose kinks lie farthest from every sample."""
    return max(CLIP_RANGES, key=lambda c: float(np.min(np.abs(np.asarray(distances(c))))))


# ----------------------------------------------------------------------------------------------
# Problems: the loss, the function to finite-difference, its kinks, the point
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    loss: Callable                  # (params, frozen) → scalar: what autodiff differentiates
    fd: Callable                    # (θ, θ + t d, frozen) → scalar whose t-derivative at 0 is ⟨g, d⟩
    kinks: Callable | None          # (θ, θ + t d, frozen) → signed kink distances / margin, [k]
    params: Any
    frozen: Any
    frozen_grad: str                # "zero" (frozen π_ref), "nonzero" (LoRA base weights) or "none"
    regimes: dict                   # fraction of samples on the bent side of each kink: must be in (0, 1)
    unused: tuple[str, ...] = ()    # leaves (keystr prefixes) the loss does not depend on: zero gradient


def _policy_params(obj: KLObjective, ref, seed: int, move: float):
    """init_params moved away from π_ref: params + noise, or a random non-zero adapter (init has b = 0);
    PPO's value head random (init is 0)."""
    params = obj.init_params(ref, jax.random.PRNGKey(seed))
    if obj.policy.lora is not None:
        return dict(params, policy=_noise_like(params["policy"], seed, 0.3))
    moved = dict(params, policy=_add(params["policy"], _noise_like(params["policy"], seed, move)))
    if "value" in params:
        moved["value"] = _noise_like(params["value"], seed + 1, 1.0)
    return moved


def kl_problem(model: str, estimator, kl: KLRegularizer, *, pairs: bool = False, lora: LoraConfig | None = None,
               seed: int = 0, move: float = 0.1, old_move: float = 0.1) -> Problem:
    config, ref = reference(model)
    obj = KLObjective(Policy(config, lora), kl, estimator)
    frozen = {"ref": ref}
    params = _policy_params(obj, ref, seed, move)
    old = _add(params, _noise_like(params, seed + 7, old_move))
    ppo, clip = isinstance(estimator, PPO), isinstance(estimator, (PPO, GRPO))
    hinge = isinstance(estimator, DPO) and estimator.variant == "hinge"

    def prepare(old, params, frozen, batch, key):
        """The prepared batch, and at θ: ρ, the mask and V (PPO/GRPO) or the DPO margins h."""
        batch = obj.prepare(old, batch, frozen, key)
        if clip:
            out = obj.policy.outputs(params, frozen, batch, hidden=ppo)
            values = scalar_head(params["value"], out.hidden_BxTxD) if ppo else None
            return batch, (jnp.exp(out.logp_BxT - batch["old_logp"]), out.mask_BxT, values)
        if hinge:
            logp = obj.policy.outputs(params, frozen, preference_rows(batch)).sequence_logp().reshape(-1, 2)
            ref_lp = batch["ref_seq_logp"]
            return batch, dpo_margin(logp[:, 0], logp[:, 1], ref_lp[:, 0], ref_lp[:, 1])
        return batch, None

    args = (old, params, frozen, pair_batch(seed) if pairs else online_batch(seed), jax.random.PRNGKey(seed))
    batch, probe = _compile(prepare, *args)(*args)

    regimes = {}
    if clip:        # ε and ε_v: prepare does not read them, so they can be chosen after it
        ratio, mask, values = probe
        adv = batch["advantages"]
        eps = _most_generic(lambda e: _ratio_kinks(ratio, adv, mask, e))
        estimator = dataclasses.replace(estimator, clip_eps=eps)
        regimes["ratio clipped"] = float(jnp.sum(_clipped(ratio, adv, mask, eps) * mask) / jnp.sum(mask))
        if ppo:
            vc = _most_generic(lambda e: _value_kinks(values, batch["old_values"], batch["returns"], mask, e))
            estimator = dataclasses.replace(estimator, value_clip=vc)
            outside = jnp.abs(values - batch["old_values"]) > vc
            regimes["value clipped"] = float(jnp.sum(outside * mask) / jnp.sum(mask))
    if hinge:
        regimes["hinge active"] = float(jnp.mean(kl.beta * probe < 1.0))
    obj = dataclasses.replace(obj, estimator=estimator)

    def loss(p, fr):
        return obj.loss(p, batch, fr)[0]

    def ratio_kinks(p, fr):
        out = obj.policy.outputs(p, fr, batch)
        ratio = jnp.exp(out.logp_BxT - batch["old_logp"])
        return _ratio_kinks(ratio, batch["advantages"], out.mask_BxT, estimator.clip_eps) / RATIO_MARGIN

    if ppo:
        def fd(c, p, fr):       # pg_loss(θ + t d) + the loss with the policy (hence the hidden state) at θ
            return obj.loss(p, batch, fr)[1]["pg_loss"] + loss(dict(c, value=p["value"]), fr)

        def kinks(c, p, fr):
            v = scalar_head(p["value"], obj.policy.outputs(c, fr, batch, hidden=True).hidden_BxTxD)
            mask = batch["response_mask"][:, 1:]
            value = _value_kinks(v, batch["old_values"], batch["returns"], mask, estimator.value_clip)
            return jnp.concatenate([ratio_kinks(p, fr), value / VALUE_MARGIN])
    else:
        def fd(c, p, fr):
            return loss(p, fr)

        if clip:
            def kinks(c, p, fr):
                return ratio_kinks(p, fr)
        elif hinge:
            def kinks(c, p, fr):
                logp = obj.policy.outputs(p, fr, preference_rows(batch)).sequence_logp().reshape(-1, 2)
                ref_lp = batch["ref_seq_logp"]
                h = dpo_margin(logp[:, 0], logp[:, 1], ref_lp[:, 0], ref_lp[:, 1])
                return (1.0 - kl.beta * h) / HINGE_MARGIN
        else:
            kinks = None
    return Problem(loss, fd, kinks, params, frozen, "zero" if lora is None else "nonzero", regimes)


def reward_model_problem(model: str, seed: int = 0) -> Problem:
    """mean −log σ(r(chosen) − r(rejected)) w.r.t. the reward model (backbone + random head)."""
    config, ref = reference(model)
    rm = init_reward_model(_add(ref, _noise_like(ref, seed, 0.1)), config)
    rm["head"] = _noise_like(rm["head"], seed + 1, 1.0)
    chosen, rejected = pair_batches(seed)

    def loss(p, fr):
        return jnp.mean(bradley_terry_loss(reward_model_scores(config, p, chosen),
                                           reward_model_scores(config, p, rejected)))

    # The head reads the last residual stream before the final norm, so the final norm and the
    # unembedding are unused; the head's bias cancels in r_w − r_l.
    unused = ("['backbone']['final_norm']", "['backbone']['unembed']", "['head']['b']")
    return Problem(loss, lambda c, p, fr: loss(p, fr), None, rm, {}, "none", {}, unused)


K1 = KLRegularizer(beta=0.1, estimator="k1")


def _grpo(model, kl_estimator, reduction, **kw):
    return kl_problem(model, GRPO(group_size=K, reduction=reduction), KLRegularizer(0.1, kl_estimator), **kw)


CASES: dict[str, Callable[[], Problem]] = {
    "ppo-gpt2": lambda: kl_problem("gpt2", PPO(), K1),
    "ppo-llama": lambda: kl_problem("llama", PPO(), KLRegularizer(0.1, "exact")),
    "grpo-k3-token-gpt2": lambda: _grpo("gpt2", "k3", "token"),
    "grpo-k3-sequence-llama": lambda: _grpo("llama", "k3", "sequence"),
    "grpo-k2-token-llama": lambda: _grpo("llama", "k2", "token"),
    "grpo-k2-sequence-gpt2": lambda: _grpo("gpt2", "k2", "sequence"),
    "grpo-exact-token-gpt2": lambda: _grpo("gpt2", "exact", "token"),
    "grpo-exact-sequence-llama": lambda: _grpo("llama", "exact", "sequence"),
    "rloo-llama": lambda: kl_problem("llama", RLOO(group_size=K), K1),
    "dpo-sigmoid-gpt2": lambda: kl_problem("gpt2", DPO("sigmoid"), K1, pairs=True),
    "dpo-robust-llama": lambda: kl_problem("llama", DPO("robust", label_smoothing=0.1), K1, pairs=True),
    "dpo-hinge-gpt2": lambda: kl_problem("gpt2", DPO("hinge"), KLRegularizer(0.5), pairs=True),
    "dpo-ipo-llama": lambda: kl_problem("llama", DPO("ipo"), K1, pairs=True),
    "sft-gpt2": lambda: kl_problem("gpt2", SFT(), K1),
    "rsft-best-of-k-llama": lambda: kl_problem("llama", RSFT(group_size=K, filter="best_of_k"), K1),
    "reward-model-bt-gpt2": lambda: reward_model_problem("gpt2"),
    "reward-model-bt-llama": lambda: reward_model_problem("llama"),
    "grpo-k3-lora-llama": lambda: _grpo("llama", "k3", "token", lora=LoraConfig(rank=2, alpha=4.0)),
}


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

def directions(params, g_flat: np.ndarray, seed: int = 0) -> np.ndarray:
    """Unit directions [M, n] over the flattened params: N_RANDOM random ones, g/‖g‖, and per leaf a
    random direction and the leaf's gradient direction (left out where that is 0)."""
    sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
    bounds = np.cumsum([0] + sizes)
    n = int(bounds[-1])
    rng = np.random.default_rng(seed)
    dirs = [rng.standard_normal(n) for _ in range(N_RANDOM)] + [g_flat]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for values in (rng.standard_normal(hi - lo), g_flat[lo:hi]):
            d = np.zeros(n)
            d[lo:hi] = values
            dirs.append(d)
    dirs = np.stack([d for d in dirs if np.any(d != 0)])
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def result(name: str) -> dict:
    """AD gradient, FD directional derivatives and kinks of one case (one compile of each function)."""
    problem = CASES[name]()
    flat0, unravel = ravel_pytree(problem.params)

    def loss_and_grads(flat, frozen):
        return jax.value_and_grad(lambda x, fr: problem.loss(unravel(x), fr), argnums=(0, 1))(flat, frozen)

    def at_point(center, x, frozen):
        c, p = unravel(center), unravel(x)
        kinks = problem.kinks(c, p, frozen) if problem.kinks else jnp.zeros((0,), jnp.float32)
        return problem.fd(c, p, frozen), kinks

    loss, (g, g_frozen) = _compile(loss_and_grads, flat0, problem.frozen)(flat0, problem.frozen)
    g = np.asarray(g, np.float64)
    dirs = directions(problem.params, g)
    point = _compile(at_point, flat0, flat0, problem.frozen)
    values, kinks = [], []
    for d in dirs:
        at = [point(flat0, flat0 + jnp.asarray(k * FD_STEP * d, jnp.float32), problem.frozen) for k in OFFSETS]
        values.append([float(v) for v, _ in at])
        kinks.append(np.stack([np.asarray(kk) for _, kk in at]))
    values = np.asarray(values, np.float64)
    zero = OFFSETS.index(0)
    fd = sum(c * (values[:, zero + k] - values[:, zero - k]) for k, c in STENCIL) / FD_STEP
    return dict(problem=problem, loss=float(loss), g=g, g_frozen=g_frozen, dirs=dirs, fd=fd, ad=dirs @ g,
                kinks=np.stack(kinks), flat0=flat0, unravel=unravel)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_matches_finite_differences(name):
    r = result(name)
    problem, g, fd, ad = r["problem"], r["g"], r["fd"], r["ad"]
    g_norm = float(np.linalg.norm(g))
    assert np.isfinite(r["loss"]) and np.all(np.isfinite(g)) and g_norm > 1e-2

    # Generic point: no sample on or across a kink over the stencil, and both sides of every kink used.
    kinks, c = r["kinks"], OFFSETS.index(0)                         # [M, 7, k]
    if kinks.shape[-1]:
        at_theta = kinks[0, c]
        assert np.min(np.abs(at_theta)) >= 1.0, f"a sample within its margin of a kink: {np.min(np.abs(at_theta))}"
        crossed = np.sign(kinks) != np.sign(kinks[:, c:c + 1])
        assert not crossed.any(), f"the stencil crosses a kink along {int(crossed.any(axis=(1, 2)).sum())} directions"
    for regime, fraction in problem.regimes.items():
        assert 0.0 < fraction < 1.0, (regime, fraction)

    # Every leaf the loss reads gets a gradient (its gradient direction is then one of the directions);
    # the others get exactly 0 (and their random direction checks that FD sees no change either).
    leaves = jax.tree_util.tree_leaves_with_path(r["unravel"](jnp.asarray(g, jnp.float32)))
    zero = {jax.tree_util.keystr(p) for p, x in leaves if not np.any(np.asarray(x) != 0)}
    unused = {k for k in map(jax.tree_util.keystr, (p for p, _ in leaves)) if k.startswith(problem.unused)}
    assert zero == unused, (zero, unused)
    assert len(r["dirs"]) == N_RANDOM + 1 + 2 * len(leaves) - len(zero)

    err = np.abs(fd - ad)
    i = int(np.argmax(err))
    print(f"\n{name}: loss {r['loss']:.4f}, ‖g‖ {g_norm:.3g}, {len(ad)} directions, "
          f"max |fd − ad| / ‖g‖ = {err.max() / g_norm:.1e} (direction {i}: ad {ad[i]:.4g}, fd {fd[i]:.4g}), "
          f"along g/‖g‖: |fd − ad| / |ad| = {err[N_RANDOM] / abs(ad[N_RANDOM]):.1e}"
          + "".join(f", {k} {v:.2f}" for k, v in problem.regimes.items()))
    assert np.all(err <= TOL * g_norm), (err.max() / g_norm, int(np.argmax(err)))

    # The frozen reference gets exactly zero gradient; LoRA's frozen base weights are in π_θ and do not.
    frozen_grads = [np.asarray(x) for x in jax.tree_util.tree_leaves(r["g_frozen"])]
    if problem.frozen_grad == "zero":
        assert frozen_grads and all(np.all(x == 0) for x in frozen_grads)
    elif problem.frozen_grad == "nonzero":
        assert any(np.any(x != 0) for x in frozen_grads)


def test_ppo_check_detects_the_value_path_through_the_hidden_state():
    """Control: the value loss depends on the policy's weights through the hidden state, but the PPO
    gradient stops there by design. Finite differences of the plain loss (which include that path)
    then disagree with AD along g/‖g‖ by far more than TOL, so a missing term would be caught."""
    r = result("ppo-gpt2")
    problem, flat0, unravel = r["problem"], r["flat0"], r["unravel"]
    loss = _compile(lambda x, fr: problem.loss(unravel(x), fr), flat0, problem.frozen)
    d = r["dirs"][N_RANDOM]                                          # g/‖g‖
    at = {k: float(loss(flat0 + jnp.asarray(k * FD_STEP * d, jnp.float32), problem.frozen)) for k in OFFSETS}
    fd_plain = sum(c * (at[k] - at[-k]) for k, c in STENCIL) / FD_STEP
    rel = abs(fd_plain - r["ad"][N_RANDOM]) / np.linalg.norm(r["g"])
    print(f"\nPPO, FD of the plain loss vs AD along g/‖g‖: {rel:.1e} of ‖g‖ (TOL {TOL:.0e})")
    assert rel > 10 * TOL
