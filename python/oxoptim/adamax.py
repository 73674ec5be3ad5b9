"""Adamax on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["Adamax"]


class Adamax(LowPrecisionWeights, TorchTwin, torch.optim.Adamax, kind="adamax"):
    __doc__ = (
        """Drop-in ``torch.optim.Adamax`` (weight decay, maximize) whose CPU
    update runs in Rust SIMD, operation for operation as torch's. A subclass
    of :class:`torch.optim.Adamax`: same signature, defaults, validation
    errors and ``state_dict`` layout (``step``, ``exp_avg``, ``exp_inf``).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )
