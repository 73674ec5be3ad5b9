"""Averaged SGD on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import LOW_PRECISION_NOTE, NATIVE_NOTE, TorchTwin

__all__ = ["ASGD"]


class ASGD(LowPrecisionWeights, TorchTwin, torch.optim.ASGD, kind="asgd"):
    __doc__ = (
        """Drop-in ``torch.optim.ASGD`` (averaged SGD; weight decay, maximize)
    whose CPU update runs in Rust SIMD, operation for operation as torch's. A
    subclass of :class:`torch.optim.ASGD`: same signature, defaults,
    validation errors and ``state_dict`` layout (``step``, ``eta``, ``mu``,
    ``ax``); ``eta`` and ``mu`` stay 0-d tensors updated as torch updates them.
"""
        + NATIVE_NOTE
        + LOW_PRECISION_NOTE
    )

    def _hyper(self, group: dict) -> dict:
        # torch stores each new eta/mu through ``torch.as_tensor(float)``: the
        # default dtype rounds them first, whatever dtype the state cell has.
        hyper = {key: group[key] for key in self._HYPER if key != "default_float32"}
        hyper["default_float32"] = torch.get_default_dtype() == torch.float32
        return hyper
