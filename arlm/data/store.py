"""The token store: a dataset's rows tokenized once, kept as ragged int arrays in memory or
memory-mapped from disk, so that data larger than memory streams.

`build_store(rows, codec, task, cfg)` reads every row once (`arlm.data.rows`), checks it against
the dataset's TRL format (`arlm.data.formats`), tokenizes it (`arlm.data.tokenize`) and appends
it; a row that cannot be used raises a `RowError` naming the file, line and field, or with
`on_error="skip"` is counted by reason in the `DataReport`. Tasks:

  "sequences"   language modelling and prompt–completion rows → fields ids, mask (eqs. 7, 8)
  "preference"  preference rows → fields prompt, chosen, rejected (eqs. 11, 13)
  "prompts"     any row with a prompt → field prompt; the other columns stay in the source, for rewards

With a `directory`, the arrays are written there (`<field>.bin` + `<field>.offsets.npy`), with the
report and a fingerprint of what built them (`store.json`); a later build with the same
fingerprint (a resumed run) reuses them instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from arlm.data.formats import ColumnMap, Format, detect_format, normalize
from arlm.data.rows import RowError, RowSource
from arlm.data.tokenize import (ON_ERROR, DataReport, TextCodec, TokenizeConfig, preference_tokens,
                                prompt_tokens, sequence_tokens)

__all__ = ["TASKS", "TokenStore", "build_store"]

TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # task: (its fields, the format kinds it takes)
    "sequences": (("ids", "mask"), ("language_modeling", "prompt_completion")),
    "preference": (("prompt", "chosen", "rejected"), ("preference",)),
    "prompts": (("prompt",), ("prompt_only", "prompt_completion", "preference")),
}
_DTYPES = {"mask": np.uint8}


class TokenStore:
    """Ragged arrays sharing one example index: example i is {field: array} plus `rows[i]`, the index
    of the source row it came from."""

    def __init__(self, fields: Sequence[str], data: Mapping[str, np.ndarray], offsets: Mapping[str, np.ndarray],
                 rows: np.ndarray, report: DataReport, fmt: Format | None) -> None:
        self.fields = tuple(fields)
        self._data, self._offsets = dict(data), dict(offsets)
        self.rows = rows
        self.report = report
        self.format = fmt

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        return {f: np.asarray(self._data[f][self._offsets[f][i]:self._offsets[f][i + 1]]) for f in self.fields}

    def lengths(self, field: str) -> np.ndarray:
        return np.diff(self._offsets[field])

    def subset(self, indices: np.ndarray) -> "TokenStore":
        """The examples at `indices` (a copy in memory)."""
        parts = [self[int(i)] for i in indices]
        data = {f: np.concatenate([p[f] for p in parts]) if parts else np.zeros(0, _DTYPES.get(f, np.int32))
                for f in self.fields}
        offsets = {f: np.concatenate([[0], np.cumsum([p[f].size for p in parts])]).astype(np.int64)
                   for f in self.fields}
        return TokenStore(self.fields, data, offsets, self.rows[np.asarray(indices, np.int64)], self.report,
                          self.format)


class _Writer:
    def __init__(self, fields: Sequence[str], directory: str | None) -> None:
        self.fields, self.directory = tuple(fields), directory
        self.lengths: dict[str, list[int]] = {f: [] for f in fields}
        self.rows: list[int] = []
        if directory is None:
            self._chunks: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        else:
            os.makedirs(directory, exist_ok=True)
            self._files = {f: open(os.path.join(directory, f"{f}.bin"), "wb") for f in fields}

    def add(self, row: int, arrays: Mapping[str, np.ndarray]) -> None:
        for f in self.fields:
            a = np.ascontiguousarray(arrays[f], _DTYPES.get(f, np.int32))
            self.lengths[f].append(a.size)
            if self.directory is None:
                self._chunks[f].append(a)
            else:
                self._files[f].write(a.tobytes())
        self.rows.append(row)

    def close(self, report: DataReport, fmt: Format | None, fingerprint: str) -> TokenStore:
        offsets = {f: np.concatenate([[0], np.cumsum(self.lengths[f], dtype=np.int64)]).astype(np.int64)
                   for f in self.fields}
        rows = np.asarray(self.rows, np.int64)
        if self.directory is None:
            data = {f: np.concatenate(c) if c else np.zeros(0, _DTYPES.get(f, np.int32))
                    for f, c in self._chunks.items()}
            return TokenStore(self.fields, data, offsets, rows, report, fmt)
        for f, fh in self._files.items():
            fh.close()
            np.save(os.path.join(self.directory, f"{f}.offsets.npy"), offsets[f])
        np.save(os.path.join(self.directory, "rows.npy"), rows)
        meta = {"fingerprint": fingerprint, "fields": list(self.fields), "report": report.to_json(),
                "format": None if fmt is None else [fmt.kind, fmt.conversational, fmt.implicit_prompt]}
        tmp = os.path.join(self.directory, "store.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        os.replace(tmp, os.path.join(self.directory, "store.json"))        # written last: the store is complete
        return _open(self.directory)


def _open(directory: str) -> TokenStore:
    with open(os.path.join(directory, "store.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    fields = meta["fields"]
    data, offsets = {}, {}
    for f in fields:
        offsets[f] = np.load(os.path.join(directory, f"{f}.offsets.npy"))
        path = os.path.join(directory, f"{f}.bin")
        dtype = _DTYPES.get(f, np.int32)
        data[f] = np.memmap(path, dtype, "r") if os.path.getsize(path) else np.zeros(0, dtype)
    fmt = Format(*meta["format"]) if meta["format"] else None
    return TokenStore(fields, data, offsets, np.load(os.path.join(directory, "rows.npy")),
                      DataReport.from_json(meta["report"]), fmt)


def _fingerprint(rows: RowSource, codec: TextCodec, task: str, cfg: TokenizeConfig, columns: ColumnMap,
                 on_error: str) -> str:
    tok = codec.tokenizer
    hf = getattr(tok, "hf_tokenizer", None)
    parts = [task, repr(cfg), repr(columns), on_error, type(tok).__name__, str(tok.vocab_size),
             hashlib.sha256(hf.to_str().encode()).hexdigest() if hf is not None else "",
             codec.template, repr(codec.generation_blocks), repr(codec.add_bos),
             rows.name, str(len(rows))]
    for path in getattr(rows, "paths", None) or [getattr(rows, "path", None)]:
        if path and os.path.exists(path):
            st = os.stat(path)
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def build_store(rows: RowSource, codec: TextCodec, task: str, cfg: TokenizeConfig, *,
                columns: ColumnMap = ColumnMap(), on_error: str = "error", directory: str | None = None,
                progress: Callable[[int], None] | None = None) -> TokenStore:
    """Tokenize every row of `rows` for `task` (see the module docstring) into a `TokenStore`.

    on_error: "error" raises the first `RowError` (naming the file, line or row, and the field);
      "skip" counts each unusable row by reason in `store.report` and goes on.
    The dataset's format is that of its first usable row; every other row must have it too.
    Raises ValueError when no row is usable (an empty dataset), naming why.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    fields, kinds = TASKS[task]
    fingerprint = _fingerprint(rows, codec, task, cfg, columns, on_error)
    if directory is not None and os.path.exists(os.path.join(directory, "store.json")):
        with open(os.path.join(directory, "store.json"), encoding="utf-8") as fh:
            if json.load(fh).get("fingerprint") == fingerprint:
                return _open(directory)
    writer = _Writer(fields, directory)
    report = DataReport()
    fmt: Format | None = None
    for i in range(len(rows)):
        report.rows += 1
        try:
            try:
                row = rows[i]
                if fmt is None:
                    found = detect_format(columns.apply(row))
                    if found.kind not in kinds:
                        raise ValueError(f"{rows.where(i)}: a {found.describe()} dataset cannot be used here; "
                                         f"this job takes {' or '.join(k.replace('_', '-') for k in kinds)} rows")
                ex = normalize(row, fmt or found, columns)
                arrays, truncated = _tokenize(codec, ex, task, cfg)
            except RowError as err:
                raise err.at(rows.where(i)) from None
        except RowError as err:
            if on_error == "error":
                raise
            report.skip(err)
            continue
        fmt = fmt or found
        report.kept += 1
        for piece in arrays:
            writer.add(i, piece)
            report.examples += 1
            report.tokens += int(sum(piece[f].size for f in fields if f != "mask"))
            report.target_tokens += int(piece["mask"].sum()) if "mask" in piece else \
                int(sum(piece[f].size for f in ("chosen", "rejected") if f in piece))
        report.truncated += int(truncated)
        if progress is not None:
            progress(i + 1)
    report.format = None if fmt is None else fmt.describe()
    if report.kept == 0:
        why = "; ".join(f"{n} {reason}" for reason, n in report.skipped.items()) or "it has no rows"
        raise ValueError(f"{rows.name}: no usable row ({why})" +
                         (f"; first: {report.first_errors[0]}" if report.first_errors else ""))
    return writer.close(report, fmt, fingerprint)


def _tokenize(codec: TextCodec, ex: Any, task: str, cfg: TokenizeConfig) -> tuple[list[dict[str, np.ndarray]], bool]:
    """The example's pieces for `task`, and whether the truncation policy changed it."""
    if task == "sequences":
        pieces, truncated = sequence_tokens(codec, ex, cfg)
        return [{"ids": ids, "mask": mask} for ids, mask in pieces], truncated
    if task == "preference":
        (p, c, r), truncated = preference_tokens(codec, ex, cfg)
        return [{"prompt": p, "chosen": c, "rejected": r}], truncated
    prompt = prompt_tokens(codec, ex, cfg)
    return [{"prompt": prompt}], False
