"""One trainer for every instance of the KL-regularized objective (eq. 9).

`Trainer(objective, ref_params, optimizer)` owns the train state (params = the policy's weights
or a LoRA adapter, plus a value head for PPO), the frozen reference weights, and one
jit-compiled step built by `arlm.train.step.make_train_step`. `update(batch)` computes the
batch's shared pieces once (`objective.prepare`) and then takes `epochs` optimizer steps.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from arlm.alignment.rollout import Rollout, sample_rollout
from arlm.inference import Sampler
from arlm.model.log_probs import policy_outputs
from arlm.model.partitioning import param_specs
from arlm.objectives.kl import exact_token_kl
from arlm.objectives.kl_regularized import KLObjective
from arlm.sharding import MeshConfig, batch_sharding, make_mesh, named
from arlm.train.loop import NonFiniteLossError
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

Array = jax.Array


class Trainer:
    """Train any `KLObjective`; see the module docstring."""

    def __init__(self, objective: KLObjective, ref_params: Any, optimizer: optax.GradientTransformation, *,
                 mesh: Mesh | None = None, mesh_cfg: MeshConfig = MeshConfig(), seed: int = 0) -> None:
        self.objective = objective
        self.config = objective.policy.config
        self.mesh = make_mesh(mesh_cfg) if mesh is None else mesh
        self._optimizer, self._mesh_cfg = optimizer, mesh_cfg
        self._frozen_sharding = named(self.mesh, param_specs({"ref": ref_params}, self.mesh, mesh_cfg))
        sharding = self.reset(ref_params, seed)
        self.batch_sharding = batch_sharding(self.mesh)
        self._step = make_train_step(objective.loss, optimizer, sharding, self.batch_sharding,
                                     frozen_sharding=self._frozen_sharding)
        self._prepare = jax.jit(objective.prepare, out_shardings=self.batch_sharding)
        self._model_params = jax.jit(objective.policy.model_params)

    def reset(self, ref_params: Any, seed: int = 0) -> Any:
        """Start over from `ref_params` (π_θ = π_ref, fresh optimizer state and keys, as a new Trainer of
        this seed would), keeping the compiled step: one compile serves many runs of one model config.
        Returns the train state's sharding."""
        self.frozen = jax.device_put({"ref": ref_params}, self._frozen_sharding)
        params = self.objective.init_params(ref_params, jax.random.PRNGKey(seed))
        self.state, sharding = state_from_params(params, self._optimizer, self.mesh, self._mesh_cfg, seed)
        self.key = jax.random.PRNGKey(seed + 1)
        return sharding

    def next_key(self) -> Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    def policy_params(self) -> Any:
        """π_θ's full model params (the adapter merged in under LoRA), for generation and evaluation."""
        return self._model_params(self.state.params, self.frozen)

    def reference_params(self) -> Any:
        return self.frozen["ref"]

    def rollout(self, prompts: Sequence[Sequence[int]], k: int, *, max_new_tokens: int,
                sampler: Sampler = Sampler(temperature=1.0), eos_id: int | None = None, pad_id: int = 0) -> Rollout:
        """K samples per prompt from the current policy (`arlm.generate`)."""
        return sample_rollout(self.config, self.policy_params(), prompts, k, self.next_key(),
                              max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id)

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, Array]:
        batch = jax.device_put(dict(batch), self.batch_sharding)
        return self._prepare(self.state.params, batch, self.frozen, self.next_key())

    def update(self, batch: dict[str, np.ndarray], epochs: int = 1) -> dict[str, float]:
        """Prepare once, then `epochs` steps on the batch; returns the last step's metrics (host floats)."""
        prepared = self.prepare(batch)
        for _ in range(epochs):
            self.state, metrics = self._step(self.state, prepared, self.frozen)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(f"non-finite loss {values['loss']} at step {int(self.state.step)}")
        return values


@partial(jax.jit, static_argnums=0)
def exact_kl_to(config, params: Any, ref_params: Any, batch: dict[str, Array]) -> Array:
    """Mean over sequences of Σ_t KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t)) along the given responses
    (full vocabulary at each step): with responses sampled from π_θ, an estimate of KL(π_θ ‖ π_ref)."""
    out = policy_outputs(config, params, batch, logits=True)
    ref = policy_outputs(config, ref_params, batch, logits=True)
    return (exact_token_kl(out.logits_BxTxV, ref.logits_BxTxV) * out.mask_BxT).sum(-1).mean()
