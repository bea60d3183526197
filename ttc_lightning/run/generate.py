"""`ttc generate`: a trained policy on one function, from a file or standard input, for either task: its reasoning,
its answer (a label) or patch, and for a patch the function as patched, shown as a unified diff.

    ttc generate --ckpt_path runs/patch --file func.c --cwe CWE-787 --cve_desc "A heap overflow in ..."
    cat func.c | ttc generate --ckpt_path runs/classify/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

import torch

from ttc_lightning.data.base import check_system_prompt, check_template, prompt_hash, prompt_text
from ttc_lightning.data.tasks import BINARY_LABELS, classification_prompt, patch_prompt
from ttc_lightning.errors import TTCError, error_line
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import Policy, eos_token_ids
from ttc_lightning.rewards.answers import parse_answer, split_think_answer
from ttc_lightning.rewards.patch import apply_completion
from ttc_lightning.run.export import CommandParser
from ttc_lightning.sampling.sampler import Sampler

TASKS = {"PrimeVulPatchDataModule": "patch", "PrimeVulClassificationDataModule": "classify"}


def checkpoint_task(checkpoint: dict[str, Any]) -> str | None:
    """ "patch" or "classify" from the task the checkpoint was trained on (None for another data module)."""
    task = (checkpoint["ttc"].get("task") or "").split(" ")[0]
    return TASKS.get(task)


def prompt_options(task: str, args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The texts of --system_prompt and --user_template, checked as the task's data module checks them."""
    for option, own in (("cwe", "patch"), ("cve_desc", "patch"), ("labels", "classify")):
        if getattr(args, option) is not None and task != own:
            raise TTCError(f"--{option} is for --task {own}; this is --task {task}")
    try:
        system = prompt_text("system_prompt", args.system_prompt)
        template = prompt_text("user_template", args.user_template)
        if template is not None:
            check_template(template, ("func", "cwe", "cve_desc") if task == "patch" else ("func",))
        if system is not None:
            check_system_prompt(system, () if task == "patch" else ("labels",))
    except TTCError as e:  # the data module's wording names data.<option>; here it is a command-line option
        raise TTCError(re.sub(r"\bdata\.(system_prompt|user_template)", r"--\1", str(e))) from None
    return system, template


def build_prompt(
    task: str, func: str, args: argparse.Namespace, system: str | None, template: str | None
) -> list[dict[str, str]]:
    """The chat messages the task's data module would build for `func`, with the prompt options given."""
    if task == "patch":
        return patch_prompt(func, args.cwe or "", args.cve_desc, system, template)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else list(BINARY_LABELS)
    return classification_prompt(func, labels, system, template)


def check_prompts(checkpoint: dict[str, Any], system: str | None, template: str | None) -> None:
    """The prompt options must be those the checkpoint trained with (its task records a hash of them): another
    prompt asks the policy something it was not trained on."""
    saved = (checkpoint["ttc"].get("task") or "").partition(" prompts=")[2] or None
    if prompt_hash(system, template) != saved:
        trained = "data.system_prompt/data.user_template of its own" if saved else "the task's own prompts"
        raise TTCError(
            f"--system_prompt/--user_template: the checkpoint was trained with {trained}, and these differ; give "
            "the run's data.system_prompt and data.user_template (or neither, for the task's own)"
        )


def report(task: str, func: str, completion: str) -> str:
    """What the policy wrote, in parts: reasoning, answer, and the label or the patched function's diff."""
    parts = split_think_answer(completion)
    if parts is None:
        shown = completion if completion.strip() else f"{completion!r} (whitespace only)"
        return f"the completion is malformed (expected one <think>...</think> then one <answer>...</answer>):\n{shown}"
    think, answer = parts
    lines = [f"reasoning:\n{think}", f"answer:\n{answer}"]
    if task == "classify":
        label = parse_answer(completion)
        lines.append(f"label: {label}" if label else "label: none (the answer holds no valid label)")
    else:
        patched, why = apply_completion(completion, func)
        if patched is None:
            lines.append(f"patch: does not apply: {why}")
        else:
            diff = difflib.unified_diff(
                func.splitlines(keepends=True), patched.splitlines(keepends=True), "function", "patched"
            )
            lines.append("patch:\n" + ("".join(diff).rstrip("\n") or "(no change)"))
    return "\n\n".join(lines)


