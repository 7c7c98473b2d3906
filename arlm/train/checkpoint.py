"""Checkpoints with orbax: save every N steps, keep the last K, resume exactly.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG)
and the input pipeline's position as JSON, so a resumed run continues with
the very batches an uninterrupted run would have seen. The JSON item also
holds a checksum of every state leaf: orbax/tensorstore do not checksum array
data, so a flipped bit in a data file would otherwise restore silently wrong
values; `restore` recomputes the checksums and raises `CheckpointError`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from arlm.train.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with arlm's two items: "state" and "data"."""

    def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3,
                 async_save: bool = True) -> None:
        if save_every <= 0 or keep <= 0:
            raise ValueError("save_every and keep must be > 0")
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        # orbax's default policy also saves the first step it is asked about (InitialSavePolicy):
        # only multiples of save_every are on the interval.
        return step % self.save_every == 0 and self._manager.should_save(step)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None = None,
             *, force: bool = False) -> bool:
        """Save if `step` is on the save interval (or `force`); returns whether it saved."""
        if not (force or self.should_save(step)):
            return False
        data = dict(data_state or {})
        data[_CHECKSUM_KEY] = state_checksums(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data))
        return self._manager.save(step, args=args, force=force)

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore into the shapes, dtypes and shardings of `target` (a TrainState of arrays
        or of `jax.ShapeDtypeStruct`s with shardings). Default: the latest step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete "
                f"({type(err).__name__}: {err})") from err
        state = restored["state"]
        _check_structure(target, state, step, self.directory)
        data = dict(restored["data"] or {})
        expected = data.pop(_CHECKSUM_KEY, None)
        if expected is not None:         # checkpoints written before checksums have none
            found = state_checksums(state)
            bad = [k for k in expected if found.get(k) != expected[k]]
            if bad or set(found) != set(expected):
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: checksum mismatch in "
                    f"{bad or sorted(set(found) ^ set(expected))}")
        return state, data

    def saving(self) -> bool:
        """Whether an asynchronous save is still being written (the train step need not wait for it)."""
        return self._manager.is_saving_in_progress()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_structure(target: Any, restored: Any, step: int, directory: str) -> None:
    t_shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), target)
    r_shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), restored)
    if t_shapes != r_shapes:
        raise CheckpointError(f"checkpoint step {step} in {directory} does not match the model: "
                              f"expected {t_shapes}, found {r_shapes}")


_CHECKSUM_KEY = "__arlm_state_checksums__"


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> jnp.uint32(13))
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> jnp.uint32(16))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Sum over elements of hash(bits, position), mod 2**32: exact and independent of sharding."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4 or size == 8:       # 8-byte types become [..., 2] uint32 words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    mixed = _fmix32(bits ^ _fmix32(index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)))
    return jnp.sum(mixed, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict[str, int]:
    """{leaf path: uint32 checksum of its exact bits}, computed on device (works for sharded arrays)."""
    sums = jax.device_get(_checksums(state))
    return {jax.tree_util.keystr(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}
