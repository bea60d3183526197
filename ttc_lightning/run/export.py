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

Export builds the policy alone, from the few `hyper_parameters` that shape it (`POLICY_SETTINGS`): not the training
module, whose other settings (reward functions, beta, ...) need not be valid, nor importable, where it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from ttc_lightning.errors import TTCError, error_line, naming_file
from ttc_lightning.model.loading import LoRA, load_policy, load_tokenizer, materialise, quiet_transformers
from ttc_lightning.model.tiny import TINY
from ttc_lightning.run.checkpoints import (
    REFERENCE_PREFIX,
    base_fingerprint,
    check_complete,
    fingerprint_difference,
    unreadable,
)
from ttc_lightning.run.directory import RunDir

log = logging.getLogger("ttc")

BASE_DIR = "base_model"
# Files that mark a directory as a previous export, so `--overwrite` never empties an unrelated directory.
EXPORT_MARKERS = ("config.json", "adapter_config.json")
# The checkpoint's state_dict is the LightningModule's: the policy's weights are under `policy.`.
POLICY_PREFIX = "policy."
# The hyper_parameters the policy is built from, with GRPOModule's defaults; model_name_or_path has none here.
POLICY_SETTINGS: dict[str, Any] = {"lora": None, "dtype": "auto", "load_in_4bit": False}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_file(ckpt_path: str | Path, doing: str = "exporting") -> Path:
    """The checkpoint `ckpt_path` names: a file as it is, a run directory's newest (as `--ckpt_path last` means,
    which the `doing` line names)."""
    path = Path(ckpt_path)
    if path.is_dir():
        newest = RunDir(path, path / "checkpoints").last()
        if newest is None:
            raise TTCError(f"--ckpt_path: {path} is a directory without last.ckpt or last-interrupted.ckpt")
        print(f"ttc: {doing} {newest}, the newest checkpoint of {path}", file=sys.stderr)
        path = newest
    return path


def load_ttc_checkpoint(ckpt_path: str | Path, doing: str = "exporting") -> dict[str, Any]:
    """Read a checkpoint written by `ttc fit` (or a run directory's newest: `checkpoint_file`); `TTCError` when it
    is missing or not a ttc checkpoint."""
    path = checkpoint_file(ckpt_path, doing)
    if not path.is_file():
        raise TTCError(f"--ckpt_path: {path} does not exist")
    try:
        # Not weights-only: hyper_parameters may hold config objects. Only load checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise unreadable(path, e) from None
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


@dataclass
class TrainedPolicy:
    """A checkpoint's policy with its trained weights (a peft model under LoRA), and what an export names it by."""

    model: torch.nn.Module
    tokenizer: Any
    model_name_or_path: str
    """The base as the run named it: a Hub id, a local directory or "tiny"."""
    model_path: str
    """Where the base was loaded from ("tiny": a temporary directory holding it)."""
    lora: bool
    load_in_4bit: bool


