"""Adam and AdamW on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LowPrecisionWeights
from ._twin import TorchTwin

__all__ = ["Adam", "AdamW"]

_NATIVE_NOTE = """
    One native call per parameter group covers all its tensors, split across
    ``torch.get_num_threads()`` threads by elements, with the GIL released;
    results are bit-identical whatever the thread count. bfloat16/float16
    parameters are computed in float32 with state kept in the parameter dtype,
    as torch's fused path does. Groups the Rust path cannot take — tensors on
    CUDA or another device, complex or non-contiguous tensors,
    ``differentiable=True``, ``capturable=True``, AMP grad scaling, tensor
    ``lr``/``betas`` (torch computes the bias corrections in the tensor's
    dtype) — run torch's own implementation (honouring ``foreach``/``fused``),
    so the optimizer never breaks and matches torch's numbers.

    bfloat16 weights without an fp32 master copy: ``bf16_stochastic_round=True``
    stores each updated weight with unbiased stochastic rounding (as torchao's
    ``_AdamW``), ``kahan_sum=True`` with a bfloat16 Kahan compensation
    buffer (state entry ``kahan_comp``, as torch-optimi); both keyword-only,
    default False, bfloat16 parameters only, native path only.
"""


class Adam(LowPrecisionWeights, TorchTwin, torch.optim.Adam, kind="adam"):
    __doc__ = (
        """Drop-in ``torch.optim.Adam`` whose CPU update runs in Rust SIMD.

    Same signature, defaults, validation errors and ``state_dict`` layout
    (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) as
    :class:`torch.optim.Adam`, of which it is a subclass, including
    ``decoupled_weight_decay``; state dicts load both ways. Also takes
    ``skip_nonfinite=False``: when true, a group whose gradients hold a NaN/Inf
    is not stepped (parameters and state untouched) and ``skipped_steps`` counts it.
"""
        + _NATIVE_NOTE
    )


class AdamW(Adam, torch.optim.AdamW):
    __doc__ = (
        """Drop-in ``torch.optim.AdamW`` (Adam with decoupled weight decay,
    ``weight_decay=1e-2`` by default) whose CPU update runs in Rust SIMD.

    A subclass of both :class:`oxoptim.Adam` and :class:`torch.optim.AdamW`:
    torch's constructor, validation and ``state_dict`` layout, oxoptim's step.
"""
        + _NATIVE_NOTE
    )
