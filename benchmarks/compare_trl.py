"""ttc against TRL's GRPOTrainer: seconds per optimizer step, generated tokens per second, peak resident memory.

    python benchmarks/compare_trl.py [--quick] [--sizes tiny medium] [--rounds 2] [--steps N] [--warmup 1]
                                     [--layers N] [--device cpu|cuda]

Both trainers get the same locally built model, the same prompts and the same rollout per optimizer step
(B prompts x G completions, micro-batches of m, LoRA, beta, learning rate, sampling settings, gradient
checkpointing). The `qwen-*` sizes are the job users run: a random model with Qwen2.5-Coder-Instruct's shape
(vocabulary 151,936 with tied embeddings, GQA, rope theta 1e6, its generation config; fewer layers on CPU, all of
them with `--layers 0`), prompts made from the shipped PrimeVul sample's functions by the patch task's own prompt.
Every time is also reported as a multiple of its floor (`floor.py`): the step's arithmetic at this machine's
measured matmul peak, and for sampling the larger of that and the bytes decoding must read. Each run is a
separate process (`--worker ttc|trl`), so peak RSS belongs to one trainer alone; the trainers alternate, and the
one that goes first alternates between rounds. The model's generation config sets `min_new_tokens` equal to
`max_new_tokens`, so every completion has exactly `max_new_tokens` tokens in both trainers; the tokens each
trainer actually generated are counted and reported anyway. Needs `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import floor


@dataclass
class Size:
    """One benchmark setting: the model's shape and the rollout of one optimizer step."""

    name: str
    model: dict[str, int] = field(default_factory=dict)  # save_tiny sizes; empty = its defaults
    prompts: int = 4  # B prompts per step
    generations: int = 8  # G completions per prompt
    max_new_tokens: int = 64
    micro_batch_size: int = 16  # completions per forward/backward
    code_lines: int = 0  # lines added to each prompt's C function: 24 tokens each with the byte-level tokenizer
    timed_steps: int = 8  # optimizer steps timed per run, after the warm-up
    qwen: str | None = None  # a Qwen2.5-Coder size ("0.5b", "1.5b"): its shape instead of save_tiny's
    layers: int | None = None  # of the Qwen shape; None: all
    sample_prompts: bool = False  # the shipped PrimeVul sample's functions through the patch prompt
    gradient_checkpointing: bool = False
    beta: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32


MEDIUM = Size(
    "medium",
    model={"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1536},
    prompts=2,
    max_new_tokens=128,
    micro_batch_size=8,
    timed_steps=3,
)
# The job users run (configs/patch.yaml): Qwen2.5-Coder's shape, real PrimeVul functions, G = 8, LoRA, a KL term,
# gradient checkpointing as the GPU configs ship; 4 layers of the 0.5B model on CPU (a step's cost is linear in the
# layers, and the output head, the part a real vocabulary adds, is all there).
QWEN = Size(
    "qwen-0.5b-4l",
    prompts=2,
    generations=8,
    max_new_tokens=64,
    micro_batch_size=8,
    timed_steps=2,
    qwen="0.5b",
    layers=4,
    sample_prompts=True,
    gradient_checkpointing=True,
    beta=0.04,
    lora_r=8,
    lora_alpha=16,
)
SIZES = {
    "tiny": Size("tiny"),
    "medium": MEDIUM,
    # PrimeVul's prompts (a whole C function) are longer than the completions: the medium setting with such prompts.
    "long-prompt": replace(MEDIUM, name="long-prompt", code_lines=16),
    "qwen-0.5b-4l": QWEN,
    "qwen-0.5b-4l-nogc": replace(QWEN, name="qwen-0.5b-4l-nogc", gradient_checkpointing=False),
    # On a GPU: the whole 1.5B model (`--layers 0`), bf16.
    "qwen-1.5b": replace(QWEN, name="qwen-1.5b", qwen="1.5b", layers=None, micro_batch_size=4),
}
LORA_DROPOUT = 0.0  # ttc's default; the same in both trainers
LEARNING_RATE = 1e-4
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
SEED = 0
BUSY_LIMIT = 0.10  # a step counts as contended when other processes used more than this share of the CPUs


def letter_fraction(completions: list[str], **_: Any) -> list[float]:
    """Share of the letter "a" in each completion: cheap, so the benchmark times the trainers, not the reward."""
    return [text.count("a") / len(text) if text else 0.0 for text in completions]


def build_prompts(n: int = 16, code_lines: int = 0) -> list[str]:
    """Prompts rendered with the chat template, all the same length, so every batch costs the same."""
    from ttc_lightning.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    body = "".join(f"  int v{j:03d} = b[{j:03d}] ^ n;\n" for j in range(code_lines))
    question = "Is this C function vulnerable? Answer briefly.\n\nint get_{i:03d}(const char *b, int n) {{\n{body}"
    question += "  return b[n];\n}}"
    messages = [[{"role": "user", "content": question.format(i=i, body=body)}] for i in range(n)]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]


