"""Time the patch rewards on one GRPO batch: 8 prompts x 8 completions on ~3 KB C functions.

    python benchmarks/bench_rewards.py [--repeats 20]

The mixed batch holds what a policy emits early in training: exact fixes, partial fixes, edits in the wrong
place, a whole-function rewrite, unknown SEARCH text and malformed answers. The worst case follows: every
completion rewrites every line, so each predicted diff holds the whole function twice and the quadratic
similarity dominates.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    time_batch("mixed batch", rewrites_only=False, repeats=args.repeats)
    time_batch("every line rewritten", rewrites_only=True, repeats=args.repeats)


if __name__ == "__main__":
    main()
