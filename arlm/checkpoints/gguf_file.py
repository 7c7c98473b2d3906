"""GGUF files (llama.cpp's format) → arlm config, params, tokenizer and chat template.

Tensors are de-quantised with the `gguf` package. llama.cpp's converter
permutes the rows of Q and K so that RoPE rotates interleaved pairs
(x_0, x_1), (x_2, x_3), …; arlm (like Hugging Face) rotates half-split pairs
(x_i, x_{i+K/2}), so the permutation is undone here and the model is the same.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from arlm.checkpoints.layout import CheckpointFormatError, Tensors, llama_params_from_hf
from arlm.config import ModelConfig

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def open_gguf(path: str):
    """A `gguf.GGUFReader`, with a clear error for missing, truncated or non-GGUF files."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointFormatError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on damage
        raise CheckpointFormatError(f"cannot read GGUF file {path}: truncated or corrupt ({err})") from err


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def required_field(reader, key: str) -> Any:
    value = field(reader, key)
    if value is None:
        raise CheckpointFormatError(f"GGUF file lacks required metadata key {key!r}")
    return value


def config_from_gguf(reader) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointFormatError(f"unsupported GGUF architecture {arch!r}; arlm loads 'llama'")
    if field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointFormatError(f"unsupported RoPE scaling {field(reader, 'llama.rope.scaling.type')!r}")
    heads = int(required_field(reader, "llama.attention.head_count"))
    d = int(required_field(reader, "llama.embedding_length"))
    vocab = field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(required_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    return ModelConfig.llama(
        vocab_size=int(vocab), d_model=d, n_layers=int(required_field(reader, "llama.block_count")),
        n_heads=heads, n_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        d_ff=int(required_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(required_field(reader, "llama.context_length")),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in [out, in] (PyTorch) layout."""
    from gguf.quants import dequantize as gguf_dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise CheckpointFormatError(
            f"tensor {tensor.name} has unsupported type {kind}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    shape = tuple(int(s) for s in reversed(tensor.shape))   # GGUF lists dims fastest-first
    try:
        data = gguf_dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(data, np.float32).reshape(shape)
    except Exception as err:
        raise CheckpointFormatError(f"cannot de-quantise tensor {tensor.name} ({kind}): {err}") from err


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved-pair RoPE rows → half-split rows."""
    out, inp = w_OxI.shape
    return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_tensors_as_hf(reader, cfg: ModelConfig) -> Tensors:
    """All tensors under Hugging Face Llama names, de-quantised and un-permuted."""
    out: Tensors = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = dequantize(tensor)
        elif name == "output_norm.weight":
            out["model.norm.weight"] = dequantize(tensor)
        elif name == "output.weight":
            out["lm_head.weight"] = dequantize(tensor)
        elif name.startswith("blk."):
            _, layer, kind, suffix = name.split(".", 3)
            if kind not in _LAYER_NAMES:
                if kind in ("rope_freqs",):
                    raise CheckpointFormatError(f"unsupported tensor {name} (custom RoPE frequencies)")
                continue
            w = dequantize(tensor)
            if kind == "attn_q":
                w = unpermute_rope_rows(w, cfg.n_heads)
            elif kind == "attn_k":
                w = unpermute_rope_rows(w, cfg.n_kv_heads)
            out[f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"] = w
    return out


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, Any], Any, str | None]:
    """(config, params, tokenizer, chat_template) from a Llama-architecture GGUF file."""
    from arlm.checkpoints.gguf_tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    params = llama_params_from_hf(cfg, gguf_tensors_as_hf(reader, cfg))
    tokenizer = tokenizer_from_gguf(reader)
    return cfg, params, tokenizer, field(reader, "tokenizer.chat_template")
