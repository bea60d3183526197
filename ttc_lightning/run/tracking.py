"""Experiment tracking: W&B set-up checks, run metadata, completion tables, progress lines and the end-of-run
summary.

`prepare_wandb` runs on the parsed config before anything is built, so a missing package or login stops the run
with one line instead of a crash once training has started. The callbacks work with any logger; the W&B-specific
ones do nothing without a `WandbLogger`.
"""

from __future__ import annotations

import json
import netrc
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from ttc_lightning.errors import TTCError, naming_file

PACKAGES = ("torch", "lightning", "transformers", "peft", "bitsandbytes", "wandb", "ttc-lightning")
OFFLINE_MODES = ("offline", "dryrun", "disabled")
WANDB_MISSING = (
    "trainer.logger: WandbLogger needs the wandb package: `pip install wandb`, or remove trainer.logger to log to CSV"
)
WANDB_NO_LOGIN = (
    "trainer.logger: W&B is not logged in: run `wandb login` (or set WANDB_API_KEY), or log offline with "
    "`offline: true` in the WandbLogger's init_args (or WANDB_MODE=offline) and `wandb sync` later"
)


# --- run identity --------------------------------------------------------------------------------------------


def git_state(cwd: str | Path | None = None) -> dict[str, Any] | None:
    """`{"commit", "dirty"}` of the git repository holding `cwd` (tracked files only), or None outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    # Untracked files (run directories, caches) do not change what the code does.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def task_name(data_class_path: str | None) -> str | None:
    """`ttc_lightning.data.PrimeVulPatchDataModule` -> "patch"."""
    if not data_class_path:
        return None
    name = data_class_path.rpartition(".")[2].removeprefix("PrimeVul").removesuffix("DataModule")
    return name.lower() or None


def default_run_name(task: str | None, model_name_or_path: str | None, commit: str | None) -> str:
    """`<task>-<model>-<short commit>` without the unknown parts, e.g. "patch-Qwen2.5-Coder-7B-1a2b3c4"."""
    model = Path(model_name_or_path.rstrip("/")).name if model_name_or_path else None
    parts = [task, model, commit[:7] if commit else None]
    return "-".join(p for p in parts if p) or "ttc"


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None when it is not installed; torch's with its build (`2.14.1+cu130`,
    `2.13.0+cpu`), which its package metadata leaves out."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if "torch" in versions:
        versions["torch"] = torch.__version__
    return versions


def run_info(trainer: L.Trainer) -> dict[str, Any]:
    """What reproducing the run needs beyond its config: code version, packages, precision, hardware, seed."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in trainer.device_ids]
    else:
        names = [platform.processor() or platform.machine()] * len(trainer.device_ids)
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything, which the CLI calls before building anything
    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), **package_versions()},
        "precision": str(trainer.precision),
        "accelerator": device.type,
        "devices": names,
        "devices_per_node": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "world_size": trainer.world_size,
        "seed": int(seed) if seed is not None else None,
    }
    git = git_state()
    if git is not None:
        info["git"] = git
    return info


# --- W&B set-up ----------------------------------------------------------------------------------------------


def has_wandb_credentials() -> bool:
    """An API key in the environment or in .netrc for the W&B host (where `wandb login` puts it). No network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_entries(logger: Any) -> list[Any]:
    entries = logger if isinstance(logger, list) else [logger]
    return [e for e in entries if class_path_of(e).endswith("WandbLogger")]


def class_path_of(entry: Any) -> str:
    """The `class_path` of a config entry (a dict or Namespace), "" for anything else."""
    getter = getattr(entry, "get", None)
    return str(getter("class_path") or "") if callable(getter) else ""


def prepare_wandb(config: Any) -> None:
    """Check that each WandbLogger in `config.trainer.logger` can start, and fill in its defaults (`wandb_defaults`).

    Raises `TTCError` when wandb is not installed, or when it would need a login that is not there (no API key and
    not offline). Safe to call twice.
    """
    entries = _wandb_entries(config.trainer.logger)
    if not entries:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TTCError(WANDB_MISSING) from None
    for entry in entries:
        args = entry.get("init_args") or {}
        offline = args.get("offline") or args.get("mode") in OFFLINE_MODES
        if not offline and os.environ.get("WANDB_MODE") not in OFFLINE_MODES and not has_wandb_credentials():
            raise TTCError(WANDB_NO_LOGIN)
    wandb_defaults(config)


def wandb_defaults(config: Any) -> None:
    """Each WandbLogger's unset run name becomes `default_run_name(...)`, and its files (W&B's, `run_info.json`,
    `rollouts.jsonl`) go to the run directory (`trainer.default_root_dir`) instead of the current directory. Checks
    nothing: `--print_config` shows these values too. Safe to call twice."""
    for entry in _wandb_entries(config.trainer.logger):
        if entry.get("init_args") is None:
            entry["init_args"] = {}
        args = entry["init_args"]
        if not args.get("name"):
            model = config.get("model")
            data = config.get("data")
            model_path = (model.get("init_args") or {}).get("model_name_or_path") if model else None
            commit = (git_state() or {}).get("commit")
            args["name"] = default_run_name(task_name(class_path_of(data)), model_path, commit)
        if args.get("save_dir") in (None, ".") and not args.get("dir"):
            args["save_dir"] = config.trainer.default_root_dir


def quiet_wandb_start(loggers: Sequence[Any]) -> None:
    """Before each `WandbLogger` starts its run: Lightning passes `anonymous=None`, which wandb warns about whatever
    the value, so an unset one is left out; and the logger's directory is created, since wandb looks for the git
    repository from there and warns when the directory does not exist yet."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        init = logger._wandb_init
        if init.get("anonymous") is None:
            init.pop("anonymous", None)
        if init.get("dir"):
            Path(init["dir"]).mkdir(parents=True, exist_ok=True)


