"""Time the patch rewards on one GRPO batch: the similarity rewards, then the oracle next to the step's sampling.

    python benchmarks/bench_rewards.py [--repeats 20]        # similarity rewards, then the oracle and sampling
    python benchmarks/bench_rewards.py --skip-sampling       # the oracle without the sampling measurement

Similarity (`patch_reward`, `exact_fix_reward`): 8 prompts x 8 completions on ~3 KB C functions. The mixed batch
holds what a policy emits early in training: exact fixes, partial fixes, edits in the wrong place, a whole-function
rewrite, unknown SEARCH text and malformed answers. The worst case follows: every completion rewrites every line,
so each predicted diff holds the whole function twice and the quadratic similarity dominates.

The oracle (`oracle_reward`): B=4 shipped PrimeVul records with harnesses x G=8 completions with the duplicates a
group holds (the real fix three times, two of them behind other reasoning, so one build; a partial fix; a change
that leaves the bug; the do-nothing patch; one that does not compile; a malformed answer). Timed with an empty
verdict cache, once with one worker (the sum of the builds: the floor times the workers is this) and once with
every core; its floor is the one-worker time over the cores (perfect scaling of the same builds). Then the same
step's sampling: B x G completions of `--new-tokens` tokens from a random model of Qwen2.5-Coder-1.5B-Instruct's
config with `--layers` of its 28 layers, through ttc's decoding loop, next to the sampling floor measured in the
same run. Fewer layers sample faster, so on this shape the comparison favours sampling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ttc_lightning.rewards.patch import (
    Edit,
    _oracle_diff,
    exact_fix_reward,
    format_edits,
    make_oracle_edits,
    patch_reward,
    score_patch,
)


def c_function(seed: int, lines: int = 85) -> str:
    """A plausible C function of about 3 KB: a parser loop over a buffer with lengths and copies."""
    body = [f"static int parse_record_{seed}(struct ctx *ctx, const uint8_t *buf, size_t len, struct out *out)", "{"]
    body += ["    size_t off = 0;", "    int ret = 0;", ""]
    for i in range(lines // 6):
        body += [
            f"    uint16_t field_{i} = read_u16(buf + off);",
            f"    off += 2 + {seed % 7 + i};",
            f"    if (field_{i} > ctx->limit_{i % 4})",
            f'        return log_error(ctx, "field {i} too large: %u", field_{i});',
            f"    memcpy(out->data_{i}, buf + off, field_{i});",
            "",
        ]
    body += ["    return ret;", "}"]
    return "\n".join(body)


def fixed_version(func: str) -> str:
    """The fix: one bounds check inserted, one memcpy length clamped."""
    lines = func.split("\n")
    lines.insert(5, "    if (len < 2)\n        return -EINVAL;")
    lines = "\n".join(lines).split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("    memcpy(out->data_3"))
    lines[at] = lines[at].replace("field_3);", "MIN(field_3, sizeof(out->data_3)));")
    return "\n".join(lines)


def wrap(answer: str) -> str:
    think = "The length field is read before checking that the buffer holds two bytes. " * 20
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def completions_for(vulnerable: str, fixed: str, rewrites_only: bool) -> list[str]:
    oracle = make_oracle_edits(vulnerable, fixed)
    rewrite = wrap(format_edits([Edit(vulnerable + "\n", fixed.replace("return ret;", "return ret < 0 ? ret : 0;"))]))
    if rewrites_only:
        # Every line changes (the fix re-indented), so the predicted diff is the whole function twice.
        return [
            wrap(format_edits([Edit(vulnerable + "\n", "\n".join(" " * n + line for line in fixed.split("\n")))]))
            for n in range(1, 9)
        ]
    first_block = oracle.split("\n\n")[0]
    wrong_place = format_edits([Edit("    int ret = 0;\n", "    int ret = -1;\n")])
    return [
        wrap(oracle),
        wrap(oracle),
        wrap(first_block),
        wrap(wrong_place),
        rewrite,
        wrap(format_edits([Edit("    not in the function;\n", "    x;\n")])),
        f"<answer>{oracle}</answer>",
        wrap("I would add a bounds check."),
    ]


def build_batch(rewrites_only: bool, offset: int) -> tuple[list[str], list[str], list[str]]:
    completions, vulnerable, fixed = [], [], []
    for prompt in range(8):
        v = c_function(offset + prompt)
        f = fixed_version(v)
        group = completions_for(v, f, rewrites_only)
        completions += group
        vulnerable += [v] * len(group)
        fixed += [f] * len(group)
    return completions, vulnerable, fixed


def time_batch(name: str, rewrites_only: bool, repeats: int) -> None:
    first, second = [], []
    for r in range(repeats):
        completions, vulnerable, fixed = build_batch(rewrites_only, offset=1000 * r)
        _oracle_diff.cache_clear()
        score_patch.cache_clear()
        start = time.perf_counter()
        patch_reward(completions, vulnerable, fixed)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        exact_fix_reward(completions, vulnerable, fixed)  # reads the scores cached by patch_reward
        second.append(time.perf_counter() - start)
    size = sum(map(len, vulnerable)) / len(vulnerable)
    print(
        f"{name}: {len(completions)} completions on {size:.0f}-char functions: "
        f"patch_reward {statistics.median(first) * 1e3:.1f} ms per batch, "
        f"then exact_fix_reward {statistics.median(second) * 1e3:.2f} ms (median of {repeats})"
    )


def harnessed_pairs(files: list[Path], prompts: int) -> list[tuple[str, str, str, str]]:
    """`prompts` (idx, language, vulnerable, fixed) of the records in `files` (PrimeVul JSON lines) with a shipped
    harness, the fixed function found by the harness's `fixed_idx`."""
    import json

    from ttc_lightning.oracle.harness import HARNESSES, find_harnesses

    harnesses = find_harnesses(HARNESSES)
    funcs = {}
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            funcs[str(record["idx"])] = record["func"]
    pairs = [
        (idx, h.language, funcs[idx], funcs[h.fixed_idx])
        for idx, h in sorted(harnesses.items())
        if idx in funcs and h.fixed_idx in funcs
    ]
    if len(pairs) < prompts:
        raise SystemExit(f"--prompts {prompts}: {len(pairs)} records of {', '.join(map(str, files))} have harnesses")
    return pairs[:prompts]


