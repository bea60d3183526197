"""FSDP2 through Lightning's ModelParallelStrategy on 2 CPU processes (gloo): a step equals DDP's, resume is exact,
SIGTERM leaves a resumable checkpoint, exports load, and what ttc cannot shard is refused in one line."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers import (
    DEMO_PROMPTS,
    FAST,
    HELPERS,
    REPO,
    TINY,
    finish,
    process_env,
    read_metrics,
    read_rollouts,
    rollout_steps,
    start_ttc,
    wait_for,
)
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.run.export import main as export

STRATEGY = (
    "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
    "init_args: {data_parallel_size: %d, tensor_parallel_size: %d, save_distributed_checkpoint: %s}}"
)
FSDP = ["--trainer.devices", "2", "--trainer.strategy", STRATEGY % (2, 1, "false")]
# The sizes left to ttc: every device shards (data_parallel_size = devices x nodes, tensor_parallel_size 1).
AUTO = (
    "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: {save_distributed_checkpoint: false}}"
)
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
LORA = ["--model.lora", "{r: 4, alpha: 8}"]
# generate() on both sides: a sharded policy samples with it, so DDP must too for the same completions.
SAME_SAMPLER = ["--model.beta", "0.04", "--model.levers", "{fast_sampler: false}"]
REWARD = ["--model.rewards", f"[{HELPERS}.distinct_chars_reward]"]  # completions' rewards differ: gradients
INPUT_IDS = torch.arange(1, 17).unsqueeze(0)  # [1, 16] arbitrary fixed tokens


def fit(tmp_path: Path, kill_on_exit, root: str, *args: str) -> str:
    proc = start_ttc(tmp_path, "--trainer.default_root_dir", root, *args)
    kill_on_exit(proc)
    code, out = finish(proc, tmp_path)
    assert code == 0, out[-3000:]
    return out


def trained(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def exported(checkpoint: Path, out: Path, lora: bool) -> torch.nn.Module:
    export(["--ckpt_path", str(checkpoint), "--output_dir", str(out)])
    if not lora:
        return AutoModelForCausalLM.from_pretrained(out)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_an_fsdp_step_equals_the_ddp_step_and_its_export_loads(tmp_path, kill_on_exit, lora):
    # LoRA under gradient checkpointing, as configs/fsdp.yaml trains; the full fine-tune without
    checkpointed = ["--model.gradient_checkpointing", "true"] if lora else []
    args = ["--trainer.max_steps", "1", *SAME_SAMPLER, *REWARD, *(LORA if lora else []), *checkpointed]
    fit(tmp_path, kill_on_exit, "ddp", *DDP, *args)
    out = fit(tmp_path, kill_on_exit, "fsdp", *FSDP, *args)
    assert "sampling with generate() (ttc's backend off: the policy is sharded (FSDP2)" in out
    assert "training log-probs with one pass per prompt" in out  # a group's prompt shared, sharded too
    assert out.count("ttc: train: 16 prompts") == 1  # the demo prompts, said by rank 0

    ddp, fsdp = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    for name in ("loss", "grad_norm", "kl", "reward"):
        assert float(fsdp[0][name]) == pytest.approx(float(ddp[0][name]), rel=1e-5, abs=1e-7), name
    assert float(fsdp[0]["grad_norm"]) > 0  # a step that moved the weights
    ddp_weights, fsdp_weights = trained(tmp_path / "ddp"), trained(tmp_path / "fsdp")
    assert sorted(fsdp_weights) == sorted(ddp_weights)
    assert all("lora_" in name for name in fsdp_weights) == lora  # adapters only under LoRA
    # AdamW's first step moves each weight by about lr x g / (|g| + eps): a gradient entry near eps turns the
    # summation-order differences of the two strategies' all-reduces into differences of up to ~1e-6 (lr 0.003).
    for name, value in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], value, atol=1e-5, rtol=1e-5, msg=name)

    # `ttc export` reads an FSDP checkpoint as a DDP one: the same model, and it generates.
    from_fsdp = exported(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", tmp_path / "export-fsdp", lora)
    from_ddp = exported(tmp_path / "ddp" / "checkpoints" / "last.ckpt", tmp_path / "export-ddp", lora)
    torch.testing.assert_close(logits_of(from_fsdp), logits_of(from_ddp), atol=1e-5, rtol=1e-5)
    generated = from_fsdp.generate(input_ids=INPUT_IDS, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 20)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [FSDP, DDP], ids=["fsdp", "ddp"])
def test_a_resume_equals_the_unbroken_run_on_every_rank(tmp_path, kill_on_exit, strategy):
    # A constant learning rate: a linear decay would end at the stopped run's max_steps, not the whole run's.
    args = [*strategy, *LORA, *REWARD, "--model.beta", "0.04", "--model.lr_scheduler", "constant"]
    fit(tmp_path, kill_on_exit, "whole", *args, "--trainer.max_steps", "3")
    fit(tmp_path, kill_on_exit, "run", *args, "--trainer.max_steps", "2")
    fit(tmp_path, kill_on_exit, "run", *args, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == [3]  # resumed, not restarted
    for rank_file in ("rollouts.jsonl", "rollouts.rank1.jsonl"):
        whole = read_rollouts(tmp_path / "whole" / "logs" / "version_0" / rank_file)
        resumed = read_rollouts(tmp_path / "run" / "logs" / "version_1" / rank_file)
        assert [r["completion"] for r in resumed] == [r["completion"] for r in whole if r["step"] == 3], rank_file
    # The same completions gave the same updates: bit for bit under FSDP; under DDP up to the last bits, since the
    # unbroken run sampled through LoRA merged into the weights in place and back (`merge_lora`: within an ulp).
    whole_weights, resumed_weights = trained(tmp_path / "whole"), trained(tmp_path / "run")
    exact = strategy is FSDP
    for name, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=0 if exact else 1e-7, rtol=0, msg=name)


@pytest.mark.slow
def test_the_fsdp_config_trains_on_two_processes_and_resumes(tmp_path):
    command = [sys.executable, "-m", "ttc_lightning", "fit", "--config", str(REPO / "configs" / "fsdp.yaml")]
    command += ["--trainer.default_root_dir", "run", "--trainer.enable_progress_bar", "false"]
    for args in (["--trainer.max_steps", "2"], ["--trainer.max_steps", "3", "--ckpt_path", "last"]):
        done = subprocess.run([*command, *args], cwd=tmp_path, env=process_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == [3]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


@pytest.mark.slow
def test_sigterm_under_fsdp_exits_143_with_a_resumable_checkpoint(tmp_path, kill_on_exit):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(DEMO_PROMPTS.read_text() * 4)
    data = ["--data.train_path", str(prompts), "--trainer.devices", "2", "--trainer.strategy", AUTO, *LORA]
    proc = start_ttc(tmp_path, "--trainer.max_steps", "1000", *data)
    kill_on_exit(proc)
    wait_for(
        proc, tmp_path, lambda: rollout_steps(tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl") >= 2, "step 2"
    )
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, tmp_path)
    assert code == 143, out[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert step >= 2
    fit(tmp_path, kill_on_exit, "run", *data, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last")
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == [step + 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trainer.strategy", STRATEGY % (1, 1, "true")],
            "ttc: error: trainer.strategy: ModelParallelStrategy writes a directory of shards as its checkpoint unless "
            "save_distributed_checkpoint: false",
        ),
        (
            ["--trainer.strategy", STRATEGY % (1, 1, "false"), "--model.dynamic_sampling", "true"],
            "ttc: error: model.dynamic_sampling: under FSDP2 every rank must run the same training passes",
        ),
        (["--trainer.strategy", "deepspeed_stage_3"], "ttc: error: trainer.strategy: ttc does not run under"),
        (["--trainer.strategy", "deepspeed_stage_2"], "ttc: error: trainer.strategy: ttc does not run under"),
        (
            ["--trainer.strategy", STRATEGY % (1, 1, "false"), "--model.load_in_4bit", "true", *LORA],
            "ttc: error: model.load_in_4bit: 4-bit weights cannot be sharded with FSDP2; train QLoRA with strategy ddp",
        ),
        (
            ["--trainer.strategy", STRATEGY % (2, 1, "false")],
            "ttc: error: trainer.strategy: data_parallel_size 2 x tensor_parallel_size 1 must equal the 1 devices",
        ),
        (
            ["--trainer.strategy", AUTO, "--trainer.devices", "auto"],
            "ttc: error: trainer.devices: 'auto' with ModelParallelStrategy: give the number of devices of each node",
        ),
        (["--trainer.strategy", "fsdp"], "ttc: error: trainer.strategy: ttc does not run under fsdp; to shard"),
    ],
    ids=[
        "distributed-checkpoint",
        "dynamic-sampling",
        "deepspeed-3",
        "deepspeed-2",
        "4-bit",
        "sizes",
        "devices-auto",
        "fsdp1",
    ],
)
def test_what_fsdp_cannot_do_is_one_line(run_ttc, tmp_path, process_group_cleanup, args, message):
    code, _, err = run_ttc("fit", "--config", TINY, *FAST, *args)
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("ttc: error:")]
    assert line.startswith(message), line
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("rollouts*.jsonl"))  # refused before the first step


@pytest.mark.slow
def test_tensor_parallelism_is_refused_naming_the_sizes_to_set(tmp_path, kill_on_exit):
    proc = start_ttc(tmp_path, "--trainer.devices", "2", "--trainer.strategy", STRATEGY % (1, 2, "false"))
    kill_on_exit(proc)
    code, out = finish(proc, tmp_path)
    assert code == 1
    assert (
        "ttc: error: trainer.strategy: ModelParallelStrategy with tensor_parallel_size 2: ttc shards with FSDP2 only; "
        "set tensor_parallel_size: 1 and data_parallel_size: 2"
    ) in out
    assert out.count("ttc: error:") == 1  # refused before Lightning starts the second process, which would say it too
    assert "Traceback" not in out


def ttc(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`ttc ARGS` as its own process (Lightning starts the second rank by running the command again)."""
    done = subprocess.run(
        [sys.executable, "-m", "ttc_lightning", *args],
        cwd=tmp_path,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [FSDP, DDP], ids=["fsdp", "ddp"])
