"""bfloat16 weights without an fp32 master copy: ``bf16_stochastic_round`` and ``kahan_sum``.

Both are keyword-only options (default False) of the twins that take them
(:class:`LowPrecisionWeights`). The update is computed in float32 as usual;
only how the new weight is stored back into the bfloat16 parameter changes:

* ``bf16_stochastic_round=True`` (torchao's option): rounded up or down at
  random, with the probability that makes the expected stored value the
  float32 one; always one of the two neighbouring bfloat16 numbers. The
  random bits are a counter-based hash of (``sr_seed``, ``sr_count``, the
  parameter's position among all the optimizer's parameters, the element
  index), computed in Rust: the same whatever the thread count, and whichever
  call steps the parameter (its whole group, or a bucket of
  :func:`~oxoptim.step_in_backward`).
  ``sr_seed`` is drawn from torch's default generator when the group is
  added (``torch.manual_seed`` makes a run reproducible) and ``sr_count``
  counts the group's steps; both live in the parameter group, so a
  ``state_dict`` round trip resumes bit for bit.
  Under ``torch.distributed`` (a default process group initialised, more
  than one rank) every rank takes rank 0's seed, broadcast when the group is
  added, so replicas given identical gradients (DDP) round identically and
  stay bit-identical whatever each rank's generator holds. The broadcast is a
  collective call: every rank must add its stochastic-rounding groups (build
  the optimizer, call ``add_param_group``) in the same order, or the ranks
  that do wait for the others (until the process group's timeout). To build
  such an optimizer on some ranks only, give the group its own ``sr_seed``
  (``[{"params": ..., "sr_seed": 1234}]``): nothing is drawn or broadcast.
  An optimizer built before the process group is initialised keeps its own
  draw (seed the ranks alike, or give ``sr_seed``).
* ``kahan_sum=True`` (torch-optimi's option): each parameter keeps a
  bfloat16 ``kahan_comp`` state entry with what the stored weight misses;
  the update is added to it, the weight takes what bfloat16 can hold, the
  compensation keeps the rest.

And ``state_dtype=torch.bfloat16`` keeps the optimizer state (moments,
momentum buffers: the parameter-shaped entries) in bfloat16 whatever the
parameters' dtype, computed in float32 (Adam: 4 bytes per parameter instead
of 8). State loaded or created in float32 is converted on the next step.

Flags and seeds are stored in the groups only when an option is on, so
default state dicts stay torch's; loading a state dict whose group stores no
option (torch's, or saved with none on) keeps the optimizer's own options.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Optional

import torch

from . import _core
from ._hooks import load_hooks_outside
from ._native import evaluate_closure, group_is_native

__all__ = ["GROUP_KEYS", "KAHAN_COMP", "LOW_PRECISION_OPTIONS", "LowPrecisionWeights", "check_low_precision", "draw_seed", "keep_own_options",
           "shares_memory", "stream_ids"]

#: The state entry of a parameter's Kahan compensation (torch-optimi's name).
KAHAN_COMP = "kahan_comp"
_OPTIONS = ("bf16_stochastic_round", "kahan_sum")


def draw_seed() -> int:
    """A 62-bit seed from torch's default generator; under an initialised ``torch.distributed``
    process group of more than one rank, rank 0's (broadcast: a collective call, so every rank
    must draw, in the same order). Every rank still draws from its own generator, so each
    generator advances as it does without a process group."""
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return _agreed_seed(seed)


def _agreed_seed(seed: int) -> int:
    """``seed`` on one process; rank 0's across an initialised process group (the default group)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return seed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)  # picks the device the backend needs (CUDA for NCCL)
    return int(box[0])


STREAMS = "_oxoptim_stream_positions"  # an optimizer attribute: {parameter: its stream}, fixed by its owner


def stream_ids(optimizer: Any, params: list) -> list[int]:
    """Each parameter's stochastic-rounding stream: its position among the optimizer's
    parameters (all groups, in order) as they are now. Cached with each parameter's group and
    offset: the cache holds while the groups keep their lengths and each parameter of the call
    is still where it says (groups added, removed or edited in place rebuild it). Positions set
    in ``STREAMS`` (``CPUOffloadOptimizer``'s, counting the parameters it left out) come first."""
    given = optimizer.__dict__.get(STREAMS)
    if given is not None and all(p in given for p in params):
        return [given[p] for p in params]
    groups = optimizer.param_groups
    lengths = [len(group["params"]) for group in groups]
    cached = optimizer.__dict__.get("_oxoptim_streams")
    if cached is not None and cached[0] == lengths:
        where = cached[1]
        try:
            found = [where[p] for p in params]
        except KeyError:
            found = None
        if found is not None and all(groups[g]["params"][k] is p for (g, k, _), p in zip(found, params)):
            return [at for _, _, at in found]
    where, at = {}, 0
    for g, group in enumerate(groups):
        for k, p in enumerate(group["params"]):
            where[p] = (g, k, at)
            at += 1
    optimizer.__dict__["_oxoptim_streams"] = (lengths, where)
    return [where[p][2] for p in params]


#: The options that run on the native path only.
LOW_PRECISION_OPTIONS = (*_OPTIONS, "state_dtype")
#: The group keys of the options and of the stochastic-rounding stream.
GROUP_KEYS = (*LOW_PRECISION_OPTIONS, "sr_seed", "sr_count")


def keep_own_options(groups: list, saved_groups: Any) -> Any:
    """``saved_groups`` (a state dict's) where a saved group stores no low-precision option (torch's,
    or saved with none on): it takes the option keys of the optimizer's group it loads into,
    as torch keeps its defaults for group keys a saved dict lacks. Other groups are unchanged."""
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        return saved_groups  # torch's load_state_dict reports it
    out = []
    for group, saved in zip(groups, saved_groups):
        own = {k: group[k] for k in GROUP_KEYS if k in group}
        if own and isinstance(saved, dict) and not any(k in saved for k in LOW_PRECISION_OPTIONS):
            saved = {**saved, **own}
        out.append(saved)
    return out


def shares_memory(written: list, read: list) -> bool:
    """Whether a tensor of ``written`` overlaps in memory any other tensor of either list: what the
    native call refuses (having written nothing), checked for every group before any is stepped."""
    spans = []
    for tensors, writes in ((written, True), (read, False)):
        for t in tensors:
            size = t.numel() * t.element_size()
            if size:
                start = t.data_ptr()
                spans.append((start, start + size, writes))
    spans.sort()
    reach, reach_written = 0, 0  # the furthest end of any span, and of a written one, so far
    for start, end, writes in spans:
        if start < reach_written or (writes and start < reach):
            return True
        reach = max(reach, end)
        if writes:
            reach_written = max(reach_written, end)
    return False


def check_low_precision(name: str, group: dict, stream: bool = True) -> None:
    """Raises ValueError, torch-style, unless the group's low-precision options fit its parameters.
    With stochastic rounding, ``sr_seed`` and ``sr_count`` must be ints in [0, 2**64) (what the
    native call takes), and with ``stream`` present (``add_param_group`` draws them afterwards)."""
    params = group["params"]
    if type(params) is not list and isinstance(params, torch.Tensor):  # `type` first: torch's isinstance is slow
        params = [params]
    # named_parameters(): (name, parameter) pairs, which torch's add_param_group splits afterwards
    params = [p[1] if type(p) is tuple and len(p) == 2 else p for p in params]
    if group.get("state_dtype") == torch.bfloat16:
        for i, p in enumerate(params):
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"{name}: state_dtype=torch.bfloat16 needs float32 or bfloat16 parameters, but parameter {i} of the group is {p.dtype}")
    sr, kahan = bool(group.get("bf16_stochastic_round")), bool(group.get("kahan_sum"))
    if sr and kahan:
        raise ValueError(f"{name}: bf16_stochastic_round and kahan_sum are alternatives; set at most one")
    if not (sr or kahan):
        return
    option = "bf16_stochastic_round" if sr else "kahan_sum"
    for i, p in enumerate(params):
        if p.dtype != torch.bfloat16:
            raise ValueError(f"{name}: {option}=True needs bfloat16 parameters, but parameter {i} of the group is {p.dtype}")
    if sr:
        for key in ("sr_seed", "sr_count"):
            if key in group or stream:
                _check_stream_number(name, key, group.get(key))


def _check_stream_number(name: str, key: str, value: Any) -> None:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or not 0 <= number < 2**64:
        raise ValueError(f"{name}: bf16_stochastic_round=True needs the group's {key} to be an int in [0, 2**64), got {value!r}")


