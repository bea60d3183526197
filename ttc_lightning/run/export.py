"""`ttc export`: a ttc checkpoint -> a Hugging Face model directory that loads without ttc.

    ttc export --ckpt_path runs/patch/checkpoints/last.ckpt --output_dir exported [--merge] [--overwrite]
        [--push_to_hub USER/REPO]

Full fine-tuning writes the model (`--merge` has nothing to merge and changes nothing). LoRA writes the adapter
(`peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`), or with `--merge` the base model with the adapter merged in
(`transformers.AutoModelForCausalLM.from_pretrained(DIR)`). The tokenizer and its chat template are written either way.

The adapter's `base_model_name_or_path` is the training base: a Hub id as it is, a local directory as an absolute
path. peft loads it with `from_pretrained(base_model_name_or_path)`, which resolves a relative path against the
current directory, not against DIR, so only an absolute path still finds the base after DIR is moved.
The built-in "tiny" model only exists while ttc runs, so its adapter export also holds the base model in
`DIR/base_model`, and `base_model_name_or_path` is that directory's absolute path; once DIR is moved, load it with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR / "base_model"), DIR)`.
The model card (`DIR/README.md`, written by peft) names the base by its Hub id, its directory's name, or "tiny": it is
meant to be published, and the Hub refuses a local path as `base_model`.

A QLoRA checkpoint is exported on the base model in its `dtype` without 4-bit quantisation: the adapter is the same,
and merging needs unquantised weights.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ttc_lightning.errors import TTCError
from ttc_lightning.model.loading import quiet_transformers
from ttc_lightning.model.tiny import TINY
from ttc_lightning.run.checkpoints import check_complete
from ttc_lightning.run.directory import RunDir

BASE_DIR = "base_model"
# Files that mark a directory as a previous export, so `--overwrite` never empties an unrelated directory.
EXPORT_MARKERS = ("config.json", "adapter_config.json")


def load_ttc_checkpoint(ckpt_path: str | Path, doing: str = "exporting") -> dict[str, Any]:
    """Read a checkpoint written by `ttc fit` (a run directory: its newest, as `--ckpt_path last` means, which the
    `doing` line names); `TTCError` when it is missing or not a ttc checkpoint."""
    path = Path(ckpt_path)
    if path.is_dir():
        newest = RunDir(path, path / "checkpoints").last()
        if newest is None:
            raise TTCError(f"--ckpt_path: {path} is a directory without last.ckpt or last-interrupted.ckpt")
        print(f"ttc: {doing} {newest}, the newest checkpoint of {path}", file=sys.stderr)
        path = newest
    if not path.is_file():
        raise TTCError(f"--ckpt_path: {path} does not exist")
    try:
        # Not weights-only: hyper_parameters may hold config objects. Only load checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TTCError(f"--ckpt_path: {path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "ttc" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise TTCError(f"--ckpt_path: {path} is not a ttc checkpoint (it has no 'ttc' section)")
    check_complete(checkpoint, path)
    return checkpoint


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """The output directory; an error if it holds anything, unless `overwrite` and it is a previous export."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TTCError(f"--output_dir: {path} is a file")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise TTCError(f"--output_dir: {path} is not empty; choose another directory or pass --overwrite")
        if not any((path / name).is_file() for name in EXPORT_MARKERS):
            raise TTCError(
                f"--output_dir: {path} is not empty and holds no exported model; --overwrite only replaces a "
                "previous export"
            )
    return path


def umask_modes(root: Path) -> None:
    """Give `root` and everything in it the modes the user's umask gives new files (0755/0644 under 022): the staging
    directory comes from `mkdtemp`, which makes it 0700, so colleagues could not read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [root, *root.rglob("*")]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def replaced_when_done(path: Path) -> Iterator[Path]:
    """A new directory beside `path` to write into; once the block succeeds it replaces `path` (a previous export
    is removed whole: stale files of another form, an adapter beside a merged model, would change what loaders
    pick up). If the block fails, `path` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    umask_modes(staging)
    if path.exists():
        old = staging.with_name(staging.name + ".old")
        path.rename(old)
        staging.rename(path)
        shutil.rmtree(old)
    else:
        staging.rename(path)


def rebuild_module(checkpoint: dict[str, Any]) -> Any:
    """`GRPOModule` from the checkpoint's hyperparameters, with its trained weights loaded as Lightning would."""
    from ttc_lightning.module import GRPOModule

    accepted = inspect.signature(GRPOModule.__init__).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    # Export needs neither the reference model (beta) nor the training-only memory savings, nor the run's reward
    # functions (whose modules need not be importable where the export runs).
    hparams.update(beta=0.0, load_in_4bit=False, gradient_checkpointing=False)
    hparams.update(rewards=["ttc_lightning.rewards.format_reward"], reward_weights=None, overlong_buffer=None)
    module = GRPOModule(**hparams)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
    return module.eval()


