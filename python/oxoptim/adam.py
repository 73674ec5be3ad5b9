"""Adam and AdamW on the Rust SIMD kernels."""

from __future__ import annotations

import torch
from torch.optim.adam import adam as torch_adam

from . import _core
from ._state import CheckedStateDict
from ._native import _use_grad_for_differentiable, evaluate_closure, num_threads, scalar, step_groups
from ._skip import SkipNonfinite

__all__ = ["Adam", "AdamW"]

_NATIVE_NOTE = """
    One native call per parameter group covers all its tensors, split across
    ``torch.get_num_threads()`` threads by elements, with the GIL released;
    results are bit-identical whatever the thread count. bfloat16/float16
    parameters are computed in float32 with state kept in the parameter dtype,
    as torch's fused path does. Groups the Rust path cannot take — tensors on
    CUDA or another device, complex or non-contiguous tensors,
    ``differentiable=True``, AMP grad scaling, tensor ``lr``/``betas`` (or
    any tensor hyper-parameter: torch computes the bias corrections in the
    tensor's dtype) — run torch's own implementation (honouring
    ``foreach``/``fused``/``capturable``), so the optimizer never breaks and
    matches torch's numbers.
"""


class Adam(CheckedStateDict, SkipNonfinite, torch.optim.Adam):
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

    PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    SCALAR_STATE = ("step",)

    def required_state(self, group: dict) -> tuple[str, ...]:
        # In the order torch looks them up: ``step`` in __setstate__, the rest in the step.
        return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        self._accelerator_graph_capture_health_check()
        loss = evaluate_closure(closure)
        step_groups(self, self._fast_step, self._general_step)
        return loss

    def _fast_step(self, group: dict, cache) -> bool:
        # State already initialised and every tensor native.
        return _core.adam_group_step(group["params"], self.state, cache, **self._native_hyper(group))

    def _general_step(self, group: dict, native: bool) -> None:
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
        has_complex = self._init_group(group, *lists)
        if not (native and not has_complex and _core.adam_step(*lists, **self._native_hyper(group))):
            self._torch_step(group, lists, has_complex)

    @staticmethod
    def _native_hyper(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(
            lr=scalar(group["lr"]),
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=scalar(group["eps"]),
            weight_decay=scalar(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            num_threads=num_threads(),
        )

    def _torch_step(self, group, lists, has_complex: bool) -> None:
        beta1, beta2 = group["betas"]
        torch_adam(
            *lists,
            amsgrad=group["amsgrad"],
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=group["decoupled_weight_decay"],
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
