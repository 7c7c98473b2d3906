"""Hugging Face checkpoint directories (config.json + safetensors) ⇄ arlm.

Reading never uses pickle: only `config.json`, `*.safetensors` (and their
index) are read; a directory holding only `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


from arlm.checkpoints.hf_config import config_from_hf, config_to_hf
from arlm.checkpoints.layout import (CheckpointFormatError, gpt2_params_from_hf, gpt2_params_to_hf,
                                     llama_params_from_hf, llama_params_to_hf)
from arlm.checkpoints.paths import checked_file
from arlm.checkpoints.safetensors_io import lazy_safetensors
from arlm.config import ModelConfig


def load_hf_dir(directory: str, *, weights: bool = True) -> tuple[ModelConfig, dict[str, Any] | None, str]:
    """(config, params, model_type) from a local Hugging Face checkpoint directory (params None
    without `weights`: the config alone)."""
    try:
        cfg_path = checked_file(directory, "config.json", what="config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} has no config.json; not a Hugging Face checkpoint directory") from None
    with open(cfg_path, encoding="utf-8") as f:
        try:
            hf_cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointFormatError(f"{cfg_path} is not valid JSON ({err})") from err
    cfg, family = config_from_hf(hf_cfg, cfg_path)
    if not weights:
        return cfg, None, family.model_type
    where = f"{directory} (model_type {family.model_type})"
    with lazy_safetensors(directory) as tensors:    # each tensor read when its leaf is built, then dropped
        if family.layout is None:
            params = gpt2_params_from_hf(cfg, tensors, where)
        else:
            if not cfg.tie_embeddings and "lm_head.weight" not in tensors:
                warnings.warn(f"{cfg_path} says tie_word_embeddings=false but the weights hold no lm_head.weight; "
                              "tying the head to the embedding, as exports that drop a tied head need")
                cfg = cfg.replace(tie_embeddings=True)
            params = llama_params_from_hf(cfg, tensors, layout=family.layout, where=where)
    return cfg, params, family.model_type


def save_hf(directory: str, config: ModelConfig, params: dict[str, Any], tokenizer: Any = None,
            architecture: str | None = None, *, chat_template: str | Mapping[str, str] | None = None,
            special_tokens: Mapping[str, str] | None = None, add_bos_token: bool = False,
            eos_ids: Sequence[int] | None = None) -> str:
    """Write config.json + model.safetensors (and the tokenizer side if given) that `transformers` loads.

    Returns the directory. `architecture` is a Hugging Face model_type ("llama", "mistral",
    "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"); by default the simplest family
    that expresses `config` exactly (`hf_config.infer_family`; Phi-3 only when asked for).

    With a tokenizer, also tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json, and config.json's bos/eos ids (`hf_tokenizer.write_tokenizer_files`):
    `chat_template` (a template, or {name: template}) goes to chat_template.jinja (+
    additional_chat_templates/), `special_tokens` ({"bos_token": ..., "eos_token": ..., ...};
    eos/bos default to the tokenizer's), `eos_ids` every stop id (default: the tokenizer's eos).
    `LoadedModel.save_hf` passes all of these from a loaded model.
    """
    from safetensors.numpy import save_file

    from arlm.checkpoints.hf_tokenizer import config_token_ids, write_tokenizer_files

    hf_cfg, family = config_to_hf(config, architecture)
    hf_cfg.update(config_token_ids(tokenizer, special_tokens, eos_ids))
    tensors = (gpt2_params_to_hf(config, params) if family.layout is None
               else llama_params_to_hf(config, params, family.layout))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(directory, tokenizer, chat_template=chat_template, special_tokens=special_tokens,
                          add_bos_token=add_bos_token, eos_ids=eos_ids, model_max_length=config.max_seq_len)
    return directory
