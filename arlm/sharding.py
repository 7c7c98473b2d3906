"""Device meshes and partition rules: SPMD with `jax.jit` shardings, never `pmap`.

The mesh has named axes ("data", "fsdp", "tensor"). The batch is split over
data × fsdp. Parameters are placed by rules, in two steps:

1. every parameter has *logical* axes, named by its role where its module creates it
   (`arlm.model.layers.weight`; e.g. the query projection wq [L, D, H, K] is
   ("layers", "embed", "heads", None)), collected by `arlm.model.partitioning`;
2. `RULES` map logical axes to mesh axes: attention heads, the MLP hidden dimension and the
   vocabulary go to "tensor" (Megatron-style tensor parallelism), the model dimension to
   "fsdp" when `param_sharding="fsdp"`. A dimension the mesh axis does not divide stays whole.

Arrays without declared axes (LoRA adapters, value heads) that are large enough are FSDP-split
along their largest divisible axis (`fsdp_spec`). The stacked layer axis is never split.
Optimizer state follows its parameters (`arlm.train.state.state_specs`).

Activations follow the same rules through `constrain(x, logical axes)`, which the model calls at
layer boundaries: while a mesh is active (`jax.set_mesh`, or `use_abstract_mesh` inside the train
step and generation), the residual stream h [B, T, D] is split over the batch and replicated over
"tensor", q/k/v over heads, the MLP hidden over "tensor". Without them XLA may keep FSDP-split weights
in place and all-reduce D-split activations instead of gathering the weights. With no active mesh
`constrain` is the identity, so the model is unchanged on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
    param_sharding: str = "replicate"   # or "fsdp"; tensor parallelism follows the "tensor" axis size
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


def mesh_from_fields(fields: Mapping[str, Any]) -> Mesh:
    """The mesh of a job config's `mesh` fields (MeshConfig's, plus `num_devices`: the first N devices,
    0 for all of them)."""
    fields = dict(fields)
    n = int(fields.pop("num_devices", 0) or 0)
    return make_mesh(MeshConfig(**fields), devices=jax.devices()[:n] if n else None)


# The one table: logical axis → mesh axes, for weights, activations and the KV cache. Weights
# declare their logical axes where they are created (`arlm.model.layers.weight`); activations
# name theirs in `constrain`. "embed" (the model dimension D) is split over "fsdp" for weights
# only under param_sharding="fsdp", and activations keep D whole (they pass None for it).
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,          # rows of the batch, of activations and of the KV cache
    "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",), "vocab": ("tensor",),
    "embed": ("fsdp",),
}


def fsdp_spec(names: tuple[str, ...], shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The fallback rule for an array without declared axes (at param path `names`): split its
    largest divisible axis over "fsdp", never the stacked layer axis under "layers"."""
    first = 1 if "layers" in names else 0
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def spec_from_axes(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, cfg: MeshConfig) -> P:
    """The PartitionSpec of a weight with logical `axes` under `RULES`: each mesh axis used once,
    "fsdp" only under param_sharding="fsdp" for weights of at least `min_fsdp_size` elements,
    and a dimension the mesh axis does not divide stays whole."""
    fsdp_on = cfg.param_sharding == "fsdp" and int(np.prod(shape)) >= cfg.min_fsdp_size
    spec: list[str | None] = [None] * len(shape)
    for i, name in enumerate(axes):
        for mesh_axis in RULES.get(name, ()) if name else ():
            if mesh_axis in spec or mesh.shape[mesh_axis] == 1 or (mesh_axis == "fsdp" and not fsdp_on):
                continue
            if shape[i] % mesh.shape[mesh_axis] == 0:
                spec[i] = mesh_axis
    return P(*spec)


def cache_spec(mesh: Mesh, batch: int, n_kv_heads: int) -> P:
    """The KV cache [L, B, S, N, K] under `RULES`: rows like the batch, key/value heads like wk/wv."""
    return activation_spec(dict(mesh.shape), (1, batch, 1, n_kv_heads, 1), (None, "batch", None, "kv_heads", None))


def activation_spec(mesh_shape: dict[str, int], shape: tuple[int, ...], axes: tuple[str | None, ...]) -> P:
    """The PartitionSpec of an array with logical `axes` on a mesh. Mesh axes the mesh lacks or of
    size 1 are dropped; a dimension they do not divide, or with no rule, stays whole (replicated)."""
    if len(axes) != len(shape):
        raise ValueError(f"activation of shape {shape} given {len(axes)} logical axes {axes}")
    spec: list[Any] = []
    for size, name in zip(shape, axes):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if mesh_shape.get(a, 1) > 1) if name != "embed" else ()
        n = int(np.prod([mesh_shape[a] for a in mesh_axes])) if mesh_axes else 1
        spec.append(None if n == 1 or size % n else (mesh_axes if len(mesh_axes) > 1 else mesh_axes[0]))
    return P(*spec)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """`x` laid out by its logical `axes` (e.g. "batch", None, "heads", None) on the active mesh,
    dimensions without a rule whole; the identity when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(dict(mesh.shape), tuple(x.shape), axes))


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data × fsdp; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
