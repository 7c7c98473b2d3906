"""π_ref for the CPU-sized alignment studies: a model SFT-ed from scratch (eq. 8) until it is partly able."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

from arlm.alignment.task_io import TaskIO, greedy_success
from arlm.alignment.trainer import Trainer
from arlm.config import ModelConfig
from arlm.model import init_params
from arlm.objectives.kl import KLRegularizer
from arlm.objectives.kl_regularized import SFT, KLObjective, Policy


def sft_until_able(io: TaskIO, model_cfg: ModelConfig, *, seed: int, steps: int, target_success: float,
                   check_every: int, probe: int, batch_size: int, learning_rate: float, pool: int, mesh: Any = None,
                   on_step: Callable[[dict[str, Any]], None] = lambda info: None) -> tuple[Any, dict[str, Any]]:
    """Train `model_cfg` from scratch by SFT (eq. 8) on the task's training problems; returns (params, info).

    Training stops at the first multiple of `check_every` steps where the greedy answers solve at least
    `target_success` of the first `probe` training problems (at most `steps` steps; `target_success = 0`
    trains exactly `steps`). Stopping at a capability, not at a step count, gives every seed and machine
    a comparable π_ref. `on_step(info)` is called after every step (for a progress bar).
    """
    objective = KLObjective(Policy(model_cfg), KLRegularizer(0.0), SFT())
    trainer = Trainer(objective, init_params(model_cfg, jax.random.PRNGKey(seed)),
                      optax.adamw(learning_rate, weight_decay=0.0), mesh=mesh, seed=seed)
    problems = io.task.problems(pool, "train")
    probe_set = problems[:probe]
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {}
    for step in range(1, steps + 1):
        trainer.update(io.sft_batch([problems[i] for i in rng.integers(0, len(problems), batch_size)]))
        if target_success > 0 and (step % check_every == 0 or step == steps):
            rewards, _ = greedy_success(io, model_cfg, trainer.policy_params(), probe_set, jax.random.PRNGKey(seed))
            info = {"sft_steps": step, "sft_probe_success": float(rewards.mean())}
        on_step(info)
        if info and info["sft_probe_success"] >= target_success:
            break
    return jax.device_get(trainer.policy_params()), info or {"sft_steps": steps}