def sample_prompts(n: int) -> list[str]:
    """`n` patch prompts of the shipped PrimeVul sample's train split, chat-templated, those nearest the median
    length (so every run costs the same whichever the trainers draw first)."""
    from ttc_lightning.data.base import SAMPLE_DIR
    from ttc_lightning.data.primevul import load_pairs
    from ttc_lightning.data.tasks import patch_row
    from ttc_lightning.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    texts = [
        tokenizer.apply_chat_template(patch_row(pair)["prompt"], add_generation_prompt=True, tokenize=False)
        for pair in load_pairs(SAMPLE_DIR, "train")
    ]
    texts.sort(key=len)
    middle = len(texts) // 2 - n // 2
    return texts[middle : middle + n]


def prepare(size: Size, directory: Path) -> dict[str, Any]:
    """Write the model directory and the prompts file; return the worker's spec."""
    from ttc_lightning.model.loading import quiet_transformers
    from ttc_lightning.model.tiny import build_tiny_tokenizer, save_qwen_shaped, save_tiny

    with quiet_transformers():
        if size.qwen:
            model_dir = save_qwen_shaped(directory / "model", size.qwen, num_layers=size.layers, seed=SEED)
        else:
            model_dir = save_tiny(directory / "model", seed=SEED, **size.model)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    # Neither trainer sets min_new_tokens, so generate() takes it from here: completions of exactly max_new_tokens.
    config["min_new_tokens"] = size.max_new_tokens
    config_path.write_text(json.dumps(config, indent=2))
    prompts_path = directory / "prompts.jsonl"
    prompts = sample_prompts(size.prompts) if size.sample_prompts else build_prompts(code_lines=size.code_lines)
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    tokenizer = build_tiny_tokenizer()
    tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return {"size": asdict(size), "model_dir": str(model_dir), "prompts": str(prompts_path), "prompt_tokens": tokens}


# --- workers: one trainer, one process -----------------------------------------------------------------------


