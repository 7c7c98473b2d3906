"""A verifiable task for RLVR (eq. 15) and SFT (eq. 8): integer arithmetic.

Problems are "a{op}b=" with the integer result as the answer, e.g. "12+7=" → "19",
so a `NumericAnswer` or `ExactMatch` verifier can check any response. A tiny
character tokenizer (`ArithmeticTokenizer`) encodes them; `arlm.alignment.task_io.TaskIO.sft_batch`
turns problems into the sequence batches that SFT (eq. 8, `arlm.objectives.sft_loss`) reads.

Train/test split. Whether a pair (a, op, b) is held out depends only on the
pair: a fixed 64-bit hash of (a, op, b) is mapped to u in [0, 1), and the pair
is a test pair iff u < test_fraction (10% by default). The split is therefore
the same for every seed and every max_operand, and no test pair can ever be
sampled for training. Sampling within a split is uniform over its pairs
(rejection sampling with a numpy Generator seeded from (seed, split)), so the
problems are deterministic given the task and the split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

OPS: tuple[str, ...] = ("+", "-", "*")
SPLITS: tuple[str, ...] = ("train", "test")
_SPLIT_SEED = 0x5EED_A817  # fixed: the split is a property of the pair, not of the task's seed


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: `prompt` = f"{a}{op}{b}=", `answer` = str(a op b)."""

    prompt: str
    answer: str
    a: int
    b: int
    op: str


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unsupported op {op!r}; supported: {OPS}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrap-around arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_uniform(a: np.ndarray | int, op: str | np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """A fixed pseudo-random u in [0, 1) for each (a, op, b) (vectorised; ops by symbol or OPS index)."""
    op_idx = np.asarray([OPS.index(op)] if isinstance(op, str) else op, dtype=np.int64)
    a_arr = np.atleast_1d(np.asarray(a, dtype=np.int64)).astype(np.uint64)
    b_arr = np.atleast_1d(np.asarray(b, dtype=np.int64)).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(a_arr + np.uint64(_SPLIT_SEED))
        h = _mix64(h ^ b_arr)
        h = _mix64(h ^ op_idx.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_of(a: int, op: str, b: int, test_fraction: float = 0.1) -> str:
    """"test" if the pair (a, op, b) is held out, else "train" (see the module docstring)."""
    return "test" if pair_uniform(a, op, b)[0] < test_fraction else "train"


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Problems a{op}b= with a, b uniform in [0, max_operand] and op uniform in `ops`.

    "-" may give negative answers. `test_fraction` of all (a, op, b) pairs are
    held out for the "test" split (decided by `split_of`; disjoint from "train").
    """

    max_operand: int = 99
    ops: tuple[str, ...] = ("+",)
    seed: int = 0
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if int(self.max_operand) != self.max_operand or self.max_operand < 0:
            raise ValueError(f"max_operand must be an integer >= 0, got {self.max_operand!r}")
        ops = tuple(self.ops) if not isinstance(self.ops, str) else (self.ops,)
        if not ops:
            raise ValueError("ops must not be empty")
        bad = [op for op in ops if op not in OPS]
        if bad:
            raise ValueError(f"unsupported ops {bad}; supported: {OPS}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"duplicate ops in {ops}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "max_operand", int(self.max_operand))

    def split_of(self, a: int, op: str, b: int) -> str:
        """The split that the pair (a, op, b) belongs to."""
        return split_of(a, op, b, self.test_fraction)

    def _in_split(self, a: np.ndarray, op_idx: np.ndarray, b: np.ndarray, split: str) -> np.ndarray:
        is_test = pair_uniform(a, op_idx, b) < self.test_fraction
        return is_test if split == "test" else ~is_test

    def problems(self, n: int, split: str = "train") -> list[Problem]:
        """`n` problems sampled uniformly (with replacement) from the pairs of `split`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        op_ids = np.asarray([OPS.index(op) for op in self.ops], dtype=np.int64)
        hi = self.max_operand + 1
        n_pairs = hi * hi * len(op_ids)
        if n_pairs <= 1 << 20:  # small space: make sure the split is not empty
            a, b, o = np.meshgrid(np.arange(hi), np.arange(hi), op_ids, indexing="ij")
            if not self._in_split(a.ravel(), o.ravel(), b.ravel(), split).any():
                raise ValueError(f"the {split!r} split of {self} is empty; increase max_operand")
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        frac = self.test_fraction if split == "test" else 1.0 - self.test_fraction
        chunk = max(1024, int(2 * n / frac))
        got_a, got_b, got_o, have = [], [], [], 0
        for _ in range(10_000):
            a = rng.integers(0, hi, size=chunk)
            b = rng.integers(0, hi, size=chunk)
            o = op_ids[rng.integers(0, len(op_ids), size=chunk)]
            keep = self._in_split(a, o, b, split)
            got_a.append(a[keep])
            got_b.append(b[keep])
            got_o.append(o[keep])
            have += int(keep.sum())
            if have >= n:
                break
        else:  # pragma: no cover - only for a vanishingly small split
            raise RuntimeError(f"could not sample {n} {split!r} problems from {self}")
        a_all, b_all, o_all = (np.concatenate(x)[:n].tolist() for x in (got_a, got_b, got_o))
        out = []
        for a_i, b_i, o_i in zip(a_all, b_all, o_all):
            op = OPS[o_i]
            out.append(Problem(prompt=f"{a_i}{op}{b_i}=", answer=str(_apply(op, a_i, b_i)), a=a_i, b=b_i, op=op))
        return out


class ArithmeticTokenizer:
    """Character tokenizer for arithmetic: <pad>=0, <bos>=1, <eos>=2, then "0123456789+-*= "."""

    SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
    CHARS: str = "0123456789+-*= "

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.id_to_token: tuple[str, ...] = self.SPECIALS + tuple(self.CHARS)
        self.vocab_size: int = len(self.id_to_token)
        self._char_to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(self.CHARS)}

    def __repr__(self) -> str:
        return f"ArithmeticTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of the characters of `text`, optionally with <bos> first and <eos> last."""
        bad = sorted({c for c in text if c not in self._char_to_id})
        if bad:
            raise ValueError(f"characters {bad} are not in the arithmetic vocabulary {self.CHARS!r}")
        ids = [self._char_to_id[c] for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` [T]: stops at the first <eos>, skips <pad> and <bos>."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode takes a 1-D id sequence, got shape {arr.shape}; use decode_batch")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        chars = []
        for i in arr.tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            chars.append(self.id_to_token[i])
        return "".join(chars)

    def decode_batch(self, ids_BxT: np.ndarray) -> list[str]:
        """`decode` of each row of [B, T] ids."""
        arr = np.asarray(ids_BxT)
        if arr.ndim != 2:
            raise ValueError(f"decode_batch takes [B, T] ids, got shape {arr.shape}")
        return [self.decode(row) for row in arr]
