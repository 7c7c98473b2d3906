"""Checkpoints with orbax: save every N steps, keep the last K, resume exactly.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG)
and the input pipeline's position as JSON, so a resumed run continues with
the very batches an uninterrupted run would have seen. The JSON item also
holds a checksum of every state leaf: orbax/tensorstore do not checksum array
data, so a flipped bit in a data file would otherwise restore silently wrong
values; `restore` recomputes the checksums and raises `CheckpointError`.

Resuming (`restore` without a step) falls back to the newest intact checkpoint: a damaged
newer step is named in a `DamagedCheckpointWarning` (and the log) and moved aside to
`<directory>/damaged/<step>`, so that the resumed run can save that step number again (orbax
refuses to save a step that exists) and a later resume does not trip over it again. Moving
rather than deleting keeps the files for a post-mortem and loses nothing if the "damage" was
a transient read error. Nothing is moved unless an older step restored intact into the same
target: a target that fits no checkpoint (a changed model) raises and leaves every step in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from arlm import distributed
from arlm.train.state import TrainState

logger = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class DamagedCheckpointWarning(UserWarning):
    """A resume skipped a damaged checkpoint (moved aside) and restored an older, intact one."""


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
        or of `jax.ShapeDtypeStruct`s with shardings); returns (state, data state).

        `step=None` (resume): the newest intact step. Damaged newer steps are skipped with a
        `DamagedCheckpointWarning` each and moved to `<directory>/damaged/<step>`; if no step is
        intact, `CheckpointError` lists every step and its error, and nothing is moved.
        An explicit `step` is strict: that step or `CheckpointError`.
        """
        if step is not None:
            if step not in self.all_steps():
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
            return self._restore_step(target, step)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        failures: list[tuple[int, CheckpointError]] = []
        for candidate in steps:
            restored, error = self._try_restore_step(target, candidate)
            if error is None:
                self._set_aside(failures, candidate)
                return restored
            failures.append((candidate, error))
        listing = "\n".join(f"  step {s}: {err}" for s, err in failures)
        raise CheckpointError(f"no intact checkpoint in {self.directory} (tried newest first):\n{listing}")

    def _try_restore_step(self, target: TrainState, step: int
                          ) -> tuple[tuple[TrainState, dict[str, Any]] | None, CheckpointError | None]:
        """(restored, None) or (None, error); every process agrees on which (a step damaged where
        one process reads it is damaged for all, so that all fall back to the same step)."""
        try:
            restored, error = self._restore_step(target, step), None
        except CheckpointError as err:
            restored, error = None, err
        if distributed.any_process(error is not None) and error is None:
            restored, error = None, CheckpointError(
                f"checkpoint step {step} in {self.directory} failed to restore on another process")
        return restored, error

    def _restore_step(self, target: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
        """Restore `step` and verify its structure and checksums, or raise CheckpointError."""
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

    def _set_aside(self, failures: list[tuple[int, CheckpointError]], restored_step: int) -> None:
        """Warn about each damaged step newer than `restored_step` and move it to
        `<directory>/damaged/<step>` (process 0 moves, all wait), then re-read the step list."""
        if not failures:
            return
        for step, error in failures:
            moved_to = self._damaged_path(step)
            outcome = f"moved it to {moved_to}"
            if jax.process_index() == 0:
                try:
                    os.makedirs(os.path.dirname(moved_to), exist_ok=True)
                    shutil.move(os.path.join(self.directory, str(step)), moved_to)
                except OSError as err:      # e.g. a read-only directory: the restore itself still stands
                    outcome = (f"could not move it aside ({type(err).__name__}: {err}), so saving step {step} "
                               f"again will fail until it is removed")
            message = (f"checkpoint step {step} in {self.directory} is damaged and was skipped: {error}; "
                       f"{outcome}; resuming from step {restored_step}")
            logger.warning(message)
            warnings.warn(message, DamagedCheckpointWarning, stacklevel=3)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("arlm_checkpoint_set_aside")
        self._manager.reload()

    def _damaged_path(self, step: int) -> str:
        """`<directory>/damaged/<step>`, or `<step>.1`, `<step>.2`, … if that step was set aside before."""
        base = os.path.join(self.directory, DAMAGED_DIR, str(step))
        path, n = base, 0
        while os.path.exists(path):
            n += 1
            path = f"{base}.{n}"
        return path

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
