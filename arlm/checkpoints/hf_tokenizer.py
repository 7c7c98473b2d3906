"""The tokenizer side of a Hugging Face checkpoint directory, read and written as `transformers` does.

Reading (`load_tokenizer_side`) follows `transformers`' `AutoTokenizer.from_pretrained` for a
directory with a ``tokenizer.json``:

* ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``,
  ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token`` and any other
  ``*_token`` string, each a string or an AddedToken object ``{"content": ...}``),
  ``additional_special_tokens`` / ``extra_special_tokens``, ``added_tokens_decoder``,
  ``add_bos_token`` and ``chat_template`` (a string, or a list of ``{"name", "template"}``);
* ``special_tokens_map.json`` overrides those tokens when the config has no
  ``added_tokens_decoder`` (transformers' legacy path);
* ``chat_template.jinja`` (the default template) and ``additional_chat_templates/*.jinja``
  (named ones), which take priority over ``tokenizer_config.json``'s ``chat_template``;
* special tokens that ``tokenizer.json`` lacks as added tokens are added as special tokens
  (so that they are matched whole in text, as in transformers);
* ``generation_config.json``'s ``eos_token_id`` (an int or a list: every one is a stop id), or
  ``config.json``'s when there is no generation config.

Malformed files raise `CheckpointFormatError` naming the file and the field.

Writing (`write_tokenizer_files`) produces what current transformers writes and reads back:
``tokenizer.json``, ``tokenizer_config.json`` (``tokenizer_class`` "PreTrainedTokenizerFast",
the special tokens, ``add_bos_token``, ``model_max_length``), ``special_tokens_map.json``,
``chat_template.jinja`` (+ ``additional_chat_templates/<name>.jinja`` for named templates) and
``generation_config.json``; `config_token_ids` gives the ids for ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from arlm.checkpoints.layout import CheckpointFormatError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILE = "config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens, passed to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The largest JSON / template file read (tokenizer.json itself is read by `tokenizers`).
MAX_TEXT_FILE_BYTES = 64 << 20

_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclasses.dataclass(frozen=True)
class TokenizerSide:
    """Everything a checkpoint says about tokens besides the weights.

    Attributes:
      tokenizer: the `BPETokenizer` (None when the directory has no tokenizer.json).
      chat_template: the default chat template (None if there is none).
      chat_templates: named templates ({"default": ..., "tool_use": ...}) when there are several.
      special_tokens: the named special tokens as strings ({"bos_token": "<s>", ...}); chat
        templates see them as variables.
      add_bos_token: whether plain encodes start with BOS.
      eos_ids: every id the checkpoint declares as end of sequence (generation config).
    """

    tokenizer: Any
    chat_template: str | None = None
    chat_templates: Mapping[str, str] = dataclasses.field(default_factory=dict)
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    add_bos_token: bool = False
    eos_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, chat_template: str | None) -> "TokenizerSide":
        """The side of a checkpoint whose tokenizer carries its own metadata (e.g. a GGUF tokenizer)."""
        return cls(tokenizer, chat_template, {},
                   dict(getattr(tokenizer, "special_tokens", None) or {}),
                   bool(getattr(tokenizer, "add_bos_token", False)),
                   tuple(getattr(tokenizer, "eos_ids", ()) or ()))


# --------------------------------------------------------------------------- reading files

def _inside(directory: str, name: str) -> str:
    """directory/name, refused (same message whether a target exists) if it resolves outside the checkpoint."""
    from arlm.checkpoints.paths import contained_path

    return contained_path(directory, name, source=f"the checkpoint {directory}")


def _read_text(path: str) -> str | None:
    """A UTF-8 text file's contents (universal newlines, as transformers reads), or None if absent."""
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path} is not a regular file")
    size = os.path.getsize(path)
    if size > MAX_TEXT_FILE_BYTES:
        raise CheckpointFormatError(f"{path} is {size:,} bytes, more than the {MAX_TEXT_FILE_BYTES:,} arlm reads")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise CheckpointFormatError(f"{path} is not UTF-8 text ({err})") from err


