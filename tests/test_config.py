"""ModelConfig: validated at construction, hashable, a static argument of jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from arlm import ModelConfig

BASE = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=12)


def make(**changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})


def test_defaults_and_family_presets():
    cfg = make()
    assert cfg.n_kv_heads == cfg.n_heads == 4
    assert cfg.head_dim == 8
    assert cfg.compute_dtype == jnp.float32
    gpt2 = ModelConfig.gpt2(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_seq_len=12)
    assert (gpt2.pos_embedding, gpt2.norm, gpt2.mlp, gpt2.use_bias, gpt2.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True)
    assert gpt2.d_ff == 4 * 32
    llama = ModelConfig.llama(**BASE, n_kv_heads=2)
    assert (llama.pos_embedding, llama.norm, llama.mlp, llama.use_bias) == ("rope", "rmsnorm", "swiglu", False)
    assert llama.n_kv_heads == 2
    assert make(dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_d_model_not_divisible_by_n_heads():
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=4"):
        make(d_model=30)


@pytest.mark.parametrize("n_kv_heads", [3, 8])
def test_n_kv_heads_must_divide_n_heads(n_kv_heads):
    with pytest.raises(ValueError, match=rf"n_kv_heads={n_kv_heads} must divide n_heads=4"):
        make(n_kv_heads=n_kv_heads)


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                   "max_seq_len"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive int, got {value}"):
        make(**{field: value})


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers"])
@pytest.mark.parametrize("value", [32.0, True, "32"])
def test_sizes_must_be_ints(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive int"):
        make(**{field: value})


@pytest.mark.parametrize("field,value", [("norm", "batchnorm"), ("mlp", "relu"), ("pos_embedding", "alibi"),
                                         ("dtype", "float16")])
def test_unknown_kinds(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}='{value}'; expected one of"):
        make(**{field: value})


def test_moe_top_k_must_fit_n_experts():
    with pytest.raises(ValueError, match=r"moe_top_k=3 must be in \[1, n_experts=2\]"):
        make(n_experts=2, moe_top_k=3)
    with pytest.raises(ValueError, match=r"moe_top_k=0"):
        make(n_experts=2, moe_top_k=0)
    with pytest.raises(ValueError, match=r"n_experts must be ≥ 0"):
        make(n_experts=-1)
    assert make(n_experts=2, moe_top_k=2).moe_top_k == 2


def test_other_bad_values():
    with pytest.raises(ValueError, match="RoPE needs an even head_dim"):
        make(d_model=36, n_heads=4, pos_embedding="rope")          # head_dim 9
    assert make(d_model=36, n_heads=4, pos_embedding="learned").head_dim == 9
    for field in ("rope_theta", "norm_eps", "init_std"):
        with pytest.raises(ValueError, match="must be > 0"):
            make(**{field: 0.0})


def test_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64  # type: ignore[misc]


def test_replace_revalidates():
    cfg = make()
    assert cfg.replace(n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="not divisible"):
        cfg.replace(d_model=30)


def test_hashable_and_equal_by_value():
    a, b = make(n_kv_heads=2), make(n_kv_heads=2)
    assert a == b and hash(a) == hash(b)
    assert a != make(n_kv_heads=1)
    assert len({a, b, make(n_kv_heads=1)}) == 2
    # The n_kv_heads default is resolved at construction, so explicit and implicit MHA are one config.
    assert make() == make(n_kv_heads=4) and hash(make()) == hash(make(n_kv_heads=4))


def test_static_argument_of_jit():
    traces = []

    def f(config: ModelConfig, x):
        traces.append(config)
        return x * config.d_model

    g = jax.jit(f, static_argnums=0)
    x = jnp.ones(3)
    assert float(g(make(), x)[0]) == 32.0
    assert float(g(make(), x)[0]) == 32.0          # an equal config hits the cache
    assert len(traces) == 1
    assert float(g(make(d_model=64), x)[0]) == 64.0  # a different config retraces
    assert len(traces) == 2


def test_dict_round_trip_and_unknown_keys():
    cfg = make(n_kv_heads=2, n_experts=4, dtype="bfloat16")
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields: \['n_head', 'foo'\]|"
                                         r"unknown ModelConfig fields: \['foo', 'n_head'\]"):
        ModelConfig.from_dict({**d, "foo": 1, "n_head": 4})
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig.from_dict({**d, "d_model": 30})
