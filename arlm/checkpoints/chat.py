"""Chat templates: render messages with a checkpoint's own Jinja template, as `transformers` does, but bounded.

Rendering matches `tokenizer.apply_chat_template(..., tokenize=False)` of Hugging Face
`transformers`: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension and a pass-through ``{% generation %}`` tag), the same globals
(``raise_exception``, ``strftime_now``, a restricted ``dict`` and ``namespace``), the same
``tojson`` filter (``json.dumps`` with ``ensure_ascii=False`` and optional ``indent`` /
``separators`` / ``sort_keys``), the same variables (``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's named special tokens and any extra keyword
arguments) and the same clean-up of the inputs (message objects become plain dicts, keys whose
value is None are dropped, anything that is not plain JSON-like data becomes a ``"<TypeName>"``
placeholder, reasoning fields are aliased).

Rendering is bounded (`arlm.checkpoints.template_sandbox`): a template that loops for ever,
recurses without end or builds a huge string raises `ChatTemplateLimitError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from arlm.checkpoints.template_sandbox import (DEFAULT_LIMITS, ChatTemplateError, ChatTemplateLimitError,
                                              RenderLimits, render_template)

# ChatML, used when a checkpoint carries no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Names a message's reasoning may be passed under; the first is the one templates read (as transformers).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --------------------------------------------------------------------------- inputs (as transformers)

def _plain(value: Any) -> Any:
    """Template data rebuilt from plain JSON-like types; anything else becomes a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if _is_numpy_scalar(value):          # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _is_numpy_scalar(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.generic)


def _message_dict(message: Any) -> dict:
    """One message as a dict (dataclasses and pydantic models converted), keys whose value is None dropped."""
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    elif not isinstance(message, Mapping) and callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"chat messages must be dicts (or dataclasses / pydantic models), got {message!r}")
    return {k: v for k, v in message.items() if v is not None}


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """The messages as the template sees them (what transformers does to a conversation before rendering)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    return [_alias_reasoning(_plain(_message_dict(m))) for m in messages]


def _plain_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"each tool must be a JSON-schema dict (arlm does not convert functions), "
                                    f"got {tool!r}")
    return _plain(list(tools))


def _plain_documents(documents: Any) -> list | None:
    if documents is None:
        return None
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence) \
            or not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
    return _plain(list(documents))


# --------------------------------------------------------------------------- selecting and rendering

def select_chat_template(templates: str | Mapping[str, str] | None, chat_template: str | None = None,
                         tools: Any = None) -> str:
    """The template text to render, chosen as `transformers`' `get_chat_template` does.

    Args:
      templates: the checkpoint's template (a string), its named templates ({"default": …,
        "tool_use": …}), or None (then ChatML).
      chat_template: a template name from `templates`, or a whole template to use instead.
      tools: with tools and no name given, a "tool_use" template is preferred over "default".
    """
    if isinstance(templates, Mapping) and templates:
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError("this checkpoint has several chat templates and none is called 'default'; "
                                f"pass chat_template= one of {sorted(templates)}")
    if chat_template is not None:
        return chat_template
    if templates is not None and not isinstance(templates, (str, Mapping)):
        raise ChatTemplateError(f"a chat template must be a string, got {type(templates).__name__}")
    return templates or DEFAULT_CHAT_TEMPLATE


def apply_chat_template(template: str | Mapping[str, str] | None, messages: Sequence[Any], *,
                        add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                        documents: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                        special_tokens: Mapping[str, str] | None = None, limits: RenderLimits | None = None,
                        generation_spans: bool = False, **kwargs: Any) -> str | tuple[str, list[tuple[int, int]]]:
    """The prompt text for `messages`, exactly as `tokenizer.apply_chat_template(..., tokenize=False)`.

    Args:
      template: the checkpoint's template, its named templates, or None (ChatML).
      messages: [{"role": ..., "content": ...}, …]; content may also be a list of content
        blocks, and other keys (tool_calls, reasoning_content, …) are passed through.
      add_generation_prompt: end with the header of an assistant turn (arlm's default: True).
      tools, documents: JSON-schema tool dicts and {"title", "text"} documents for the template.
      chat_template: a template name (see `select_chat_template`) or a template to use instead.
      special_tokens: the tokenizer's named special tokens ({"bos_token": ..., "eos_token": ...}),
        passed to the template as variables, as transformers does.
      limits: `RenderLimits` (default `DEFAULT_LIMITS`).
      generation_spans: also return the character spans of the template's ``{% generation %}``
        blocks, (text, [(start, end), …]), from which transformers builds its assistant-token mask
        (`return_assistant_tokens_mask=True`; see `arlm.data.tokenize`).
      **kwargs: further template variables (e.g. enable_thinking=False, date_string=...).

    Raises:
      ChatTemplateError: bad input, a template error or `raise_exception` in the template;
        `ChatTemplateLimitError` when rendering exceeds `limits`.
    """
    source = select_chat_template(template, chat_template, tools)
    variables: dict[str, Any] = {**(special_tokens or {}), **_plain(kwargs)}
    try:
        variables.update(messages=normalize_messages(messages), tools=_plain_tools(tools),
                         documents=_plain_documents(documents), add_generation_prompt=add_generation_prompt)
    except RecursionError as err:
        raise ChatTemplateError("chat messages / tools are nested too deeply") from err
    return render_template(source, variables, limits, generation_spans=generation_spans)


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(template: str | Mapping[str, str] | None, chat_template: str | None = None) -> bool:
    """Whether the template that `apply_chat_template` would render marks assistant output with
    ``{% generation %}`` blocks."""
    return bool(_GENERATION_TAG.search(select_chat_template(template, chat_template)))


__all__ = ["ChatTemplateError", "ChatTemplateLimitError", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_LIMITS", "RenderLimits",
           "apply_chat_template", "has_generation_blocks", "normalize_messages", "render_template", "select_chat_template"]
