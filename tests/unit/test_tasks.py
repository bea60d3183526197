"""The PrimeVul data modules on the shipped sample: rows, labels, order, filtering, batches, argument checks."""

from __future__ import annotations

import shutil
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.loader import ResumableLoader
from ttc_lightning.data.tasks import (
    PrimeVulClassificationDataModule,
    PrimeVulPatchDataModule,
    classification_prompt,
    patch_prompt,
)
from ttc_lightning.errors import TTCError

CLASSIFICATION_COLUMNS = {"prompt", "id", "label", "target", "cwe", "pair_id"}
PATCH_COLUMNS = {"prompt", "id", "cve", "cwe", "vulnerable_func", "fixed_func", "file_name"}
BLOCK_FORMAT = "<<<<<<< SEARCH\nlines copied exactly from the function\n=======\nreplacement lines\n>>>>>>> REPLACE"


class LineTokenizer:
    """One token per line of the last message: a prompt of an N-line function is N + 2 tokens (the ``` fences)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return list(range(messages[-1]["content"].count("\n") + 1))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(text.count("\n") + 1))}


def test_binary_rows_and_a_training_batch():
    dm = PrimeVulClassificationDataModule(batch_size=4)
    dm.setup("fit")
    # train: 12 pairs (24 functions) + 8 benign extras; valid: 3 pairs + 3 extras
    assert Counter(row["label"] for row in dm.train_rows) == {"vulnerable": 12, "benign": 20}
    assert len(dm.val_rows) == 9
    for row in dm.train_rows:
        assert row["label"] == ("vulnerable" if row["target"] == 1 else "benign")
        assert row["pair_id"] == "" and row["cwe"].startswith("CWE-")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == CLASSIFICATION_COLUMNS
    assert all(len(column) == 4 for column in batch.values())
    assert [m["role"] for m in batch["prompt"][0]] == ["system", "user"]
    assert batch["id"] == [row["id"] for row in dm.train_rows[:4]]  # no shuffling in the loader


def test_binary_prompt_lists_labels_and_answer_format():
    [system, user] = classification_prompt("int f(void) { return 0; }", ["vulnerable", "benign"])
    assert "- vulnerable:" in system["content"] and "- benign:" in system["content"]
    assert system["content"].endswith("<think>\n...\n</think>\n<answer>LABEL</answer>")
    assert user["content"] == "```c\nint f(void) { return 0; }\n```"


def test_paired_rows_share_pair_ids_and_stay_adjacent_outside_training():
    dm = PrimeVulClassificationDataModule(paired=True)
    dm.setup("fit")
    assert len(dm.train_rows) == 24 and len(dm.val_rows) == 6
    vulnerable, fixed = dm.val_rows[0::2], dm.val_rows[1::2]
    assert [r["pair_id"] for r in vulnerable] == [r["pair_id"] for r in fixed]
    assert {r["target"] for r in vulnerable} == {1} and {r["target"] for r in fixed} == {0}
    assert all(r["pair_id"] == f"{v['id']}-{r['id']}" for v, r in zip(vulnerable, fixed, strict=True))


def test_cwe_mode_takes_the_train_splits_top_k():
    dm = PrimeVulClassificationDataModule(label_mode="cwe", top_k=2)
    dm.setup("fit")
    # train vulnerable functions: CWE-787 x2, CWE-125 x2, eight other CWEs once; ties go by id number
    assert dm.labels == ["CWE-125", "CWE-787", "other"]
    assert Counter(row["label"] for row in dm.train_rows) == {"CWE-125": 2, "CWE-787": 2, "other": 8}
    assert {row["target"] for row in dm.train_rows} == {1}
    system = dm.train_rows[0]["prompt"][0]["content"]
    assert "- CWE-125 (Out-of-bounds Read)\n- CWE-787 (Out-of-bounds Write)\n- other\n" in system


def test_cwe_mode_test_stage_reads_labels_from_train():
    dm = PrimeVulClassificationDataModule(label_mode="cwe", top_k=2, paired=True)
    dm.setup("test")
    assert dm.labels == ["CWE-125", "CWE-787", "other"]
    # test pairs: CWE-416, CWE-787, CWE-369; only the vulnerable function of each is a row
    assert sorted(row["label"] for row in dm.test_rows) == ["CWE-787", "other", "other"]


def test_explicit_cwe_labels():
    dm = PrimeVulClassificationDataModule(label_mode="cwe", cwe_labels=["CWE-476", "CWE-190"])
    dm.setup("validate")
    # valid vulnerable functions: CWE-476, CWE-190, CWE-617
    assert sorted(row["label"] for row in dm.val_rows) == ["CWE-190", "CWE-476", "other"]


def test_balance_downsamples_the_majority_label():
    dm = PrimeVulClassificationDataModule(balance=True)
    dm.setup("fit")
    # 12 vulnerable, 20 benign -> 12 of each
    assert Counter(row["label"] for row in dm.train_rows) == {"vulnerable": 12, "benign": 12}


def test_row_order_depends_on_the_seed_only():
    def order(seed):
        dm = PrimeVulClassificationDataModule(seed=seed)
        dm.setup("fit")
        return [row["id"] for row in dm.train_rows]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))


def test_max_val_prompts_keeps_whole_pairs():
    dm = PrimeVulClassificationDataModule(paired=True, max_val_prompts=3)
    dm.setup("fit")
    # pairs are 2 rows: one fits in 3, a second would make 4
    assert len(dm.val_rows) == 2 and dm.val_rows[0]["pair_id"] == dm.val_rows[1]["pair_id"]
    dm.setup("validate")  # the cap is for validation during fit only
    assert len(dm.val_rows) == 6


def test_length_filter_with_an_explicit_tokenizer():
    dm = PrimeVulClassificationDataModule(max_prompt_tokens=22)
    dm.tokenizer = LineTokenizer()
    dm.setup("fit")
    # train functions have 12..30 lines; 15 of the 32 have at most 20 lines (20 + 2 fence lines = 22 tokens)
    assert len(dm.train_rows) == 15


def test_length_filter_drops_both_rows_of_a_pair():
    dm = PrimeVulClassificationDataModule(paired=True, max_prompt_tokens=24)
    dm.tokenizer = LineTokenizer()
    dm.setup("validate")
    # valid pairs have (22, 24), (17, 19), (14, 15) lines; the first pair's fix is 26 tokens, so both rows go
    assert len(dm.val_rows) == 4


def test_tokenizer_comes_from_the_attached_module():
    dm = PrimeVulPatchDataModule(max_prompt_tokens=22)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=LineTokenizer()))
    dm.setup("fit")
    # the user message is the function plus 8 lines (weakness, blank, description header, description, blank,
    # function header, two fences): 22 tokens fit a 14-line function, and session_close is the only one that short
    assert [row["id"] for row in dm.train_rows] == ["900388"]


def test_empty_split_after_filtering_is_an_error():
    dm = PrimeVulClassificationDataModule(max_prompt_tokens=3)
    dm.tokenizer = LineTokenizer()
    with pytest.raises(TTCError, match=r"\[train\]: no prompts left after filtering \(max_prompt_tokens=3\)"):
        dm.setup("fit")


def test_no_validation_split():
    dm = PrimeVulClassificationDataModule(val_split=None)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(TTCError, match="data.val_split is null .* e.g. --data.val_split valid"):
        dm.setup("validate")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "^data\\.batch_size must be >= 1, got 0"),
        ({"max_val_prompts": 0}, "^data\\.max_val_prompts must be >= 1, got 0; use val_split: null"),
        ({"num_workers": -1}, "^data\\.num_workers must be >= 0"),
        ({"label_mode": "multi"}, "^data\\.label_mode must be binary or cwe"),
        ({"label_mode": "cwe", "top_k": 0}, "^data\\.top_k must be >= 1"),
        ({"cwe_labels": ["CWE-787"]}, "^data\\.cwe_labels needs data\\.label_mode: cwe"),
        ({"label_mode": "cwe", "cwe_labels": ["787"]}, "^data\\.cwe_labels must be distinct CWE ids"),
        ({"data_path": "/nonexistent/primevul"}, "^data\\.data_path: /nonexistent/primevul does not exist"),
        ({"train_split": " "}, "^data\\.train_split: empty split name"),
    ],
)
def test_bad_arguments_say_how_to_fix_them(kwargs, message):
    # Each message starts with the option as a config names it (data.X), so a user can find the line to change.
    with pytest.raises(TTCError, match=message):
        PrimeVulClassificationDataModule(**kwargs)


def test_hub_ids_are_not_checked_on_disk():
    assert PrimeVulPatchDataModule(data_path="hf://colin/PrimeVul").data_path == "hf://colin/PrimeVul"


def test_patch_rows_and_batch():
    dm = PrimeVulPatchDataModule(batch_size=3)
    dm.setup("fit")
    assert (len(dm.train_rows), len(dm.val_rows)) == (12, 3)
    row = next(r for r in dm.train_rows if r["cwe"] == "CWE-401")
    assert row["cve"].startswith("CVE-0000-") and row["vulnerable_func"] != row["fixed_func"]
    system, user = row["prompt"]
    assert BLOCK_FORMAT in system["content"] and "<think>" in system["content"] and "<answer>" in system["content"]
    assert user["content"].startswith("Weakness: CWE-401 (Missing Release of Memory after Effective Lifetime)\n\n")
    assert user["content"].endswith(f"Vulnerable function:\n```c\n{row['vulnerable_func']}\n```")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == PATCH_COLUMNS and len(batch["prompt"]) == 3


def test_patch_rows_carry_the_file_name_or_none():
    # The sample's valid split: CVE-0000-0014's records have the release's "None" for a file name.
    dm = PrimeVulPatchDataModule()
    dm.setup("fit")
    assert {r["cve"]: r["file_name"] for r in dm.val_rows} == {
        "CVE-0000-0013": "cookie.c",
        "CVE-0000-0014": None,
        "CVE-0000-0015": "page.c",
    }


def test_patch_prompt_leaves_out_what_is_unknown():
    [_, user] = patch_prompt("int f;", cwe="", cve_desc=None)
    assert user["content"] == "Vulnerable function:\n```c\nint f;\n```"


def pairs_of(batch: dict[str, list]) -> list[str]:
    """The batch's pair ids, each once, after checking that every pair in it is whole (its two rows, adjacent)."""
    ids = batch["pair_id"]
    assert len(ids) % 2 == 0 and all(ids[i] == ids[i + 1] != "" for i in range(0, len(ids), 2)), ids
    assert all(sorted(batch["target"][i : i + 2]) == [0, 1] for i in range(0, len(ids), 2))
    return ids[::2]


