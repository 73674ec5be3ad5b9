"""NAdam on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["NAdam"]


class NAdam(LowPrecisionWeights, TorchTwin, torch.optim.NAdam, kind="nadam"):
    __doc__ = (
        """Drop-in ``torch.optim.NAdam`` (``momentum_decay``, coupled or
    ``decoupled_weight_decay``, maximize) whose CPU update runs in Rust SIMD,
    operation for operation as torch's. A subclass of
    :class:`torch.optim.NAdam`: same signature, defaults, validation errors
    and ``state_dict`` layout (``step``, ``mu_product``, ``exp_avg``,
    ``exp_avg_sq``); ``mu_product`` is updated in its own dtype, as torch does.
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )
