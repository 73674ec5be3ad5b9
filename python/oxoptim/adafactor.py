"""Adafactor on the Rust SIMD kernels (torch >= 2.5, which has ``torch.optim.Adafactor``)."""

from __future__ import annotations

from typing import Any

import torch

from . import _core
from ._native import num_threads, scalar
from ._twin import NATIVE_NOTE, TorchTwin

__all__ = ["Adafactor"]

_FACTORS = ("row_var", "col_var")
_KERNEL_DTYPES = (torch.float32, torch.float64)


class Adafactor(TorchTwin, torch.optim.Adafactor, kind="adafactor"):
    __doc__ = (
        """Drop-in ``torch.optim.Adafactor`` (factored second moment over the
    last two dimensions, update clipping ``d``, relative step size, decoupled
    weight decay, maximize) whose CPU update runs in Rust SIMD, following
    torch's for-loop ``_single_tensor_adafactor`` operation for operation. A
    subclass of :class:`torch.optim.Adafactor`: same signature, defaults,
    validation errors and ``state_dict`` layout (``step``; ``row_var`` and
    ``col_var`` for parameters of two or more dimensions, ``variance`` for
    vectors).

    Each parameter is one work item (its step needs norms over rows, columns
    and the whole tensor), reduced in a fixed order: results do not depend on
    the thread count. The reductions follow torch's CPU kernels, except
    ``row_var.mean()`` (torch: a cascade sum, here a sum in order), so
    results agree with torch to within an ulp or two rather than bit for bit.
    bfloat16/float16 and empty parameters take torch's implementation (torch
    itself cannot step an empty one).
"""
        + NATIVE_NOTE
    )

    def required_state(self, group: dict) -> tuple[str, ...]:
        return ("step",)  # the moments depend on each parameter's dimension

    def _check_entry(self, where: str, name: str, value: Any, param: torch.Tensor) -> None:
        if name not in _FACTORS:
            return super()._check_entry(where, name, value, param)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
        shape = list(param.shape)
        if len(shape) >= 2:
            shape[-1 if name == "row_var" else -2] = 1
        if list(value.shape) != shape:
            raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter of shape {tuple(param.shape)} calls for {tuple(shape)}")

    def _fast_step(self, group: dict, cache: Any) -> bool:
        return False  # a group mixes factored and vector state: the list path splits it

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        """Steps the group's matrices and vectors in one kernel call each (each
        parameter's update is independent of the others); a part the kernel
        cannot take runs torch's implementation."""
        if not params:
            return True
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch resolves it from the first parameter, then keeps it for the group
            eps1 = torch.finfo(params[0].dtype).eps
        for factored in (True, False):
            part = [(p, g) for p, g in zip(params, grads) if (g.dim() > 1) == factored]
            if part and not self._native_part(group, part, factored, eps1):
                self._torch_step({**group, "params": [p for p, _ in part], "eps": (eps1, eps2)})
        return True

    def _native_part(self, group: dict, part: list, factored: bool, eps1: float) -> bool:
        if any(p.dtype not in _KERNEL_DTYPES or p.numel() == 0 for p, _ in part):
            return False
        keys = _FACTORS if factored else ("variance",)
        entries = [self.state[p] for p, _ in part]  # type: ignore[attr-defined]
        hyper = {
            "lr": scalar(group["lr"]),
            "beta2_decay": float(group["beta2_decay"]),
            "eps1": float(eps1),
            "eps2": float(group["eps"][1]),
            "d": float(group["d"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group["maximize"]),
            "factored": factored,
        }
        state = [[entry[key] for entry in entries] for key in keys]
        steps = [[entry["step"] for entry in entries]]
        params, grads = [p for p, _ in part], [g for _, g in part]
        return _core.step(self.KIND, params, grads, state, steps, hyper, num_threads=num_threads())


# The table lists every state array; only `variance` has the parameter's shape.
Adafactor.PARAM_SHAPED = ("variance",)
