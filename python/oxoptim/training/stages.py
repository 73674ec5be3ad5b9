"""Stages: which optimizer, how many epochs, full or mini batch, LR schedule, adjust rules, averaging."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Union

import torch

from .errors import choices, integer, number, unknown_name
from .rules import Trial, make_rule

__all__ = ["Stage", "LRSchedule", "make_schedule", "resolve_optimizer", "optimizer_arguments", "OPTIMIZERS",
           "STAGE_KEYS", "PARAM_DTYPES", "set_param_dtype"]

# Names a stage can give for its optimizer; the classes are looked up lazily on ``oxoptim``.
# Every optimizer that steps without a closure on dense gradients (LBFGS needs a
# closure, SparseAdam sparse gradients, Muon 2-D parameters only).
OPTIMIZERS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "subgradient": "Subgradient",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adadelta": "Adadelta",
    "asgd": "ASGD",
    "rprop": "Rprop",
    "adafactor": "Adafactor",
    "lion": "Lion",
    "adamw_schedulefree": "AdamWScheduleFree",
    "sgd_schedulefree": "SGDScheduleFree",
    "prodigy": "Prodigy",
    "adam8bit": "Adam8bit",
    "adamw8bit": "AdamW8bit",
    "sgd8bit": "SGD8bit",
}
# A stage's own settings; every other key of a stage is an argument of its optimizer.
STAGE_KEYS = ("name", "optimizer", "epochs", "batch_size", "lr_schedule", "adjust", "average", "average_decay",
              "average_start_epoch", "micro_batch", "steps_per_epoch", "grad_clip", "adversarial", "trainable",
              "layer_lr_decay", "continue_optimizer", "accumulate", "step_in_backward", "accumulation",
              "grad_clip_mode", "param_dtype", "stochastic_rounding", "state_dtype", "release_rows", "autocast")
# Names a stage can give for its parameters' dtype (None: leave the model's as it is).
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Names a stage can give for mixed precision (torch.autocast on the CPU; None: off).
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}
TRAINABLE = ("all", "head")
SCHEDULES = ("constant", "cosine", "linear")
CLIP_MODES = ("global", "per_parameter", "previous_norm")
ACCUMULATIONS = ("gradient", "optimizer")


def choices_of(label: str, value: Any, valid: tuple) -> str:
    if value not in valid:
        raise ValueError(unknown_name(label, value, valid))
    return value


def resolve_optimizer(spec: Union[str, type]) -> type:
    """An optimizer class from a name (``"adamw"``, ``"sgd"``, ``"subgradient"``, ...) or a class."""
    if isinstance(spec, type):
        return spec
    import oxoptim

    key = str(spec).lower()
    if key not in OPTIMIZERS:
        raise ValueError(unknown_name("optimizer", spec, OPTIMIZERS) + " (or an optimizer class)")
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
            raise ValueError(f"lr_schedule must be a name, a table or a callable, not {spec!r}")
        for key in spec:
            if key not in ("name", "warmup", "final"):
                raise ValueError(unknown_name("lr_schedule key", key, ("name", "warmup", "final")))
        name = spec.get("name", "constant")
        if name not in SCHEDULES:
            raise ValueError(unknown_name("lr_schedule", name, SCHEDULES) + " (or a callable)")
        warmup = number("lr_schedule warmup", spec.get("warmup", 0.0), 0.0, 1.0, high_open=True)
        final = number("lr_schedule final", spec.get("final", 0.0), 0.0)

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
        optimizer: a name from ``OPTIMIZERS`` (``"adamw"``, ``"sgd"``, ``"adamw8bit"``, ``"lion"``, ...) or an optimizer class.
        epochs: epochs of this stage: passes over the training set, or ``steps_per_epoch``
            steps (for a full-batch stage: exact full-gradient steps, default 1; for a mini-batch
            stage: batches drawn without replacement within the epoch, for long data streams).
        batch_size: an int (mini-batch) or ``"full"`` (gradient = exact mean over the whole
            training set, accumulated over micro-batches of ``micro_batch`` with
            :class:`oxoptim.GradientAverager`).
        lr_schedule: see :class:`LRSchedule`.
        adjust: adjust rules (:mod:`oxoptim.training.rules`) evaluated after each epoch.
        average: ``None``, ``"ema"`` or ``"swa"`` (:class:`oxoptim.ParamAverager`); validation
            uses the averaged weights, which replace the model's at the end of the stage. Not
            with a Schedule-Free optimizer, which averages itself.
        average_decay / average_start_epoch: EMA decay and the epoch (within the stage)
            from which averaging starts.
        grad_clip: if set, gradients are clipped to this L2 norm before each step: their total
            norm (``grad_clip_mode = "global"``, :func:`oxoptim.clip_grad_norm_`), each
            parameter's own (``"per_parameter"``), or, with ``step_in_backward``, scaled by
            the previous step's total norm (``"previous_norm"``, :class:`oxoptim.backward.ClipPreviousNorm`;
            the first step of each stage and of each trial candidate is not clipped).
        accumulate: micro-batches per optimizer step: each batch runs as ``accumulate`` forward
            and backward passes whose gradients add up to the batch's (mini-batch stages).
        step_in_backward: update each parameter inside backward, as soon as its gradient is
            complete, and release the gradient (:func:`oxoptim.step_in_backward`); not with
            adversarial steps (two backward passes per step) or full-batch stages.
        release_rows: with ``step_in_backward``, the model's token embedding (the GPT models',
            whose output layer is tied to it) is updated row block by row block inside backward,
            so that its gradient never exists whole (``oxoptim.step_in_backward(release_rows=)``,
            :mod:`oxoptim.rows`); not with ``accumulate > 1`` or ``grad_clip``.
        accumulation: with ``step_in_backward`` and ``accumulate > 1``: ``"gradient"`` (exact,
            ``p.grad`` is the buffer) or ``"optimizer"`` (Adam/AdamW: micro-batches absorbed into
            the moments, no gradient buffer).
        adversarial: if > 0, each step also back-propagates the loss at embeddings perturbed
            by this L2 radius per example in the direction that raises the loss
            (:class:`~oxoptim.training.adversarial.EmbeddingAdversary`); twice the compute.
        trainable: ``"all"`` or ``"head"`` (only the model's last layer group trains, the rest is
            frozen); needs a model with ``layer_groups()`` (parameter lists from the input up).
        layer_lr_decay: discriminative learning rates: the LR of each layer group is the stage's LR
            times ``layer_lr_decay ** k``, k = groups above it (the head has k = 0); 1: one LR.
        continue_optimizer: start from the optimizer state (moments, step counts, and the state
            kept in the parameter groups: Prodigy's ``d``, Schedule-Free's ``k`` and
            ``weight_sum``, stochastic rounding's stream) the previous stage ended with, under
            this stage's settings: one optimizer run through stages that
            only change the LR (warm-up, stable, decay). Needs the same optimizer and parameters,
            and an earlier stage (refused on the first).
            The LR scale set by the previous stage's ``reduce_lr_on_plateau`` carries over too
            (other stages start at scale 1).
        param_dtype: ``"float32"`` or ``"bfloat16"``: the model's floating parameters are cast to
            it when the stage starts (its inputs cast to it, its outputs back to float32, so
            losses and metrics stay float32); unset: the model keeps its dtype.
        stochastic_rounding: with ``param_dtype = "bfloat16"``, the optimizer stores each updated
            weight with unbiased stochastic rounding (``bf16_stochastic_round=True``: the Rust
            twins but Adafactor and Schedule-Free, and the 8-bit ones) instead of rounding to nearest.
        state_dtype: unset (the default) or ``"float32"``: the optimizer keeps its state in the
            weights' dtype, as torch makes it (``"float32"`` with ``param_dtype = "bfloat16"`` is
            refused: no optimizer keeps float32 state for bfloat16 weights); ``"bfloat16"``: the
            optimizer keeps its state (moments, momentum) in bfloat16 (``state_dtype=torch.bfloat16``:
            the Rust twins but Adafactor and Schedule-Free), whatever the weights' dtype, and
            computes in float32.
        autocast: unset (the default) or ``"bfloat16"``: mixed precision, the training forward and
            loss run under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (matrix products in
            bfloat16, float32 weights, gradients and optimizer; evaluation stays float32). Not with
            ``param_dtype = "bfloat16"`` (the weights are bfloat16 already) or ``release_rows``
            (:func:`oxoptim.rows.linear` refuses autocast on a released weight).
        **optimizer_kwargs: passed to the optimizer (``lr``, ``weight_decay``, ``momentum``,
            ``step_rule``, ...).

    Every name and value is checked when the stage is made (:meth:`validate`): a ValueError
    names the stage and the valid choices, before anything trains.
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
    steps_per_epoch: Optional[int] = None
    grad_clip: Optional[float] = None
    adversarial: float = 0.0
    trainable: str = "all"
    layer_lr_decay: float = 1.0
    continue_optimizer: bool = False
    accumulate: int = 1
    step_in_backward: bool = False
    accumulation: str = "gradient"
    grad_clip_mode: str = "global"
    param_dtype: Optional[str] = None
    stochastic_rounding: bool = False
    state_dtype: Optional[str] = None
    release_rows: bool = False
    autocast: Optional[str] = None
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
        steps_per_epoch: Optional[int] = None,
        grad_clip: Optional[float] = None,
        adversarial: float = 0.0,
        trainable: str = "all",
        layer_lr_decay: float = 1.0,
        continue_optimizer: bool = False,
        accumulate: int = 1,
        step_in_backward: bool = False,
        accumulation: str = "gradient",
        grad_clip_mode: str = "global",
        param_dtype: Optional[str] = None,
        stochastic_rounding: bool = False,
        state_dtype: Optional[str] = None,
        release_rows: bool = False,
        autocast: Optional[str] = None,
        **optimizer_kwargs: Any,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a stage needs a name (a non-empty string), not {name!r}")
        self.name = name
        try:
            self.optimizer = optimizer
            self.epochs = integer("epochs", epochs, 1)
            if batch_size != "full" and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                         or batch_size < 1):
                raise ValueError(f"batch_size must be a positive integer or 'full', not {batch_size!r}")
            self.batch_size = batch_size
            self.lr_schedule = make_schedule(lr_schedule)
            if adjust is not None and not isinstance(adjust, (list, tuple)):
                raise ValueError(f"adjust must be a list of rules, not {adjust!r}")
            self.adjust = list(adjust or [])
            if average not in (None, "ema", "swa"):
                raise ValueError(unknown_name("average", average, ("ema", "swa")) + " (or none)")
            self.average = average
            self.average_decay = number("average_decay", average_decay, 0.0, 1.0)
            self.average_start_epoch = integer("average_start_epoch", average_start_epoch, 0)
            if average is not None and self.average_start_epoch >= self.epochs:
                raise ValueError(f"average_start_epoch ({self.average_start_epoch}) must be < epochs ({self.epochs}): "
                                 "nothing would be averaged")
            self.micro_batch = integer("micro_batch", micro_batch, 1)
            self.steps_per_epoch = None if steps_per_epoch is None else integer("steps_per_epoch", steps_per_epoch, 1)
            self.grad_clip = None if grad_clip is None else number("grad_clip", grad_clip, 0.0, low_open=True)
            self.adversarial = number("adversarial", adversarial, 0.0)
            if trainable not in TRAINABLE:
                raise ValueError(unknown_name("trainable", trainable, TRAINABLE))
            self.trainable = trainable
            self.layer_lr_decay = number("layer_lr_decay", layer_lr_decay, 0.0, 1.0, low_open=True)
            if not isinstance(continue_optimizer, bool):
                raise ValueError(f"continue_optimizer must be true or false, not {continue_optimizer!r}")
            self.continue_optimizer = continue_optimizer
            self.accumulate = integer("accumulate", accumulate, 1)
            if not isinstance(step_in_backward, bool):
                raise ValueError(f"step_in_backward must be true or false, not {step_in_backward!r}")
            self.step_in_backward = step_in_backward
            if not isinstance(release_rows, bool):
                raise ValueError(f"release_rows must be true or false, not {release_rows!r}")
            self.release_rows = release_rows
            self.accumulation = choices_of("accumulation", accumulation, ACCUMULATIONS)
            self.grad_clip_mode = choices_of("grad_clip_mode", grad_clip_mode, CLIP_MODES)
            self._check_backward_options()
            if param_dtype is not None and (not isinstance(param_dtype, str) or param_dtype not in PARAM_DTYPES):
                raise ValueError(unknown_name("param_dtype", param_dtype, PARAM_DTYPES))
            self.param_dtype = param_dtype
            if not isinstance(stochastic_rounding, bool):
                raise ValueError(f"stochastic_rounding must be true or false, not {stochastic_rounding!r}")
            if stochastic_rounding and param_dtype != "bfloat16":
                raise ValueError('stochastic_rounding = true needs param_dtype = "bfloat16"')
            self.stochastic_rounding = stochastic_rounding
            if state_dtype is not None and (not isinstance(state_dtype, str) or state_dtype not in PARAM_DTYPES):
                raise ValueError(unknown_name("state_dtype", state_dtype, PARAM_DTYPES))
            if state_dtype == "float32" and param_dtype == "bfloat16":
                raise ValueError('state_dtype = "float32" with param_dtype = "bfloat16": the optimizers keep their '
                                 "state in the weights' dtype (bfloat16 here); no optimizer keeps float32 state for "
                                 'bfloat16 weights (leave state_dtype unset, or use param_dtype = "float32")')
            self.state_dtype = state_dtype
            if autocast is not None and (not isinstance(autocast, str) or autocast not in AUTOCAST_DTYPES):
                raise ValueError(unknown_name("autocast", autocast, AUTOCAST_DTYPES) + " (or unset)")
            if autocast and param_dtype == "bfloat16":
                raise ValueError('autocast = "bfloat16" with param_dtype = "bfloat16": the weights compute in '
                                 "bfloat16 already (autocast is mixed precision for float32 weights)")
            if autocast and release_rows:
                raise ValueError("autocast cannot be combined with release_rows: oxoptim.rows.linear refuses autocast "
                                 "on a released weight (its gradient rows are formed in the weight's dtype)")
            self.autocast = autocast
            self.optimizer_kwargs = dict(optimizer_kwargs)
        except ValueError as e:
            raise ValueError(f"stage {name!r}: {e}") from e
        self.validate()

    def _check_backward_options(self) -> None:
        """Combinations of accumulation, clipping and the step inside backward that cannot be honoured."""
        if self.full_batch and self.accumulate > 1:
            raise ValueError("accumulate is for mini-batch stages (a full-batch stage accumulates over micro_batch)")
        if not self.full_batch and self.accumulate > int(self.batch_size):
            raise ValueError(f"accumulate ({self.accumulate}) must be <= batch_size ({self.batch_size}): each "
                             f"micro-batch needs an example")
        if self.grad_clip_mode != "global" and not self.grad_clip:
            raise ValueError(f"grad_clip_mode {self.grad_clip_mode!r} needs grad_clip (the norm to clip to)")
        if self.accumulation == "optimizer" and self.accumulate == 1:
            raise ValueError("accumulation 'optimizer' needs accumulate > 1 (micro-batches to absorb)")
        if self.release_rows and not self.step_in_backward:
            raise ValueError("release_rows needs step_in_backward = true (the rows are updated inside backward)")
        if self.release_rows and (self.accumulate > 1 or self.grad_clip):
            raise ValueError("release_rows cannot be combined with accumulate > 1 or grad_clip: each needs the "
                             "embedding's whole gradient")
        if self.release_rows and self.trainable == "head":
            raise ValueError('release_rows updates the token embedding, which a trainable = "head" stage freezes')
        if not self.step_in_backward:
            if self.grad_clip_mode == "previous_norm":
                raise ValueError("grad_clip_mode 'previous_norm' is for step_in_backward stages")
            if self.accumulation != "gradient":
                raise ValueError("accumulation 'optimizer' is for step_in_backward stages")
            return
        if self.full_batch:
            raise ValueError("step_in_backward is for mini-batch stages, not batch_size 'full'")
        if self.adversarial:
            raise ValueError("step_in_backward cannot take adversarial steps: they run two backward passes per step "
                             "and the first would already update the parameters")
        if self.grad_clip and self.grad_clip_mode == "global":
            raise ValueError("with step_in_backward the global gradient norm is known only after every parameter "
                             "was updated: set grad_clip_mode to 'per_parameter' or 'previous_norm'")

    def backward_clip(self) -> Any:
        """The clipping a step_in_backward stage hands to :func:`oxoptim.step_in_backward`."""
        from oxoptim.backward import ClipPerParameter, ClipPreviousNorm

        if not self.grad_clip:
            return None
        return (ClipPerParameter if self.grad_clip_mode == "per_parameter" else ClipPreviousNorm)(self.grad_clip)

    def validate(self) -> None:
        """Checks the rules and the optimizer: its name, its argument names, and their values, by
        building it on a dummy parameter (with each trial candidate's settings too). Raises
        ValueError before anything trains; the Trainer calls it again for rules added later."""
        try:
            self.adjust = [make_rule(r) for r in self.adjust]
            trial = self.trial()
            if trial is not None and trial.epochs >= self.epochs:
                raise ValueError(f"trial epochs ({trial.epochs}) must be < stage epochs ({self.epochs})")
            cls = resolve_optimizer(self.optimizer)
            names = optimizer_arguments(cls)
            if self.average is not None and callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None)):
                raise ValueError(f"average = {self.average!r} cannot be used with {self._optimizer_name()}, a "
                                 f"Schedule-Free optimizer: the parameters hold its gradient points y while it "
                                 f"trains, so the average would be of y, not of its own average x; Schedule-Free "
                                 f"already averages (validation and the stage's final weights use x): drop average")
            if self.stochastic_rounding and names is not None and "bf16_stochastic_round" not in names:
                takers = sorted(k for k in OPTIMIZERS if "bf16_stochastic_round" in (optimizer_arguments(resolve_optimizer(k)) or ()))
                raise ValueError(f"stochastic_rounding = true needs an optimizer that rounds stochastically: {', '.join(takers)}")
            if self.state_dtype == "bfloat16" and names is not None and "state_dtype" not in names:
                takers = sorted(k for k in OPTIMIZERS if "state_dtype" in (optimizer_arguments(resolve_optimizer(k)) or ()))
                raise ValueError(f'state_dtype = "bfloat16" needs an optimizer that keeps bfloat16 state: {", ".join(takers)}')
            for key in self.optimizer_kwargs:
                if names is not None and key not in names:
                    listing = f"{choices(STAGE_KEYS)}; {self._optimizer_name()} arguments: {choices(names)}"
                    raise ValueError(unknown_name("key", key, set(STAGE_KEYS) | names, listing))
            for overrides in (trial.candidates if trial is not None else [{}]):
                for key in overrides:
                    if names is not None and key not in names:
                        raise ValueError("trial: " + unknown_name("optimizer argument", key, names))
                kwargs = {**self.optimizer_kwargs, **self.rounding_kwargs(), **overrides}
                dtype = PARAM_DTYPES[self.param_dtype or "float32"]
                where = f"trial candidate {overrides}: " if overrides else ""
                try:
                    _check_numbers(kwargs, optimizer_defaults(cls))
                except ValueError as e:
                    raise ValueError(f"{where}{e}") from e
                if (not self.full_batch and kwargs.get("step_rule") == "polyak"
                        and hasattr(cls, "record_loss")):
                    raise ValueError(f'{where}step_rule = "polyak" needs the objective at the current weights, '
                                     f'which only a full-batch stage computes: use batch_size = "full" or another '
                                     f'step_rule')
                try:
                    # rows of 256 elements: what release_rows needs of every optimizer (8-bit blocks), as
                    # many as an 8-bit optimizer keeps 8-bit state for (SGD8bit releases only those)
                    eight_bit = kwargs.get("min_8bit_size", optimizer_defaults(cls).get("min_8bit_size", 0))
                    rows = min(max(1, -(-int(eight_bit) // 256)), 4096) if isinstance(eight_bit, int) else 1
                    probe = torch.zeros((rows, 256) if self.release_rows else 1, dtype=dtype, requires_grad=True)
                    opt = cls([probe], **kwargs)
                    if self.step_in_backward:  # its own checks: a Rust-backed optimizer, the options
                        from oxoptim.backward import StepInBackward

                        StepInBackward(opt, accumulate=self.accumulate, accumulation=self.accumulation,
                                       clip=self.backward_clip(), release_rows=[probe] if self.release_rows else ())
                except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError, NotImplementedError) as e:
                    call = f"{self._optimizer_name()}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
                    hint = ""
                    if self.param_dtype is None and "needs bfloat16 parameters" in str(e):
                        hint = (' (a stage without param_dtype is checked on float32 weights: set param_dtype = '
                                '"bfloat16" in this stage, also when the stage before it has bfloat16 weights)')
                    raise ValueError(f"{where}{call}: {e}{hint}") from e
                if self.layer_lr_decay != 1.0 and self.trainable == "all":
                    refused = _refuses_layer_lrs(self, overrides)
                    if refused is not None:
                        raise ValueError(f"{where}layer_lr_decay = {self.layer_lr_decay:g} gives each layer group its "
                                         f"own LR, which {self._optimizer_name()} refuses: {refused} (use "
                                         f"layer_lr_decay = 1 or another optimizer)")
        except ValueError as e:
            raise ValueError(f"stage {self.name!r}: {e}") from e

    def rounding_kwargs(self) -> Dict[str, Any]:
        """The optimizer arguments ``stochastic_rounding`` and ``state_dtype`` stand for (float32
        state is every optimizer's default, so it adds none)."""
        kwargs: Dict[str, Any] = {"bf16_stochastic_round": True} if self.stochastic_rounding else {}
        if self.state_dtype == "bfloat16":
            kwargs["state_dtype"] = torch.bfloat16
        return kwargs

    def mixed_precision(self) -> ContextManager[Any]:
        """The context the training forward and loss run in: ``torch.autocast`` on the CPU in the
        stage's ``autocast`` dtype, or none (an autocast the caller entered around training holds)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=AUTOCAST_DTYPES[self.autocast])

    def _optimizer_name(self) -> str:
        return self.optimizer if isinstance(self.optimizer, str) else self.optimizer.__name__

    @property
    def full_batch(self) -> bool:
        return self.batch_size == "full"

    @property
    def per_layer(self) -> bool:
        """Whether the stage needs the model's layer groups (freezing or per-layer LRs)."""
        return self.trainable != "all" or self.layer_lr_decay != 1.0

    def trial(self) -> Optional[Trial]:
        """The stage's :class:`~oxoptim.training.rules.Trial` rule, if any."""
        trials = [r for r in self.adjust if isinstance(r, Trial)]
        if len(trials) > 1:
            raise ValueError(f"stage {self.name!r}: at most one Trial rule")
        return trials[0] if trials else None

    def describe(self) -> str:
        opt = self._optimizer_name()
        kw = ", ".join(f"{k}={v}" for k, v in self.optimizer_kwargs.items() if not callable(v))
        return f"{self.name}: {opt}({kw}) x{self.epochs} epochs, batch {self.batch_size}" + (
            f", {self.average}" if self.average else ""
        ) + (f", clip {self.grad_clip:g}" if self.grad_clip else "") + (
            f", adversarial {self.adversarial:g}" if self.adversarial else "") + (
            f", {self.steps_per_epoch} steps/epoch" if self.steps_per_epoch and not self.full_batch else "") + (
            f", train {self.trainable}" if self.trainable != "all" else "") + (
            f", layer LR decay {self.layer_lr_decay:g}" if self.layer_lr_decay != 1.0 else "") + (
            ", continues the optimizer" if self.continue_optimizer else "") + (
            f", {self.accumulate} micro-batches per step" if self.accumulate > 1 else "") + (
            ", step in backward" if self.step_in_backward else "") + (
            f", {self.param_dtype} weights" if self.param_dtype else "") + (
            " with stochastic rounding" if self.stochastic_rounding else "") + (
            f", {self.state_dtype} optimizer state" if self.state_dtype else "") + (
            f", autocast to {self.autocast}" if self.autocast else "")


    def settings(self) -> str:
        """Everything of the stage that decides how it trains, for resume's check that the plan is the
        one the checkpoint was written for: :meth:`describe` and what it leaves out (the LR
        schedule, the adjust rules with their settings, averaging and clipping details, micro-batch
        and accumulation modes). Callables are named by their qualified names."""
        schedule = self.lr_schedule.spec if isinstance(self.lr_schedule, LRSchedule) else self.lr_schedule
        extra = {
            "lr_schedule": _spelled(schedule),
            "adjust": [_rule_spelled(r) for r in self.adjust],
            "average_decay": self.average_decay, "average_start_epoch": self.average_start_epoch,
            "grad_clip_mode": self.grad_clip_mode, "micro_batch": self.micro_batch, "accumulation": self.accumulation,
            "release_rows": self.release_rows,
            "optimizer_kwargs": {k: _spelled(v) for k, v in self.optimizer_kwargs.items()},
        }
        return f"{self.describe()} | " + ", ".join(f"{k}={v}" for k, v in extra.items())


def _spelled(value: Any) -> str:
    """A setting as text that is the same in every process: numbers, strings and their containers
    as they are, anything else (a function, an object whose repr holds its address, a set whose
    order follows hash randomisation) by its type's qualified name."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_spelled(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_spelled(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    kind = value if isinstance(value, type) or callable(value) else type(value)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', type(kind).__qualname__)}"


def _rule_spelled(rule: Any) -> str:
    """oxoptim's rules with their settings; a user's rule by its type (its attributes may print
    differently in each process)."""
    from . import rules

    if type(rule).__module__ != rules.__name__:
        return _spelled(rule)
    plateau = getattr(rule, "_p", None)  # a plateau rule's direction and threshold live in its tracker
    return repr(rule) + (f"[mode={plateau.mode!r}, min_delta={plateau.min_delta!r}]" if plateau is not None else "")


# Numeric optimizer arguments whose default (None, or none at all) does not show that they are numbers.
NUMERIC_ARGUMENTS = ("lr", "f_star", "beta3")
# Boolean optimizer arguments whose default (None) does not show that they are true/false.
BOOLEAN_ARGUMENTS = ("foreach", "fused")


def optimizer_defaults(cls: type) -> Dict[str, Any]:
    """The default of each keyword argument ``cls(params, ...)`` takes (``inspect.Parameter.empty``
    when it has none), following ``**kwargs`` up the class hierarchy like :func:`optimizer_arguments`."""
    defaults: Dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return defaults


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(label: str, value: Any, default: Any) -> None:
    """A numeric argument: not true/false (``lr = true`` is not 1.0) and finite (unless its default
    is infinite, as Prodigy's ``growth_rate``)."""
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a number, not {str(value).lower()}")
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value) or not (isinstance(default, float) and math.isinf(default)):
            raise ValueError(f"{label} must be a finite number, not {value}")


def _check_numbers(kwargs: Dict[str, Any], defaults: Dict[str, Any]) -> None:
    """Optimizer arguments that are numbers (their default is, or they are ``lr``, ...) or tuples of
    them (``betas``: as many values as the default has)."""
    for key, value in kwargs.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if isinstance(default, tuple):
            if not isinstance(value, (tuple, list)):
                if isinstance(value, (bool, int, float)):
                    raise ValueError(f"{key} must be {len(default)} numbers, like {list(default)}, not {value!r}")
                continue
            if len(value) != len(default):
                raise ValueError(f"{key} must be {len(default)} numbers, like {list(default)}, not {list(value)!r}")
            for i, (v, d) in enumerate(zip(value, default)):
                if v is not None or d is not None:
                    _check_number(f"{key}[{i}]", v, d)
        elif key in BOOLEAN_ARGUMENTS or isinstance(default, bool):
            # torch tests these for truth: amsgrad = "false" would turn AMSGrad on
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, not {value!r}")
        elif key in NUMERIC_ARGUMENTS or _is_number(default):
            if value is not None or key == "lr":
                _check_number(key, value, default)


def optimizer_arguments(cls: type) -> Optional[set]:
    """The keyword arguments ``cls(params, ...)`` takes, following ``**kwargs`` up the class
    hierarchy (oxoptim's mixins pass them on to the torch twin); None when that cannot be known."""
    names: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is torch.optim.Optimizer:
            return None
        params = list(inspect.signature(init).parameters.values())[2:]  # after self and params
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def group_state(optimizer: Any) -> List[Dict[str, Any]]:
    """The optimizer state an optimizer keeps in its parameter groups, group by group: every key
    that is not an argument of its constructor (``params`` aside), as Prodigy's ``d``, ``d_max``,
    ``d_numerator``, ``k``, Schedule-Free's ``k``, ``weight_sum``, ``lr_max``, ``train_mode``, bf16
    stochastic rounding's ``sr_seed``, ``sr_count``. The constructor's arguments (``lr``, ``betas``,
    ``weight_decay``, ...) are settings, which a continuing stage sets itself. When the arguments
    cannot be known (``**kwargs`` up to torch's Optimizer), the keys its defaults lack."""
    names = optimizer_arguments(type(optimizer))
    if names is None:
        names = set(getattr(optimizer, "defaults", {}))
    return [{k: copy.deepcopy(v) for k, v in g.items() if k != "params" and k not in names}
            for g in optimizer.param_groups]


def carry_state(optimizer: Any) -> Dict[str, Any]:
    """What a ``continue_optimizer`` stage takes over from ``optimizer``: its per-parameter state,
    its group state (:func:`group_state`), its other state-dict entries and its group sizes."""
    sd = optimizer.state_dict()
    # Entries beside "state" and "param_groups" are optimizer-wide too (Subgradient's step count).
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    return {"state": sd["state"], "groups": group_state(optimizer),
            "sizes": [len(g["params"]) for g in sd["param_groups"]], "extra": extra}


def load_carried(optimizer: Any, carried: Dict[str, Any]) -> None:
    """Continues ``optimizer`` (a new stage's, with that stage's settings) from ``carried``
    (:func:`carry_state`): the per-parameter state, and the group state merged into its own groups.
    A copy: each trial candidate continues from the same state. Carried dicts from before the group
    state was kept (older checkpoints) have none."""
    own = optimizer.state_dict()["param_groups"]
    groups = carried.get("groups")
    if groups is not None and len(groups) == len(own):
        own = [{**g, **copy.deepcopy(extra)} for g, extra in zip(own, groups)]
    optimizer.load_state_dict({**copy.deepcopy(carried.get("extra", {})), "state": copy.deepcopy(carried["state"]),
                               "param_groups": own})


def check_continuation(prev: Stage, stage: Stage) -> None:
    """Refuses (ValueError) a ``continue_optimizer`` stage whose optimizer, with any of its trial
    candidates' settings, cannot step from the state ``prev`` leaves (with any of its candidates'
    settings): for example Adam with ``amsgrad=True`` continuing Adam without it, whose state lacks
    ``max_exp_avg_sq``. Found by running both on small stand-in parameters, before anything trains,
    instead of failing once the earlier stages have trained."""
    same = {"optimizer": resolve_optimizer(stage.optimizer) is resolve_optimizer(prev.optimizer),  # any spelling
            "trainable": stage.trainable == prev.trainable}
    for key in ("optimizer", "trainable"):
        if not same[key]:
            raise ValueError(f"stage {stage.name!r}: continue_optimizer needs the previous stage's {key} "
                             f"({getattr(prev, key)!r}), not {getattr(stage, key)!r}")
    for before in _candidates(prev):
        carried = _dry_run(prev, before)
        if carried is None:  # the previous stage's own settings fail: its own check reports that
            continue
        for after in _candidates(stage):
            if _dry_run(stage, after) is None:
                continue
            try:
                _dry_run(stage, after, carried, strict=True)
            except Exception as e:  # noqa: BLE001 - whatever the optimizer raises is the reason
                theirs = f" (its trial candidate {before})" if before else ""
                ours = f"trial candidate {after}: " if after else ""
                raise ValueError(f"stage {stage.name!r}: {ours}continue_optimizer cannot step from the optimizer "
                                 f"state the previous stage {prev.name!r}{theirs} leaves: {type(e).__name__}: {e}") from e


def _candidates(stage: Stage) -> List[dict]:
    trial = stage.trial()
    return list(trial.candidates) if trial is not None else [{}]


def _stand_ins(stage: Stage) -> "tuple[List[torch.Tensor], Callable[[], torch.Tensor]]":
    """Small stand-in parameters of the stage's dtype (a matrix and a vector) and a closure that
    gives them gradients, for the checks that step a stage's optimizer before anything trains."""
    dtype = PARAM_DTYPES[stage.param_dtype or "float32"]
    probes = [torch.linspace(-1, 1, 256, dtype=dtype).reshape(4, 64).requires_grad_(),
              torch.linspace(1, 2, 3, dtype=dtype).requires_grad_()]

    def closure() -> torch.Tensor:
        for i, p in enumerate(probes):
            p.grad = torch.full_like(p, 0.25 * (i + 1))
        return torch.tensor(1.0)

    return probes, closure


def _dry_run(stage: Stage, overrides: dict, carried: Optional[dict] = None, strict: bool = False) -> Optional[dict]:
    """Two steps of the stage's optimizer (with ``overrides``) on small stand-in parameters, first
    loading ``carried`` state: the state it leaves, or None when a step fails (an exception with
    ``strict``). The state is carried as a stage's is (:func:`carry_state`, :func:`load_carried`)."""
    probes, closure = _stand_ins(stage)
    try:
        opt: Any = build_optimizer(stage, probes, overrides)
        if carried is not None:
            load_carried(opt, carried)
        if callable(getattr(opt, "train", None)):
            opt.train()  # Schedule-Free steps in train mode only
        for _ in range(2):
            opt.step(closure)
        return carry_state(opt)
    except Exception:  # noqa: BLE001
        if strict:
            raise
        return None


def _refuses_layer_lrs(stage: Stage, overrides: dict) -> Optional[str]:
    """Why the stage's optimizer (with ``overrides``) cannot step two parameter groups whose LRs
    differ, as ``layer_lr_decay`` makes them (Prodigy refuses that at its first step), or None. Only
    a failure that equal LRs do not have counts: other mistakes are reported by their own checks."""

    def steps(factors: List[float]) -> Optional[Exception]:
        probes, closure = _stand_ins(stage)
        try:
            opt: Any = build_optimizer(stage, [{"params": [p]} for p in probes], overrides, factors)
            if callable(getattr(opt, "train", None)):
                opt.train()  # Schedule-Free steps in train mode only
            opt.step(closure)
        except Exception as e:  # noqa: BLE001 - whatever the optimizer raises is the reason
            return e
        return None

    if steps([1.0, 1.0]) is not None:
        return None
    e = steps([stage.layer_lr_decay, 1.0])
    return None if e is None else f"{type(e).__name__}: {e}"


def build_optimizer(stage: Stage, params, overrides: Optional[dict] = None,
                    lr_factors: Optional[List[float]] = None) -> torch.optim.Optimizer:
    """The stage's optimizer over ``params`` (a list, or parameter groups with ``lr_factors``: each
    group's LR is the stage's LR times its factor)."""
    cls = resolve_optimizer(stage.optimizer)
    kwargs = {**stage.optimizer_kwargs, **stage.rounding_kwargs()}
    kwargs.update(overrides or {})
    opt = cls(params, **kwargs)
    for group, f in zip(opt.param_groups, lr_factors or []):
        group["lr"] = group["lr"] * f
    return opt


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def set_param_dtype(model: torch.nn.Module, name: Optional[str]) -> None:
    """Casts the model's floating parameters and buffers to ``PARAM_DTYPES[name]`` (None: leaves
    them); a non-float32 model gets its floating inputs cast to that dtype and its floating
    outputs back to float32, so the data and the loss need not know."""
    if name is None:
        return
    dtype = PARAM_DTYPES[name]
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    for handle in model.__dict__.pop("_oxoptim_dtype_hooks", []):
        handle.remove()
    if dtype != torch.float32:
        model.__dict__["_oxoptim_dtype_hooks"] = [
            model.register_forward_pre_hook(lambda module, args: _cast_floats(args, dtype)),
            model.register_forward_hook(lambda module, args, out: _cast_floats(out, torch.float32)),
        ]
