"""The row formats of TRL's documentation, so that a file that works with TRL works with arlm.

    type \\ format      standard                                  conversational
    language modelling {"text": …}                               {"messages": [{"role", "content"}, …]}
    prompt–completion  {"prompt": …, "completion": …}            prompt and completion as message lists
    preference         {"prompt": …, "chosen": …, "rejected": …}  the same three as message lists
                       implicit prompt: {"chosen", "rejected"}, whose shared prefix is the prompt
    prompt-only        {"prompt": …, <other columns>}            prompt as a message list

`detect_format(row)` names a row's type and format from its columns; `normalize(row, fmt)` checks
one row against it and returns an `Example` (other columns kept in `columns`, for rewards).
`ColumnMap` renames a dataset's own columns to these (`--config.data.columns.prompt=question`).
Problems are `RowError`s naming the field: a missing field, an empty completion, a message
without a role or with a role no chat template knows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from arlm.data.rows import RowError

__all__ = ["KINDS", "KNOWN_ROLES", "ColumnMap", "Format", "Example", "detect_format", "normalize",
           "extract_prompt"]

KINDS = ("language_modeling", "prompt_completion", "preference", "prompt_only")

# The roles chat templates are written for; anything else is a typo or a format arlm cannot vouch for.
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})

CANONICAL = ("text", "messages", "prompt", "completion", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """A dataset's column names for arlm's canonical ones, e.g. ColumnMap(prompt="question",
    completion="answer"); unset fields keep their canonical names."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | None) -> "ColumnMap":
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(CANONICAL))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown} to map; arlm's columns are {list(CANONICAL)}")
        return cls(**{k: str(v) for k, v in mapping.items() if v})

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row under canonical names (mapped columns renamed, the rest kept)."""
        renames = {getattr(self, c): c for c in CANONICAL if getattr(self, c) != c}
        if not renames:
            return dict(row)
        return {renames.get(k, k): v for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class Format:
    """A dataset's type (one of KINDS) and whether its fields are message lists."""

    kind: str
    conversational: bool
    implicit_prompt: bool = False

    def describe(self) -> str:
        name = self.kind.replace("_", "-") + (" (implicit prompt)" if self.implicit_prompt else "")
        return f"{'conversational' if self.conversational else 'standard'} {name}"


