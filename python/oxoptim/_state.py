"""Checks torch leaves out: NaN hyper-parameters (SGD's ``lr < 0`` test lets
NaN through), and a ``load_state_dict`` that checks everything first, so a
rejected state dict leaves the optimizer exactly as it was (torch checks only
the group layout)."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, ClassVar

import torch

__all__ = ["CheckedStateDict"]

# Hyper-parameter names and torch's wording for them.
_HYPER_NAMES = {
    "lr": "learning rate",
    "momentum": "momentum value",
    "dampening": "dampening value",
    "weight_decay": "weight_decay value",
    "eps": "epsilon value",
}


def _is_nan(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and bool(torch.isnan(value).item())
    return isinstance(value, float) and math.isnan(value)


class CheckedStateDict:
    """Mixin for optimizers whose per-parameter state tensors have the parameter's shape.

    ``PARAM_SHAPED`` names those state entries, ``SCALAR_STATE`` the 0-d ones;
    ``required_state(group)`` the entries a non-empty state must hold.
    """

    PARAM_SHAPED: ClassVar[tuple[str, ...]] = ()
    SCALAR_STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key, name in _HYPER_NAMES.items():
                if _is_nan(group.get(key)):
                    raise ValueError(f"Invalid {name}: {group[key]}")
            for i, beta in enumerate(group.get("betas", ())):
                if _is_nan(beta):
                    raise ValueError(f"Invalid beta parameter at index {i}: {beta}")

    def required_state(self, group: dict) -> tuple[str, ...]:
        return ()

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]

    def _check_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("optimizer state_dict must be a dict with 'state' and 'param_groups' entries")
        groups = self.param_groups  # type: ignore[attr-defined]
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        params = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), chain.from_iterable(g["params"] for g in groups)))
        group_of = {
            saved_id: {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for group, saved in zip(groups, saved_groups)
            for saved_id in saved["params"]
        }
        for key, entry in state_dict["state"].items():
            if key not in params:
                continue  # torch keeps state of unknown keys as is
            param = params[key]
            if not isinstance(entry, dict):
                raise ValueError(f"state of parameter {key} must be a dict, got {type(entry).__name__}")
            if not entry:
                continue
            missing = [name for name in self.required_state(group_of[key]) if name not in entry]
            if missing:
                raise ValueError(f"state of parameter {key} is missing {', '.join(map(repr, missing))}")
            for name, value in entry.items():
                self._check_entry(key, name, value, param)

    def _check_entry(self, key: Any, name: str, value: Any, param: torch.Tensor) -> None:
        where = f"state[{key!r}][{name!r}]"
        if name in self.PARAM_SHAPED:
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
            if value.shape != param.shape:
                raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)}")
            if not (value.is_floating_point() or value.is_complex()):
                raise ValueError(f"{where} has dtype {value.dtype}; a floating-point tensor is required")
        elif name in self.SCALAR_STATE:
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                    raise ValueError(f"{where} must be a single real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{where} must be a number, got {type(value).__name__}")