def name_metrics_file(loggers: Sequence[Any]) -> None:
    """Each CSV logger's failed write of `metrics.csv` names the file (`naming_file`): Lightning writes it after
    every step, where a full disk says only `[Errno 28] No space left on device`. Wrapped on the instance, so the
    config keeps naming Lightning's own class."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.save = _named_save(logger, logger.save)


def _named_save(logger: Any, save: Any) -> Any:
    def named_save() -> None:
        with naming_file(Path(logger.log_dir) / "metrics.csv"):
            save()

    return named_save


# --- tables --------------------------------------------------------------------------------------------------


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


def completion_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A step's rollout records (`rollouts.jsonl`'s rows) -> table columns and rows, one reward column per function."""
    if not records:
        return [], []
    functions = list(records[0]["rewards"])
    with_id = any("id" in r for r in records)
    trained = ["trained"] if "trained" in records[0] else []  # dynamic sampling: was the completion trained on
    columns = ["step", "prompt_index", *(["id"] if with_id else []), "prompt", "completion", "reward", "advantage"]
    columns += [*trained, *(f"reward/{name}" for name in functions)]
    rows = [
        [
            r["step"],
            r["prompt_index"],
            *([r.get("id")] if with_id else []),
            _prompt_text(r["prompt"]),
            r["completion"],
            r["reward"],
            r["advantage"],
            *(r[key] for key in trained),
            *(r["rewards"][name] for name in functions),
        ]
        for r in records
    ]
    return columns, rows


# --- progress lines ------------------------------------------------------------------------------------------


def finish_wandb() -> None:
    """End the W&B run, if the command started one, while its streams are still ttc's: left to the interpreter's exit,
    wandb prints its closing lines (the `wandb sync` command of an offline run among them) to stdout with colour
    codes, which a piped log keeps."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class SaveConfigToWandb(SaveConfigCallback):
    """Saves config.yaml as Lightning does, and also puts the resolved config in the W&B run's config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in loggers:
            logger.experiment.config.update({"config": config}, allow_val_change=True)


class RunInfo(L.Callback):
    """Writes `run_info.json` to the run directory and adds it to every logger's hyperparameters (rank zero)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir is a collective call
        if not trainer.is_global_zero:
            return
        info = run_info(trainer)
        path = Path(log_dir) / "run_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with naming_file(path):
            path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for logger in trainer.loggers:
            logger.log_hyperparams({"run_info": info})


class CompletionsTable(L.Callback):
    """Every `every_n_steps` rollouts, logs its prompts, completions, rewards and advantages as a W&B table.

    Reads the step's outputs (this rank's completions); does nothing unless a logger is a `WandbLogger`.
    The same rows are in `rollouts.jsonl` whatever the logger.
    """

    def __init__(self, every_n_steps: int = 10, key: str = "completions") -> None:
        if every_n_steps < 1:
            raise TTCError(f"CompletionsTable.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.key = key

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        records = outputs.get("rollout", []) if isinstance(outputs, Mapping) else []
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not records or not loggers or records[0]["step"] % self.every_n_steps:
            return
        columns, rows = completion_table(records)
        for logger in loggers:
            logger.log_table(key=self.key, columns=columns, data=rows, step=trainer.global_step)
