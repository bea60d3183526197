"""Sampling speed of each decoding path at Qwen2.5-Coder-1.5B-Instruct's shape, next to the sampling floor.

    python benchmarks/decode_speed.py --device cuda                       # the whole 1.5B model, bf16
    python benchmarks/decode_speed.py --layers 2 --new-tokens 16          # a CPU smoke run

One rollout as `configs/patch.yaml` samples it (B prompts of the shipped PrimeVul sample through the patch prompt,
G completions each, `--new-tokens` tokens per completion: the model's `min_new_tokens` is set to it so that every
path generates exactly that many) through each path: `generate()` over whole prompts (no ttc lever: what TRL
without vLLM runs), ttc's decoding loop over the prompt's keys/values shared by its group or copied to each row, and
the loop over a fixed-shape cache (on a GPU each step replayed as one CUDA graph). Each is timed after one untimed
run; the floor is `floor.sampling_floor` at the matmul peak and read bandwidth measured in the same process. Greedy
runs of the copied and fixed-shape paths compare their tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import floor
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from ttc_lightning.model.loading import encode_prompts, quiet_transformers
from ttc_lightning.model.tiny import build_tiny_tokenizer, save_qwen_shaped
from ttc_lightning.sampling.decoding import decode
from ttc_lightning.sampling.kv_cache import StaticCache, expand_cache, prefill

PATHS = ("generate", "loop, shared prompt cache", "loop, copied prompt cache", "loop, fixed-shape cache")


def sample(path: str, model: Any, ids: torch.Tensor, mask: torch.Tensor, group: int, config: GenerationConfig) -> Any:
    """The completions `[N, T]` of B prompts `[B, P]` x `group` through `path`."""
    rows_ids, rows_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)  # [N, P]
    if path == "generate":
        return model.generate(input_ids=rows_ids, attention_mask=rows_mask, generation_config=config)[:, ids.size(1) :]
    steps = config.max_new_tokens
    cache = prefill(model, ids[:, :-1], mask[:, :-1], ids.size(1) + steps)
    if path == "loop, fixed-shape cache":
        cache = StaticCache.from_prefill(cache, group, ids.size(1) - 1 + steps)
    else:
        expand_cache(cache, mask[:, :-1], group, steps + 1, share=path == "loop, shared prompt cache")
    return decode(model, rows_ids, rows_mask, cache, config).completion_ids


def timed(fn: Any, sync: Any) -> tuple[float, Any]:
    sync()
    started = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layers", type=int, help="layers of the 1.5B shape (default: all 28)")
    parser.add_argument("--prompts", type=int, default=4, help="B, as configs/patch.yaml's data.batch_size")
    parser.add_argument("--group", type=int, default=8, help="G, as configs/patch.yaml's model.num_generations")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, help="a model directory to use (default: build the shape)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/decode_speed.json"))
    args = parser.parse_args()
    for name in ("prompts", "group", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1 (leave it out for all 28)")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json there")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")

    sys.path.insert(0, str(Path(__file__).parent))
    from compare_trl import sample_prompts

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    machine = floor.measure(device=args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        model_dir = args.model_dir or save_qwen_shaped(Path(tmp) / "model", "1.5b", num_layers=args.layers)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    model.generation_config.min_new_tokens = args.new_tokens  # every path generates exactly new_tokens
    tokenizer = build_tiny_tokenizer()
    texts = sample_prompts(args.prompts)
    ids, mask = encode_prompts(tokenizer, texts, torch.device(args.device))  # [B, P]
    lengths = mask.sum(1).tolist()
    eos = [tokenizer.eos_token_id]
    settings = dict(max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    sampled = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, **settings)
    greedy = GenerationConfig(do_sample=False, repetition_penalty=1.0, **settings)
    shape = floor.Shape.from_config(model.config.to_dict())
    limit = floor.sampling_floor(shape, lengths, args.group, args.new_tokens, machine, 2 if cuda else 4)
    rows = args.prompts * args.group
    results: dict[str, Any] = {}
    with torch.no_grad():
        for path in PATHS:
            sample(path, model, ids, mask, args.group, sampled)  # warm-up
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds, out = timed(lambda path=path: sample(path, model, ids, mask, args.group, sampled), sync)
            generated = out.size(1)
            results[path] = {
                "seconds": seconds,
                "tokens_per_s": rows * generated / seconds,
                "ms_per_token": 1000 * seconds / generated,
                "x_floor": seconds / limit,
                "generated": generated,
                **({"peak_gib": torch.cuda.max_memory_allocated() / 2**30} if cuda else {}),
            }
            rate = rows * generated / seconds
            print(f"{path:<28} {seconds:7.2f} s  {rate:8.0f} tok/s  {seconds / limit:6.2f}x floor")
        copied = sample("loop, copied prompt cache", model, ids, mask, args.group, greedy)
        static = sample("loop, fixed-shape cache", model, ids, mask, args.group, greedy)
    same_rows = (copied == static).all(1).float().mean().item()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
        "machine": {"matmul_flops": machine.flops, "read_bandwidth": machine.bandwidth},
        "setting": {
            "layers": shape.layers,
            "prompt_tokens": lengths,
            "rows": rows,
            "new_tokens": args.new_tokens,
            "dtype": str(dtype),
        },
        "floor_s": limit,
        "paths": results,
        "greedy_rows_equal_copied_vs_fixed_shape": same_rows,
    }
    print(f"floor {limit:.2f} s (matmul {machine.flops / 1e12:.1f} TFLOP/s, reads {machine.bandwidth / 1e9:.0f} GB/s)")
    print(f"greedy rows equal, copied vs fixed-shape cache: {same_rows:.0%}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
