"""Rprop on the Rust SIMD kernels."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["Rprop"]


class Rprop(LowPrecisionWeights, TorchTwin, torch.optim.Rprop, kind="rprop"):
    __doc__ = (
        """Drop-in ``torch.optim.Rprop`` (``etas``, ``step_sizes``, maximize)
    whose CPU update runs in Rust SIMD, operation for operation as torch's. A
    subclass of :class:`torch.optim.Rprop`: same signature, defaults,
    validation errors and ``state_dict`` layout (``step``, ``prev``,
    ``step_size``).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )

    def _fast_step(self, group: dict, cache: Any) -> bool:
        return _kernel_computes(group) and super()._fast_step(group, cache)

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        return _kernel_computes(group) and super()._list_step(group, params, grads)


def _kernel_computes(group: dict) -> bool:
    """The kernel picks each element's factor (etaplus, etaminus, 1) and clamps its step size in one
    select each: torch's result for the etas its constructor accepts (0 < etaminus < 1 < etaplus) and
    step-size bounds that are not NaN. torch's masked assignments, one after another, give other
    results for etas set outside that range afterwards, and its clamp spreads a NaN bound: such a
    group takes torch's implementation."""
    etaminus, etaplus = group["etas"]
    low, high = group["step_sizes"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (etaminus, etaplus, low, high)):
        return True  # not numbers: the kernels decline them themselves
    nan_bound = any(isinstance(v, float) and math.isnan(v) for v in (low, high))
    return 0.0 < etaminus < 1.0 < etaplus and not nan_bound
