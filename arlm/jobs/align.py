"""`run_alignment(config)`: the paper's check, "implement RLHF, DPO, RSFT and RLVR on a common task
and compare reward trajectories, KL evolution and final policies" (eqs. 9–15).

All methods start from the same model π_ref, which can already partly do the task (arithmetic
with checkable answers): on CPU a tiny model SFT-ed here (eq. 8), or SmolLM2-135M-Instruct. Then

  rlhf_ppo   a Bradley–Terry reward model (eq. 11) on preference pairs, then PPO against it (eq. 12)
  dpo        DPO (eq. 13) on the same preference pairs
  rsft       best-of-K samples of the current policy, kept if the verifier accepts, then eq. 8 (eq. 14)
  rlvr_grpo  GRPO on the verifier's reward (eq. 15)
  rlvr_rloo  RLOO on the verifier's reward
  rlvr_ppo   PPO on the verifier's reward (not in the default list: it separates PPO from its reward model)

Preference pairs are two samples of π_ref for one prompt, one accepted by the verifier and one
rejected. Every `eval_every` iterations each policy is scored on held-out problems: verifier
success of greedy and of sampled (τ = 1) answers, and KL(π_θ ‖ π_ref) (exact per-token KL along
sampled answers). Outputs in `config.workdir`: metrics.jsonl, reward_vs_step.png, kl_vs_step.png,
frontier.png, samples.txt, summary.json, and with `save_policies` every final policy and π_ref under
policies/<name>/ (Hugging Face directories: `load_policies`, `arlm.load`, transformers).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arlm.alignment.rollout import RewardModelReward, pair_batch, preference_pairs, sample_rollout
from arlm.alignment.start import sft_until_able
from arlm.alignment.task_io import TaskIO, char_task, chat_task, greedy_success
from arlm.alignment.tasks import ArithmeticTask, Problem
from arlm.alignment.trainer import Trainer, exact_kl_to
from arlm.config import ModelConfig
from arlm.inference import Sampler
from arlm.objectives.heads import init_reward_model, pair_scores, reward_model_loss
from arlm.alignment import methods
from arlm.objectives.kl_regularized import KLObjective
from arlm.sharding import MeshConfig, batch_sharding, mesh_from_fields
from arlm.model.lora import LoraConfig
from arlm.train.metrics import MetricsWriter
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

METHODS = ("rlhf_ppo", "dpo", "rsft", "rlvr_grpo", "rlvr_rloo", "rlvr_ppo")   # the order of the summary


def task_io(cfg: ml_collections.ConfigDict, loaded: Any = None) -> TaskIO:
    """The job's task binding: the character tokenizer for a π_ref SFT-ed here, else the loaded
    model's chat template (`loaded`, or `arlm.load(cfg.start.name)`)."""
    task = ArithmeticTask(max_operand=cfg.task.max_operand, ops=tuple(cfg.task.ops), seed=cfg.seed)
    if cfg.start.kind == "sft":
        return char_task(task, cfg.task.max_new_tokens)
    if loaded is None:
        import arlm
        loaded = arlm.load(cfg.start.name)
    return chat_task(task, loaded, cfg.task.max_new_tokens)


def _task_and_model(cfg: ml_collections.ConfigDict) -> tuple[TaskIO, ModelConfig, Any, dict]:
    """The task binding, π_ref's config and params, and facts about how π_ref was obtained."""
    if cfg.start.kind == "sft":
        io = task_io(cfg)
        model_cfg, params, info = _sft_start_model(cfg, io)
        return io, model_cfg, params, info
    import arlm
    loaded = arlm.load(cfg.start.name)
    return task_io(cfg, loaded), loaded.config, loaded.params, {"model": cfg.start.name}


POLICY_DIR = "policies"          # <workdir>/policies/<name>/: config.json + model.safetensors (save_hf)
REFERENCE = "ref"                # π_ref's name there


def save_policy(workdir: str, name: str, model_cfg: ModelConfig, params: Any) -> str:
    """Write one policy (full params, LoRA merged) as a Hugging Face directory under workdir/policies/."""
    from arlm.checkpoints.hf import save_hf
    return save_hf(os.path.join(workdir, POLICY_DIR, name), model_cfg, jax.device_get(params))


