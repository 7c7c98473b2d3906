"""Hugging Face checkpoint directories ⇄ arlm, checked against `transformers` itself.

The oracle is the PyTorch implementation in `transformers` (CPU, float32, eager
attention): a randomly initialised `GPT2LMHeadModel` / `LlamaForCausalLM` is saved
with `save_pretrained` (safetensors), loaded with `arlm.load`, and both models'
logits are compared on the same tokens. Weights are re-drawn away from the HF
initialisation (matrices with std 0.15, norm scales ~ 1 ± 0.3, biases ~ ±0.3) so
that a missing bias, a transposed matrix, a wrong RoPE layout or GQA head mapping
shows up as an O(1) error instead of hiding behind zeros and ones.

Tolerances (float32 vs float32, different summation orders):
    max |arlm − hf| ≤ 1e-4   and   ‖arlm − hf‖₂ / ‖hf‖₂ ≤ 1e-5.
Measured: max abs ≈ 1e-6..5e-6 and rel L2 ≈ 3e-7..8e-7 (printed with `-s`).

Everything runs offline: models are built from configs, never fetched by name.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _hf_oracle  # noqa: E402

torch, transformers = _hf_oracle.import_oracle()

import arlm  # noqa: E402
from arlm import ModelConfig  # noqa: E402

MAX_ABS = 1e-4
REL_L2 = 1e-5
B, T = 2, 16
MATRIX_STD = 0.15


# ---------------------------------------------------------------------------------- helpers
def _perturb_torch(model, seed: int) -> None:
    """Re-draw every parameter away from HF's init (in place; tied tensors stay tied)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * MATRIX_STD)
            elif name.endswith("bias"):
                p.copy_(noise * 0.3)
            else:                                   # norm scales
                p.copy_(1.0 + noise * 0.3)


