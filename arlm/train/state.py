"""The train state pytree and its creation on a mesh, sharded by rule without allocating twice."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from arlm.model.partitioning import param_specs
from arlm.sharding import MeshConfig, named


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model pytree; opt_state: optax state.

    rng: a uint32[2] PRNG key, split once per train step and checkpointed with the state, so a
    resumed run continues the same key sequence; the built-in losses are deterministic and do
    not draw from it (sampling in alignment uses the `Trainer`'s own key).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def state_specs(abstract: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                mesh_cfg: MeshConfig) -> TrainState:
    """PartitionSpecs for a TrainState: optimizer moments follow their params' rule."""
    p_specs = param_specs(abstract.params, mesh, mesh_cfg)
    opt_specs = optax.tree_map_params(
        optimizer, lambda _, spec: spec, abstract.opt_state, p_specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    return TrainState(step=P(), params=p_specs, opt_state=opt_specs, rng=P())


def create_train_state(
    init_params_fn: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    mesh_cfg: MeshConfig,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """Initialise params and optimizer directly into their shardings.

    Returns (state, state_sharding), where state_sharding is a TrainState of
    NamedShardings usable as jit in/out shardings and as a checkpoint restore target.
    """
    def init(key: jax.Array) -> TrainState:
        init_key, rng = jax.random.split(key)
        params = init_params_fn(init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=rng)

    key = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(init, key)
    sharding = named(mesh, state_specs(abstract, optimizer, mesh, mesh_cfg))
    state = jax.jit(init, out_shardings=sharding)(key)
    return state, sharding


def state_from_params(
    params: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    mesh_cfg: MeshConfig,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """A TrainState around existing params (a loaded or fine-tuned model), placed by the mesh rules.

    The params are transferred once into their shardings (never baked into a compiled program);
    the optimizer state is created on device. Returns (state, state_sharding).
    """
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                          params=jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                          opt_state=jax.eval_shape(optimizer.init, params),
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    sharding = named(mesh, state_specs(abstract, optimizer, mesh, mesh_cfg))
    params = jax.device_put(params, sharding.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.opt_state)(params)
    rng = jax.device_put(jax.random.PRNGKey(seed), sharding.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), sharding.step)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng), sharding