def oracle_batch(files: list[Path], prompts: int, group: int) -> tuple[list[str], dict[str, list[str]], int]:
    """`prompts` x `group` completions on records with harnesses, their columns, and the builds they need."""
    from ttc_lightning.oracle.check import constant_body
    from ttc_lightning.rewards.patch import apply_completion

    completions: list[str] = []
    columns: dict[str, list[str]] = {"id": [], "vulnerable_func": []}
    for idx, language, v, f in harnessed_pairs(files, prompts):
        fix = make_oracle_edits(v, f)
        first_line = v.split("\n", 1)[0]
        constant = constant_body(v, language)
        group_of = [
            wrap(fix),
            wrap(fix),
            f"<think>\nThe bounds are checked after the copy.\n</think>\n<answer>\n{fix}\n</answer>",
            wrap(fix.split("\n\n")[0]),
            wrap(format_edits([Edit(first_line + "\n", "/* reviewed */\n" + first_line + "\n")])),
            wrap(format_edits([Edit(v, constant)])),
            wrap(format_edits([Edit(first_line + "\n", first_line + "\n    int broken = ;\n")])),
            wrap("I would add a bounds check."),
        ]
        completions += (group_of * group)[:group]
        columns["id"] += [idx] * group
        columns["vulnerable_func"] += [v] * group
    patched = {
        (i, apply_completion(c, v)[0])
        for c, i, v in zip(completions, columns["id"], columns["vulnerable_func"], strict=True)
    }
    return completions, columns, sum(1 for _, p in patched if p is not None)


