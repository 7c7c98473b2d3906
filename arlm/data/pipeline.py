"""Deterministic, resumable pretraining input pipeline (grain ``MapDataset``).

Flow::

    text   = load_corpus("kjv")
    tok    = get_tokenizer("bpe", 4096)
    tokens = tokenize_corpus(tok, text)                      # int32[N]
    train_N, val_N = split_tokens(tokens)                    # interleaved blocks
    it = make_train_iterator(train_N, seq_len, batch_size, seed)
    batch = next(it)   # {"inputs": int32[B, T], "targets": int32[B, T]}
    state = iterator_state_to_json(it)                      # JSON-able dict
    ...
    it = restore_iterator(make_train_iterator(...same args...), state)

Training examples are the non-overlapping windows ``tokens[i*T : i*T + T + 1]``
(:class:`WindowSource`); ``inputs = window[:-1]``, ``targets = window[1:]``.
The window order is a grain global shuffle, reshuffled each epoch with a seed
derived from ``seed`` and the epoch number, so the stream of batches is a pure
function of ``(tokens, seq_len, batch_size, seed)`` and the iterator state is
just the index of the next batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from arlm.data.tokenizers import Tokenizer

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_SPLIT_BLOCK",
    "Batch",
    "tokenize_corpus",
    "split_tokens",
    "WindowSource",
    "window_to_example",
    "make_train_dataset",
    "make_train_iterator",
    "shuffled_batches",
    "iterate",
    "iterator_state_to_json",
    "restore_iterator",
    "val_batches",
    "count_bytes",
    "unigram_baseline",
    "bits_per_byte",
]

DEFAULT_VAL_FRACTION: float = 0.05
"""Default fraction of tokens held out for validation."""

DEFAULT_SPLIT_BLOCK: int = 4096
"""Default block length (tokens) of the interleaved train/validation split."""

Batch = dict[str, np.ndarray]
"""``{"inputs": int32[B, T], "targets": int32[B, T]}``."""


def tokenize_corpus(
    tokenizer: Tokenizer, text: str, eos_between_chapters: bool = False
) -> np.ndarray:
    """Tokenizes a whole corpus into one flat id array.

    Args:
      tokenizer: Any :class:`~arlm.data.tokenizers.Tokenizer`.
      text: The corpus text.
      eos_between_chapters: If False (default) the text is encoded once as a
        single string. If True it is split on blank lines (``"\\n\\n"``, the
        KJV chapter separator), each chapter is encoded separately and
        chapters are joined by ``tokenizer.eos_id`` (the blank line itself is
        replaced by EOS).

    Returns:
      ``tokens_N``: int32 array of token ids.
    """
    if eos_between_chapters:
        chapters = [c for c in text.split("\n\n") if c]
        encoded = tokenizer.encode_batch(chapters)
        eos = tokenizer.eos_id
        out: list[int] = []
        for i, ids in enumerate(encoded):
            if i:
                out.append(eos)
            out.extend(ids)
        tokens_N = np.asarray(out, dtype=np.int32)
    else:
        tokens_N = np.asarray(tokenizer.encode(text), dtype=np.int32)
    if tokens_N.size and int(tokens_N.max()) >= tokenizer.vocab_size:
        raise ValueError("Tokenizer produced ids >= vocab_size.")
    return tokens_N


def split_tokens(
    tokens_N: np.ndarray,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    block: int = DEFAULT_SPLIT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic interleaved train/validation split.

    The token array is cut into consecutive blocks of ``block`` tokens (the
    last may be shorter). With ``k = round(1 / val_fraction)``, block ``j``
    goes to validation iff ``j % k == k - 1`` (so every k-th block, spread
    over the whole corpus, not just the last book); all others go to train.
    Each side is the concatenation of its blocks in corpus order, so a few
    training windows straddle a seam between non-adjacent blocks.

    Args:
      tokens_N: Flat token array.
      val_fraction: Approximate validation fraction, in ``[0, 0.5]``. 0 gives
        an empty validation set.
      block: Block length in tokens.

    Returns:
      ``(train_tokens, val_tokens)``; together they are a partition of the
      input positions (``len(train) + len(val) == len(tokens_N)``).
    """
    tokens_N = np.asarray(tokens_N)
    if tokens_N.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens_N.shape}.")
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5], got {val_fraction}.")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    if val_fraction == 0.0:
        return tokens_N.copy(), tokens_N[:0].copy()
    k = max(2, int(round(1.0 / val_fraction)))
    block_of_position_N = np.arange(tokens_N.shape[0]) // block
    is_val_N = (block_of_position_N % k) == (k - 1)
    return tokens_N[~is_val_N], tokens_N[is_val_N]


