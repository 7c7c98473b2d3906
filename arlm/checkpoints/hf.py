"""Hugging Face checkpoint directories (config.json + safetensors) ⇄ arlm.

Reading never uses pickle: only `config.json`, `*.safetensors` (and their
index) are read; a directory holding only `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any


from arlm.checkpoints.layout import (CheckpointFormatError, Tensors, gpt2_params_from_hf, gpt2_params_to_hf,
                                     llama_params_from_hf, llama_params_to_hf)
from arlm.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (llama or gpt2)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        # e.g. LlamaForSequenceClassification: same body, but no LM head to load
        raise CheckpointFormatError(
            f"unsupported architecture {archs!r}; arlm loads {', '.join(SUPPORTED_ARCHITECTURES)}")
    if model_type == "llama":
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if hf.get("rope_scaling") not in (None, {}) or rope_type != "default":
            raise CheckpointFormatError(f"unsupported RoPE scaling {hf.get('rope_scaling') or rope!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointFormatError(f"unsupported Llama activation {hf['hidden_act']!r} (only silu)")
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise CheckpointFormatError("head_dim != hidden_size / num_attention_heads is not supported")
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise CheckpointFormatError("attention_bias and mlp_bias must agree (arlm has one use_bias)")
        return ModelConfig.llama(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
            d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), use_bias=attn_bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointFormatError(f"unsupported GPT-2 activation {act!r} (arlm uses tanh-approximated GELU)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise CheckpointFormatError(f"unsupported GPT-2 option {flag}=True")
        if hf.get("scale_attn_weights", True) is False:
            raise CheckpointFormatError("unsupported GPT-2 option scale_attn_weights=False")
        d = hf["n_embd"]
        return ModelConfig.gpt2(
            vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    raise CheckpointFormatError(
        f"unsupported architecture {archs or model_type!r}; arlm loads {', '.join(SUPPORTED_ARCHITECTURES)}")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json dict for `cfg` (Llama or GPT-2 family, dense only)."""
    if cfg.n_experts:
        raise ValueError("mixture-of-experts models have no Hugging Face Llama/GPT-2 equivalent")
    if cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": cfg.use_bias,
            "mlp_bias": cfg.use_bias, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        }
    if (cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.use_bias
            and cfg.n_kv_heads == cfg.n_heads):
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        }
    raise ValueError("this ModelConfig mixes the Llama and GPT-2 families; Hugging Face has no class for it")


def read_safetensors(directory: str) -> Tensors:
    """All tensors of a directory's safetensors files (sharded or not), as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        pickled = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
        hint = " (arlm never unpickles .bin/.pt files; convert them to safetensors)" if pickled else ""
        raise CheckpointFormatError(f"no .safetensors file in {directory}{hint}")
    tensors: Tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointFormatError(f"{index} lists {name}, which is missing from {directory}")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointFormatError(f"cannot read {path}: truncated or corrupt safetensors ({err})") from err
    return tensors


def load_hf_dir(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from a local Hugging Face checkpoint directory."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory} has no config.json; not a Hugging Face checkpoint directory")
    with open(cfg_path, encoding="utf-8") as f:
        hf_cfg = json.load(f)
    cfg = config_from_hf(hf_cfg)
    tensors = read_safetensors(directory)
    if cfg.pos_embedding == "learned":
        params = gpt2_params_from_hf(cfg, tensors)
    else:
        if not cfg.tie_embeddings and "lm_head.weight" not in tensors:
            cfg = cfg.replace(tie_embeddings=True)   # some exports drop a tied lm_head
        params = llama_params_from_hf(cfg, tensors)
    return cfg, params


def save_hf(directory: str, config: ModelConfig, params: dict[str, Any], tokenizer: Any = None) -> str:
    """Write config.json + model.safetensors (and tokenizer.json if given) that `transformers` loads.

    Returns the directory. GPT-2-family configs become GPT2LMHeadModel, Llama-family ones
    LlamaForCausalLM.
    """
    from safetensors.numpy import save_file

    hf_cfg = config_to_hf(config)
    tensors = gpt2_params_to_hf(config, params) if hf_cfg["model_type"] == "gpt2" else llama_params_to_hf(config, params)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    hf_tok = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tok is not None:
        hf_tok.save(os.path.join(directory, "tokenizer.json"))
    return directory
