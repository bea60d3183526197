"""Where one ttc training step spends its time and memory: generate / score / log-probs / backward / optimizer.

    python benchmarks/profile_step.py [--sizes tiny medium] [--steps 3] [--warmup 1] [--max-new-tokens N]
                                      [--without prefill merge decode share fuse cpu] [--lora-dropout P]
                                      [--torch-profile]

Runs `GRPOModule` under `lightning.Trainer` on the settings of `compare_trl.py` and wraps the phases of the step in
wall-clock timers. The phases run one after another, so they add up to the step; the table shows the step whose
total is the median of the steps that had the CPUs to themselves (see `compare_trl.stamp`). The last column is
how much each phase raised the process's peak resident memory over the whole run.

What-ifs turn levers off through their own switches (`ttc_lightning.levers.Levers`): `--without prefill` (`prompt_once`:
in the training passes every completion runs its whole prompt), `merge` (`merge_lora`: sampling with unmerged LoRA
layers), `decode` (`fast_sampler`: sampling through `generate()`, the plain backend), `share` (`share_cache`: each
prompt's cache copied to its rows), `fuse` (`fuse_lora`: peft's LoRA forward), `cpu` (`cpu`: default float32 matmuls
instead of oneDNN's packed ones, copied instead of shared prompt caches' CPU attention kernel, glibc's default of
handing freed memory back to the OS); `--lora-dropout` changes the adapters' dropout (peft applies it to a copy of the
input of every adapted layer). `--torch-profile` runs one more step under torch.profiler and prints its top operators
(that step is left out of the table; the profiler inflates the peak memory reported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compare_trl import (
    BUSY_LIMIT,
    LEARNING_RATE,
    LORA_DROPOUT,
    SAMPLING,
    SEED,
    SIZES,
    Size,
    prepare,
    stamp,
    wait_for_quiet,
)

# --without NAME -> the `Levers` switch it turns off.
LEVERS = {
    "prefill": "prompt_once",
    "merge": "merge_lora",
    "decode": "fast_sampler",
    "share": "share_cache",
    "fuse": "fuse_lora",
    "cpu": "cpu",
}
PHASES = {
    "prompt_sample": "one pass per distinct prompt before sampling (prefill)",
    "generate": "the sampling loop with the KV cache (ttc's decode, or generate() in the plain backend)",
    "rollout_other": "tokenise prompts, merge/unmerge LoRA, EOS masks, decode completions",
    "score": "reward functions",
    "frozen_logps": "old/reference log-probs (num_iterations > 1 or beta > 0), no grad",
    "forward": "policy forward, train mode: each distinct prompt once, then the completions",
    "head": "output head, log-softmax of the chosen tokens and entropy, in chunks (train mode)",
    "loss": "grpo_loss",
    "backward": "manual_backward",
    "optimizer": "gradient clipping + AdamW step",
    "other": "rest of training_step: rows(), logging, Lightning hooks",
}
# Timed calls that contain other timed calls: their own share is what is left once the inner ones are removed.
NESTED = {
    "rollout_other": ("rollout", ["generate", "prompt_sample"]),
    "forward": ("logps", ["head"]),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Timers:
    """Seconds per phase in the current step, and peak-RSS growth per phase over the whole run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.rss_growth: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            rss, started = peak_rss_mib(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.rss_growth[name] += peak_rss_mib() - rss

        return timed

    def wrap_training(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Timed as `name` when gradients are on (the training passes), not timed otherwise."""
        import torch

        timed = self.wrap(name, fn)
        return lambda *args, **kwargs: (timed if torch.is_grad_enabled() else fn)(*args, **kwargs)

    @staticmethod
    def exclusive(values: dict[str, float]) -> dict[str, float]:
        """Per phase, without the time (or memory) of the timed calls nested inside it."""
        out = {name: values.get(name, 0.0) for name in PHASES if name != "other"}
        for name, (outer, inner) in NESTED.items():
            out[name] = values.get(outer, 0.0) - sum(values.get(i, 0.0) for i in inner)
        return out


def profile(spec: dict[str, Any], args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, float]]:
    import lightning as L
    import torch

    import ttc_lightning.module as module_py
    import ttc_lightning.sampling.fast as fast_py
    import ttc_lightning.training.logprobs as logprobs_py
    from ttc_lightning import GRPOModule, Levers, LoRA
    from ttc_lightning.data import PromptDataModule
    from ttc_lightning.rewards.scoring import RewardScorer
    from ttc_lightning.sampling.hf import GenerateBackend

    size = Size(**spec["size"])
    timers = Timers()
    # Timing only: the functions the step calls are looked up as module (or class) attributes, so wrapping them
    # times every call.
    for owner, name, attr in (
        (RewardScorer, "score", "score"),
        (module_py, "loss", "grpo_loss"),
        (fast_py, "prompt_sample", "prefill"),
        (fast_py, "generate", "decode"),
        (GenerateBackend, "generate", "sample"),
    ):
        setattr(owner, attr, timers.wrap(name, getattr(owner, attr)))
    # The what-ifs are the levers' own switches.
    levers = Levers(**{LEVERS[name]: False for name in args.without})

    L.seed_everything(SEED, verbose=False)
    module = GRPOModule(
        rewards=["compare_trl.letter_fraction"],
        model_name_or_path=spec["model_dir"],
        lora=LoRA(r=size.lora_r, alpha=size.lora_alpha, dropout=args.lora_dropout),
        gradient_checkpointing=size.gradient_checkpointing,
        num_generations=size.generations,
        max_new_tokens=size.max_new_tokens,
        beta=size.beta,
        learning_rate=LEARNING_RATE,
        micro_batch_size=size.micro_batch_size,
        log_rollouts=False,
        levers=levers,
        **SAMPLING,
    )
    module.generate = timers.wrap("rollout", module.generate)
    module.old_and_reference_logps = timers.wrap("frozen_logps", module.old_and_reference_logps)
    # The training passes only: the frozen ones (no grad) are inside frozen_logps.
    module.rollout_logps = timers.wrap_training("logps", module.rollout_logps)
    logprobs_py.token_logps = timers.wrap_training("head", logprobs_py.token_logps)
    module.manual_backward = timers.wrap("backward", module.manual_backward)
    records: list[dict[str, float]] = []
    memory: dict[str, float] = {}
    cpus = os.cpu_count() or 1

    class PhaseTimer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            pl_module.policy.generate = timers.wrap("generate", pl_module.policy.generate)
            optimizer = trainer.optimizers[0]
            optimizer.register_step_post_hook(self.optimizer_done)
            memory["after_load"] = peak_rss_mib()
            self.profiler: Any = None

        def on_before_optimizer_step(self, *args: Any) -> None:
            self.optimizer_started = time.perf_counter()

        def optimizer_done(self, *args: Any) -> None:
            timers.seconds["optimizer"] += time.perf_counter() - self.optimizer_started

        def on_train_batch_start(self, trainer: L.Trainer, *unused: Any) -> None:
            timers.seconds.clear()
            if args.torch_profile and trainer.global_step == args.warmup + args.steps:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.started = stamp()

        def on_train_batch_end(self, trainer: L.Trainer, *unused: Any) -> None:
            (wall0, busy0, own0), (wall1, busy1, own1) = self.started, stamp()
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            phases = Timers.exclusive(timers.seconds)
            phases["other"] = (wall1 - wall0) - sum(phases.values())
            phases["total"] = wall1 - wall0
            phases["others_cpu_share"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * cpus)
            records.append(phases)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps + args.torch_profile,  # the profiled step is extra and not timed
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PhaseTimer()],
        default_root_dir=str(Path(spec["model_dir"]).parent),
    )
    trainer.fit(module, PromptDataModule(train_path=spec["prompts"], batch_size=size.prompts, seed=SEED))
    memory.update(Timers.exclusive(timers.rss_growth), peak=peak_rss_mib())
    return records[args.warmup : args.warmup + args.steps], memory


def report(spec: dict[str, Any], args: argparse.Namespace) -> None:
    size = Size(**spec["size"])
    records, memory = profile(spec, args)
    quiet = [r for r in records if r["others_cpu_share"] <= BUSY_LIMIT] or records
    median = statistics.median(r["total"] for r in quiet)
    step = min(quiet, key=lambda r: abs(r["total"] - median))
    shape = f"{size.prompts} prompts x {size.generations} completions x {size.max_new_tokens} tokens"
    without = f", without {' and '.join(args.without)}" if args.without else ""
    print(f"\n{size.name} ({shape}, micro-batch {size.micro_batch_size}, LoRA dropout {args.lora_dropout}{without})")
    print(f"median step of {len(quiet)} quiet ones (of {len(records)}); all totals: ", end="")
    print(", ".join(f"{r['total']:.2f}" for r in records) + " s")
    print(f"  {'phase':<14}{'seconds':>8}{'share':>7}{'+peak MiB':>11}  what")
    for phase, what in PHASES.items():
        seconds, growth = step[phase], memory.get(phase, 0.0)
        print(f"  {phase:<14}{seconds:>8.3f}{100 * seconds / step['total']:>6.1f}%{growth:>11.0f}  {what}")
    print(f"  {'total':<14}{step['total']:>8.3f}")
    print(f"  peak RSS: {memory['after_load']:.0f} MiB when training starts, {memory['peak']:.0f} MiB at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "medium"])
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, help="override the size's completion length")
    parser.add_argument(
        "--without",
        nargs="+",
        choices=sorted(LEVERS),
        default=[],
        help="what-if: turn these levers off",
    )
    parser.add_argument("--lora-dropout", type=float, default=LORA_DROPOUT, help="what-if: another LoRA dropout")
    parser.add_argument("--torch-profile", action="store_true", help="print the top operators of one more step")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spec:
        report(json.loads(args.spec), args)
        return

    for name in args.sizes:
        size = SIZES[name]
        if args.max_new_tokens:
            size = Size(**{**asdict(size), "max_new_tokens": args.max_new_tokens})
        with tempfile.TemporaryDirectory(prefix="ttc-profile-") as tmp:
            # The model is built here and profiled in a fresh process: building it in the profiled process would
            # leave its allocator state (and peak RSS) behind, and each size gets its own peak.
            spec = prepare(size, Path(tmp))
            command = [sys.executable, __file__, "--spec", json.dumps(spec), "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup), "--lora-dropout", str(args.lora_dropout)]
            command += ["--without", *args.without] if args.without else []
            command += ["--torch-profile"] * args.torch_profile
            wait_for_quiet()
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