def stamp() -> tuple[float, float, float]:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this process), all in seconds.

    Other processes on the machine slow the step down by far more than their share of the CPU (the trainers'
    intra-op threads wait for each other), so each step records how busy the machine was besides this process.
    """
    import psutil

    cpu = psutil.cpu_times()
    busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)
    return time.perf_counter(), busy, time.process_time()


def run_ttc(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    import lightning as L

    from ttc_lightning import GRPOModule, LoRA
    from ttc_lightning.data import PromptDataModule

    size = Size(**spec["size"])
    n = size.prompts * size.generations

    class StepTimer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.stamps, self.tokens = [stamp()], []

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            self.stamps.append(stamp())
            self.tokens.append(round(float(trainer.callback_metrics["completions/mean_length"]) * n))
            self.generate.append(float(trainer.callback_metrics["time/generate"]))

    L.seed_everything(SEED, verbose=False)
    module = GRPOModule(
        rewards=["compare_trl.letter_fraction"],
        model_name_or_path=spec["model_dir"],
        lora=LoRA(r=size.lora_r, alpha=size.lora_alpha, dropout=LORA_DROPOUT),
        gradient_checkpointing=size.gradient_checkpointing,
        num_generations=size.generations,
        max_new_tokens=size.max_new_tokens,
        beta=size.beta,
        loss_type="dapo",
        learning_rate=LEARNING_RATE,
        lr_scheduler="cosine",
        micro_batch_size=size.micro_batch_size,
        log_rollouts=False,
        **SAMPLING,
    )
    timer = StepTimer()
    timer.generate = []
    cuda = spec["device"] == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        precision="bf16-mixed" if cuda else "32-true",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=str(Path(spec["model_dir"]).parent / "ttc-run"),
    )
    trainer.fit(module, PromptDataModule(train_path=spec["prompts"], batch_size=size.prompts, seed=SEED))
    return {"stamps": timer.stamps, "tokens": timer.tokens, "generate_s": timer.generate, **peak_cuda()}


def peak_cuda() -> dict[str, float]:
    import torch

    return {"peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}


def run_trl(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    size = Size(**spec["size"])
    n = size.prompts * size.generations
    generated: list[int] = []

    def reward(completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        generated.append(sum(map(len, completion_ids)))  # ids up to and including EOS, as ttc's completion mask
        return letter_fraction(completions)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.stamps, self.tokens = [stamp()], []

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.stamps.append(stamp())
            self.tokens.append(generated[-1])

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    args = GRPOConfig(
        output_dir=str(Path(spec["model_dir"]).parent / "trl-run"),
        # One optimizer step = one generation of B*G completions, consumed in micro-batches of m, as in ttc.
        per_device_train_batch_size=size.micro_batch_size,
        gradient_accumulation_steps=n // size.micro_batch_size,
        num_generations=size.generations,
        max_completion_length=size.max_new_tokens,
        beta=size.beta,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        epsilon=0.2,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=steps,
        gradient_checkpointing=size.gradient_checkpointing,  # GRPOConfig turns it on by default
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=spec["device"] == "cuda",
        fp16=False,
        use_cpu=spec["device"] == "cpu",
        use_vllm=False,
        model_init_kwargs={"dtype": torch.bfloat16 if spec["device"] == "cuda" else torch.float32},
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        **SAMPLING,
    )
    timer = StepTimer()
    peft_config = LoraConfig(
        r=size.lora_r,
        lora_alpha=size.lora_alpha,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = GRPOTrainer(
        model=spec["model_dir"],
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        callbacks=[timer],
    )
    trainer.train()
    return {"stamps": timer.stamps, "tokens": timer.tokens, **peak_cuda()}


def worker(name: str, spec: dict[str, Any], steps: int, result_path: Path) -> None:
    import torch

    started = time.perf_counter()
    result = (run_ttc if name == "ttc" else run_trl)(spec, steps)
    result.update(
        trainer=name,
        total_s=time.perf_counter() - started,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
    )
    result_path.write_text(json.dumps(result))


# --- driver ---------------------------------------------------------------------------------------------------


def wait_for_quiet(limit: float = BUSY_LIMIT, timeout: float = 120.0) -> float:
    """Wait (up to `timeout` s) until the machine is idle for two seconds in a row; return the seconds waited."""
    import psutil

    started = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - started < timeout:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) / 100 <= limit else 0
    return time.perf_counter() - started


def spawn(name: str, spec: dict[str, Any], steps: int, directory: Path) -> dict[str, Any]:
    result_path = directory / f"result-{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec), "--steps", str(steps)]
    command += ["--result", str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not result_path.exists():
        sys.exit(f"{name} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def timed_steps(run: dict[str, Any], warmup: int) -> list[dict[str, float]]:
    """Each step after the warm-up: seconds, tokens generated, and the share of the CPUs other processes used."""
    stamps = run["stamps"][warmup:]
    steps = []
    pairs = zip(stamps[:-1], stamps[1:], run["tokens"][warmup:], strict=True)
    for (wall0, busy0, own0), (wall1, busy1, own1), tokens in pairs:
        seconds = wall1 - wall0
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (seconds * run["cpus"])
        steps.append({"seconds": seconds, "tokens": tokens, "others_cpu_share": others})
    return steps


def run_quietly(name: str, spec: dict[str, Any], steps: int, warmup: int, attempts: int) -> list[dict[str, Any]]:
    """Runs of one trainer until at least half of the timed steps had the CPUs to themselves (or `attempts` runs)."""
    runs = []
    for attempt in range(1, attempts + 1):
        waited = wait_for_quiet() if attempts > 1 else 0.0
        run = spawn(name, spec, warmup + steps, Path(spec["model_dir"]).parent)
        run["waited_for_quiet_s"] = waited
        runs.append(run)
        contended = sum(s["others_cpu_share"] > BUSY_LIMIT for s in timed_steps(run, warmup))
        if 2 * contended <= steps or attempt == attempts:
            break
        print(f"  {contended} of {steps} steps shared the CPUs with other processes: one more run", file=sys.stderr)
    return runs


def summarise(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Pool the timed steps of every run of one trainer, leaving out steps that shared the CPUs."""
    steps = [step for run in runs for step in timed_steps(run, warmup)]
    quiet = [s for s in steps if s["others_cpu_share"] <= BUSY_LIMIT] or steps
    seconds = [s["seconds"] for s in quiet]
    tokens = [s["tokens"] for s in quiet]
    generate = [g for run in runs for g in run.get("generate_s", [])[warmup:]]
    return {
        "median_s_per_step": statistics.median(seconds),
        "min_s_per_step": min(seconds),
        "max_s_per_step": max(seconds),
        "median_generate_s": statistics.median(generate) if generate else None,
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "peak_cuda_mib": max((run.get("peak_cuda_mib", 0.0) for run in runs), default=0.0) or None,
        "steps_used": len(quiet),
        "steps_left_out": len(steps) - len(quiet),
        "runs": len(runs),
        "threads": runs[0]["threads"],
        "steps": steps,
    }


