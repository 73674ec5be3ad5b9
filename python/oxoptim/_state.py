"""Checks torch leaves out: NaN hyper-parameters (SGD's ``lr < 0`` test lets
NaN through), and loaded optimizer state that is checked before it replaces
anything, so a rejected ``load_state_dict`` leaves the optimizer exactly as it was.

The checks run in ``__setstate__``, which torch's ``load_state_dict`` calls
once its pre-hooks have run and it has checked the group layout itself (with
its own exception types) and cast the state to the parameters' dtype; pickle
and ``copy.deepcopy`` pass through the same checks. Each check raises the
exception type torch raises for the same fault, at load where torch does,
else where torch would fail on the next step:

* a state entry that is not a dict: ``TypeError`` (torch's Adam raises it at
  load, torch's SGD at its next step with momentum);
* a non-empty entry without a required key: ``KeyError`` (torch's Adam
  raises it at load for ``step``, at the next step for the moment buffers);
* ``step`` not convertible by ``float()``: the error ``float()`` raises (as torch);
* a ``step`` tensor that is not one real number, a state tensor whose shape
  is not the parameter's: ``ValueError`` (torch loads these and fails on the
  next step: deliberately stricter);
* a state tensor entry that is not a tensor: ``TypeError`` (likewise), but
  ``None`` where torch takes it for a fresh entry (SGD's ``momentum_buffer``,
  which older torch saved as ``None`` without momentum);
* an entry of 8-bit block-wise state (``exp_avg_absmax``...: an
  ``oxoptim.AdamW8bit`` state dict, whose uint8 codes torch has just cast to
  numbers): ``ValueError`` naming ``AdamW8bit.dequantize_state_dict``.
"""

from __future__ import annotations

import math
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


#: Group settings later torch releases added: their ``__setstate__`` fills a state dict
#: saved without them (an older checkpoint) with these values after this check runs.
_FILLED_BY_TORCH = {
    "amsgrad": False,
    "capturable": False,
    "centered": False,
    "decoupled_weight_decay": False,
    "differentiable": False,
    "foreach": None,
    "fused": None,
    "maximize": False,
    "momentum": 0,
    "nesterov": False,
}


def _is_nan(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and bool(torch.isnan(value).item())
    return isinstance(value, float) and math.isnan(value)


class CheckedStateDict:
    """Mixin for optimizers whose per-parameter state tensors have the parameter's shape.

    ``PARAM_SHAPED`` names those state entries, ``SCALAR_STATE`` the 0-d ones;
    ``required_state(group)`` the entries a non-empty state must hold, in the
    order torch looks them up, and ``required_param_state(param)`` those that
    depend on the parameter itself (Adafactor's by its number of dimensions).
    """

    PARAM_SHAPED: ClassVar[tuple[str, ...]] = ()
    SCALAR_STATE: ClassVar[tuple[str, ...]] = ()
    MAY_BE_NONE: ClassVar[tuple[str, ...]] = ()  # entries torch reads as "not there yet" when None

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

    def required_param_state(self, param: torch.Tensor) -> tuple[str, ...]:
        return ()

    def __setstate__(self, state: dict) -> None:
        self._check_state(state)
        super().__setstate__(state)  # type: ignore[misc]

    def _check_state(self, state: dict) -> None:
        """Checks every group parameter's entry of ``state['state']`` (keyed by the tensors)."""
        entries, groups = state.get("state"), state.get("param_groups")
        if entries is None or groups is None:
            return  # not an optimizer's state: torch's own __setstate__ reports it
        ids: dict[int, int] = {}  # numbered as state_dict() numbers them
        for group in groups:
            required = self.required_state({**_FILLED_BY_TORCH, **group})
            for param in group["params"]:
                key = ids.setdefault(id(param), len(ids))
                if param not in entries:
                    continue
                entry = entries[param]  # None too is malformed (torch's Adam fails on it after replacing the state)
                where = f"state[{key}]"
                if not isinstance(entry, dict):
                    raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
                if not entry:
                    continue
                scale = next((name for name in entry if isinstance(name, str) and name.endswith("_absmax")), None)
                if scale is not None and scale not in self.PARAM_SHAPED:
                    # torch has already cast the uint8 codes to numbers: refuse, do not train on them.
                    raise ValueError(
                        f"{where} is 8-bit block-wise state (it has {scale!r}); "
                        "load oxoptim.AdamW8bit.dequantize_state_dict(state_dict) instead"
                    )
                for name in (*required, *self.required_param_state(param)):
                    if name not in entry:
                        raise KeyError(f"{where} has no {name!r} entry")
                for name, value in entry.items():
                    self._check_entry(f"{where}[{name!r}]", name, value, param)
        self._check_first_entry(entries)

    def _check_first_entry(self, entries: dict) -> None:
        """Where torch's ``__setstate__`` reads the first entry's ``step`` (Adagrad), an empty one
        fails there, after the state was replaced: here it fails first, with torch's ``KeyError``."""

    def _check_entry(self, where: str, name: str, value: Any, param: torch.Tensor) -> None:
        if value is None and name in self.MAY_BE_NONE:
            return
        if name in self.PARAM_SHAPED:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
            if value.shape != param.shape:
                raise ValueError(f"{where} has shape {tuple(value.shape)} but the parameter has shape {tuple(param.shape)}")
        elif name in self.SCALAR_STATE:
            if not isinstance(value, torch.Tensor):
                float(value)  # what torch's __setstate__ does with a number: its error if that fails
            elif value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{where} must be a single real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