def policy_settings(checkpoint: dict[str, Any], path: Path) -> tuple[str, LoRA | None, str, bool]:
    """(model_name_or_path, lora, dtype, load_in_4bit) from the checkpoint's hyper_parameters, checked; nothing
    else there is read."""
    hp = checkpoint["hyper_parameters"]
    if not isinstance(hp, Mapping):
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters is a {type(hp).__name__}, not a mapping")
    name = hp.get("model_name_or_path")
    if not isinstance(name, str) or not name:
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters.model_name_or_path is {name!r}, not a model name")
    lora, dtype, load_in_4bit = (hp.get(key, default) for key, default in POLICY_SETTINGS.items())
    if isinstance(lora, Mapping):
        try:
            lora = LoRA(**lora)
        except TypeError as e:
            raise TTCError(f"--ckpt_path: {path}: hyper_parameters.lora is not LoRA settings ({e})") from None
    if lora is not None and not isinstance(lora, LoRA):
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters.lora is {lora!r}, not LoRA settings nor null")
    if dtype not in DTYPES:
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters.dtype is {dtype!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(load_in_4bit, bool):
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters.load_in_4bit is {load_in_4bit!r}, not true or false")
    trained_lora = checkpoint["ttc"].get("lora")
    if trained_lora is not None and bool(trained_lora) != (lora is not None):
        weights = "LoRA adapters" if trained_lora else "a fully fine-tuned model"
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters.lora is {lora!r}, but its weights are {weights}")
    return name, lora, dtype, load_in_4bit


def load_trained_policy(checkpoint: dict[str, Any], path: Path) -> TrainedPolicy:
    """The checkpoint's policy: the base from its model_name_or_path (unquantised, on the CPU), its LoRA adapters
    if any, and the trained weights loaded into it. No reference model, no reward, no training module."""
    name, lora, dtype, load_in_4bit = policy_settings(checkpoint, path)
    weights = policy_weights(checkpoint, path)  # before the base loads: a damaged state_dict fails at once
    try:
        model_path = materialise(name)
        tokenizer = load_tokenizer(model_path, name)
        policy = load_policy(
            model_path,
            name,
            tokenizer,
            dtype=dtype,  # "auto" chooses by whether this machine has a GPU (`weights_dtype`)
            lora=lora,
            load_in_4bit=False,  # the adapter is the same, and merging needs unquantised weights
            gradient_checkpointing=False,
            reference=False,
            fuse=False,  # peft's own layers: what save_pretrained and merge_and_unload expect
            cuda=torch.cuda.is_available(),
        )
    except TTCError as e:  # model.model_name_or_path / model.lora.target_modules, from the checkpoint's settings
        raise TTCError(f"--ckpt_path: {path}: hyper_parameters: {' '.join(str(e).split())}") from None
    check_base(checkpoint, path, name, policy.model)
    load_weights(policy.model, weights, lora is not None, path)
    return TrainedPolicy(policy.model.eval(), tokenizer, name, model_path, lora is not None, load_in_4bit)


def policy_weights(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint's weights under the policy's own names (`policy.` taken off; a reference never counts)."""
    weights = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(REFERENCE_PREFIX):
            continue
        if not key.startswith(POLICY_PREFIX):
            raise TTCError(f"--ckpt_path: {path}: state_dict holds {key!r}, not a policy weight ({POLICY_PREFIX}*)")
        weights[key.removeprefix(POLICY_PREFIX)] = value
    return weights


def check_base(checkpoint: dict[str, Any], path: Path, name: str, model: torch.nn.Module) -> None:
    """The base loaded from model_name_or_path must be the one the run trained on (its fingerprint): an adapter or
    a fine-tune exported on another model would be wrong without a word."""
    saved = checkpoint["ttc"].get("base_fingerprint")
    if saved is None:
        log.warning(
            "%s records no fingerprint of its base model (%s; written by an earlier ttc): not checked against the "
            "model loaded from hyper_parameters.model_name_or_path",
            path,
            name,
        )
        return
    difference = fingerprint_difference(saved, base_fingerprint(model))
    if difference is not None:
        raise TTCError(
            f"--ckpt_path: {path}: hyper_parameters.model_name_or_path: the run trained on base model {name!r}, and "
            f"the model loaded from it now differs: {difference}; export needs the base the run trained on"
        )


def load_weights(model: torch.nn.Module, weights: dict[str, Any], lora: bool, path: Path) -> None:
    """The trained weights into `model`: under LoRA every adapter weight and nothing else (the base is the one
    loaded), otherwise every weight of the model; same names, same shapes."""
    current = model.state_dict()
    expected = {n for n, p in model.named_parameters() if p.requires_grad} if lora else set(current)
    what = "adapter weights" if lora else "weights"
    unknown, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
    if unknown:
        raise TTCError(
            f"--ckpt_path: {path}: state_dict: {len(unknown)} weights are not {what} of the policy built from "
            f"hyper_parameters (model_name_or_path, lora) (first: {POLICY_PREFIX}{unknown[0]})"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise TTCError(
                f"--ckpt_path: {path}: state_dict: {POLICY_PREFIX}{key} has shape {list(value.shape)}, but "
                f"{list(current[key].shape)} in the policy built from hyper_parameters (model_name_or_path, lora)"
            )
    if missing:
        raise TTCError(
            f"--ckpt_path: {path}: state_dict lacks {len(missing)} {what} of the policy built from hyper_parameters "
            f"(model_name_or_path, lora) (first: {POLICY_PREFIX}{missing[0]})"
        )
    model.load_state_dict(weights, strict=not lora)


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
    path = checkpoint_file(ckpt_path)
    checkpoint = load_ttc_checkpoint(path)
    final = check_output_dir(output_dir, overwrite)
    policy = load_trained_policy(checkpoint, path)
    with replaced_when_done(final) as out, naming_file(final):  # not the staging directory beside it
        write_export(policy, out, final, merge)
    if push_to_hub:
        # Uploads the written directory; needs `hf auth login` (or HF_TOKEN) and network.
        upload(final, push_to_hub)
    return final


def write_export(trained: TrainedPolicy, out: Path, final: Path, merge: bool) -> None:
    """The policy (adapter or merged model) and its tokenizer, written to `out`, which becomes `final` (what an
    adapter's base path names)."""
    policy, tokenizer, name, lora = trained.model, trained.tokenizer, trained.model_name_or_path, trained.lora
    if merge and not lora:
        # Already one model, which is what --merge asks for: say so and write it.
        print("ttc: note: --merge: the checkpoint is a full fine-tune, it has no adapter to merge", file=sys.stderr)
    elif merge:
        if trained.load_in_4bit:
            # The adapter was trained against the 4-bit rounding of the base; the export rebuilds the base unquantised.
            print(
                "ttc: note: --merge: the run trained its adapter over 4-bit weights; it is merged into the unquantised "
                f"base ({name}), whose outputs differ from the trained policy's by the 4-bit rounding",
                file=sys.stderr,
            )
        policy = policy.merge_and_unload()
    elif lora:
        if trained.load_in_4bit:
            print(
                "ttc: note: the run trained its adapter over 4-bit weights; load it over the same 4-bit base "
                "(BitsAndBytesConfig nf4, double quantisation) for the outputs it was trained on",
                file=sys.stderr,
            )
        if name == TINY:
            # The directory the base was loaded from: the exact weights the adapter was trained on.
            shutil.copytree(trained.model_path, out / BASE_DIR)
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


class CommandParser(argparse.ArgumentParser):
    """The parser of `ttc export` and `ttc generate`: no abbreviated options, and one line and status 2 for a command
    line that does not parse, with a suggestion for a mistyped option."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, with an option it does not know reported first: before a required option that is "missing"
        only because it was mistyped (`--output-dir` for `--output_dir`)."""
        given = sys.argv[1:] if args is None else list(args)
        known = self._option_names()
        for arg in given:
            if arg == "--":
                break
            option = arg.split("=")[0]
            if option.startswith("--") and option not in known:
                self.error(f"unrecognized arguments: {arg}")
        return super().parse_args(given, namespace)

    def error(self, message: str) -> NoReturn:
        unknown = re.search(r"unrecognized arguments: (\S+)", message)
        choice = re.search(r"argument ([-\w/]+): invalid choice: '(.*?)' \(choose from (.*)\)", message)
        commands = {a.dest: sorted(a.choices) for a in self._actions if isinstance(a, argparse._SubParsersAction)}
        required = re.fullmatch(r"the following arguments are required: (\w+)", message)
        if unknown:
            option = unknown.group(1).split("=")[0]
            known = sorted(self._option_names())
            close = (
                difflib.get_close_matches(option, known, n=1, cutoff=0.75)
                or [
                    name
                    for name in known
                    if name.startswith(option)  # an abbreviation, which argparse here refuses
                ][:1]
            )
            message = f"unknown option {option}" + (f"; did you mean {close[0]}?" if close else "")
        elif choice:
            allowed = [c.strip(" '") for c in choice.group(3).split(",")]
            close = difflib.get_close_matches(choice.group(2), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"give one of {', '.join(allowed)}"
            what = "subcommand" if choice.group(1) in commands else choice.group(1)
            message = f"{self.prog}: unknown {what} {choice.group(2)!r}; {hint}"
        elif required and required.group(1) in commands:
            message = f"{self.prog}: give a subcommand: {', '.join(commands[required.group(1)])}"
        print(error_line(message), file=sys.stderr)
        sys.exit(2)

    def _option_names(self) -> set[str]:
        """The options of this parser and of its subcommands'."""
        names = {name for action in self._actions for name in action.option_strings}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names |= sub._option_names() if isinstance(sub, CommandParser) else set()
        return names


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="ttc export",
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
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
    print(f"ttc: exported {args.ckpt_path} to {out}", file=sys.stderr)
