"""Checkpoint contents and files: non-finite weights refused, atomic writes, damaged files as one-line errors, the
base-model fingerprint and the checks a loaded checkpoint must pass."""

import logging
import re
from pathlib import Path

import pytest
import torch

from ttc_lightning.errors import TTCError
from ttc_lightning.model.loading import LoRA
from ttc_lightning.model.tiny import build_tiny_model, build_tiny_tokenizer
from ttc_lightning.run.checkpoints import (
    base_fingerprint,
    check_finite,
    check_identity,
    check_lora_shape,
    check_shapes,
    fingerprint_difference,
    read_checkpoint,
    run_identity,
    start_next_epoch_afresh,
    trim_state,
    unreadable,
)
from ttc_lightning.run.saving import AtomicCheckpointIO, remove_partial_files

# --- non-finite weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, bad])}
    with pytest.raises(
        TTCError, match=r"not saving a checkpoint at step 7: 1 weights are NaN or infinite \(first: b\)"
    ):
        check_finite(state, 7)


@pytest.mark.parametrize(
    ("precision", "dtype", "advice"),
    [
        ("16-true", torch.float16, "trainer.precision 16-true keeps the trained weights in float16: use bf16-mixed or"),
        ("bf16-true", torch.bfloat16, "trainer.precision bf16-true keeps the trained weights in bfloat16: use bf16"),
        ("32-true", torch.float16, "b is float16: train the weights in float32 (model.dtype auto"),
        ("bf16-mixed", torch.float32, "Lower model.learning_rate or check the reward functions"),
        (None, torch.float32, "Lower model.learning_rate or check the reward functions"),
    ],
)
def test_the_advice_for_non_finite_weights_names_a_half_precision(precision, dtype, advice):
    # In half precision the loss and gradient norm can stay finite while the weights turn NaN: the learning rate and
    # the rewards are not the first suspects there.
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")], dtype=dtype)}
    with pytest.raises(TTCError, match=re.escape(advice) + ".*, then resume with --ckpt_path last$"):
        check_finite(state, 7, precision)


def test_finite_and_integer_tensors_pass():
    state = {"w": torch.ones(2, 2), "steps": torch.tensor([3]), "note": "text"}  # only floating-point tensors checked
    kept = trim_state(state, set(), lora=False, step=1)  # check_finite raises nothing: the state is saved as it is
    assert list(kept) == ["w", "steps", "note"] and all(kept[k] is state[k] for k in state)


def test_trim_state_refuses_non_finite_trainable_weights_only():
    state = {"policy.lora_A": torch.ones(2), "policy.base": torch.tensor([float("nan")])}
    # under LoRA only the adapters are saved: a NaN in a frozen weight is not the checkpoint's
    assert list(trim_state(state, {"policy.lora_A"}, lora=True, step=1)) == ["policy.lora_A"]
    with pytest.raises(TTCError, match="first: policy.base"):
        trim_state(state, {"policy.lora_A"}, lora=False, step=1)


# --- writing and reading files ----------------------------------------------------------------------------------


def ttc_checkpoint(step: int = 3) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.arange(4.0)}, "ttc": {"lora": False}}


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(ttc_checkpoint(1), path)
    io.save_checkpoint(ttc_checkpoint(2), path)
    assert read_checkpoint(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_save_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(ttc_checkpoint(1), path)
    before = path.read_bytes()

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(TTCError, match=f"cannot write {re.escape(str(path))}: No space left"):
        io.save_checkpoint(ttc_checkpoint(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_partial_files_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.123.partial").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"y")
    remove_partial_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def damaged(tmp_path: Path, how: str) -> Path:
    good = tmp_path / "good.ckpt"
    torch.save(ttc_checkpoint(), good)
    data = good.read_bytes()
    path = tmp_path / f"{how}.ckpt"
    if how == "empty":
        path.write_bytes(b"")
    elif how == "head":
        path.write_bytes(data[:64])
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "tail-cut":
        path.write_bytes(data[:-10])
    elif how == "text":
        path.write_text("not a checkpoint\n")
    elif how == "zeros":
        path.write_bytes(bytes(len(data)))
    return path


DAMAGE = {
    "empty": "is empty",
    "head": "cannot be read, it is truncated or corrupt",
    "half": "cannot be read, it is truncated or corrupt",
    "tail-cut": "cannot be read, it is truncated or corrupt",
    "text": "is not a PyTorch checkpoint (it starts with b'not a ch', not a zip archive)",
    "zeros": "is not a PyTorch checkpoint (it starts with b'\\x00",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, how):
    path = damaged(tmp_path, how)
    with pytest.raises(TTCError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"--ckpt_path: {path} {DAMAGE[how]}"), message
    assert "\n" not in message


def test_torchs_words_are_whole_or_marked_as_cut(tmp_path):
    path = damaged(tmp_path, "half")
    short = unreadable(path, RuntimeError("PytorchStreamReader failed. More text.\nsecond line"))
    assert str(short).endswith(
        "(RuntimeError: PytorchStreamReader failed. More text.); use another checkpoint of the run"
    )
    long = unreadable(path, RuntimeError("x" * 300))
    assert f"(RuntimeError: {'x' * 157}...); use another" in str(long)  # 157 + "..." = 160 characters


@pytest.mark.parametrize("how", ["half", "text"])
def test_lightning_loading_a_damaged_checkpoint_is_a_one_line_error(tmp_path, how):
    with pytest.raises(TTCError, match=re.escape(DAMAGE[how])):
        AtomicCheckpointIO().load_checkpoint(damaged(tmp_path, how))


def test_missing_checkpoint_and_directory(tmp_path):
    with pytest.raises(TTCError, match="nope.ckpt does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(TTCError, match=r"is a directory; give a checkpoint file in it, or `last` or `best`"):
        read_checkpoint(tmp_path)
    with pytest.raises(TTCError, match="nope.ckpt does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


def test_a_foreign_checkpoint_is_named_as_such(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(TTCError, match="is not a ttc checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")


# --- fingerprint --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_fingerprint_is_the_same_for_every_way_one_model_is_loaded(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    half = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    # bf16 rounds each weight by at most 2^-9 of itself: the L1 norms agree well inside the 1e-3 tolerance
    assert fingerprint_difference(base_fingerprint(model), base_fingerprint(half)) is None
    # embedding, the final norm and 2 norms per layer of the 2-layer model
    assert len(base_fingerprint(model)["tensors"]) == 1 + 1 + 2 * 2


def test_fingerprint_tells_other_weights_and_other_shapes(tokenizer):
    base = base_fingerprint(build_tiny_model(tokenizer, seed=0))
    other = base_fingerprint(build_tiny_model(tokenizer, seed=1))
    assert fingerprint_difference(base, other).startswith("its weights differ (model.embed_tokens.weight: L1 norm")
    wider = base_fingerprint(build_tiny_model(tokenizer, seed=0, hidden_size=96, num_heads=4))
    assert fingerprint_difference(base, wider).startswith("its architecture differs (config hash")


def test_fingerprint_ignores_lora(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(tokenizer, seed=0)
    before = base_fingerprint(model)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert fingerprint_difference(before, base_fingerprint(adapted)) is None


# --- checks of a loaded checkpoint ---------------------------------------------------------------------------------

FP = {"config": "c1", "tensors": {"model.norm.weight": [[4], 4.0]}}


def identity(**changes):
    values = {"name": "tiny", "fingerprint": FP, "lora": LoRA(r=4, alpha=8), "datamodule": None}
    values.update(changes)
    return run_identity(values["name"], values["fingerprint"], values["lora"], values["datamodule"])


class PrimeVulClassificationDataModule:
    label_mode = "cwe"


def test_identity_records_the_task_with_its_label_mode():
    assert identity(datamodule=PrimeVulClassificationDataModule())["task"] == (
        "PrimeVulClassificationDataModule label_mode=cwe"
    )


def test_same_identity_passes(caplog):
    with caplog.at_level(logging.WARNING, logger="ttc"):
        check_identity(identity(), identity(), allow_mismatch=False)  # no TTCError
        check_identity(identity(), identity(), allow_mismatch=True)
    assert caplog.records == []  # nothing differs: no "loaded anyway" warning either


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (identity(fingerprint={**FP, "config": "c2"}), "was trained on base model 'tiny', and another model of that"),
        (
            identity(name="Qwen/X", fingerprint={"config": "c1", "tensors": {"model.norm.weight": [[4], 5.0]}}),
            r"was trained on base model 'Qwen/X', and model.model_name_or_path 'tiny' differs: its weights differ "
            r"\(model.norm.weight: L1 norm 4, the checkpoint's base 5\)",
        ),
        (identity(lora=LoRA(r=4, alpha=16)), r"was trained with model.lora alpha=16 \(now 8\)"),
        (identity(lora=LoRA(r=4, alpha=8, dropout=0.1)), r"was trained with model.lora dropout=0.1 \(now 0.0\)"),
    ],
    ids=["config", "weights", "lora-alpha", "lora-dropout"],
)
def test_mismatch_is_refused_or_allowed_with_a_warning(saved, message, caplog):
    with pytest.raises(TTCError, match=f"--ckpt_path: the checkpoint {message}"):
        check_identity(saved, identity(), allow_mismatch=False)
    with caplog.at_level(logging.WARNING, logger="ttc"):
        check_identity(saved, identity(), allow_mismatch=True)
    assert "loaded anyway: model.allow_checkpoint_mismatch" in caplog.text


def test_task_mismatch_is_refused():
    saved = {**identity(), "task": "PrimeVulPatchDataModule"}
    current = {**identity(), "task": "PromptDataModule"}
    with pytest.raises(TTCError, match="trained on task PrimeVulPatchDataModule, this run's data module is Prompt"):
        check_identity(saved, current, allow_mismatch=False)
    check_identity(saved, {**current, "task": None}, allow_mismatch=False)  # no data module (export): not compared


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        (
            "P prompts=abc",
            "P",
            "with data.system_prompt/data.user_template of hash abc, and this run has the task's own",
        ),
        (
            "P",
            "P prompts=def",
            "with the task's own prompts, and this run has data.system_prompt/data.user_template of",
        ),
        (
            "P prompts=abc",
            "P prompts=def",
            "with .* of hash abc, and this run has .*user_template of hash def",
        ),
    ],
)
def test_a_prompt_mismatch_names_the_prompt_options(saved, now, message):
    with pytest.raises(TTCError, match=f"the checkpoint was trained {message}"):
        check_identity({**identity(), "task": saved}, {**identity(), "task": now}, allow_mismatch=False)


TRAIN = {"options": "data.data_path / data.train_split", "source": "d/primevul_train_paired.jsonl", "digest": "aa"}


def with_data(data, task="PrimeVulPatchDataModule"):
    return {**identity(), "task": task, "data": data}


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (
            {**TRAIN, "source": "e/primevul_train_paired.jsonl", "digest": "bb"},
            "was trained on other data: e/primevul_train_paired.jsonl (sha256 bb), and this run's data.data_path / "
            "data.train_split read d/primevul_train_paired.jsonl (sha256 aa)",
        ),
        (
            {**TRAIN, "digest": "bb"},
            "was trained on d/primevul_train_paired.jsonl (sha256 bb), which has changed since "
            "(data.data_path / data.train_split: sha256 aa)",
        ),
    ],
    ids=["other-file", "file-changed"],
)
def test_other_training_data_is_refused_or_allowed_with_a_warning(saved, message, caplog):
    with pytest.raises(TTCError) as error:
        check_identity(with_data(saved), with_data(TRAIN), allow_mismatch=False)
    assert str(error.value) == (
        f"--ckpt_path: the checkpoint {message}; use the settings of the run that wrote it, or "
        "--model.allow_checkpoint_mismatch true"
    )
    with caplog.at_level(logging.WARNING, logger="ttc"):
        check_identity(with_data(saved), with_data(TRAIN), allow_mismatch=True)
    assert "loaded anyway: model.allow_checkpoint_mismatch" in caplog.text


def test_training_data_is_compared_by_its_bytes_and_only_when_both_are_known():
    moved = {**TRAIN, "source": "elsewhere/primevul_train_paired.jsonl"}
    check_identity(with_data(moved), with_data(TRAIN), allow_mismatch=False)  # the same bytes elsewhere
    check_identity({**identity(), "task": "PrimeVulPatchDataModule"}, with_data(TRAIN), allow_mismatch=False)  # old
    check_identity(with_data({**TRAIN, "digest": "bb"}), with_data(None), allow_mismatch=False)  # an evaluation
    hub = {"options": TRAIN["options"], "source": "hf://a/b (train, paired)", "digest": None}
    check_identity(with_data(hub), with_data(hub), allow_mismatch=False)
    other = r"other data: hf://a/b \(train, paired\), and this run's .* read hf://a/c \(train, paired\);"
    with pytest.raises(TTCError, match=other):
        check_identity(with_data(hub), with_data({**hub, "source": "hf://a/c (train, paired)"}), allow_mismatch=False)
    # another data module is another task, said once: its data is not compared as well
    with pytest.raises(TTCError) as error:
        check_identity(with_data({**TRAIN, "digest": "bb"}, "PromptDataModule"), with_data(TRAIN), False)
    assert "trained on task PromptDataModule" in str(error.value) and "sha256" not in str(error.value)


def test_a_checkpoint_without_fingerprint_loads_with_a_warning(caplog):
    old = {"model_name_or_path": "tiny", "lora": True}  # what ttc 0.1 wrote
    with caplog.at_level(logging.WARNING, logger="ttc"):
        check_identity(old, identity(), allow_mismatch=False)
    assert "records no fingerprint of its base model (tiny; written by an earlier ttc)" in caplog.text


@pytest.mark.parametrize(("field", "value"), [("r", 8), ("target_modules", ["q_proj"])])
def test_lora_shape_settings_are_never_allowed_to_differ(field, value):
    saved = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    with pytest.raises(TTCError, match=f"model.lora.{field}: the checkpoint's adapters were trained with {field}="):
        check_lora_shape(saved, {**saved, field: value})
    check_lora_shape(None, {**saved, field: value})  # an old checkpoint: its shapes are checked instead


def test_shape_and_name_checks():
    current = {"lora_A": torch.zeros(4, 8), "base": torch.zeros(8, 8)}
    with pytest.raises(TTCError, match=r"lora_A has shape \[8, 8\] in the checkpoint but \[4, 8\] in this model"):
        check_shapes({"lora_A": torch.zeros(8, 8)}, current, {"lora_A"}, lora=True)
    with pytest.raises(TTCError, match=r"1 checkpoint weights do not exist in this model \(first: lora_B\)"):
        check_shapes({"lora_B": torch.zeros(4, 8)}, current, {"lora_A"}, lora=True)
    with pytest.raises(TTCError, match=r"1 of this model's weights are not in the checkpoint \(first: base\)"):
        check_shapes({"lora_A": torch.zeros(4, 8)}, current, set(current), lora=False)


def fit_loop(epoch_started: int, epoch_completed: int, batches: int, last_batch: bool) -> dict:
    counts = {"ready": batches, "completed": batches, "started": batches, "processed": batches}
    epochs = {"ready": epoch_started, "completed": epoch_completed, "started": epoch_started, "processed": 0}
    return {
        "loops": {
            "fit_loop": {
                "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
                "epoch_loop.batch_progress": {
                    "total": dict(counts),
                    "current": dict(counts),
                    "is_last_batch": last_batch,
                },
            }
        }
    }


@pytest.mark.parametrize(
    ("loop", "reset"),
    [
        (fit_loop(1, 1, 6, True), True),  # written after epoch 0's 6th and last batch, at the end of fit
        (fit_loop(1, 1, 2, False), False),  # max_steps in the middle of the epoch: Lightning counts it completed too
        (fit_loop(1, 0, 6, True), False),  # written at the last batch's end, before the epoch ended: Lightning's case
    ],
    ids=["epoch-ended", "stopped-mid-epoch", "saved-at-batch-end"],
)
def test_only_a_finished_epochs_batch_counts_are_reset(loop, reset):
    start_next_epoch_afresh(loop)
    batches = loop["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert (batches["current"] == dict.fromkeys(batches["current"], 0)) is reset
    if reset:
        assert batches["is_last_batch"] is False
    assert batches["total"]["completed"] > 0  # the run's totals (logging steps) are kept
