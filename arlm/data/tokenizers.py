"""Tokenizers: a byte-level baseline and a byte-level BPE (HuggingFace ``tokenizers``).

Every tokenizer implements :class:`Tokenizer`:

* ``encode(text) -> list[int]`` treats the input as plain text: special-token
  strings such as ``"<|endoftext|>"`` occurring in the text are *not* turned
  into special ids (EOS is only ever inserted explicitly by the data pipeline);
  nothing is validated.
* ``decode(ids) -> str`` raises :class:`ValueError` for ids outside
  ``[0, vocab_size)``.
* ``token_bytes(i) -> bytes`` is the exact byte string token ``i`` stands for
  (``b""`` for special tokens); used to convert nats/token to bits/byte.

:func:`get_tokenizer` is the entry point used by training code; it trains the
BPE once per (corpus, vocab size) and caches the JSON under
``$ARLM_CACHE/tokenizers`` (default ``~/.cache/arlm/tokenizers``). Everything
works offline.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence

import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = [
    "EOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "train_bpe",
    "cache_root",
    "get_tokenizer",
    "byte_to_unicode",
]

EOS_TOKEN: str = "<|endoftext|>"
"""Surface form of the end-of-sequence special token."""

BYTE_VOCAB_SIZE: int = 257
"""Vocabulary size of :class:`ByteTokenizer` (256 bytes + EOS)."""

# Bump whenever train_bpe changes in a way that changes the learned vocabulary;
# it is part of the cache key, so stale cached tokenizers are never reused.
_BPE_RECIPE_VERSION = "bytebpe-v1"


class Tokenizer(abc.ABC):
    """Minimal tokenizer interface used by the data pipeline and the models."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; valid ids are ``0 .. vocab_size - 1``."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if there is none."""
        return None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encodes ``text`` as plain text (special-token strings are not parsed)."""

    @abc.abstractmethod
    def _decode_unchecked(self, ids: list[int]) -> str:
        """Decodes ids already known to be in range."""

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str:
        """Human-readable surface form of token ``i`` (for inspection/logging)."""

    @abc.abstractmethod
    def token_bytes(self, i: int) -> bytes:
        """Exact bytes token ``i`` contributes to decoded text (``b""`` for specials)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts; equivalent to ``[encode(t) for t in texts]``."""
        return [self.encode(t) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and, for each id, the (start, end) character span of ``text`` it covers
        (what transformers' ``offset_mapping`` gives; chat-template masks are built from it)."""
        raise NotImplementedError(f"{type(self).__name__} gives no character offsets")

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text.

        Args:
          ids: Token ids (any integer sequence, including numpy arrays).

        Returns:
          The decoded string.

        Raises:
          ValueError: If any id is outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._decode_unchecked(ids)

    def _check_ids(self, ids: Sequence[int]) -> None:
        v = self.vocab_size
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.decode: {len(bad)} id(s) outside "
                f"[0, {v}), e.g. {bad[:5]}."
            )

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"Token id {i} outside [0, {self.vocab_size}).")
        return i


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, id 256 is EOS.

    ``decode(encode(s)) == s`` for every Python string ``s`` that is valid
    Unicode (no lone surrogates). Decoding invalid UTF-8 byte sequences uses
    ``errors="replace"``.
    """

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            offsets.extend([(i, i + 1)] * len(b))
        return ids, offsets

    def _decode_unchecked(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        i = self._check_id(i)
        if i == 256:
            return EOS_TOKEN
        if 0x21 <= i <= 0x7E:
            return chr(i)
        return f"<0x{i:02X}>"

    def token_bytes(self, i: int) -> bytes:
        i = self._check_id(i)
        return b"" if i == 256 else bytes([i])

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table, the alphabet of every byte-level BPE
    (the ByteLevel pre-tokenizer's, and GGUF's `gpt2` vocabularies'): printable Latin-1 bytes map
    to themselves, the other bytes to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.lru_cache(maxsize=1)
def _byte_level_unicode_to_byte() -> dict[str, int]:
    """Inverse of `byte_to_unicode`."""
    return {c: b for b, c in byte_to_unicode().items()}


class BPETokenizer(Tokenizer):
    """Thin wrapper around a :class:`tokenizers.Tokenizer`.

    Generic over the wrapped model (trained byte-level BPE here; later e.g. a
    vocabulary imported from GGUF). Only the EOS token must exist in the vocab.

    Args:
      tokenizer: The HuggingFace tokenizer to wrap.
      eos_token: Surface form of the EOS token.
      bos_token: Surface form of the BOS token, or None.
      parse_special_tokens: If False (default), ``encode`` treats special-token
        strings in the input as ordinary text. (This sets the wrapped
        tokenizer's ``encode_special_tokens`` attribute in place.)
    """

    def __init__(
        self,
        tokenizer: hf_tokenizers.Tokenizer,
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
        parse_special_tokens: bool = False,
    ) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = not parse_special_tokens
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary.")
        self._eos_token = eos_token
        self._eos_id = int(eos_id)
        self._bos_id: int | None = None
        if bos_token is not None:
            bos_id = tokenizer.token_to_id(bos_token)
            if bos_id is None:
                raise ValueError(f"BOS token {bos_token!r} is not in the vocabulary.")
            self._bos_id = int(bos_id)
        self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._special_ids = frozenset(
            int(i) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: hf_tokenizers.Tokenizer,
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
        parse_special_tokens: bool = False,
    ) -> "BPETokenizer":
        """Wraps an existing :class:`tokenizers.Tokenizer` (see class docstring)."""
        return cls(tokenizer, eos_token, bos_token, parse_special_tokens)

    @property
    def hf_tokenizer(self) -> hf_tokenizers.Tokenizer:
        """The wrapped HuggingFace tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def _decode_unchecked(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        i = self._check_id(i)
        tok = self._tok.id_to_token(i)
        return "" if tok is None else tok

    def token_bytes(self, i: int) -> bytes:
        i = self._check_id(i)
        if i in self._special_ids:
            return b""
        tok = self.id_to_token(i)
        table = _byte_level_unicode_to_byte()
        if isinstance(self._tok.decoder, decoders.ByteLevel) and all(c in table for c in tok):
            return bytes(table[c] for c in tok)
        return self._tok.decode([i], skip_special_tokens=False).encode("utf-8")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the tokenizer JSON to ``path`` (atomically)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, self._tok.to_str(pretty=False))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
    ) -> "BPETokenizer":
        """Loads a tokenizer JSON written by :meth:`save` (or any HF tokenizer.json)."""
        return cls(hf_tokenizers.Tokenizer.from_file(str(path)), eos_token, bos_token)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self._vocab_size}, eos_id={self._eos_id})"


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _line_chunks(text: str, lines_per_chunk: int = 1000) -> Iterator[str]:
    """Yields consecutive chunks of whole lines (newlines kept)."""
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[start : start + lines_per_chunk])


def train_bpe(text: str, vocab_size: int) -> BPETokenizer:
    """Trains a byte-level BPE tokenizer on ``text``.

    Recipe: ``pre_tokenizers.ByteLevel(add_prefix_space=False)`` (GPT-2 regex),
    ``decoders.ByteLevel``, ``BpeTrainer`` seeded with the full 256-symbol byte
    alphabet and the single special token ``"<|endoftext|>"`` (id 0). Training
    is deterministic: the same text and vocab size give the same vocabulary.

    Args:
      text: Training text.
      vocab_size: Target vocabulary size including the 256 byte symbols and EOS
        (so at least 257). The result may be smaller if ``text`` is too short
        to support that many merges; check ``.vocab_size``.

    Returns:
      The trained tokenizer.
    """
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(
            f"BPE vocab_size must be >= {BYTE_VOCAB_SIZE} (256 bytes + EOS), got {vocab_size}."
        )
    tok = hf_tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Whole lines (with their newlines) so that "\n"-containing merges are learnable.
    tok.train_from_iterator(_line_chunks(text), trainer=trainer)
    return BPETokenizer(tok, eos_token=EOS_TOKEN)


def cache_root() -> pathlib.Path:
    """Root cache directory: ``$ARLM_CACHE`` if set, else ``~/.cache/arlm``."""
    env = os.environ.get("ARLM_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "arlm"


def _bpe_cache_path(corpus: str, text: str, vocab_size: int, cache_dir: pathlib.Path) -> pathlib.Path:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return cache_dir / f"{corpus}-{digest}-{_BPE_RECIPE_VERSION}-v{vocab_size}.json"


def get_tokenizer(
    kind: str,
    vocab_size: int | None = None,
    corpus: str = "kjv",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Returns the tokenizer used for pretraining.

    Args:
      kind: ``"byte"`` (:class:`ByteTokenizer`) or ``"bpe"`` (byte-level BPE
        trained on ``corpus``).
      vocab_size: BPE vocabulary size (required for ``"bpe"``). For ``"byte"``
        it must be None or 257.
      corpus: Bundled corpus to train the BPE on (see :mod:`arlm.data.corpus`).
      cache_dir: Directory holding trained BPE JSON files. Defaults to
        ``cache_root() / "tokenizers"`` (``$ARLM_CACHE/tokenizers`` or
        ``~/.cache/arlm/tokenizers``). The file name encodes the corpus name,
        a hash of the corpus text, the training recipe version and vocab_size.

    Returns:
      The tokenizer. A BPE is trained on first use (a few seconds for the KJV
      corpus) and loaded from the cache afterwards.
    """
    if kind == "byte":
        if vocab_size not in (None, BYTE_VOCAB_SIZE):
            raise ValueError(
                f"The byte tokenizer has vocab_size {BYTE_VOCAB_SIZE}; got vocab_size={vocab_size}."
            )
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"Unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'.")
    if vocab_size is None:
        raise ValueError("get_tokenizer('bpe', ...) requires vocab_size.")

    from arlm.data.corpus import load_corpus  # local: keep import light

    text = load_corpus(corpus)
    cdir = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = _bpe_cache_path(corpus, text, vocab_size, cdir)
    if path.exists():
        try:
            return BPETokenizer.load(path)
        except Exception:  # corrupt/partial cache file: retrain and overwrite
            pass
    tok = train_bpe(text, vocab_size)
    tok.save(path)
    return tok
