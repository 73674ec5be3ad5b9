"""Adafactor on the Rust SIMD kernels (torch >= 2.5, which has ``torch.optim.Adafactor``)."""

from __future__ import annotations

from typing import Any

import torch

from . import _core
from ._lowprec import shares_memory
from ._native import num_threads
from ._twin import NATIVE_NOTE, TorchTwin

__all__ = ["Adafactor"]

_FACTORS = ("row_var", "col_var")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _state_shape(key: str, shape: torch.Size) -> torch.Size:
    """The shape torch gives state ``key`` of a gradient of ``shape``."""
    dims = list(shape)
    if len(dims) < 2:
        return torch.Size(dims)
    if key == "row_var":
        dims[-1] = 1
    elif key == "col_var":
        dims[-2] = 1
    return torch.Size(dims)


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
    and the whole tensor), reduced in the order of torch's CPU kernels:
    results equal torch's for-loop bit for bit and do not depend on the
    thread count (torch's do for ``row_var.mean()`` over more than 32,768
    rows on several threads).
    A group with an empty parameter (torch cannot step it either:
    ZeroDivisionError) or any tensor the kernel does not take runs torch's
    implementation as a whole, in torch's order.
"""
        + NATIVE_NOTE
    )
    SCALARS_CHECKED_ON_STAND_INS = False  # factored moments: a one-element stand-in is not factored

    def required_state(self, group: dict) -> tuple[str, ...]:
        return ("step",)  # the moments depend on each parameter's dimension: required_param_state

    def required_param_state(self, param: torch.Tensor) -> tuple[str, ...]:
        # torch creates row_var and col_var for a gradient of two or more dimensions, variance
        # otherwise, all at once, and asserts at the next step (after counting it) if one is missing.
        return _FACTORS if param.dim() > 1 else ("variance",)

    def _check_entry(self, where: str, name: str, value: Any, param: torch.Tensor) -> None:
        if name not in _FACTORS:
            return super()._check_entry(where, name, value, param)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
        shape = _state_shape(name, param.shape)
        if value.shape != shape:
            raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter of shape {tuple(param.shape)} calls for {tuple(shape)}")

    def _fast_step(self, group: dict, cache: Any) -> bool:
        return False  # a group mixes factored and vector state: the list path splits it

    def _bucket_group(self, group: dict, params: list) -> dict:
        """A bucket's group keeps the group's ``eps1``: torch resolves ``None`` from the group's first
        parameter with a gradient (here: the first that requires one), not from the bucket's."""
        sub = super()._bucket_group(group, params)
        eps1, eps2 = group["eps"]
        first = next((p for p in group["params"] if p.requires_grad), None)
        if eps1 is None and first is not None:
            sub["eps"] = (torch.finfo(first.dtype).eps, eps2)
        return sub

    def _kernel_calls(self, group: dict, params: list) -> list[tuple[dict, list]]:
        """One call for the matrices (factored state), one for the vectors."""
        if not params:
            return []
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch resolves it from the first parameter, then keeps it for the group
            eps1 = torch.finfo(params[0].dtype).eps
        calls = []
        for factored in (True, False):
            part = [p for p in params if (p.dim() > 1) == factored]
            if part:
                # As set: the kernels read numbers and 0-d tensors, and decline anything else
                # (torch's step then runs, using the value or raising its own error).
                hyper = {
                    "lr": group["lr"],
                    "beta2_decay": group["beta2_decay"],
                    "eps1": eps1,
                    "eps2": eps2,
                    "d": group["d"],
                    "weight_decay": group["weight_decay"],
                    "maximize": bool(group["maximize"]),
                    "factored": factored,
                }
                calls.append((hyper, part))
        return calls

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        """Steps the group's matrices and vectors in one kernel call each.
        Each parameter's update is independent of the others, so the order
        does not matter as long as no step fails half-way: anything torch
        might fail on or handle its own way (checked first, nothing written)
        sends the whole group to torch's implementation, in its order."""
        if not self._kernel_takes(params, grads):
            return False
        grad_of = {id(p): g for p, g in zip(params, grads)}
        for i, (hyper, part) in enumerate(self._kernel_calls(group, params)):
            keys = _FACTORS if hyper["factored"] else ("variance",)
            entries = [self.state[p] for p in part]  # type: ignore[attr-defined]
            state = [[entry[key] for entry in entries] for key in keys]
            steps = [[entry["step"] for entry in entries]]
            grads_of_part = [grad_of[id(p)] for p in part]
            if _core.step(self.KIND, part, grads_of_part, state, steps, hyper, num_threads=num_threads()):
                continue
            if i == 0:
                return False  # nothing written yet: torch steps the whole group
            self._torch_step({**group, "params": part, "eps": (hyper["eps1"], hyper["eps2"])})
        return True

    def _kernel_takes(self, params: list, grads: list) -> bool:
        """Whether every parameter is one the kernel steps as torch would (a
        float dtype, not empty, dense contiguous CPU tensors, its gradient and
        state of its dtype and of the shapes torch gives them) and no array
        overlaps another in memory (views of one flat buffer, as DDP's
        ``gradient_as_bucket_view`` makes, are disjoint): what either kernel
        call would refuse is found before the first one writes (torch,
        stepping the parameters in order, may raise part-way: a state of
        another dtype)."""
        state = self.state  # type: ignore[attr-defined]
        every: list = []
        for p, g in zip(params, grads):
            shape = p.shape
            if p.dtype not in _KERNEL_DTYPES or g.shape != shape or p.numel() == 0 or g.is_sparse or g.dtype != p.dtype:
                return False
            if g._is_zerotensor():  # no storage to read: torch's path
                return False
            entry = state[p]
            if not float(entry["step"]) + 1 > 0:  # torch raises on a counter it cannot take a root of (or NaN: its own result)
                return False
            if len(shape) >= 2:
                row, col = entry.get("row_var"), entry.get("col_var")
                if row is None or col is None or row.shape != _state_shape("row_var", shape) or col.shape != _state_shape("col_var", shape):
                    return False
                arrays = [p, g, row, col]
            else:
                variance = entry.get("variance")
                if variance is None or variance.shape != shape:
                    return False
                arrays = [p, g, variance]
            if not all(t.dtype == p.dtype and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() for t in arrays):
                return False
            every += arrays
            every.append(entry["step"])
        return not shares_memory(every, [])


# The table lists every state array; only `variance` has the parameter's shape.
Adafactor.PARAM_SHAPED = ("variance",)