def test_evaluation_on_two_ranks_counts_each_prompt_once(tmp_path, strategy):
    # 3 prompts, one per batch, on 2 ranks: each rank runs 2 batches (the second rank's second is the first prompt
    # again, which sharded sampling needs and the metrics must not count); predict must not leave a rank waiting
    sample = Path(SAMPLE_DIR)
    args = [
        *("--config", str(REPO / "configs" / "patch.yaml"), "--trainer.accelerator", "cpu", *strategy),
        *("--trainer.default_root_dir", "run", "--model.model_name_or_path", "tiny", "--model.max_new_tokens", "8"),
        *("--model.overlong_buffer", "{length: 2}", "--model.eval_num_samples", "2", "--model.eval_temperature", "1"),
        *("--model.gradient_checkpointing", "false", "--data.data_path", str(sample), "--data.val_batch_size", "1"),
    ]
    code, out = ttc(tmp_path, "validate", *args)
    assert code == 0, out[-3000:]
    assert "sync_dist" not in out
    summary = json.loads((tmp_path / "run" / "logs" / "version_0" / "metrics.json").read_text())
    assert summary["num_prompts"] == 3  # the sample's 3 validation pairs
    code, out = ttc(tmp_path, "predict", *args)
    assert code == 0, out[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "logs" / "version_1" / "predictions.jsonl").open()]
    tests = [json.loads(x) for x in (sample / "primevul_test_paired.jsonl").open()]
    assert sorted(line["id"] for line in lines) == sorted(str(r["idx"]) for r in tests if r["target"] == 1)