class WindowSource(Sequence[np.ndarray]):
    """Random-access source of non-overlapping windows of ``seq_len + 1`` tokens.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``
    (stride ``seq_len``; consecutive windows share one boundary token so that
    every token except the first is a target exactly once). Satisfies grain's
    ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``).

    Args:
      tokens_N: Flat token array (converted to int32).
      seq_len: Model context length ``T``.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
        self._tokens_N = np.ascontiguousarray(tokens_N, dtype=np.int32)
        if self._tokens_N.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self._tokens_N.shape}.")
        self.seq_len = seq_len
        self._len = max(0, (self._tokens_N.shape[0] - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        """Returns window ``index`` as int32[seq_len + 1] (a copy)."""
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"Window index {index} out of range [0, {self._len}).")
        start = index * self.seq_len
        return self._tokens_N[start : start + self.seq_len + 1].copy()

    def __repr__(self) -> str:
        return f"WindowSource(num_windows={self._len}, seq_len={self.seq_len})"


def window_to_example(window_Tp1: np.ndarray) -> Batch:
    """Splits a window int32[T+1] into ``{"inputs": [T], "targets": [T]}``."""
    return {"inputs": window_Tp1[:-1], "targets": window_Tp1[1:]}


def make_train_dataset(
    tokens_N: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
    process_index: int = 0, process_count: int = 1,
) -> grain.MapDataset:
    """Infinite, shuffled, batched training ``grain.MapDataset``.

    ``MapDataset.source(WindowSource).map(split)``, then `shuffled_batches`.
    Element ``k`` is batch ``k`` of the stream (random access; e.g.
    ``ds[k::num_hosts]`` for per-host sharding).

    Args:
      tokens_N: Flat training tokens.
      seq_len: Context length ``T``.
      batch_size: Batch size ``B``.
      seed: Shuffle seed, in ``[0, 2**32)``.
      process_index, process_count: multi-host data loading. Each process reads only its rows
        of every global batch: rows ``[p·B/n, (p+1)·B/n)``, exactly the rows of a single-process
        batch that its devices hold when the batch is split over the mesh's data axes.

    Returns:
      Dataset whose elements are ``{"inputs": int32[B/n, T], "targets": int32[B/n, T]}``.
    """
    source = WindowSource(tokens_N, seq_len)
    if len(source) == 0:
        raise ValueError(
            f"Not enough tokens ({np.asarray(tokens_N).shape[0]}) for one window of "
            f"seq_len + 1 = {seq_len + 1}."
        )
    return shuffled_batches(grain.MapDataset.source(source).map(window_to_example), batch_size, seed,
                            process_index=process_index, process_count=process_count)


def shuffled_batches(examples: grain.MapDataset, batch_size: int, seed: int, *, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
    """Every epoch a fresh seeded shuffle of `examples`, batched: element k is batch k of the stream.

    In a multi-host run process p of n takes rows [p·B/n, (p+1)·B/n) of every global batch: disjoint
    shards that together cover the data, and exactly the rows its devices hold when the batch is split
    over the mesh's data axes. Shared by the bundled corpus and by a researcher's data (`arlm.data.loader`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(f"process {process_index} of {process_count} cannot take an equal share of a batch "
                         f"of {batch_size}")
    local = examples.shuffle(seed=seed).repeat().batch(batch_size // process_count, drop_remainder=True)
    return local if process_count == 1 else local[process_index::process_count]


def iterate(ds: grain.MapDataset, *, num_threads: int = 0, prefetch_buffer_size: int = 16) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds` (`iterator_state_to_json` / `restore_iterator`)."""
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch_buffer_size)))


def make_train_iterator(
    tokens_N: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    *,
    num_threads: int = 0,
    prefetch_buffer_size: int = 16,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of training batches with checkpointable state.

    Args:
      tokens_N: Flat training tokens.
      seq_len: Context length ``T``.
      batch_size: Batch size ``B``.
      seed: Shuffle seed, in ``[0, 2**32)``.
      num_threads: grain prefetch threads (0 = synchronous; data is in memory
        and batches are cheap, so 0 is usually best). Does not affect the
        batch order.
      prefetch_buffer_size: grain prefetch buffer size (batches).

    Returns:
      A ``grain.DatasetIterator`` yielding ``{"inputs": int32[B, T],
      "targets": int32[B, T]}``. ``get_state()`` / ``set_state()`` (or
      :func:`iterator_state_to_json` / :func:`restore_iterator`) checkpoint
      and restore it exactly.
    """
    ds = make_train_dataset(tokens_N, seq_len, batch_size, seed, process_index=process_index,
                            process_count=process_count)
    return iterate(ds, num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def iterator_state_to_json(it: grain.DatasetIterator) -> dict[str, Any]:
    """Returns the iterator state as a plain JSON-serialisable dict.

    For :func:`make_train_iterator` this is ``{"next_index": <int>}`` (the
    index of the next batch); ``json.dumps`` of the result always works.
    """
    state = _to_jsonable(it.get_state())
    json.dumps(state)  # fail early if grain ever returns something exotic
    return state


def restore_iterator(
    it: grain.DatasetIterator, state: Mapping[str, Any]
) -> grain.DatasetIterator:
    """Restores ``state`` (from :func:`iterator_state_to_json`) into ``it``.

    ``it`` must come from :func:`make_train_iterator` with the same tokens,
    ``seq_len``, ``batch_size`` and ``seed`` as the saved one; the following
    batches are then bitwise identical to those the saved iterator produced.

    Returns:
      ``it`` (restored in place), for chaining.
    """
    it.set_state(dict(state))
    return it


def val_batches(
    tokens_N: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> list[Batch]:
    """Deterministic, finite list of validation batches (no shuffling).

    Uses the windows of :class:`WindowSource` in order; a trailing partial
    batch is dropped (fixed shapes, no recompilation), except that if there
    are fewer than ``batch_size`` windows a single smaller batch is returned.

    Args:
      tokens_N: Flat validation tokens.
      seq_len: Context length ``T``.
      batch_size: Batch size ``B``.
      max_batches: Optional cap on the number of batches (taken from the start).

    Returns:
      List of ``{"inputs": int32[B, T], "targets": int32[B, T]}``. Every
      target position is scored once; the number of scored tokens is
      ``len(batches) * B * T`` (or fewer for the single-small-batch case).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    source = WindowSource(tokens_N, seq_len)
    n_windows = len(source)
    if n_windows == 0:
        return []
    n_batches = n_windows // batch_size
    if n_batches == 0:
        sizes = [(0, n_windows)]
    else:
        sizes = [(b * batch_size, batch_size) for b in range(n_batches)]
    if max_batches is not None:
        sizes = sizes[: max(0, max_batches)]
    batches: list[Batch] = []
    for start, size in sizes:
        windows_BxTp1 = np.stack([source[start + i] for i in range(size)])
        batches.append(
            {"inputs": windows_BxTp1[:, :-1], "targets": windows_BxTp1[:, 1:]}
        )
    return batches


def count_bytes(tokenizer: Tokenizer, tokens_N: np.ndarray) -> int:
    """Number of UTF-8 bytes the tokens stand for (special tokens count 0).

    Use with :func:`bits_per_byte`; e.g. for the scored targets of a batch,
    ``count_bytes(tok, batch["targets"].ravel())``.
    """
    tokens_N = np.asarray(tokens_N).ravel()
    lengths_V = np.array(
        [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64
    )
    return int(lengths_V[tokens_N].sum())


def unigram_baseline(
    train_tokens_N: np.ndarray, val_tokens_M: np.ndarray, vocab_size: int
) -> float:
    """Validation cross-entropy (nats/token) of the add-one-smoothed train unigram.

    ``p(v) = (count_train(v) + 1) / (N + vocab_size)``;
    returns ``-mean_j log p(val_j)``. A pretrained model must beat this.
    """
    train_tokens_N = np.asarray(train_tokens_N).ravel()
    val_tokens_M = np.asarray(val_tokens_M).ravel()
    if val_tokens_M.size == 0:
        raise ValueError("Empty validation set.")
    for name, arr in (("train", train_tokens_N), ("val", val_tokens_M)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
            raise ValueError(f"{name} tokens outside [0, {vocab_size}).")
    counts_V = np.bincount(train_tokens_N, minlength=vocab_size).astype(np.float64)
    log_p_V = np.log(counts_V + 1.0) - np.log(train_tokens_N.size + vocab_size)
    return float(-log_p_V[val_tokens_M].mean())


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Converts a per-token cross-entropy in nats to bits per UTF-8 byte.

    ``bpb = nats_per_token * n_tokens / (n_bytes * ln 2)``.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}.")
    return float(nats_per_token) * n_tokens / (n_bytes * math.log(2.0))
