"""Optimizer state and update in CPU memory while the model trains on a GPU.

``CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=...)`` keeps, for
every CUDA parameter, a copy in pinned CPU memory; the optimizer (any
oxoptim optimizer, or any ``torch.optim`` one) owns those copies and their
state, so the GPU holds no optimizer state. The loop keeps its shape::

    opt = oxoptim.CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=3e-4, offload_gradients=True)
    for x, y in batches:
        loss_fn(model(x), y).backward()   # gradients go to the CPU as they complete
        opt.step()                        # the CPU update, the parameters copied back
        opt.zero_grad()

How it differs from torchao's ``CPUOffloadOptimizer`` (whose name and
arguments it follows):

* **Copies and updates overlap.** When a parameter's gradient is complete, a
  hook copies it to the CPU on a side stream (the GPU's gradient is freed at
  once with ``offload_gradients=True``). ``step()`` updates the CPU copies
  bucket by bucket, in the order the gradients came (one native call per
  bucket, GIL released), and sends each bucket back to the GPU while the next
  one is updated; the next forward waits for those copies on the GPU, not on
  the host. Backward returns on the host once its kernels are queued, so the
  first buckets are updated while the GPU still computes the last gradients.
  Buckets, accumulation and clipping are those of
  :func:`oxoptim.step_in_backward`, and the CPU parameters after N iterations
  are bit-identical to the same optimizer stepped on CPU copies of the same
  gradients. An optimizer that cannot step in pieces (torch's own classes,
  Prodigy) is stepped whole, then every parameter is sent back;
  ``update_during_backward`` changes nothing for it (it runs as with ``False``).
* **One optimizer, torch's ``state_dict``.** ``param_groups``, ``state``,
  ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's, so LR
  schedulers work unchanged and a checkpoint loads into the plain optimizer
  over the same (trainable) parameters, and back.
* **The ordinary loop's semantics.** The GPU is the truth: a weight or a
  gradient changed between backward and ``step()`` (``clip_grad_norm_``,
  ``model.load_state_dict``, ``p.grad = None``) is copied again, found by the
  tensors' version counters; a gradient the GPU still holds with no new
  backward (no ``zero_grad``) is stepped again; ``zero_grad()`` before
  ``step()`` (a skipped batch) drops the iteration. Step pre-hooks (the global
  ones, the wrapped optimizer's) run before anything is updated: what they set
  is used, and one that raises changes nothing. A ``step()`` the wrapped
  optimizer refuses is retried as the plain optimizer's (offloaded gradients
  are kept in CPU memory until then). Where it cannot follow the plain loop:
  with ``offload_gradients=True`` no gradient is left on the GPU after
  ``step()``, so a second ``step()`` without a backward steps nothing (the
  plain optimizer steps the same gradients again); with
  ``update_during_backward=True`` an update refused during backward (an
  invalid ``lr``) raises from ``backward()``, which stops it, so the
  gradients it did not reach are not there for a retried ``step()`` (the
  worker raises it from ``step()`` instead, after backward completed).

``update_during_backward="worker"`` hands each gradient copy to a worker
thread, which waits for it and updates its bucket while backward goes on
(the hooks only queue copies; the worker ends after a second idle and the
next backward starts another). An error it meets stops it. Met before
``step()``, it is raised by ``step()`` before anything else (call it again:
the retry updates what the worker did not, once, clipping once); met during
``step(closure)``'s backward, that step retries the failed update and raises
only if the failure recurs. ``zero_grad()`` updates the buckets whose copies
the worker left, drops the failed one and then raises the error. With
``accumulation="optimizer"``, a micro-batch whose absorption failed is
absorbed by the next micro-batch's hook before its copy takes the buffer. On an H200 it was
the fastest offload where the CPU update outlasts backward (GPT-2 medium:
8-10 % faster than torchao's, ``benches/offload.py``) and level with the
default below that. The worker is a Python thread running beside backward,
as DataLoader's pin-memory thread does; :func:`oxoptim.step_in_backward`
refuses such a thread beside CPU backward (it crashed torch in an earlier
experiment, where that thread freed backward's own gradients). This worker
frees none of backward's tensors (it reads the pinned copies), and neither a
40-second run on CPU with the garbage collector at every allocation nor the
CUDA tests and benchmarks on an H200 crashed. ``update_during_backward=True`` updates on backward's
own thread instead, as soon as a bucket's copies have landed (backward's
kernel launches then wait for each update: slower at 355M). Both cannot
honour the ordinary loop in the cases above: what backward updated stays
updated (``zero_grad()`` before ``step()`` updates every bucket whose
gradients all arrived, as :func:`oxoptim.step_in_backward` does), and
weights or gradients changed after backward are not seen.

Parameters already in CPU memory are stepped where they are, inside backward
(as with ``step_in_backward``). Parameters that do not require gradients at
construction are left out, as torchao does (a later gradient of one is
refused at ``step()``); they still count in the positions that give each
parameter its bf16 stochastic-rounding stream, so the updates are those of the
plain optimizer over the same list. ``model.named_parameters()`` is taken as
torch takes it (``param_names`` in the groups and the ``state_dict``).
Accumulation over ``accumulate=K`` backward passes: ``accumulation="gradient"`` keeps the GPU gradient as the buffer (each pass
copies the running sum; not with ``offload_gradients``);
``accumulation="optimizer"`` (Adam/AdamW, needs ``offload_gradients=True``)
absorbs each micro-batch into the CPU moments and keeps no gradient on the
GPU. With ``offload_gradients=True`` there is no GPU gradient to clip after
backward: use ``clip=``.

Not seen: a weight or gradient changed through ``.data`` (``p.grad.data.clamp_``:
``.data`` has no version counter of its own; write under ``torch.no_grad()``
instead). A gradient changed after backward (``clip_grad_norm_`` over the
GPU gradients) is copied twice; ``clip=`` clips the CPU copies instead. With
``accumulation="optimizer"`` each micro-batch is absorbed into the moments
as it arrives (as with ``step_in_backward``): ``zero_grad()`` drops only
what has not been (with ``update_during_backward=False`` the micro-batches
copied but not absorbed yet are absorbed then, and the update the K-th would
make is dropped with the iteration). Not supported: several processes (DDP), a ``GradScaler``
(``GradScaler.step()`` refuses it before anything is updated),
sparse gradients, LBFGS (its closure re-evaluates the model between
updates), parameters on devices other than CUDA and CPU, pickling (save the
``state_dict``), ``torch.distributed.checkpoint``'s optimizer state dicts.
``state`` is keyed by the CPU copies (``param_groups``' tensors), not by the
model's parameters. Step hooks registered on the wrapper receive it, and run
first and last; global ones and state-dict hooks receive the wrapped optimizer.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections import OrderedDict, deque
from itertools import chain
from typing import Any, Callable, Iterable, Optional, Union, cast

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ._lowprec import STREAMS
from .backward import ClipPreviousNorm, StepInBackward

__all__ = ["CPUOffloadOptimizer"]


class _CudaTransfers:
    """One side stream per device for the copies between the GPU and pinned CPU memory."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Copies ``src`` to ``dst`` after the work queued so far on the compute stream; returns an event."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            return self.stream.record_event()

    def keep_until_copied(self, tensor: torch.Tensor) -> None:
        """Its memory is reused only once the copy has run (the gradient may be freed or replaced
        on the GPU before that: ``offload_gradients``, a later micro-batch, ``p.grad = None``)."""
        tensor.record_stream(self.stream)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # After the work queued so far on the compute stream, which may read ``dst`` (an evaluation
        # forward between backward and step()).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def before_compute(self) -> None:
        """The next forward waits (on the GPU, not the host) for the parameters sent back."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def synchronize(self) -> None:
        """Waits (on the host) for every copy issued: the CPU copies may then be written."""
        self.stream.synchronize()


def _transfers_for(device: torch.device) -> Optional[Any]:
    """How parameters on ``device`` reach CPU memory; None: they are there already."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return _CudaTransfers(device)
    raise ValueError(f"CPUOffloadOptimizer takes CUDA and CPU parameters, got one on {device}")