def read_json_object(path: str) -> dict[str, Any] | None:
    """A JSON file holding one object, or None if absent; CheckpointFormatError if it is malformed."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} "
                                    f"column {err.colno}") from err
    except RecursionError as err:
        raise CheckpointFormatError(f"{path} is nested too deeply to read") from err
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _bad(path: str, field: str, expected: str, value: Any) -> CheckpointFormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointFormatError(f"{path}: field {field!r} must be {expected}, got {shown}")


def _token(value: Any, path: str, field: str) -> Any:
    """A special-token field: None, a string, or an AddedToken object (→ `tokenizers.AddedToken`)."""
    from tokenizers import AddedToken

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if k in value}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise _bad(path, f"{field}.{k}", "true or false", v)
        return AddedToken(value["content"], **flags)
    raise _bad(path, field, "a token string or an AddedToken object with a string 'content'", value)


def _token_list(value: Any, path: str, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(path, field, "a list of tokens", value)
    return [_token(v, path, f"{field}[{i}]") for i, v in enumerate(value)]


def _ids(value: Any, path: str, field: str) -> tuple[int, ...]:
    """A token-id field: None, an int, or a list of ints (all non-negative)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _bad(path, field, "a token id or a list of token ids (non-negative integers)", value)
    return tuple(values)


# --------------------------------------------------------------------------- special tokens

@dataclasses.dataclass
class _SpecialTokens:
    named: dict[str, Any]            # bos_token … and model-specific *_token → str or AddedToken
    extra: list[Any]                 # additional / extra special tokens (not template variables)
    decoder: list[Any]               # added_tokens_decoder entries, in id order


def _special_tokens(tok_cfg: dict[str, Any], tok_cfg_path: str, stm: dict[str, Any] | None,
                    stm_path: str) -> _SpecialTokens:
    """The special tokens transformers ends up with, from tokenizer_config.json and special_tokens_map.json."""
    named: dict[str, Any] = {}
    for key, value in tok_cfg.items():
        if key in SPECIAL_TOKEN_NAMES:
            named[key] = _token(value, tok_cfg_path, key)
        elif key.endswith("_token") and isinstance(value, str):   # model-specific, e.g. image_token
            named[key] = value
    extra_raw = tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens")
    if isinstance(extra_raw, Mapping):                          # named extra tokens are model-specific
        for key, value in extra_raw.items():
            named[str(key)] = _token(value, tok_cfg_path, f"extra_special_tokens.{key}")
        extra = []
    else:
        field = "extra_special_tokens" if tok_cfg.get("extra_special_tokens") else "additional_special_tokens"
        extra = _token_list(extra_raw, tok_cfg_path, field)
    decoder = []
    raw_decoder = tok_cfg.get("added_tokens_decoder")
    if raw_decoder is not None:
        if not isinstance(raw_decoder, Mapping):
            raise _bad(tok_cfg_path, "added_tokens_decoder", "an object {id: AddedToken}", raw_decoder)
        for key, value in raw_decoder.items():
            if not str(key).isdigit():
                raise _bad(tok_cfg_path, f"added_tokens_decoder.{key}", "keyed by a token id", key)
            decoder.append((int(key), _token(value, tok_cfg_path, f"added_tokens_decoder.{key}")))
        decoder = [t for _, t in sorted(decoder, key=lambda kv: kv[0])]
    elif stm is not None:                                       # legacy: special_tokens_map.json overrides
        for key, value in stm.items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                for tok in _token_list(value, stm_path, key):
                    if str(tok) not in {str(t) for t in extra}:
                        extra.append(tok)
            elif key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, str)):
                tok = _token(value, stm_path, key)
                named[key] = _as_special(tok) if not isinstance(tok, str) else tok
    return _SpecialTokens(named, extra, decoder)


def _as_special(tok: Any) -> Any:
    from tokenizers import AddedToken

    return AddedToken(tok.content, single_word=tok.single_word, lstrip=tok.lstrip, rstrip=tok.rstrip,
                      normalized=tok.normalized, special=True)


def _add_missing_tokens(hf_tok: Any, specials: _SpecialTokens) -> None:
    """Add the special tokens tokenizer.json lacks as added tokens (transformers does, at load time)."""
    from tokenizers import AddedToken

    present = {t.content for t in hf_tok.get_added_tokens_decoder().values()}
    to_add: list[Any] = []
    for tok in specials.decoder:
        if tok.content not in present:
            to_add.append(tok)
            present.add(tok.content)
    named_contents = {str(t) for t in specials.named.values() if t is not None}
    for tok in [*specials.named.values(), *specials.extra]:
        if tok is None or str(tok) in present:
            continue
        if isinstance(tok, str):
            tok = AddedToken(tok, special=True)
        elif not tok.special and tok.content in named_contents:
            tok = _as_special(tok)
        to_add.append(tok)
        present.add(tok.content)
    if to_add:
        hf_tok.add_tokens(to_add)


