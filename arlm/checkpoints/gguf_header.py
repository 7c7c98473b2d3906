"""Bounds-checked walk over a GGUF header, before `gguf.GGUFReader` is allowed near the file.

`gguf.GGUFReader` trusts every count in the header: a 69-byte file declaring one
metadata array of 2**62 items makes it loop forever while memory grows, and even an
honest-looking array costs it ~0.7 KB of Python objects and ~10 µs per item. This module
reads the header with `struct` from a read-only memory map and checks, before anything
is allocated, that

* the magic is `GGUF` and the version is 2 or 3 (either byte order);
* every count and length fits in the bytes left in the file: n key/value pairs need at
  least 13·n bytes, n tensor infos 24·n, a string of length n needs n bytes, an array of
  n fixed-size items n·size bytes, of n strings 8·n, of n arrays 12·n;
* at most `MAX_KV_PAIRS` key/value pairs and `MAX_TENSORS` tensors (65536 each);
* value types are the 13 GGUF defines, arrays nest at most `MAX_ARRAY_DEPTH` deep and all
  metadata arrays together hold at most `MAX_METADATA_ITEMS` items (what GGUFReader will
  build Python objects for);
* keys and tensor names are UTF-8, at most 65535 bytes, and unique; `general.alignment`,
  if present, is a UINT32 power of two;
* each tensor has 0 ≤ n_dims ≤ `MAX_N_DIMS`, a type listed in `gguf.GGML_QUANT_SIZES`, rows
  that are whole blocks of that type, fewer than 2**63 elements, an aligned offset, and
  data that lies inside the file after the aligned end of the header.

Fixed-size arrays are skipped by arithmetic; string arrays (a tokenizer vocabulary) by
reading only their 8-byte lengths, so the 100 MB SmolLM2 file is checked in a few tens
of milliseconds with memory bounded by the number of tensors.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

from arlm.checkpoints.layout import CheckpointFormatError

SUPPORTED_VERSIONS = (2, 3)
MAX_N_DIMS = 8                       # GGML_MAX_DIMS is 4; leave room, refuse absurd counts
MAX_ARRAY_DEPTH = 8                  # arrays of arrays …; real files use none
MAX_NAME_BYTES = 65535               # the GGUF spec's limit for keys
# Items (strings count twice: GGUFReader keeps a length and a bytes view per string) across
# all metadata arrays. The largest real vocabularies (Gemma's 262k tokens + scores + types,
# Llama 3's 128k tokens + 280k merges) need ~1.05M; GGUFReader spends ~0.7 KB per item, so
# this caps its metadata cost at ~1.5 GB.
MAX_METADATA_ITEMS = 1 << 21
# Real files have tens of keys and at most a few thousand tensors; GGUFReader builds several
# numpy views per key and per tensor, so millions of tiny entries would cost gigabytes.
MAX_KV_PAIRS = 1 << 16
MAX_TENSORS = 1 << 16
DEFAULT_ALIGNMENT = 32

_UINT32, _STRING, _ARRAY = 4, 8, 9
_FIXED = {0: ("B", "UINT8"), 1: ("b", "INT8"), 2: ("H", "UINT16"), 3: ("h", "INT16"), 4: ("I", "UINT32"),
          5: ("i", "INT32"), 6: ("f", "FLOAT32"), 7: ("?", "BOOL"), 10: ("Q", "UINT64"), 11: ("q", "INT64"),
          12: ("d", "FLOAT64")}
_TYPE_NAMES = {**{code: name for code, (_, name) in _FIXED.items()}, _STRING: "STRING", _ARRAY: "ARRAY"}
_MIN_KV_BYTES = 8 + 4 + 1            # empty key, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # empty name, n_dims = 0, type, offset


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry, as validated (data_start, n_bytes are absolute file facts)."""

    name: str
    dims: tuple[int, ...]
    type_name: str
    data_start: int
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """What the validated header says: version, byte order, counts, alignment and tensor placement."""

    version: int
    byte_order: str
    n_kv: int
    alignment: int
    data_offset: int
    file_size: int
    tensors: tuple[TensorInfo, ...]


class _Corrupt(Exception):
    """Internal: a header defect; `validate_gguf_header` turns it into CheckpointFormatError."""


