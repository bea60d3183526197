"""`ttc export` on tiny-model checkpoints: the exported directory reproduces the trained policy's logits."""

import json
import os
import shutil
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import FAST, HELPERS, OLD_FULL, OLD_LORA, TINY
from ttc_lightning.model.tiny import CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer, save_tiny
from ttc_lightning.run.export import base_model_card_name, base_model_reference, main

INPUT_IDS = torch.arange(1, 17).unsqueeze(0)  # [1, 16] arbitrary fixed tokens


class RecordLogits(L.Callback):
    """Saves the trained policy's logits on INPUT_IDS when fit ends: what the export must reproduce."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            logits = pl_module.policy.eval()(input_ids=INPUT_IDS).logits
        torch.save(logits, Path(trainer.default_root_dir) / "logits.pt")


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def train(run_ttc, *args: str) -> tuple[Path, torch.Tensor]:
    """Two steps on the tiny model -> (last checkpoint, trained logits)."""
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        "run",
        "--model.rewards",
        f"[{HELPERS}.distinct_chars_reward]",
        "--trainer.callbacks+=tests.integration.test_export.RecordLogits",
        *FAST,
        *args,
    )
    assert code == 0, err
    return Path("run/checkpoints/last.ckpt").resolve(), torch.load("run/logits.pt")


@pytest.mark.slow
def test_lora_export_as_adapter_and_merged_gives_the_trained_logits(run_ttc, tmp_path, capsys):
    ckpt, trained = train(run_ttc, "--model.lora", "{r: 4, alpha: 8}")
    out = tmp_path / "exported"

    main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    config = json.loads((out / "adapter_config.json").read_text())
    # The tiny base only exists while ttc runs, so the export carries it and points the adapter at it.
    assert config["base_model_name_or_path"] == str(out / "base_model")
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert not torch.allclose(logits_of(base), trained, atol=1e-4)  # training moved the adapter off zero
    adapter = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits_of(adapter), trained, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE

    main(["--ckpt_path", str(ckpt), "--output_dir", str(out), "--merge", "--overwrite"])
    assert not (out / "adapter_config.json").exists()  # the previous export's files are gone
    merged = AutoModelForCausalLM.from_pretrained(out)
    # Merging changes the order of the additions (W + BA vs Wx + BAx), hence the looser tolerance.
    torch.testing.assert_close(logits_of(merged), trained, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert "ttc: exported" in capsys.readouterr().err


@pytest.mark.slow
def test_full_finetune_export_gives_the_trained_logits(run_ttc, tmp_path, capsys):
    ckpt, trained = train(run_ttc)
    assert not torch.allclose(logits_of(build_tiny_model(build_tiny_tokenizer())), trained, atol=1e-4)  # it trained
    out = tmp_path / "exported"
    main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits_of(model), trained, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE

    # A run directory stands for its newest checkpoint, as --ckpt_path last does.
    code, err = run_export(capsys, "--ckpt_path", str(ckpt.parents[1]), "--output_dir", str(tmp_path / "from_run"))
    assert code == 0 and f"ttc: exporting {ckpt}, the newest checkpoint of {ckpt.parents[1]}" in err
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "from_run")), trained)

    # A full fine-tune is already one model: --merge says so and writes the same model.
    code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--merge")
    assert code == 0
    assert "ttc: note: --merge: the checkpoint is a full fine-tune, it has no adapter to merge\n" in err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(model), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tiny_adapter_names_tiny_in_its_card_and_loads_after_the_export_is_moved(run_ttc, tmp_path, monkeypatch):
    ckpt, trained = train(run_ttc, "--model.lora", "{r: 4, alpha: 8}")
    out = tmp_path / "exported"
    main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    card = ModelCard.load(out / "README.md")
    # Training loaded "tiny" from a temporary directory; the card must not name it.
    assert card.data.base_model == "tiny" and "base_model:adapter:tiny" in card.data.tags
    assert "ttc-tiny-" not in card.content

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    torch.testing.assert_close(logits_of(AutoPeftModelForCausalLM.from_pretrained(out)), trained, atol=1e-5, rtol=1e-5)
    moved = Path(shutil.move(out, tmp_path / "moved"))
    base = AutoModelForCausalLM.from_pretrained(moved / "base_model")
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(base, moved)), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_adapter_on_a_local_base_loads_after_the_export_is_moved(run_ttc, tmp_path, monkeypatch):
    base_dir = save_tiny(tmp_path / "my-base")
    ckpt, trained = train(run_ttc, "--model.lora", "{r: 4, alpha: 8}", "--model.model_name_or_path", "my-base")
    out = tmp_path / "exported"
    main(["--ckpt_path", str(ckpt), "--output_dir", str(out)])
    # peft resolves the base against the current directory, so the export records an absolute path.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert ModelCard.load(out / "README.md").data.base_model == "my-base"

    moved = Path(shutil.move(out, tmp_path / "elsewhere" / "moved"))
    monkeypatch.chdir(moved.parent)
    adapter = AutoPeftModelForCausalLM.from_pretrained(moved)
    torch.testing.assert_close(logits_of(adapter), trained, atol=1e-5, rtol=1e-5)


def test_base_reference_and_card_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "coder").mkdir(parents=True)
    hub_id = "Qwen/Qwen2.5-Coder-1.5B-Instruct"  # not a local directory here
    assert base_model_reference(hub_id) == hub_id and base_model_card_name(hub_id) == hub_id
    assert base_model_reference("models/coder") == str(tmp_path / "models" / "coder")
    assert base_model_card_name("models/coder") == "coder" and base_model_card_name("models/coder/..") == "models"
    (tmp_path / "tiny").mkdir()  # "tiny" is the built-in model even beside a directory of that name
    assert base_model_card_name("tiny") == "tiny"


def test_top_level_help_lists_export(run_ttc):
    code, out, _ = run_ttc("--help")
    assert code == 0
    assert "Subcommands: fit, validate, test, predict (below), export, generate and oracle" in " ".join(out.split())
    assert "export: `ttc export --ckpt_path CKPT --output_dir DIR [--merge]`" in " ".join(out.split())


def run_export(capsys, *args: str) -> tuple[int, str]:
    """`ttc export ARGS` in-process -> (exit code, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def fake_checkpoint(path: Path, **content) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, **content}, path)
    return path


def text_file(path: Path) -> Path:
    path.write_text("hello")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.ckpt", "missing.ckpt does not exist"),
        (lambda d: fake_checkpoint(d / "plain.ckpt", hyper_parameters={}), "plain.ckpt is not a ttc checkpoint"),
        (lambda d: text_file(d / "notes.ckpt"), "notes.ckpt is not a PyTorch checkpoint"),
        (lambda d: torch.save({"ttc": {}, "hyper_parameters": {}}, d / "bare.ckpt") or d / "bare.ckpt", "no weights"),
    ],
    ids=["missing", "not-ttc", "not-torch", "no-state-dict"],
)
def test_bad_checkpoints_are_one_line_errors(capsys, tmp_path, make, message):
    code, err = run_export(capsys, "--ckpt_path", str(make(tmp_path)), "--output_dir", str(tmp_path / "out"))
    assert code == 1
    assert err.startswith("ttc: error: --ckpt_path: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_output_dir_must_be_empty_unless_overwriting_an_export(capsys, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "x.ckpt", ttc={"model_name_or_path": "tiny", "lora": False}, hyper_parameters={})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(out))
    assert (
        code == 1
        and f"ttc: error: --output_dir: {out} is not empty; choose another directory or pass --overwrite" in err
    )
    code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(out), "--overwrite")
    assert code == 1 and "holds no exported model; --overwrite only replaces a previous export" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failed_overwrite_keeps_the_previous_export_and_rewards_need_not_import(
    run_ttc, tmp_path, capsys, monkeypatch
):
    ckpt, _ = train(run_ttc, "--model.lora", "{r: 4, alpha: 8}")
    out = tmp_path / "exported"
    assert run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(out))[0] == 0
    before = sorted(p.name for p in out.iterdir())
    # The run's reward module is not importable where the export runs: export needs no reward.
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["rewards"] = ["a_module_not_here.reward"]
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ttc_lightning.run.export.write_export", disk_full)
    code, err = run_export(capsys, "--ckpt_path", str(moved), "--output_dir", str(out), "--overwrite")
    assert code == 1 and f"ttc: error: cannot write {out}: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []  # no staging left
    monkeypatch.undo()
    code, err = run_export(capsys, "--ckpt_path", str(moved), "--output_dir", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == before


def test_merging_a_4bit_runs_adapter_says_it_goes_into_the_unquantised_base(run_ttc, tmp_path, capsys):
    ckpt, _ = train(run_ttc, "--model.lora", "{r: 4}", "--model.load_in_4bit", "true")
    code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    assert "ttc: note: --merge: the run trained its adapter over 4-bit weights; it is merged into the" in err
    assert (tmp_path / "merged" / "config.json").exists()


def test_an_export_has_the_modes_the_umask_gives(run_ttc, tmp_path, capsys):
    ckpt, _ = train(run_ttc, "--model.lora", "{r: 4}")
    previous = os.umask(0o027)  # group may read, others nothing
    try:
        code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "exported"))
    finally:
        os.umask(previous)
    assert code == 0, err
    out = tmp_path / "exported"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # not mkdtemp's 0700
    weights = out / "adapter_model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    assert all(stat.S_IMODE(p.stat().st_mode) in (0o640, 0o750) for p in out.rglob("*"))


