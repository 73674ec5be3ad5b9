"""Rprop on the Rust SIMD kernels."""

from __future__ import annotations

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
