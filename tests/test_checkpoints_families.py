"""The model families researchers use, against `transformers` on the same weights.

For Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3: a tiny random model built and
saved by transformers (every parameter, norms included, drawn at random so that a
wrong offset or a swapped tensor shows) loads in arlm with max |Δlogit| ≤ 1e-4; the
greedy continuations (arlm's KV-cache decode against transformers' generate) are
identical; and arlm's `save_hf` writes a directory that transformers loads back to the
same logits. The configs are chosen so that every option matters: a sliding window
shorter than the sequence, local and global layers, head_dim ≠ hidden/heads, soft-caps
that bite, grouped-query attention.
"""

from __future__ import annotations

import _hf_oracle  # noqa: F401  (offline mode before transformers is imported)

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.checkpoints import CheckpointFormatError
from arlm.checkpoints.hf_config import config_from_hf, config_to_hf

torch, transformers = _hf_oracle.import_oracle()

MAX_ABS = 1e-4
SEQ = 12
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# model_type → (transformers config class, model class, config kwargs beyond COMMON)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, sliding_window=4, head_dim=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=True,
                                                      rope_theta=1000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=12, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_hidden_layers=2, sliding_window=5, tie_word_embeddings=False)),
    # rescaled RoPE: Llama 3.1's rule (original context 8, so every branch of it is used) and
    # Gemma 3's linear scaling of its global layers
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(num_hidden_layers=2, head_dim=16, rope_parameters={
                        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "gemma3_linear_rope": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                           dict(num_hidden_layers=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 10000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})),
}


@functools.lru_cache(maxsize=None)
def _hf_model_dir(model_type: str, root: str) -> str:
    """A tiny random transformers model of `model_type`, saved (safetensors) under `root`."""
    config_cls, model_cls, extra = FAMILIES[model_type]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.15
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and "gemma" not in model_type else 0.0))
    path = os.path.join(root, model_type)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _hf_from_dir(path: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _ids(seed: int = 0, n: int = SEQ) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, COMMON["vocab_size"], size=(2, n)).astype(np.int32)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _arlm_logits_fn(config):
    return jax.jit(functools.partial(arlm.forward, config))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("families"))


def _model_type(path: str) -> str:
    return json.load(open(os.path.join(path, "config.json")))["model_type"]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_logits_and_greedy_match_transformers(model_type, root):
    path = _hf_model_dir(model_type, root)
    hf = _hf_from_dir(path)
    loaded = arlm.load(path)
    ids = _ids()
    ours = np.asarray(_arlm_logits_fn(loaded.config)(loaded.params, jnp.asarray(ids)))
    theirs = _hf_logits(hf, ids)
    assert np.max(np.abs(ours - theirs)) <= MAX_ABS, np.max(np.abs(ours - theirs))

    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        x = torch.tensor([prompt])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          num_beams=1, pad_token_id=0, eos_token_id=None, top_k=None, top_p=None,
                          temperature=None)[0, len(prompt):].tolist()
    out = arlm.generate(loaded.config, loaded.params, [prompt], key=jax.random.PRNGKey(0), max_new_tokens=10)
    assert np.asarray(out.tokens_BxN)[0].tolist() == ref


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_save_hf_round_trip_through_transformers(model_type, root, tmp_path):
    path = _hf_model_dir(model_type, root)
    loaded = arlm.load(path)
    if model_type == "phi3":     # only the loaded model knows it was Phi-3 (a Llama config otherwise)
        assert loaded.architecture == "phi3"
        out = loaded.save_hf(str(tmp_path / "saved"))
    else:                        # the family is inferred from the config alone
        out = arlm.save_hf(str(tmp_path / "saved"), loaded.config, loaded.params)
    assert _model_type(out) == _model_type(path)
    ids = _ids(1)
    original = _hf_logits(_hf_from_dir(path), ids)
    resaved = _hf_logits(_hf_from_dir(out), ids)
    assert np.max(np.abs(original - resaved)) <= MAX_ABS
    back = arlm.load(out)
    assert back.config == loaded.config


def test_a_sliding_window_changes_the_logits(root):
    """Control: the window is shorter than the sequence, so ignoring it would be caught above."""
    loaded = arlm.load(_hf_model_dir("mistral", root))
    ids = jnp.asarray(_ids())
    windowed = np.asarray(_arlm_logits_fn(loaded.config)(loaded.params, ids))
    global_cfg = loaded.config.replace(sliding_window=None)
    full = np.asarray(_arlm_logits_fn(global_cfg)(loaded.params, ids))
    assert np.allclose(windowed[:, :4], full[:, :4], atol=1e-5)      # t < W: the same keys
    assert np.max(np.abs(windowed[:, 4:] - full[:, 4:])) > 1e-2


def test_rope_scaling_is_read_and_matters(root):
    llama3 = arlm.load(_hf_model_dir("llama3_rope", root))
    assert llama3.config.rope_scaling == ("llama3", 4.0, 1.0, 4.0, 8.0)
    gemma = arlm.load(_hf_model_dir("gemma3_linear_rope", root))
    assert gemma.config.rope_scaling == ("linear", 8.0) and gemma.config.rope_local_theta == 10.0
    ids = jnp.asarray(_ids())
    for m in (llama3, gemma):     # control: without the scaling the logits differ
        plain = m.config.replace(rope_scaling=None)
        gap = np.abs(np.asarray(_arlm_logits_fn(m.config)(m.params, ids))
                     - np.asarray(_arlm_logits_fn(plain)(m.params, ids))).max()
        assert gap > 1e-2