def generate(args: argparse.Namespace) -> str:
    from ttc_lightning.data.common import prompt_fits, token_floor
    from ttc_lightning.model.loading import prompt_limit
    from ttc_lightning.run.export import checkpoint_file, load_trained_policy, load_ttc_checkpoint

    func = sys.stdin.read() if args.file == "-" else _read(args.file)
    if not func.strip():
        raise TTCError(f"--file {args.file}: no function (it is empty)")
    path = checkpoint_file(args.ckpt_path, "generating with")
    checkpoint = load_ttc_checkpoint(path)
    task = args.task or checkpoint_task(checkpoint)
    if task is None:
        raise TTCError(
            f"--task: the checkpoint was trained on {checkpoint['ttc'].get('task')!r}, not a PrimeVul task; "
            "say --task patch or --task classify"
        )
    system, template = prompt_options(task, args)
    check_prompts(checkpoint, system, template)
    prompt = build_prompt(task, func, args, system, template)
    trained = load_trained_policy(checkpoint, path)
    hp = checkpoint["hyper_parameters"]
    limit = prompt_limit(trained.model_path, trained.model_name_or_path, 1)  # the context, less one new token
    max_new_tokens = args.max_new_tokens or hp.get("max_new_tokens", 128)
    if limit is not None and max_new_tokens > limit:
        raise TTCError(f"--max_new_tokens {max_new_tokens}: the model's context holds {limit + 1} tokens in all")
    room = None if limit is None else limit + 1 - max_new_tokens
    if room is not None and not prompt_fits(trained.tokenizer, prompt, room, token_floor(trained.tokenizer)):
        raise TTCError(
            f"--file {args.file}: the prompt is longer than the {room} tokens the model's context of {limit + 1} "
            f"leaves beside --max_new_tokens {max_new_tokens}: give a shorter function"
        )
    policy = Policy(trained.model, None, trained.tokenizer, eos_token_ids(trained.tokenizer, trained.model))
    top = {"top_p": hp.get("top_p", 1.0), "top_k": hp.get("top_k", 0)}  # the run's sampling settings
    if torch.cuda.is_available():
        trained.model.cuda()
    levers = {k: v for k, v in (hp.get("levers") or {}).items() if k in Levers.__dataclass_fields__}
    sampler = Sampler(policy, Levers(**levers), lora=trained.lora, quantized=False, **top)
    samples = sampler.sample([prompt], num_samples=1, temperature=args.temperature, max_new_tokens=max_new_tokens)
    return report(task, func, samples.texts[0])


def _read(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()  # noqa: SIM115
    except (OSError, UnicodeDecodeError) as e:
        raise TTCError(f"--file {path}: cannot read it ({e})") from None


def at_least(least: float, kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
        return value

    return parse


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="ttc generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of ttc fit, or a run directory (its newest)")
    parser.add_argument("--file", default="-", help="the C/C++ function; - (the default) reads standard input")
    parser.add_argument("--task", choices=["patch", "classify"], help="default: the task the checkpoint trained on")
    parser.add_argument("--cwe", help="patch: the weakness, e.g. CWE-787")
    parser.add_argument("--cve_desc", help="patch: the vulnerability's description")
    parser.add_argument("--labels", help="classify: the allowed labels, comma-separated (default: vulnerable,benign)")
    parser.add_argument("--system_prompt", help="the run's data.system_prompt (text or a file), if it set one")
    parser.add_argument("--user_template", help="the run's data.user_template (text or a file), if it set one")
    parser.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0 (the default): greedy")
    parser.add_argument(
        "--max_new_tokens", type=at_least(1, int), help="default: the checkpoint's model.max_new_tokens"
    )
    args = parser.parse_args(argv)
    try:
        print(generate(args))
    except TTCError as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
