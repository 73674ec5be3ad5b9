"""Adagrad on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._native import any_sparse_grad
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["Adagrad"]


class Adagrad(LowPrecisionWeights, TorchTwin, torch.optim.Adagrad, kind="adagrad"):
    __doc__ = (
        """Drop-in ``torch.optim.Adagrad`` (``lr_decay``, weight decay,
    ``initial_accumulator_value``, maximize) whose CPU update runs in Rust
    SIMD, operation for operation as torch's. A subclass of
    :class:`torch.optim.Adagrad`: same signature, defaults, validation errors
    and ``state_dict`` layout (``step``, ``sum``). Sparse gradients run
    torch's own implementation.
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )

    def _fails_part_way(self, group: dict) -> bool:
        # torch counts each parameter's step (and steps those with dense gradients) before it
        # reaches a sparse gradient with weight decay and raises.
        return group["weight_decay"] != 0 and any_sparse_grad(group)

    def _check_first_entry(self, entries: dict) -> None:
        first = next(iter(entries.values()), None)
        if isinstance(first, dict) and "step" not in first:
            raise KeyError("step")
