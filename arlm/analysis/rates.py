"""Rates with honest intervals: every phenomenon measured as a proportion reports k/n and its 95% Wilson
interval (it stays inside [0, 1] and behaves at k = 0 and k = n, where the normal interval does not)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (nan, nan) when n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 ≤ successes ≤ n, got successes={successes}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)      # exact bounds at k = 0 and k = n
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Rate:
    """k successes out of n, the rate k/n and its 95% Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def to_dict(self) -> dict:
        return {"rate": self.value, "k": self.k, "n": self.n, "ci95": list(self.ci95)}

    @classmethod
    def of(cls, outcomes: Sequence[bool] | np.ndarray) -> "Rate":
        arr = np.asarray(outcomes, bool).ravel()
        return cls(int(arr.sum()), int(arr.size))
