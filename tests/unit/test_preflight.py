"""The checks before a run starts: where the model and the data come from, the Hub probe, the cache, one message."""

import http.server
import inspect
import re
import threading
import time

import pytest
from jsonargparse import Namespace

from tests.helpers import UNREACHABLE
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.errors import TTCError
from ttc_lightning.run import preflight


def test_hub_ids_paths_and_tiny(tmp_path):
    assert preflight.is_hub_id("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert preflight.is_hub_id("gpt2")
    assert not preflight.is_hub_id("tiny")
    assert not preflight.is_hub_id(str(tmp_path))  # exists
    for path in ("/models/qwen", "./qwen", "../qwen", "~/qwen", "models/qwen/v2"):
        assert not preflight.is_hub_id(path), path


def test_probe_answers_for_a_server_and_fails_fast_for_nothing(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # BaseHTTPRequestHandler answers HEAD with 501: any status means the Hub is up.
        assert preflight.hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
    started = time.perf_counter()
    assert not preflight.hub_reachable(UNREACHABLE, timeout=2)
    assert time.perf_counter() - started < 2.5


def cache_file(cache, kind, repo_id, filename):
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0123abcd")
    path = repo / "snapshots" / "0123abcd" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_model_cached_needs_config_and_tokenizer(tmp_path):
    assert not preflight.model_cached("org/coder", tmp_path)
    cache_file(tmp_path, "models", "org/coder", "config.json")
    assert not preflight.model_cached("org/coder", tmp_path)  # no tokenizer file
    cache_file(tmp_path, "models", "org/coder", "tokenizer.json")
    assert preflight.model_cached("org/coder", tmp_path)


def test_dataset_cached_in_the_hub_cache_or_datasets_cache(hub_env):
    cache = hub_env / "hub"
    assert not preflight.dataset_cached("org/primevul", cache)
    (hub_env / "datasets" / "org___primevul").mkdir(parents=True)  # prepared by `datasets`
    assert preflight.dataset_cached("org/primevul", cache)
    assert not preflight.dataset_cached("org/other", cache)
    cache_file(cache, "datasets", "org/other", "README.md")
    assert preflight.dataset_cached("org/other", cache)


def config(model_name, data_path=SAMPLE_DIR, rewards=("ttc_lightning.rewards.char_fraction_reward",), **model_args):
    """The parts of a parsed `ttc fit` config the checks read (the rest of the module's options at their defaults)."""
    from ttc_lightning.module import GRPOModule

    defaults = {
        name: p.default
        for name, p in inspect.signature(GRPOModule.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    args = {**defaults, "rewards": list(rewards), "model_name_or_path": model_name, **model_args}
    data_args = {"data_path": data_path, "train_split": "train", "val_split": "valid", "test_split": "test"}
    return Namespace(
        trainer=Namespace(logger=None, default_root_dir="runs/x"),
        model=Namespace(class_path="ttc_lightning.GRPOModule", init_args=Namespace(**args)),
        data=Namespace(class_path="ttc_lightning.data.PrimeVulPatchDataModule", init_args=Namespace(**data_args)),
    )


def test_uncached_model_and_data_without_network_are_one_error(hub_env, probes):
    with pytest.raises(TTCError) as info:
        preflight.check_before_start(config("org/not-cached", "hf://org/not-cached-data"), "fit")
    message = str(info.value)
    assert message.startswith("2 problems: (1) model.model_name_or_path: org/not-cached is not in the Hugging Face")
    assert "; (2) data.data_path: hf://org/not-cached-data is not in the Hugging Face cache" in message
    assert "hf download org/not-cached-data --repo-type dataset" in message
    assert probes == [UNREACHABLE]  # one probe for both
    assert preflight.offline_requested()  # the run goes on offline: the libraries read the cache, no retries
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


def test_a_cached_model_passes_offline_without_a_probe(hub_env, probes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TTCError, match=r"^model.model_name_or_path: org/coder is not in the Hugging Face cache"):
        preflight.check_before_start(config("org/coder"), "fit")  # not cached yet: the one problem
    for filename in ("config.json", "tokenizer_config.json"):
        cache_file(hub_env / "hub", "models", "org/coder", filename)
    preflight.check_before_start(config("org/coder"), "fit")  # cached: no TTCError
    assert probes == []  # offline was asked for: nothing to probe


def test_local_paths_are_never_probed_and_every_problem_is_listed(hub_env, probes, tmp_path):
    (tmp_path / "primevul").mkdir()
    (tmp_path / "primevul" / "primevul_train_paired.jsonl").write_text("")
    bad = config(
        str(tmp_path / "no-model"),
        str(tmp_path / "primevul"),
        rewards=["ttc_lightning.rewards.missing"],
        num_generations=1,
    )
    with pytest.raises(TTCError) as info:
        preflight.check_before_start(bad, "fit")
    message = str(info.value)
    assert message.startswith("4 problems: (1) ")
    problems = [p.strip().removesuffix(";") for p in re.split(r"\(\d\) ", message)[1:]]
    assert problems[0] == (
        f"model.model_name_or_path: {tmp_path / 'no-model'} does not exist; give a model directory, a Hugging Face "
        "Hub id (org/name) or tiny"
    )
    # fit reads train (there, paired) and valid (missing); test is not read by fit
    assert problems[1] == (
        f"data.data_path: {tmp_path / 'primevul'} has no primevul_valid.jsonl or primevul_valid_paired.jsonl "
        "(split 'valid'); it holds ['primevul_train_paired.jsonl']"
    )
    assert problems[2].startswith("model.rewards[0]: cannot import 'ttc_lightning.rewards.missing'")
    assert problems[3].startswith("model.num_generations must be >= 2")
    assert probes == []


def test_prompt_options_are_checked_with_the_rest(probes, tmp_path):
    bad = config(str(tmp_path / "no-model"))
    bad.data.init_args.system_prompt = str(tmp_path / "missing.txt")
    bad.data.init_args.user_template = "Fix {cwe} in {function}"
    with pytest.raises(TTCError) as info:
        preflight.check_before_start(bad, "fit")
    problems = [p.strip().removesuffix(";") for p in re.split(r"\(\d\) ", str(info.value))[1:]]
    named = ["model.model_name_or_path", "data.system_prompt", "data.user_template"]
    assert [p.split(":")[0] for p in problems] == named
    assert problems[1].endswith("missing.txt does not exist; give a file that holds the text, or the text itself")
    assert problems[2] == "data.user_template: {function} is not a field of this task; it has {func}, {cwe}, {cve_desc}"

    good = config("tiny")
    (tmp_path / "system.txt").write_text("Fix the function.")
    good.data.init_args.system_prompt = str(tmp_path / "system.txt")
    good.data.init_args.user_template = "Fix {cwe} in {func}"
    preflight.check_before_start(good, "fit")  # no TTCError


def test_evaluating_data_that_is_not_set_is_found_before_the_run(probes, tmp_path):
    checked = config("tiny")
    checked.data.init_args.val_split = None  # a config that trains without validation
    assert preflight.data_problems(checked.data, "fit", online=True, cache_dir=tmp_path) == []
    assert preflight.data_problems(checked.data, "validate", online=True, cache_dir=tmp_path) == [
        "data.val_split is null (this config trains without validation): there is nothing to validate on; name a "
        "split, e.g. --data.val_split valid"
    ]
    prompts = Namespace(
        class_path="ttc_lightning.data.PromptDataModule", init_args=Namespace(val_path=None, test_path=None)
    )
    assert preflight.data_problems(prompts, "fit", online=True, cache_dir=tmp_path) == []
    for subcommand, key in (("validate", "val_path"), ("test", "test_path"), ("predict", "test_path")):
        assert preflight.data_problems(prompts, subcommand, online=True, cache_dir=tmp_path) == [
            f"data.{key} is not set: `ttc {subcommand}` needs {key.removesuffix('_path')} prompts"
        ]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_the_sample_data_and_tiny_pass(probes, tmp_path, subcommand):
    checked = config("tiny")
    # no network and an empty cache: the tiny model and the sample's splits need neither
    assert preflight.model_problems("tiny", online=False, cache_dir=tmp_path) == []
    assert preflight.data_problems(checked.data, subcommand, online=False, cache_dir=tmp_path) == []
    preflight.check_before_start(checked, subcommand)  # no TTCError
    assert probes == []  # nothing comes from the Hub: no probe


def test_lightning_options_a_ttc_run_cannot_take_are_refused_before_it_starts():
    checkpoint = Namespace(every_n_epochs=1, every_n_train_steps=50, save_top_k=3)
    assert preflight.checkpoint_problems(checkpoint)[0].startswith(
        "checkpoint.every_n_epochs: ttc saves every checkpoint.every_n_train_steps optimizer steps"
    )
    checkpoint.every_n_train_steps = None  # by epochs alone: Lightning's to take
    assert preflight.checkpoint_problems(checkpoint) == []
    assert preflight.accumulation_problems(Namespace(accumulate_grad_batches=1)) == []
    problems = preflight.accumulation_problems(Namespace(accumulate_grad_batches=2))
    assert problems[0].startswith("trainer.accumulate_grad_batches 2: a ttc step already accumulates")


def test_checkpoints_that_could_not_resume_are_refused():
    assert preflight.checkpoint_problems(Namespace(save_weights_only=False, save_top_k=3)) == []
    assert preflight.checkpoint_problems(Namespace(save_weights_only=False, save_top_k=-1)) == []  # keep all
    problems = preflight.checkpoint_problems(Namespace(save_weights_only=True, save_top_k=-5))
    assert [p.split(":")[0] for p in problems] == [
        "checkpoint.save_weights_only",
        "checkpoint.save_top_k must be -1 (keep all) or >= 0, got -5",
    ]
