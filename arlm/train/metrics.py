"""Metric sinks: a JSONL file (one object per record) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


class MetricsWriter:
    """Writes `{"step": s, "split": ..., name: value}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        record = {"step": int(step), "split": split}
        record.update({k: _to_float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records past `step` (a resumed run rewrites them); TensorBoard keeps its own."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
