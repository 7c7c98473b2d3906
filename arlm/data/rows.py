"""Reading a researcher's rows: JSONL, JSON, Parquet, plain text, `datasets.save_to_disk` folders,
globs and lists of files with mixture weights, and any Python sequence of dicts.

Every reader is a `RowSource`: a random-access sequence of dict rows (`len`, `source[i]`) that
says where row i came from (`where(i)`: "data.jsonl line 12"), so an error names the file and the
line. Nothing is loaded whole unless the format forces it (a JSON array):

  * JSONL and text-per-line files are indexed once (the byte offset of every line, 8 bytes a
    line) and each row is read from disk when asked for;
  * Parquet is read one row group at a time (the last one read is kept);
  * a `save_to_disk` folder's Arrow files are memory-mapped (`pyarrow.ipc`), as `datasets` does;
  * a Python sequence (a list, a `datasets.Dataset`) is indexed as it is.

So a dataset larger than memory streams through the tokenizer (`arlm.data.tokenize`) into an
on-disk token store; grain shuffles and batches from there (`arlm.data.loader`).

    rows = read_rows("chat.jsonl")                       # or "data/*.parquet", ["a.jsonl", "b.json"]
    rows = read_rows("a.jsonl@0.7,b.jsonl@0.3")          # a mixture: 70 % / 30 % of the rows
    rows = read_rows(my_list_of_dicts)                   # or a datasets.Dataset, as it is
    rows = read_rows("bundled:chat_train")               # arlm's bundled examples (arlm.data.bundled)
    rows[0], rows.where(0)
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RowError", "RowSource", "JsonlSource", "JsonArraySource", "ParquetSource", "TextSource",
           "ArrowDirSource", "SequenceSource", "MixtureSource", "read_rows", "parse_spec"]

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class RowError(ValueError):
    """A row that cannot be used, naming where it is (file and line, or row index) and the field.

    `reason` is a short key ("not_json", "missing_field", "unknown_role", "empty_completion",
    "not_utf8", "too_long", …) under which `--config.data.on_error=skip` counts skipped rows.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None,
                 reason: str = "invalid") -> None:
        self.where, self.field, self.reason, self.detail = where, field, reason, message
        super().__init__(self._text())

    def _text(self) -> str:
        parts = [p for p in (self.where, f"field {self.field!r}" if self.field else None) if p]
        return f"{', '.join(parts)}: {self.detail}" if parts else self.detail

    def at(self, where: str) -> "RowError":
        """The same error (same class), located at `where` if it was not located yet."""
        if self.where:
            return self
        located = copy.copy(self)
        located.where = where
        located.args = (located._text(),)
        return located


class RowSource(Sequence):
    """A random-access sequence of dict rows that can say where each row came from."""

    name: str = "<rows>"

    def where(self, index: int) -> str:
        return f"{self.name} row {index}"

    def _check(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"row {index} out of range for {self.name} ({n} rows)")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rows={len(self)})"


def _line_offsets(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of every line that is not blank, `chunk` bytes at a time."""
    starts, ends, numbers = [], [], []
    base, line_start, line_no, blank = 0, 0, 1, True
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            arr = np.frombuffer(buf, np.uint8)
            # running count of non-space bytes: a line is blank iff the count does not change over it
            nonspace = np.concatenate([[0], np.cumsum(~np.isin(arr, (9, 10, 11, 12, 13, 32)))])
            prev = 0
            for nl in np.flatnonzero(arr == 10):
                if nonspace[nl] > nonspace[prev]:
                    blank = False
                if not blank:
                    starts.append(line_start)
                    ends.append(base + int(nl))
                    numbers.append(line_no)
                line_start, blank, prev, line_no = base + int(nl) + 1, True, int(nl) + 1, line_no + 1
            if nonspace[arr.size] > nonspace[prev]:
                blank = False
            base += arr.size
    if not blank:
        starts.append(line_start)
        ends.append(base)
        numbers.append(line_no)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(numbers, np.int64)


class _LineFile(RowSource):
    """Rows that are the non-blank lines of a file, read on demand through a byte-offset index."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        self._starts, self._ends, self._numbers = _line_offsets(path)

    def __len__(self) -> int:
        return int(self._starts.size)

    def where(self, index: int) -> str:
        return f"{self.path} line {int(self._numbers[index])}"

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"text": self._text(index)}

    def _text(self, index: int) -> str:
        index = self._check(index)
        with open(self.path, "rb") as f:
            f.seek(int(self._starts[index]))
            raw = f.read(int(self._ends[index] - self._starts[index]))
        try:
            return raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise RowError(f"not valid UTF-8 (byte {err.start} of the line: {raw[err.start:err.start + 4]!r})",
                           where=self.where(index), reason="not_utf8") from None


