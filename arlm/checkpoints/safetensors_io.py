"""Safetensors files and directories → numpy arrays, with the header parsed and checked here.

The format: an 8-byte little-endian header length N, N bytes of JSON (a dict
`name → {"dtype", "shape", "data_offsets": [begin, end]}` plus an optional
`"__metadata__"` dict of strings), then the data area, which the tensors must cover
exactly, in order, without holes or overlaps (the `safetensors` library's own rule).
Every field is checked against the file's size before any tensor is read; a tensor
is then read into a fresh array of the validated size (not memory-mapped: a mapped
checkpoint that is overwritten or truncated later, e.g. by `save_hf` to the same
directory, would change or crash arrays that are still in use).

`lazy_safetensors` checks every header (and the index) up front and then reads each
tensor only when it is asked for, while the files are held open, so a loader keeps one
tensor beside the params it builds; `read_safetensors` and `read_safetensors_file` read
everything at once.

Dtypes (`DTYPES`): BOOL, U8/I8/U16/I16/U32/I32/U64/I64, F16, BF16, F32, F64 and the
8-bit floats F8_E4M3 / F8_E5M2 (PyTorch's float8_e4m3fn / float8_e5m2) and their FNUZ
variants, read through `ml_dtypes`; `np.asarray(x, np.float32)` converts all of them
exactly. Anything else (F8_E8M0, F4, F6_*, C64, unknown names) is refused by name.

Directories: with `model.safetensors.index.json`, its `weight_map` must map each tensor
name to a shard inside the checkpoint (see `arlm.checkpoints.paths`), each shard must
hold exactly the tensors the index assigns to it; without an index every `*.safetensors`
file in the directory is read and a tensor name may appear only once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

import ml_dtypes
import numpy as np

from arlm.checkpoints.layout import CheckpointFormatError, LazyTensor, Tensors
from arlm.checkpoints.paths import checked_file, checkpoint_root, open_regular

MAX_HEADER_BYTES = 100 * 2**20      # real headers are well under 1 MB
MAX_INDEX_BYTES = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz), "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


class _Corrupt(Exception):
    """Internal: a header defect; turned into CheckpointFormatError naming the file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: the safetensors format forbids duplicate keys."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Corrupt(f"header lists {key!r} twice")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against the data area's size."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _Corrupt(f"tensor {name!r} entry must be an object with dtype, shape and data_offsets, got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise _Corrupt(f"tensor {name!r} dtype is {dtype!r:.80}, not a string")
    if dtype not in DTYPES:
        raise CheckpointFormatError(f"tensor {name!r} has dtype {dtype:.40}, which arlm does not load "
                                    f"(arlm loads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _Corrupt(f"tensor {name!r} shape {shape!r:.200} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise _Corrupt(f"tensor {name!r} data_offsets {offsets!r:.200} do not lie inside the "
                       f"{data_size}-byte data area")
    n_elements = 1
    for d in shape:
        n_elements *= d
    n_bytes = n_elements * DTYPES[dtype].itemsize
    if n_bytes != offsets[1] - offsets[0]:
        raise _Corrupt(f"tensor {name!r} ({dtype}, shape {shape}) needs {n_bytes} bytes but data_offsets "
                       f"{offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_coverage(entries: dict[str, tuple[str, tuple[int, ...], int, int]], data_size: int) -> None:
    """Tensors must tile the data area exactly: no overlap, no hole, nothing after the last one."""
    end, last = 0, None
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < end:
            raise _Corrupt(f"tensors {last!r} and {name!r} overlap (bytes {begin}..{end} of the data area)")
        if begin > end:
            raise _Corrupt(f"bytes {end}..{begin} of the data area belong to no tensor")
        end, last = stop, name
    if end != data_size:
        raise _Corrupt(f"the data area has {data_size} bytes but the tensors cover {end}")


def _parse_header(f, file_size: int) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(data area start, {name: (dtype, shape, begin, end)}) from an open safetensors file."""
    if file_size < 8:
        raise _Corrupt(f"{file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise _Corrupt(f"header length {n} exceeds arlm's limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise _Corrupt(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = f.read(n)
    if len(raw) != n:
        raise _Corrupt("the file ended inside the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:   # bad UTF-8/JSON, a 5000-digit int, deep nesting
        raise _Corrupt(f"header is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise _Corrupt(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Corrupt("__metadata__ must be an object of strings")
    data_size = file_size - 8 - n
    entries = {name: _entry(name, info, data_size) for name, info in header.items()}
    _check_coverage(entries, data_size)
    return 8 + n, entries


def _read_tensor(f, dtype: str, shape: tuple[int, ...], start: int, n_bytes: int, name: str) -> np.ndarray:
    """One tensor as a fresh numpy array of `DTYPES[dtype]` and `shape`."""
    buf = np.empty(n_bytes, np.uint8)
    f.seek(start)
    if f.readinto(memoryview(buf)) != n_bytes:
        raise _Corrupt(f"the file ended inside tensor {name!r}")
    if dtype == "BOOL" and n_bytes and buf.max() > 1:
        raise _Corrupt(f"tensor {name!r} (BOOL) holds bytes other than 0 and 1")
    target = DTYPES[dtype]
    if sys.byteorder == "big" and target.itemsize > 1:        # the file is little-endian
        buf = buf.view(f"<u{target.itemsize}").astype(f"=u{target.itemsize}").view(np.uint8)
    return buf.view(target).reshape(shape)


@contextlib.contextmanager
def _errors_name(path: str) -> Iterator[None]:
    """Defects found while reading `path` become CheckpointFormatErrors that name it."""
    try:
        yield
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{path}: {err}") from None
    except _Corrupt as err:
        raise CheckpointFormatError(f"cannot read {path}: truncated or corrupt safetensors ({err})") from None
    except OSError as err:
        raise CheckpointFormatError(f"cannot read {path}: {err}") from err


def _read_named(f: IO[bytes], path: str, dtype: str, shape: tuple[int, ...], start: int, n_bytes: int,
                name: str) -> np.ndarray:
    with _errors_name(path):
        return _read_tensor(f, dtype, shape, start, n_bytes, name)


def _open_file(stack: contextlib.ExitStack, path: str) -> dict[str, LazyTensor]:
    """The tensors of one safetensors file, header checked now, data read on use while `stack` holds it open."""
    f = stack.enter_context(open_regular(path, what="safetensors file"))
    with _errors_name(path):
        data_start, entries = _parse_header(f, os.fstat(f.fileno()).st_size)
    return {name: LazyTensor(shape, functools.partial(_read_named, f, path, dtype, shape, data_start + begin,
                                                      end - begin, name))
            for name, (dtype, shape, begin, end) in entries.items()}


def _read_all(tensors: dict[str, LazyTensor]) -> Tensors:
    return {name: x.read() for name, x in tensors.items()}


def read_safetensors_file(path: str) -> Tensors:
    """All tensors of one safetensors file, header checked first (see the module docstring).

    Raises:
      CheckpointFormatError: not a regular file, a truncated or corrupt header/data area
        ("cannot read PATH: truncated or corrupt safetensors (…)"), or a dtype arlm does
        not load ("tensor X has dtype F8_E8M0, which arlm does not load").
    """
    with contextlib.ExitStack() as stack:
        return _read_all(_open_file(stack, path))


def _read_index(path: str) -> dict[str, str]:
    """The `weight_map` of a safetensors index file, checked: a non-empty object of str → str."""
    with open_regular(path, what="safetensors index") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointFormatError(f"{path} has {size} bytes, more than arlm's limit of {MAX_INDEX_BYTES}")
        raw = f.read()
    try:
        index = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:   # bad UTF-8/JSON, a 5000-digit int, deep nesting
        raise CheckpointFormatError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(index, dict):
        raise CheckpointFormatError(f"{path} holds a JSON {type(index).__name__}, expected an object with 'weight_map'")
    if "weight_map" not in index:
        raise CheckpointFormatError(f"{path} has no 'weight_map' field")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{path} field 'weight_map' must be a non-empty object mapping tensor names "
                                    f"to shard files, got {weight_map!r:.100}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointFormatError(f"{path} field 'weight_map' maps {tensor!r} to {shard!r:.100}, "
                                        "not a shard file name")
    return weight_map


def _listed_file(directory: str, name: str, *, what: str, root: str) -> str:
    """`checked_file` for a name found by listing the directory: a dangling symlink is a format error."""
    try:
        return checked_file(directory, name, what=what, root=root)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{what} {os.path.join(directory, name)} is a dangling symlink") from None


def _open_indexed(stack: contextlib.ExitStack, directory: str, root: str) -> dict[str, LazyTensor]:
    """Tensors of a sharded checkpoint: shards from the index, contents checked against it."""
    index_path = _listed_file(directory, INDEX_NAME, what="safetensors index", root=root)
    weight_map = _read_index(index_path)
    source = f"{index_path} field 'weight_map'"
    tensors: dict[str, LazyTensor] = {}
    for shard in sorted(set(weight_map.values())):
        try:
            path = checked_file(directory, shard, what="safetensors shard", source=source, root=root)
        except FileNotFoundError:
            raise CheckpointFormatError(f"{source} lists {shard}, which is missing from {directory}") from None
        shard_tensors = _open_file(stack, path)
        expected = {t for t, s in weight_map.items() if s == shard}
        missing, extra = sorted(expected - set(shard_tensors)), sorted(set(shard_tensors) - expected)
        if missing:
            raise CheckpointFormatError(f"{source} maps tensor {missing[0]!r} to {shard}, which does not contain it"
                                        + (f" ({len(missing)} such tensors)" if len(missing) > 1 else ""))
        if extra:
            raise CheckpointFormatError(f"{path} holds tensor {extra[0]!r}, which {source} does not map to it"
                                        + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))
        tensors.update(shard_tensors)
    return tensors


def _open_directory(stack: contextlib.ExitStack, directory: str) -> dict[str, LazyTensor]:
    """Every tensor of a checkpoint directory (checks as in `read_safetensors`), read on use."""
    root = checkpoint_root(directory)
    if os.path.lexists(os.path.join(directory, INDEX_NAME)):
        return _open_indexed(stack, directory, root)
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        pickled = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
        hint = " (arlm never unpickles .bin/.pt files; convert them to safetensors)" if pickled else ""
        raise CheckpointFormatError(f"no .safetensors file in {directory}{hint}")
    tensors: dict[str, LazyTensor] = {}
    owner: dict[str, str] = {}
    for name in files:
        for tensor, x in _open_file(stack, _listed_file(directory, name, what="safetensors file",
                                                        root=root)).items():
            if tensor in owner:
                raise CheckpointFormatError(f"tensor {tensor!r} appears in both {owner[tensor]} and {name} "
                                            f"in {directory} (and there is no {INDEX_NAME} to choose)")
            owner[tensor], tensors[tensor] = name, x
    return tensors


@contextlib.contextmanager
def lazy_safetensors(directory: str) -> Iterator[dict[str, LazyTensor]]:
    """A directory's tensors (checks as in `read_safetensors`, all headers first), each read on use.

    The files stay open until the `with` block ends; each `LazyTensor.read()` returns a fresh
    array, so a loader that drops what it has copied holds one tensor at a time.
    """
    with contextlib.ExitStack() as stack:
        yield _open_directory(stack, directory)


def read_safetensors(directory: str) -> Tensors:
    """All tensors of a directory's safetensors files (sharded or not), as numpy arrays.

    Only regular files inside the checkpoint are read (`arlm.checkpoints.paths`; a Hugging
    Face cache snapshot may point into its repository's blobs). Pickled weights
    (`.bin`, `.pt`) are never opened.
    """
    with lazy_safetensors(directory) as tensors:
        return _read_all(tensors)


__all__ = ["DTYPES", "MAX_HEADER_BYTES", "lazy_safetensors", "read_safetensors", "read_safetensors_file"]
