"""The generic torch twin: an oxoptim optimizer is its torch class plus a row
of the Rust table (``_core.optimizers()``), named by the ``kind`` class keyword::

    class RMSprop(TorchTwin, torch.optim.RMSprop, kind="rmsprop"):
        "docstring"

The torch class supplies the constructor, validation, ``_init_group`` (state
creation) and ``state_dict``; the table supplies the hyper-parameter keys the
kernel reads and the state layout. Each group steps on the first path that
can take it:

1. the whole-group fast path (``_core.group_step``): state already exists,
   tensors gathered in Rust with their descriptions cached between steps;
2. torch's ``_init_group`` creates any missing state, then the list path
   (``_core.step``) runs on the tensors it found;
3. torch's own ``step``, for this group only: tensors the kernels cannot take
   (CUDA, sparse, complex, non-contiguous, mismatched dtypes, shared memory),
   state torch creates lazily (SGD's momentum buffer on its first step),
   ``differentiable``/``capturable``, AMP grad scaling, hyper-parameters that
   require grad.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Optional

import torch

from . import _core
from ._native import (check_scalar_state, drop_unfinished_iteration, evaluate_closure, group_is_native, has_huge_hyper, num_threads,
                      step_groups, step_or_restore, use_grad_for_differentiable)
from ._skip import SkipNonfinite
from ._state import CheckedStateDict

__all__ = ["NATIVE_NOTE", "TorchTwin"]

#: The part of every twin's docstring that describes the native path.
NATIVE_NOTE = """
    One native call per parameter group covers all its tensors, split across
    ``torch.get_num_threads()`` threads by elements, with the GIL released;
    results are bit-identical whatever the thread count. bfloat16/float16
    parameters are computed in float32 with state kept in the parameter dtype,
    like torch's fused optimizers. Groups the Rust path cannot take — tensors
    on CUDA or another device, sparse, complex or non-contiguous tensors,
    ``differentiable=True``, ``capturable=True``, AMP grad scaling, tensor
    hyper-parameters (torch computes with them in their dtype) — run torch's own implementation, so the optimizer
    never breaks. Also takes ``skip_nonfinite=False``: when true, a group
    whose gradients hold a NaN/Inf is not stepped (parameters and state
    untouched) and ``skipped_steps`` counts it.
"""

LOW_PRECISION_NOTE = """
    Keyword-only low-precision options (default off, native path only):
    ``state_dtype=torch.bfloat16`` keeps the parameter-shaped state in
    bfloat16 (computed in float32); for bfloat16 parameters without an fp32
    master copy, ``bf16_stochastic_round=True`` stores each updated weight with
    unbiased stochastic rounding and ``kahan_sum=True`` with a bfloat16 Kahan
    compensation buffer (state entry ``kahan_comp``).
"""

_TABLE = _core.optimizers()


def _torch_class(cls: type) -> type[torch.optim.Optimizer]:
    """The reference optimizer class of ``cls``: the first concrete optimizer of
    its MRO that is not itself a twin (AdamW's is torch's AdamW, Lion's is
    ``LionReference``)."""
    for base in cls.__mro__:
        if issubclass(base, torch.optim.Optimizer) and base is not torch.optim.Optimizer and not issubclass(base, TorchTwin):
            return base
    raise TypeError(f"{cls.__name__} must derive from an optimizer class that defines the reference semantics")


def _with_skip_nonfinite(signature: inspect.Signature) -> inspect.Signature:
    """torch's constructor signature plus oxoptim's keyword-only ``skip_nonfinite=False``."""
    extra = inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=[*params[:at], extra, *params[at:]])


def _unhooked_step(torch_class: type[torch.optim.Optimizer]) -> Any:
    """torch's ``step`` without the hook wrapper torch installs on a class's first instance."""
    step: Any = torch_class.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class _OneGroup:
    """The optimizer as torch's own ``step`` sees it, restricted to one parameter group."""

    __slots__ = ("_optimizer", "param_groups")

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict) -> None:
        object.__setattr__(self, "_optimizer", optimizer)
        object.__setattr__(self, "param_groups", [group])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)