class JsonlSource(_LineFile):
    """One JSON object per line (blank lines are not rows)."""

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        text = self._text(index)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise RowError(f"not JSON ({err.msg} at column {err.colno})", where=self.where(index),
                           reason="not_json") from None
        if not isinstance(row, dict):
            raise RowError(f"a row must be a JSON object, got {type(row).__name__}", where=self.where(index),
                           reason="not_object")
        return row


class TextSource(RowSource):
    """Plain text as {"text": …} rows: one document per file (`per="file"`) or per non-blank line."""

    def __init__(self, paths: Sequence[str], per: str = "file") -> None:
        if per not in ("file", "line"):
            raise ValueError(f"text rows are one per 'file' or per 'line', got {per!r}")
        self.per = per
        self.paths = list(paths)
        self.name = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} text files"
        if per == "line":
            self._lines = [_LineFile(p) for p in self.paths]
            self._cum = np.cumsum([0] + [len(x) for x in self._lines])

    def __len__(self) -> int:
        return len(self.paths) if self.per == "file" else int(self._cum[-1])

    def _locate(self, index: int) -> tuple[_LineFile, int]:
        index = self._check(index)
        f = int(np.searchsorted(self._cum, index, side="right") - 1)
        return self._lines[f], index - int(self._cum[f])

    def where(self, index: int) -> str:
        if self.per == "file":
            return self.paths[self._check(index)]
        source, i = self._locate(index)
        return source.where(i)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if self.per == "line":
            source, i = self._locate(index)
            return {"text": source._text(i)}
        path = self.paths[self._check(index)]
        with open(path, "rb") as f:
            raw = f.read()
        try:
            return {"text": raw.decode("utf-8")}
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise RowError(f"not valid UTF-8 (line {line}: {raw[err.start:err.start + 4]!r})", where=path,
                           reason="not_utf8") from None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:              # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading Parquet or Arrow files needs pyarrow: pip install pyarrow") from err
    return pyarrow