def load_policies(workdir: str) -> dict[str, tuple[ModelConfig, Any]]:
    """{name: (config, params)} of the policies an align run saved: π_ref ("ref") first, then the
    methods in the summary's order."""
    from arlm.checkpoints.hf import load_hf_dir
    root = os.path.join(workdir, POLICY_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist: run the align job with save_policies=True")
    names = [n for n in (REFERENCE,) + METHODS if os.path.isdir(os.path.join(root, n))]
    if REFERENCE not in names:
        raise FileNotFoundError(f"{root} holds no {REFERENCE!r} (π_ref) policy")
    return {n: load_hf_dir(os.path.join(root, n))[:2] for n in names}


def _sft_start_model(cfg: ml_collections.ConfigDict, io: TaskIO) -> tuple[ModelConfig, Any, dict]:
    """A tiny model trained from scratch by SFT (eq. 8) until it is partly able (`sft_until_able`):
    after a fixed 150 steps, seeds 0–5 solved between 5 % and 56 % of held-out problems; stopping at
    `start.target_success` on `start.probe` training problems gives every seed a comparable π_ref."""
    from arlm.alignment.tasks import ArithmeticTokenizer
    from arlm.jobs.pretrain import model_config_from
    s = cfg.start
    model_cfg = model_config_from(s.model, ArithmeticTokenizer().vocab_size)
    with _bar(cfg, s.steps, "π_ref: SFT from scratch (eq. 8)") as bar:
        def on_step(info: dict) -> None:
            bar.update()
            if info:
                bar.set_postfix(probe_success=f"{info['sft_probe_success']:.2f}", target=s.target_success)
        params, info = sft_until_able(io, model_cfg, seed=cfg.seed, steps=s.steps, target_success=s.target_success,
                                      check_every=s.check_every, probe=s.probe, batch_size=s.batch_size,
                                      learning_rate=s.learning_rate, pool=s.pool, mesh=_mesh(cfg), on_step=on_step)
    return model_cfg, params, info


def _bar(cfg: ml_collections.ConfigDict, total: int, desc: str):
    """A per-phase progress bar with an ETA (stderr); `cfg.progress = False` silences it."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not cfg.get("progress", True), dynamic_ncols=True, leave=True)


def _mesh(cfg: ml_collections.ConfigDict):
    """The mesh of `cfg.mesh` over the first `cfg.mesh.num_devices` devices (0: all of them)."""
    return mesh_from_fields(cfg.mesh.to_dict())


# The job's methods: (registry method, fixed options); the reward source is in the name.
JOB_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rlhf_ppo": ("ppo", {}), "rlvr_ppo": ("ppo", {}), "dpo": ("dpo", {}),
    "rsft": ("rsft", {"filter": "best_of_k", "threshold": 1.0}),
    "rlvr_grpo": ("grpo", {}), "rlvr_rloo": ("rloo", {})}


def _objective(method: str, model_cfg: ModelConfig, cfg: ml_collections.ConfigDict) -> KLObjective:
    """The registry's objective for a job method (each estimator's default KL: GRPO k3, PPO and RLOO k1)."""
    lora = LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha) if cfg.lora.rank else None
    name, options = JOB_METHODS[method]
    if name == "dpo":
        options = dict(options, variant=cfg.dpo.variant)
    return methods.make_objective(name, model_cfg, cfg.beta[method], group_size=cfg.rollout.k, lora=lora, **options)


def collect_preferences(io: TaskIO, model_cfg: ModelConfig, params: Any, problems: list[Problem], k: int,
                        key: jax.Array) -> dict[str, np.ndarray]:
    """Pairs (accepted ≻ rejected) of π_ref's samples, [B, 2, T]; prompts whose samples all agree are dropped."""
    rollout = sample_rollout(model_cfg, params, io.prompts(problems), k, key, max_new_tokens=io.max_new_tokens,
                             eos_id=io.eos_id, pad_id=io.pad_id)
    rewards = io.rewards(rollout.responses(), [problems[i] for i in rollout.prompt_index_B])
    chosen, rejected = preference_pairs(rewards, k)
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} preference pairs from {len(problems)} prompts × {k} samples: the "
                         "starting model's samples agree on almost every prompt; raise preferences.prompts or "
                         "preferences.k")
    return pair_batch(rollout, chosen, rejected)


