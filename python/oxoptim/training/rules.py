"""Adjust rules, evaluated after each validation: composable, with state that checkpoints carry.

Each rule sees the epoch's record (``val_loss``, ``val_<metric>``, ``train_loss``...) and may
return an action: ``None``, ``"next_stage"`` or ``"stop"``. Which way is better follows the task's
metric (accuracy: higher, bits per character: lower) unless the rule is given ``mode``. Rules act on the trainer through a
small interface: ``trainer.lr_scale`` (multiplies the stage's LRs) and weight snapshots.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .errors import integer, number, unknown_name

__all__ = [
    "Rule",
    "ReduceLROnPlateau",
    "NextStageOnPlateau",
    "EarlyStop",
    "RestoreBest",
    "Trial",
    "make_rule",
    "monitorable",
    "check_monitors",
]


def _monitor(monitor: Any) -> str:
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"monitor must be the name of an epoch record key, not {monitor!r}")
    return monitor


def _mode_for(monitor: str, mode: Optional[str]) -> str:
    if mode is not None:
        if mode not in ("min", "max"):
            raise ValueError(unknown_name("mode", mode, ("min", "max")))
        return mode
    return "min" if monitor.endswith("loss") else "max"


class _Plateau:
    """Tracks the best monitored value and how many epochs since it improved."""

    def __init__(self, monitor: str = "val_loss", mode: Optional[str] = None, min_delta: float = 0.0):
        self.monitor = _monitor(monitor)
        self.mode = _mode_for(monitor, mode)
        self.mode_given = mode is not None
        self.min_delta = number("min_delta", min_delta, 0.0)
        self.reset()

    def follow(self, mode: str) -> None:
        """Takes the monitored key's direction, unless a mode was given."""
        if not self.mode_given:
            self.mode = mode
            self.reset()

    def reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.bad_epochs = 0

    def value(self, record: Dict[str, Any]) -> float:
        if self.monitor not in record:
            raise KeyError(f"rule monitors {self.monitor!r}, not in the epoch record {sorted(record)}")
        return float(record[self.monitor])

    def observe(self, record: Dict[str, Any]) -> bool:
        """Updates with the record; True when it improved on the best."""
        v = self.value(record)
        better = v < self.best - self.min_delta if self.mode == "min" else v > self.best + self.min_delta
        if better:
            self.best, self.bad_epochs = v, 0
        else:
            self.bad_epochs += 1
        return better

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s: dict) -> None:
        self.best, self.bad_epochs = s["best"], s["bad_epochs"]


class Rule:
    """Base class: override :meth:`on_epoch_end` (and :meth:`on_stage_end` if needed)."""

    def reset(self) -> None:
        """Called when the stage starts."""

    def follow(self, mode: str) -> None:
        """Told, before training, which way the monitored key improves ("min" or "max")."""

    def on_epoch_end(self, trainer, record: Dict[str, Any]) -> Optional[str]:
        return None

    def on_stage_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        keys = {k: v for k, v in vars(self).items() if not k.startswith("_") and not isinstance(v, (dict, _Plateau))}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in keys.items())})"


class _PlateauRule(Rule):
    def __init__(self, monitor: str = "val_loss", patience: int = 1, mode: Optional[str] = None, min_delta: float = 0.0):
        self._p = _Plateau(monitor, mode, min_delta)
        self.monitor, self.patience = monitor, integer("patience", patience, 0)

    def reset(self) -> None:
        self._p.reset()

    def follow(self, mode: str) -> None:
        self._p.follow(mode)

    def state_dict(self) -> dict:
        return self._p.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._p.load_state_dict(state)


class ReduceLROnPlateau(_PlateauRule):
    """Multiplies the stage's LR by ``factor`` after ``patience`` epochs without improvement."""

    def __init__(self, monitor="val_loss", patience=1, factor=0.5, min_scale=0.0, mode=None, min_delta=0.0):
        super().__init__(monitor, patience, mode, min_delta)
        self.factor = number("factor", factor, 0.0, 1.0, low_open=True)
        self.min_scale = number("min_scale", min_scale, 0.0)

    def on_epoch_end(self, trainer, record):
        if not self._p.observe(record) and self._p.bad_epochs >= self.patience:
            trainer.lr_scale = max(self.min_scale, trainer.lr_scale * self.factor)
            self._p.bad_epochs = 0
            trainer.log_event(f"reduce LR: scale -> {trainer.lr_scale:.4g}")
        return None


class NextStageOnPlateau(_PlateauRule):
    """Ends the stage early after ``patience`` epochs without improvement."""

    def on_epoch_end(self, trainer, record):
        if not self._p.observe(record) and self._p.bad_epochs >= self.patience:
            trainer.log_event(f"plateau on {self.monitor}: next stage")
            return "next_stage"
        return None


class EarlyStop(_PlateauRule):
    """Stops the whole run after ``patience`` epochs without improvement."""

    def __init__(self, monitor="val_loss", patience=2, mode=None, min_delta=0.0):
        super().__init__(monitor, patience, mode, min_delta)

    def on_epoch_end(self, trainer, record):
        if not self._p.observe(record) and self._p.bad_epochs >= self.patience:
            trainer.log_event(f"early stop on {self.monitor}")
            return "stop"
        return None


