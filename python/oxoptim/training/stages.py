"""Stages: which optimizer, how many epochs, full or mini batch, LR schedule, adjust rules, averaging."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch

__all__ = ["Stage", "LRSchedule", "make_schedule", "resolve_optimizer", "OPTIMIZERS"]

# Names a stage can give for its optimizer; the classes are looked up lazily on ``oxoptim``.
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "subgradient": "Subgradient"}


def resolve_optimizer(spec: Union[str, type]) -> type:
    """An optimizer class from a name (``"adamw"``, ``"sgd"``, ``"subgradient"``, ...) or a class."""
    if isinstance(spec, type):
        return spec
    import oxoptim

    key = str(spec).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec!r}; choose one of {sorted(OPTIMIZERS)} or pass a class")
    cls = getattr(oxoptim, OPTIMIZERS[key], None)
    if cls is None:
        raise ValueError(f"optimizer {spec!r} needs oxoptim.{OPTIMIZERS[key]}, which this build of oxoptim lacks")
    return cls


class LRSchedule:
    """Multiplies each group's base LR by ``factor(progress)``, progress = step / total over the stage.

    Built from ``None``/``"constant"``, ``"cosine"``, ``"linear"``, a dict
    ``{"name": "cosine", "warmup": 0.1, "final": 0.0}`` (``warmup`` and ``final``
    are fractions: of the stage's steps, and of the base LR), or a callable
    ``f(progress) -> factor``. Pure function of the step, so it needs no state
    beyond the step counter the trainer saves.
    """

    def __init__(self, spec: Any = None):
        self.spec = spec
        if callable(spec):
            self._fn: Callable[[float], float] = spec
            return
        if spec is None or isinstance(spec, str):
            spec = {"name": spec or "constant"}
        if not isinstance(spec, dict):
            raise ValueError(f"lr_schedule must be a name, a dict or a callable, not {spec!r}")
        name = str(spec.get("name", "constant")).lower()
        warmup = float(spec.get("warmup", 0.0))
        final = float(spec.get("final", 0.0))
        if name not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown lr_schedule {name!r}; use constant, cosine, linear or a callable")

        def fn(p: float) -> float:
            if warmup > 0 and p < warmup:
                return (p + 1e-12) / warmup if p > 0 else 1.0 / max(1.0, 1e3 * warmup)
            q = (p - warmup) / max(1e-12, 1.0 - warmup)
            q = min(max(q, 0.0), 1.0)
            if name == "constant":
                return 1.0
            if name == "linear":
                return final + (1.0 - final) * (1.0 - q)
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * q))

        self._fn = fn

    def factor(self, step: int, total: int) -> float:
        return float(self._fn(step / max(1, total)))


def make_schedule(spec: Any) -> LRSchedule:
    return spec if isinstance(spec, LRSchedule) else LRSchedule(spec)


@dataclass
class Stage:
    """One stage of a multi-stage plan.

    Args:
        name: label in logs and plots.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"subgradient"`` or an optimizer class.
        epochs: epochs of this stage (for a full-batch stage an epoch is ``steps_per_epoch``
            exact full-gradient steps, default 1).
        batch_size: an int (mini-batch) or ``"full"`` (gradient = exact mean over the whole
            training set, accumulated over micro-batches of ``micro_batch`` with
            :class:`oxoptim.GradientAverager`).
        lr_schedule: see :class:`LRSchedule`.
        adjust: adjust rules (:mod:`oxoptim.training.rules`) evaluated after each epoch.
        average: ``None``, ``"ema"`` or ``"swa"`` (:class:`oxoptim.ParamAverager`); validation
            uses the averaged weights, which replace the model's at the end of the stage.
        average_decay / average_start_epoch: EMA decay and the epoch (within the stage)
            from which averaging starts.
        grad_clip: if set, gradients are clipped to this total L2 norm before each step
            (:func:`oxoptim.clip_grad_norm_`).
        adversarial: if > 0, each step also back-propagates the loss at embeddings perturbed
            by this L2 radius per example in the direction that raises the loss
            (:class:`~oxoptim.training.adversarial.EmbeddingAdversary`); twice the compute.
        **optimizer_kwargs: passed to the optimizer (``lr``, ``weight_decay``, ``momentum``,
            ``step_rule``, ...).
    """

    name: str
    optimizer: Union[str, type] = "adamw"
    epochs: int = 1
    batch_size: Union[int, str] = 32
    lr_schedule: Any = None
    adjust: List[Any] = field(default_factory=list)
    average: Optional[str] = None
    average_decay: float = 0.999
    average_start_epoch: int = 0
    micro_batch: int = 1024
    steps_per_epoch: int = 1
    grad_clip: Optional[float] = None
    adversarial: float = 0.0
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        name: str,
        optimizer: Union[str, type] = "adamw",
        epochs: int = 1,
        batch_size: Union[int, str] = 32,
        lr_schedule: Any = None,
        adjust: Optional[List[Any]] = None,
        average: Optional[str] = None,
        average_decay: float = 0.999,
        average_start_epoch: int = 0,
        micro_batch: int = 1024,
        steps_per_epoch: int = 1,
        grad_clip: Optional[float] = None,
        adversarial: float = 0.0,
        **optimizer_kwargs: Any,
    ):
        self.name = name
        self.optimizer = optimizer
        self.epochs = int(epochs)
        if not (batch_size == "full" or (isinstance(batch_size, int) and batch_size > 0)):
            raise ValueError(f"stage {name!r}: batch_size must be a positive int or 'full', not {batch_size!r}")
        if self.epochs < 1:
            raise ValueError(f"stage {name!r}: epochs must be >= 1")
        if average not in (None, "ema", "swa"):
            raise ValueError(f"stage {name!r}: average must be None, 'ema' or 'swa', not {average!r}")
        self.batch_size = batch_size
        self.lr_schedule = make_schedule(lr_schedule)
        self.adjust = list(adjust or [])
        self.average = average
        self.average_decay = float(average_decay)
        self.average_start_epoch = int(average_start_epoch)
        self.micro_batch = int(micro_batch)
        self.steps_per_epoch = int(steps_per_epoch)
        if grad_clip is not None and not float(grad_clip) > 0:
            raise ValueError(f"stage {name!r}: grad_clip must be a positive norm, not {grad_clip!r}")
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        if not float(adversarial) >= 0:
            raise ValueError(f"stage {name!r}: adversarial must be a radius >= 0, not {adversarial!r}")
        self.adversarial = float(adversarial)
        self.optimizer_kwargs = dict(optimizer_kwargs)
        resolve_optimizer(optimizer) if isinstance(optimizer, type) else None

    @property
    def full_batch(self) -> bool:
        return self.batch_size == "full"

    def trial(self):
        """The stage's :class:`~oxoptim.training.rules.Trial` rule, if any."""
        from .rules import Trial

        trials = [r for r in self.adjust if isinstance(r, Trial)]
        if len(trials) > 1:
            raise ValueError(f"stage {self.name!r}: at most one Trial rule")
        return trials[0] if trials else None

    def describe(self) -> str:
        opt = self.optimizer if isinstance(self.optimizer, str) else self.optimizer.__name__
        kw = ", ".join(f"{k}={v}" for k, v in self.optimizer_kwargs.items() if not callable(v))
        return f"{self.name}: {opt}({kw}) x{self.epochs} epochs, batch {self.batch_size}" + (
            f", {self.average}" if self.average else ""
        ) + (f", clip {self.grad_clip:g}" if self.grad_clip else "") + (
            f", adversarial {self.adversarial:g}" if self.adversarial else "")


def build_optimizer(stage: Stage, params, overrides: Optional[dict] = None) -> torch.optim.Optimizer:
    cls = resolve_optimizer(stage.optimizer)
    kwargs = dict(stage.optimizer_kwargs)
    kwargs.update(overrides or {})
    return cls(params, **kwargs)
