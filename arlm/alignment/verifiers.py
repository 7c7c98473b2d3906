"""Verifiers: the rewards of RLVR, eq. 15, r(x, y) = 1[verifier(x, y) accepts].

A verifier is pure host-side Python on decoded text: `verifier(response, target)`
returns a reward in [0, 1] (1 = accept). The basic ones are binary; `Weighted`
mixes several into a partial-credit reward (e.g. 0.9·correctness + 0.1·format)
and `AllOf` accepts only when every part does. All are small frozen (hashable,
picklable) dataclasses, so they can be put in configs and compared.

`score` applies a verifier to a batch of decoded responses and returns the
float32 reward vector [B] that the policy-gradient methods consume.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Verifier(Protocol):
    """Anything with `__call__(response, target) -> float` in [0, 1]."""

    def __call__(self, response: str, target: str) -> float: ...


@dataclasses.dataclass(frozen=True)
class ExactMatch:
    """1 if the response equals the target, else 0.

    With `strip`, surrounding whitespace is removed from both response and
    target first; without `case_sensitive`, both are compared case-folded.
    """

    strip: bool = True
    case_sensitive: bool = True

    def __call__(self, response: str, target: str) -> float:
        if self.strip:
            response, target = response.strip(), target.strip()
        if not self.case_sensitive:
            response, target = response.casefold(), target.casefold()
        return 1.0 if response == target else 0.0


@dataclasses.dataclass(frozen=True)
class ContainsAnswer:
    """1 if the target occurs in the response as a whole word or phrase (case-folded by default), else 0.

    "The capital is Paris." contains "Paris"; "Parisian" does not.
    """

    case_sensitive: bool = False

    def __call__(self, response: str, target: str) -> float:
        target = target.strip()
        if not target:
            return 0.0
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return 1.0 if re.search(rf"(?<!\w){re.escape(target)}(?!\w)", response, flags) else 0.0


# A number in free text. The sign counts only when it does not follow a word
# character or a closing bracket, so "3-5" reads as 3 and 5 but "=-2" and
# "is -2" as -2. "1,234" is one number only when every group after the first
# has exactly three digits ("1, 2" and "1,23" are separate numbers).
_NUMBER_RE = re.compile(
    r"(?:(?<![\w.)\]}])(?P<sign>[-+\u2212]))?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?"
)


def extract_numbers(text: str) -> list[float]:
    """All numbers in `text`, left to right (signs, decimals, "1,234", exponents)."""
    values = []
    for m in _NUMBER_RE.finditer(text):
        sign = "-" if m.group("sign") in ("-", "\u2212") else ""
        values.append(float(sign + m.group("body").replace(",", "") + (m.group("exp") or "")))
    return values


@dataclasses.dataclass(frozen=True)
class NumericAnswer:
    """1 if the first/last number in the response is close to float(target), else 0.

    The number is found anywhere in the text, so "The answer is 42.", "x = 42"
    and "\\boxed{42}" all read as 42; negatives, decimals and thousands
    separators ("1,234") are understood. No number in the response gives 0.
    Closeness is `math.isclose(pred, target, rel_tol=rel_tol, abs_tol=abs_tol)`.
    The target may also use thousands separators; a target that is not a
    number raises ValueError (that is a bug in the data, not a wrong answer).
    """

    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    which: Literal["first", "last"] = "last"

    def __post_init__(self) -> None:
        if self.which not in ("first", "last"):
            raise ValueError(f"which must be 'first' or 'last', got {self.which!r}")
        if not (self.rel_tol >= 0 and self.abs_tol >= 0):
            raise ValueError(f"tolerances must be >= 0, got rel_tol={self.rel_tol}, abs_tol={self.abs_tol}")

    def __call__(self, response: str, target: str) -> float:
        try:
            want = float(target.strip().replace(",", "").replace("\u2212", "-"))
        except ValueError:
            raise ValueError(f"NumericAnswer target is not a number: {target!r}") from None
        numbers = extract_numbers(response)
        if not numbers:
            return 0.0
        got = numbers[0] if self.which == "first" else numbers[-1]
        return 1.0 if math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=self.abs_tol) else 0.0


@dataclasses.dataclass(frozen=True)
class RegexFormat:
    """1 if the stripped response matches `pattern`, else 0 (the target is ignored).

    With `full` the whole stripped response must match (`re.fullmatch`);
    otherwise a match anywhere in it suffices (`re.search`). The pattern is
    compiled once, at construction, where an invalid one raises ValueError.
    """

    pattern: str
    full: bool = True
    flags: int = 0
    _regex: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        try:
            regex = re.compile(self.pattern, self.flags)
        except (re.error, TypeError) as e:
            raise ValueError(f"invalid regex {self.pattern!r}: {e}") from None
        object.__setattr__(self, "_regex", regex)

    def __call__(self, response: str, target: str) -> float:
        text = response.strip()
        m = self._regex.fullmatch(text) if self.full else self._regex.search(text)
        return 1.0 if m is not None else 0.0


def _check_parts(kind: str, parts: Any) -> tuple:
    parts = tuple(parts)
    if not parts:
        raise ValueError(f"{kind} needs at least one part")
    return parts


@dataclasses.dataclass(frozen=True)
class Weighted:
    """Σ_i w_i · verifier_i(response, target), with w_i >= 0 and Σ_i w_i = 1.

    E.g. `Weighted(((NumericAnswer(), 0.9), (RegexFormat(r"-?\\d+"), 0.1)))`:
    0.9 for the right number plus 0.1 for the right format.
    """

    parts: tuple[tuple[Verifier, float], ...]

    def __post_init__(self) -> None:
        parts = _check_parts("Weighted", self.parts)
        checked = []
        for i, part in enumerate(parts):
            try:
                verifier, weight = part
            except (TypeError, ValueError):
                raise ValueError(f"Weighted part {i} must be a (verifier, weight) pair, got {part!r}") from None
            if not callable(verifier):
                raise TypeError(f"Weighted part {i}: {verifier!r} is not a verifier (not callable)")
            weight = float(weight)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"Weighted part {i}: weight must be finite and >= 0, got {weight}")
            checked.append((verifier, weight))
        total = math.fsum(w for _, w in checked)
        if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-6):
            raise ValueError(f"Weighted weights must sum to 1, got {total}")
        object.__setattr__(self, "parts", tuple(checked))

    def __call__(self, response: str, target: str) -> float:
        total = math.fsum(w * float(v(response, target)) for v, w in self.parts if w > 0)
        return min(1.0, max(0.0, total))


@dataclasses.dataclass(frozen=True)
class AllOf:
    """Π_i verifier_i(response, target): 1 only if every part gives 1."""

    parts: tuple[Verifier, ...]

    def __post_init__(self) -> None:
        parts = _check_parts("AllOf", self.parts)
        for i, verifier in enumerate(parts):
            if not callable(verifier):
                raise TypeError(f"AllOf part {i}: {verifier!r} is not a verifier (not callable)")
        object.__setattr__(self, "parts", parts)

    def __call__(self, response: str, target: str) -> float:
        reward = 1.0
        for verifier in self.parts:
            reward *= float(verifier(response, target))
            if reward == 0.0:
                break
        return reward


def score(verifier: Verifier, responses: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Rewards r_b = verifier(responses[b], targets[b]) as float32 [B] (eq. 15).

    Raises ValueError on unequal lengths or a reward outside [0, 1], and
    TypeError if a bare string is passed where a sequence of strings is meant.
    """
    for name, seq in (("responses", responses), ("targets", targets)):
        if isinstance(seq, (str, bytes)):
            raise TypeError(f"{name} must be a sequence of strings, not a single {type(seq).__name__}")
    if len(responses) != len(targets):
        raise ValueError(f"{len(responses)} responses but {len(targets)} targets")
    rewards = np.array([float(verifier(r, t)) for r, t in zip(responses, targets)], dtype=np.float32)
    bad = ~((rewards >= 0.0) & (rewards <= 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"verifier {verifier!r} gave reward {rewards[i]} outside [0, 1] for response {i}")
    return rewards.reshape(len(responses))


VERIFIERS: dict[str, Callable[..., Verifier]] = {
    "exact_match": ExactMatch,
    "contains": ContainsAnswer,
    "numeric": NumericAnswer,
    "regex": RegexFormat,
}


def make_verifier(name: str, **kwargs: Any) -> Verifier:
    """The verifier registered as `name` in VERIFIERS, built with `kwargs`."""
    try:
        ctor = VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}") from None
    try:
        return ctor(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for verifier {name!r}: {e}") from None
