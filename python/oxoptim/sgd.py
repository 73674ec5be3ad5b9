"""SGD (plain gradient descent when ``momentum=0``) on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._twin import TorchTwin

__all__ = ["SGD"]


class SGD(TorchTwin, torch.optim.SGD, kind="sgd"):
    """Drop-in ``torch.optim.SGD`` whose CPU update runs in Rust SIMD.

    Same signature, defaults, validation errors and ``state_dict`` layout
    (``momentum_buffer``) as :class:`torch.optim.SGD`, of which it is a
    subclass (plus ``skip_nonfinite=False``: when true, a group whose gradients
    hold a NaN/Inf is not stepped and ``skipped_steps`` counts it); the update
    is θ ← θ − lr·d with d the (momentum, Nesterov, weight-decayed) direction,
    operation for operation as torch computes it.

    One native call per parameter group covers all its tensors, with the GIL
    released. A parameter's first momentum step (which creates its buffer)
    and groups the Rust path cannot take — tensors on CUDA or another device,
    sparse or non-contiguous gradients, dtypes other than
    float32/float64/bfloat16/float16, ``differentiable=True``, AMP grad
    scaling — run torch's own implementation (honouring ``foreach``/``fused``),
    so the optimizer never breaks. ``foreach`` and ``fused`` are otherwise
    accepted for compatibility and do not change the native path.
    """

    # torch reads these only as numbers (``alpha=-lr``, ``alpha=weight_decay``),
    # so 0-d tensors of any dtype give the kernels exactly its values; a tensor
    # momentum enters ``buf.mul_(momentum)``, whose dtype promotion differs for
    # 0-d parameters.
    EXACT_TENSOR_HYPER = frozenset({"lr", "weight_decay"})

    def required_state(self, group: dict) -> tuple[str, ...]:
        # A missing momentum buffer is a fresh one, as in torch: no entry is required.
        return ()
