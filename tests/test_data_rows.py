"""Reading rows (`arlm.data.rows`): every file format to the same rows, errors that name the file and the
line, globs and mixtures, streaming by offset index, and the grain stream over them (deterministic
shuffles, exact resume, disjoint process shards)."""

from __future__ import annotations

import json
import os

import grain

import numpy as np
import pytest

from arlm.data import pipeline
from arlm.data.rows import JsonlSource, MixtureSource, RowError, TextSource, parse_spec, read_rows

ROWS = [{"prompt": "Wie spät ist es?", "completion": " Zeit für Tee ☕", "id": 0},
        {"prompt": "2+2=", "completion": "4", "id": 1},
        {"prompt": "", "completion": "unconditional 🐙", "id": 2}]


def _jsonl(path, rows, *, blank_lines=False):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n" + ("\n  \n" if blank_lines else ""))
    return str(path)


def test_every_format_reads_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = _jsonl(tmp_path / "a.jsonl", ROWS, blank_lines=True)
    (tmp_path / "a.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}), encoding="utf-8")
    lines_json = _jsonl(tmp_path / "lines.json", ROWS)            # datasets' to_json writes JSON Lines
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)   # two row groups
    for source in (jsonl, tmp_path / "a.json", tmp_path / "cols.json", lines_json, tmp_path / "a.parquet", ROWS):
        rows = read_rows(source)
        assert len(rows) == 3 and [rows[i] for i in range(3)] == ROWS, source
    assert read_rows(jsonl).where(1) == f"{jsonl} line 4"          # blank lines are no rows, but count as lines


def test_datasets_objects_and_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    assert [read_rows(ds)[i] for i in range(3)] == ROWS               # a Dataset passes as it is
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(str(tmp_path / "saved"))                         # read with pyarrow alone
    assert [rows[i] for i in range(3)] == ROWS
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="DatasetDict with splits .'train'.*dict/train"):
        read_rows(str(tmp_path / "dict"))
    assert len(read_rows(str(tmp_path / "dict" / "train"))) == 3


def test_text_files_one_document_per_file_or_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond ünïcode line\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("third", encoding="utf-8")
    per_file = read_rows(str(tmp_path / "*.txt"))
    assert isinstance(per_file, TextSource) and len(per_file) == 2
    assert per_file[0] == {"text": "first line\n\nsecond ünïcode line\n"}
    per_line = read_rows([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], text_per="line")
    assert [per_line[i]["text"] for i in range(len(per_line))] == ["first line", "second ünïcode line", "third"]
    assert per_line.where(1).endswith("a.txt line 3")


def test_bad_lines_name_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": oops}\n[1, 2]\n{"text": "caf\xe9"}\n')
    rows = read_rows(str(path))
    assert rows[0] == {"text": "ok"}
    for i, reason, line in ((1, "not_json", 2), (2, "not_object", 3), (3, "not_utf8", 4)):
        with pytest.raises(RowError, match=f"bad.jsonl line {line}") as err:
            rows[i]
        assert err.value.reason == reason
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(RowError, match=r"bad.txt: not valid UTF-8 \(line 2"):
        read_rows(str(tmp_path / "bad.txt"))[0]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_rows(str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_rows(str(tmp_path / "data.csv"))


def test_jsonl_is_indexed_not_loaded(tmp_path):
    """Rows are read from disk on demand: the index holds offsets only, and a row changed on disk after
    indexing (same length) is read as it is now."""
    path = _jsonl(tmp_path / "big.jsonl", [{"text": f"row {i:05d}"} for i in range(5000)])
    rows = JsonlSource(path)
    assert len(rows) == 5000 and rows._starts.nbytes == 8 * 5000
    with open(path, "r+b") as f:
        f.seek(int(rows._starts[1234]))
        f.write(b'{"text": "ROW 01234"}')
    assert rows[1234] == {"text": "ROW 01234"} and rows[4999] == {"text": "row 04999"}


def test_mixture_weights_and_specs(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    assert parse_spec(f"{a}@0.75,{b}@0.25") == [(a, 0.75), (b, 0.25)]
    mix = read_rows(f"{a}@0.75,{b}@0.25")
    assert isinstance(mix, MixtureSource) and len(mix) == 14
    texts = [mix[i]["text"] for i in range(len(mix))]
    n_a = sum(t.startswith("a") for t in texts)
    assert n_a == round(14 * 0.75) == 10 and len(set(t for t in texts if t.startswith("a"))) == 10
    assert sorted(t for t in texts if t.startswith("b")) == sorted(["b0", "b1", "b2", "b3"])   # 4 = 14·0.25 rounded
    up = read_rows([a, b], weights=[1.0, 3.0])                         # b upsampled: its rows cycle
    texts = [up[i]["text"] for i in range(len(up))]
    assert sum(t.startswith("b") for t in texts) == round(14 * 0.75) and texts.count("b0") == 3
    assert read_rows({a: 1.0, b: 1.0}).where(13).startswith(b)
    with pytest.raises(ValueError, match="positive"):
        read_rows([a, b], weights=[1.0, 0.0])
    both = read_rows([a, b])                                           # a list without weights: concatenated
    assert [both[i]["text"] for i in range(len(both))] == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(4)]


def test_bundled_sets_are_reproducible_and_addressable(tmp_path):
    from arlm.data.bundled import BUNDLED, bundled_path
    from arlm.data.bundled.make import generate

    for path in generate(str(tmp_path)):
        name = os.path.basename(path)
        assert open(path, "rb").read() == open(bundled_path(name.rsplit(".", 1)[0]), "rb").read(), name
    assert len(BUNDLED) == 6 and len(read_rows("bundled:chat_test")) == 48
    with pytest.raises(FileNotFoundError, match="bundled: bundled:chat_train"):
        read_rows("bundled:nope")


def test_stream_is_seeded_resumable_and_sharded_over_processes():
    rows = [{"x": np.asarray([i])} for i in range(37)]
    ds = pipeline.shuffled_batches(grain.MapDataset.source(rows), 4, seed=3)
    it = pipeline.iterate(ds)
    first = [next(it)["x"].ravel().tolist() for _ in range(20)]          # crosses two epochs (9 batches each)
    epoch0 = sum(first[:9], [])
    assert len(set(epoch0)) == 36 and first[:9] != first[9:18]         # a fresh shuffle per epoch
    again = pipeline.iterate(pipeline.shuffled_batches(grain.MapDataset.source(rows), 4, seed=3))
    assert [next(again)["x"].ravel().tolist() for _ in range(20)] == first
    it = pipeline.iterate(ds)
    for _ in range(7):
        next(it)
    state = pipeline.iterator_state_to_json(it)
    json.dumps(state)
    resumed = pipeline.restore_iterator(pipeline.iterate(ds), state)
    assert [next(resumed)["x"].ravel().tolist() for _ in range(13)] == first[7:]
    shards = [pipeline.iterate(pipeline.shuffled_batches(grain.MapDataset.source(rows), 4, seed=3,
                                                         process_index=p, process_count=2)) for p in range(2)]
    for b in range(9):
        parts = [next(s)["x"].ravel().tolist() for s in shards]
        assert not set(parts[0]) & set(parts[1]) and parts[0] + parts[1] == first[b]
