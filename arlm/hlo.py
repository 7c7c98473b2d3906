"""Collective traffic of a compiled step, read from its optimized HLO: how many bytes each kind of
collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) moves per call."""

from __future__ import annotations

import re
from collections import defaultdict

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def shape_bytes(text: str) -> int:
    """Bytes of an HLO shape such as f32[16,32]{1,0} or a tuple (f32[4], bf16[2,2])."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*body=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _line_bytes(line: str) -> tuple[str, int] | None:
    m = _OP.search(line)
    if m is None:
        return None
    shape, kind, start = m.groups()
    if start and shape.startswith("("):           # async start: (operand, result[, …]) → the result
        parts = _SHAPE.findall(shape)
        shape = "{}[{}]".format(*parts[1]) if len(parts) > 1 else shape
    return kind, shape_bytes(shape)


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{collective kind: bytes of its results per execution of the program}, per device.

    Collectives inside a while loop (the layer scan and its backward pass) count once per iteration
    when the loop's trip count is known. For an all-gather the result is the gathered array; for an
    all-reduce the reduced array.
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            comps[current].append(line)

    def total(name: str, seen: tuple = ()) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for line in comps.get(name, []):
            hit = _line_bytes(line)
            if hit:
                out[hit[0]] += hit[1]
            w = _WHILE.search(line)
            if w and w.group(1) not in seen:
                trips = _TRIPS.search(line)
                for k, v in total(w.group(1), seen + (name,)).items():
                    out[k] += v * (int(trips.group(1)) if trips else 1)
        return out

    if entry is None:                              # not a full module: count every op once
        out: dict[str, int] = defaultdict(int)
        for line in hlo_text.splitlines():
            hit = _line_bytes(line)
            if hit:
                out[hit[0]] += hit[1]
    else:
        out = total(entry)
    return {k: out.get(k, 0) for k in _KINDS}