def base_model_reference(model_name_or_path: str) -> str:
    """What an adapter records as its base: a Hub id as it is, an existing local directory as an absolute path."""
    path = Path(model_name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else model_name_or_path


def base_model_card_name(model_name_or_path: str) -> str:
    """How the model card names the base: a Hub id as it is, a local directory by its own name, "tiny" as "tiny"."""
    path = Path(model_name_or_path).expanduser()
    return path.resolve().name if model_name_or_path != TINY and path.is_dir() else model_name_or_path


def export(
    ckpt_path: str | Path,
    output_dir: str | Path,
    merge: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
) -> Path:
    """Write the checkpoint's policy and tokenizer to `output_dir` (see the module docstring); returns it."""
    checkpoint = load_ttc_checkpoint(ckpt_path)
    final = check_output_dir(output_dir, overwrite)
    module = rebuild_module(checkpoint)
    with replaced_when_done(final) as out:
        write_export(module, checkpoint, out, final, merge)
    if push_to_hub:
        # Uploads the written directory; needs `hf auth login` (or HF_TOKEN) and network.
        upload(final, push_to_hub)
    return final


def write_export(module: Any, checkpoint: dict[str, Any], out: Path, final: Path, merge: bool) -> None:
    """The policy (adapter or merged model) and tokenizer of a rebuilt module, written to `out`, which becomes
    `final` (what an adapter's base path names)."""
    policy, tokenizer = module.policy, module.tokenizer
    name, lora = checkpoint["ttc"]["model_name_or_path"], checkpoint["ttc"]["lora"]
    if merge and not lora:
        # Already one model, which is what --merge asks for: say so and write it.
        print("ttc: note: --merge: the checkpoint is a full fine-tune, it has no adapter to merge", file=sys.stderr)
    elif merge:
        if checkpoint["hyper_parameters"].get("load_in_4bit"):
            # The adapter was trained against the 4-bit rounding of the base; the export rebuilds the base unquantised.
            print(
                "ttc: note: --merge: the run trained its adapter over 4-bit weights; it is merged into the unquantised "
                f"base ({name}), whose outputs differ from the trained policy's by the 4-bit rounding",
                file=sys.stderr,
            )
        policy = policy.merge_and_unload()
    elif lora:
        if checkpoint["hyper_parameters"].get("load_in_4bit"):
            print(
                "ttc: note: the run trained its adapter over 4-bit weights; load it over the same 4-bit base "
                "(BitsAndBytesConfig nf4, double quantisation) for the outputs it was trained on",
                file=sys.stderr,
            )
        if name == TINY:
            # The directory the module loaded the base from: the exact weights the adapter was trained on.
            shutil.copytree(module.model_path, out / BASE_DIR)
            reference = str((final / BASE_DIR).resolve())
        else:
            reference = base_model_reference(name)
        for config in policy.peft_config.values():
            config.base_model_name_or_path = reference
        # peft's model card names the base by the loaded model's name_or_path: for "tiny", a temporary directory.
        base_model = policy.get_base_model()
        base_model.name_or_path = base_model.config.name_or_path = base_model_card_name(name)
    with quiet_transformers():  # no "Writing model shards" bar
        policy.save_pretrained(out)
        tokenizer.save_pretrained(out)


def upload(directory: Path, repo_id: str) -> None:
    """`directory` to the Hub repository `repo_id` (created if needed); a failure is one line that says the export
    itself is kept."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id)
    except Exception as e:
        raise TTCError(
            f"--push_to_hub {repo_id}: the upload failed ({type(e).__name__}: {e}); the export is in {directory}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttc export",
        allow_abbrev=False,  # as `ttc fit`: an option's prefix is a typo, not the option
        description="Write a ttc checkpoint as a Hugging Face model directory (model or LoRA adapter, tokenizer).",
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by `ttc fit`, or its run directory (the newest one)"
    )
    parser.add_argument("--output_dir", required=True, help="directory to write; must be empty or not exist")
    parser.add_argument("--merge", action="store_true", help="LoRA: merge the adapter into the base model")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export in --output_dir")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload to this Hugging Face Hub repository")
    return parser


def main(argv: list[str]) -> None:
    """`ttc export ARGS`: user mistakes print `ttc: error: ...` and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        out = export(args.ckpt_path, args.output_dir, args.merge, args.overwrite, args.push_to_hub)
    except (TTCError, OSError) as e:  # OSError: the file system's (read-only, full); nothing earlier was removed
        print(f"ttc: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"ttc: exported {args.ckpt_path} to {out}", file=sys.stderr)
