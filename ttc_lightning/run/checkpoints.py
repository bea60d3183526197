"""What a ttc checkpoint holds beyond Lightning's own: only the weights training changed (the LoRA adapters, or the
policy without its frozen reference), what it was trained on (base model with a fingerprint, LoRA settings, task),
and the random states sampling needs. Also how checkpoints are written (atomically, never with non-finite weights)
and read (a damaged file is a one-line error)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttc_lightning.errors import TTCError

log = logging.getLogger("ttc")

REFERENCE_PREFIX = "ref_model."
# Architecture fields of a model's config that the fingerprint hashes: what decides the weights' shapes and meaning,
# not fields that change with the loading options (dtype, use_cache, quantisation) or the transformers version.
CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
)
# Relative difference of a tensor's L1 norm below which two loads count as the same weights: bf16 and fp32 copies
# of one model differ by rounding (at most 2^-9 per element, averaging out over a sum).
FINGERPRINT_RTOL = 1e-3
LORA_SHAPE_FIELDS = ("r", "target_modules")
# The precisions that keep the trained weights themselves in half precision, and in which dtype.
HALF_PRECISIONS = {
    "16-true": "float16",
    "bf16-true": "bfloat16",
    "transformer-engine-float16": "float16",
    "transformer-engine": "bfloat16",
}


def trim_state(
    state: dict[str, Any], trainable: set[str], lora: bool, step: int, precision: str | None = None
) -> dict[str, Any]:
    """The state dict to save at optimizer step `step`: the trainable weights under LoRA, the policy otherwise, never
    the reference; weights that are NaN or infinite are refused (`check_finite`, whose advice names a half
    `precision`)."""
    if lora:
        kept = {k: v for k, v in state.items() if k in trainable}
    else:
        kept = {k: v for k, v in state.items() if not k.startswith(REFERENCE_PREFIX)}
    check_finite(kept, step, precision)
    return kept


def ttc_section(identity: dict[str, Any], skipped_steps: int, rng: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's "ttc" section: the run's `run_identity`, the random states (`rng`, else the current ones;
    `rng_ranks`: every rank's, in rank order, when there are several) and the skipped-step count.

    Called on every rank (all save together): gathering the ranks' states is collective."""
    # Lightning does not save RNG states; sampling after a resume must continue each rank's random stream.
    rng = rng or rng_states()
    section = {**identity, "rng": rng, "skipped_steps": skipped_steps}
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        ranks: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, rng)
        section["rng_ranks"] = ranks
    return section


