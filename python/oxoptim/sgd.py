"""SGD (plain gradient descent when ``momentum=0``) on the Rust SIMD kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch.optim.sgd import sgd as torch_sgd

from . import _core
from ._state import CheckedStateDict
from ._native import _use_grad_for_differentiable, evaluate_closure, num_threads, scalar, step_groups
from ._skip import SkipNonfinite

__all__ = ["SGD"]


class SGD(CheckedStateDict, SkipNonfinite, torch.optim.SGD):
    """Drop-in ``torch.optim.SGD`` whose CPU update runs in Rust SIMD.

    Same signature, defaults, validation errors and ``state_dict`` layout
    (``momentum_buffer``) as :class:`torch.optim.SGD`, of which it is a
    subclass (plus ``skip_nonfinite=False``: when true, a group whose gradients
    hold a NaN/Inf is not stepped and ``skipped_steps`` counts it); the update is θ ← θ − lr·d with d the (momentum, Nesterov,
    weight-decayed) direction, operation for operation as torch computes it.

    One native call per parameter group covers all its tensors, with the GIL
    released. Groups the Rust path cannot take — tensors on CUDA or another
    device, sparse or non-contiguous gradients, dtypes other than
    float32/float64/bfloat16/float16, ``differentiable=True``, AMP grad
    scaling — run torch's own implementation (honouring ``foreach``/``fused``),
    so the optimizer never breaks. ``foreach`` and ``fused`` are otherwise
    accepted for compatibility and do not change the native path.
    """

    PARAM_SHAPED = ("momentum_buffer",)
    # torch reads these only as numbers (``alpha=-lr``, ``alpha=weight_decay``),
    # so 0-d tensors of any dtype give the kernels exactly its values; a tensor
    # momentum enters ``buf.mul_(momentum)``, whose dtype promotion differs for
    # 0-d parameters. A missing momentum buffer is a fresh one, as in torch: no
    # state entry is required.
    EXACT_TENSOR_HYPER = frozenset({"lr", "weight_decay"})

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = evaluate_closure(closure)
        step_groups(self, self._fast_step, self._general_step)
        return loss

    def _fast_step(self, group: dict, cache) -> bool:
        # Momentum buffers exist (or momentum is 0) and every tensor is native.
        return _core.sgd_group_step(group["params"], self.state, cache, **self._native_hyper(group))

    def _general_step(self, group: dict, native: bool) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        buffers: list[Optional[torch.Tensor]] = []
        has_sparse_grad = self._init_group(group, params, grads, buffers)
        if not (native and not has_sparse_grad and self._native_step(group, params, grads, buffers)):
            self._torch_step(group, params, grads, buffers, has_sparse_grad)

    @staticmethod
    def _native_hyper(group: dict) -> dict:
        return dict(
            lr=scalar(group["lr"]),
            momentum=scalar(group["momentum"]),
            dampening=scalar(group["dampening"]),
            weight_decay=scalar(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            num_threads=num_threads(),
        )

    def _native_step(self, group: dict, params, grads, buffers) -> bool:
        hyper = self._native_hyper(group)
        fresh = [b is None for b in buffers]
        if hyper["momentum"] != 0:
            buffers = [torch.empty_like(g) if b is None else b for g, b in zip(grads, buffers)]
        done = _core.sgd_step(params, grads, buffers, fresh, **hyper)
        momentum = hyper["momentum"]
        if done and momentum != 0:
            for p, buf, new in zip(params, buffers, fresh):
                if new:
                    self.state[p]["momentum_buffer"] = buf
        return done

    def _torch_step(self, group: dict, params, grads, buffers, has_sparse_grad: bool) -> None:
        torch_sgd(
            params,
            grads,
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
