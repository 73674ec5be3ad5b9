"""SGD (plain gradient descent when ``momentum=0``) on the Rust SIMD kernels."""

from __future__ import annotations

import torch

from ._lowprec import LOW_PRECISION_OPTIONS, LowPrecisionWeights, shares_memory
from ._native import any_sparse_grad
from ._twin import TorchTwin

__all__ = ["SGD"]

_HALF = (torch.bfloat16, torch.float16)


class SGD(LowPrecisionWeights, TorchTwin, torch.optim.SGD, kind="sgd"):
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

    MAY_BE_NONE = ("momentum_buffer",)  # older torch saved it so without momentum

    def _fails_part_way(self, group: dict) -> bool:
        # torch adds the weight decay to each gradient as it reaches it (add(sparse, dense) raises
        # there): the parameters before the first sparse gradient were already stepped.
        return group["weight_decay"] != 0 and any_sparse_grad(group)

    def required_state(self, group: dict) -> tuple[str, ...]:
        # A missing momentum buffer is a fresh one, as in torch: no entry is required.
        return ()

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        # torch's first momentum step copies the gradient into a new buffer, whatever the
        # dampening. That is one step from a zero buffer without dampening
        # (0·momentum + 1·g = g), so a first step stays on the kernels: with dampening 0,
        # and in float32 for half-precision parameters as torch's fused path computes it;
        # with dampening under a low-precision option (native only), as a step whose
        # dampening is 0. Otherwise torch runs it. A sparse (or other non-strided)
        # gradient takes torch's path, which creates the buffer as it does.
        if group["momentum"] == 0 or any(g.layout != torch.strided for g in grads):
            return super()._list_step(group, params, grads)
        fresh = [self.state[p].get("momentum_buffer") is None for p in params]
        if group["dampening"] != 0:
            # Half-precision parameters too: torch's for-loop would round the weight-decayed
            # direction to their dtype before the update, where its fused step (our reference
            # for them) keeps float32.
            low = any(group.get(k) for k in LOW_PRECISION_OPTIONS) or any(p.dtype in _HALF for p in params)
            if not any(fresh) or not low:
                return super()._list_step(group, params, grads)
            return self._first_steps_undamped(group, params, grads, fresh)
        for p, g, new in zip(params, grads, fresh):
            if new:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        if super()._list_step(group, params, grads):
            return True
        for p, new in zip(params, fresh):  # torch's step creates them as it would have
            if new:
                self.state[p].pop("momentum_buffer", None)
        return False

    def _first_steps_undamped(self, group: dict, params: list, grads: list, fresh: list) -> bool:
        """A low-precision group with dampening whose parameters include fresh ones: those take
        their first step from a zero buffer with dampening 0, the others the group's step
        (two native calls: memory shared anywhere among them is refused, as one call refuses it)."""
        first = [(p, g) for p, g, new in zip(params, grads, fresh) if new]
        later = [(p, g) for p, g, new in zip(params, grads, fresh) if not new]
        buffers = [self.state[p]["momentum_buffer"] for p, _ in later]
        if later and shares_memory([*params, *buffers], list(grads)):
            return False  # what one call would refuse: the group's error (parameters sharing memory)
        for p, g in first:
            self.state[p]["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        undamped = {**group, "dampening": 0}
        if not super()._list_step(undamped, [p for p, _ in first], [g for _, g in first]):
            for p, _ in first:
                self.state[p].pop("momentum_buffer", None)
            return False
        if later:  # a failure here cannot leave the first call half done: it refuses before writing
            return super()._list_step(group, [p for p, _ in later], [g for _, g in later])
        return True
