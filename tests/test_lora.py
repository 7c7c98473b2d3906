"""LoRA (eq. 24): W = W_0 + (α/r) B A as a pytree transform, checked against float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _params import random_params

import arlm
from arlm.model.lora import LoraConfig, count_lora_params, init_lora, lora_delta, merge_lora
from arlm.objectives import pretrain_loss
from arlm.sharding import MeshConfig, batch_sharding, make_mesh
from arlm.train.state import create_train_state
from arlm.train.step import make_train_step

SIZES = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
CONFIGS = {
    "llama": arlm.ModelConfig.llama(n_kv_heads=2, **SIZES),
    "gpt2": arlm.ModelConfig.gpt2(**SIZES),
    "moe": arlm.ModelConfig.llama(n_kv_heads=2, n_experts=4, moe_top_k=2, tie_embeddings=False, **SIZES),
}
LORA = LoraConfig(rank=3, alpha=6.0)


def _leaves(tree):
    return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _adapters(lora):
    """{weight path: (a, b)} of a LoRA pytree."""
    return {p[:-1]: (x, _leaves(lora)[p[:-1] + ("b",)]) for p, x in _leaves(lora).items() if p[-1] == "a"}


def _layout(path, shape):
    """Independent of arlm.model.lora: (batch shape, d_in, d_out) from the model's conventions."""
    n_batch = (path[0] == "layers") + ("moe" in path)
    n_in = 2 if path[-1] == "wo" else 1
    return shape[:n_batch], math.prod(shape[n_batch:n_batch + n_in]), math.prod(shape[n_batch + n_in:])


def _randomize(lora, seed):
    """Non-zero a and b (init has b = 0, which would hide every mapping mistake)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), lora)


def _merged_np64(params, lora, cfg=LORA):
    """W + (α/r) a @ b in float64 numpy for every adapted weight, on W reshaped to [*batch, d_in, d_out]."""
    out = {}
    for path, (a, b) in _adapters(lora).items():
        w = np.asarray(_leaves(params)[path], np.float64)
        batch, d_in, d_out = _layout(path, w.shape)
        delta = cfg.alpha / cfg.rank * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        out[path] = (w.reshape(*batch, d_in, d_out) + delta).reshape(w.shape), delta
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_init_merge_is_exactly_the_base_model(name):
    config = CONFIGS[name]
    params = random_params(config)
    lora = init_lora(LoraConfig(), params, jax.random.PRNGKey(0))
    projections = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out", "w_in"}   # by hand, not from arlm
    adapted = {p for p in _leaves(params) if p[-1] in projections}
    assert set(_adapters(lora)) == adapted and len(adapted) == {"llama": 7, "gpt2": 6, "moe": 7}[name]
    expected = 0
    for path, (a, b) in _adapters(lora).items():
        batch, d_in, d_out = _layout(path, _leaves(params)[path].shape)
        assert a.shape == (*batch, d_in, 8) and b.shape == (*batch, 8, d_out), path
        assert not np.any(np.asarray(b))
        assert abs(float(np.std(a)) * math.sqrt(d_in) - 1) < 0.15, path     # a ~ N(0, 1/d_in)
        expected += math.prod(batch) * 8 * (d_in + d_out)
    assert count_lora_params(lora) == expected
    assert _leaves(params)[("layers", "attn", "wo")].shape == (2, 4, 8, 32)
    assert _adapters(lora)[("layers", "attn", "wo")][0].shape == (2, 32, 8)      # in = (H, K)

    merged = merge_lora(LoraConfig(), params, lora)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for path, w in _leaves(params).items():
        assert np.array_equal(np.asarray(_leaves(merged)[path]), np.asarray(w)), path
        if path not in adapted:
            assert _leaves(merged)[path] is w, path
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(arlm.forward(config, merged, tokens)),
                                  np.asarray(arlm.forward(config, params, tokens)))


@pytest.mark.parametrize("name", CONFIGS)
def test_delta_matches_numpy_and_has_rank_r(name):
    params = random_params(CONFIGS[name])
    lora = _randomize(init_lora(LORA, params, jax.random.PRNGKey(1)), seed=2)
    deltas, merged = _leaves(lora_delta(LORA, params, lora)), _leaves(jax.jit(merge_lora, static_argnums=0)(
        LORA, params, lora))
    for path, (want_w, want_delta) in _merged_np64(params, lora).items():
        shape = _leaves(params)[path].shape
        assert deltas[path].shape == shape and merged[path].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(deltas[path], np.float64), want_delta.reshape(shape),
                                   rtol=1e-5, atol=1e-6, err_msg=str(path))
        np.testing.assert_allclose(np.asarray(merged[path], np.float64), want_w, rtol=1e-5, atol=1e-6,
                                   err_msg=str(path))
        sv = np.linalg.svd(np.asarray(deltas[path], np.float64).reshape(want_delta.shape), compute_uv=False)
        ranks = (sv > 1e-5 * sv[..., :1]).sum(-1)            # singular values above float32 rounding
        assert np.all(ranks == LORA.rank), (path, ranks)     # ≤ r always; = r for generic a, b


def test_grad_wrt_adapters_matches_finite_differences_x64():
    """d/d(a, b) of Σ sin(W_merged) against float64 central differences of the numpy function."""
    was_x64 = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), random_params(CONFIGS["gpt2"]))
        lora = _randomize(init_lora(LORA, params, jax.random.PRNGKey(3)), seed=4)
        assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(lora))

        def loss(lora):
            merged = merge_lora(LORA, params, lora)
            return sum(jnp.sum(jnp.sin(w)) for w in jax.tree_util.tree_leaves(merged))

        def loss_np64(lora_np):
            merged = _merged_np64(params, lora_np)
            rest = sum(np.sin(np.asarray(w)).sum() for p, w in _leaves(params).items() if p not in merged)
            return rest + sum(np.sin(w).sum() for w, _ in merged.values())

        grads = jax.jit(jax.grad(loss))(lora)          # only lora_params are differentiated
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
        lora_np = jax.tree_util.tree_map(lambda x: np.array(x, np.float64), lora)
        rng, h = np.random.default_rng(5), 1e-5
        for path, (a, b) in _adapters(lora_np).items():
            for arr, which in ((a, "a"), (b, "b")):
                idx = tuple(int(rng.integers(n)) for n in arr.shape)
                orig = arr[idx]
                arr[idx] = orig + h
                up = loss_np64(lora_np)
                arr[idx] = orig - h
                down = loss_np64(lora_np)
                arr[idx] = orig
                got = float(_leaves(grads)[path + (which,)][idx])
                np.testing.assert_allclose(got, (up - down) / (2 * h), rtol=1e-6, atol=1e-8,
                                           err_msg=f"{path} {which} {idx}")
    assert jax.config.jax_enable_x64 == was_x64


def test_adapter_training_lowers_loss_and_leaves_base_untouched():
    config = CONFIGS["llama"]
    base = random_params(config)
    base_before = jax.tree_util.tree_map(np.array, base)
    rng = np.random.default_rng(6)
    toks = rng.integers(0, config.vocab_size, (4, 13)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}

    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    opt = optax.adam(1e-2)
    state, sharding = create_train_state(lambda k: init_lora(LORA, base, k), opt, mesh, MeshConfig(), seed=0)
    step = make_train_step(lambda lora, b: pretrain_loss(config, merge_lora(LORA, base, lora), b),
                           opt, sharding, batch_sharding(mesh))
    losses = []
    for _ in range(40):
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses
    assert float(jnp.max(jnp.abs(state.params["layers"]["attn"]["wq"]["b"]))) > 0
    for path, w in _leaves(base).items():
        assert np.array_equal(np.asarray(w), _leaves(base_before)[path]), path


def test_config_and_target_errors():
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoraConfig(alpha=0.0)
    with pytest.raises(ValueError, match="targets is empty"):
        LoraConfig(targets=())
    assert hash(LoraConfig(targets=["wq"])) == hash(LoraConfig(targets=("wq",)))
    params = random_params(CONFIGS["llama"])
    with pytest.raises(ValueError, match=r"\['w_qkv'\] match no parameter.*'wq'"):
        init_lora(LoraConfig(targets=("wq", "w_qkv")), params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="match no parameter"):
        init_lora(LoraConfig(targets=("w_in",)), params, jax.random.PRNGKey(0))   # GPT-2's name only
    with pytest.raises(ValueError, match="weight matrices only"):
        init_lora(LoraConfig(targets=("scale",)), params, jax.random.PRNGKey(0))
    lora = init_lora(LoraConfig(targets=("wq",)), params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="does not match"):
        merge_lora(LoraConfig(), params, lora)