def measure_machine(device: str) -> floor.Machine:
    """`floor.measure()` in a process of its own: its 1 GiB of reads would otherwise count in the peak RSS of every
    worker (a child process starts from its parent's peak). On a GPU, the GPU's bfloat16 peak and bandwidth."""
    command = [sys.executable, str(Path(__file__).parent / "floor.py"), "--json", *(["--cuda"] * (device == "cuda"))]
    return floor.Machine(**json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))


def floors(size: Size, spec: dict[str, Any], machine: floor.Machine) -> dict[str, float]:
    """The step's floor (its FLOPs at the matmul peak, sampling at the larger of FLOPs and reads) and its parts."""
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    shape = floor.Shape.from_config(config, lora_r=size.lora_r)
    prompts = spec["prompt_tokens"][: size.prompts]
    dtype_bytes = 2 if spec["device"] == "cuda" else 4
    sampling = floor.sampling_floor(shape, prompts, size.generations, size.max_new_tokens, machine, dtype_bytes)
    flops = floor.training_flops(
        shape, prompts, size.generations, size.max_new_tokens, size.beta > 0, size.gradient_checkpointing
    )
    training = flops / machine.flops
    return {"sampling_s": sampling, "training_s": training, "step_s": sampling + training}


def compare(
    size: Size, rounds: int, steps: int, warmup: int, attempts: int, directory: Path, device: str, machine: Any
) -> dict[str, Any]:
    """Alternate the two trainers on one size; the one that starts alternates between rounds."""
    spec = {**prepare(size, directory), "device": device}
    runs: dict[str, list[dict[str, Any]]] = {"ttc": [], "trl": []}
    for r in range(rounds):
        for trainer in ("ttc", "trl") if r % 2 == 0 else ("trl", "ttc"):
            print(f"{size.name}: round {r + 1}/{rounds}, {trainer}", file=sys.stderr, flush=True)
            runs[trainer] += run_quietly(trainer, spec, steps, warmup, attempts)
    ttc, trl = summarise(runs["ttc"], warmup), summarise(runs["trl"], warmup)
    limit = floors(size, spec, machine)
    return {
        "setting": {
            **asdict(size),
            "timed_steps_per_run": steps,
            "parameters": parameters(spec["model_dir"]),
            "prompt_tokens": spec["prompt_tokens"][: size.prompts],
        },
        "ttc": ttc,
        "trl": trl,
        "floor": limit,
        "over_floor": {
            "ttc": ttc["median_s_per_step"] / limit["step_s"],
            "trl": trl["median_s_per_step"] / limit["step_s"],
            "ttc_sampling": ttc["median_generate_s"] / limit["sampling_s"] if ttc["median_generate_s"] else None,
        },
        "ttc_over_trl": {
            "s_per_step": ttc["median_s_per_step"] / trl["median_s_per_step"],
            "tokens_per_s": ttc["tokens_per_s"] / trl["tokens_per_s"],
            "peak_rss": ttc["peak_rss_mib"] / trl["peak_rss_mib"],
        },
    }


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(f"\n{report['cpu']}, {report['threads']} torch threads, {report['versions']}")
    print(f"measured: matmul {machine['flops'] / 1e9:.0f} GFLOP/s, reads {machine['bandwidth'] / 1e9:.1f} GB/s")
    print(
        f"{'size':<18}{'params':>8}{'prompt':>12}{'B x G x T':>14}  {'trainer':<8}{'s/step':>8}{'x floor':>8}"
        f"{'(min-max)':>16}{'tok/s':>7}{'peak RSS MiB':>13}"
    )
    for name, result in report["sizes"].items():
        setting = result["setting"]
        shape = f"{setting['prompts']} x {setting['generations']} x {setting['max_new_tokens']}"
        params = f"{setting['parameters'] / 1e6:.1f}M"
        lengths = setting["prompt_tokens"]
        prompt = f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else str(lengths[0])
        for trainer in ("ttc", "trl"):
            r = result[trainer]
            spread = f"({r['min_s_per_step']:.2f}-{r['max_s_per_step']:.2f})"
            print(
                f"{name:<18}{params:>8}{prompt:>12}{shape:>14}  {trainer:<8}{r['median_s_per_step']:>8.2f}"
                f"{result['over_floor'][trainer]:>7.2f}x{spread:>16}{r['tokens_per_s']:>7.0f}{r['peak_rss_mib']:>13.0f}"
            )
        ratio, limit = result["ttc_over_trl"], result["floor"]
        print(
            f"{'':<54}{'ttc/TRL':<8}{ratio['s_per_step']:>7.2f}x{'':>24}{ratio['tokens_per_s']:>6.2f}x"
            f"{ratio['peak_rss']:>12.2f}x"
        )
        sampling = result["ttc"]["median_generate_s"]
        print(
            f"{'':<54}floor: step {limit['step_s']:.2f} s = sampling {limit['sampling_s']:.2f} + training "
            f"{limit['training_s']:.2f}; ttc sampling {sampling:.2f} s = {result['over_floor']['ttc_sampling']:.2f}x"
        )


