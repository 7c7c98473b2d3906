"""Logical axes declared where each weight is created, and what derives from them: weight
sharding, the LoRA projections, the weight-decay mask (`arlm.model.partitioning`)."""

from __future__ import annotations

import arlm
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from arlm.config import ModelConfig
from arlm.model.partitioning import decay_mask, is_projection, leaf_axes, param_axes, param_specs, projection_dims
from arlm.sharding import MeshConfig, make_mesh

BASE = dict(vocab_size=48, d_model=24, n_layers=3, n_heads=4, d_ff=40, max_seq_len=16)
FAMILIES = {
    "gpt2": ModelConfig.gpt2(**BASE, tie_embeddings=False),
    "llama_gqa": ModelConfig.llama(**BASE, n_kv_heads=2),
    "mistral": ModelConfig.mistral(**BASE, sliding_window=4),
    "qwen2": ModelConfig.qwen2(**BASE, n_kv_heads=2),
    "qwen3": ModelConfig.qwen3(**BASE, n_kv_heads=2, head_dim=8),
    "gemma2": ModelConfig.gemma2(**BASE, n_kv_heads=2),
    "gemma3": ModelConfig.gemma3(**BASE, n_kv_heads=2),
    "llama_bias": ModelConfig.llama(**BASE, use_bias=True),
    "moe_swiglu": ModelConfig.llama(**BASE, n_experts=5),
    "moe_gelu": ModelConfig.gpt2(**BASE, n_experts=5),
}


def _leaves(tree):
    return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple))}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_declared_axis_names_a_dimension_of_the_right_size(name):
    """Each weight's declared axes have its rank, and each named axis has the size the config
    gives that role; `leaf_axes` (the path lookup LoRA, sharding and decay use) agrees, also
    under a prefix such as {"ref": params}."""
    cfg = FAMILIES[name]
    shapes = _leaves(jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(
        lambda k: arlm.init_params(cfg, k), jax.random.PRNGKey(0))))
    axes = _leaves(param_axes(cfg))
    assert axes.keys() == shapes.keys()
    size = {"layers": cfg.n_layers, "embed": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "mlp": cfg.d_ff, "vocab": cfg.vocab_size, "expert": cfg.n_experts}
    for path, shape in shapes.items():
        assert len(axes[path]) == len(shape), path
        for a, n in zip(axes[path], shape):
            if a is not None:
                assert size[a] == n, (path, a, n)
        assert (axes[path][0] == "layers") == (path[0] == "layers"), path
        assert leaf_axes(path, len(shape)) == axes[path], path
        assert leaf_axes(("ref", *path), len(shape)) == axes[path], path
    assert leaf_axes(("layers", "attn", "wq", "a"), 3) is None          # a LoRA adapter: undeclared
    assert leaf_axes(("value", "w"), 1) is None


def test_declared_axes_of_named_weights():
    """Hand-written expectations for the roles of the weights the paper's equations name."""
    moe = param_axes(FAMILIES["moe_swiglu"])
    gqa = param_axes(FAMILIES["llama_gqa"])
    assert gqa["layers"]["attn"]["wq"] == ("layers", "embed", "heads", None)           # M (eq. 2)
    assert gqa["layers"]["attn"]["wk"] == ("layers", "embed", "kv_heads", None)        # N (eq. 2)
    assert gqa["layers"]["attn"]["wo"] == ("layers", "heads", None, "embed")           # W_O (eq. 4)
    assert gqa["layers"]["mlp"]["w_out"] == ("layers", "mlp", "embed")
    assert gqa["embed"] == ("vocab", "embed") and gqa["final_norm"]["scale"] == (None,)
    assert param_axes(FAMILIES["gpt2"])["unembed"] == ("embed", "vocab")               # W_U (eq. 6)
    assert moe["layers"]["moe"]["w_gate"] == ("layers", "expert", "embed", "mlp")
    assert moe["layers"]["moe"]["router"] == ("layers", "embed", None)


def test_projection_dims_split_input_from_output_at_the_stream_axis():
    assert projection_dims(("layers", "embed", "heads", None), (3, 24, 4, 6)) == ((3,), 24, 24)
    assert projection_dims(("layers", "heads", None, "embed"), (3, 4, 6, 24)) == ((3,), 24, 24)
    assert projection_dims(("layers", "expert", "mlp", "embed"), (3, 5, 40, 24)) == ((3, 5), 40, 24)
    assert projection_dims(("embed", "mlp"), (24, 40)) == ((), 24, 40)
    for not_projection in [("vocab", "embed"), ("layers", None), ("layers", "embed", None), ("heads", None)]:
        assert not is_projection(not_projection)
    with pytest.raises(ValueError, match="not a projection"):
        projection_dims(("vocab", "embed"), (48, 24))


@pytest.mark.parametrize("name", FAMILIES)
def test_decay_mask_is_the_matrices_not_norms_or_biases(name):
    """Against an independent rule by name and rank: decay every leaf of rank ≥ 2 beyond the
    stacked layer axis unless it is a norm or a bias."""
    params = jax.eval_shape(lambda k: arlm.init_params(FAMILIES[name], k), jax.random.PRNGKey(0))
    got = _leaves(decay_mask(params))
    for path, x in _leaves(params).items():
        matrix = len(x.shape) - (path[0] == "layers") >= 2
        want = matrix and not any("norm" in n or n.endswith("bias") for n in path)
        assert got[path] == want, path


def test_param_specs_follow_the_rules_for_declared_and_undeclared_leaves():
    cfg = FAMILIES["llama_gqa"].replace(d_model=32, d_ff=64, vocab_size=64)
    params = jax.eval_shape(lambda k: arlm.init_params(cfg, k), jax.random.PRNGKey(0))
    tree = {"ref": params, "adapter": {"layers": {"attn": {"wq": {"a": jax.ShapeDtypeStruct((3, 32, 8), np.float32)}}}}}
    mesh_cfg = MeshConfig(fsdp=4, tensor=2, param_sharding="fsdp", min_fsdp_size=16)
    specs = param_specs(tree, make_mesh(mesh_cfg), mesh_cfg)
    ref = specs["ref"]
    assert ref["layers"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)
    assert ref["layers"]["attn"]["wk"] == P(None, "fsdp", "tensor", None)     # 2 kv heads over tensor=2
    assert ref["layers"]["attn"]["wo"] == P(None, "tensor", None, "fsdp")
    assert ref["layers"]["mlp"]["w_out"] == P(None, "tensor", "fsdp")
    assert ref["embed"] == P("tensor", "fsdp")
    assert ref["layers"]["attn_norm"]["scale"] == P(None, None)
    assert specs["adapter"]["layers"]["attn"]["wq"]["a"] == P(None, "fsdp", None)   # fallback: largest axis, not L
    replicated = param_specs(tree, make_mesh(MeshConfig(data=4, tensor=2)), MeshConfig(data=4, tensor=2))
    assert replicated["ref"]["layers"]["attn"]["wq"] == P(None, None, "tensor", None)
    assert replicated["adapter"]["layers"]["attn"]["wq"]["a"] == P()