class _Offloaded:
    """A CUDA parameter, its CPU copy and the pinned buffer its gradient is copied into."""

    __slots__ = ("device_param", "host", "grad", "transfers", "version", "copied", "pending", "arrived", "sent",
                 "generation")

    def __init__(self, p: torch.Tensor, transfers: Any) -> None:
        self.device_param = p
        self.transfers = transfers
        self.host = torch.empty_like(p, device="cpu", pin_memory=transfers.pinned).requires_grad_(True)
        self.grad = torch.empty_like(self.host, pin_memory=transfers.pinned)
        self.version = -1  # p._version when the CPU copy last equalled p
        self.copied: Optional[tuple[Any, int]] = None  # the GPU gradient last copied, and its version then
        self.pending = False  # a gradient copy not yet taken by the optimizer
        self.arrived = False  # the optimizer took a gradient of this iteration
        self.sent = False  # the CPU copy was updated and sent back in this iteration
        self.generation = 0  # counts gradient copies: a queued copy of an older one is stale

    def refresh_host(self) -> Any:
        """Copies the GPU parameter to the CPU if it changed outside the optimizer; returns the
        copy's event (None: no copy)."""
        p = self.device_param
        if p._version == self.version:
            return None
        self.version = p._version
        with torch.no_grad():
            return self.transfers.to_host(self.host, p.detach())

    def copy_grad(self) -> Any:
        """Issues the copy of the GPU gradient to the CPU buffer; returns its event."""
        grad = self.device_param.grad
        assert grad is not None  # called where a gradient is held
        event = self.transfers.to_host(self.grad, grad.detach())
        self.transfers.keep_until_copied(grad)
        self.copied = (weakref.ref(grad), grad._version)
        return event

    def grad_changed(self) -> bool:
        """Whether the GPU gradient is no longer the one copied (replaced, set to None, or
        changed in place since)."""
        if self.copied is None:
            return True
        ref, version = self.copied
        grad = self.device_param.grad
        return grad is None or grad is not ref() or grad._version != version

    def send_back(self) -> None:
        p = self.device_param
        with torch.no_grad():
            self.transfers.to_device(p, self.host)
        self.version = p._version  # the copy bumped it; later changes are someone else's
        self.sent = True