# --------------------------------------------------------------------------- chat templates

def read_chat_templates(directory: str, tok_cfg: Mapping[str, Any],
                        tok_cfg_path: str) -> tuple[str | None, dict[str, str]]:
    """(default template, named templates) as transformers resolves them; template files win over the config."""
    templates: dict[str, str] = {}
    default = _read_text(_inside(directory, CHAT_TEMPLATE_FILE))
    if default is not None:
        templates["default"] = default
    extra_dir = _inside(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                templates[name[: -len(".jinja")]] = _read_text(_inside(directory, f"{CHAT_TEMPLATE_DIR}/{name}"))
    if not templates:
        value = tok_cfg.get("chat_template")
        if value is None or isinstance(value, str):
            return value, {}
        if isinstance(value, Mapping):
            entries = [{"name": k, "template": v} for k, v in value.items()]
        elif isinstance(value, list):
            entries = value
        else:
            raise _bad(tok_cfg_path, "chat_template", "a string or a list of {name, template} objects", value)
        for i, entry in enumerate(entries):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise _bad(tok_cfg_path, f"chat_template[{i}]", "an object with string 'name' and 'template'",
                           entry)
            templates[entry["name"]] = entry["template"]
    if list(templates) == ["default"]:
        return templates["default"], {}
    return templates.get("default"), templates


# --------------------------------------------------------------------------- the whole side

def _eos_ids(directory: str) -> tuple[tuple[int, ...], str, str]:
    """(eos ids, file, field) from generation_config.json, else config.json."""
    gen_path = _inside(directory, GENERATION_CONFIG_FILE)
    gen = read_json_object(gen_path)
    if gen is not None:
        for field in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
            _ids(gen.get(field), gen_path, field)
        if gen.get("eos_token_id") is not None:
            return _ids(gen["eos_token_id"], gen_path, "eos_token_id"), gen_path, "eos_token_id"
    cfg_path = _inside(directory, CONFIG_FILE)
    cfg = read_json_object(cfg_path) or {}
    return _ids(cfg.get("eos_token_id"), cfg_path, "eos_token_id"), cfg_path, "eos_token_id"


def _read_tokenizer_json(path: str) -> Any:
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path} is not a regular file")
    try:
        return Tokenizer.from_file(path)
    except Exception as err:     # tokenizers raises a bare Exception for malformed JSON / unknown models
        raise CheckpointFormatError(f"{path} is not a tokenizer file `tokenizers` can read ({err})") from err


def _infers_bos(hf_tok: Any, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS in front of a plain encode."""
    if bos_id is None or hf_tok.post_processor is None:
        return False
    return hf_tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]


def load_tokenizer_side(directory: str) -> TokenizerSide:
    """Tokenizer, chat templates, special tokens and stop ids of a Hugging Face checkpoint directory."""
    from arlm.data.tokenizers import BPETokenizer

    tok_cfg_path = _inside(directory, TOKENIZER_CONFIG_FILE)
    stm_path = _inside(directory, SPECIAL_TOKENS_MAP_FILE)
    tok_cfg = read_json_object(tok_cfg_path) or {}
    specials = _special_tokens(tok_cfg, tok_cfg_path, read_json_object(stm_path), stm_path)
    template, templates = read_chat_templates(directory, tok_cfg, tok_cfg_path)
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise _bad(tok_cfg_path, "add_bos_token", "true or false", add_bos)
    eos_ids, ids_path, ids_field = _eos_ids(directory)
    special_strings = {k: str(v) for k, v in specials.named.items() if v is not None}

    tok_path = _inside(directory, TOKENIZER_FILE)
    if not os.path.lexists(tok_path):
        return TokenizerSide(None, template, templates, special_strings, bool(add_bos), eos_ids)
    hf_tok = _read_tokenizer_json(tok_path)
    _add_missing_tokens(hf_tok, specials)
    vocab = hf_tok.get_vocab_size(with_added_tokens=True)
    outside = [i for i in eos_ids if i >= vocab]
    if outside:
        raise CheckpointFormatError(f"{ids_path}: {ids_field} {outside[0]} is outside the tokenizer's "
                                    f"vocabulary (size {vocab})")
    eos = special_strings.get("eos_token")
    if eos is None and eos_ids:
        eos = hf_tok.id_to_token(eos_ids[0])
    if eos is None and hf_tok.token_to_id("<|endoftext|>") is not None:
        eos = "<|endoftext|>"
    if eos is None:
        raise CheckpointFormatError(f"{directory}: no end-of-sequence token ({TOKENIZER_CONFIG_FILE} has no "
                                    f"eos_token and neither {GENERATION_CONFIG_FILE} nor {CONFIG_FILE} has "
                                    "eos_token_id)")
    bos = special_strings.get("bos_token")
    tokenizer = BPETokenizer.from_tokenizer(hf_tok, eos_token=eos, bos_token=bos, parse_special_tokens=True)
    if add_bos is None:
        add_bos = _infers_bos(hf_tok, tokenizer.bos_id)
    return TokenizerSide(tokenizer, template, templates, special_strings, add_bos, eos_ids)


# --------------------------------------------------------------------------- writing

def _resolved_special_tokens(tokenizer: Any, special_tokens: Mapping[str, str] | None) -> dict[str, str]:
    """The special tokens to write: those given, plus eos (and bos) from the tokenizer when missing."""
    out: dict[str, str] = {}
    for key, value in (special_tokens or {}).items():
        if not (isinstance(key, str) and key.endswith("_token")) or not isinstance(value, str):
            raise ValueError(f"special_tokens must map names ending in '_token' to strings, got {key!r}: {value!r}")
        out[key] = value
    if "eos_token" not in out:
        out["eos_token"] = tokenizer.id_to_token(tokenizer.eos_id)
    if "bos_token" not in out and getattr(tokenizer, "bos_id", None) is not None:
        out["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    hf_tok = tokenizer.hf_tokenizer
    for key, value in out.items():
        if hf_tok.token_to_id(value) is None:
            raise ValueError(f"special token {key}={value!r} is not in the tokenizer's vocabulary")
    return out


def _resolved_eos_ids(tokenizer: Any, eos_ids: Sequence[int] | None) -> list[int]:
    ids = [int(tokenizer.eos_id)] if not eos_ids else [int(i) for i in eos_ids]
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"eos id {bad[0]} is outside the tokenizer's vocabulary (size {tokenizer.vocab_size})")
    return list(dict.fromkeys(ids))


def config_token_ids(tokenizer: Any, special_tokens: Mapping[str, str] | None = None,
                     eos_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` (an int, or a list for several) and ``pad_token_id`` for config.json."""
    if tokenizer is None or getattr(tokenizer, "eos_id", None) is None:
        return {}
    if getattr(tokenizer, "hf_tokenizer", None) is not None:
        special_tokens = _resolved_special_tokens(tokenizer, special_tokens)   # refuses unknown tokens early
    ids = _resolved_eos_ids(tokenizer, eos_ids)
    out: dict[str, Any] = {}
    bos = _special_id(tokenizer, special_tokens, "bos_token")
    if bos is None:
        bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        out["bos_token_id"] = int(bos)
    out["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    pad = _special_id(tokenizer, special_tokens, "pad_token")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


def _special_id(tokenizer: Any, special_tokens: Mapping[str, str] | None, name: str) -> int | None:
    token = (special_tokens or {}).get(name)
    hf_tok = getattr(tokenizer, "hf_tokenizer", None)
    if token is None or hf_tok is None:
        return None
    return hf_tok.token_to_id(token)


def _write_json(path: str, data: Mapping[str, Any]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def _checked_templates(chat_template: str | Mapping[str, str] | None) -> dict[str, str]:
    """{name: template} with safe file names; TypeError / ValueError otherwise."""
    if chat_template is None:
        return {}
    if isinstance(chat_template, str):
        return {"default": chat_template}
    if not isinstance(chat_template, Mapping):
        raise TypeError(f"chat_template must be a string or a {{name: template}} mapping, "
                        f"got {type(chat_template).__name__}")
    for name, text in chat_template.items():
        if not isinstance(name, str) or not _TEMPLATE_NAME.match(name):
            raise ValueError(f"invalid chat template name {name!r} (letters, digits, '_', '.', '-')")
        if not isinstance(text, str):
            raise TypeError(f"chat template {name!r} must be a string, got {type(text).__name__}")
    return dict(chat_template)


def write_chat_templates(directory: str, chat_template: str | Mapping[str, str] | None) -> list[str]:
    """chat_template.jinja (the default) and additional_chat_templates/<name>.jinja, as transformers saves."""
    written = []
    for name, text in _checked_templates(chat_template).items():
        if name == "default":
            path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        else:
            os.makedirs(os.path.join(directory, CHAT_TEMPLATE_DIR), exist_ok=True)
            path = os.path.join(directory, CHAT_TEMPLATE_DIR, name + ".jinja")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def _remove_stale_templates(directory: str, keep: Mapping[str, str]) -> None:
    """Delete template files from an earlier save that this one does not write (they would win on reload)."""
    stale = [] if "default" in keep else [os.path.join(directory, CHAT_TEMPLATE_FILE)]
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        stale += [os.path.join(extra_dir, n) for n in os.listdir(extra_dir)
                  if n.endswith(".jinja") and n[: -len(".jinja")] not in keep]
    for path in stale:
        if os.path.isfile(path):
            os.remove(path)


def _tokenizer_json_copy(hf_tok: Any, add_bos_token: bool, bos: str | None) -> Any:
    """A copy of the tokenizer; with add_bos_token and no post-processor, one that prepends BOS (as HF builds)."""
    from tokenizers import Tokenizer, processors

    copy = Tokenizer.from_str(hf_tok.to_str())
    if add_bos_token and bos is not None and copy.post_processor is None:
        copy.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, copy.token_to_id(bos))])
    return copy


