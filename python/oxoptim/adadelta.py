"""Adadelta on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["Adadelta"]


class Adadelta(LowPrecisionWeights, TorchTwin, torch.optim.Adadelta, kind="adadelta"):
    __doc__ = (
        """Drop-in ``torch.optim.Adadelta`` (weight decay, maximize) whose CPU
    update runs in Rust SIMD, operation for operation as torch's. A subclass
    of :class:`torch.optim.Adadelta`: same signature, defaults, validation
    errors and ``state_dict`` layout (``step``, ``square_avg``, ``acc_delta``).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )
