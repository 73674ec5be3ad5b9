"""The trainer's progress through a plan, as typed records; all of it goes into checkpoints.

Checkpoints hold these as plain dicts (``to_dict``/``from_dict``) with the keys of format version 2,
so runs checkpointed before the records existed still resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Position", "TrialBest", "StageState", "RunningLoss", "RunState", "clone_state"]

Weights = Dict[str, torch.Tensor]


def clone_state(sd: Dict[str, torch.Tensor]) -> Weights:
    return {k: v.detach().clone() for k, v in sd.items()}


@dataclass
class Position:
    """Where the run is: stage index, trial candidate (None: the stage's main run), epoch within the
    stage, batches done in that epoch."""

    stage: int = 0
    trial: Optional[int] = None
    epoch: int = 0
    batch: int = 0

    def at(self, *, trial: Optional[int], epoch: int) -> None:
        self.trial, self.epoch, self.batch = trial, epoch, 0

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0


@dataclass
class TrialBest:
    """The best trial candidate so far: its score, index, weights, optimizer/averager state, RNG."""

    score: float
    index: int
    model: Weights
    phase: dict
    rng: torch.Tensor


@dataclass
class StageState:
    """What the current stage has decided so far (reset when a stage starts)."""

    started: bool = False
    lr_scale: float = 1.0
    trial_start: Optional[Weights] = None
    trial_best: Optional[TrialBest] = None
    chosen: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self, rules: List[dict]) -> dict:
        d = {k: getattr(self, k) for k in ("started", "lr_scale", "trial_start", "chosen")}
        d["trial_best"] = dict(vars(self.trial_best)) if self.trial_best is not None else None
        d["rules"] = rules
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageState":
        best = d.get("trial_best")
        return cls(started=d["started"], lr_scale=d["lr_scale"], trial_start=d["trial_start"],
                   trial_best=TrialBest(**best) if best is not None else None, chosen=dict(d["chosen"]))


@dataclass
class RunningLoss:
    """The epoch's summed training loss and example count on this process's shard."""

    loss_sum: float = 0.0
    n: int = 0

    def add(self, loss_sum: float, n: int) -> None:
        self.loss_sum += loss_sum
        self.n += n

    @property
    def mean(self) -> float:
        return self.loss_sum / max(1, self.n)


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint carries (besides model and optimizer)."""

    pos: Position = field(default_factory=Position)
    stage: StageState = field(default_factory=StageState)
    global_step: int = 0
    epoch_counter: int = 0  # epochs run over the whole plan: seeds each epoch's data order
    running: RunningLoss = field(default_factory=RunningLoss)
    history: List[dict] = field(default_factory=list)
    events: List[str] = field(default_factory=list)
    stopped: bool = False
    elapsed: float = 0.0
    carried: Optional[dict] = None  # the last stage's optimizer state, for a continue_optimizer stage
