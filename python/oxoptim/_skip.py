"""``skip_nonfinite``: skip a parameter group's step when a gradient holds NaN/Inf.

The check is one Rust read pass over the group's gradients
(:func:`oxoptim._core.any_nonfinite`); tensors the Rust path cannot read
(CUDA, sparse, other dtypes) are checked with torch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

from . import _core
from ._hooks import load_hooks_outside, save_hooks_outside
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

    ``skipped_steps`` survives ``copy.deepcopy`` and pickling, and is saved in
    ``state_dict()`` as a top-level ``"skipped_steps"`` entry whenever the
    option is on (or something was skipped): checkpoints resume the count, and
    torch's ``load_state_dict`` ignores the extra entry. Loading a state dict
    without it (one of torch's) keeps the current count, and groups saved
    without the flag keep the one they had.
    """

    skipped_steps: int = 0  # the class default serves pickles from before it was saved

    def __init__(self, params: Any, *args: Any, skip_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        self.skipped_steps = 0
        if skip_nonfinite:
            self.defaults["skip_nonfinite"] = True  # type: ignore[attr-defined]
            for group in self.param_groups:  # type: ignore[attr-defined]
                group.setdefault("skip_nonfinite", True)

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # type: ignore[misc]
        state["skipped_steps"] = self.skipped_steps
        return state

    @save_hooks_outside
    def state_dict(self) -> dict:
        state_dict = super().state_dict()  # type: ignore[misc]
        if self.skipped_steps or self.defaults.get("skip_nonfinite") or any(g.get("skip_nonfinite") for g in self.param_groups):  # type: ignore[attr-defined]
            state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    @load_hooks_outside
    def load_state_dict(self, state_dict: dict) -> None:
        skipped = _saved_skipped_steps(state_dict)  # checked before anything is loaded
        flags = [group.get("skip_nonfinite") for group in self.param_groups]  # type: ignore[attr-defined]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # A state dict without the option (one of torch's) keeps the groups' own setting.
        for group, flag in zip(self.param_groups, flags):  # type: ignore[attr-defined]
            if flag is not None:
                group.setdefault("skip_nonfinite", flag)
        if skipped is not None:
            self.skipped_steps = skipped

    def _skip_group(self, group: dict) -> bool:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads_nonfinite(grads):
            return False
        self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        return True


def _saved_skipped_steps(state_dict: Any) -> Optional[int]:
    """The ``"skipped_steps"`` entry of a state dict, or None when it has none."""
    if not isinstance(state_dict, Mapping) or "skipped_steps" not in state_dict:
        return None  # torch's load_state_dict reports what is wrong with a non-mapping
    value = state_dict["skipped_steps"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state dict entry 'skipped_steps' must be a non-negative int, got {value!r}")
    return value
