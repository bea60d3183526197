"""ttc's words in `ttc SUBCOMMAND --help` where Lightning's docstrings speak of its own API and defaults: the section
headings (a docstring's first line, cut mid-sentence), the `checkpoint` options whose defaults ttc changes, and
`--ckpt_path`, `--seed_everything` and `--weights_only`."""

from __future__ import annotations

from typing import Any

# Section headings by the first option of the section.
SECTIONS = {
    "trainer": "Lightning's Trainer (trainer.*): devices, precision, limits, logging. ttc's defaults: precision "
    "bf16-mixed on Ampere and newer GPUs, 16-mixed on Pascal to Turing, else 32-true; a metrics row every step; no "
    "validation before training",
    "data.help": "The data module: a PrimeVul task (ttc_lightning.data.PrimeVulPatchDataModule or "
    "PrimeVulClassificationDataModule) or JSON-lines prompts (PromptDataModule); `--data.help CLASS` lists its options",
    "checkpoint": "Checkpoints (checkpoint.*), as ttc writes them: last.ckpt every every_n_train_steps optimizer steps "
    "and at the end of fit, the newest save_top_k of those as step=N.ckpt; besides, best.ckpt at the best validation "
    "and last-interrupted.ckpt when fit stops on Ctrl-C, SIGTERM or an error",
    "ckpt_path": "The checkpoint this command starts from",
}

OPTIONS = {
    "seed_everything": "Seed of every random generator (Python, NumPy, torch), set before the model and data are "
    "built: an int, true for a random one, false for none.",
    "weights_only": "How torch.load reads --ckpt_path: true loads tensors and plain values only (ttc's checkpoints "
    "hold nothing else), false any pickled object, null Lightning's choice.",
    "checkpoint.dirpath": "Where checkpoints go: a directory, or a remote path such as s3://bucket/path. Null: "
    "checkpoints/ in trainer.default_root_dir.",
    "checkpoint.filename": "Name of the periodic checkpoints, with named fields such as {step} (the default, {step}, "
    "writes step=N.ckpt).",
    "checkpoint.monitor": "The logged value that orders the periodic checkpoints for save_top_k: step keeps the "
    "newest. best.ckpt follows the task's headline validation metric whatever this says.",
    "checkpoint.mode": "Which end of `monitor` save_top_k keeps: max or min (max with step: the newest).",
    "checkpoint.save_last": "Write last.ckpt, which --ckpt_path last resumes; link: a symbolic link to the newest "
    "periodic checkpoint instead of a copy, where the file system allows.",
    "checkpoint.save_top_k": "How many periodic step=N.ckpt files to keep, by `monitor`: -1 all, 0 none.",
    "checkpoint.save_weights_only": "true writes checkpoints that cannot resume a run (no optimizer, schedule or "
    "data position): ttc refuses it; `ttc export` writes the weights alone.",
    "checkpoint.every_n_train_steps": "Save every this many optimizer steps (and at the end of fit).",
    "checkpoint.save_on_exception": "Lightning's own checkpoint when fit raises, named by `filename`. ttc writes "
    "last-interrupted.ckpt on Ctrl-C, SIGTERM or an error (under DDP, on SIGTERM) whatever this says.",
    "checkpoint.verbose": "Log each checkpoint Lightning saves.",
    "checkpoint.auto_insert_metric_name": "Write `name=value` for each field of `filename` (step=N.ckpt); false: "
    "the value alone.",
    "checkpoint.every_n_epochs": "Save at the end of every this many epochs instead of by steps: it needs "
    "every_n_train_steps null (ttc refuses both).",
    "checkpoint.train_time_interval": "Save at this wall-time interval instead of by steps: it needs "
    "every_n_train_steps null.",
    "checkpoint.save_on_train_epoch_end": "Lightning's choice of when to check for a save at an epoch's end; ttc "
    "saves by optimizer steps and at the end of fit.",
    "checkpoint.enable_version_counter": "false in ttc: a run directory belongs to one run, so a resumed run writes "
    "last.ckpt again rather than last-v1.ckpt beside it.",
    "trainer.enable_model_summary": "Lightning's table of modules; off in ttc, whose line `policy: N parameters, M "
    "trained` says what matters.",
    "trainer.default_root_dir": "The run directory: checkpoints/, logs/version_N/ and the fit lock. One fit run owns "
    "it (--ckpt_path last resumes it, --overwrite starts it over).",
    "trainer.precision": "Numeric precision. Null (ttc's default): bf16-mixed on Ampere and newer GPUs, 16-mixed on "
    "Pascal to Turing, else 32-true.",
    "trainer.logger": "Loggers: ttc writes metrics.csv (a CSVLogger, put first) whatever else is given, e.g. "
    "lightning.pytorch.loggers.WandbLogger (configs/wandb.yaml); false for none.",
}


def ckpt_path_help(subcommand: str) -> str:
    """What `--ckpt_path` means to `subcommand` in ttc (`run/directory.py`)."""
    which = (
        "a checkpoint file, `last` (the newest of the run's last.ckpt, last-interrupted.ckpt and hpc_ckpt_N.ckpt, in "
        "trainer.default_root_dir) or `best` (its checkpoints/best.ckpt)"
    )
    if subcommand == "fit":
        return (
            f"Resume the run from {which}. With `last` and no checkpoint yet, a new run starts; leave it out to start "
            "a new run."
        )
    return f"The checkpoint of the policy to {subcommand}: {which}. Leave it out to {subcommand} the base model."


def reword(parser: Any, subcommand: str) -> None:
    """Put ttc's headings and option texts into the parser of `subcommand`."""
    for group in parser._action_groups:
        first = next((action.dest for action in group._group_actions), None)
        if first in SECTIONS:
            group.title = SECTIONS[first]
    for action in parser._actions:
        if action.dest == "ckpt_path":
            action.help = ckpt_path_help(subcommand)
        elif action.dest in OPTIONS:
            action.help = OPTIONS[action.dest]