@pytest.mark.parametrize("balance", [False, True])
def test_pair_batches_hold_whole_pairs_over_epochs_and_after_a_resume(balance):
    dm = PrimeVulClassificationDataModule(paired=True, pair_batches=True, balance=balance, batch_size=4)
    dm.setup("fit")
    # 12 training pairs, 2 a batch: 6 batches an epoch, each pair once
    trained = [0]
    loader = dm.train_dataloader()
    loader.trained = lambda: trained[0]
    epochs = [[pairs_of(batch) for batch in loader] for _ in range(2)]
    assert [len(epoch) for epoch in epochs] == [6, 6]
    assert sorted(p for batch in epochs[0] for p in batch) == sorted({row["pair_id"] for row in dm.train_rows})
    assert len({p for batch in epochs[0] for p in batch}) == 12
    assert Counter(row["label"] for row in dm.train_rows) == {"vulnerable": 12, "benign": 12}

    # Stopped after 2 batches of an epoch (the loader had fetched a third): the resumed loader goes on with the 4 left.
    iterator = iter(loader)
    next(iterator), next(iterator), next(iterator)
    trained[0] = 2
    state = loader.state_dict()
    resumed = PrimeVulClassificationDataModule(paired=True, pair_batches=True, balance=balance, batch_size=4)
    resumed.setup("fit")
    again = resumed.train_dataloader()
    again.load_state_dict(state)
    assert [pairs_of(batch) for batch in again] == epochs[0][2:]
    assert [pairs_of(batch) for batch in again] == epochs[1]


def test_pair_batches_give_ranks_whole_pairs():
    # Under DDP Lightning rebuilds the loader with a DistributedSampler over its items: with pair batches, pairs.
    dm = PrimeVulClassificationDataModule(paired=True, pair_batches=True, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        share = ResumableLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn, trained=int
        )
        batches = [pairs_of(batch) for batch in share]
        assert [len(batch) for batch in batches] == [2, 2, 2]  # 12 pairs: 6 a rank, 2 a batch
        seen += [p for batch in batches for p in batch]
    assert sorted(seen) == sorted({row["pair_id"] for row in dm.train_rows})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "^data\\.pair_batches needs paired: true"),
        ({"paired": True, "label_mode": "cwe"}, "^data\\.pair_batches needs label_mode: binary"),
        ({"paired": True, "batch_size": 3}, "^data\\.pair_batches needs an even data\\.batch_size .*got 3"),
    ],
)
def test_pair_batches_need_paired_binary_rows_and_an_even_batch(kwargs, message):
    with pytest.raises(TTCError, match=message):
        PrimeVulClassificationDataModule(pair_batches=True, **kwargs)


def test_prompt_options_replace_the_system_and_user_messages(tmp_path):
    system = tmp_path / "system.txt"
    system.write_text("Fix it. Answer in <answer> tags.")
    module = PrimeVulPatchDataModule(
        system_prompt=str(system), user_template="CWE: {cwe}\nIssue: {cve_desc}\n---\n{func}\n{{braces}} stay"
    )
    row = module.read("train", training=True)[0]
    assert row["prompt"][0] == {"role": "system", "content": "Fix it. Answer in <answer> tags."}  # read from the file
    user = row["prompt"][1]["content"]
    assert (
        user.startswith("CWE: CWE-") and "\n---\n" + row["vulnerable_func"] in user and user.endswith("{braces} stay")
    )
    default = PrimeVulPatchDataModule().read("train", training=True)[0]
    assert default["prompt"] != row["prompt"] and default["vulnerable_func"] == row["vulnerable_func"]
    classify = PrimeVulClassificationDataModule(system_prompt="Labels:\n{labels}", user_template="Code:\n{func}")
    prompt = classify.read("train", training=True)[0]["prompt"]
    assert (
        prompt[0]["content"]
        == "Labels:\n- vulnerable: the function contains a security vulnerability\n- benign: it does not"
    )
    assert prompt[1]["content"].startswith("Code:\n")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"user_template": "{function}"}, r"data.user_template: \{function\} is not a field of this task; it has "),
        ({"user_template": "{func"}, r"data.user_template: .*double a brace"),
        ({"system_prompt": "  "}, r"data.system_prompt: empty"),
        ({"system_prompt": "prompts/system.txt"}, r"data.system_prompt: prompts/system.txt does not exist; give a"),
        ({"user_template": "/tmp"}, r"data.user_template: /tmp is a directory"),
    ],
)
def test_bad_prompt_options_say_what_to_fix(options, message):
    with pytest.raises(TTCError, match=message):
        PrimeVulPatchDataModule(**options)


@pytest.mark.parametrize(
    ("task", "system", "message"),
    [
        (PrimeVulClassificationDataModule, "Answer with one of:\n{labels", r"\{labels is not closed; write \{labels\}"),
        (PrimeVulClassificationDataModule, "Labels: {label}", r"\{label\} is not a field of this task, whose system"),
        (PrimeVulPatchDataModule, "Fix {func}", r"\{func\} is not a field .* fills in nothing; the rest of it is used"),
    ],
)
def test_a_system_prompt_names_only_what_its_task_fills_in(task, system, message):
    with pytest.raises(TTCError, match=f"data.system_prompt: {message}"):
        task(system_prompt=system)
    # Braces that are no placeholder (C code, JSON) are text like any other.
    assert task(system_prompt='Reply as {"answer": ...}; code such as `if (x) { y(); }` is C.').system_text


def test_custom_prompts_are_part_of_the_checkpoints_task():
    from ttc_lightning.run.checkpoints import run_identity

    plain = run_identity("tiny", None, None, PrimeVulPatchDataModule())["task"]
    custom = run_identity("tiny", None, None, PrimeVulPatchDataModule(system_prompt="Be brief."))["task"]
    assert plain == "PrimeVulPatchDataModule" and custom.startswith("PrimeVulPatchDataModule prompts=")
    again = run_identity("tiny", None, None, PrimeVulPatchDataModule(system_prompt="Be brief."))["task"]
    assert again == custom


@pytest.mark.parametrize(
    ("task", "train_file"),
    [
        (PrimeVulPatchDataModule, "primevul_train_paired.jsonl"),
        (partial(PrimeVulClassificationDataModule, paired=True), "primevul_train_paired.jsonl"),
        (PrimeVulClassificationDataModule, "primevul_train.jsonl"),
    ],
    ids=["patch", "classification-paired", "classification"],
)
def test_the_checkpoints_identity_records_the_training_data(tmp_path, task, train_file):
    from ttc_lightning.run.checkpoints import run_identity

    data = Path(shutil.copytree(SAMPLE_DIR, tmp_path / "data"))
    dm = task(data_path=str(data))
    dm.setup("validate")
    assert dm.data_identity() is None  # no training data read: an evaluation compares none
    dm.setup("fit")
    record = run_identity("tiny", None, None, dm)["data"]
    assert record["options"] == "data.data_path / data.train_split" and record["source"] == str(data / train_file)
    moved = task(data_path=str(Path(shutil.copytree(data, tmp_path / "moved"))))
    moved.setup("fit")
    assert moved.data_identity()["digest"] == record["digest"]  # the same bytes elsewhere: the same data
    with (data / train_file).open("a") as f:
        f.write("\n")  # any change to the file, even one that reads the same
    changed = task(data_path=str(data))
    changed.setup("fit")
    assert changed.data_identity()["digest"] != record["digest"]
