"""RMSprop on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["RMSprop"]


class RMSprop(LowPrecisionWeights, TorchTwin, torch.optim.RMSprop, kind="rmsprop"):
    __doc__ = (
        """Drop-in ``torch.optim.RMSprop`` (centered, momentum, weight decay,
    maximize) whose CPU update runs in Rust SIMD, operation for operation as
    torch's. A subclass of :class:`torch.optim.RMSprop`: same signature,
    defaults, validation errors and ``state_dict`` layout (``step``,
    ``square_avg``, ``momentum_buffer``, ``grad_avg``).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )
