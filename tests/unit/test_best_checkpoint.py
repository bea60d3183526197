"""`best.ckpt`: written when a validation beats the best so far of the task's headline metric, and only then."""

from types import SimpleNamespace

import torch

from ttc_lightning.data import PrimeVulClassificationDataModule, PrimeVulPatchDataModule, PromptDataModule
from ttc_lightning.run.saving import BestCheckpoint


def validate(callback: BestCheckpoint, step: int, **metrics: float) -> list[int]:
    """One validation end at `step` with `metrics` logged: the steps at which best.ckpt was saved."""
    saved = []
    trainer = SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        global_step=step,
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        save_checkpoint=lambda path, **_: saved.append(step),
    )
    callback.on_validation_end(trainer, None)
    return saved


def test_saved_only_when_the_metric_improves_and_the_best_survives_a_resume(tmp_path):
    best = BestCheckpoint(tmp_path, "val/P-C")
    assert best.path == tmp_path / "best.ckpt"
    assert validate(best, 10, **{"val/P-C": 0.25}) == [10]
    assert validate(best, 20, **{"val/P-C": 0.25}) == []  # a tie is not better
    assert validate(best, 30, **{"val/P-C": 0.125}) == []
    assert validate(best, 40, **{"val/P-C": 0.5}) == [40]
    resumed = BestCheckpoint(tmp_path, "val/P-C")
    resumed.load_state_dict(best.state_dict())
    assert validate(resumed, 50, **{"val/P-C": 0.375}) == []  # 0.375 < 0.5 from before the resume
    other = BestCheckpoint(tmp_path, "val/f1")
    other.load_state_dict(best.state_dict())  # another metric's best says nothing about this one
    assert validate(other, 50, **{"val/f1": 0.1}) == [50]


def test_a_missing_or_nan_metric_saves_nothing(tmp_path, caplog):
    best = BestCheckpoint(tmp_path, "val/P-C")
    assert validate(best, 10, **{"val/f1": 0.9}) == []  # e.g. no whole pair in the validation subset
    assert validate(best, 20, **{"val/P-C": float("nan")}) == []
    assert validate(best, 30, **{"val/P-C": 0.0}) == [30]
    # said once, as one of ttc's lines
    assert caplog.messages[0] == "no finite val/P-C after validation: best.ckpt is not updated"
    assert not any(m.startswith("no finite") for m in caplog.messages[1:])


def test_each_task_names_its_headline_metric():
    assert PrimeVulClassificationDataModule(paired=True).headline_metric == "P-C"
    assert PrimeVulClassificationDataModule().headline_metric == "f1"
    assert PrimeVulClassificationDataModule(label_mode="cwe").headline_metric == "macro_f1"
    assert PrimeVulPatchDataModule().headline_metric == "final_patch_reward"
    assert PromptDataModule().headline_metric == "reward"


def test_every_validation_says_its_value_and_the_best_so_far(tmp_path, monkeypatch):
    from ttc_lightning.run import saving

    said = []
    monkeypatch.setattr(saving, "rank_zero_info", said.append)
    best = BestCheckpoint(tmp_path, "val/P-C")
    validate(best, 10, **{"val/P-C": 0.25})
    validate(best, 20, **{"val/P-C": 0.125})
    validate(best, 30, **{"val/P-C": 0.5})
    assert said == [
        f"ttc: validation at step 10: val/P-C 0.2500, the best so far: saved {best.path}",
        "ttc: validation at step 20: val/P-C 0.1250, best 0.2500 at step 10",
        f"ttc: validation at step 30: val/P-C 0.5000, the best so far, up from 0.2500: saved {best.path}",
    ]