@dataclasses.dataclass(frozen=True)
class Example:
    """One row in canonical form. Standard fields are strings, conversational ones message lists.

    language_modeling: `text` or `messages`; prompt_completion: `prompt`, `completion`; preference:
    `prompt` (extracted for implicit-prompt rows), `chosen`, `rejected`; prompt_only: `prompt`.
    `columns`: every other column of the row, as it was.
    """

    format: Format
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: Any = None
    completion: Any = None
    chosen: Any = None
    rejected: Any = None
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def detect_format(row: Mapping[str, Any]) -> Format:
    """The TRL type and format a (canonically named) row has, from its columns."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return Format("preference", _is_messages(row["chosen"]), implicit_prompt="prompt" not in keys)
    if "messages" in keys:
        return Format("language_modeling", True)
    if {"prompt", "completion"} <= keys:
        return Format("prompt_completion", _is_messages(row["prompt"]) or _is_messages(row["completion"]))
    if "text" in keys:
        return Format("language_modeling", False)
    if "prompt" in keys:
        return Format("prompt_only", _is_messages(row["prompt"]))
    raise RowError(f"no TRL format has the columns {sorted(keys)}: expected text, messages, "
                   "prompt + completion, (prompt +) chosen + rejected, or prompt (map yours with "
                   "--config.data.columns.<field>=<your column>)", reason="unknown_format")


def _string(row: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise RowError("missing", field=field, reason="missing_field")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(f"must be a string in a standard-format row, got {type(value).__name__}", field=field,
                       reason="wrong_type")
    if not allow_empty and not value.strip():
        reason = "empty_completion" if field in ("completion", "chosen", "rejected") else "empty_field"
        raise RowError("is empty", field=field, reason=reason)
    return value


def _messages(row: Mapping[str, Any], field: str, *, need_assistant: bool = False) -> list[dict[str, Any]]:
    if field not in row or row[field] is None:
        raise RowError("missing", field=field, reason="missing_field")
    value = row[field]
    if not isinstance(value, list) or not value:
        raise RowError("must be a non-empty list of {'role', 'content'} messages", field=field, reason="wrong_type")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise RowError(f"must be a message dict, got {type(m).__name__}", field=where, reason="wrong_type")
        if "role" not in m:
            raise RowError("has no 'role'", field=where, reason="missing_field")
        if m["role"] not in KNOWN_ROLES:
            raise RowError(f"role {m['role']!r} is not one chat templates know ({sorted(KNOWN_ROLES)})",
                           field=f"{where}.role", reason="unknown_role")
        if "content" not in m and not m.get("tool_calls"):
            raise RowError("has no 'content'", field=where, reason="missing_field")
        if m["role"] == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip() \
                and not m.get("tool_calls"):
            raise RowError("is an empty assistant message", field=f"{where}.content", reason="empty_completion")
        out.append(dict(m))
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowError("has no assistant message to learn from", field=field, reason="no_assistant_turn")
    return out


def _response(row: Mapping[str, Any], field: str, conversational: bool) -> Any:
    if conversational:
        msgs = _messages(row, field)
        if msgs[0]["role"] != "assistant":
            raise RowError(f"must start with an assistant message, got role {msgs[0]['role']!r}", field=field,
                           reason="wrong_role")
        return msgs
    return _string(row, field)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """An implicit-prompt preference pair → (prompt, chosen, rejected): the prompt is the longest
    shared prefix. For strings it ends before the whitespace that starts the first differing word
    ("The sky is blue." / "… green." → "The sky is", " blue.", " green."); for message lists it
    is the shared leading messages, and both completions must start with an assistant turn."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RowError("chosen and rejected share no leading message to use as the prompt", field="chosen",
                           reason="no_shared_prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n < min(len(chosen), len(rejected)) or len(chosen) != len(rejected):
        while n > 0 and not chosen[n - 1].isspace():      # back to the start of the differing word
            n -= 1
        while n > 0 and chosen[n - 1].isspace():          # its leading whitespace goes with the completions
            n -= 1
    if n == 0:
        raise RowError("chosen and rejected share no prefix to use as the prompt", field="chosen",
                       reason="no_shared_prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def normalize(row: Mapping[str, Any], fmt: Format, columns: ColumnMap = ColumnMap()) -> Example:
    """Check one row against the dataset's format and return it in canonical form (RowError if not)."""
    row = columns.apply(row)
    conv = fmt.conversational
    used: set[str]
    if fmt.kind == "language_modeling":
        if conv:
            ex = Example(fmt, messages=_messages(row, "messages"))
            used = {"messages"}
        else:
            ex = Example(fmt, text=_string(row, "text"))
            used = {"text"}
    elif fmt.kind == "prompt_completion":
        prompt = _messages(row, "prompt") if conv else _string(row, "prompt", allow_empty=True)
        ex = Example(fmt, prompt=prompt, completion=_response(row, "completion", conv))
        used = {"prompt", "completion"}
    elif fmt.kind == "preference":
        if fmt.implicit_prompt:
            chosen = _messages(row, "chosen") if conv else _string(row, "chosen")
            rejected = _messages(row, "rejected") if conv else _string(row, "rejected")
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
            if conv:
                chosen = _response({"chosen": chosen}, "chosen", True) if chosen else chosen
                rejected = _response({"rejected": rejected}, "rejected", True) if rejected else rejected
            if not chosen or not rejected:
                raise RowError("one response is a prefix of the other, so one of them is empty",
                               field="chosen" if not chosen else "rejected", reason="empty_completion")
        else:
            prompt = _messages(row, "prompt") if conv else _string(row, "prompt", allow_empty=True)
            chosen, rejected = _response(row, "chosen", conv), _response(row, "rejected", conv)
        if chosen == rejected:
            raise RowError("chosen and rejected are identical", field="rejected", reason="identical_pair")
        ex = Example(fmt, prompt=prompt, chosen=chosen, rejected=rejected)
        used = {"prompt", "chosen", "rejected"}
    elif fmt.kind == "prompt_only":
        ex = Example(fmt, prompt=_messages(row, "prompt") if conv else _string(row, "prompt"))
        used = {"prompt"}
    else:
        raise ValueError(f"unknown format kind {fmt.kind!r}; expected one of {KINDS}")
    return dataclasses.replace(ex, columns={k: v for k, v in row.items() if k not in used})