class TorchTwin(CheckedStateDict, SkipNonfinite):
    """Base of oxoptim's drop-in ``torch.optim`` classes (see the module docstring).

    Subclasses list this class first, then their torch class, and name their
    row of the Rust table with ``kind=``; subclasses of a twin inherit it.
    """

    KIND: ClassVar[str]
    #: Whether ``step_in_backward`` can step its groups piece by piece (not when
    #: a step needs every gradient first, as Prodigy's estimate of ``d``).
    STEPS_IN_BACKWARD: ClassVar[bool] = True
    #: Whether the kernel's state arrays are all parameter-shaped, so that its scalar-state checks
    #: run on one-element stand-ins (not Adafactor's factored moments).
    SCALARS_CHECKED_ON_STAND_INS: ClassVar[bool] = True
    _TORCH: ClassVar[type[torch.optim.Optimizer]]
    _HYPER: ClassVar[tuple[str, ...]]
    _HYPER_KEYS: ClassVar[frozenset[str]]
    _INIT_LISTS: ClassVar[int]

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = kind or getattr(cls, "KIND", None)
        if kind not in _TABLE:
            raise TypeError(f"{cls.__name__}: kind={kind!r} is not in the Rust table ({', '.join(_TABLE)})")
        row = _TABLE[kind]
        cls.KIND = kind
        cls._HYPER = row["hyper"]
        cls._HYPER_KEYS = frozenset(row["hyper"])
        cls.PARAM_SHAPED = row["state"]
        cls.SCALAR_STATE = row["scalars"]
        cls._TORCH = _torch_class(cls)
        # torch's `_init_group(self, group, params, grads, <state lists>...)`: how many lists it fills.
        cls._INIT_LISTS = len(inspect.signature(getattr(cls._TORCH, "_init_group")).parameters) - 2
        cls.__signature__ = _with_skip_nonfinite(inspect.signature(cls._TORCH))  # type: ignore[attr-defined]

    def _hyper(self, group: dict) -> dict:
        return {key: group[key] for key in self._HYPER}

    def required_state(self, group: dict) -> tuple[str, ...]:
        arrays, scalars = _core.layout(self.KIND, self._hyper(group))
        return (*scalars, *arrays)

    @use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = evaluate_closure(closure)
        in_backward = self.__dict__.get("_oxoptim_step_in_backward")
        if in_backward is not None:
            in_backward.finish()  # the parameters were updated during backward
        else:
            step_groups(self, self._fast_step, self._general_step, self._after_group_step)
        return loss

    def _after_group_step(self, group: dict) -> None:
        """Runs once ``step()`` has stepped (or skipped) ``group``."""

    def _advance_group(self, group: dict) -> None:
        """Moves a group's own step-level state (Schedule-Free's schedule) on by one step. The
        ordinary step does it with each group; ``step_in_backward``, which steps a group in pieces,
        once per iteration. Most optimizers keep no such state."""

    def _step_part(self, group: dict, cache: Any, native: bool = True) -> None:
        """Steps ``group``, a copy of one of the groups holding some of its parameters:
        what ``step_in_backward`` runs per bucket (its ``cache`` keeps the bucket's layout).
        ``native=False``: the whole group runs torch's implementation, as the ordinary step would run it."""
        native = native and group_is_native(self, group)  # type: ignore[arg-type]
        if not (native and self._fast_step(group, cache)):
            self._general_step(group, native)

    def _bucket_group(self, group: dict, params: list) -> dict:
        """The group ``step_in_backward`` steps for one bucket: a copy of ``group`` holding ``params``."""
        return {**group, "params": params}

    def _check_before_backward_steps(self) -> None:
        """What ``step`` refuses before any group is stepped, checked by ``step_in_backward`` before
        its first update of each iteration (gradients are not known yet: the parameters are): here,
        the kernel's refusals of step counters and other scalar state (:func:`check_scalar_state`),
        which the ordinary step raises before it writes the group."""
        if not self.SCALARS_CHECKED_ON_STAND_INS:
            return
        state = self.state  # type: ignore[attr-defined]
        for group in self.param_groups:  # type: ignore[attr-defined]
            if not group_is_native(self, group):  # type: ignore[arg-type]
                continue  # torch's step, whose errors come from torch
            trained = [p for p in group["params"] if p.requires_grad]
            for hyper, params in self._kernel_calls(group, trained):
                check_scalar_state(self.KIND, hyper, params, [state.get(p) for p in params], state_like_param=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The iteration first: a DDP bucket update still running must end before gradients are cleared.
        try:
            drop_unfinished_iteration(self)
        finally:
            super().zero_grad(set_to_none)  # type: ignore[misc]

    def _fast_step(self, group: dict, cache: Any) -> bool:
        state = self.state  # type: ignore[attr-defined]
        options = self._native_options(group, None)
        return _core.group_step(self.KIND, group["params"], state, cache, self._hyper(group), num_threads=num_threads(), **options)

    def _general_step(self, group: dict, native: bool) -> None:
        if native:
            state = self.state  # type: ignore[attr-defined]
            # Parameters without state: absent, or an empty entry (a defaultdict's, made by a lookup).
            stateless = {p: p in state for p in group["params"] if not state.get(p)}
            lists: list[list[Any]] = [[] for _ in range(self._INIT_LISTS)]
            stepped = False
            try:
                self._init_group(group, *lists)  # type: ignore[attr-defined]
                stepped = self._list_step(group, lists[0], lists[1])
            finally:
                # Refused or failed (torch's `_init_group` too: Rprop's `full_like(grad, lr)` of an lr
                # beyond float32), the call leaves no state it made; the reference
                # creates state as it goes (lazily, or all up front as torch does).
                if not stepped:
                    for p, had_entry in stateless.items():
                        if had_entry:
                            state[p] = {}
                        else:
                            state.pop(p, None)
            if stepped:
                return
        self._torch_step(group)

    def _kernel_calls(self, group: dict, params: list) -> list[tuple[dict, list]]:
        """The kernel calls that step ``params`` of ``group``: ``(hyper, params)``
        each. One per group, unless the state layout differs between parameters."""
        return [(self._hyper(group), params)]

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        hyper = self._hyper(group)
        arrays, scalars = _core.layout(self.KIND, hyper)
        options = self._native_options(group, params)  # may convert or add state first
        entries = [self.state.get(p, {}) for p in params]  # type: ignore[attr-defined]
        try:
            state = [[entry[key] for entry in entries] for key in arrays]
            cells = [[entry[key] for entry in entries] for key in scalars]
        except KeyError:
            return False  # state torch creates on first use
        return _core.step(self.KIND, params, grads, state, cells, hyper, num_threads=num_threads(), **options)

    def _native_options(self, group: dict, params: Optional[list]) -> dict:
        """Extra keyword arguments of the group's native call (``_core.group_step`` when
        ``params`` is None, else ``_core.step`` on ``params``, whose state it may prepare):
        how bfloat16 weights and state are stored."""
        return {}

    def _torch_step(self, group: dict) -> None:
        # The reference may raise half-way: nothing may be lost.
        if has_huge_hyper(self, group) or self._fails_part_way(group):
            step_or_restore(self, [group], lambda: self._reference_step(group))
        else:
            self._reference_step(group)

    def _fails_part_way(self, group: dict) -> bool:
        """Whether the reference implementation may raise on ``group`` after writing some of it
        (a parameter stepped, a counter moved on), so that its step runs with a copy to put back.
        Checked only on the reference's path; a snapshot costs a copy of the group, so only
        where a failure is likely (sparse gradients the reference cannot take)."""
        return False

    def _reference_step(self, group: dict) -> None:
        """The reference implementation's step, for this group only."""
        _unhooked_step(self._TORCH)(_OneGroup(self, group))  # type: ignore[arg-type]
