"""Batches of a researcher's tokenized data (`arlm.data.store`) for the generic train step.

    rows = SequenceRows(store, length=256, pack=True)        # packed rows (best-fit-decreasing)
    it = pipeline.iterate(train_batches(rows, batch_size=8, seed=0))
    batch = next(it)      # a sequence batch [B, T] (arlm.model.log_probs) with segment_ids
    state = pipeline.iterator_state_to_json(it)             # saved in every checkpoint

Training batches are a grain `MapDataset`: every epoch a fresh seeded shuffle of the rows, element k
batch k of the stream, so the iterator state is one index and a resumed run sees exactly the rows an
uninterrupted run would; in a multi-host run each process reads its own disjoint share of every batch
(`pipeline.shuffled_batches`). Evaluation batches are fixed, in order, and the last one is filled
with empty rows (nothing attended, nothing scored) so every batch has one shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from arlm.data import pipeline
from arlm.data.packing import best_fit_decreasing, pack_row, padding_fraction
from arlm.data.store import TokenStore

__all__ = ["SequenceRows", "PairRows", "row_length", "train_batches", "fixed_batches"]


def row_length(longest: int, max_length: int, multiple: int = 64) -> int:
    """The row length for examples of at most `longest` tokens: rounded up to `multiple`, at most max_length."""
    return int(min(max_length, multiple * math.ceil(max(longest, 2) / multiple)))


class SequenceRows(Sequence):
    """Rows of `length` tokens from a "sequences" store: several examples per row (`pack=True`,
    best-fit-decreasing) or one (right-padded). Element k is one sequence-batch row."""

    def __init__(self, store: TokenStore, length: int, *, pack: bool = True, pad_id: int = 0) -> None:
        self.store, self.length, self.pad_id = store, int(length), pad_id
        lengths = store.lengths("ids")
        if lengths.size and int(lengths.max()) > self.length:
            raise ValueError(f"an example has {int(lengths.max())} tokens, more than the row length {self.length}")
        self.plan = best_fit_decreasing(lengths, self.length) if pack else [[i] for i in range(len(store))]
        self.padding_fraction = padding_fraction(self.plan, lengths, self.length)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        examples = [self.store[i] for i in self.plan[int(k)]]
        return pack_row([(e["ids"], e["mask"]) for e in examples], self.length, self.pad_id)


class PairRows(Sequence):
    """Preference pairs from a "preference" store: element i is a [2, T] sequence batch (chosen at 0,
    rejected at 1), each row prompt + response right-padded to `length`; the responses are scored."""

    def __init__(self, store: TokenStore, length: int | None = None, *, pad_id: int = 0) -> None:
        p = store.lengths("prompt")
        longest = int((p + np.maximum(store.lengths("chosen"), store.lengths("rejected"))).max())
        self.store, self.pad_id = store, pad_id
        self.length = int(length) if length else row_length(longest, longest, 8)
        if longest > self.length:
            raise ValueError(f"a pair has {longest} tokens, more than the row length {self.length}")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        e = self.store[int(i)]
        n_p = e["prompt"].size
        rows = [pack_row([(np.concatenate([e["prompt"], e[side]]),
                           np.concatenate([np.zeros(n_p, np.uint8), np.ones(e[side].size, np.uint8)]))],
                         self.length, self.pad_id) for side in ("chosen", "rejected")]
        return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "attention", "response_mask")}


def train_batches(rows: Sequence, batch_size: int, seed: int, *, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """The infinite, reshuffled-every-epoch stream of training batches over `rows`."""
    if len(rows) == 0:
        raise ValueError("no training rows")
    return pipeline.shuffled_batches(grain.MapDataset.source(rows), batch_size, seed,
                                     process_index=process_index, process_count=process_count)


def fixed_batches(rows: Sequence, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every row once, in order, `batch_size` rows a batch; the last batch is completed with empty rows
    (no attended or scored token), so all batches share one shape (one compile)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        items = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        while len(items) < batch_size:
            empty = {k: np.zeros_like(v) for k, v in items[0].items()}
            items.append(empty)
        batches.append({k: np.stack([it[k] for it in items]) for k in items[0]})
    return batches