class _Tables(RowSource):
    """Rows from consecutive Arrow record blocks (Parquet row groups, Arrow files), one block in memory."""

    def __init__(self, name: str, sizes: Sequence[int]) -> None:
        self.name = name
        self._cum = np.cumsum([0] + [int(s) for s in sizes])
        self._cached: tuple[int, list[dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _block(self, b: int) -> Any:                  # a pyarrow Table or RecordBatch
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = self._check(index)
        b = int(np.searchsorted(self._cum, index, side="right") - 1)
        if self._cached is None or self._cached[0] != b:
            self._cached = (b, self._block(b).to_pylist())
        return self._cached[1][index - int(self._cum[b])]


class ParquetSource(_Tables):
    def __init__(self, path: str) -> None:
        pa = _pyarrow()
        try:
            self._file = pa.parquet.ParquetFile(path)
        except pa.lib.ArrowInvalid as err:
            raise RowError(f"not a Parquet file ({err})", where=path, reason="not_parquet") from None
        meta = self._file.metadata
        super().__init__(path, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])

    def _block(self, b: int) -> Any:
        return self._file.read_row_group(b)


class ArrowDirSource(_Tables):
    """A folder written by `datasets.Dataset.save_to_disk` (state.json + Arrow stream files), read
    without `datasets`: each file is memory-mapped."""

    def __init__(self, directory: str) -> None:
        pa = _pyarrow()
        state_path = os.path.join(directory, "state.json")
        if not os.path.exists(state_path):
            splits = os.path.join(directory, "dataset_dict.json")
            if os.path.exists(splits):
                with open(splits, encoding="utf-8") as f:
                    names = json.load(f).get("splits", [])
                raise ValueError(f"{directory} holds a DatasetDict with splits {names}; "
                                 f"name one: {os.path.join(directory, names[0] if names else 'train')}")
            raise ValueError(f"{directory} is not a datasets.save_to_disk folder (no state.json)")
        with open(state_path, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
        self._tables = []
        for name in files:
            source = pa.memory_map(os.path.join(directory, name), "r")
            self._tables.append(pa.ipc.open_stream(source).read_all())
        super().__init__(directory, [t.num_rows for t in self._tables])

    def _block(self, b: int) -> Any:
        return self._tables[b]


class SequenceSource(RowSource):
    """Any Python sequence of dicts (a list, a `datasets.Dataset`, …), indexed as it is."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], name: str = "rows") -> None:
        self._rows = rows
        self.name = name

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = self._check(index)
        row = self._rows[index]
        if not isinstance(row, Mapping):
            raise RowError(f"a row must be a dict, got {type(row).__name__}", where=self.where(index),
                           reason="not_object")
        return dict(row)


class JsonArraySource(SequenceSource):
    """A JSON file holding one array of objects (read whole: JSON arrays cannot be streamed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as err:
            raise RowError(f"not valid UTF-8 at byte {err.start}", where=path, reason="not_utf8") from None
        except json.JSONDecodeError as err:
            raise RowError(f"not JSON ({err.msg} at line {err.lineno}, column {err.colno})", where=path,
                           reason="not_json") from None
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()) \
                and len({len(v) for v in data.values()}) == 1:          # columns: {"text": [...], ...}
            keys = list(data)
            data = [dict(zip(keys, values)) for values in zip(*data.values())]
        if not isinstance(data, list):
            raise RowError("a .json file must hold an array of objects (or one object per line: JSONL)", where=path,
                           reason="not_json")
        super().__init__(data, name=path)

    def where(self, index: int) -> str:
        return f"{self.path} item {index}"


class MixtureSource(RowSource):
    """Several sources mixed by weight: source k contributes round(N · w_k / Σw) rows, N = Σ_k len_k.

    A source asked for more rows than it has is repeated (its rows cycled); one asked for fewer
    gives a fixed pseudo-random subset (seed 0), so the mixture is a pure function of the inputs.
    Shuffling is the loader's job; here the parts are concatenated.
    """

    def __init__(self, sources: Sequence[RowSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        total = sum(len(s) for s in sources)
        counts = [int(round(total * w / sum(weights))) for w in weights]
        for s, c in zip(sources, counts):
            if c and not len(s):
                raise ValueError(f"{s.name} is empty but has mixture weight > 0")
        self._maps = []
        for k, (s, c) in enumerate(zip(sources, counts)):
            if c <= len(s):
                self._maps.append(np.sort(np.random.default_rng([0, k]).permutation(len(s))[:c]))
            else:
                self._maps.append(np.arange(c) % len(s))
        self._cum = np.cumsum([0] + counts)
        self.name = " + ".join(f"{s.name}@{w:g}" for s, w in zip(sources, weights))

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _locate(self, index: int) -> tuple[RowSource, int]:
        index = self._check(index)
        k = int(np.searchsorted(self._cum, index, side="right") - 1)
        return self.sources[k], int(self._maps[k][index - int(self._cum[k])])

    def where(self, index: int) -> str:
        source, i = self._locate(index)
        return source.where(i)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        source, i = self._locate(index)
        return source[i]


def _expand(path: str) -> list[str]:
    from arlm.data.bundled import PREFIX, bundled_path

    if path.startswith(PREFIX):
        return [bundled_path(path)]
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path, recursive=True))
        if not found:
            raise FileNotFoundError(f"no file matches {path!r}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file or folder: {path!r}")
    return [path]


def _one_json_document(path: str) -> bool:
    """Whether a .json file is one document (an array, or {column: [values]}) rather than JSON Lines."""
    with open(path, "rb") as f:
        first = f.readline()
        rest = f.read(1 << 16).strip()
    if first.lstrip().startswith(b"["):
        return True
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True                      # a document spread over several lines
    return not rest and isinstance(obj, dict) and bool(obj) and all(isinstance(v, list) for v in obj.values())


def _open_file(path: str, text_per: str) -> RowSource:
    if os.path.isdir(path):
        return ArrowDirSource(path)
    lower = path.lower()
    if lower.endswith(".parquet"):
        return ParquetSource(path)
    if lower.endswith(JSONL_SUFFIXES):
        return JsonlSource(path)
    if lower.endswith(".json"):
        return JsonArraySource(path) if _one_json_document(path) else JsonlSource(path)  # datasets' to_json: lines
    if lower.endswith(TEXT_SUFFIXES):
        return TextSource([path], text_per)
    raise ValueError(f"cannot tell the format of {path!r} from its name: use .jsonl, .json, .parquet, .txt "
                     "(or a datasets.save_to_disk folder)")


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """"a.jsonl@0.7,b/*.parquet@0.3" → [("a.jsonl", 0.7), ("b/*.parquet", 0.3)]; no "@w": weight None."""
    parts = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, sep, weight = item.rpartition("@")
        if sep and path:
            try:
                parts.append((path, float(weight)))
                continue
            except ValueError:
                pass
        parts.append((item, None))
    if not parts:
        raise ValueError("empty data specification")
    return parts


def read_rows(data: Any, *, weights: Sequence[float] | None = None, text_per: str = "file") -> RowSource:
    """The rows of `data`: a path, a glob, "a@w1,b@w2", a list of paths (with `weights`), a
    {path: weight} dict, a `RowSource`, or any sequence of dicts (a `datasets.Dataset` as it is).

    text_per: plain-text files give one {"text"} row per "file" (default) or per non-blank "line".
    Several files without weights are concatenated; with weights they are mixed (`MixtureSource`).
    """
    if isinstance(data, RowSource):
        return data
    if isinstance(data, Mapping):
        if data and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in data.items()):
            return read_rows(list(data), weights=list(data.values()), text_per=text_per)
        raise TypeError("a dict of data must map paths to mixture weights")
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        parts = parse_spec(data)
        if len(parts) > 1 or parts[0][1] is not None:
            if weights is not None:
                raise ValueError("give mixture weights either in the specification or as weights=, not both")
            paths = [p for p, _ in parts]
            ws = [1.0 if w is None else w for _, w in parts]
            return read_rows(paths, weights=ws, text_per=text_per) if len(paths) > 1 else \
                read_rows(paths[0], text_per=text_per)
        files = _expand(parts[0][0])
        if len(files) == 1:
            return _open_file(files[0], text_per)
        return read_rows(files, text_per=text_per)
    if isinstance(data, Sequence) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        paths = [os.fspath(p) for p in data]
        if weights is not None:
            if len(weights) != len(paths):
                raise ValueError(f"{len(paths)} data files but {len(weights)} weights")
            return MixtureSource([read_rows(p, text_per=text_per) for p in paths], weights)
        files = [f for p in paths for f in _expand(p)]
        if all(f.lower().endswith(TEXT_SUFFIXES) for f in files) and text_per == "file":
            return TextSource(files, "file")
        sources = [_open_file(f, text_per) for f in files]
        return sources[0] if len(sources) == 1 else MixtureSource(sources, [len(s) or 1 for s in sources])
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        if weights is not None:
            raise ValueError("weights= mixes several files; a sequence of rows is one source")
        return SequenceSource(data, name="rows" if isinstance(data, (list, tuple)) else type(data).__name__)
    raise TypeError(f"cannot read rows from {type(data).__name__}: give a path, a glob, a list of paths, "
                    "or a sequence of dicts")
