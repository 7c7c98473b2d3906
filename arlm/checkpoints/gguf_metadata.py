"""Reading one GGUF metadata value from a `gguf.GGUFReader`: shared by the model and tokenizer readers."""

from __future__ import annotations

from typing import Any

from arlm.checkpoints.layout import CheckpointFormatError


def field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (a Python scalar, string or list), or `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def required_field(reader: Any, key: str) -> Any:
    """The value of metadata `key`; CheckpointFormatError naming it when the file lacks it."""
    value = field(reader, key)
    if value is None:
        raise CheckpointFormatError(f"GGUF file lacks the required field {key!r}")
    return value
