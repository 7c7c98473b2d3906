"""Device meshes and partition rules: SPMD with `jax.jit` shardings, never `pmap`.

The mesh has named axes ("data", "fsdp", "tensor"). The batch is split over
data × fsdp. Parameters are placed by rules, in two steps:

1. every parameter has *logical* axes, named by its role (`LOGICAL_AXES`: e.g. the query
   projection wq [L, D, H, K] is (layers, embed, heads, head_dim));
2. `RULES` map logical axes to mesh axes: attention heads, the MLP hidden dimension and the
   vocabulary go to "tensor" (Megatron-style tensor parallelism), the model dimension to
   "fsdp" when `param_sharding="fsdp"`. A dimension the mesh axis does not divide stays whole.

Arrays without known roles (LoRA adapters, value heads) that are large enough are FSDP-split
along their largest divisible axis. The leading layer axis of stacked params is never split.
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


# Logical axes of each parameter (after the stacked layer axis), by "<module>/<leaf>" or "<leaf>".
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "pos_embed": (None, "embed"),
    "unembed": ("embed", "vocab"),
    "attn/wq": ("embed", "heads", None),
    "attn/wk": ("embed", "kv_heads", None),
    "attn/wv": ("embed", "kv_heads", None),
    "attn/wo": ("heads", None, "embed"),
    "attn/wq_bias": ("heads", None),
    "attn/wk_bias": ("kv_heads", None),
    "attn/wv_bias": ("kv_heads", None),
    "attn/wo_bias": (None,),
    "mlp/w_gate": ("embed", "mlp"),
    "mlp/w_up": ("embed", "mlp"),
    "mlp/w_in": ("embed", "mlp"),
    "mlp/w_out": ("mlp", "embed"),
    "mlp/w_in_bias": ("mlp",),
    "mlp/w_out_bias": (None,),
    "moe/router": ("embed", None),
    "moe/w_gate": ("expert", "embed", "mlp"),
    "moe/w_up": ("expert", "embed", "mlp"),
    "moe/w_in": ("expert", "embed", "mlp"),
    "moe/w_out": ("expert", "mlp", "embed"),
    "scale": (None,),
    "bias": (None,),
}

# Logical axis → mesh axis.
RULES: dict[str, str] = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                         "embed": "fsdp"}


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...] | None:
    """The logical axes of the parameter at `path` ([None, …] for the stacked layer axis), or None."""
    names = [str(getattr(k, "key", k)) for k in path]
    axes = LOGICAL_AXES.get("/".join(names[-2:])) or LOGICAL_AXES.get(names[-1])
    if axes is None or len(axes) > ndim:
        return None
    return (None,) * (ndim - len(axes)) + axes


def fsdp_spec(path: tuple, shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The fallback FSDP rule for one array: split its largest divisible axis over "fsdp"."""
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


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, cfg: "MeshConfig") -> P:
    """The PartitionSpec of one parameter under `RULES` (see the module docstring)."""
    fsdp_on = cfg.param_sharding == "fsdp" and int(np.prod(shape)) >= cfg.min_fsdp_size
    axes = logical_axes(path, len(shape))
    if axes is None:
        return fsdp_spec(path, shape, mesh.shape["fsdp"], cfg.min_fsdp_size) if fsdp_on else P()
    spec: list[str | None] = [None] * len(shape)
    for i, name in enumerate(axes):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is None or mesh_axis in spec or mesh.shape[mesh_axis] == 1:
            continue
        if mesh_axis == "fsdp" and not fsdp_on:
            continue
        if shape[i] % mesh.shape[mesh_axis] == 0:
            spec[i] = mesh_axis
    return P(*spec)


def param_specs(params: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
    """A PartitionSpec for every leaf of `params` (arrays or ShapeDtypeStructs)."""
    def rule(path, x):
        return param_spec(path, tuple(x.shape), mesh, cfg) if hasattr(x, "shape") else P()
    return jax.tree_util.tree_map_with_path(rule, params)


def cache_spec(mesh: Mesh, batch: int, n_kv_heads: int) -> P:
    """The KV cache [L, B, S, N, K] under the same rules: rows over data × fsdp (like the batch),
    key/value heads over "tensor" (like wk/wv); a dimension the mesh axes do not divide stays whole."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    heads = mesh.shape["tensor"]
    return P(None, BATCH_AXES if rows > 1 and batch % rows == 0 else None, None,
             "tensor" if heads > 1 and n_kv_heads % heads == 0 else None, None)


# Logical activation axis → mesh axes ("batch" rows go over data × fsdp, like the input batch).
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": BATCH_AXES, "heads": ("tensor",),
                                                "kv_heads": ("tensor",), "mlp": ("tensor",),
                                                "vocab": ("tensor",)}


def activation_spec(mesh_shape: dict[str, int], shape: tuple[int, ...], axes: tuple[str | None, ...]) -> P:
    """The PartitionSpec of an array with logical `axes` on a mesh. Mesh axes the mesh lacks or of
    size 1 are dropped; a dimension they do not divide, or with no rule, stays whole (replicated)."""
    if len(axes) != len(shape):
        raise ValueError(f"activation of shape {shape} given {len(axes)} logical axes {axes}")
    spec: list[Any] = []
    for size, name in zip(shape, axes):
        mesh_axes = tuple(a for a in ACTIVATION_RULES.get(name, ()) if mesh_shape.get(a, 1) > 1)
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