class RestoreBest(Rule):
    """At the end of the stage, puts back the weights that scored best on ``monitor``.

    The snapshot is of the weights that were evaluated (the averaged ones in an
    averaging stage) and is carried by checkpoints.
    """

    def __init__(self, monitor: str = "val_loss", mode: Optional[str] = None):
        self._p = _Plateau(monitor, mode)
        self.monitor = monitor
        self._best_state: Optional[Dict[str, torch.Tensor]] = None
        self._best_epoch: Optional[int] = None

    def reset(self) -> None:
        self._p.reset()
        self._best_state, self._best_epoch = None, None

    def follow(self, mode: str) -> None:
        self._p.follow(mode)

    def on_epoch_end(self, trainer, record):
        if self._p.observe(record):
            self._best_state = trainer.evaluated_state()
            self._best_epoch = record.get("epoch")
        return None

    def on_stage_end(self, trainer) -> None:
        if self._best_state is not None:
            trainer.load_model_state(self._best_state)
            trainer.log_event(f"restored best {self.monitor}={self._p.best:.4g} from stage epoch {self._best_epoch}")

    def state_dict(self) -> dict:
        return {"plateau": self._p.state_dict(), "best_state": self._best_state, "best_epoch": self._best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self._p.load_state_dict(state["plateau"])
        self._best_state, self._best_epoch = state["best_state"], state["best_epoch"]


class Trial(Rule):
    """Tries K candidate settings for ``epochs`` epochs each from the stage's starting weights,
    then continues the stage from the candidate that scored best on ``monitor`` (its weights,
    optimizer and averager state), for the stage's remaining epochs.

    ``candidates`` are values of ``param`` (e.g. learning rates) or dicts of optimizer kwargs.
    """

    def __init__(self, candidates: Sequence[Any], param: Optional[str] = "lr", epochs: int = 1,
                 monitor: str = "val_loss", mode: Optional[str] = None):
        if isinstance(candidates, (str, bytes, dict)) or not isinstance(candidates, Sequence) or not candidates:
            raise ValueError(f"Trial needs a list of candidates, not {candidates!r}")
        if not all(isinstance(c, dict) for c in candidates) and not (isinstance(param, str) and param):
            raise ValueError(f"Trial candidates that are values need param= (an optimizer argument), not {param!r}")
        self.param, self.epochs, self.monitor = param, integer("epochs", epochs, 1), _monitor(monitor)
        self.mode = _mode_for(monitor, mode)
        self._mode_given = mode is not None
        self.candidates: List[Dict[str, Any]] = [
            dict(c) if isinstance(c, dict) else {str(param): c} for c in candidates
        ]

    def follow(self, mode: str) -> None:
        if not self._mode_given:
            self.mode = mode

    def score_better(self, a: float, b: Optional[float]) -> bool:
        return b is None or (a < b if self.mode == "min" else a > b)


_RULES = {
    "reduce_lr_on_plateau": ReduceLROnPlateau,
    "next_stage_on_plateau": NextStageOnPlateau,
    "early_stop": EarlyStop,
    "restore_best": RestoreBest,
    "trial": Trial,
}


_NAMES = {cls: name for name, cls in _RULES.items()}


def make_rule(spec: Any) -> Rule:
    """A rule from an instance or a config dict ``{"rule": "reduce_lr_on_plateau", "patience": 1, ...}``;
    unknown rule names and keys, and bad values, raise ValueError naming the valid ones."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        spec = {"rule": spec}
    if not isinstance(spec, dict) or "rule" not in spec:
        raise ValueError(f"an adjust rule is a Rule or a table with a 'rule' key, not {spec!r}")
    spec = dict(spec)
    name = spec.pop("rule")
    if not isinstance(name, str) or name not in _RULES:
        raise ValueError(unknown_name("adjust rule", name, _RULES))
    cls = _RULES[name]
    keys = list(inspect.signature(cls).parameters)
    for key in spec:
        if key not in keys:
            raise ValueError(f"adjust rule {name!r}: " + unknown_name("key", key, keys))
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adjust rule {name!r}: {e}") from e


def monitorable(metrics: Union[Mapping[str, str], Iterable[str]]) -> Dict[str, str]:
    """The epoch-record keys a rule can monitor and which way each improves, from the validation
    metrics' directions (``{"accuracy": "max"}``) or names (then: lower is better for losses only)."""
    modes = dict(metrics) if isinstance(metrics, Mapping) else {m: _mode_for(m, None) for m in metrics}
    return {"train_loss": "min", "val_loss": "min", **{f"val_{m}": mode for m, mode in modes.items()}}


def check_monitors(rules: Iterable[Rule], valid: Mapping[str, str]) -> None:
    """ValueError, before any epoch runs, for a rule that monitors a key no epoch record has; rules
    without a mode take the key's direction."""
    for r in rules:
        monitor = getattr(r, "monitor", None)
        if monitor is None:
            continue
        if monitor not in valid:
            raise ValueError(f"adjust rule {_NAMES.get(type(r), type(r).__name__)!r}: "
                             + unknown_name("monitor", monitor, valid))
        r.follow(valid[monitor])
