"""Per-rank bytes of the weights, gradients and AdamW state under DDP and FSDP2 at 1 and 2 ranks, and seconds per
step next to the step's floor, for a full fine-tune with a KL term (a frozen reference copy) on CPU processes.

    python benchmarks/fsdp_memory.py                       # Qwen2.5-Coder-0.5B's config with 4 of its 24 layers
    python benchmarks/fsdp_memory.py --size 1.5b --layers 2

Each run is `ttc fit --config configs/fsdp.yaml` (the demo prompts, gradient checkpointing, beta 0.04) on a random
model of the real config, 3 steps; a callback records each rank's bytes after the last step: the policy's weights
(each rank's shard under FSDP2), its gradients (as many bytes as the trained weights: the same shards), AdamW's two
moments, and the reference. Seconds per step: the median over steps 2-3 of sampling + training (`time/generate` +
`time/train` in metrics.csv, averaged over ranks), next to the floor at this machine's measured matmul peak and
bandwidth (`floor.py`), which counts each rank's own share of the work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

HERE = Path(__file__).parent
REPO = HERE.parent
STRATEGY = (
    "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: {save_distributed_checkpoint: false}}"
)
RUNS = (("single process", 1, "auto"), ("DDP", 2, "ddp"), ("FSDP2", 1, STRATEGY), ("FSDP2", 2, STRATEGY))
PROMPTS, GROUP, NEW_TOKENS = 4, 4, 16  # per rank: configs/fsdp.yaml's batch_size and num_generations; a short rollout


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of `tensor` (its shard of a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class RecordBytes(L.Callback):
    """After the last step, each rank writes `memory.rank<k>.json`: its bytes of each kind."""

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        trained = [p for p in pl_module.policy.parameters() if p.requires_grad]
        optimizer = trainer.optimizers[0]
        moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
        reference = pl_module.ref_model
        record = {
            "weights": sum(local_bytes(p) for p in pl_module.policy.parameters()),
            "gradients": sum(local_bytes(p) for p in trained),
            "optimizer": sum(local_bytes(v) for v in moments),
            "reference": sum(local_bytes(p) for p in reference.parameters()) if reference is not None else 0,
        }
        path = Path(trainer.default_root_dir) / f"memory.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def run(name: str, ranks: int, strategy: str, model_dir: Path, directory: Path) -> dict[str, Any]:
    root = directory / f"{name.replace(' ', '-')}-{ranks}"
    command = [sys.executable, "-m", "ttc_lightning", "fit", "--config", str(REPO / "configs" / "fsdp.yaml")]
    command += ["--model.model_name_or_path", str(model_dir), "--trainer.devices", str(ranks)]
    command += ["--trainer.strategy", strategy, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root)]
    command += ["--model.max_new_tokens", str(NEW_TOKENS), "--model.num_generations", str(GROUP)]
    command += ["--trainer.callbacks+=fsdp_memory.RecordBytes", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} x {ranks} failed:\n{done.stderr[-3000:]}")
    per_rank = [json.loads((root / f"memory.rank{k}.json").read_text()) for k in range(ranks)]
    with (root / "logs" / "version_0" / "metrics.csv").open() as f:
        steps = [r for r in csv.DictReader(f) if r.get("time/generate")]
    seconds = [float(r["time/generate"]) + float(r["time/train"]) for r in steps[1:]]
    return {"name": name, "ranks": ranks, "bytes": per_rank[0], "all_ranks": per_rank, "s_per_step": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["0.5b", "1.5b"], default="0.5b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("runs/bench/fsdp_memory.json"))
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be >= 1")

    import floor

    from ttc_lightning.model.loading import quiet_transformers
    from ttc_lightning.model.tiny import build_tiny_tokenizer, save_qwen_shaped

    machine = floor.measure()
    results = []
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        model_dir = save_qwen_shaped(Path(tmp) / "model", args.size, num_layers=args.layers)
        shape = floor.Shape.from_config(json.loads((model_dir / "config.json").read_text()))
        tokenizer = build_tiny_tokenizer()
        prompts = [
            len(
                tokenizer(
                    tokenizer.apply_chat_template(
                        json.loads(line)["prompt"], add_generation_prompt=True, tokenize=False
                    )
                ).input_ids
            )
            for line in (REPO / "ttc_lightning" / "assets" / "demo_prompts.jsonl").read_text().splitlines()
        ]
        lengths = sorted(prompts)[len(prompts) // 2 : len(prompts) // 2 + PROMPTS]  # the median prompts
        sampling = floor.sampling_floor(shape, lengths, GROUP, NEW_TOKENS, machine)
        training = floor.training_flops(shape, lengths, GROUP, NEW_TOKENS, True, True, weight_gradients=True)
        step_floor = sampling + training / machine.flops
        for name, ranks, strategy in RUNS:
            results.append(run(name, ranks, strategy, model_dir, Path(tmp)))
            r = results[-1]
            print(f"{name} x {ranks}: {json.dumps(r['bytes'])}, s/step {r['s_per_step']}", flush=True)

    print(
        f"\n{args.size} shape, {args.layers} layers: floor {step_floor:.2f} s a step per rank "
        f"(matmul {machine.flops / 1e9:.0f} GFLOP/s, reads {machine.bandwidth / 1e9:.1f} GB/s)"
    )
    print(
        "| run | ranks | weights MiB | gradients MiB | AdamW MiB | reference MiB | total MiB / rank |"
        " s / step | x floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b = r["bytes"]
        total = sum(b.values())
        s = statistics.median(r["s_per_step"])
        cells = [b["weights"], b["gradients"], b["optimizer"], b["reference"], total]
        mib = " | ".join(f"{v / 2**20:,.0f}" for v in cells)
        print(f"| {r['name']} | {r['ranks']} | {mib} | {s:.2f} | {s / step_floor:.1f}x |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "layers": args.layers, "floor_s": step_floor, "runs": results}
    args.output.write_text(json.dumps({**report, "machine": vars(machine)}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