class _Cursor:
    """Position in a mapped file; every read first checks that its bytes exist."""

    def __init__(self, buf, size: int, order: str) -> None:
        self.buf, self.size, self.order, self.pos = buf, size, order, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.left:
            raise _Corrupt(f"{what} needs {n_bytes} bytes but only {self.left} bytes remain")

    def unpack(self, code: str, what: str):
        n = struct.calcsize(self.order + code)
        self.need(n, what)
        value = struct.unpack_from(self.order + code, self.buf, self.pos)[0]
        self.pos += n
        return value

    def text(self, what: str, limit: int | None = None) -> str:
        """A length-prefixed string, decoded as UTF-8 (keys, names, scalar strings); `limit` caps its bytes."""
        n = self.unpack("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise _Corrupt(f"{what} declares {n} bytes, more than GGUF's limit of {limit}")
        self.need(n, f"{what} (a string of {n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Corrupt(f"{what} is not valid UTF-8 ({err.reason} at byte {err.start})") from None


class _Walker:
    """Walks metadata values, counting array items against `MAX_METADATA_ITEMS`."""

    def __init__(self, cur: _Cursor) -> None:
        self.cur, self.items = cur, 0

    def count(self, n: int, key: str) -> None:
        self.items += n
        if self.items > MAX_METADATA_ITEMS:
            raise _Corrupt(f"metadata arrays hold more than {MAX_METADATA_ITEMS} items in total (reached at key "
                           f"{key!r}); arlm refuses headers that large (gguf.GGUFReader builds objects per item)")

    def value(self, vtype: int, key: str):
        """Skip (or, for scalars, return) one top-level value of GGUF type `vtype`."""
        cur = self.cur
        if vtype in _FIXED:
            code, name = _FIXED[vtype]
            return cur.unpack(code, f"metadata key {key!r} ({name})")
        if vtype == _STRING:
            return cur.text(f"the value of metadata key {key!r}")
        if vtype == _ARRAY:
            self.array(key, depth=0)
            return None
        raise _Corrupt(f"metadata key {key!r} has unknown value type {vtype} (GGUF defines 0-12)")

    def array(self, key: str, depth: int) -> None:
        cur = self.cur
        if depth >= MAX_ARRAY_DEPTH:
            raise _Corrupt(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = cur.unpack("I", f"the item type of array {key!r}")
        n = cur.unpack("Q", f"the length of array {key!r}")
        if itype in _FIXED:
            code, name = _FIXED[itype]
            size = struct.calcsize("<" + code)
        elif itype == _STRING:
            name, size = "STRING", 8
        elif itype == _ARRAY:
            name, size = "ARRAY", 12
        else:
            raise _Corrupt(f"metadata key {key!r} declares an array of unknown value type {itype} "
                           "(GGUF defines 0-12)")
        if n * size > cur.left:
            raise _Corrupt(f"metadata key {key!r} declares an array of {n} items of {name} but only "
                           f"{cur.left} bytes remain")
        self.count(n if itype in _FIXED else 2 * n, key)
        if itype in _FIXED:
            cur.pos += n * size
        elif itype == _STRING:
            self.skip_strings(n, key)
        else:
            for _ in range(n):
                self.array(key, depth + 1)

    def skip_strings(self, n: int, key: str) -> None:
        """Skip n length-prefixed strings, reading only their lengths (a vocabulary: ~50k of them)."""
        cur = self.cur
        length_at = struct.Struct(cur.order + "Q").unpack_from
        buf, pos, size = cur.buf, cur.pos, cur.size
        for i in range(n):
            if pos + 8 > size:
                raise _Corrupt(f"string {i} of array {key!r} needs 8 bytes for its length but only "
                               f"{size - pos} bytes remain")
            length = length_at(buf, pos)[0]
            pos += 8
            if length > size - pos:
                raise _Corrupt(f"string {i} of array {key!r} declares {length} bytes but only {size - pos} "
                               "bytes remain")
            pos += length
        cur.pos = pos


def _check_alignment(vtype: int, value) -> int:
    if vtype != _UINT32:
        raise _Corrupt(f"general.alignment has type {_TYPE_NAMES.get(vtype, vtype)}, GGUF requires UINT32")
    if value == 0 or value & (value - 1):
        raise _Corrupt(f"general.alignment is {value}, not a power of two")
    return value


def _read_metadata(cur: _Cursor, n_kv: int) -> int:
    """Walk the key/value pairs; returns the alignment (`general.alignment` or 32)."""
    walker, keys, alignment = _Walker(cur), set(), DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.text(f"a metadata key (pair {i} of {n_kv})", MAX_NAME_BYTES)
        if key in keys:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = cur.unpack("I", f"the value type of metadata key {key!r}")
        value = walker.value(vtype, key)
        if key == "general.alignment":
            alignment = _check_alignment(vtype, value)
    return alignment


def _read_tensor_info(cur: _Cursor, i: int, n_tensors: int) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dims, raw type, relative offset) of one tensor info entry."""
    name = cur.text(f"tensor name {i} of {n_tensors}", MAX_NAME_BYTES)
    n_dims = cur.unpack("I", f"n_dims of tensor {name!r}")
    if n_dims > MAX_N_DIMS:
        raise _Corrupt(f"tensor {name!r} declares {n_dims} dimensions (arlm accepts at most {MAX_N_DIMS})")
    cur.need(8 * n_dims, f"the {n_dims} dims of tensor {name!r}")
    dims = struct.unpack_from(f"{cur.order}{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    raw_type = cur.unpack("I", f"the type of tensor {name!r}")
    offset = cur.unpack("Q", f"the data offset of tensor {name!r}")
    return name, tuple(int(d) for d in dims), raw_type, offset


def _tensor_bytes(name: str, dims: tuple[int, ...], raw_type: int) -> tuple[str, int]:
    """(type name, byte size) of a tensor, from its dims and its type's block layout."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name!r} has unknown GGML type {raw_type}") from None
    n_elements = 1
    for d in dims:
        n_elements *= d
    if n_elements >= 1 << 63:
        raise _Corrupt(f"tensor {name!r} dims {list(dims)} multiply to {n_elements} elements (≥ 2**63)")
    row = dims[0] if dims else 1
    if row % block:
        raise _Corrupt(f"tensor {name!r} rows of {row} elements are not whole {qtype.name} blocks of {block}")
    return qtype.name, n_elements // block * type_size


def _read_tensors(cur: _Cursor, n_tensors: int, alignment: int) -> tuple[int, tuple[TensorInfo, ...]]:
    """Walk the tensor infos; check each tensor's data against the aligned data section."""
    entries, names = [], set()
    for i in range(n_tensors):
        name, dims, raw_type, offset = _read_tensor_info(cur, i, n_tensors)
        if name in names:
            raise _Corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        type_name, n_bytes = _tensor_bytes(name, dims, raw_type)
        entries.append((name, dims, type_name, offset, n_bytes))
    data_offset = -(-cur.pos // alignment) * alignment
    infos = []
    for name, dims, type_name, offset, n_bytes in entries:
        if offset % alignment:
            raise _Corrupt(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_offset + offset
        if start + n_bytes > cur.size:
            raise _Corrupt(f"tensor {name!r} ({type_name}, dims {list(dims)}, {n_bytes} bytes) at file offset "
                           f"{start} ends past the end of the file ({cur.size} bytes)")
        infos.append(TensorInfo(name, dims, type_name, start, n_bytes))
    return data_offset, tuple(infos)


def _walk(buf, size: int, path: str) -> GGUFHeader:
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:          # written on (for) a big-endian machine, as GGUFReader detects it
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointFormatError(f"{path}: GGUF version {version} is not supported (arlm reads versions 2 and 3)")
    cur = _Cursor(buf, size, order)
    cur.pos = 8
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata key/value count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise _Corrupt(f"header declares {n_kv} metadata key/value pairs and {n_tensors} tensors, which need at "
                       f"least {n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES} bytes, but only "
                       f"{cur.left} bytes remain")
    if n_kv > MAX_KV_PAIRS or n_tensors > MAX_TENSORS:
        raise _Corrupt(f"header declares {n_kv} metadata key/value pairs and {n_tensors} tensors; arlm accepts "
                       f"at most {MAX_KV_PAIRS} and {MAX_TENSORS}")
    alignment = _read_metadata(cur, n_kv)
    data_offset, tensors = _read_tensors(cur, n_tensors, alignment)
    return GGUFHeader(version, "little" if order == "<" else "big", n_kv, alignment, data_offset, size, tensors)


def validate_gguf_header(path: str) -> GGUFHeader:
    """Check a GGUF file's header against the file's size without trusting any count in it.

    Opens `path` without blocking (it must be a regular file) and maps it read-only; a count
    read from the file is compared with the bytes left (and the caps above) before anything
    is sized by it. Returns what the header says.

    Raises:
      CheckpointFormatError: not a GGUF file, an unsupported version, or a header that is
        truncated or corrupt, with the file and the offending key/tensor named.
    """
    from arlm.checkpoints.paths import open_regular

    with open_regular(path, what="GGUF file") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointFormatError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
        size = os.fstat(f.fileno()).st_size
        if size < 24:   # (mmap refuses an empty file)
            raise CheckpointFormatError(f"cannot read GGUF file {path}: truncated or corrupt "
                                        f"({size} bytes, shorter than the 24-byte GGUF preamble)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _walk(buf, len(buf), path)
            except _Corrupt as err:
                raise CheckpointFormatError(f"cannot read GGUF file {path}: truncated or corrupt ({err})") from None


__all__ = ["GGUFHeader", "MAX_ARRAY_DEPTH", "MAX_KV_PAIRS", "MAX_METADATA_ITEMS", "MAX_N_DIMS", "MAX_TENSORS",
           "TensorInfo", "validate_gguf_header"]