def run_identity(
    model_name_or_path: str, fingerprint: dict[str, Any] | None, lora: Any | None, datamodule: Any | None
) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that loads it: the base model (its name and fingerprint), the
    LoRA settings (a dataclass; None under full fine-tuning), the task (the data module's class, label mode and
    a hash of custom prompts; None without a data module) and the training data (the data module's
    `data_identity`: the train split's file and a hash of its bytes; None when it has read no training data)."""
    task = None if datamodule is None else type(datamodule).__name__
    if task is not None and getattr(datamodule, "label_mode", None):
        task += f" label_mode={datamodule.label_mode}"
    prompts = getattr(datamodule, "prompt_identity", lambda: None)()
    if task is not None and prompts is not None:
        task += f" prompts={prompts}"  # data.system_prompt / data.user_template: another prompt, another task
    return {
        "model_name_or_path": model_name_or_path,
        "lora": lora is not None,
        "base_fingerprint": fingerprint,
        "lora_settings": None if lora is None else dataclasses.asdict(lora),
        "task": task,
        "data": getattr(datamodule, "data_identity", lambda: None)(),
    }


def base_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """A cheap identity of the base model's weights as loaded: a hash of its architecture (`CONFIG_KEYS`) and the
    shape and L1 norm of its input embedding and normalisation weights. Those are never quantised (4-bit) nor adapted
    by LoRA, so the fingerprint is the same for every way ttc loads one model; at 1.5B parameters they are about 15%
    of the weights and their norms take a fraction of a second. Call it before training changes the weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = {key: getattr(base.config, key, None) for key in CONFIG_KEYS}
    embedding = base.get_input_embeddings().weight
    tensors = {
        name: [list(p.shape), _l1(p)]
        for name, p in base.named_parameters()
        if p is embedding or (p.ndim == 1 and "norm" in name)
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config": digest, "tensors": tensors}


def _l1(p: torch.Tensor) -> float:
    # In chunks, so a large embedding is not copied whole in float64.
    return float(sum(chunk.abs().sum(dtype=torch.float64) for chunk in p.detach().reshape(-1).split(1 << 24)))


def fingerprint_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How two fingerprints differ, in words, or None when they are the same model."""
    if saved["config"] != current["config"]:
        return f"its architecture differs (config hash {saved['config']} vs {current['config']})"
    if set(saved["tensors"]) != set(current["tensors"]):
        return "its weights have other names"
    for name, (shape, l1) in saved["tensors"].items():
        now_shape, now_l1 = current["tensors"][name]
        if list(shape) != list(now_shape):
            return f"{name} has shape {list(now_shape)}, the checkpoint's base {list(shape)}"
        if not math.isclose(l1, now_l1, rel_tol=FINGERPRINT_RTOL):
            return f"its weights differ ({name}: L1 norm {now_l1:.6g}, the checkpoint's base {l1:.6g})"
    return None


def complete_state(
    checkpoint: dict[str, Any],
    current: dict[str, Any],
    trainable: set[str],
    identity: dict[str, Any],
    allow_mismatch: bool = False,
    restore: bool = True,
) -> bool:
    """Check a checkpoint against this model and fill in what was not saved (frozen weights), in place, so that
    Lightning's loading is complete; with `restore`, restores the random states and resets a finished epoch's batch
    counts (`restore_states`, whose answer it returns: whether this rank took its own random states).

    `identity` is this run's `run_identity`; a task of None is not compared. A different base model, LoRA alpha or
    dropout, or task is refused unless `allow_mismatch` (then warned); different weight names or shapes always are.
    """
    ttc, lora = checkpoint.get("ttc"), identity["lora"]
    if ttc is None:
        raise TTCError("--ckpt_path: this checkpoint was not written by ttc (it has no 'ttc' section)")
    if ttc["lora"] != lora:
        raise TTCError(
            "--ckpt_path: the checkpoint was trained "
            + ("with" if ttc["lora"] else "without")
            + " LoRA but model.lora is "
            + ("set" if lora else "null")
            + "; use the same model settings as the run that wrote it"
        )
    check_lora_shape(ttc.get("lora_settings"), identity["lora_settings"])
    check_identity(ttc, identity, allow_mismatch)
    check_shapes(checkpoint["state_dict"], current, trainable, lora)
    own_rng = restore_states(checkpoint) if restore else False
    if not lora:
        # The frozen reference is never saved: it is the base model, loaded again when the model is configured.
        reference = {k: v for k, v in current.items() if k.startswith(REFERENCE_PREFIX)}
        checkpoint["state_dict"] = {**reference, **checkpoint["state_dict"]}
        return own_rng
    # Frozen base weights are not in the checkpoint: put the current ones back so loading is complete.
    frozen = {k: v for k, v in current.items() if k not in trainable}
    checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
    return own_rng


def start_next_epoch_afresh(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written after its epoch ended (at the end of a fit whose max_steps fell on an epoch boundary):
    reset the epoch loop's batch counts, in place, so that the resumed run starts the next epoch at its first batch.

    Lightning (2.6) resumes a max_steps run as if in the middle of an epoch even when the checkpoint's epoch is done:
    it keeps the finished epoch's batch counts, so the next epoch ends after one batch (the data's first) and the
    one after starts the data over: one batch trained twice, and a different run from one never stopped."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_loop.batch_progress" not in loop:
        return
    epochs, batches = loop["epoch_progress"]["current"], loop["epoch_loop.batch_progress"]
    # A fit stopped by max_steps counts its epoch as completed even in the middle: the last batch tells them apart.
    if epochs["completed"] == epochs["started"] and batches.get("is_last_batch"):
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False


def check_lora_shape(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
    """LoRA settings that change the adapters' shapes (rank, adapted layers) cannot differ: the weights would not
    fit."""
    if saved is None or current is None:
        return
    for field in LORA_SHAPE_FIELDS:
        if saved.get(field) != current.get(field):
            raise TTCError(
                f"model.lora.{field}: the checkpoint's adapters were trained with {field}={saved.get(field)!r}, this "
                f"run has {current.get(field)!r}; use the LoRA settings of the run that wrote it"
            )


def restore_states(checkpoint: dict[str, Any]) -> bool:
    """The random states of the step in flight, and a finished epoch's batch counts reset. True when this rank took
    its own states (a checkpoint of as many ranks as this run has), False when it took rank 0's or none."""
    ttc = checkpoint["ttc"]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    ranks = ttc.get("rng_ranks")
    own = ranks is not None and len(ranks) == world
    states = ranks[rank] if own else ttc.get("rng")
    if states is not None:
        set_rng_states(states)
    start_next_epoch_afresh(checkpoint)
    return own


def check_before_loading(path: str | Path, state: tuple[dict[str, Any], set[str], dict[str, Any], bool]) -> None:
    """`complete_state`'s checks of the checkpoint at `path` (read without loading its tensors), for a strategy that
    loads the weights before `on_load_checkpoint` sees it (FSDP2). `state`: the module's `_checked_state()`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise unreadable(path, e) from None
    current, trainable, identity, allow = state
    probe = {"ttc": checkpoint.get("ttc"), "state_dict": checkpoint.get("state_dict", {})}
    complete_state(probe, current, trainable, identity, allow, restore=False)


def check_shapes(saved: Mapping[str, Any], current: Mapping[str, Any], trainable: set[str], lora: bool) -> None:
    """Every saved weight must exist in this model with the same shape; under full fine-tuning none may be missing."""
    unknown = sorted(set(saved) - (trainable if lora else set(current)))
    if unknown:
        raise TTCError(
            f"--ckpt_path: {len(unknown)} checkpoint weights do not exist in this model (first: {unknown[0]}); "
            "check model.lora and model.model_name_or_path"
        )
    for name, value in saved.items():
        if tuple(value.shape) != tuple(current[name].shape):
            raise TTCError(
                f"--ckpt_path: {name} has shape {list(value.shape)} in the checkpoint but {list(current[name].shape)} "
                "in this model; use the model.model_name_or_path and model.lora of the run that wrote it"
            )
    if not lora:
        missing = sorted(k for k in current if not k.startswith(REFERENCE_PREFIX) and k not in saved)
        if missing:
            raise TTCError(
                f"--ckpt_path: {len(missing)} of this model's weights are not in the checkpoint (first: {missing[0]}); "
                "use the model.model_name_or_path of the run that wrote it"
            )


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], allow_mismatch: bool) -> None:
    """Base model, LoRA scaling and task of the checkpoint against this run: refused (one line naming the
    difference) unless `allow_mismatch`. A checkpoint that recorded no fingerprint is loaded with a warning."""
    differences = []
    name, now_name = saved.get("model_name_or_path"), current["model_name_or_path"]
    if saved.get("base_fingerprint") is None:
        log.warning(
            "the checkpoint records no fingerprint of its base model (%s; written by an earlier ttc): "
            "not checked against model.model_name_or_path",
            name,
        )
    else:
        difference = fingerprint_difference(saved["base_fingerprint"], current["base_fingerprint"])
        if difference is not None:
            now = "another model of that name" if name == now_name else f"model.model_name_or_path {now_name!r}"
            differences.append(f"was trained on base model {name!r}, and {now} differs: {difference}")
    lora, now = saved.get("lora_settings"), current["lora_settings"]
    if lora is not None and now is not None:
        changed = [f"{k}={lora.get(k)!r} (now {now.get(k)!r})" for k in sorted(now) if lora.get(k) != now.get(k)]
        if changed:
            differences.append(f"was trained with model.lora {', '.join(changed)}")
    task = saved.get("task")
    if task is not None and current["task"] is not None and task != current["task"]:
        differences.append(task_difference(task, current["task"]))
    difference = data_difference(saved.get("data"), current.get("data"))
    if difference is not None and not _other_module(task, current["task"]):
        differences.append(difference)
    if not differences:
        return
    message = "--ckpt_path: the checkpoint " + "; ".join(differences)
    if not allow_mismatch:
        raise TTCError(
            f"{message}; use the settings of the run that wrote it, or --model.allow_checkpoint_mismatch true"
        )
    log.warning("%s (loaded anyway: model.allow_checkpoint_mismatch)", message)


def data_difference(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str | None:
    """How the data a checkpoint was trained on differs from what this run trains on (`run_identity`'s "data": a
    file by the hash of its bytes, wherever it lies; a Hub dataset by its name), or None when they agree or either
    is not known (a checkpoint written before ttc recorded it, an evaluation)."""
    if not saved or not now:
        return None
    if saved.get("digest") and now.get("digest"):
        if saved["digest"] == now["digest"]:
            return None
    elif saved.get("source") == now.get("source"):
        return None

    def shown(data: Mapping[str, Any]) -> str:
        return f"{data['source']} (sha256 {data['digest']})" if data.get("digest") else str(data["source"])

    if saved.get("source") == now.get("source"):
        return f"was trained on {shown(saved)}, which has changed since ({now['options']}: sha256 {now['digest']})"
    return f"was trained on other data: {shown(saved)}, and this run's {now['options']} read {shown(now)}"


def _other_module(saved: str | None, now: str | None) -> bool:
    """Whether two recorded tasks are other data modules (then their data is not compared as well)."""
    return saved is not None and now is not None and saved.split(" ")[0] != now.split(" ")[0]


def task_difference(saved: str, now: str) -> str:
    """How the task a checkpoint was trained on differs from this run's: the data module, or only its prompts (the
    task's own, or `data.system_prompt`/`data.user_template`, recorded as a hash)."""
    (saved_task, _, saved_prompts), (now_task, _, now_prompts) = (
        saved.partition(" prompts="),
        now.partition(" prompts="),
    )
    if saved_task != now_task:
        return f"was trained on task {saved}, this run's data module is {now}"

    def prompts(digest: str) -> str:
        return f"data.system_prompt/data.user_template of hash {digest}" if digest else "the task's own prompts"

    return f"was trained with {prompts(saved_prompts)}, and this run has {prompts(now_prompts)}"


def check_finite(state: Mapping[str, Any], step: int, precision: str | None = None) -> None:
    """Refuse to save weights that are NaN or infinite: the file would replace the last good checkpoint. The advice
    blames half-precision weights when they are (`trainer.precision`, or the weights' own dtype), else the learning
    rate and the rewards: in half precision the loss and the gradient norm can stay finite while updates that
    underflow or overflow turn the weights NaN."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if not bad:
        return
    dtype = str(state[bad[0]].dtype).removeprefix("torch.")
    if precision in HALF_PRECISIONS:
        advice = (
            f"trainer.precision {precision} keeps the trained weights in {HALF_PRECISIONS[precision]}: use "
            "bf16-mixed or 32-true"
        )
    elif dtype in ("float16", "bfloat16"):
        advice = f"{bad[0]} is {dtype}: train the weights in float32 (model.dtype auto, trainer.precision 32-true)"
    else:
        advice = "Lower model.learning_rate or check the reward functions"
    raise TTCError(
        f"not saving a checkpoint at step {step}: {len(bad)} weights are NaN or infinite (first: {bad[0]}); the "
        f"previous checkpoint is kept. {advice}, then resume with --ckpt_path last"
    )


def rng_states() -> dict[str, Any]:
    """The states of every random generator sampling and shuffling use."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and tensors only, so the checkpoint also loads with torch.load(weights_only=True).
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents without reading its tensors (memory-mapped): cheap even for a full fine-tune; a
    missing, empty, truncated or foreign file is a `TTCError` naming it."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise TTCError(
                f"--ckpt_path: {path} is a directory; give a checkpoint file in it, or `last` or `best` with this "
                "run's trainer.default_root_dir"
            )
        raise TTCError(f"--ckpt_path: {path} does not exist")
    if path.stat().st_size == 0:
        raise TTCError(f"--ckpt_path: {path} is empty (0 bytes): a write was cut short; use another checkpoint")
    try:
        # Not weights-only: hyper_parameters hold config objects. Only load checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise unreadable(path, e) from None
    if not isinstance(checkpoint, dict) or "ttc" not in checkpoint:
        raise TTCError(f"--ckpt_path: {path} is not a ttc checkpoint (it has no 'ttc' section)")
    check_complete(checkpoint, path)
    return checkpoint


def check_complete(checkpoint: dict[str, Any], path: str | Path) -> None:
    """A ttc checkpoint must hold its weights and its step count: without them it is damaged."""
    weights = checkpoint.get("state_dict")
    # Empty too: every ttc checkpoint holds the weights it trained (a LoRA one its adapters).
    if not isinstance(weights, dict) or not weights or not isinstance(checkpoint.get("global_step", 0), int):
        raise TTCError(f"--ckpt_path: {path} is damaged: it has no weights (state_dict) or no step count")


def unreadable(path: str | Path, error: BaseException) -> TTCError:
    """The error for a checkpoint file torch.load failed on (`error`): another kind of file (a text file, zeros),
    or a checkpoint that is truncated or corrupt, with the first line of what torch said, whole or marked cut."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its older pickle format
        return TTCError(
            f"--ckpt_path: {path} is not a PyTorch checkpoint (it starts with {head!r}, not a zip archive); give a "
            "checkpoint that ttc fit wrote"
        )
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = line if len(line) <= 160 else line[:157] + "..."
    return TTCError(
        f"--ckpt_path: {path} cannot be read, it is truncated or corrupt ({type(error).__name__}"
        f"{': ' + detail if detail else ''}); use another checkpoint of the run"
    )
