"""RAdam on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["RAdam"]


class RAdam(LowPrecisionWeights, TorchTwin, torch.optim.RAdam, kind="radam"):
    __doc__ = (
        """Drop-in ``torch.optim.RAdam`` (coupled or ``decoupled_weight_decay``,
    maximize) whose CPU update runs in Rust SIMD, operation for operation as
    torch's. A subclass of :class:`torch.optim.RAdam`: same signature,
    defaults, validation errors and ``state_dict`` layout (``step``,
    ``exp_avg``, ``exp_avg_sq``).
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )
