"""Device meshes and partition rules: SPMD with `jax.jit` shardings, never `pmap`.

The mesh has named axes ("data", "fsdp", "tensor"). The batch is split over
data × fsdp. Parameters are either replicated or FSDP-sharded by a rule: each
array with at least `min_fsdp_size` elements is split along its largest axis
that the fsdp axis size divides (the leading layer axis of stacked params is
never split). Optimizer state follows its parameters, because it is derived
from them by `jax.eval_shape` and given the same rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 in `data` takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    param_sharding: str = "replicate"   # or "fsdp"
    min_fsdp_size: int = 2 ** 14

    def __post_init__(self) -> None:
        if self.param_sharding not in ("replicate", "fsdp"):
            raise ValueError(f"param_sharding must be 'replicate' or 'fsdp', got {self.param_sharding!r}")


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: list | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    fixed = cfg.fsdp * cfg.tensor
    data = cfg.data if cfg.data != -1 else len(devices) // fixed
    if data * fixed != len(devices) or data <= 0:
        raise ValueError(f"mesh data={cfg.data} × fsdp={cfg.fsdp} × tensor={cfg.tensor} "
                         f"does not match {len(devices)} devices")
    grid = np.asarray(devices).reshape(data, cfg.fsdp, cfg.tensor)
    return Mesh(grid, AXES)


def fsdp_spec(path: tuple, shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The FSDP rule for one array: split its largest divisible axis over "fsdp"."""
    names = [str(getattr(k, "key", k)) for k in path]
    first = 1 if "layers" in names else 0          # stacked layers: never split L
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def param_specs(params: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
    """A PartitionSpec for every leaf of `params` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]

    def rule(path, x):
        if cfg.param_sharding == "replicate" or not hasattr(x, "shape"):
            return P()
        return fsdp_spec(path, tuple(x.shape), fsdp_size, cfg.min_fsdp_size)

    return jax.tree_util.tree_map_with_path(rule, params)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data × fsdp; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