def parameters(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def versions() -> dict[str, str]:
    import lightning
    import peft
    import torch
    import transformers
    import trl

    modules = (torch, transformers, trl, peft, lightning)
    return {"python": platform.python_version(), **{m.__name__: m.__version__ for m in modules}}


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8-token completions, 1 round, 1 timed step")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer per size, alternating")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (default: the size's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of each run")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/compare_trl.json"))
    parser.add_argument("--layers", type=int, help="layers of the qwen-* sizes' model (0: all of the real model's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 on the first GPU")
    parser.add_argument("--worker", choices=["ttc", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.spec), args.steps, args.result)
        return

    started = time.perf_counter()
    wait_for_quiet()
    machine = measure_machine(args.device)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": None,
        "versions": versions(),
        "settings": {"lora_dropout": LORA_DROPOUT, "learning_rate": LEARNING_RATE, **SAMPLING, "loss_type": "dapo"},
        "rounds": 1 if args.quick else args.rounds,
        "warmup_steps_per_run": args.warmup,
        "machine": {"flops": machine.flops, "bandwidth": machine.bandwidth},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="ttc-vs-trl-") as tmp:
        for name in args.sizes:
            size = SIZES[name]
            if size.qwen and args.layers is not None:
                size = replace(size, layers=args.layers or None)
            steps = args.steps or size.timed_steps
            if args.quick:
                size, steps = Size(**{**asdict(size), "max_new_tokens": 8}), 1
            directory = Path(tmp) / name
            directory.mkdir()
            attempts = 1 if args.quick else 3
            result = compare(size, report["rounds"], steps, args.warmup, attempts, directory, args.device, machine)
            report["sizes"][name] = result
            report["threads"] = result["ttc"]["threads"]
    report["wall_s"] = time.perf_counter() - started
    print_table(report)
    print(f"{report['wall_s']:.0f} s in all")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