def time_oracle(files: list[Path], prompts: int, group: int) -> float:
    """Print the oracle's times on one batch; return its wall seconds with every core."""
    import ttc_lightning.rewards.oracle as oracle
    from ttc_lightning.oracle.check import VerdictCache

    completions, columns, builds = oracle_batch(files, prompts, group)
    cores = len(os.sched_getaffinity(0))
    warm = oracle_batch(files, 1, 1)
    oracle.oracle_reward(warm[0], **warm[1], workers=1)  # the compiler's first start reads it from disk
    times: dict[int, float] = {}
    for workers in (1, cores):
        oracle._verdicts = VerdictCache()
        oracle.take_stats()
        started = time.perf_counter()
        rewards = oracle.oracle_reward(completions, **columns, workers=workers)
        times[workers] = time.perf_counter() - started
        stats = oracle.take_stats()
        print(
            f"oracle, {workers} worker(s): {len(completions)} completions, {int(stats['checks'])} builds "
            f"({builds} distinct patched functions), {int(stats['cache_hits'])} cache hits: "
            f"{times[workers]:.2f} s (compile {stats['compile_s']:.2f} s + cases {stats['run_s']:.2f} s summed)"
        )
    graded = sorted(r for r in rewards if r is not None)
    print(f"oracle rewards: {', '.join(f'{r:g}' for r in graded)}")
    floor = times[1] / cores
    print(f"oracle with {cores} workers: {times[cores]:.2f} s, {times[cores] / floor:.2f}x its floor ({floor:.2f} s)")
    return times[cores]


def time_sampling(prompts: int, group: int, layers: int, new_tokens: int) -> float:
    """Print the step's sampling time at the real shape next to its floor; return its seconds."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    sys.path.insert(0, str(Path(__file__).parent))
    import floor
    from compare_trl import sample_prompts
    from decode_speed import sample

    from ttc_lightning.model.loading import encode_prompts, quiet_transformers
    from ttc_lightning.model.tiny import build_tiny_tokenizer, save_qwen_shaped

    machine = floor.measure(device="cpu")
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(save_qwen_shaped(Path(tmp) / "m", "1.5b", num_layers=layers))
    model.eval().generation_config.min_new_tokens = new_tokens
    tokenizer = build_tiny_tokenizer()
    ids, mask = encode_prompts(tokenizer, sample_prompts(prompts), torch.device("cpu"))  # [B, P]
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=new_tokens,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        started = time.perf_counter()
        sample("loop, shared prompt cache", model, ids, mask, group, config)  # ttc's path on CPU
        seconds = time.perf_counter() - started
    shape = floor.Shape.from_config(model.config.to_dict())
    limit = floor.sampling_floor(shape, mask.sum(1).tolist(), group, new_tokens, machine, 4)
    print(
        f"sampling {prompts} x {group} x {new_tokens} tokens, prompts of {ids.size(1)} tokens, {layers} of 28 layers: "
        f"{seconds:.2f} s, {seconds / limit:.2f}x its floor ({limit:.2f} s)"
    )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="B of the oracle batch and of sampling")
    parser.add_argument("--group", type=int, default=8, help="G of the oracle batch and of sampling")
    parser.add_argument("--layers", type=int, default=4, help="layers of the 1.5B shape when sampling")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per completion when sampling")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument(
        "--data", type=Path, nargs="+", help="PrimeVul JSON-lines files for the oracle (default: the shipped sample)"
    )
    args = parser.parse_args()
    for name in ("repeats", "prompts", "group", "layers", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    time_batch("mixed batch", rewrites_only=False, repeats=args.repeats)
    time_batch("every line rewritten", rewrites_only=True, repeats=args.repeats)
    from ttc_lightning.data.base import SAMPLE_DIR

    oracle_s = time_oracle(
        args.data or sorted(Path(SAMPLE_DIR).glob("primevul_*_paired.jsonl")), args.prompts, args.group
    )
    if not args.skip_sampling:
        sampling_s = time_sampling(args.prompts, args.group, args.layers, args.new_tokens)
        print(f"oracle / sampling: {oracle_s / sampling_s:.2f}")


if __name__ == "__main__":
    main()
