"""Averaged SGD on the Rust SIMD kernels."""

from __future__ import annotations

from typing import Any

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

    # The kernels round eta and mu to float32 or keep float64; any other default dtype (bfloat16,
    # float16) takes torch's implementation, which rounds them to it.
    def _fast_step(self, group: dict, cache: Any) -> bool:
        return _rounds_like_a_kernel() and super()._fast_step(group, cache)

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        return _rounds_like_a_kernel() and super()._list_step(group, params, grads)

    def _hyper(self, group: dict) -> dict:
        # torch stores each new eta/mu through ``torch.as_tensor(float)``: the
        # default dtype rounds them first, whatever dtype the state cell has.
        hyper = {key: group[key] for key in self._HYPER if key != "default_float32"}
        hyper["default_float32"] = torch.get_default_dtype() == torch.float32
        return hyper


def _rounds_like_a_kernel() -> bool:
    return torch.get_default_dtype() in (torch.float32, torch.float64)