def test_gemma3_local_layers_use_their_own_rope_base(root):
    loaded = arlm.load(_hf_model_dir("gemma3_text", root))
    assert (loaded.config.rope_theta, loaded.config.rope_local_theta) == (50000.0, 100.0)
    assert [loaded.config.is_global_layer(i) for i in range(3)] == [False, False, True]


# ------------------------------------------------------------------- malformed and unsupported configs
_DROP = object()


def _llama_cfg(**changes):
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


@pytest.mark.parametrize("changes, message", [
    (dict(rope_theta=float("nan")), r"'rope_theta' must be a finite positive number, got nan"),
    (dict(rms_norm_eps=float("inf")), r"'rms_norm_eps' must be a finite positive number"),
    (dict(tie_word_embeddings="false"), r"'tie_word_embeddings' must be true or false, got 'false'"),
    (dict(num_attention_heads=0), r"'num_attention_heads' must be a positive integer, got 0"),
    (dict(num_attention_heads=5), r"hidden_size 32 is not divisible by num_attention_heads 5"),
    (dict(num_key_value_heads=3), r"num_key_value_heads 3 must divide num_attention_heads 4"),
    (dict(hidden_size=_DROP), r"lacks the required field 'hidden_size'"),
    (dict(vocab_size="96"), r"'vocab_size' must be an integer"),
    (dict(vocab_size=96.0), r"'vocab_size' must be an integer"),
    (dict(model_type="mamba", architectures=_DROP), r"unsupported architecture 'mamba'"),
    (dict(architectures=["LlamaForSequenceClassification"]), r"unsupported architecture"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"unsupported RoPE scaling 'yarn'"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), r"quantization_config .*'gptq'"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}), r"'bitsandbytes'"),
    (dict(quantization_config={"quant_method": "awq"}), r"'awq'"),
    (dict(hidden_act="gelu"), r"unsupported activation hidden_act='gelu'"),
])
def test_malformed_config_values_are_named(changes, message):
    with pytest.raises(CheckpointFormatError, match=message):
        config_from_hf(_llama_cfg(**changes))


def test_legacy_rope_scaling_beside_default_rope_parameters_is_applied():
    """A config with rope_scaling (older transformers) and default rope_parameters: the scaling is not lost."""
    cfg, _ = config_from_hf(_llama_cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                       rope_scaling={"type": "linear", "factor": 4.0}))
    assert cfg.rope_scaling == ("linear", 4.0) and cfg.rope_theta == 5e5


def test_numpy_integers_are_integers():
    cfg, _ = config_from_hf(_llama_cfg(hidden_size=np.int64(32), num_hidden_layers=np.int32(2)))
    assert cfg.d_model == 32 and type(cfg.d_model) is int and cfg.n_layers == 2


@pytest.mark.parametrize("doc", [[1, 2], "llama", None, 3])
def test_config_json_that_is_not_an_object(doc):
    with pytest.raises(CheckpointFormatError, match="must hold a JSON object"):
        config_from_hf(doc)


def test_config_with_fewer_layers_than_the_file_is_refused(root, tmp_path):
    """The file holds 2 layers; a config that says 1 would silently drop one."""
    import shutil

    src = _hf_model_dir("qwen2", root)
    dst = tmp_path / "qwen2_short"
    shutil.copytree(src, dst)
    cfg = json.load(open(dst / "config.json"))
    cfg["num_hidden_layers"] = 1
    cfg["layer_types"] = cfg["layer_types"][:1]
    json.dump(cfg, open(dst / "config.json", "w"))
    with pytest.raises(CheckpointFormatError, match=r"does not account for: model\.layers\.1\."):
        arlm.load(str(dst))


def test_stray_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = arlm.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    d = arlm.save_hf(str(tmp_path), cfg, params)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"q_norm\.weight"):
        arlm.load(d)


def test_save_hf_refuses_a_family_that_cannot_express_the_config():
    cfg = arlm.ModelConfig.qwen3(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    with pytest.raises(ValueError, match="no exact Hugging Face LlamaForCausalLM equivalent: qk_norm"):
        config_to_hf(cfg, "llama")
    assert config_to_hf(cfg)[1].model_type == "qwen3"


# ------------------------------------------------------------------- GGUF (llama.cpp's names for each family)
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def _write_gguf(hf_dir: str, arch: str, path: str) -> None:
    """The tiny HF model as llama.cpp's converter writes it for `arch` (F32; no Q/K permutation: NEOX RoPE)."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    tokens = [chr(0x21 + i) for i in range(94)] + ["¡", "!!"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["! !"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for name, x in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3"])
def test_family_gguf_matches_transformers(arch, root, tmp_path):
    hf_dir = _hf_model_dir(arch, root)
    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_gguf(hf_dir, arch, path)
    loaded = arlm.load(path)
    ids = _ids(2)
    ours = np.asarray(_arlm_logits_fn(loaded.config)(loaded.params, jnp.asarray(ids)))
    if arch != "qwen3":      # transformers' GGUF reader ignores qwen3.attention.key_length (head_dim 12 here)
        oracle = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="eager").eval()
        assert np.max(np.abs(ours - _hf_logits(oracle, ids))) <= MAX_ABS
    if arch != "phi3":       # the phi3 file here has no sliding window (transformers would not read one)
        assert np.max(np.abs(ours - _hf_logits(_hf_from_dir(hf_dir), ids))) <= MAX_ABS
    assert loaded.config.qkv_bias == (arch == "qwen2") and loaded.config.qk_norm == (arch == "qwen3")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_is_refused_by_name(arch, tmp_path):
    import gguf

    path = str(tmp_path / f"{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointFormatError, match=f"GGUF architecture '{arch}' is not supported: llama.cpp does "
                                                    "not store"):
        arlm.load(path)
