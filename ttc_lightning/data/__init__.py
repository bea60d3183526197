"""Lightning data modules: generic prompts and the two PrimeVul tasks."""

from ttc_lightning.data.base import Task, TaskDataModule
from ttc_lightning.data.prompts import PromptDataModule
from ttc_lightning.data.tasks import PrimeVulClassificationDataModule, PrimeVulPatchDataModule

__all__ = [
    "PrimeVulClassificationDataModule",
    "PrimeVulPatchDataModule",
    "PromptDataModule",
    "Task",
    "TaskDataModule",
]
