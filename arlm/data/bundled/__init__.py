"""arlm's small bundled datasets, generated for arlm by `arlm.data.bundled.make` (nothing downloaded):
for tests and examples only; every command takes your own files.

    bundled_path("chat_train")      # …/arlm/data/bundled/chat_train.jsonl
    read_rows("bundled:chat_train") # the same, by name, wherever a data path is taken
"""

from __future__ import annotations

import os

FORMAT_REGEX = r"Ahoy! .+ Arr!"     # what every assistant turn of the chat sets looks like (re.fullmatch)
HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {
    "chat_train": "chat_train.jsonl", "chat_test": "chat_test.jsonl",
    "preferences_train": "preferences_train.jsonl", "preferences_test": "preferences_test.jsonl",
    "text_train": "text_train.txt", "text_test": "text_test.txt",
}
PREFIX = "bundled:"

__all__ = ["BUNDLED", "FORMAT_REGEX", "PREFIX", "bundled_path"]


def bundled_path(name: str) -> str:
    """The file of bundled dataset `name` (one of BUNDLED; a "bundled:" prefix is allowed)."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in BUNDLED:
        raise FileNotFoundError(f"no bundled dataset {name!r}; bundled: {', '.join(PREFIX + k for k in BUNDLED)}")
    return os.path.join(HERE, BUNDLED[key])
