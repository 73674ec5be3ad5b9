"""Lion on the Rust SIMD kernels, with the reference package's semantics."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import _core
from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["Lion", "LionReference"]


class LionReference(torch.optim.Optimizer):
    """Lion as ``lion-pytorch`` (0.2) defines it, in plain torch: the
    semantics oxoptim's :class:`Lion` reproduces, and its path for tensors
    the kernels do not take (CUDA, sparse, ...).

    Per parameter with a gradient ``g``: ``p ← p·(1 − lr·wd)``;
    ``p ← p − lr·sign(β1·m + (1 − β1)·g)``; ``m ← β2·m + (1 − β2)·g``.
    With ``decoupled_weight_decay=True`` the decay factor is ``wd / lr₀``
    (``lr₀`` the constructor's ``lr``), as in the reference: both are
    optimizer-wide, not per group. Invalid
    arguments raise ``ValueError`` (the reference uses ``assert``).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if use_triton:
            raise ValueError("use_triton=True needs lion-pytorch's CUDA Triton kernel; oxoptim's Lion runs without it")
        # Optimizer-wide, as in the reference (its groups and state dicts do not hold them).
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # torch's keeps only defaults, state and groups
        state.update(_init_lr=self._init_lr, decoupled_wd=self.decoupled_wd)
        return state

    def _weight_decay(self, group: dict) -> float:
        """The factor the update multiplies by lr."""
        wd = group["weight_decay"]
        return wd / self._init_lr if self.decoupled_wd else wd

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list) -> None:
        """Every stepped parameter with its state, created where missing (the native path's view)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], self._weight_decay(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:  # created as the loop reaches it, as in the reference
                    state["exp_avg"] = torch.zeros_like(p)
                grad, exp_avg = p.grad, state["exp_avg"]
                p.mul_(1.0 - lr * wd)
                update = exp_avg.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sgn_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss


class Lion(LowPrecisionWeights, TorchTwin, LionReference, kind="lion"):
    __doc__ = (
        """Lion (EvoLved Sign Momentum, Chen et al. 2023) whose CPU update runs
    in Rust SIMD, operation for operation as the reference package
    ``lion-pytorch``'s ``Lion``: same signature (``use_triton`` must stay
    False), defaults (``lr=1e-4``, ``betas=(0.9, 0.99)``) and ``state_dict``
    layout (``exp_avg``), so either loads the other's state. State: one
    buffer per parameter (4 bytes/param in float32, half of Adam's).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )

    def required_state(self, group: dict) -> tuple[str, ...]:
        # Also runs on a state being unpickled, before the optimizer-wide settings are back.
        arrays, scalars = _core.layout(self.KIND, {key: group[key] for key in self._HYPER})
        return (*scalars, *arrays)

    def _hyper(self, group: dict) -> dict:
        return {"lr": group["lr"], "betas": group["betas"], "weight_decay": self._weight_decay(group)}
