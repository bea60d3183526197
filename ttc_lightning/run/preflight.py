"""What `ttc` checks before anything slow starts: that the model and the data can be found (offline too), that the
reward functions import, that the module's settings hold, that `fit` can write its checkpoints, that the precision's
package is installed and that W&B can start. Every problem is reported together, in one `TTCError`.

A Hugging Face Hub id needs the Hub or the local cache. Unless HF_HUB_OFFLINE is set, one short request asks whether
the Hub (HF_ENDPOINT, default huggingface.co) answers; when it does not, the run goes on offline (HF_HUB_OFFLINE=1),
so that the libraries read their cache instead of retrying the network, and whatever is not cached is reported here,
before the model loads. Local paths and the built-in `tiny` model need no network and are never probed.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from ttc_lightning.data.base import NO_VALIDATION_SPLIT, TaskDataModule
from ttc_lightning.data.primevul import HF_PREFIX
from ttc_lightning.errors import TTCError
from ttc_lightning.model.tiny import TINY
from ttc_lightning.rewards.entries import load_reward
from ttc_lightning.run.tracking import prepare_wandb
from ttc_lightning.settings import check_settings

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its boolean variables
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# The splits each subcommand reads, by the data module's option that names them.
SPLITS_READ = {
    "fit": ("train_split", "val_split"),
    "validate": ("val_split",),
    "test": ("test_split",),
    "predict": ("test_split",),
}
PROMPT_FILES_READ = {
    "fit": ("train_path", "val_path"),
    "validate": ("val_path",),
    "test": ("test_path",),
    "predict": ("test_path",),
}


# --- the Hub ---------------------------------------------------------------------------------------------------


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or transformers' older TRANSFORMERS_OFFLINE) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in TRUE_VALUES


def hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `endpoint` answers one HTTP request within `timeout` seconds (any status counts: it is up).

    The request runs in a thread that is abandoned at the deadline, since the socket timeout does not bound the
    name lookup.
    """
    answered = threading.Event()

    def probe() -> None:
        request = urllib.request.Request(endpoint, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, name="ttc-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process and the processes it starts, also in the Hugging Face libraries already
    imported (they read the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            setattr(loaded, attribute, True)


def hub_online() -> bool:
    """False when offline was asked for; else probes the Hub once and, if it does not answer, goes offline."""
    if offline_requested():
        return False
    endpoint = hub_endpoint()
    if hub_reachable(endpoint):
        return True
    go_offline()
    rank_zero_info(
        f"ttc: the Hugging Face Hub ({endpoint}) did not answer within {PROBE_TIMEOUT_S:g} s: running offline "
        "(HF_HUB_OFFLINE=1), from the local cache"
    )
    return False


def hf_home() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser()


def hub_cache_dir() -> Path:
    """Where models and datasets downloaded from the Hub are: HF_HUB_CACHE, else HF_HOME/hub."""
    return Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub").expanduser()


def model_cached(repo_id: str, cache_dir: Path) -> bool:
    """The Hub cache holds the model's config.json and its tokenizer's files (main revision)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)
        except ValueError:  # not a valid repository id
            return False

    return cached("config.json") and any(cached(name) for name in TOKENIZER_FILES)


def dataset_cached(repo_id: str, cache_dir: Path) -> bool:
    """`datasets` has a copy of the Hub dataset: the repository in the Hub cache, or the prepared dataset in its own
    cache (HF_DATASETS_CACHE, else HF_HOME/datasets)."""
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home() / "datasets").expanduser()
    return (cache_dir / f"datasets--{repo_id.replace('/', '--')}").is_dir() or (
        prepared / repo_id.replace("/", "___")
    ).is_dir()


def is_hub_id(name: str) -> bool:
    """`org/name` or `name` that is neither `tiny`, nor an existing path, nor written as a path (/, ., ~)."""
    if name == TINY or Path(name).expanduser().exists():
        return False
    return not name.startswith(("/", ".", "~")) and "\\" not in name and name.count("/") <= 1


def not_cached(field: str, what: str, cache_dir: Path) -> str:
    return (
        f"{field}: {what} is not in the Hugging Face cache ({cache_dir}) and the Hub cannot be reached: download it "
        f"where there is network (`hf download {what.removeprefix(HF_PREFIX)}"
        f"{' --repo-type dataset' if what.startswith(HF_PREFIX) else ''}` with the same HF_HOME), or give a local "
        "path"
    )


# --- the checks ------------------------------------------------------------------------------------------------


def init_args(section: Any) -> Any:
    """A `class_path`/`init_args` section's arguments (an empty dict when there are none)."""
    args = section.get("init_args") if section is not None and hasattr(section, "get") else None
    return args if args is not None else {}


def model_problems(name: str | None, online: bool, cache_dir: Path) -> list[str]:
    if not name or name == TINY:
        return []
    if is_hub_id(name):
        return (
            [] if online or model_cached(name, cache_dir) else [not_cached("model.model_name_or_path", name, cache_dir)]
        )
    if not Path(name).expanduser().exists():
        return [
            f"model.model_name_or_path: {name} does not exist; give a model directory, a Hugging Face Hub id "
            "(org/name) or tiny"
        ]
    return []


def data_problems(data: Any, subcommand: str | None, online: bool, cache_dir: Path) -> list[str]:
    """The data files (or Hub dataset) the subcommand reads, for the PrimeVul tasks and JSON-lines prompts."""
    args = init_args(data)
    problems = []
    data_path = args.get("data_path")
    if isinstance(data_path, str) and data_path.startswith(HF_PREFIX):
        repo_id = data_path.removeprefix(HF_PREFIX)
        if not online and not dataset_cached(repo_id, cache_dir):
            problems.append(not_cached("data.data_path", data_path, cache_dir))
    elif isinstance(data_path, str):
        problems += primevul_path_problems(Path(data_path), [args.get(k) for k in SPLITS_READ.get(subcommand, ())])
    if subcommand == "validate" and "val_split" in args and args.get("val_split") is None:
        problems.append(NO_VALIDATION_SPLIT)
    for key in PROMPT_FILES_READ.get(subcommand, ()):
        if subcommand != "fit" and key in args and args.get(key) is None:  # fit trains without validation prompts
            problems.append(f"data.{key} is not set: `ttc {subcommand}` needs {key.removesuffix('_path')} prompts")
        path = args.get(key)
        if isinstance(path, str) and not Path(path).is_file():
            problems.append(f"data.{key}: {path} is not a file (JSON lines with a `prompt` per line)")
    task = subclass_of(data.get("class_path"), TaskDataModule) if data is not None else None
    prompts = ((args.get("system_prompt"), None), (None, args.get("user_template"))) if task is not None else ()
    for system_prompt, user_template in prompts:  # one option at a time, so that a problem in each is reported
        try:
            task.prompt_texts(system_prompt, user_template)
        except TTCError as e:
            problems.append(str(e))
    return problems


def primevul_path_problems(path: Path, splits: Sequence[str | None]) -> list[str]:
    """The path exists and, for a directory, holds a file for each split read (paired or not)."""
    if not path.exists():
        return [
            f"data.data_path: {path} does not exist; give a directory with primevul_*.jsonl files, a .jsonl file, "
            f"or {HF_PREFIX}<repo_id>"
        ]
    if not path.is_dir():
        return []
    missing = [
        split
        for split in splits
        if split and not any((path / f"primevul_{split}{tail}.jsonl").is_file() for tail in ("", "_paired"))
    ]
    if not missing:
        return []
    present = sorted(p.name for p in path.glob("*.jsonl"))
    return [
        f"data.data_path: {path} has no primevul_{split}.jsonl or primevul_{split}_paired.jsonl (split {split!r}); "
        f"it holds {present}"
        for split in missing
    ]


def reward_problems(rewards: Any) -> list[str]:
    problems = []
    for i, entry in enumerate(rewards or []):
        try:
            load_reward(entry.as_dict() if hasattr(entry, "as_dict") else entry, f"model.rewards[{i}]")
        except TTCError as e:
            problems.append(str(e))
    return problems


def subclass_of(class_path: str | None, base: type) -> type | None:
    """The class `class_path` names when it imports and is `base` or a subclass of it (else None: jsonargparse
    reports a class path it cannot use)."""
    module, _, name = str(class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def settings_problems(model: Any) -> list[str]:
    """`GRPOModule`'s invariants (`settings.check_settings`) on the config, before the module is built."""
    from ttc_lightning.module import GRPOModule

    if model is None or subclass_of(model.get("class_path"), GRPOModule) is None:
        return []
    try:
        check_settings(init_args(model))
    except TTCError as e:
        return [str(e)]
    return []


def checkpoint_problems(checkpoint: Any) -> list[str]:
    """`checkpoint.*` settings that would lose a run: checkpoints without the optimizer and loop state cannot resume,
    and a negative `save_top_k` other than -1 (keep all) is refused by Lightning only after the model loaded."""
    if checkpoint is None:
        return []
    problems = []
    if checkpoint.get("save_weights_only"):
        problems.append(
            "checkpoint.save_weights_only: true writes checkpoints that cannot resume a run (no optimizer, schedule "
            "or data position); leave it false, and use `ttc export` for the weights alone"
        )
    if checkpoint.get("every_n_epochs") and checkpoint.get("every_n_train_steps"):
        problems.append(
            "checkpoint.every_n_epochs: ttc saves every checkpoint.every_n_train_steps optimizer steps (default 50), "
            "and Lightning takes one of the two: set checkpoint.every_n_train_steps: null to save by epochs"
        )
    top_k = checkpoint.get("save_top_k")
    if isinstance(top_k, int) and top_k < -1:
        problems.append(f"checkpoint.save_top_k must be -1 (keep all) or >= 0, got {top_k}")
    return problems


def checkpoint_dir_problems(config: Any, subcommand: str | None) -> list[str]:
    """`fit` saves checkpoints in `checkpoint.dirpath`: one it can neither write nor create would stop the run only at
    its first save, after the model loaded and steps ran."""
    checkpoint, trainer = config.get("checkpoint"), config.get("trainer")
    checkpointing = trainer is None or trainer.get("enable_checkpointing") is not False
    if subcommand != "fit" or checkpoint is None or not checkpointing:
        return []
    dirpath = checkpoint.get("dirpath")
    if not isinstance(dirpath, str) or "://" in dirpath:  # remote storage: its own client says what is wrong
        return []
    problem = unwritable(Path(dirpath))
    return [f"checkpoint.dirpath: {problem}; give a --trainer.default_root_dir you can write"] if problem else []


def unwritable(path: Path) -> str | None:
    """Why the directory `path` can neither be written nor created, or None when it can be."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be created: {existing} is a file, not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    if existing == path:
        return f"{path} is not writable (read-only, or another user's)"
    return f"{path} cannot be created: {existing} is not writable (read-only, or another user's)"


def accumulation_problems(trainer: Any) -> list[str]:
    """Lightning's gradient accumulation, which a module that steps its own optimizer cannot take."""
    accumulate = trainer.get("accumulate_grad_batches") if trainer is not None else None
    if accumulate in (None, 1):
        return []
    return [
        f"trainer.accumulate_grad_batches {accumulate}: a ttc step already accumulates the gradients of its whole "
        "batch (data.batch_size prompts x model.num_generations completions), model.micro_batch_size rows at a time; "
        "leave it at 1 and raise data.batch_size for larger steps"
    ]


def precision_problems(trainer: Any) -> list[str]:
    """A `trainer.precision` whose package is missing, which Lightning reports with a traceback once the model is
    being built."""
    precision = str(trainer.get("precision") if trainer is not None else "")
    if precision.startswith("transformer-engine"):
        from lightning.fabric.plugins.precision.transformer_engine import _TRANSFORMER_ENGINE_AVAILABLE

        if not _TRANSFORMER_ENGINE_AVAILABLE:
            return [
                f"trainer.precision {precision} needs NVIDIA's transformer_engine package, which is not installed "
                "(pip install 'transformer_engine[pytorch]' on a machine with CUDA); or use bf16-mixed"
            ]
    return []


def check_before_start(config: Any, subcommand: str | None) -> None:
    """Every problem found in the parsed config that would otherwise show late: one `TTCError` listing them all
    ("2 problems: (1) ...; (2) ...").

        The Hub is probed at most once, and only when the model or the data comes from it.
    """
    model, data = config.get("model"), config.get("data")
    model_name = init_args(model).get("model_name_or_path")
    data_path = init_args(data).get("data_path")
    from_hub = (isinstance(model_name, str) and is_hub_id(model_name)) or (
        isinstance(data_path, str) and data_path.startswith(HF_PREFIX)
    )
    online = hub_online() if from_hub else True
    cache_dir = hub_cache_dir()
    problems = model_problems(model_name, online, cache_dir)
    problems += data_problems(data, subcommand, online, cache_dir)
    problems += reward_problems(init_args(model).get("rewards") if model is not None else None)
    problems += settings_problems(model)
    problems += checkpoint_problems(config.get("checkpoint"))
    problems += checkpoint_dir_problems(config, subcommand)
    problems += accumulation_problems(config.get("trainer"))
    problems += precision_problems(config.get("trainer"))
    try:
        prepare_wandb(config)
    except TTCError as e:
        problems.append(str(e))
    if len(problems) == 1:
        raise TTCError(problems[0])
    if problems:
        raise TTCError(f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