class _Worker:
    """The thread that updates buckets while backward goes on (``update_during_backward="worker"``).

    Backward's hooks queue gradient copies and wake it; it waits for each copy, outside the
    offload's lock, and hands it to the optimizer. It holds its owner weakly but while it works:
    idle for ``IDLE_S`` it ends, and the next backward starts another. An error it meets stops it
    and is kept for ``step()``/``zero_grad()`` (module docstring)."""

    IDLE_S = 1.0

    def __init__(self, lock: Any) -> None:
        self._cond = threading.Condition(lock)
        self._thread: Optional[threading.Thread] = None
        self._work: Optional[weakref.WeakMethod] = None
        self._wakes = 0  # counts wake() calls: one made while the worker found the queue empty is seen
        self._busy = False  # from a wake() until the worker finds the queue empty
        self._error: Optional[BaseException] = None
        self._stopped = False

    def wake(self, work: Callable[[], bool]) -> None:
        """Called by a hook after it queued a copy: ``work()`` takes one copy, False when none is left."""
        with self._cond:
            if self._stopped or self._error is not None:
                return  # step() takes what is queued
            self._work = weakref.WeakMethod(work)  # type: ignore[arg-type]
            self._wakes += 1
            self._busy = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oxoptim-offload-update", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                work = None if self._stopped or self._work is None else self._work()
                if work is None:
                    return self._end()
                seen = self._wakes
            try:
                more = work()
            except BaseException as e:
                # Kept until step() raises it: its frames must not keep the optimizer alive.
                work = None
                traceback.clear_frames(e.__traceback__)
                with self._cond:
                    self._error = e
                    return self._end()
            del work
            if more:
                continue
            with self._cond:
                if self._wakes != seen:
                    continue
                self._busy = False
                self._cond.notify_all()
                while self._wakes == seen and not self._stopped:
                    if not self._cond.wait(self.IDLE_S) and self._wakes == seen:
                        return self._end()

    def _end(self) -> None:
        self._busy = False
        self._work = None
        self._thread = None
        self._cond.notify_all()

    def drain(self) -> None:
        """Waits until the worker has taken every queued copy (or has failed, or stopped)."""
        with self._cond:
            while self._busy and self._thread is not None and self._thread is not threading.current_thread():
                self._cond.wait()

    def finish(self, raise_error: bool = True) -> Optional[BaseException]:
        """``drain()``, then the error the worker met, if any (once): raised, or returned."""
        self.drain()
        with self._cond:
            error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
        return error

    def stop(self) -> None:
        """Stops the worker; waits for it unless the caller holds the lock it needs to end (a
        step hook calling ``close()``: it then ends once the lock is released)."""
        waits = not self._cond._is_owned()  # type: ignore[attr-defined]
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread() and waits:
            thread.join()