def train_reward_model(model_cfg: ModelConfig, backbone: Any, pairs: dict[str, np.ndarray],
                       cfg: ml_collections.ConfigDict, mesh) -> tuple[Any, dict[str, float]]:
    """Eq. 11 through the generic step; returns the reward model and its held-out pair accuracy."""
    n = pairs["tokens"].shape[0]
    n_val = max(n // 5, 1)
    val = {k: v[:n_val] for k, v in pairs.items()}
    train = {k: v[n_val:] for k, v in pairs.items()}

    def scores(rm, batch):
        return pair_scores(model_cfg, rm, batch)

    def loss_fn(rm, batch):
        return reward_model_loss(model_cfg, rm, batch)

    optimizer = optax.adam(cfg.reward_model.learning_rate)
    state, sharding = state_from_params(init_reward_model(backbone, model_cfg), optimizer, mesh, MeshConfig(), 0)
    step = make_train_step(loss_fn, optimizer, sharding, batch_sharding(mesh))
    rng = np.random.default_rng(0)
    b = cfg.reward_model.batch_size
    with _bar(cfg, cfg.reward_model.steps, "reward model (eq. 11)") as bar:
        for _ in range(cfg.reward_model.steps):
            idx = rng.integers(0, len(train["tokens"]), b)
            state, metrics = step(state, {k: v[idx] for k, v in train.items()})
            bar.update()
    r_val = jax.jit(scores)(state.params, val)
    acc = float(jnp.mean(r_val[:, 0] > r_val[:, 1]))
    return state.params, {"train_accuracy": float(metrics["accuracy"]), "heldout_accuracy": acc,
                          "pairs": int(n)}


def centered_reward_model(model_cfg: ModelConfig, rm: Any, k: int):
    """Rewards r_φ(x, y) − mean of r_φ over the K samples of x, from a Bradley–Terry reward model.

    A Bradley–Terry reward is identified only up to a per-prompt constant c(x), which
    π* ∝ π_ref exp(r/β) ignores (it cancels in Z(x)); removing it spares PPO's value head
    from having to learn it.
    """
    scorer = RewardModelReward(model_cfg, rm)      # rm's weights are jit arguments, not constants

    def reward_fn(rollout, problems) -> np.ndarray:
        r_GxK = scorer(rollout).reshape(-1, k)
        return (r_GxK - r_GxK.mean(-1, keepdims=True)).reshape(-1)
    return reward_fn


def evaluate(io: TaskIO, model_cfg: ModelConfig, params: Any, ref_params: Any, problems: list[Problem],
             key: jax.Array, samples_per_problem: int = 4) -> tuple[dict[str, float], list[str]]:
    """Verifier success of the greedy answer and of τ = 1 samples (E_{y~π_θ}[r], eq. 9's reward term),
    and KL(π_θ ‖ π_ref), on held-out problems."""
    prompts = io.prompts(problems)
    greedy_r, g_resp = greedy_success(io, model_cfg, params, problems, key)
    sampled = sample_rollout(model_cfg, params, prompts, samples_per_problem, key, max_new_tokens=io.max_new_tokens,
                             sampler=Sampler(temperature=1.0), eos_id=io.eos_id, pad_id=io.pad_id)
    kl = float(exact_kl_to(model_cfg, params, ref_params, sampled.batch))
    texts = [f"{p.prompt!s:>12} → {io.decode(r)!r:<10} {'✓' if ok else '✗'} (answer {p.answer})"
             for p, r, ok in zip(problems, g_resp, greedy_r)]
    sampled_r = io.rewards(sampled.responses(), [problems[i] for i in sampled.prompt_index_B])
    return {"success_greedy": float(greedy_r.mean()),
            "success_sampled": float(sampled_r.mean()), "kl": kl}, texts


def run_alignment(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Run every configured method from the same π_ref; write metrics, plots, samples and a summary."""
    t0 = time.perf_counter()
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected some of {METHODS}")
    if jax.process_count() > 1:
        raise NotImplementedError(
            "the alignment job runs in one process (its rollouts and rewards are gathered on the host); "
            "for multi-host alignment drive `arlm.alignment.Trainer` yourself: its updates are tested "
            "over 2 processes (tests/test_multihost.py)")
    os.makedirs(config.workdir, exist_ok=True)
    metrics_path = os.path.join(config.workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    writer = MetricsWriter(config.workdir, tensorboard=False)
    mesh = _mesh(config)
    io, model_cfg, ref_params, start_info = _task_and_model(config)
    ref_params = jax.device_get(ref_params)
    save = config.get("save_policies", False)
    if save:
        save_policy(config.workdir, REFERENCE, model_cfg, ref_params)
    key = jax.random.PRNGKey(config.seed)
    eval_problems = list({p.prompt: p for p in io.task.problems(config.eval.problems, "test")}.values())
    pool = io.task.problems(config.rollout.pool, "train")
    before, before_samples = evaluate(io, model_cfg, ref_params, ref_params, eval_problems, key, config.eval.k)
    summary: dict[str, Any] = {"start": dict(start_info, **before), "eval_problems": len(eval_problems),
                               "methods": {}}
    samples = ["## start model (π_ref)\n" + "\n".join(before_samples[:config.eval.samples])]

    pairs = None
    if {"dpo", "rlhf_ppo"} & set(config.methods):
        pairs = collect_preferences(io, model_cfg, ref_params, pool[:config.preferences.prompts],
                                    config.preferences.k, jax.random.fold_in(key, 1))
    for method in config.methods:
        m_t0 = time.perf_counter()
        objective = _objective(method, model_cfg, config)
        trainer = Trainer(objective, ref_params, optax.adam(config.learning_rate[method]), mesh=mesh,
                          seed=config.seed)
        extra: dict[str, Any] = {}
        reward_fn = None
        if method == "rlhf_ppo":
            rm, extra = train_reward_model(model_cfg, ref_params, pairs, config, mesh)
            reward_fn = centered_reward_model(model_cfg, rm, config.rollout.k)
        writer.write(0, method, before)
        rng = np.random.default_rng(config.seed)
        bar = _bar(config, config.iterations, method)
        for it in range(1, config.iterations + 1):
            if method == "dpo":
                idx = rng.integers(0, pairs["tokens"].shape[0], config.dpo.batch_pairs)
                train_metrics = trainer.update({k: v[idx] for k, v in pairs.items()})
            else:
                problems = [pool[i] for i in rng.integers(0, len(pool), config.rollout.prompts)]
                rollout = trainer.rollout(io.prompts(problems), config.rollout.k, max_new_tokens=io.max_new_tokens,
                                          eos_id=io.eos_id, pad_id=io.pad_id)
                row_problems = [problems[i] for i in rollout.prompt_index_B]
                verifier_r = io.rewards(rollout.responses(), row_problems)
                rewards = verifier_r if reward_fn is None else reward_fn(rollout, row_problems)
                train_metrics = trainer.update(dict(rollout.batch, rewards=rewards), epochs=config.epochs)
                train_metrics["train_success"] = float(verifier_r.mean())
            if it % config.eval_every == 0 or it == config.iterations:
                ev, texts = evaluate(io, model_cfg, trainer.policy_params(), ref_params, eval_problems,
                                     jax.random.fold_in(key, it), config.eval.k)
                writer.write(it, method, dict(ev, **{f"train_{k}": v for k, v in train_metrics.items()}))
                bar.set_postfix(greedy=f"{ev['success_greedy']:.2f}", sampled=f"{ev['success_sampled']:.2f}",
                                kl=f"{ev['kl']:.3f}")
            bar.update()
        bar.close()
        after = ev
        summary["methods"][method] = dict(after, **extra, seconds=round(time.perf_counter() - m_t0, 1),
                                          gain_greedy=after["success_greedy"] - before["success_greedy"],
                                          gain_sampled=after["success_sampled"] - before["success_sampled"])
        samples.append(f"## {method}\n" + "\n".join(texts[:config.eval.samples]))
        if save:
            save_policy(config.workdir, method, model_cfg, trainer.policy_params())
        print(f"{method}: success greedy {before['success_greedy']:.3f} → {after['success_greedy']:.3f}, "
              f"sampled {before['success_sampled']:.3f} → {after['success_sampled']:.3f}, KL {after['kl']:.3f}",
              flush=True)
    writer.close()
    with open(os.path.join(config.workdir, "samples.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(samples) + "\n")
    from arlm.jobs.plots import plot_alignment
    plot_alignment(metrics_path, config.workdir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(config.workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
