"""An evaluation run (validate, test, predict): k completions per prompt, scored into records, every rank's records
gathered, the metrics; and what it leaves: `metrics.json`, `predictions.jsonl`, the per-class table."""

from __future__ import annotations

import json
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ttc_lightning.data.base import Task
from ttc_lightning.errors import naming_file
from ttc_lightning.evaluation.records import oracle_metrics, prompt_records, reward_metrics
from ttc_lightning.rewards.scoring import RewardScorer
from ttc_lightning.sampling.sampler import Samples

Record = dict[str, Any]


class Evaluator:
    """The records of one evaluation epoch: `k` completions per prompt at `temperature`, scored (`add`); then every
    rank's records (`gathered`), their metrics (`metrics`) and the files (`write_metrics`, `write_predictions`)."""

    def __init__(
        self,
        generate: Callable[[list, int, float, int], Samples],
        scorer: RewardScorer,
        reward_weights: torch.Tensor,
        k: int,
        temperature: float,
        max_new_tokens: int,
    ) -> None:
        self.generate, self.scorer, self.reward_weights = generate, scorer, reward_weights
        self.k, self.temperature, self.max_new_tokens = k, temperature, max_new_tokens
        self.records: list[Record] = []

    def start(self) -> None:
        self.records = []

    @torch.no_grad()
    def add(self, batch: dict[str, list]) -> list[Record]:
        """Sample and score one batch: one record per prompt, kept for the epoch's metrics and returned."""
        k = self.k
        columns = {key: values for key, values in batch.items() if key != "prompt"}
        repeated = {key: [v for v in values for _ in range(k)] for key, values in columns.items()}
        samples = self.generate(batch["prompt"], k, self.temperature, self.max_new_tokens)
        scores, _ = self.scorer.score(samples.texts, repeated, k)  # [B*k, F]
        self.scorer.take_stats()  # a reward's own numbers (the oracle's stage times) belong to training steps
        reward = torch.nansum(scores * self.reward_weights, dim=1)  # [B*k]
        lengths = samples.completion_mask.sum(1).tolist()
        records = prompt_records(
            batch["prompt"], columns, samples.texts, lengths, scores.tolist(), reward.tolist(), self.scorer.names, k
        )
        self.records.extend(records)
        return records

    def gathered(self, trainer: L.Trainer) -> list[Record]:
        """Every rank's records (the metrics are not averages, so they need all the predictions), in the data's order,
        each prompt once."""
        return gather_records(self.records, trainer.world_size, _dataset_size(trainer))

    def metrics(self, records: list[Record], task: Task) -> dict[str, Any]:
        """Reward means over every sample and the task's own metrics."""
        metrics = {**reward_metrics(records, self.scorer.names), **task.evaluate(records)}
        if all("vulnerable_func" in r["columns"] for r in records):  # patches: the oracle's verdicts on them
            for name in self.scorer.oracle_names:
                metrics |= oracle_metrics(records, name)
        return metrics

    def finish(self, stage: str, trainer: L.Trainer, log_dir: Path) -> dict[str, float]:
        """The epoch's metrics as `stage/name` scalars for every rank to log (none in the sanity check or without
        records); outside fit, rank 0 also writes `metrics.json` and prints them."""
        records = self.gathered(trainer)
        if trainer.sanity_checking or not records:
            return {}
        metrics = self.metrics(records, trainer.datamodule)
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        if trainer.state.fn != "fit" and trainer.global_rank == 0:
            path = self.write_metrics(log_dir, stage, trainer.ckpt_path, records, metrics)
            print_metrics(trainer.state.fn, scalars)
            rank_zero_info(f"ttc: wrote {path}")
        return scalars

    def finish_predictions(self, trainer: L.Trainer, log_dir: Path) -> None:
        """Rank 0 writes every rank's records to `predictions.jsonl`."""
        records = self.gathered(trainer)
        if trainer.global_rank == 0:
            path = write_predictions(log_dir, records, trainer.datamodule.final_prediction)
            rank_zero_info(f"ttc: wrote {len(records)} predictions to {path}")

    def write_metrics(
        self, log_dir: str | Path, stage: str, ckpt_path: str | None, records: list, metrics: dict
    ) -> Path:
        """`metrics.json`, and the per-class table on stderr when the task has one."""
        sampling = {"eval_num_samples": self.k, "eval_temperature": self.temperature}
        path = write_metrics(log_dir, stage, ckpt_path, len(records), sampling, metrics)
        if "per_class" in metrics:
            print_per_class(metrics["per_class"])
        return path


def gather_records(records: list[Record], world_size: int, total: int | None = None) -> list[Record]:
    """Every rank's evaluation records (the metrics are not averages, so they need all the predictions).

    A distributed sampler without shuffling deals the data's row p to rank p % world_size as its (p // world_size)-th
    row, and fills the last round with the first rows again so that every rank runs as many batches (the ranks of a
    sharded model sample together). With `total`, the data's length, the records come back in the data's order and
    those fill-ins are dropped: each prompt counts once."""
    if world_size == 1:
        return records
    gathered: list[list[Record]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, records)
    if total is None:
        return [record for part in gathered for record in part]
    placed = {rank + j * world_size: record for rank, part in enumerate(gathered) for j, record in enumerate(part)}
    return [placed[p] for p in sorted(placed) if p < total]


def _dataset_size(trainer: L.Trainer) -> int | None:
    """The length of the data the running evaluation reads, or None where it is not one sized dataset."""
    if trainer.testing:
        loaders = trainer.test_dataloaders
    elif trainer.predicting:
        loaders = trainer.predict_dataloaders
    else:  # validating, within fit or not
        loaders = trainer.val_dataloaders
    dataset = getattr(loaders, "dataset", None)
    return len(dataset) if hasattr(dataset, "__len__") else None


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
    with naming_file(path):
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_predictions(
    log_dir: str | Path, records: Sequence[Record], final_prediction: Callable[[Record], dict[str, Any]]
) -> Path:
    """`predictions.jsonl`: one line per input with its k completions, their rewards and the task's final answer."""
    path = Path(log_dir) / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_file(path), path.open("w", encoding="utf-8") as f:
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
    table = Table()  # titled on its own line: rich would pad a title with blanks to the table's width
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in per_class.items():
        table.add_row(escape(name), *(f"{row[c]:.3f}" for c in ("precision", "recall", "f1")), str(int(row["support"])))
    Console(stderr=True).print("per class", table)


def print_metrics(stage: str, metrics: dict[str, float], stream: TextIO | None = None) -> None:
    """The evaluation's metrics on `stream` (stdout): a table on a terminal; piped, one `name value` line each,
    names whole and values to 4 decimals, so a log keeps them readable and `grep`-able."""
    stream = stream or sys.stdout
    if stream.isatty():
        table = Table(title=f"ttc {stage}", title_justify="left")
        table.add_column("metric", no_wrap=True)
        table.add_column("value", justify="right", no_wrap=True)
        for name, value in metrics.items():
            table.add_row(escape(name), f"{value:.4f}")
        Console(file=stream).print(table)
        return
    width = max(map(len, metrics), default=0)
    stream.write("".join(f"{name:<{width}}  {value:>10.4f}\n" for name, value in metrics.items()))