class _TorchStep:
    """The wrapped optimizer's ``step()`` as torch's wrapper runs it (the global step pre-hooks, then
    its own, the step, its post-hooks, then the global ones), in three calls: the pre-hooks run
    before the offload updates anything, as they run before the plain optimizer writes anything."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.step = type(optimizer).step
        self.hooked = getattr(self.step, "hooked", False)  # a step torch did not wrap runs no hooks
        self.args: tuple = (optimizer,)
        self.kwargs: dict = {}

    def pre_hooks(self) -> None:
        if self.hooked:
            for hook in chain(_global_optimizer_pre_hooks.values(), self.optimizer._optimizer_step_pre_hooks.values()):
                result = hook(self.optimizer, self.args, self.kwargs)
                if result is not None:
                    self.args, self.kwargs = result

    def run(self) -> None:
        if self.hooked:
            self.step.__wrapped__(*self.args, **self.kwargs)  # type: ignore[attr-defined]
            self.optimizer._optimizer_step_code()
        else:
            self.optimizer.step()

    def post_hooks(self) -> None:
        if self.hooked:
            for hook in chain(self.optimizer._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self.optimizer, self.args, self.kwargs)


# id(parameter) -> (the parameter, its CPUOffloadOptimizer), both weakly: one offload per parameter.
# Not an attribute of the parameter, which would stop torch.save(model) from pickling it.
_OWNERS: dict[int, tuple[Any, Any]] = {}


def _owner(p: torch.Tensor) -> Any:
    mark = _OWNERS.get(id(p))
    if mark is None or mark[0]() is not p:
        return None
    return mark[1]()


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """``optimizer_class(params, **kwargs)`` run on CPU copies of the CUDA parameters (module docstring).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        optimizer_class: the optimizer to run on the CPU copies (default ``oxoptim.AdamW``).
        offload_gradients: free each GPU gradient once it is copied (no gradients held on the GPU).
        accumulate: backward passes per ``step()`` (see :class:`oxoptim.StepInBackward`).
        accumulation: ``"gradient"`` or ``"optimizer"`` (see the module docstring).
        clip: ``oxoptim.ClipPerParameter`` or ``oxoptim.ClipPreviousNorm`` (applied to the CPU gradients).
        bucket_numel: parameters of a group are updated in buckets of at least this many elements, each
            sent back to the GPU as soon as it is updated (see :class:`oxoptim.StepInBackward`).
        update_during_backward: ``False`` (default): every update in ``step()``. ``"worker"``: a worker
            thread updates each bucket as soon as its gradient copies have landed while backward goes on.
            ``True``: the same on backward's own thread (its kernel launches wait for each update). Both
            are weaker than ``False`` (module docstring).
        **kwargs: the optimizer's own arguments (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: Optional[Callable[..., torch.optim.Optimizer]] = None,
        *,
        offload_gradients: bool = False,
        accumulate: int = 1,
        accumulation: str = "gradient",
        clip: Any = None,
        bucket_numel: int = 1 << 22,
        update_during_backward: Union[bool, str] = False,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(update_during_backward, bool) or update_during_backward == "worker"):
            raise ValueError(f"update_during_backward must be False, True or 'worker', got {update_during_backward!r}")
        if optimizer_class is None:
            from .adam import AdamW

            optimizer_class = AdamW
        if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.LBFGS):
            raise TypeError("CPUOffloadOptimizer cannot run LBFGS: its closure re-evaluates the model between "
                            "updates of the CPU copies")
        groups = _param_groups(params)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
        if accumulation not in ("gradient", "optimizer"):
            raise ValueError(f"accumulation must be 'gradient' or 'optimizer', got {accumulation!r}")
        if accumulate > 1 and accumulation == "gradient" and offload_gradients:
            raise ValueError("accumulation='gradient' keeps the sum in the GPU gradient, which offload_gradients=True "
                             "frees: use accumulation='optimizer' (Adam/AdamW) or offload_gradients=False")
        if accumulate > 1 and accumulation == "optimizer" and not offload_gradients:
            raise ValueError("accumulation='optimizer' takes each micro-batch's own gradient: it needs "
                             "offload_gradients=True (a kept GPU gradient would be summed over micro-batches)")
        transfers: dict[torch.device, Any] = {}
        for group in groups:
            for p in group["params"]:
                if _owner(p) is not None:
                    raise RuntimeError("a parameter is already offloaded by another CPUOffloadOptimizer: close() it "
                                       "first (both would update the GPU weights)")
                if p.device not in transfers:
                    transfers[p.device] = _transfers_for(p.device)  # raises for other devices, before any copy
        self._entries: dict[torch.Tensor, _Offloaded] = {}
        self._left_out: list[torch.Tensor] = []
        host_groups = []
        # Each parameter's stochastic-rounding stream: its position among the parameters given, as
        # in the plain optimizer over them (the parameters left out count).
        streams: dict[torch.Tensor, int] = {}
        for group in groups:
            names = group.pop("param_names", None)  # named_parameters(): torch records them from the pairs
            host_params = []
            for k, p in enumerate(group["params"]):
                if not p.requires_grad:
                    self._left_out.append(p)
                    continue
                host = p  # a CPU parameter is stepped where it is
                if transfers[p.device] is not None:
                    entry = _Offloaded(p, transfers[p.device])
                    with torch.no_grad():
                        entry.host.copy_(p.detach())
                    entry.version = p._version
                    self._entries[p] = entry
                    host = entry.host
                streams[host] = len(streams) + len(self._left_out)
                host_params.append(host if names is None else (names[k], host))
            host_groups.append({**group, "params": host_params})
        make = cast(Callable[..., torch.optim.Optimizer], optimizer_class)  # the LBFGS check widened its type
        self.optimizer: torch.optim.Optimizer = make(host_groups, **kwargs)
        self.optimizer.__dict__[STREAMS] = streams
        self.offload_gradients = offload_gradients
        self.clip = clip
        self.accumulation = accumulation
        self._in_backward: Optional[StepInBackward] = None
        if callable(getattr(self.optimizer, "_step_part", None)) and getattr(self.optimizer, "STEPS_IN_BACKWARD", True):
            self._in_backward = StepInBackward(
                self.optimizer, accumulate=accumulate, accumulation=accumulation, clip=clip, bucket_numel=bucket_numel
            ).__enter__()
            if not (update_during_backward or accumulation == "optimizer"):
                # In step() with gradient accumulation the GPU sums the micro-batches and the optimizer
                # takes each CPU copy's last copy once; parameters staying in CPU memory count every
                # micro-batch through their own hooks.
                self._in_backward._arrives_once.update(e.host for e in self._entries.values())
        elif clip is not None or accumulation != "gradient":
            raise ValueError(f"clip and accumulation='optimizer' need an optimizer that steps inside backward; "
                             f"{type(self.optimizer).__name__} is stepped whole in step()")
        # An optimizer stepped whole updates nothing during backward: it runs as with False.
        self.update_during_backward = update_during_backward if self._in_backward is not None else False
        self._host_entry = {id(e.host): e for e in self._entries.values()}
        self._pending: deque[tuple[_Offloaded, Any, int]] = deque()
        self._closed = False
        self._lock = threading.RLock()  # backward may run hooks on one thread per device
        self._worker = _Worker(self._lock) if self.update_during_backward == "worker" else None
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        # The hooks hold the optimizer weakly: one dropped without close() stops updating the GPU
        # weights once it is collected, and its hooks are removed then.
        this = weakref.ref(self)

        def on_grad(p: torch.Tensor) -> None:
            optimizer = this()
            if optimizer is not None:
                optimizer._on_grad(p)

        self._handles = [p.register_post_accumulate_grad_hook(on_grad) for p in self._entries]
        marks = []
        for p in (p for group in groups for p in group["params"] if p.requires_grad):
            mark = (weakref.ref(p), this)
            _OWNERS[id(p)] = mark
            marks.append((id(p), mark))
        self._finalizer = weakref.finalize(self, _release, list(self._handles), marks, self._in_backward, self._worker)

    # -- torch.optim.Optimizer's surface: the wrapped optimizer's ---------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict``; with ``ClipPreviousNorm`` also the last
        iteration's gradient norm (``"previous_grad_norm"``, which a plain optimizer ignores)."""
        self._settle()
        state = self.optimizer.state_dict()
        if isinstance(self.clip, ClipPreviousNorm):
            state["previous_grad_norm"] = self._in_backward.state_dict()["grad_norm"]  # type: ignore[union-attr]
        return state

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """The wrapped optimizer's ``load_state_dict``; with ``ClipPreviousNorm`` a
        ``"previous_grad_norm"`` that is neither None nor a one-element tensor is refused first."""
        self._settle()
        state_dict = dict(state_dict)
        norm = state_dict.pop("previous_grad_norm", None)
        if isinstance(self.clip, ClipPreviousNorm) and not (norm is None or isinstance(norm, torch.Tensor) and norm.numel() == 1):
            raise TypeError(f"previous_grad_norm must be None or a one-element tensor (as state_dict() saves it), "
                            f"got {norm!r}")
        self.optimizer.load_state_dict(state_dict)
        if isinstance(self.clip, ClipPreviousNorm):
            self._in_backward.load_state_dict({"grad_norm": norm})  # type: ignore[union-attr]

    # State-dict hooks run around the wrapped optimizer's methods (they receive it, not the wrapper).
    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:  # type: ignore[override]
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:  # type: ignore[override]
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:  # type: ignore[override]
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:  # type: ignore[override]
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def add_param_group(self, param_group: dict) -> None:  # type: ignore[override]
        raise NotImplementedError("CPUOffloadOptimizer cannot take parameter groups after construction; "
                                  "construct it with every group")

    def __getstate__(self) -> dict:
        raise TypeError("a CPUOffloadOptimizer cannot be pickled or copied (it holds CUDA streams and hooks on "
                        "the model's parameters): save its state_dict()")

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by ``GradScaler.step()`` (alone in torch) before it unscales or steps anything: the
        scaler is refused there. Its inf check and unscaling read the optimizer's gradients, which
        here are CPU copies taken only in ``step()``."""
        raise RuntimeError("CPUOffloadOptimizer does not support a GradScaler: the scaler unscales the optimizer's "
                           "gradients and checks them for inf before step(), but this optimizer's are CPU copies taken "
                           "only in step(); use bfloat16 autocast (no scaling) instead")

    @property
    def train(self) -> Callable[[], None]:
        """Schedule-Free's ``train()`` (only where the wrapped optimizer has one): switches the CPU
        copies, then sends them to the GPU."""
        return self._switch("train")

    @property
    def eval(self) -> Callable[[], None]:
        """Schedule-Free's ``eval()`` (only where the wrapped optimizer has one)."""
        return self._switch("eval")

    def _switch(self, mode: str) -> Callable[[], None]:
        switch = getattr(self.optimizer, mode, None)
        if not callable(switch):
            raise AttributeError(f"{type(self.optimizer).__name__} has no {mode}() (Schedule-Free optimizers have)")

        def run() -> None:
            self._settle()  # the worker updates no bucket in the other mode
            with self._lock:
                for entry in self._entries.values():
                    entry.refresh_host()
                for transfers in self._transfers():
                    transfers.synchronize()  # copies back still reading the CPU values, and the refreshes
                switch()
                for entry in self._entries.values():
                    entry.send_back()
                    entry.sent = entry.arrived and self._updated(entry)  # step() sends the rest again
                self._before_compute()

        return run

    def __repr__(self) -> str:
        return f"CPUOffloadOptimizer({self.__dict__.get('optimizer')!r})"

    # -- during backward ----------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        entry = self._entries[p]
        grad = p.grad
        assert grad is not None  # the hook runs once the gradient is accumulated
        if grad.layout != torch.strided:
            raise RuntimeError(f"CPUOffloadOptimizer does not take {grad.layout} gradients (a sparse "
                               "embedding's, say): train such parameters with an optimizer of their own")
        with self._lock:
            again = entry.pending or entry.arrived  # a second backward before step()
            each_counts = self.update_during_backward or self.accumulation == "optimizer"
            if again and not each_counts and self.offload_gradients:
                raise RuntimeError("a second backward before step() with offload_gradients=True: the first "
                                   "gradient is gone from the GPU, so the two cannot be summed as the ordinary loop "
                                   "does (use offload_gradients=False, or accumulation='optimizer')")
            if again and each_counts and self._worker is not None:
                # The worker may still read this parameter's buffer (it took the copy but has not
                # updated yet): the next copy waits until it is done with every copy.
                self._worker.drain()
            if again and self.accumulation == "optimizer" and not entry.pending and entry.host.grad is not None:
                # The previous micro-batch's absorption was refused (the worker's stored error, or an
                # error raised in backward): retried before the next copy takes its buffer.
                cast(StepInBackward, self._in_backward)._on_grad(entry.host)
            if entry.pending and each_counts:
                self._take(until=entry)  # every micro-batch counts: its buffer is read before the next copy
            entry.refresh_host()
            event = entry.copy_grad()  # after any earlier copy of the same buffer (one stream, in order)
            entry.generation += 1  # the GPU gradient now holds the sum: an earlier queued copy is stale
            entry.pending = True
            self._pending.append((entry, event, entry.generation))
            if self.offload_gradients:
                p.grad = None
                entry.copied = None
            if self._worker is not None:
                self._worker.wake(self._work_once)
            elif self.update_during_backward:
                self._take(until=None)

    def _take(self, until: Optional[_Offloaded], wait: bool = False) -> None:
        """Hands the landed gradient copies to the optimizer in arrival order: all of them with
        ``wait``, up to ``until``'s, or (both unset) those whose copy has already run."""
        while self._pending:
            entry, event, generation = self._pending[0]
            if generation != entry.generation:
                self._pending.popleft()  # superseded by a later copy into the same buffer
                continue
            if until is None and not wait and not event.query():
                return
            event.synchronize()
            self._pending.popleft()
            entry.pending = False
            entry.arrived = True
            entry.host.grad = entry.grad
            if self._in_backward is not None:
                self._in_backward._on_grad(entry.host)
                self._send_updated_buckets(entry)
            if entry is until:
                return

    def _work_once(self) -> bool:
        """On the worker: takes the oldest gradient copy once it has landed and hands it to the
        optimizer (updating its bucket if that completes it). False: nothing left to take."""
        with self._lock:
            while self._pending and self._pending[0][2] != self._pending[0][0].generation:
                self._pending.popleft()  # superseded by a later copy into the same buffer
            if not self._pending:
                return False
            head = self._pending[0]
        head[1].synchronize()  # without the lock: backward's hooks go on queuing copies
        with self._lock:
            if not self._pending or self._pending[0] is not head:
                return True  # dropped meanwhile (only the worker takes copies while it runs)
            entry = head[0]
            self._pending.popleft()
            entry.pending = False
            entry.arrived = True
            entry.host.grad = entry.grad
        in_backward = cast(StepInBackward, self._in_backward)
        in_backward._on_grad(entry.host)  # the update, GIL released inside, while backward goes on
        self._send_updated_buckets(entry)
        return True

    def _recheck(self) -> None:
        """Before ``step()`` takes the copies: a weight or gradient changed on the GPU since backward
        copied it (``clip_grad_norm_``, ``load_state_dict``, ``p.grad = None``) is copied again, all
        such copies issued before any is waited for; a gradient set to None is dropped."""
        for at, (entry, event, generation) in enumerate(self._pending):
            if generation != entry.generation:
                continue
            latest = entry.refresh_host()
            if not self.offload_gradients and entry.grad_changed():
                if entry.device_param.grad is None:
                    entry.generation += 1  # dropped by hand: as if no backward had produced it
                    entry.pending = False
                    continue
                latest = entry.copy_grad()
            if latest is not None:
                self._pending[at] = (entry, latest, generation)  # covers the first copy (same stream)

    def _updated(self, entry: _Offloaded) -> bool:
        """Whether ``entry``'s bucket has been updated in this iteration."""
        bucket = None if self._in_backward is None else self._in_backward._bucket_of.get(entry.host)
        return bucket is not None and bucket.done

    def _send_updated_buckets(self, entry: _Offloaded) -> None:
        if not self._updated(entry):
            return
        bucket = self._in_backward._bucket_of[entry.host]  # type: ignore[union-attr]
        for host in bucket.params:
            updated = self._host_entry.get(id(host))
            if updated is not None and updated.arrived and not updated.sent:
                updated.send_back()

    # -- the iteration ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """The CPU update of what backward left, then the parameters sent back to the GPU."""
        args: tuple = () if closure is None else (closure,)
        kwargs: dict = {}
        self._check_open()
        if self._worker is not None:
            self._worker.finish()  # its error first: a retried step() runs the hooks and closure once
        # The wrapper's own hooks, then the global ones and the wrapped optimizer's (which receive it),
        # all before anything is updated.
        for pre_hook in tuple(self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
        wrapped = _TorchStep(self.optimizer)
        wrapped.pre_hooks()
        closure = args[0] if args else kwargs.get("closure")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        regained = [p for p in self._left_out if p.requires_grad and p.grad is not None]
        if regained:
            raise RuntimeError(f"{len(regained)} parameter(s) that did not require grad when the CPUOffloadOptimizer "
                               "was built now have gradients: it left them out; build it after unfreezing them")
        if self._worker is not None:
            # What it has left step() takes below. A failure meanwhile (the closure's backward) is
            # retried there, so it is dropped here; one that recurs is raised by the retry.
            self._worker.finish(raise_error=False)
        with self._lock:
            if not self.update_during_backward:
                self._recheck()
            self._take(until=None, wait=True)
            self._take_kept_gradients()
            try:
                wrapped.run()
            except BaseException:
                # Refused: the gradients the optimizer did not take are stepped by the retry, as the plain
                # optimizer's are. Kept on the GPU, they are copied again then; offloaded, they stay here.
                self._end_iteration(keep_gradients=self.offload_gradients)
                raise
            self._end_iteration()
        wrapped.post_hooks()
        for post_hook in tuple(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, kwargs)
        return loss

    def _take_kept_gradients(self) -> None:
        """The CPU gradients mirror the GPU ones: a gradient no backward of this iteration
        produced but the GPU still holds (no ``zero_grad``) is stepped again, as the ordinary loop
        would; one set to None by hand is not."""
        for entry in self._entries.values():
            if entry.arrived:
                continue
            if entry.device_param.grad is None:
                entry.host.grad = None
                continue
            entry.refresh_host()
            entry.copy_grad().synchronize()
            entry.host.grad = entry.grad
            entry.arrived = True

    def _end_iteration(self, keep_gradients: bool = False) -> None:
        """Sends back every CPU copy updated in this iteration that backward did not send;
        ``keep_gradients``: the CPU gradients not yet stepped stay this iteration's."""
        for entry in self._entries.values():
            if entry.arrived and not entry.sent:
                entry.send_back()
            entry.arrived = keep_gradients and entry.host.grad is not None
            entry.sent = False
        self._before_compute()

    def _transfers(self) -> list:
        return list({id(e.transfers): e.transfers for e in self._entries.values()}.values())

    def _before_compute(self) -> None:
        for transfers in self._transfers():
            transfers.before_compute()

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        """Clears the gradients. Before ``step()`` it drops the unfinished iteration, as the ordinary
        loop does (with ``update_during_backward``: as ``step_in_backward`` does, every bucket whose
        gradients all arrived is updated, whenever its copies landed, and the rest dropped)."""
        error = self._worker.finish(raise_error=False) if self._worker is not None else None
        self._zero_grad(set_to_none)
        if error is not None:
            raise error  # once the iteration is dropped as it would be without the error

    def _zero_grad(self, set_to_none: bool) -> None:
        with self._lock:
            if self.update_during_backward:
                self._take(until=None, wait=True)
            elif self.accumulation == "optimizer":
                self._absorb_pending()
            if self._in_backward is not None:
                for entry in self._entries.values():  # buckets a CPU parameter's own hook completed
                    if entry.arrived:
                        self._send_updated_buckets(entry)
            self._drop_pending()
            for p in self._entries:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
            for p in self._left_out:  # as the plain optimizer clears every parameter it holds
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
            self.optimizer.zero_grad(set_to_none)
            for entry in self._entries.values():
                entry.arrived = entry.sent = False
            self._before_compute()

    def _absorb_pending(self) -> None:
        """``zero_grad()`` before ``step()`` with ``accumulation="optimizer"`` in step()'s mode: the
        micro-batches copied but not yet absorbed are absorbed, as each is on arrival with
        ``step_in_backward``; a copy that would complete the accumulation (the update) is dropped."""
        in_backward = cast(StepInBackward, self._in_backward)
        for entry, event, generation in self._pending:
            if generation == entry.generation and in_backward._arrivals.get(entry.host, 0) + 1 >= in_backward.accumulate:
                event.synchronize()  # dropped (waited for, as _drop_pending waits)
                entry.generation += 1
                entry.pending = False
        self._take(until=None, wait=True)

    def _drop_pending(self) -> None:
        """Copies not taken: dropped (waited for, as they write buffers the CPU reads later)."""
        while self._pending:
            entry, event, _ = self._pending.popleft()
            event.synchronize()
            entry.pending = False

    def _settle(self) -> None:
        """Waits until the worker (if any) has nothing left to do."""
        if self._worker is not None:
            self._worker.drain()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CPUOffloadOptimizer is closed")

    def close(self) -> None:
        """Removes the hooks and drops what backward copied since the last ``step()``; the CUDA
        parameters keep their last values, and the optimizer steps no more."""
        if self._worker is not None:
            self._worker.stop()
        with self._lock:
            self._drop_pending()
            self._closed = True
        self._finalizer()


def _release(handles: list, marked: list, in_backward: Optional[StepInBackward], worker: Optional[_Worker]) -> None:
    """Removes an offload's hooks and marks, and stops its worker (on close() or once it is collected)."""
    if worker is not None:
        worker.stop()
    for handle in handles:
        handle.remove()
    for key, mark in marked:
        if _OWNERS.get(key) is mark:  # not a later optimizer's mark of a new tensor with a reused id
            del _OWNERS[key]
    if in_backward is not None:
        in_backward.close()


def _param_groups(params: Iterable[Any]) -> list[dict]:
    """torch's reading of ``params``, checked before any memory is taken."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    if isinstance(params, set):
        raise TypeError(_UNORDERED)
    groups = list(params)
    if len(groups) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    seen: set[int] = set()
    checked = []
    for group in groups:
        ps = group["params"]
        if isinstance(ps, set):
            raise TypeError(_UNORDERED)
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        named = [p for p in ps if isinstance(p, tuple)]  # named_parameters(), as torch reads it
        if named and len(named) != len(ps):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        if named:
            group = {**group, "param_names": [name for name, _ in named]}
            ps = [p for _, p in named]
        for p in ps:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError("some parameters appear more than once (in one group or several): each would get "
                                 "its own CPU copy, and the GPU weight the last one's update")
            seen.add(id(p))
        checked.append({**group, "params": ps})
    return checked


_UNORDERED = ("optimizer parameters need to be organized in ordered collections, but the ordering of tensors in "
              "sets will change between runs. Please use a list instead.")