class LowPrecisionWeights:
    """Mixin (listed before :class:`~oxoptim._twin.TorchTwin`) adding the keyword-only
    ``bf16_stochastic_round=False`` and ``kahan_sum=False`` options (module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        signature = inspect.signature(cls)
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool) for name in _OPTIONS]
        extra.append(inspect.Parameter("state_dtype", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[torch.dtype]))
        cls.__signature__ = signature.replace(parameters=[*params[:at], *extra, *params[at:]])  # type: ignore[attr-defined]

    def __init__(
        self,
        params: Any,
        *args: Any,
        bf16_stochastic_round: bool = False,
        kahan_sum: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> None:
        options: dict[str, Any] = {k: True for k, v in zip(_OPTIONS, (bf16_stochastic_round, kahan_sum)) if v}
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype} (None, torch.float32 or torch.bfloat16)")
        if state_dtype == torch.bfloat16:
            options["state_dtype"] = torch.bfloat16
        check_low_precision(type(self).__name__, {**options, "params": []}, stream=False)
        self.__dict__["_oxoptim_low_precision"] = options  # read by add_param_group during __init__
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        self.defaults.update(options)  # type: ignore[attr-defined]

    def add_param_group(self, param_group: dict) -> None:
        options = self.__dict__.get("_oxoptim_low_precision")
        if options is None:
            options = {k: self.defaults[k] for k in LOW_PRECISION_OPTIONS if self.defaults.get(k)}  # type: ignore[attr-defined]
        for key, value in options.items():
            param_group.setdefault(key, value)
        params = param_group["params"]
        if not isinstance(params, (set, torch.Tensor)):  # torch's own checks report sets
            param_group["params"] = list(params)
        check_low_precision(type(self).__name__, param_group, stream=False)
        if param_group.get("bf16_stochastic_round"):
            if "sr_seed" not in param_group:  # a given seed is kept, and nothing is drawn or broadcast
                param_group["sr_seed"] = draw_seed()
            param_group.setdefault("sr_count", 0)
        super().add_param_group(param_group)  # type: ignore[misc]

    @load_hooks_outside
    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(state_dict, dict) and "param_groups" in state_dict:
            groups = keep_own_options(self.param_groups, state_dict["param_groups"])  # type: ignore[attr-defined]
            state_dict = {**state_dict, "param_groups": groups}
            if isinstance(groups, list) and len(groups) == len(self.param_groups):  # type: ignore[attr-defined]
                # Options saved for other weights (bfloat16 ones, now float32) are refused
                # before anything is loaded, as the constructor refuses them.
                for saved, group in zip(groups, self.param_groups):  # type: ignore[attr-defined]
                    if isinstance(saved, dict):
                        check_low_precision(type(self).__name__, {**saved, "params": group["params"]})
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # torch casts every loaded state tensor but ``step`` to its parameter's dtype; for
        # half-precision parameters, or with the options on, 0-d state (NAdam's mu_product,
        # ASGD's eta and mu) stays as saved, in float32: the native path computes with it, as
        # it did before the checkpoint, so a resumed run stays bit-identical.
        saved_groups, entries = state_dict["param_groups"], state_dict["state"]
        for saved, group in zip(saved_groups, self.param_groups):  # type: ignore[attr-defined]
            options_on = any(group.get(k) for k in LOW_PRECISION_OPTIONS)
            for key, p in zip(saved["params"], group["params"]):
                if not options_on and p.dtype not in (torch.bfloat16, torch.float16):
                    continue
                for name, value in entries.get(key, {}).items():
                    loaded = self.state[p].get(name)  # type: ignore[attr-defined]
                    if (name != "step" and torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()
                            and torch.is_tensor(loaded) and loaded.dtype != value.dtype):
                        self.state[p][name] = value.to(device=p.device, copy=True)  # type: ignore[attr-defined]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = evaluate_closure(closure)  # first: the gradients checked are the ones stepped
        # Every group is checked before any is stepped.
        for group in self.param_groups:  # type: ignore[attr-defined]
            check_low_precision(type(self).__name__, group)
            self._check_native(group)
        super().step()  # type: ignore[misc]
        return loss

    def _after_group_step(self, group: dict) -> None:
        # Each group as soon as it is stepped: one that raised part-way through the groups leaves
        # those before it with a new count (their rounding bits were used). step_in_backward
        # advances the groups itself, once per iteration.
        super()._after_group_step(group)  # type: ignore[misc]
        self._advance_group(group)

    def _check_before_backward_steps(self) -> None:
        super()._check_before_backward_steps()  # type: ignore[misc]
        for group in self.param_groups:  # type: ignore[attr-defined]
            check_low_precision(type(self).__name__, group)
            if any(group.get(k) for k in LOW_PRECISION_OPTIONS):
                trained = [p for p in group["params"] if p.requires_grad]
                if not (group_is_native(self, group) and all(_native_param(p) for p in trained)):  # type: ignore[arg-type]
                    self._torch_step(group)  # raises

    def _advance_group(self, group: dict) -> None:
        super()._advance_group(group)  # type: ignore[misc]
        if group.get("bf16_stochastic_round"):
            group["sr_count"] = int(group["sr_count"]) + 1

    # -- the native step ----------------------------------------------------------

    def _list_step(self, group: dict, params: list, grads: list) -> bool:
        """The list path; state it converted or made first (bfloat16 moments, a zero
        ``kahan_comp``) is put back when the native call declines or fails."""
        state = self.state  # type: ignore[attr-defined]
        saved = [(state[p], dict(state[p])) for p in params] if any(group.get(k) for k in LOW_PRECISION_OPTIONS) else []
        stepped = False
        try:
            stepped = super()._list_step(group, params, grads)  # type: ignore[misc]
        finally:
            if not stepped:
                for entry, before in saved:
                    entry.clear()
                    entry.update(before)
        return stepped

    def _native_options(self, group: dict, params: Optional[list]) -> dict:
        """The options of the group's native call; for the list path (``params`` given) the
        state they need is made first: a zero ``kahan_comp``, moments in bfloat16 (fresh ones
        torch made like the parameter, or loaded ones torch cast to the parameter's dtype)."""
        options: dict[str, Any] = {"bf16_state": True} if group.get("state_dtype") == torch.bfloat16 else {}
        if params is not None:
            self._prepare_state(group, params)
        if group.get("bf16_stochastic_round"):
            options["stochastic_round"] = (int(group["sr_seed"]), int(group["sr_count"]))
            options["stream_ids"] = stream_ids(self, group["params"] if params is None else params)
        elif group.get("kahan_sum"):
            if params is None:
                options["kahan"] = True
            else:
                options["compensation"] = [self.state[p][KAHAN_COMP] for p in params]  # type: ignore[attr-defined]
        return options

    def _prepare_state(self, group: dict, params: list) -> None:
        state = self.state  # type: ignore[attr-defined]
        if group.get("kahan_sum"):
            for p in params:
                if KAHAN_COMP not in state[p]:
                    state[p][KAHAN_COMP] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("state_dtype") == torch.bfloat16:
            arrays, _ = _core.layout(self.KIND, self._hyper(group))  # type: ignore[attr-defined]
            for p in params:
                for key in arrays:
                    value = state[p].get(key)
                    if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16 and value.is_floating_point():
                        state[p][key] = value.to(torch.bfloat16)

    def _check_native(self, group: dict) -> None:
        """Raises the native-only error now, before any group is stepped, when the group's
        settings, some parameter with a gradient, or tensors sharing memory (what the native
        call would refuse) keep it off the native path."""
        if not any(group.get(k) for k in LOW_PRECISION_OPTIONS):
            return
        params = [p for p in group["params"] if p.grad is not None]
        if not (group_is_native(self, group) and all(_native_pair(p) for p in params)):  # type: ignore[arg-type]
            self._torch_step(group)  # raises
        if not all(_core.takes_hyper(self.KIND, hyper) for hyper, _ in self._kernel_calls(group, params)):  # type: ignore[attr-defined]
            self._torch_step(group)  # raises
        state = self.state  # type: ignore[attr-defined]
        written = [*params, *(t for p in params for t in state.get(p, {}).values() if isinstance(t, torch.Tensor))]
        if shares_memory(written, [p.grad for p in params]) or not all(map(_aligned, written)):
            self._torch_step(group)  # raises

    def _torch_step(self, group: dict) -> None:
        for option in LOW_PRECISION_OPTIONS:
            if group.get(option):
                raise ValueError(
                    f"{type(self).__name__}: {option}={group[option]} runs on the native path only, which needs dense "
                    "contiguous CPU tensors, no shared memory, no differentiable/capturable/AMP "
                    "scaling and number hyper-parameters below 2**64 in magnitude; this group has something else"
                )
        super()._torch_step(group)  # type: ignore[misc]


def _native_param(p: torch.Tensor) -> bool:
    """Whether the native path can take the parameter ``p``: dense, contiguous, on the CPU, aligned
    for its dtype (not a view at an odd byte offset of a buffer)."""
    return p.device.type == "cpu" and p.layout == torch.strided and p.is_contiguous() and _aligned(p)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % t.element_size() == 0


def _native_pair(p: torch.Tensor) -> bool:
    """Whether the native path can take ``p`` and its gradient: dense contiguous CPU tensors
    of one dtype and shape (rust/python/src/tensors.rs ``describe_grad_twin``)."""
    g = p.grad
    return (
        g is not None and _native_param(p) and g.device.type == "cpu"
        and g.layout == torch.strided and g.is_contiguous() and g.dtype == p.dtype and g.shape == p.shape and _aligned(g)
    )
