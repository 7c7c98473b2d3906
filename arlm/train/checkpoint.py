"""Checkpoints with orbax: save every N steps, keep the last K, resume exactly.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG)
and the input pipeline's position as JSON, so a resumed run continues with
the very batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from typing import Any

import jax
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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None = None,
             *, force: bool = False) -> bool:
        """Save if `step` is on the save interval (or `force`); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
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
        _check_finite_structure(target, state, step, self.directory)
        return state, dict(restored["data"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_finite_structure(target: Any, restored: Any, step: int, directory: str) -> None:
    t_shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), target)
    r_shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), restored)
    if t_shapes != r_shapes:
        raise CheckpointError(f"checkpoint step {step} in {directory} does not match the model: "
                              f"expected {t_shapes}, found {r_shapes}")