def refuse(*args, **kwargs):
    raise AssertionError("export built the training module or a Trainer")


@pytest.mark.slow
@pytest.mark.parametrize("lora", [["--model.lora", "{r: 4, alpha: 8}"], []], ids=["lora", "full"])
def test_export_reads_only_the_policy_settings(run_ttc, tmp_path, capsys, monkeypatch, lora):
    ckpt, trained = train(run_ttc, *lora)
    checkpoint = torch.load(ckpt, weights_only=False)
    # Settings the training module refuses (or cannot import), beyond the ones the old export overrode.
    checkpoint["hyper_parameters"].update(
        rewards=["no.such.module.fn"], beta=-1.0, num_generations=1, max_new_tokens=10**9, loss_type="no-such-loss"
    )
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    monkeypatch.setattr("ttc_lightning.module.GRPOModule.__init__", refuse)
    monkeypatch.setattr("lightning.Trainer.__init__", refuse)

    code, err = run_export(capsys, "--ckpt_path", str(edited), "--output_dir", str(tmp_path / "out"))
    assert code == 0, err
    if lora:
        model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
        code, err = run_export(capsys, "--ckpt_path", str(edited), "--output_dir", str(tmp_path / "merged"), "--merge")
        assert code == 0, err
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(logits_of(merged), trained, atol=1e-4, rtol=1e-4)
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits_of(model), trained, atol=1e-5, rtol=1e-5)
    generated = model.generate(input_ids=INPUT_IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, INPUT_IDS.shape[1] + 4)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [OLD_LORA, OLD_FULL], ids=["lora", "full"])
