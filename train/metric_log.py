"""The per-step metric log of a training run (CSV + JSONL beside the checkpoints).

Rows are interval means of the step statistics, averaged over workers. Rank 0 publishes the
whole log with every checkpoint, so after a kill the log on storage matches the checkpoint
the run resumes from (rows past it are dropped and redone).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import torch

from rdcd.storage import (
    StorageOptions,
    exists,
    join,
    read_bytes,
    write_bytes_atomic,
)

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"


class MetricLog:
    """Per-interval means of the step statistics; rank 0 publishes CSV + JSONL with each
    checkpoint, so the log on storage always matches the checkpoint it sits beside."""

    def __init__(self, output: str, storage: StorageOptions, rows: list[dict[str, Any]]):
        self.output = output
        self.storage = storage
        self.rows = rows
        self.pending: list[dict[str, float]] = []

    @classmethod
    def resume(cls, output: str, storage: StorageOptions, step: int) -> MetricLog:
        url = join(output, METRICS_JSONL)
        rows: list[dict[str, Any]] = []
        if step > 0 and exists(url, storage):
            lines = read_bytes(url, storage).decode().splitlines()
            rows = [json.loads(line) for line in lines if line]
            rows = [row for row in rows if row["step"] <= step]
        return cls(output, storage, rows)

    def add(self, stats: dict[str, float]) -> None:
        self.pending.append(stats)

    def close_interval(self, extra: dict[str, Any]) -> dict[str, Any]:
        keys = sorted({key for stats in self.pending for key in stats})
        row = dict(extra)
        for key in keys:
            values = [stats[key] for stats in self.pending if key in stats]
            row[key] = sum(values) / len(values)
        self.pending = []
        self.rows.append(row)
        return row

    def publish(self) -> None:
        leading = ["step", "epoch", "lr", "images_per_s", "loss"]
        seen = dict.fromkeys(key for row in self.rows for key in row)
        fields = [key for key in leading if key in seen] + sorted(set(seen) - set(leading))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.rows)
        write_bytes_atomic(join(self.output, METRICS_JSONL), lines.encode(), self.storage)
        write_bytes_atomic(join(self.output, METRICS_CSV), text.getvalue().encode(), self.storage)


def mean_across_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average the logged statistics over workers (same key order on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))
