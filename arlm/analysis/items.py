"""Tasks are data: the bundled item sets (JSON Lines under `arlm/analysis/data/`) and the user's own,
read and checked against the fields each study needs."""

from __future__ import annotations

import json
import os
from typing import Any

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# study → the fields each item must carry, and their types.
FIELDS: dict[str, dict[str, type]] = {
    "icl": {"input": str, "output": str},
    "sycophancy": {"question": str, "choices": list, "answer": str},
    "temperature": {"prompt": str, "answer": str},
    "cot_rag": {"facts": list, "question": str, "answer": str},
}


def bundled(name: str) -> str:
    """Path of a bundled item set, e.g. bundled("antonyms") → .../data/antonyms.jsonl."""
    path = os.path.join(DATA_DIR, name if name.endswith(".jsonl") else name + ".jsonl")
    if not os.path.exists(path):
        known = sorted(f[:-6] for f in os.listdir(DATA_DIR) if f.endswith(".jsonl"))
        raise FileNotFoundError(f"no bundled item set {name!r}; bundled: {known}")
    return path


def load_items(path_or_name: str, study: str) -> list[dict[str, Any]]:
    """Items of a JSONL file (or a bundled set's name), each checked for `study`'s fields.

    Raises ValueError naming the file, the line and the field for a malformed item.
    """
    if study not in FIELDS:
        raise ValueError(f"unknown study {study!r}; item formats exist for {sorted(FIELDS)}")
    path = path_or_name if os.path.exists(path_or_name) else bundled(path_or_name)
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{line_no}: an item must be a JSON object, got {type(item).__name__}")
            for field, kind in FIELDS[study].items():
                if not isinstance(item.get(field), kind):
                    raise ValueError(f"{path}:{line_no}: field {field!r} must be a {kind.__name__} for the "
                                     f"{study} study, got {item.get(field)!r}")
            if study == "sycophancy" and (len(item["choices"]) < 2 or item["answer"] not in item["choices"]):
                raise ValueError(f"{path}:{line_no}: 'choices' needs ≥ 2 options and must contain 'answer'")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items
