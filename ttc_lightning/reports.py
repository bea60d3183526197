"""What evaluation leaves: every rank's records gathered, `metrics.json` (validate, test), `predictions.jsonl`
(predict), the per-class table."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

Record = dict[str, Any]


def gather_records(records: list[Record], world_size: int) -> list[Record]:
    """Every rank's evaluation records (the metrics are not averages, so they need all the predictions)."""
    if world_size == 1:
        return records
    gathered: list[list[Record]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, records)
    return [record for part in gathered for record in part]


def write_metrics(
    log_dir: str | Path,
    stage: str,
    ckpt_path: str | None,
    num_prompts: int,
    sampling: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """`metrics.json` in `log_dir`: the stage, checkpoint, prompts, sampling settings and every metric."""
    summary = {"stage": stage, "ckpt_path": ckpt_path, "num_prompts": num_prompts, **sampling, "metrics": metrics}
    path = Path(log_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_predictions(
    log_dir: str | Path, records: Sequence[Record], final_prediction: Callable[[Record], dict[str, Any]]
) -> Path:
    """`predictions.jsonl`: one line per input with its k completions, their rewards and the task's final answer."""
    path = Path(log_dir) / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            line = {
                "id": record["columns"].get("id", i),
                "completions": record["completions"],
                "rewards": record["rewards"],
                **final_prediction(record),
            }
            f.write(json.dumps(line, default=str) + "\n")
    return path


def print_per_class(per_class: dict[str, dict[str, float]]) -> None:
    """Precision, recall, F1 and support per class, on stderr."""
    table = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in per_class.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in ("precision", "recall", "f1")), str(int(row["support"])))
    Console(stderr=True).print(table)
