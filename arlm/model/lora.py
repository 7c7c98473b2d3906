"""LoRA (eq. 24): fine-tune only θ_trainable, the low-rank update of each adapted weight,
W = W_0 + (α/r) B A, with the base parameters θ_0 frozen.

A pure pytree transform over arlm's params: `init_lora` builds the adapter pytree,
`merge_lora` returns params with every adapted weight replaced by W_0 + (α/r) B A, so any
`loss_fn(params, batch)` becomes a loss of the adapters alone,
`lambda lora, batch: loss_fn(merge_lora(cfg, base, lora), batch)`, for the generic train step.

arlm computes x @ W, so a weight is laid out [*stacked, *in, *out]. Which weights are
projections, which axes are stacked (layers, experts) and which are input or output is read
from the logical axes each module declared (`arlm.model.partitioning.projection_dims`), not
from weight names. Its adapter is {"a": [*stacked, d_in, r], "b": [*stacked, r, d_out]}
(a = Aᵀ, b = Bᵀ), and the update is (α/r) · (a @ b) reshaped to W's shape. a ~ N(0, 1/d_in)
and b = 0, so the merged model equals the base model exactly at init.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from arlm.model.partitioning import declared_axes, is_projection, leaf_axes, projection_dims

Array = jax.Array
Params = Any
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha α (the update is scaled by α/r) and the weights to adapt.

    targets: None (every attention and MLP projection, and every expert's) or a tuple of weight
      names such as ("wq", "wv"). A projection name that this model lacks but another family has
      (GPT-2's "w_in" in a Llama model) is skipped, so one config serves all families.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ValueError(f"LoraConfig.targets must be a tuple of names, got the string {self.targets!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))   # hashable: static under jit
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be ≥ 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if self.targets is not None and not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one weight to adapt")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dims(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """(stacked shape, d_in, d_out) of the weight at `path`, from its declared axes."""
    axes = leaf_axes(path, len(shape))
    if not is_projection(axes):
        raise ValueError(f"LoRA adapts weight matrices only (projections to and from the residual stream); "
                         f"{'/'.join(path)} {shape} with axes {axes} is not one")
    return projection_dims(axes, shape)


def _projection_names() -> set[str]:
    return {path[-1] for path, axes in declared_axes().items() if is_projection(axes)}


def _targets(cfg: LoraConfig, params: Params) -> list[tuple[Path, Array]]:
    """(path, weight) of every leaf of params that cfg adapts, in tree order."""
    leaves = [(tuple(k.key for k in p), w) for p, w in jax.tree_util.tree_leaves_with_path(params)]
    if cfg.targets is None:
        found = [(p, w) for p, w in leaves if is_projection(leaf_axes(p, w.ndim))]
        if not found:
            raise ValueError("LoRA found no projection matrix in params; are these arlm model params?")
        return found
    found = [(p, w) for p, w in leaves if p[-1] in cfg.targets]
    unknown = sorted(set(cfg.targets) - {p[-1] for p, _ in found} - _projection_names())
    if unknown or not found:
        raise ValueError(f"LoRA targets {unknown or list(cfg.targets)} match no parameter; "
                         f"the weights are named {sorted({p[-1] for p, _ in leaves})}")
    return found


def _get(tree: dict, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_lora(cfg: LoraConfig, params: Params, key: Array) -> dict:
    """Adapters mirroring the targeted weights of params: {"a": N(0, 1/d_in), "b": 0}."""
    targets = _targets(cfg, params)
    lora: dict = {}
    for (path, w), k in zip(targets, jax.random.split(key, len(targets))):
        batch, d_in, d_out = _dims(path, w.shape)
        dtype = jnp.promote_types(w.dtype, jnp.float32)
        a_BxIxR = jax.random.normal(k, (*batch, d_in, cfg.rank), dtype) / math.sqrt(d_in)
        _set(lora, path, {"a": a_BxIxR, "b": jnp.zeros((*batch, cfg.rank, d_out), dtype)})
    return lora


def lora_delta(cfg: LoraConfig, params: Params, lora_params: dict) -> dict:
    """(α/r) B A of each adapted weight, shaped like it, in float32 (or W's dtype if wider)."""
    targets = _targets(cfg, params)
    if len(jax.tree_util.tree_leaves(lora_params)) != 2 * len(targets):
        raise ValueError(f"lora_params does not match the {len(targets)} weights that cfg.targets "
                         "selects; build it with init_lora(cfg, params, key)")
    deltas: dict = {}
    for path, w in targets:
        try:
            a_BxIxR, b_BxRxO = _get(lora_params, path)["a"], _get(lora_params, path)["b"]
        except (KeyError, TypeError):
            raise ValueError(f"lora_params has no adapter for {'/'.join(path)}; "
                             "build it with init_lora(cfg, params, key)") from None
        dtype = jnp.promote_types(w.dtype, jnp.float32)
        ab_BxIxO = jnp.matmul(a_BxIxR.astype(dtype), b_BxRxO.astype(dtype), precision="highest")
        _set(deltas, path, (cfg.scale * ab_BxIxO).reshape(w.shape))
    return deltas


def merge_lora(cfg: LoraConfig, params: Params, lora_params: dict) -> Params:
    """Eq. 24: params with each adapted W replaced by W + (α/r) B A (in W's dtype); other leaves as is."""
    deltas = lora_delta(cfg, params, lora_params)

    def merge(path: Any, w: Array) -> Array:
        name = tuple(k.key for k in path)
        try:
            delta = _get(deltas, name)
        except (KeyError, TypeError):
            return w
        return (w.astype(delta.dtype) + delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)


def count_lora_params(lora_params: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(lora_params))
