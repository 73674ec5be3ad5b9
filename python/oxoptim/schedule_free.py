"""Schedule-Free AdamW and SGD on the Rust SIMD kernels, with the semantics
of the reference package ``schedulefree`` (1.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from ._native import any_sparse_grad
from ._twin import NATIVE_NOTE, TorchTwin

__all__ = ["AdamWScheduleFree", "AdamWScheduleFreeReference", "SGDScheduleFree", "SGDScheduleFreeReference"]

_NOT_IN_TRAIN_MODE = (
    "Optimizer was not in train mode when step is called. "
    "Please insert .train() and .eval() calls on the "
    "optimizer. See documentation for details."
)


@dataclass(frozen=True)
class Schedule:
    """One group's step-level numbers, computed as the reference does in Python."""

    lr: float  # after warm-up
    lr_max: float
    weight_sum: float
    ckp1: float  # weight of this step in the average of the iterates
    bias_correction2: float


class _ScheduleFreeReference(torch.optim.Optimizer):
    """What both Schedule-Free variants share: the train/eval switch (the
    parameters hold y in train mode and the average x in eval mode) and the
    group schedule. Subclasses define ``_update`` (one group, torch ops)."""

    MOMENTUM: ClassVar[str]  # the group key of β1: "betas" (first entry) or "momentum"

    def _beta1(self, group: dict) -> float:
        return group["betas"][0] if self.MOMENTUM == "betas" else group["momentum"]

    @torch.no_grad()
    def eval(self) -> None:
        """Puts the averaged weights x into the parameters (for evaluation and checkpoints)."""
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - 1 / self._beta1(group))
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Puts the gradient points y back into the parameters (before training steps)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - self._beta1(group))
                group["train_mode"] = True

    def _require_train_mode(self) -> None:
        if not self.param_groups[0]["train_mode"]:
            raise Exception(_NOT_IN_TRAIN_MODE)  # the reference's type and words

    def _schedule(self, group: dict) -> Schedule:
        k = group["k"]
        sched = (k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0
        lr = group["lr"] * sched
        lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0
        bias_correction2 = 1 - group["betas"][1] ** (k + 1) if "betas" in group else 1.0
        return Schedule(lr, lr_max, weight_sum, ckp1, bias_correction2)

    @staticmethod
    def _commit(group: dict, schedule: Schedule) -> None:
        group["scheduled_lr"] = schedule.lr  # for logging, as the reference
        group["lr_max"] = schedule.lr_max
        group["weight_sum"] = schedule.weight_sum
        group["k"] = group["k"] + 1

    def _init_group(self, group: dict, params: list, grads: list, *state_lists: list) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "z" not in state:
                state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                if "exp_avg_sq" in self.STATE_KEYS:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            for key, entries in zip(self.STATE_KEYS, state_lists):
                entries.append(state[key])

    STATE_KEYS: ClassVar[tuple[str, ...]]

    def _step_group(self, group: dict) -> None:
        schedule = self._schedule(group)
        params: list = []
        grads: list = []
        lists: list[list] = [[] for _ in self.STATE_KEYS]
        self._init_group(group, params, grads, *lists)
        for p, grad, *state in zip(params, grads, *lists):
            self._update(group, schedule, p, grad.clone(), *state)
        self._commit(group, schedule)

    def _update(self, group: dict, schedule: Schedule, y: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        self._require_train_mode()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss


def _check(lr: Any, weight_decay: float) -> None:
    if lr < 0.0:
        raise ValueError("Invalid learning rate: {}".format(lr))
    if weight_decay < 0.0:
        raise ValueError("Invalid weight_decay value: {}".format(weight_decay))


class AdamWScheduleFreeReference(_ScheduleFreeReference):
    """``schedulefree.AdamWScheduleFree`` in plain torch (its for-loop path),
    except that the gradient is left as it was (the reference divides it in
    place) and invalid ``lr``, ``betas``, ``eps`` and ``weight_decay`` raise
    ``ValueError`` (the reference accepts them)."""

    MOMENTUM = "betas"
    STATE_KEYS = ("z", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: Optional[bool] = hasattr(torch, "_foreach_mul_"),
    ) -> None:
        _check(lr, weight_decay)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 < beta < 1.0 if i == 0 else not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power, weight_decay=weight_decay, foreach=foreach)  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict, schedule: Schedule, y: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> None:
        z, exp_avg_sq = state
        beta1, beta2 = group["betas"]
        lr, ckp1 = schedule.lr, schedule.ckp1
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(schedule.bias_correction2).sqrt_().add_(group["eps"])
        grad_normalized = grad.div_(denom)
        if group["weight_decay"] != 0:
            grad_normalized.add_(y, alpha=group["weight_decay"])
        y.lerp_(end=z, weight=ckp1)
        y.add_(grad_normalized, alpha=lr * (beta1 * (1 - ckp1) - 1))
        z.sub_(grad_normalized, alpha=lr)


class SGDScheduleFreeReference(_ScheduleFreeReference):
    """``schedulefree.SGDScheduleFree`` in plain torch (its for-loop path),
    except that the gradient is left as it was (the reference adds the weight
    decay to it in place)."""

    MOMENTUM = "momentum"
    STATE_KEYS = ("z",)

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: Optional[bool] = hasattr(torch, "_foreach_mul_"),
    ) -> None:
        _check(lr, weight_decay)
        if momentum <= 0 or momentum >= 1:
            raise ValueError("Momentum must be between 0 and 1 exclusive: {}".format(momentum))
        defaults = dict(lr=lr, momentum=momentum, r=r, k=0, warmup_steps=warmup_steps, train_mode=False, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power, weight_decay=weight_decay, foreach=foreach)  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict, schedule: Schedule, y: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> None:
        (z,) = state
        lr, ckp1 = schedule.lr, schedule.ckp1
        if group["weight_decay"] != 0:
            grad.add_(y, alpha=group["weight_decay"])
        y.lerp_(end=z, weight=ckp1)
        y.add_(grad, alpha=lr * (group["momentum"] * (1 - ckp1) - 1))
        z.sub_(grad, alpha=lr)


class _ScheduleFreeTwin:
    """Mixin before :class:`TorchTwin` for both variants: the group schedule
    is computed in Python (as the reference does), the element-wise update in
    Rust, and the schedule moves on only when the group was stepped."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        self._require_train_mode()  # type: ignore[attr-defined]
        return super().step(closure)  # type: ignore[misc]

    def _check_before_backward_steps(self) -> None:
        self._require_train_mode()  # type: ignore[attr-defined]
        super()._check_before_backward_steps()  # type: ignore[misc]

    def required_state(self, group: dict) -> tuple[str, ...]:
        return self.STATE_KEYS  # type: ignore[attr-defined, no-any-return]

    def _hyper(self, group: dict) -> dict:
        schedule = self._schedule(group)  # type: ignore[attr-defined]
        hyper = {"lr": schedule.lr, "weight_decay": group["weight_decay"], "ckp1": schedule.ckp1}
        if "betas" in group:
            hyper.update(betas=group["betas"], eps=group["eps"], bias_correction2=schedule.bias_correction2)
        else:
            hyper["momentum"] = group["momentum"]
        return hyper

    def _advance_group(self, group: dict) -> None:
        self._commit(group, self._schedule(group))  # type: ignore[attr-defined]

    def _fast_step(self, group: dict, cache: Any) -> bool:
        if not super()._fast_step(group, cache):  # type: ignore[misc]
            return False
        self._advance_group(group)
        return True

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        if not super()._list_step(group, params, grads):  # type: ignore[misc]
            return False
        self._advance_group(group)
        return True

    def _fails_part_way(self, group: dict) -> bool:
        # The reference's in-place ops refuse most sparse gradients (addcmul_, add(sparse, dense))
        # after the parameters before that one were stepped, the schedule not moved on.
        return any_sparse_grad(group)

    def _reference_step(self, group: dict) -> None:
        # Not the reference's step(), which checks the first group's mode first.
        self._step_group(group)  # type: ignore[attr-defined]


_TWIN_NOTE = """
    Call ``optimizer.train()`` before training steps and ``optimizer.eval()``
    before evaluating or saving (the parameters then hold the averaged
    weights), as with the reference; ``step()`` in eval mode raises its
    error. The group schedule (warm-up, averaging weight) lives in the
    parameter groups, so ``state_dict`` is the reference's and either loads
    the other's.
"""


class AdamWScheduleFree(_ScheduleFreeTwin, TorchTwin, AdamWScheduleFreeReference, kind="adamw_schedulefree"):
    __doc__ = (
        """Schedule-Free AdamW (Defazio et al. 2024) whose CPU update runs in
    Rust SIMD, operation for operation as ``schedulefree.AdamWScheduleFree``
    with ``foreach=False``: same signature, defaults (``lr=0.0025``, no
    scheduler needed; ``warmup_steps`` for warm-up) and ``state_dict`` layout
    (``z``, ``exp_avg_sq``). State: 8 bytes/param in float32, as AdamW. Unlike
    the reference, the gradient is not overwritten.
"""
        + _TWIN_NOTE
        + NATIVE_NOTE
    )


class SGDScheduleFree(_ScheduleFreeTwin, TorchTwin, SGDScheduleFreeReference, kind="sgd_schedulefree"):
    __doc__ = (
        """Schedule-Free SGD (Defazio et al. 2024) whose CPU update runs in
    Rust SIMD, operation for operation as ``schedulefree.SGDScheduleFree``
    with ``foreach=False``: same signature, defaults (``lr=1.0``,
    ``momentum=0.9``) and ``state_dict`` layout (``z``). State: 4 bytes/param
    in float32. Unlike the reference, the gradient is not overwritten.
"""
        + _TWIN_NOTE
        + NATIVE_NOTE
    )
