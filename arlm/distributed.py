"""Multi-host runs on JAX's own distributed runtime: `jax.distributed.initialize`, then one global
mesh over every process's devices, each process feeding only its rows of every batch.

Configure from a config (`DistributedConfig`) or the environment:
ARLM_COORDINATOR (host:port of process 0), ARLM_NUM_PROCESSES, ARLM_PROCESS_ID and optionally
ARLM_LOCAL_DEVICES. With none of these set and `auto=True`, `jax.distributed.initialize()` detects
cluster environments itself (SLURM, Open MPI, TPU pods). One process: nothing to do.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = None      # "host:port" of process 0
    num_processes: int = 1
    process_id: int = 0
    local_devices: int | None = None    # CPU only: force this many local devices (tests)

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None) -> "DistributedConfig":
        """From the ARLM_* variables; fields set (not None) in `overrides` (e.g. a job config's
        `distributed` section) take precedence."""
        env = os.environ
        local = env.get("ARLM_LOCAL_DEVICES")
        cfg = cls(env.get("ARLM_COORDINATOR"), int(env.get("ARLM_NUM_PROCESSES", "1")),
                  int(env.get("ARLM_PROCESS_ID", "0")), int(local) if local else None)
        fields = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown distributed settings {sorted(unknown)}")
        return dataclasses.replace(cfg, **fields)


def initialize(cfg: DistributedConfig | None = None, *, auto: bool = False) -> None:
    """Join the job's processes (call before any other JAX use). No-op for a single process."""
    cfg = cfg or DistributedConfig.from_env()
    if cfg.local_devices is not None:                  # affects the CPU backend only
        jax.config.update("jax_num_cpu_devices", cfg.local_devices)
    if cfg.num_processes > 1:
        if not cfg.coordinator:
            raise ValueError("a multi-process run needs the coordinator's host:port (ARLM_COORDINATOR)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"process_id {cfg.process_id} is not in [0, {cfg.num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU collectives across hosts
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    elif auto:
        jax.distributed.initialize()


def put_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from each process's rows (`make_train_dataset(process_index=…)`); with one
    process this is `jax.device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def is_main_process() -> bool:
    """True on the process that writes logs, plots and summaries (process 0)."""
    return jax.process_index() == 0


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of a global host batch that every process holds in full: rows
    [p·B/n, (p+1)·B/n), the rows `put_batch` expects (like `make_train_dataset(process_index=…)`)."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    rows = {v.shape[0] for v in batch.values()}
    if len(rows) != 1 or next(iter(rows)) % n:
        raise ValueError(f"a batch of {sorted(rows)} rows cannot be split equally over {n} processes")
    share = next(iter(rows)) // n
    return {k: v[p * share:(p + 1) * share] for k, v in batch.items()}


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def gather(tree: Any) -> Any:
    """Every leaf in full, as numpy, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
