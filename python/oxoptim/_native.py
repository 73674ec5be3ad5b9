"""Shared glue between the optimizer classes and the Rust kernels."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional

import torch

# The private helper torch's own optimizers use to set grad mode in step().
from torch.optim.optimizer import _use_grad_for_differentiable

__all__ = ["HUGE_HYPER", "any_sparse_grad", "check_scalar_state", "drop_unfinished_iteration", "use_grad_for_differentiable", "evaluate_closure", "group_is_native",
           "has_huge_hyper", "num_threads", "scalar", "step_groups", "step_or_restore", "tensor_cache"]


def use_grad_for_differentiable(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch's step decorator (grad mode from ``defaults["differentiable"]``) for
    optimizers that have that setting; ``torch.no_grad()`` for reference
    optimizers that do not (Lion, Schedule-Free)."""
    torch_step = _use_grad_for_differentiable(step)

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "differentiable" in self.defaults:
            return torch_step(self, *args, **kwargs)
        with torch.no_grad():
            return step(self, *args, **kwargs)

    return wrapper


def num_threads() -> int:
    """Worker threads for one kernel call: follows ``torch.get_num_threads()``."""
    return max(1, torch.get_num_threads())


def scalar(x: Any) -> float:
    """A hyper-parameter as a Python float (torch allows 0-d tensors for lr and betas)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def evaluate_closure(closure: Optional[Callable[[], Any]]) -> Any:
    """Runs the closure with grad enabled, as torch's optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def group_is_native(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether a group's settings allow the Rust path; tensors are checked in Rust.

    Differentiable and capturable steps, AMP grad scaling (``grad_scale``/``found_inf``),
    hyper-parameters that require grad, tensor hyper-parameters not in the
    optimizer's ``EXACT_TENSOR_HYPER`` and NumPy scalars other than float64 stay
    on torch's implementation. torch
    does arithmetic on tensor hyper-parameters in their dtype (Adam's
    ``1 - beta1 ** step`` in float32 for a float32 ``beta1``), which the
    kernels, taking each hyper-parameter as one float64, cannot reproduce; the
    names in ``EXACT_TENSOR_HYPER`` are those torch only reads as a number.
    A hyper-parameter of magnitude :data:`HUGE_HYPER` or more is declined by the kernels
    themselves (the bindings' parsing), which costs this check nothing.
    """
    if group.get("differentiable", False) or group.get("capturable", False):
        return False
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return False
    exact: frozenset[str] = getattr(optimizer, "EXACT_TENSOR_HYPER", frozenset())
    for key, value in group.items():  # a plain loop: it runs for every group on every step
        # Numbers, flags and names are passed over by type: `isinstance(v, torch.Tensor)`
        # runs torch's Python `__instancecheck__` (~0.1 µs, per key on every step).
        if type(value) in _PLAIN or key == "params":
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if type(v) in _PLAIN:
                continue
            if isinstance(v, torch.Tensor):
                if v.requires_grad or key not in exact:
                    return False
            elif type(v).__module__ == "numpy" and not isinstance(v, float):
                # A NumPy float32 (or other non-float64) scalar: torch's Python arithmetic
                # on it stays in its precision (NumPy 2), the kernels would compute in float64.
                return False
    return True


#: Hyper-parameter types that are never tensors.
_PLAIN = frozenset({float, int, bool, str, type(None)})

#: A finite hyper-parameter at least this large in magnitude keeps its group on the reference
#: implementation: the bindings decline it (rust/python/src/generic.rs ``HUGE_HYPER``). torch
#: converts some scalars to float32 with an overflow check (``alpha=``, ``value=``, lerp weights,
#: clamp bounds) and raises RuntimeError where the kernels, which compute in float64, would step to
#: inf; no scalar torch derives from smaller settings (at most 1 / 2**-53 times one) reaches
#: float32's range.
HUGE_HYPER = 2.0**64


def _huge(value: Any) -> bool:
    """Whether ``value`` (a number, a NumPy scalar or a one-element tensor) is finite and at least
    :data:`HUGE_HYPER` in magnitude."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, first: inf - inf and NaN - NaN are NaN
        return not -HUGE_HYPER < value < HUGE_HYPER and value - value == 0
    if kind is bool or value is None or kind is str:
        return False
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return False
        value = value.item()
    elif not isinstance(value, numbers.Real):
        return False
    try:
        magnitude = abs(float(value))
    except OverflowError:  # an int beyond float's range
        return True
    return HUGE_HYPER <= magnitude < math.inf


def has_huge_hyper(optimizer: Any, group: dict) -> bool:
    """Whether a hyper-parameter of ``group`` (a number, or one in a tuple as ``betas``) is
    finite and at least :data:`HUGE_HYPER` in magnitude."""
    for key in getattr(optimizer, "_HYPER_KEYS", ()):
        value = group.get(key)
        if any(_huge(v) for v in (value if isinstance(value, (tuple, list)) else (value,))):
            return True
    return False


def any_sparse_grad(group: dict) -> bool:
    """Whether a parameter of ``group`` has a sparse gradient."""
    return any(isinstance(p, torch.Tensor) and p.grad is not None and p.grad.is_sparse for p in group["params"])


def step_or_restore(optimizer: Any, groups: list, step: Callable[[], None]) -> None:
    """Runs ``step`` (the reference implementation on ``groups``); if it raises, puts the groups'
    parameters, their state and the groups' own entries back as they were first. torch raises
    part-way through a step (after Adam's counter and moments of the first parameter moved on)."""
    params = [p for g in groups for p in g["params"] if isinstance(p, torch.Tensor)]
    state = optimizer.state
    saved_params = [p.detach().clone() for p in params]
    saved_state = {p: (dict(state[p]), {k: v.clone() for k, v in state[p].items() if isinstance(v, torch.Tensor)})
                   for p in params if p in state}
    saved_groups = [dict(g) for g in groups]
    try:
        step()
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for p in params:
                if p in saved_state:
                    entries, tensors = saved_state[p]
                    for k, v in tensors.items():
                        entries[k].copy_(v)
                    state[p] = entries
                else:
                    state.pop(p, None)
        for g, saved_group in zip(groups, saved_groups):
            g.clear()
            g.update(saved_group)
        raise


def check_scalar_state(kind: str, hyper: dict, params: list, entries: list, *, state_like_param: bool) -> bool:
    """Raises what kernel ``kind`` refuses for the step counters and other scalar state of
    ``params`` (torch's error: Adam's ``ZeroDivisionError`` for a bias correction of 0), writing
    nothing and needing no gradient: the kernel's own check runs on one-element stand-ins of a
    parameter, its gradient and state arrays beside a copy of its scalar cells, once per distinct
    set of dtypes and cell values. The state stand-ins take the parameter's dtype
    (``state_like_param``: a torch twin's, whose bfloat16 ``state_dtype`` is no scalar matter) or
    the state's own (8-bit codes and scales); integer cells (a loaded ``step``) are checked as
    float64, as torch's path, which takes them, reads their value. For kernels whose arrays are
    all parameter-shaped; ``step_in_backward`` checks so, before the first update of an
    iteration, what the ordinary step refuses for a whole group before writing. Parameters
    without (complete) state are passed over: the step makes theirs. False where the kernel
    declines the stand-ins (nothing checked)."""
    from . import _core

    arrays, scalars = _core.layout(kind, hyper)
    distinct: dict = {}  # (dtypes, cell values): the rows to check
    for p, e in zip(params, entries):
        try:
            cells = [e[k] for k in scalars]
            dtypes = (p.dtype, *[p.dtype if state_like_param else e[k].dtype for k in arrays],
                      *[c.dtype if c.dtype.is_floating_point else torch.float64 for c in cells])
            distinct[(dtypes, tuple(c.item() for c in cells))] = None
        except (KeyError, TypeError, AttributeError, RuntimeError):
            continue  # no (complete) state, not tensors, a cell of several elements: the step decides
    if not distinct:
        return True
    rows = list(distinct)

    def column(dtypes: list, values: Optional[list] = None) -> list:
        """One-element tensors of the rows, views of one buffer where they share a dtype."""
        if all(d == dtypes[0] for d in dtypes):
            whole = torch.zeros(len(rows), dtype=dtypes[0]) if values is None else torch.tensor(values, dtype=dtypes[0])
            return list(whole.split(1))
        return [torch.zeros(1, dtype=d) if values is None else torch.tensor([v], dtype=d) for d, v in zip(dtypes, values or dtypes)]

    def dtypes_at(k: int) -> list:
        return [dtypes[k] for dtypes, _ in rows]

    arity = 1 + len(arrays)
    return _core.step(kind, column(dtypes_at(0)), column(dtypes_at(0)), [column(dtypes_at(1 + j)) for j in range(len(arrays))],
                      [column(dtypes_at(arity + i), [values[i] for _, values in rows]) for i in range(len(scalars))], hyper,
                      check_only=True)


def drop_unfinished_iteration(optimizer: Any) -> None:
    """``zero_grad()`` under ``step_in_backward`` before the iteration's ``step()`` (a backward that
    raised, a batch skipped): the next backward starts a new iteration. What backward already
    updated stays updated."""
    in_backward = optimizer.__dict__.get("_oxoptim_step_in_backward")
    if in_backward is not None:
        in_backward.drop_iteration()


def tensor_cache(optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer's cache of tensor descriptions (not part of its state or pickle)."""
    cache = optimizer.__dict__.get("_oxoptim_tensor_cache")
    if cache is None:
        from . import _core

        cache = optimizer.__dict__["_oxoptim_tensor_cache"] = _core.TensorCache()
    return cache


def step_groups(
    optimizer: Any,
    fast_step: Callable[[dict, Any], bool],
    general_step: Callable[[dict, bool], None],
    after_group: Optional[Callable[[dict], None]] = None,
) -> None:
    """The per-group step loop shared by oxoptim's torch twins.

    For each group: skip it when ``skip_nonfinite`` finds a NaN/Inf gradient;
    else try ``fast_step(group, cache)`` (tensors gathered in Rust, state
    already initialised); else ``general_step(group, native)``, which runs
    torch's ``_init_group`` and then the Rust list path or torch's own
    implementation. ``after_group(group)`` runs once each group is stepped (or skipped): a group
    stepped before one that raised has moved on, the groups after it have not.
    """
    cache = tensor_cache(optimizer)
    cache.begin_step()
    try:
        for group in optimizer.param_groups:
            if not (group.get("skip_nonfinite") and optimizer._skip_group(group)):
                native = group_is_native(optimizer, group)
                if not (native and fast_step(group, cache)):
                    general_step(group, native)
            if after_group is not None:
                after_group(group)
    finally:
        cache.finish_step()
