"""Packing: short examples laid best-fit-decreasing into fixed-length rows, with segment ids.

A packed row holds several examples one after another. Each keeps its own positions (restarting at
0) and a segment id (1, 2, … in the row; 0 is padding), and `arlm.model.apply_model(...,
segment_ids=)` lets no attention cross a segment, so every example's logits are what it would get
alone in a row, and the token-weighted loss over packed rows equals the loss over unpacked ones.

    plan = best_fit_decreasing(lengths_N, capacity=T)     # [[example ids of row 0], …]
    row = pack_row([(ids, mask), …], T)                    # one sequence-batch row (arlm.model.log_probs)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

__all__ = ["best_fit_decreasing", "pack_row", "padding_fraction"]


def best_fit_decreasing(lengths_N: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each holding at most `capacity` tokens: examples taken longest first
    (ties by index), each into the open bin it leaves with the least room (a new bin if none fits).
    Deterministic; O(N log N) bin look-ups."""
    lengths = [int(n) for n in lengths_N]
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens > row length {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []            # sorted (room left, bin id) of the open bins
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
            bisect.insort(room, (left - n, b))
        else:
            b = len(bins)
            bins.append([])
            bisect.insort(room, (capacity - n, b))
        bins[b].append(i)
    return bins


def pack_row(examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row of a sequence batch (`arlm.model.log_probs`) from (ids, mask) examples, laid end to end
    and right-padded to `length`: tokens, positions (from 0 in each segment), attention (real tokens),
    response_mask (the examples' masks; 0 on each segment's first token) and segment_ids (1, 2, …; 0 on
    padding)."""
    tokens = np.full(length, pad_id, np.int32)
    positions = np.zeros(length, np.int32)
    attention = np.zeros(length, bool)
    response = np.zeros(length, np.float32)
    segments = np.zeros(length, np.int32)
    at = 0
    for s, (ids, mask) in enumerate(examples, start=1):
        n = len(ids)
        if at + n > length:
            raise ValueError(f"examples of {at + n} tokens do not fit a row of {length}")
        tokens[at:at + n] = ids
        positions[at:at + n] = np.arange(n)
        attention[at:at + n] = True
        response[at:at + n] = mask
        response[at] = 0.0                    # nothing in its segment predicts a segment's first token
        segments[at:at + n] = s
        at += n
    return {"tokens": tokens, "positions": positions, "attention": attention, "response_mask": response,
            "segment_ids": segments}


def padding_fraction(plan: Sequence[Sequence[int]], lengths_N: Sequence[int], length: int) -> float:
    """The share of the rows' token slots that are padding."""
    used = sum(int(lengths_N[i]) for row in plan for i in row)
    return 1.0 - used / max(len(plan) * length, 1)
