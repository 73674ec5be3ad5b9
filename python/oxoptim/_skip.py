"""``skip_nonfinite``: skip a parameter group's step when a gradient holds NaN/Inf.

The check is one Rust read pass over the group's gradients
(:func:`oxoptim._core.any_nonfinite`); tensors the Rust path cannot read
(CUDA, sparse, other dtypes) are checked with torch.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from . import _core
from ._native import num_threads

__all__ = ["SkipNonfinite", "grads_nonfinite"]


def grads_nonfinite(grads: Iterable[torch.Tensor]) -> bool:
    """Whether any gradient holds a NaN or an infinity."""
    grads = list(grads)
    if not grads:
        return False
    found = _core.any_nonfinite(grads, num_threads=num_threads())
    if found is not None:
        return found
    for g in grads:
        if g.is_sparse:
            g = g.coalesce().values()
        if not bool(torch.isfinite(g).all()):
            return True
    return False


class SkipNonfinite:
    """Mixin adding the keyword-only ``skip_nonfinite=False`` argument to an optimizer.

    When a group's ``skip_nonfinite`` is true and one of its gradients holds a
    NaN or an infinity, :meth:`_skip_group` returns True and counts the skip in
    ``optimizer.skipped_steps`` (one per skipped group); the optimizer then
    leaves that group's parameters and state untouched. The flag is stored in
    ``defaults`` and the groups only when true, so default state dicts stay
    identical to torch's.
    """

    skipped_steps: int

    def __init__(self, params: Any, *args: Any, skip_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        self.skipped_steps = 0
        if skip_nonfinite:
            self.defaults["skip_nonfinite"] = True  # type: ignore[attr-defined]
            for group in self.param_groups:  # type: ignore[attr-defined]
                group.setdefault("skip_nonfinite", True)

    def _skip_group(self, group: dict) -> bool:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads_nonfinite(grads):
            return False
        self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        return True
