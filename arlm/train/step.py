"""One generic, jit-compiled train step built from any `loss_fn(params, batch) -> (loss, metrics)`.

Every objective in arlm (eqs. 7–15) trains through `make_train_step`: it
differentiates the loss, accumulates gradients over micro-batches, applies the
optax update, and is compiled once with the mesh's in/out shardings and the
state donated.

Objectives that read weights they do not train (the reference policy π_ref of
eq. 9, the base weights under LoRA, eq. 24) take them as a third argument,
`loss_fn(params, batch, frozen)`: they enter the compiled step as arguments with
their own sharding, never as constants baked into the program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from arlm.train.state import TrainState

Array = jax.Array
LossFn = Callable[[Any, dict[str, Array]], tuple[Array, dict[str, Array]]]


def _split_microbatches(batch: dict[str, Array], n: int) -> dict[str, Array]:
    """[B, ...] → [n, B/n, ...], micro-batch i = rows i, i+n, ...: each keeps the batch's device layout."""
    def split(x: Array) -> Array:
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict[str, Array],
                         grad_accum: int) -> tuple[Array, Any, dict[str, Array]]:
    """Loss, gradient and metrics, averaged over micro-batches.

    A loss that reports `metrics["tokens"]` (the number of tokens it averaged
    over) is weighted by it, so the result equals one pass over the whole batch
    even when masks leave micro-batches with different token counts.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, grads, metrics

    def body(carry, micro):
        (loss, metrics), grads = grad_fn(params, micro)
        w = metrics.get("tokens", jnp.ones((), jnp.float32)).astype(jnp.float32)
        acc_w, acc = carry
        scaled = jax.tree_util.tree_map(lambda g: g * w, (loss, grads, metrics))
        return (acc_w + w, jax.tree_util.tree_map(jnp.add, acc, scaled)), None

    micro = _split_microbatches(batch, grad_accum)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda p, b: grad_fn(p, b), params, first)
    (loss_s, metrics_s), grads_s = shapes
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss_s, grads_s, metrics_s))
    (total_w, sums), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    loss, grads, metrics = jax.tree_util.tree_map(lambda s: s / total_w, sums)
    if "tokens" in metrics:
        metrics = dict(metrics, tokens=total_w)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, metrics


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    state_sharding: TrainState,
    batch_sharding: NamedSharding,
    *,
    grad_accum: int = 1,
    lr_schedule: optax.Schedule | None = None,
    frozen_sharding: Any = None,
    skip_nonfinite: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """`step(state, batch) -> (state, metrics)`, jit-compiled with donated state.

    With `frozen_sharding` (shardings of a pytree of untrained weights), the step is
    `step(state, batch, frozen)` and the loss is `loss_fn(params, batch, frozen)`.
    metrics holds "loss", "grad_norm", "lr" (if a schedule is given) and the
    loss function's own metrics, all replicated scalars.

    With `skip_nonfinite`, a step whose loss or gradient is NaN/inf leaves params and optimizer
    state untouched (the step counter and RNG still advance: the batch is consumed) and reports
    metrics["skipped"] = 1; otherwise the loop stops on it (`arlm.train.loop`).
    """
    mesh = batch_sharding.mesh

    def step(state: TrainState, batch: dict[str, Array], frozen: Any = None) -> tuple[TrainState, dict[str, Array]]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):    # activations follow the mesh rules
            return _step(state, batch, frozen)

    def _step(state: TrainState, batch: dict[str, Array], frozen: Any) -> tuple[TrainState, dict[str, Array]]:
        fn = loss_fn if frozen_sharding is None else (lambda p, b: loss_fn(p, b, frozen))
        loss, grads, metrics = accumulate_gradients(fn, state.params, batch, grad_accum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        grad_norm = optax.tree.norm(grads)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                                       (params, opt_state), (state.params, state.opt_state))
            metrics["skipped"] = (~finite).astype(jnp.float32)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    in_shardings = (state_sharding, batch_sharding)
    if frozen_sharding is not None:
        in_shardings += (frozen_sharding,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,))
