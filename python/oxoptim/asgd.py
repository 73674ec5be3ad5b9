"""Averaged SGD on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._twin import NATIVE_NOTE, TorchTwin

__all__ = ["ASGD"]


class ASGD(TorchTwin, torch.optim.ASGD, kind="asgd"):
    __doc__ = (
        """Drop-in ``torch.optim.ASGD`` (averaged SGD; weight decay, maximize)
    whose CPU update runs in Rust SIMD, operation for operation as torch's. A
    subclass of :class:`torch.optim.ASGD`: same signature, defaults,
    validation errors and ``state_dict`` layout (``step``, ``eta``, ``mu``,
    ``ax``); ``eta`` and ``mu`` stay 0-d tensors updated as torch updates them.
"""
        + NATIVE_NOTE
    )
