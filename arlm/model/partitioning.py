"""Each weight's logical axes, as its module declared them, and what derives from them.

Every parameter is created through `layers.weight(module, name, init, shape, axes)`, which
names each dimension by its role: the query projection wq [L, D, H, K] is
("layers", "embed", "heads", None). This module collects those declarations
(`param_axes(config)`, read from an abstract `init`, nothing allocated) and derives from them,
without restating any weight's name:

* `param_specs`: each weight's PartitionSpec under `arlm.sharding.RULES`, the one table that
  also lays out activations and the KV cache. Train states, frozen reference weights and
  orbax checkpoints (restored into `state_sharding`) all take their layout from here.
* `projection_dims`: a projection reads from or writes to the residual stream, so its
  "embed" axis tells input from output: wq [L, D, H, K] maps D → H·K, wo [L, H, K, D] maps
  H·K → D. LoRA (eq. 24) adapts exactly these (`is_projection`).
* `decay_mask`: AdamW decays the matrices that touch the residual stream (embeddings,
  projections, experts, router), never norm scales or biases.

Leaves the model did not declare (LoRA adapters, a value head) have no axes: sharding falls
back to splitting their largest divisible dimension over "fsdp", the decay mask to their rank.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec as P

from arlm.config import ModelConfig
from arlm.model.transformer import LAYER_AXIS, declared_params
from arlm.sharding import MeshConfig, fsdp_spec, spec_from_axes

Axes = tuple[str | None, ...]
BATCH_PARAM_AXES = (LAYER_AXIS, "expert")     # leading axes a projection is stacked over
STREAM_AXIS = "embed"                          # the residual stream's width D
HIDDEN_AXES = ("heads", "kv_heads", "mlp")     # what a projection maps the stream to or from

# Configs that between them create every kind of parameter arlm has (GPT-2 and Llama blocks,
# biases, q/k norms, sandwich norms, learned positions, an untied head, both kinds of experts);
# `declared_axes` reads the union of their declarations. `tests/test_partitioning.py` checks
# that every family preset's parameters are covered.
_SMALL = dict(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=8, max_seq_len=4)
_COVERING_CONFIGS = (
    ModelConfig.gpt2(**_SMALL, tie_embeddings=False),
    ModelConfig.gpt2(**_SMALL, n_experts=2),
    ModelConfig.llama(**_SMALL, n_kv_heads=1, use_bias=True, qk_norm=True, sandwich_norm=True),
    ModelConfig.llama(**_SMALL, n_experts=2),
)


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


@functools.lru_cache(maxsize=64)
def param_axes(config: ModelConfig) -> Any:
    """The logical axes of every parameter of `config`: a tree shaped like `init_params(config)`
    whose leaves are tuples of axis names ("layers" first under params["layers"])."""
    boxed = declared_params(config)
    return jax.tree_util.tree_map(lambda x: tuple(x.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.lru_cache(maxsize=1)
def declared_axes() -> dict[tuple[str, ...], Axes]:
    """Path in the params tree (e.g. ("layers", "attn", "wq")) → its declared logical axes, over
    every kind of parameter arlm's models create."""
    table: dict[tuple[str, ...], Axes] = {}
    for config in _COVERING_CONFIGS:
        leaves = jax.tree_util.tree_leaves_with_path(param_axes(config), is_leaf=lambda x: isinstance(x, tuple))
        for path, axes in leaves:
            table[_names(path)] = axes
    return table


def leaf_axes(path: tuple, ndim: int) -> Axes | None:
    """The declared axes of the leaf at `path` in any tree that holds model params, at the root or
    under a prefix ({"ref": params}, {"policy": params}), or None for a leaf the model does not
    declare (an adapter, a value head) or whose rank differs."""
    names = _names(path)
    table = declared_axes()
    for start in range(len(names)):
        axes = table.get(names[start:])
        if axes is not None:
            return axes if len(axes) == ndim else None
    return None


def param_specs(params: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
    """A PartitionSpec for every leaf of `params` (arrays or ShapeDtypeStructs): declared axes go
    through `arlm.sharding.RULES`; undeclared leaves follow the FSDP fallback."""
    def rule(path: tuple, x: Any) -> P:
        if not hasattr(x, "shape"):
            return P()
        shape = tuple(x.shape)
        axes = leaf_axes(path, len(shape))
        if axes is None:
            fsdp_on = cfg.param_sharding == "fsdp"
            return fsdp_spec(_names(path), shape, mesh.shape["fsdp"], cfg.min_fsdp_size) if fsdp_on else P()
        return spec_from_axes(axes, shape, mesh, cfg)
    return jax.tree_util.tree_map_with_path(rule, params)


def is_projection(axes: Axes | None) -> bool:
    """A weight that maps the residual stream to heads or the MLP hidden layer, or back."""
    return axes is not None and STREAM_AXIS in axes and any(a in axes for a in HIDDEN_AXES)


def projection_dims(axes: Axes, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """(stacked shape, d_in, d_out) of a projection laid out [*stacked, *in, *out] (x @ W):
    stacked = its leading layer and expert axes; the stream axis is its input if it comes first
    among the rest, else its output."""
    if not is_projection(axes):
        raise ValueError(f"axes {axes} are not a projection's (it needs {STREAM_AXIS!r} and one of {HIDDEN_AXES})")
    n_batch = 0
    while axes[n_batch] in BATCH_PARAM_AXES:
        n_batch += 1
    n_in = 1 if axes[n_batch] == STREAM_AXIS else len(axes) - n_batch - 1
    return shape[:n_batch], math.prod(shape[n_batch:n_batch + n_in]), math.prod(shape[n_batch + n_in:])


def decay_mask(params: Any) -> Any:
    """True for the leaves AdamW should decay: declared weights with a stream axis and another
    non-stacked axis (embeddings, projections, experts, router); undeclared leaves when they are
    matrices (rank ≥ 2 beyond a stacked layer axis)."""
    def decays(path: tuple, x: Any) -> bool:
        axes = leaf_axes(path, x.ndim)
        if axes is not None:
            return STREAM_AXIS in axes and len([a for a in axes if a not in BATCH_PARAM_AXES]) >= 2
        return x.ndim - int(LAYER_AXIS in _names(path)) >= 2
    return jax.tree_util.tree_map_with_path(decays, params)
