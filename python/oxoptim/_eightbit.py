"""What every optimizer with 8-bit block-wise state shares: the split of a
group into 8-bit and fp32 parameters, checks before any write, fresh state,
the native 8-bit call, stochastic rounding of bfloat16 weights, the pieces
``step_in_backward`` steps, and state dicts (quantised on loading an fp32
one, dequantised for torch). A subclass declares its moments, its kernel,
its group checks, its hyper-parameters and its fp32 step (:mod:`.adam8bit`,
:mod:`.sgd8bit`)."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from . import _blockwise as bw
from . import _core
from ._hooks import load_hooks_outside
from ._lowprec import GROUP_KEYS, check_low_precision, draw_seed, keep_own_options, shares_memory, stream_ids
from ._native import check_scalar_state, drop_unfinished_iteration, evaluate_closure, num_threads, tensor_cache

__all__ = ["EightBitOptimizer"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16)


class EightBitOptimizer(torch.optim.Optimizer):
    """Base of the optimizers whose moments are 8-bit block-wise state (see :mod:`._blockwise`)."""

    KIND: ClassVar[str]  # the 8-bit kernel's row of the Rust table
    MOMENTS: ClassVar[tuple[str, ...]]  # the parameter-shaped state kept in 8 bits, in kernel order
    #: Group keys a loaded state dict may lack: the loading optimizer's values are kept.
    LOADED_DEFAULTS: ClassVar[tuple[str, ...]] = ("min_8bit_size",)

    def __init__(self, params: Any, defaults: dict, *, bf16_stochastic_round: bool, kahan_sum: bool) -> None:
        # Only when set: default state dicts stay as they were.
        defaults.update({k: True for k, v in (("bf16_stochastic_round", bf16_stochastic_round), ("kahan_sum", kahan_sum)) if v})
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # torch fills the defaults in as it appends: checked after, taken back if refused
            self._check_group(group)
            check_low_precision(type(self).__name__, group, stream=False)
            if group.get("bf16_stochastic_round"):
                if "sr_seed" not in group:  # a given seed is kept, and nothing is drawn or broadcast
                    group["sr_seed"] = draw_seed()
                group.setdefault("sr_count", 0)
        except BaseException:
            self.param_groups.pop()
            raise

    # -- what a subclass declares ---------------------------------------------

    def _check_group(self, group: dict) -> None:
        """torch's checks and messages for the group's settings, then :meth:`_check_8bit_options`."""
        raise NotImplementedError

    def _hyper(self, group: dict) -> dict:
        """The 8-bit kernel's hyper-parameters of ``group``."""
        raise NotImplementedError

    def _step_fp32(self, group: dict, full: list) -> None:
        """Steps ``full``, (parameter, fp32 state) pairs of parameters below ``min_8bit_size``."""
        raise NotImplementedError

    @classmethod
    def _torch_group(cls, saved: dict) -> dict:
        """A saved group as the torch optimizer's (``dequantize_state_dict``)."""
        raise NotImplementedError

    def _saved_group(self, index: int, saved: dict) -> dict:
        """A loaded group in this class's keys (another library's settings converted or refused)."""
        return saved

    def _saved_entry(self, entry: Any) -> Any:
        """A loaded state entry in this class's layout (before it is checked)."""
        return entry

    # -- shared ---------------------------------------------------------------

    def _check_8bit_options(self, group: dict) -> None:
        name = type(self).__name__
        if group.get("kahan_sum", False):
            raise ValueError(f"{name}: kahan_sum=True is not available with 8-bit state; use bf16_stochastic_round=True")
        size = group["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"Invalid min_8bit_size: {size!r} (a non-negative int)")

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        """The 8-bit kernel's state arrays: the codes of each moment, then their absmax."""
        return (*cls.MOMENTS, *(f"{m}_absmax" for m in cls.MOMENTS))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = evaluate_closure(closure)
        in_backward = self.__dict__.get("_oxoptim_step_in_backward")
        if in_backward is not None:
            in_backward.finish()  # the parameters were updated during backward
            return loss
        if self._step_in_one_call([]):
            return loss
        # Everything is checked, and fresh state made, before anything is written.
        plans = [self._plan(group) for group in self.param_groups]
        if self._step_in_one_call(plans):
            return loss
        # A call per group and kind: every call's refusals checked before the first writes.
        for group, plan in zip(self.param_groups, plans):
            self._check_calls(group, plan)
        for group, plan in zip(self.param_groups, plans):
            self._apply(group, plan)
            self._advance_group(group)
        return loss

    def _step_in_one_call(self, plans: list) -> bool:
        """Every group stepped by :meth:`_native_step_with_fresh_state` (``plans``: the fresh state
        :meth:`_plan` made, if any), the groups' rounding streams moved on; False, having written
        nothing, where the native call declines."""
        cache = tensor_cache(self)
        cache.begin_step()
        try:
            stepped = self._native_step_with_fresh_state(self.param_groups, plans, cache)
        finally:
            cache.finish_step()
        if stepped:
            for group in self.param_groups:
                self._advance_group(group)
        return stepped

    def _native_step(self, groups: list, cache: Any) -> bool:
        """Steps ``groups`` in one native call, all or nothing, when every parameter with a gradient
        has state the kernels take (8-bit, or fp32 where :meth:`_fp32_part` names a kernel): the
        tensors are checked in Rust, their descriptions cached between steps. False, having written
        nothing, otherwise: a first step, or anything :meth:`_plan` must make or refuse."""
        name = type(self).__name__
        calls = []
        for group in groups:
            self._check_group(group)
            check_low_precision(name, group)
            fp32 = self._fp32_part(group)
            parts = [(self.KIND, self._hyper(group)), *([fp32] if fp32 is not None else [])]
            rounding = self._rounding(group, group["params"])
            calls.append((group["params"], parts, rounding.get("stochastic_round"), rounding.get("stream_ids")))
        threads = num_threads()
        return _core.groups_step(calls, self.state, cache, num_threads=threads)  # the last call: see test_memory_safety

    def _native_step_with_fresh_state(self, groups: list, plans: list, cache: Any) -> bool:
        """:meth:`_native_step` once the fresh state of ``plans`` (from :meth:`_plan`) is in place:
        the one call checks every kernel call (step counters included) before the first writes,
        which :meth:`_apply`'s call per group and kind cannot. False, or an error, having written
        nothing and stored no fresh state."""
        fresh = {p: entry for plan in plans for p, entry in plan[0].items()}
        self.state.update(fresh)
        stepped = False
        try:
            stepped = self._native_step(groups, cache)
        finally:
            if not stepped:
                for p in fresh:
                    del self.state[p]
        return stepped

    def _fp32_part(self, group: dict) -> Optional[tuple[str, dict]]:
        """The kernel and hyper-parameters that step the group's parameters under ``min_8bit_size``
        (fp32 state) in the native call of :meth:`_native_step`, or None: such a group takes the
        Python path."""
        return None

    def _step_part(self, group: dict, cache: Any, native: bool = True) -> None:
        """Steps ``group``, a copy of one of the groups holding some of its parameters
        (``step_in_backward``'s bucket; 8-bit calls keep no layout cache; what they cannot
        take is refused, never handed to torch, so ``native`` changes nothing)."""
        if self._native_step([group], cache):
            return
        plan = self._plan(group)
        if not self._native_step_with_fresh_state([group], [plan], cache):
            self._check_calls(group, plan)
            self._apply(group, plan)

    def _bucket_group(self, group: dict, params: list) -> dict:
        """The group ``step_in_backward`` steps for one bucket: a copy of ``group`` holding ``params``."""
        return {**group, "params": params}

    def _check_before_backward_steps(self) -> None:
        """What ``step`` refuses for a parameter (not its gradient), checked by ``step_in_backward``
        before its first update of each iteration."""
        for group in self.param_groups:
            self._check_group(group)
            check_low_precision(type(self).__name__, group)
            eight: list = []
            full: list = []
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    entry = self.state.get(p) or None
                    self._check_param(group, i, p, entry)
                    if entry is not None:
                        (eight if bw.is_8bit(entry) else full).append((p, entry))
            # The kernels' refusals of step counters, as the ordinary step's one call checks them.
            check_scalar_state(self.KIND, self._hyper(group), [p for p, _ in eight], [e for _, e in eight], state_like_param=False)
            self._check_fp32(group, full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The iteration first: a DDP bucket update still running must end before gradients are cleared.
        try:
            drop_unfinished_iteration(self)
        finally:
            super().zero_grad(set_to_none)

    def _check_calls(self, group: dict, plan: tuple[dict, list, list]) -> None:
        """Raises what :meth:`_apply`'s kernel calls for ``group`` would refuse (a step count their
        arithmetic cannot take), writing nothing."""
        _, eight, full = plan
        self._step_8bit(group, eight, check_only=True)
        self._check_fp32(group, full)

    def _check_fp32(self, group: dict, full: list) -> None:
        """What :meth:`_step_fp32` would refuse, raised before anything is written (nothing by default)."""

    def _apply(self, group: dict, plan: tuple[dict, list, list]) -> None:
        fresh, eight, full = plan
        self.state.update(fresh)
        try:  # the one call that can still refuse (state sharing memory), having written nothing
            self._step_8bit(group, eight)
        except BaseException:
            for p in fresh:
                del self.state[p]
            raise
        self._step_fp32(group, full)  # cannot refuse: torch's own step takes what Rust does not

    def _advance_group(self, group: dict) -> None:
        """Once per step of the group (``step_in_backward`` steps it in pieces): the rounding stream moves on."""
        if group.get("bf16_stochastic_round"):
            group["sr_count"] = int(group["sr_count"]) + 1

    def _rounding(self, group: dict, params: list) -> dict:
        """The native call's stochastic rounding: the group's stream, one per parameter."""
        if not group.get("bf16_stochastic_round"):
            return {}
        return {"stochastic_round": (int(group["sr_seed"]), int(group["sr_count"])), "stream_ids": stream_ids(self, params)}

    def _plan(self, group: dict) -> tuple[dict, list, list]:
        """The group's parameters with gradients, split by state kind, with
        their fresh state (not yet stored); raises on anything the step cannot take."""
        self._check_group(group)
        name = type(self).__name__
        check_low_precision(name, group)
        fresh: dict = {}
        eight: list = []
        full: list = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(f"{name}: the gradient of parameter {i} is {g.dtype} {tuple(g.shape)} on {g.device}, the parameter {p.dtype} {tuple(p.shape)} on {p.device}")
            entry = self.state.get(p) or None
            self._check_param(group, i, p, entry)
            if entry is None:
                entry = self._fresh_state(p, group["min_8bit_size"])
                fresh[p] = entry
            if bw.is_8bit(entry):
                eight.append((p, entry))
            else:
                if group.get("bf16_stochastic_round") and not g.is_contiguous():
                    raise ValueError(f"{name}: bf16_stochastic_round=True needs dense contiguous bfloat16 CPU tensors that share no memory; "
                                     f"the gradient of parameter {i} is not")
                full.append((p, entry))
        stepped = [*eight, *full]
        written = [*(p for p, _ in stepped), *(t for _, entry in stepped for t in entry.values() if isinstance(t, torch.Tensor) and t.dim())]
        # The step counters the native call writes (one tensor loaded for two parameters: refused).
        written += [entry["step"] for _, entry in (stepped if group.get("bf16_stochastic_round") else eight)]
        if shares_memory(written, [p.grad for p, _ in stepped]):
            raise ValueError(f"{name}: parameters, gradients or state of this group share memory (a parameter listed twice, "
                             "or views of one tensor); the native step cannot take them")
        # What the native call would refuse as misaligned, refused here: before any group is written.
        native = [*eight, *(full if group.get("bf16_stochastic_round") else ())]
        for p, entry in native:
            grad = [p.grad] if p.grad.is_contiguous() else []  # (a strided one is copied)
            tensors = [p, *grad, *(entry[k] for k in (self._state_keys() if bw.is_8bit(entry) else self.MOMENTS))]
            if any(t.data_ptr() % t.element_size() for t in tensors):
                i = next(i for i, q in enumerate(group["params"]) if q is p)
                raise ValueError(f"{name}: parameter {i}, its gradient or its state is not aligned for its dtype (a view at an "
                                 "odd byte offset of a buffer); the native step cannot take it")
        return fresh, eight, full

    def _check_param(self, group: dict, i: int, p: torch.Tensor, entry: Optional[dict]) -> None:
        """Raises unless the step can take parameter ``i`` of ``group`` with its state ``entry``
        (None: fresh state, made by size)."""
        name = type(self).__name__
        if entry is None:
            size = group["min_8bit_size"]
            if p.numel() >= size and (p.device.type != "cpu" or p.dtype not in _PARAM_DTYPES):
                raise ValueError(
                    f"{name}: 8-bit state needs float32 or bfloat16 CPU parameters, got {p.dtype} on {p.device} "
                    f"({p.numel()} elements >= min_8bit_size={size})"
                )
            eight = p.numel() >= size
        else:
            bw.check_entry(f"{name}: state of parameter {i}", entry, p, self.MOMENTS)
            eight = bw.is_8bit(entry)
            if eight and any(entry[k].device.type != "cpu" or not entry[k].is_contiguous() for k in self._state_keys()):
                raise ValueError(f"{name}: the 8-bit state of parameter {i} must be contiguous CPU tensors")
        if eight and (p.device.type != "cpu" or p.dtype not in _PARAM_DTYPES or not p.is_contiguous()):
            raise ValueError(f"{name}: 8-bit state needs dense contiguous float32 or bfloat16 CPU parameters; parameter {i} is {p.dtype} on {p.device}")
        native = eight or bool(group.get("bf16_stochastic_round"))  # no torch step to fall back on
        if not eight and native and not (p.device.type == "cpu" and p.is_contiguous()):
            raise ValueError(f"{name}: bf16_stochastic_round=True needs dense contiguous bfloat16 CPU tensors that share no memory; "
                             f"parameter {i} is not")
        if entry is not None and native:
            step = entry["step"]
            # The native call's counter cell: float32 (torch's Adam's) or float64, as the one call takes it.
            if not (isinstance(step, torch.Tensor) and step.dtype in (torch.float32, torch.float64) and step.numel() == 1
                    and step.device.type == "cpu"):
                got = f"a {step.dtype} tensor on {step.device}" if isinstance(step, torch.Tensor) else type(step).__name__
                raise ValueError(f"{name}: the step of parameter {i} must be a float32 or float64 CPU tensor of one element, got {got}")
            moments = [entry[k] for k in self.MOMENTS]
            if not eight and any(m.device.type != "cpu" or not m.is_contiguous() or m.dtype != p.dtype for m in moments):
                raise ValueError(f"{name}: bf16_stochastic_round=True needs contiguous CPU state of the parameter's dtype; "
                                 f"the state of parameter {i} is not")

    def _fresh_state(self, p: torch.Tensor, min_8bit_size: int) -> dict:
        """Zero state for ``p`` (checked by ``_check_param``): 8-bit moments from ``min_8bit_size`` elements."""
        entry: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for moment in self.MOMENTS:
            if p.numel() >= min_8bit_size:
                entry.update(bw.fresh(p, moment))
            else:
                entry[moment] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return entry

    def _step_8bit(self, group: dict, eight: list, check_only: bool = False) -> None:
        """The 8-bit parameters' kernel call (``check_only``: its refusals, nothing written)."""
        if not eight:
            return
        params = [p for p, _ in eight]
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        state = [[entry[k] for _, entry in eight] for k in self._state_keys()]
        steps = [[entry["step"] for _, entry in eight]]
        if not _core.step(self.KIND, params, grads, state, steps, self._hyper(group), num_threads=num_threads(),
                          check_only=check_only, **self._rounding(group, params)):
            raise ValueError(f"{type(self).__name__}: some 8-bit state tensors share memory or have the wrong dtype, or a "
                             "tensor is not aligned for its dtype (a view at an odd byte offset of a buffer)")

    # -- state dicts ---------------------------------------------------------

    @load_hooks_outside
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads this class's state dict, or the torch optimizer's (or oxoptim's),
        whose moments of parameters with at least ``min_8bit_size`` elements are
        quantised to 8 bits, or bitsandbytes' 8-bit one (the same scheme: codes and
        absmax as they are). Everything is checked first: a rejected dict leaves the
        optimizer as it was."""
        converted = self._converted(state_dict)
        super().load_state_dict(converted)
        # torch casts every state tensor to its parameter's dtype: put the codes back.
        for saved, group in zip(converted["param_groups"], self.param_groups):
            for key, p in zip(saved["params"], group["params"]):
                entry = converted["state"].get(key)
                if entry and bw.is_8bit(entry):
                    for name in self._state_keys():  # contiguous, as the native step takes them
                        self.state[p][name] = entry[name].to(device=p.device, memory_format=torch.contiguous_format, copy=True)

    def _check_entry_keys(self, where: str, entry: Any) -> None:
        """A loaded entry holds this class's state only (another optimizer's would be stepped as ours)."""
        if not isinstance(entry, dict):
            return  # check_entry reports it
        extra = sorted(set(entry) - {"step", *self._state_keys()}, key=str)
        if extra:
            raise ValueError(f"{where} holds {', '.join(map(repr, extra))}, which {type(self).__name__} does not keep: "
                             "a state dict of another optimizer")

    def _converted(self, state_dict: dict) -> dict:
        groups, saved_groups = self.param_groups, state_dict.get("param_groups")
        entries = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(entries, dict) or len(saved_groups) != len(groups):
            return state_dict  # torch's load_state_dict reports it
        if not all(isinstance(s, dict) and isinstance(s.get("params"), list) for s in saved_groups):
            return state_dict
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            return state_dict
        # Another library's 8-bit state: converted where it is the same scheme (bitsandbytes'), else refused.
        foreign = {}
        for group, saved in zip(groups, saved_groups):
            for key, p in zip(saved["params"], group["params"]):
                if key in entries:
                    entry = self._saved_entry(bw.foreign_entry(f"state[{key}]", entries[key], p, self.MOMENTS))
                    if entry is not entries[key]:
                        foreign[key] = entry
        if foreign:
            entries = {**entries, **foreign}
        saved_groups = [self._saved_group(i, g) for i, g in enumerate(saved_groups)]
        saved_groups = keep_own_options(groups, saved_groups)
        new_groups = []
        new_state: dict = dict(entries)
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if isinstance(saved.get("lr"), torch.Tensor):
                raise ValueError(
                    f"{type(self).__name__}: param_groups[{index}]['lr'] is a tensor (torchao's optimizers save it so); "
                    "this optimizer takes lr as a number: make it float(lr) to load this state dict"
                )
            merged = dict(saved)
            for key in self.LOADED_DEFAULTS:
                merged.setdefault(key, group[key])
            for option in ("skip_nonfinite", "state_dtype"):  # oxoptim twins' options the constructor refuses
                if merged.get(option) not in (None, False, torch.float32):
                    raise ValueError(f"param_groups[{index}]['{option}'] is {merged[option]!r}: {type(self).__name__} "
                                     "does not take it (8-bit state; no skipping of non-finite gradients)")
            try:
                self._check_group(merged)
            except NotImplementedError as e:  # settings the constructor refuses so (SGD8bit without momentum)
                raise ValueError(f"param_groups[{index}]: {e}") from e
            check_low_precision(type(self).__name__, {**merged, "params": group["params"]})
            new_groups.append(merged)
            for key, p in zip(saved["params"], group["params"]):
                if key not in entries:
                    continue
                entry = entries[key]
                where = f"state[{key}]"
                bw.check_entry(where, entry, p, self.MOMENTS)
                self._check_entry_keys(where, entry)
                if not entry:
                    continue
                entry = dict(entry)
                for name in (self._state_keys()[len(self.MOMENTS):] if bw.is_8bit(entry) else ()):
                    if bool((entry[name] < 0).any()):  # a max of magnitudes (NaN stays: non-finite gradients make it)
                        raise ValueError(f"{where}[{name!r}] holds negative values: each block's absmax is a magnitude, >= 0")
                entry["step"] = bw.step_tensor(entry["step"])
                if not 0.0 <= float(entry["step"]) < float("inf"):  # the native step could not take it
                    raise ValueError(f"{where}['step'] must be a finite number >= 0, got {float(entry['step'])}")
                if not bw.is_8bit(entry) and p.numel() >= merged["min_8bit_size"] and p.dtype in _PARAM_DTYPES and p.device.type == "cpu":
                    for moment in self.MOMENTS:
                        entry.update(bw.quantize(entry[moment], moment))
                elif not bw.is_8bit(entry):  # the native step takes contiguous state (torch keeps the saved strides)
                    entry.update({m: entry[m].contiguous() for m in self.MOMENTS})
                new_state[key] = entry
        return {**state_dict, "state": new_state, "param_groups": new_groups}

    def dequantized_state_dict(self) -> dict:
        """This optimizer's state dict with every 8-bit moment dequantised to
        float32: what the torch optimizer (and oxoptim's twin of it) loads, to go
        on training without 8-bit state."""
        return self.dequantize_state_dict(self.state_dict())

    @classmethod
    def dequantize_state_dict(cls, state_dict: dict) -> dict:
        """A saved state dict of this class as the torch optimizer's: 8-bit
        moments dequantised to float32, absmax entries dropped, the groups in
        torch's keys (:meth:`_torch_group`)."""
        state = {}
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            if bw.is_8bit(entry):
                for moment in cls.MOMENTS:
                    entry[moment] = bw.dequantize(entry, moment)
                    del entry[f"{moment}_absmax"]
            state[key] = cls._torch_entry(entry)
        groups = []
        for saved in state_dict["param_groups"]:
            # torch's group keys only: the loading optimizer keeps its own low-precision options.
            group = {k: v for k, v in saved.items() if k != "min_8bit_size" and k not in GROUP_KEYS}
            groups.append(cls._torch_group(group))
        return {"state": state, "param_groups": groups}

    @classmethod
    def _torch_entry(cls, entry: dict) -> dict:
        """A dequantised state entry as the torch optimizer keeps it."""
        return entry
