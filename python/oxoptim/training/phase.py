"""A phase: the optimizer and averager of one run through a stage (a trial candidate, or the main run)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .stages import Stage, build_optimizer, carry_state, load_carried, optimizer_defaults, resolve_optimizer, set_param_dtype

__all__ = ["Phase", "layer_groups"]


def layer_groups(stage: Stage, model: nn.Module) -> Tuple[List[List[torch.Tensor]], List[float]]:
    """The parameter groups a per-layer stage trains and their LR factors; freezes the others
    (``requires_grad``) and unfreezes these, so each stage sets its own."""
    if not hasattr(model, "layer_groups"):
        raise ValueError(f"stage {stage.name!r}: trainable/layer_lr_decay need a model with layer_groups(), "
                         f"which {type(model).__name__} lacks")
    groups = [list(g) for g in getattr(model, "layer_groups")()]
    train = groups if stage.trainable == "all" else groups[-1:]
    for i, g in enumerate(groups):
        for p in g:
            p.requires_grad_(stage.trainable == "all" or i == len(groups) - 1)
    factors = [stage.layer_lr_decay ** (len(train) - 1 - i) for i in range(len(train))]
    return train, factors


def params_of(optimizer: Any) -> List[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _versions(params: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """Each tensor's storage and in-place version counter: any write to it since changes them."""
    return [(p.data_ptr(), p._version) for p in params]


def _schedule_free(optimizer: Any) -> bool:
    """Whether the optimizer has Schedule-Free's train()/eval() switch."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def released_weights(stage: Stage, model: nn.Module) -> List[torch.Tensor]:
    """The weights a ``release_rows`` stage releases: the model's token embedding (and output layer)."""
    released = getattr(model, "released_rows", None)
    if released is None:
        raise ValueError(f"stage {stage.name!r}: release_rows needs a model whose token embedding is "
                         f"computed by oxoptim.rows (the GPT models); {type(model).__name__} has none")
    return list(released())


def check_released_weights(stages: List[Stage], index: int, model: nn.Module) -> None:
    """Before anything trains: stage ``index``'s released weights are ones its optimizer can release.
    SGD8bit releases weights with 8-bit state only, made by the first stage of its chain of
    ``continue_optimizer`` stages for weights of at least that stage's ``min_8bit_size`` elements."""
    stage = stages[index]
    weights = released_weights(stage, model)
    cls = resolve_optimizer(stage.optimizer)
    if getattr(cls, "KIND", None) != "sgd8bit":
        return
    first = index
    while first > 0 and stages[first].continue_optimizer:
        first -= 1
    size = stages[first].optimizer_kwargs.get("min_8bit_size", optimizer_defaults(cls)["min_8bit_size"])
    for w in weights:
        if w.numel() < size:
            raise ValueError(f"stage {stage.name!r}: release_rows takes SGD8bit weights with 8-bit state only: the "
                             f"released weight of shape {tuple(w.shape)} has {w.numel()} elements, under "
                             f"min_8bit_size = {size} of stage {stages[first].name!r}, so its state would be float "
                             f"(lower min_8bit_size, or use another optimizer)")


@dataclass
class Phase:
    optimizer: Any  # a torch.optim.Optimizer
    averager: Any  # oxoptim.ParamAverager or None
    base_lrs: List[Optional[float]]
    overrides: Dict[str, Any]
    in_backward: Any = None  # the StepInBackward context of a step_in_backward stage, while it lasts
    # Schedule-Free at the end of the stage: the gradient points y it trained on, and the versions of
    # the parameters once they hold x (to tell whether anything changed them since)
    settled: Optional[Tuple[List[torch.Tensor], List[Tuple[int, int]]]] = None

    @classmethod
    def make(cls, stage: Stage, model: nn.Module, steps_per_epoch: int, overrides: dict,
             carried: Optional[dict] = None, ddp: Optional[nn.Module] = None) -> "Phase":
        """The stage's optimizer (and averager); with ``carried`` (the previous stage's optimizer
        state, for a ``continue_optimizer`` stage) its per-parameter state continues. A
        ``step_in_backward`` stage's optimizer then steps inside backward (through ``ddp``'s
        communication hook when distributed) until :meth:`close`."""
        ph = cls._build(stage, model, steps_per_epoch, overrides, carried)
        ph._step_in_backward(stage, model, ddp)
        if ph.in_backward is not None and stage.continue_optimizer and carried and carried.get("in_backward"):
            ph.in_backward.load_state_dict(carried["in_backward"])  # the previous norm ClipPreviousNorm clips by
        return ph

    @classmethod
    def _build(cls, stage: Stage, model: nn.Module, steps_per_epoch: int, overrides: dict,
               carried: Optional[dict] = None) -> "Phase":
        set_param_dtype(model, stage.param_dtype)  # before the optimizer sees the parameters
        opt: Any  # a torch.optim.Optimizer; Schedule-Free's also has train()/eval()
        if stage.per_layer or hasattr(model, "layer_groups"):
            groups, factors = layer_groups(stage, model)
            params = [p for g in groups for p in g]
            opt = build_optimizer(stage, [{"params": g} for g in groups], overrides, factors)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            opt = build_optimizer(stage, params, overrides)
        if stage.continue_optimizer and carried is not None:
            own = opt.state_dict()
            if [len(g["params"]) for g in own["param_groups"]] != carried["sizes"]:
                raise ValueError(f"stage {stage.name!r}: continue_optimizer needs the previous stage's parameter "
                                 f"groups ({carried['sizes']}), this stage has "
                                 f"{[len(g['params']) for g in own['param_groups']]}")
            load_carried(opt, carried)  # per-parameter and group state (Prodigy's d, Schedule-Free's k, ...)
            if carried.get("weights") is not None and _schedule_free(opt):
                # the gradient points y the previous stage trained on, bit for bit (train() would
                # recompute them from x and z, rounded): one optimizer through the stages
                with torch.no_grad():
                    for p, y in zip(params_of(opt), carried["weights"]):
                        p.copy_(y)
                for g in opt.param_groups:
                    g["train_mode"] = True
        if _schedule_free(opt):
            opt.train()  # the parameters hold the gradient points y while training
        base_lrs = [g.get("lr") for g in opt.param_groups]
        averager = None
        if stage.average is not None:
            import oxoptim

            if not hasattr(oxoptim, "ParamAverager"):
                raise RuntimeError("average= needs oxoptim.ParamAverager, which this build of oxoptim lacks")
            start = stage.average_start_epoch * steps_per_epoch
            averager = oxoptim.ParamAverager(params, mode=stage.average, decay=stage.average_decay, start_step=start)
        return cls(opt, averager, base_lrs, dict(overrides))

    @classmethod
    def load(cls, stage: Stage, model: nn.Module, steps_per_epoch: int, saved: dict,
             ddp: Optional[nn.Module] = None) -> "Phase":
        ph = cls._build(stage, model, steps_per_epoch, saved["overrides"])
        ph.optimizer.load_state_dict(saved["optimizer"])  # new group dicts: the hooks come after
        if _schedule_free(ph.optimizer):
            ph.optimizer.train()  # checkpoints are saved in train mode: a no-op, kept for older ones
        if ph.averager is not None and saved["averager"] is not None:
            ph.averager.load_state_dict(saved["averager"])
        ph._step_in_backward(stage, model, ddp)
        if ph.in_backward is not None and saved.get("in_backward") is not None:
            ph.in_backward.load_state_dict(saved["in_backward"])
        return ph

    def _step_in_backward(self, stage: Stage, model: nn.Module, ddp: Optional[nn.Module]) -> None:
        if stage.step_in_backward:
            from oxoptim.backward import StepInBackward

            rows = released_weights(stage, model) if stage.release_rows else []
            self.in_backward = StepInBackward(self.optimizer, accumulate=stage.accumulate,
                                              accumulation=stage.accumulation, clip=stage.backward_clip(),
                                              ddp=ddp, release_rows=rows).__enter__()

    def close(self) -> None:
        """Removes a step_in_backward stage's hooks (the phase is over, or training stopped)."""
        if self.in_backward is not None:
            self.in_backward.close()
            self.in_backward = None

    def carry(self) -> dict:
        """What a ``continue_optimizer`` stage takes over: per-parameter state, the state kept in
        the parameter groups and the group sizes (:func:`~oxoptim.training.stages.carry_state`), and a
        step_in_backward stage's own state (the previous gradient norm); for
        Schedule-Free also the gradient points y the stage ended on, unless the weights it settled
        on (x) were changed since (RestoreBest): then the next stage's train() derives y from them."""
        carried = carry_state(self.optimizer)
        if self.in_backward is not None:
            carried["in_backward"] = self.in_backward.state_dict()
        if self.settled is not None and self.settled[1] == _versions(params_of(self.optimizer)):
            carried["weights"] = self.settled[0]
        return carried

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "averager": self.averager.state_dict() if self.averager is not None else None,
            "overrides": self.overrides,
            "in_backward": self.in_backward.state_dict() if self.in_backward is not None else None,
        }

    @contextlib.contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """Puts the weights validation sees into the model for the block: the averager's
        averages, or Schedule-Free's average x; then the training weights come back bit for bit."""
        if self.averager is not None:
            with self.averager.averaged():
                yield
        elif _schedule_free(self.optimizer):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            live = [p.detach().clone() for p in params]
            self.optimizer.eval()
            try:
                yield
            finally:
                self.optimizer.train()
                with torch.no_grad():  # train() recomputes y from x and z; the saved y is exact
                    for p, y in zip(params, live):
                        p.copy_(y)
        else:
            yield

    def settle(self) -> None:
        """At the end of the stage the model keeps the evaluated weights for good."""
        if self.averager is not None:
            if self.averager.n_averaged:
                self.averager.copy_to()
        elif _schedule_free(self.optimizer):
            params = params_of(self.optimizer)
            live = [p.detach().clone() for p in params]
            self.optimizer.eval()
            self.settled = (live, _versions(params))  # what a continue_optimizer stage starts from

    def set_lrs(self, factor: float) -> float:
        """Every group's LR = its base LR x ``factor``; returns the last group's LR (the top layers'
        under discriminative LRs; NaN if no group has one)."""
        lr = float("nan")
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            if base is not None:
                g["lr"] = lr = base * factor
        return lr

    def step(self) -> None:
        self.optimizer.step()
        if self.averager is not None:
            self.averager.update()