def test_checkpoints_of_the_first_layout_export(run_ttc, tmp_path, ckpt):
    # Written by ttc 0.1 (beta 0.04, no base fingerprint): 2 steps of tiny.yaml, LoRA r 4 alpha 8 or full.
    code, _, err = run_ttc("export", "--ckpt_path", str(ckpt), "--output_dir", "out")
    assert code == 0, err
    assert f"ttc: warning: {ckpt} records no fingerprint of its base model (tiny; written by an earlier ttc)" in err
    if ckpt == OLD_LORA:
        model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
        code, _, err = run_ttc("export", "--ckpt_path", str(ckpt), "--output_dir", "merged", "--merge")
        assert code == 0, err
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(logits_of(merged), logits_of(model), atol=1e-4, rtol=1e-4)
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # The checkpoint's weights, under the names the policy had in training (the adapter's lora_B are still zero).
    exported = model.state_dict()
    for name, value in torch.load(ckpt, weights_only=False)["state_dict"].items():
        torch.testing.assert_close(exported[name.removeprefix("policy.")], value, atol=0, rtol=0)
    generated = model.generate(input_ids=INPUT_IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, INPUT_IDS.shape[1] + 4)


def ttc_checkpoint(path: Path, trained_lora: bool = False, state_dict=None, fingerprint=None, **hparams) -> Path:
    """A checkpoint of the tiny model as `ttc fit` writes one, with `hparams` (and nothing else) in hyper_parameters."""
    ttc = {"model_name_or_path": "tiny", "lora": trained_lora, "base_fingerprint": fingerprint}
    hparams = {"model_name_or_path": "tiny", "lora": {"r": 4} if trained_lora else None, **hparams}
    weights = state_dict or {"policy.model.norm.weight": torch.ones(64)}  # not empty: an empty one is damaged
    torch.save({"state_dict": weights, "ttc": ttc, "hyper_parameters": hparams}, path)
    return path


A_LORA_A = "policy.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"model_name_or_path": None}, "hyper_parameters.model_name_or_path is None, not a model name"),
        ({"lora": {"rank": 4}}, "hyper_parameters.lora is not LoRA settings"),
        ({"lora": "yes"}, "hyper_parameters.lora is 'yes', not LoRA settings nor null"),
        ({"dtype": "float8"}, "hyper_parameters.dtype is 'float8', not one of auto, float32, bfloat16, float16"),
        ({"load_in_4bit": "no"}, "hyper_parameters.load_in_4bit is 'no', not true or false"),
        ({"trained_lora": True, "lora": None}, "hyper_parameters.lora is None, but its weights are LoRA adapters"),
        ({"state_dict": {"scorer.x": torch.zeros(1)}}, "state_dict holds 'scorer.x', not a policy weight (policy.*)"),
        ({"model_name_or_path": "{tmp}"}, "hyper_parameters: model.model_name_or_path: cannot load the tokenizer of"),
        ({"fingerprint": {"config": "0", "tensors": {}}}, "hyper_parameters.model_name_or_path: the run trained on"),
        ({"state_dict": {"policy.lm_head.weight": torch.zeros(2, 2)}}, "policy.lm_head.weight has shape [2, 2]"),
        ({"state_dict": {"policy.model.norm.weight": torch.ones(64)}}, "state_dict lacks"),
        ({"trained_lora": True, "state_dict": {A_LORA_A: torch.zeros(8, 64)}}, "lora_A.default.weight has shape [8,"),
        ({"trained_lora": True, "state_dict": {"policy.base_model.model.lm_head.weight": 0}}, "are not adapter"),
    ],
    ids=[
        "name", "lora-fields", "lora-type", "dtype", "4bit", "lora-flag", "foreign", "no-model", "fingerprint",
        "shape", "missing", "rank", "not-adapter",
    ],
)  # fmt: skip
def test_bad_policy_settings_and_weights_are_one_line_errors(capsys, tmp_path, content, message):
    if content.get("model_name_or_path") == "{tmp}":  # a directory without a model
        content = {**content, "model_name_or_path": str(tmp_path)}
    ckpt = ttc_checkpoint(tmp_path / "x.ckpt", **content)
    code, err = run_export(capsys, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out"))
    assert code == 1
    assert err.startswith(f"ttc: error: --ckpt_path: {ckpt}: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