def _perturb_arlm(params, seed: int):
    """Same idea for arlm params (numpy, so no per-leaf compiles): matrices N(0, 0.15²),
    norm scales / biases shifted by N(0, 0.3²)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "norm" in name or name.endswith("_bias']"):
            return np.asarray(x, np.float32) + np.float32(0.3) * noise
        return np.float32(MATRIX_STD) * noise

    return jax.tree_util.tree_map_with_path(draw, params)


_init_params = jax.jit(arlm.init_params, static_argnums=0)


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T), dtype=np.int64)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _arlm_logits(config: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(arlm.forward(config, params, jnp.asarray(tokens, jnp.int32)))


def _assert_close(ours: np.ndarray, ref: np.ndarray, label: str) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    max_abs = float(np.max(np.abs(ours - ref)))
    rel_l2 = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"\n[{label}] max|arlm-hf| = {max_abs:.2e} (logit scale {np.max(np.abs(ref)):.2f}), "
          f"rel L2 = {rel_l2:.2e}")
    assert max_abs <= MAX_ABS, f"{label}: max abs diff {max_abs:.3e} > {MAX_ABS}"
    assert rel_l2 <= REL_L2, f"{label}: relative L2 diff {rel_l2:.3e} > {REL_L2}"
    # The comparison must be meaningful: logits far from constant, not all tokens alike.
    assert np.std(ref) > 0.1


def _hf_model(hf_config):
    arch = hf_config.architectures[0] if hf_config.architectures else None
    cls = transformers.GPT2LMHeadModel if hf_config.model_type == "gpt2" else transformers.LlamaForCausalLM
    assert arch in (None, cls.__name__)
    torch.manual_seed(0)
    return cls(hf_config)


# ------------------------------------------------------------------- 1. transformers → arlm
HF_CASES = {
    "gpt2_small": lambda: transformers.GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager"),
    # explicit n_inner, 3 heads of 16, non-default eps and the other tanh-GELU spelling
    "gpt2_wide": lambda: transformers.GPT2Config(
        vocab_size=101, n_embd=48, n_layer=2, n_head=3, n_inner=80, n_positions=24,
        layer_norm_epsilon=1e-4, activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        attn_implementation="eager"),
    # GPT2LMHeadModel can untie lm_head from wte (transformers ≥ 5 saves lm_head.weight then)
    "gpt2_untied": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager"),
    "llama_mha_tied": lambda: transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True,
        attn_implementation="eager"),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        attn_implementation="eager"),
    "llama_bias": lambda: transformers.LlamaConfig(
        vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5, attn_implementation="eager"),
    # small θ: every frequency rotates noticeably within 16 positions
    "llama_rope_theta": lambda: transformers.LlamaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=100.0, attn_implementation="eager"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_checkpoint_matches(case, tmp_path):
    hf_config = HF_CASES[case]()
    model = _hf_model(hf_config)
    _perturb_torch(model, seed=sorted(HF_CASES).index(case))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))

    loaded = arlm.load(str(tmp_path))
    cfg = loaded.config
    assert cfg.vocab_size == hf_config.vocab_size
    if hf_config.model_type == "gpt2":
        assert (cfg.pos_embedding, cfg.norm, cfg.mlp, cfg.use_bias) == ("learned", "layernorm", "gelu", True)
        assert cfg.d_ff == (hf_config.n_inner or 4 * hf_config.n_embd)
        assert cfg.norm_eps == hf_config.layer_norm_epsilon
        assert cfg.tie_embeddings == hf_config.tie_word_embeddings
        assert ("unembed" in loaded.params) == (not hf_config.tie_word_embeddings)
    else:
        assert (cfg.pos_embedding, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
        assert cfg.n_kv_heads == hf_config.num_key_value_heads
        assert cfg.tie_embeddings == hf_config.tie_word_embeddings
        assert cfg.use_bias == hf_config.attention_bias
        assert cfg.rope_theta == hf_config.rope_parameters["rope_theta"]
        assert cfg.norm_eps == pytest.approx(hf_config.rms_norm_eps)
        assert ("unembed" in loaded.params) == (not hf_config.tie_word_embeddings)

    tokens = _tokens(cfg.vocab_size)
    _assert_close(_arlm_logits(cfg, loaded.params, tokens), _hf_logits(model, tokens), case)


def test_positions_matter(tmp_path):
    """Sanity check of the oracle: a wrong rope_theta is caught by the tolerance above."""
    hf_config = HF_CASES["llama_rope_theta"]()
    model = _hf_model(hf_config)
    _perturb_torch(model, seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = arlm.load(str(tmp_path))
    tokens = _tokens(loaded.config.vocab_size)
    wrong = _arlm_logits(loaded.config.replace(rope_theta=10000.0), loaded.params, tokens)
    ref = _hf_logits(model, tokens)
    assert np.linalg.norm(wrong - ref) / np.linalg.norm(ref) > 1e-2


# --------------------------------------------------------------------- 2. arlm → transformers
ROUND_TRIP = {
    "llama_gqa_untied": ModelConfig.llama(vocab_size=100, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
                                          d_ff=96, max_seq_len=32, rope_theta=5000.0, norm_eps=1e-6,
                                          tie_embeddings=False),
    "llama_bias_tied": ModelConfig.llama(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                         d_ff=64, max_seq_len=16, use_bias=True, tie_embeddings=True),
    "gpt2": ModelConfig.gpt2(vocab_size=100, d_model=32, n_layers=2, n_heads=4, max_seq_len=16),
    "gpt2_untied": ModelConfig.gpt2(vocab_size=60, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=16,
                                    tie_embeddings=False),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_save_hf_round_trip(case, tmp_path):
    cfg = ROUND_TRIP[case]
    params = _perturb_arlm(_init_params(cfg, jax.random.PRNGKey(0)), seed=1)
    out = arlm.save_hf(str(tmp_path), cfg, params)
    assert out == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    # transformers reads it (config class from config.json, weights from safetensors) ...
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                              dtype=torch.float32)
    expected_cls = "GPT2LMHeadModel" if cfg.pos_embedding == "learned" else "LlamaForCausalLM"
    assert type(model).__name__ == expected_cls
    assert model.config.tie_word_embeddings == cfg.tie_embeddings
    if expected_cls == "LlamaForCausalLM":
        assert model.config.num_key_value_heads == cfg.n_kv_heads
        assert model.config.rope_parameters["rope_theta"] == cfg.rope_theta
        assert model.config.tie_word_embeddings == cfg.tie_embeddings
        assert model.config.attention_bias == model.config.mlp_bias == cfg.use_bias
    tokens = _tokens(cfg.vocab_size, seed=1)
    _assert_close(_arlm_logits(cfg, params, tokens), _hf_logits(model, tokens), f"save_hf {case}")

    # ... and arlm reads back exactly what it wrote.
    loaded = arlm.load(str(tmp_path))
    assert loaded.config == cfg
    ours = jax.tree_util.tree_flatten_with_path(params)[0]
    back = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    assert [p for p, _ in ours] == [p for p, _ in back]
    for (path, a), (_, b) in zip(ours, back):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and b.dtype == np.float32, jax.tree_util.keystr(path)
        assert np.array_equal(a, b), f"{jax.tree_util.keystr(path)} changed in the round trip"


def test_save_hf_refuses_mixed_family(tmp_path):
    cfg = ModelConfig.llama(vocab_size=50, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=8,
                            pos_embedding="learned")
    params = jax.eval_shape(functools.partial(arlm.init_params, cfg), jax.random.PRNGKey(0))   # only the tree is needed
    with pytest.raises(ValueError, match="no exact Hugging Face GPT2LMHeadModel equivalent: norm, mlp"):
        arlm.save_hf(str(tmp_path), cfg, params)


# -------------------------------------------------------------------------- 3. sharded files
@pytest.mark.parametrize("case", ["llama_gqa_untied", "gpt2_small"])
def test_sharded_safetensors(case, tmp_path):
    hf_config = HF_CASES[case]()
    model = _hf_model(hf_config)
    _perturb_torch(model, seed=7)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()

    loaded = arlm.load(str(tmp_path))
    tokens = _tokens(loaded.config.vocab_size, seed=2)
    _assert_close(_arlm_logits(loaded.config, loaded.params, tokens), _hf_logits(model, tokens),
                  f"sharded {case} ({len(shards)} shards)")


def test_sharded_missing_shard_is_an_error(tmp_path):
    from arlm.checkpoints import CheckpointFormatError

    model = _hf_model(HF_CASES["gpt2_small"]())
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointFormatError, match=f"lists {victim}, which is missing"):
        arlm.load(str(tmp_path))