def write_tokenizer_files(directory: str, tokenizer: Any, *, chat_template: str | Mapping[str, str] | None = None,
                          special_tokens: Mapping[str, str] | None = None, add_bos_token: bool = False,
                          eos_ids: Sequence[int] | None = None, model_max_length: int | None = None) -> list[str]:
    """Write the tokenizer side of a Hugging Face directory; returns the paths written.

    Args:
      tokenizer: a `BPETokenizer` (anything with `hf_tokenizer`); another tokenizer (e.g. the
        byte-level one) has no Hugging Face form, so only the generation config and templates
        are written for it.
      chat_template: the template, or named templates {"default": ..., "tool_use": ...}.
      special_tokens: {"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...};
        eos (and bos) default to the tokenizer's.
      add_bos_token: whether plain encodes start with BOS.
      eos_ids: every end-of-sequence id (default: the tokenizer's eos id); several are written
        as a list in generation_config.json.
      model_max_length: the context length, for tokenizer_config.json.
    """
    _checked_templates(chat_template)                  # everything is checked before anything is written
    hf_tok = getattr(tokenizer, "hf_tokenizer", None)
    specials = _resolved_special_tokens(tokenizer, special_tokens) if hf_tok is not None else {}
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        _resolved_eos_ids(tokenizer, eos_ids)
    os.makedirs(directory, exist_ok=True)
    if tokenizer is not None or chat_template is not None:
        _remove_stale_templates(directory, _checked_templates(chat_template))
    written = write_chat_templates(directory, chat_template)
    if tokenizer is None:
        return written
    gen: dict[str, Any] = {}
    if hf_tok is not None:
        copy = _tokenizer_json_copy(hf_tok, add_bos_token, specials.get("bos_token"))
        path = os.path.join(directory, TOKENIZER_FILE)
        copy.save(path, pretty=True)
        written.append(path)
        tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                                   "add_bos_token": bool(add_bos_token), "add_eos_token": False,
                                   "clean_up_tokenization_spaces": False}
        if model_max_length is not None:
            tok_cfg["model_max_length"] = int(model_max_length)
        written.append(_write_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), tok_cfg))
        written.append(_write_json(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE), specials))
        gen.update(config_token_ids(tokenizer, specials, eos_ids))
    elif getattr(tokenizer, "eos_id", None) is not None:
        gen.update(config_token_ids(tokenizer, None, eos_ids))
    if gen:
        written.append(_write_json(os.path.join(directory, GENERATION_CONFIG_FILE), gen))
    return written


__all__ = ["CHAT_TEMPLATE_DIR", "CHAT_TEMPLATE_FILE", "SPECIAL_TOKEN_NAMES", "TokenizerSide", "config_token_ids",
           "load_tokenizer_side", "read_chat_templates", "read_json_object", "write_chat_templates",
           "write_tokenizer_files"]
