"""Tests for arlm.data: corpus, tokenizers and the grain input pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from arlm.data import corpus as corpus_lib
from arlm.data import pipeline
from arlm.data import tokenizers as tok_lib

ROUND_TRIP_STRINGS = [
    "",
    "a",
    "In the beginning God created the heaven and the earth.",
    "héllo wörld — naïve café",
    "日本語のテキスト, 中文, 한국어",
    "emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nblank lines",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "special-looking <|endoftext|> text",
    "x" * 300,
    "numbers 1234567890 and punct !@#$%^&*()[]{};:'\",.<>/?`~",
    "\x00\x01 control chars \x7f",
]


@pytest.fixture(scope="module")
def small_text() -> str:
    return corpus_lib.load_corpus("kjv")[:200_000]


@pytest.fixture(scope="module")
def bpe512(small_text: str) -> tok_lib.BPETokenizer:
    return tok_lib.train_bpe(small_text, 512)


# ----------------------------------------------------------------- corpus


def test_load_corpus():
    text = corpus_lib.load_corpus()
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert 4_000_000 < len(text.encode("utf-8")) < 4_300_000
    assert "\n\n" in text  # chapter separators
    assert corpus_lib.load_corpus("kjv") is text  # cached
    assert "kjv" in corpus_lib.CORPUS_SOURCE


def test_load_corpus_unknown():
    with pytest.raises(ValueError, match="Unknown corpus"):
        corpus_lib.load_corpus("nope")


# ----------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("s", ROUND_TRIP_STRINGS)
def test_byte_round_trip(s: str):
    tok = tok_lib.ByteTokenizer()
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8"))  # independent reference
    assert tok.decode(ids) == s
    assert all(0 <= i < 256 for i in ids)


def test_byte_tokenizer_specials():
    tok = tok_lib.ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.bos_id is None
    assert tok.decode([104, 105, 256]) == "hi"  # EOS decodes to nothing
    assert tok.decode([0xFF]) == "\ufffd"  # invalid utf-8 -> replacement char
    assert tok.id_to_token(256) == tok_lib.EOS_TOKEN
    assert tok.token_bytes(65) == b"A" and tok.token_bytes(256) == b""


@pytest.mark.parametrize("make", [lambda: tok_lib.ByteTokenizer(), "bpe"])
def test_decode_out_of_range_raises(make, bpe512):
    tok = bpe512 if make == "bpe" else make()
    for bad in ([tok.vocab_size], [-1], [1, 2, tok.vocab_size + 10]):
        with pytest.raises(ValueError, match="outside"):
            tok.decode(bad)
    tok.decode([tok.vocab_size - 1])  # boundary is fine


def test_bpe_round_trip(bpe512: tok_lib.BPETokenizer):
    for s in ROUND_TRIP_STRINGS:
        ids = bpe512.encode(s)
        assert all(0 <= i < bpe512.vocab_size for i in ids)
        assert bpe512.decode(ids) == s, s
        # token_bytes concatenation reproduces the exact UTF-8 bytes
        assert b"".join(bpe512.token_bytes(i) for i in ids) == s.encode("utf-8")
    # Special-looking text is plain text: never produces the EOS id.
    assert bpe512.eos_id not in bpe512.encode("a <|endoftext|> b")


def test_bpe_properties(bpe512: tok_lib.BPETokenizer):
    assert bpe512.vocab_size == 512
    assert bpe512.id_to_token(bpe512.eos_id) == tok_lib.EOS_TOKEN
    assert bpe512.bos_id is None
    assert bpe512.decode([bpe512.eos_id]) == tok_lib.EOS_TOKEN


def test_bpe_deterministic(small_text: str, bpe512: tok_lib.BPETokenizer):
    again = tok_lib.train_bpe(small_text, 512)
    assert again.hf_tokenizer.to_str() == bpe512.hf_tokenizer.to_str()
    sample = small_text[:20_000]
    assert again.encode(sample) == bpe512.encode(sample)


def test_bpe_compresses_corpus(bpe512: tok_lib.BPETokenizer):
    text = corpus_lib.load_corpus()
    n_tokens = len(bpe512.encode(text))
    n_bytes = len(text.encode("utf-8"))
    assert n_tokens < 0.6 * n_bytes, (n_tokens, n_bytes)


def test_bpe_save_load(tmp_path, bpe512: tok_lib.BPETokenizer):
    path = tmp_path / "sub" / "tok.json"
    bpe512.save(path)
    loaded = tok_lib.BPETokenizer.load(path)
    s = "And God said, Let there be light: 🙂"
    assert loaded.encode(s) == bpe512.encode(s)
    assert loaded.vocab_size == bpe512.vocab_size and loaded.eos_id == bpe512.eos_id
    wrapped = tok_lib.BPETokenizer.from_tokenizer(loaded.hf_tokenizer, eos_token="<|endoftext|>")
    assert wrapped.encode(s) == bpe512.encode(s)
    with pytest.raises(ValueError, match="EOS"):
        tok_lib.BPETokenizer.from_tokenizer(loaded.hf_tokenizer, eos_token="<missing>")


def test_get_tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARLM_CACHE", str(tmp_path))
    # Speed: train on a slice of the corpus instead of the full text.
    sliced = corpus_lib.load_corpus("kjv")[:100_000]
    monkeypatch.setattr(corpus_lib, "load_corpus", lambda name="kjv": sliced)
    t1 = tok_lib.get_tokenizer("bpe", 300)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1 and "kjv" in files[0].name and "300" in files[0].name
    mtime = files[0].stat().st_mtime_ns
    t2 = tok_lib.get_tokenizer("bpe", 300)  # loaded from cache, not retrained
    assert files[0].stat().st_mtime_ns == mtime
    assert t2.hf_tokenizer.to_str() == t1.hf_tokenizer.to_str()
    # explicit cache_dir wins over the env var
    tok_lib.get_tokenizer("bpe", 300, cache_dir=tmp_path / "other")
    assert len(list((tmp_path / "other").glob("*.json"))) == 1
    assert isinstance(tok_lib.get_tokenizer("byte"), tok_lib.ByteTokenizer)
    with pytest.raises(ValueError):
        tok_lib.get_tokenizer("byte", 4096)
    with pytest.raises(ValueError):
        tok_lib.get_tokenizer("wordpiece", 100)


# ----------------------------------------------------------------- pipeline


def test_tokenize_corpus():
    tok = tok_lib.ByteTokenizer()
    text = "ab\ncd\n\nef\n"
    np.testing.assert_array_equal(
        pipeline.tokenize_corpus(tok, text), np.frombuffer(text.encode(), np.uint8)
    )
    with_eos = pipeline.tokenize_corpus(tok, text, eos_between_chapters=True)
    expected = list(b"ab\ncd") + [256] + list(b"ef\n")
    assert with_eos.dtype == np.int32 and with_eos.tolist() == expected


def test_window_source_matches_reference():
    tokens = np.arange(100, 137, dtype=np.int32)  # N = 37
    T = 5
    src = pipeline.WindowSource(tokens, T)
    n_ref = (len(tokens) - 1) // T
    assert len(src) == n_ref == 7
    for i in range(n_ref):
        ref = np.array([tokens[i * T + j] for j in range(T + 1)], np.int32)
        w = src[i]
        assert w.dtype == np.int32 and w.shape == (T + 1,)
        np.testing.assert_array_equal(w, ref)
        ex = pipeline.window_to_example(w)
        np.testing.assert_array_equal(ex["inputs"], ref[:-1])
        np.testing.assert_array_equal(ex["targets"], ref[1:])
        np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
    with pytest.raises(IndexError):
        src[n_ref]


def test_val_batches_reference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=1000).astype(np.int32)
    T, B = 16, 4
    batches = pipeline.val_batches(tokens, T, B)
    n_windows = (len(tokens) - 1) // T
    assert len(batches) == n_windows // B
    for b, batch in enumerate(batches):
        assert batch["inputs"].shape == (B, T) and batch["inputs"].dtype == np.int32
        for r in range(B):
            w = b * B + r
            np.testing.assert_array_equal(batch["inputs"][r], tokens[w * T : w * T + T])
            np.testing.assert_array_equal(batch["targets"][r], tokens[w * T + 1 : w * T + T + 1])
    assert len(pipeline.val_batches(tokens, T, B, max_batches=2)) == 2
    again = pipeline.val_batches(tokens, T, B)
    assert all(
        np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again)
    )
    small = pipeline.val_batches(tokens[:40], T, B)  # 2 windows < B
    assert len(small) == 1 and small[0]["inputs"].shape == (2, T)


def test_split_disjoint_and_covering():
    n = 50_003
    tokens = np.arange(n, dtype=np.int32)  # value == position
    train, val = pipeline.split_tokens(tokens, val_fraction=0.1, block=1000)
    assert len(train) + len(val) == n
    assert not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), tokens)
    # val blocks are spread over the corpus, not a suffix
    val_blocks = np.unique(val // 1000)
    np.testing.assert_array_equal(val_blocks, np.arange(9, 51, 10))
    assert 0.08 < len(val) / n < 0.12
    # deterministic and order-preserving
    t2, v2 = pipeline.split_tokens(tokens, val_fraction=0.1, block=1000)
    np.testing.assert_array_equal(train, t2)
    np.testing.assert_array_equal(val, v2)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    t0, v0 = pipeline.split_tokens(tokens, val_fraction=0.0)
    assert len(v0) == 0 and len(t0) == n


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"inputs", "targets"}
        for key in x:
            assert x[key].dtype == y[key].dtype == np.int32
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("num_threads", [0, 2])
def test_train_iterator_resume(num_threads: int):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 1000, size=3000).astype(np.int32)
    T, B, seed = 16, 8, 123  # 187 windows -> ~23 batches/epoch
    make = lambda: pipeline.make_train_iterator(tokens, T, B, seed, num_threads=num_threads)

    it = make()
    first = _take(it, 5)
    state = pipeline.iterator_state_to_json(it)
    state = json.loads(json.dumps(state))  # must survive a JSON round trip
    nxt = _take(it, 5)

    restored = pipeline.restore_iterator(make(), state)
    _assert_batches_equal(_take(restored, 5), nxt)

    # A fresh iterator reproduces the whole stream from the start.
    _assert_batches_equal(_take(make(), 10), first + nxt)

    # Resume across an epoch boundary too.
    it = make()
    _take(it, 30)
    st = pipeline.iterator_state_to_json(it)
    tail = _take(it, 5)
    _assert_batches_equal(_take(pipeline.restore_iterator(make(), st), 5), tail)


def test_train_iterator_contents_and_seed():
    tokens = np.arange(10_000, dtype=np.int32)  # window start recoverable from value
    T, B = 10, 4
    n_windows = (len(tokens) - 1) // T
    it = pipeline.make_train_iterator(tokens, T, B, seed=0)
    epoch_batches = n_windows // B
    starts = []
    for batch in _take(it, epoch_batches):
        inp, tgt = batch["inputs"], batch["targets"]
        assert inp.shape == tgt.shape == (B, T)
        np.testing.assert_array_equal(tgt, inp + 1)  # shift-by-one
        assert np.all(inp[:, 0] % T == 0)  # aligned to stride T
        np.testing.assert_array_equal(inp, inp[:, :1] + np.arange(T))
        starts.extend((inp[:, 0] // T).tolist())
    # Within one epoch each window appears at most once, and the order is shuffled.
    assert len(set(starts)) == len(starts)
    assert starts != sorted(starts)

    a = _take(pipeline.make_train_iterator(tokens, T, B, seed=0), 5)
    b = _take(pipeline.make_train_iterator(tokens, T, B, seed=1), 5)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_unigram_baseline_reference():
    V = 7
    train = np.array([0, 1, 1, 2, 2, 2, 5, 5, 0, 1], dtype=np.int32)
    val = np.array([1, 2, 3, 6, 0, 0], dtype=np.int32)
    counts = np.zeros(V)
    for t in train:
        counts[t] += 1
    probs = (counts + 1) / (len(train) + V)
    assert math.isclose(probs.sum(), 1.0)
    ref = -np.mean([math.log(probs[v]) for v in val])
    got = pipeline.unigram_baseline(train, val, V)
    assert math.isclose(got, ref, rel_tol=1e-12)
    # Uniform train counts -> uniform distribution -> log V
    uni = np.arange(V, dtype=np.int32)
    assert math.isclose(pipeline.unigram_baseline(uni, val, V), math.log(V), rel_tol=1e-12)
    with pytest.raises(ValueError):
        pipeline.unigram_baseline(train, np.array([V]), V)


def test_bits_per_byte():
    # 1 nat/token, 1 token per byte -> 1/ln2 bits/byte
    assert math.isclose(pipeline.bits_per_byte(1.0, 100, 100), 1 / math.log(2))
    # ln(256) nats/token over bytes -> exactly 8 bits/byte
    assert math.isclose(pipeline.bits_per_byte(math.log(256), 10, 10), 8.0)
    # 2 nats/token, 4 bytes/token -> 0.5 nats/byte
    assert math.isclose(pipeline.bits_per_byte(2.0, 50, 200), 0.5 / math.log(2))
    with pytest.raises(ValueError):
        pipeline.bits_per_byte(1.0, 1, 0)


def test_count_bytes(bpe512: tok_lib.BPETokenizer):
    text = "And it was so.\nAnd God called the dry land Earth."
    ids = np.array(bpe512.encode(text) + [bpe512.eos_id], np.int32)
    assert pipeline.count_bytes(bpe512, ids) == len(text.encode("utf-8"))
    byte_tok = tok_lib.ByteTokenizer()
    assert pipeline.count_bytes(byte_tok, np.array(byte_tok.encode("héllo"))) == 6


def test_byte_alphabet_is_the_byte_level_pre_tokenizers():
    """arlm's one byte-level alphabet (used by BPE token_bytes and the GGUF tokenizer) equals the
    `tokenizers` ByteLevel alphabet and round-trips every byte through the pre-tokenizer."""
    from tokenizers import pre_tokenizers

    from arlm.data.tokenizers import byte_to_unicode

    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for b in range(256):
        text = bytes([b]).decode("latin-1")
        if b < 128:      # single-byte UTF-8: the pre-tokenizer's spelling of that byte
            assert pre.pre_tokenize_str(text)[0][0] == table[b]
    assert (table[ord(" ")], table[ord("\n")]) == ("Ġ", "Ċ")
