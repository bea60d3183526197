"""`ttc generate`: a trained policy on one function, from a file or standard input, for either task: its reasoning,
its answer (a label) or patch, and for a patch the function as patched, shown as a unified diff.

    ttc generate --ckpt_path runs/patch --file func.c --cwe CWE-787 --cve_desc "A heap overflow in ..."
    cat func.c | ttc generate --ckpt_path runs/classify/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

import torch

from ttc_lightning.data.base import check_template, prompt_text
from ttc_lightning.data.tasks import BINARY_LABELS, classification_prompt, patch_prompt
from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.answers import parse_answer, split_think_answer
from ttc_lightning.rewards.patch import apply_completion

TASKS = {"PrimeVulPatchDataModule": "patch", "PrimeVulClassificationDataModule": "classify"}


def checkpoint_task(checkpoint: dict[str, Any]) -> str | None:
    """ "patch" or "classify" from the task the checkpoint was trained on (None for another data module)."""
    task = (checkpoint["ttc"].get("task") or "").split(" ")[0]
    return TASKS.get(task)


def build_prompt(task: str, func: str, args: argparse.Namespace) -> list[dict[str, str]]:
    """The chat messages the task's data module would build for `func`, with the prompt options given."""
    system = prompt_text("system_prompt", args.system_prompt)
    template = prompt_text("user_template", args.user_template)
    if task == "patch":
        if template is not None:
            check_template(template, ("func", "cwe", "cve_desc"))
        return patch_prompt(func, args.cwe or "", args.cve_desc, system, template)
    if template is not None:
        check_template(template, ("func",))
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else list(BINARY_LABELS)
    return classification_prompt(func, labels, system, template)


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
    from ttc_lightning.run.export import load_ttc_checkpoint, rebuild_module

    func = sys.stdin.read() if args.file == "-" else _read(args.file)
    if not func.strip():
        raise TTCError(f"--file {args.file}: no function (it is empty)")
    checkpoint = load_ttc_checkpoint(args.ckpt_path, "generating with")
    task = args.task or checkpoint_task(checkpoint)
    if task is None:
        raise TTCError(
            f"--task: the checkpoint was trained on {checkpoint['ttc'].get('task')!r}, not a PrimeVul task; "
            "say --task patch or --task classify"
        )
    prompt = build_prompt(task, func, args)
    module = rebuild_module(checkpoint)
    if torch.cuda.is_available():
        module.policy.cuda()
    max_new_tokens = args.max_new_tokens or module.hparams.max_new_tokens
    samples = module.generate([prompt], num_samples=1, temperature=args.temperature, max_new_tokens=max_new_tokens)
    return report(task, func, samples.texts[0])


def _read(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()  # noqa: SIM115
    except (OSError, UnicodeDecodeError) as e:
        raise TTCError(f"--file {path}: cannot read it ({e})") from None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ttc generate", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of ttc fit, or a run directory (its newest)")
    parser.add_argument("--file", default="-", help="the C/C++ function; - (the default) reads standard input")
    parser.add_argument("--task", choices=["patch", "classify"], help="default: the task the checkpoint trained on")
    parser.add_argument("--cwe", help="patch: the weakness, e.g. CWE-787")
    parser.add_argument("--cve_desc", help="patch: the vulnerability's description")
    parser.add_argument("--labels", help="classify: the allowed labels, comma-separated (default: vulnerable,benign)")
    parser.add_argument("--system_prompt", help="as data.system_prompt in training (text or a file)")
    parser.add_argument("--user_template", help="as data.user_template in training (text or a file)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    parser.add_argument("--max_new_tokens", type=int, help="default: the checkpoint's model.max_new_tokens")
    args = parser.parse_args(argv)
    if args.temperature < 0 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        parser.error("--temperature must be >= 0 and --max_new_tokens >= 1")
    try:
        print(generate(args))
    except TTCError as e:
        print(f"ttc: error: {e}", file=sys.stderr)
        sys.exit(1)
