"""Optimizer state and update in CPU memory while the model trains on a GPU.

``CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=...)`` keeps, for
every CUDA parameter, a copy in pinned CPU memory; the optimizer (any
oxoptim optimizer, or any ``torch.optim`` one) owns those copies and their
state, so the GPU holds no optimizer state. The loop keeps its shape::

    opt = oxoptim.CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=3e-4, offload_gradients=True)
    for x, y in batches:
        loss_fn(model(x), y).backward()   # gradients go to the CPU as they complete
        opt.step()                        # finishes the CPU update, copies the parameters back
        opt.zero_grad()

How it differs from torchao's ``CPUOffloadOptimizer`` (whose name and
arguments it follows):

* **Copies and updates overlap.** When a parameter's gradient is complete, a
  hook copies it to the CPU on a side stream (the GPU's gradient is freed at
  once with ``offload_gradients=True``). ``step()`` updates the CPU copies
  bucket by bucket, in the order the gradients came (one native call per
  bucket, GIL released), and sends each bucket back to the GPU while the next
  one is updated; the next forward waits for those copies on the GPU, not on
  the host. Buckets, accumulation and clipping are those of
  :func:`oxoptim.step_in_backward`, and the CPU parameters after N iterations
  are bit-identical to the same optimizer stepped on CPU copies of the same
  gradients. An optimizer that cannot step in pieces (torch's own classes,
  Prodigy) is stepped whole, then every parameter is sent back.
  ``update_during_backward=True`` updates each bucket on backward's own thread
  as soon as its copies have landed; on an H200 with GPT-2-sized models it was
  no faster (355M parameters: slower), since backward's kernel launches wait
  for each update (``benches/offload.py``).
* **One optimizer, torch's ``state_dict``.** ``param_groups``, ``state``,
  ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's, so LR
  schedulers work unchanged and a checkpoint loads into the plain optimizer
  over the same parameters (and back).
* **The GPU stays the truth for the weights.** A CUDA parameter changed
  outside the optimizer (``model.load_state_dict``, an in-place edit) is seen
  by its version counter and copied to the CPU again before its next update.
* **The CPU gradients mirror the GPU ones.** Without ``zero_grad``, a gradient
  the GPU still holds is stepped again, as the ordinary loop would.

Parameters already in CPU memory are stepped where they are, inside
backward (as with ``step_in_backward``). Parameters that do not require
gradients are left out, as torchao does. Accumulation over ``accumulate=K``
backward passes: ``accumulation="gradient"`` keeps the GPU gradient as the
buffer (each pass copies the running sum; not with ``offload_gradients``);
``accumulation="optimizer"`` (Adam/AdamW, needs ``offload_gradients=True``)
absorbs each micro-batch into the CPU moments and keeps no gradient on the GPU.
Not supported: several processes (DDP), a ``GradScaler``, parameters on
devices other than CUDA and CPU.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Iterable, Optional

import torch

from .backward import StepInBackward

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

    __slots__ = ("device_param", "host", "grad", "transfers", "version", "pending", "arrived", "sent")

    def __init__(self, p: torch.Tensor, transfers: Any) -> None:
        self.device_param = p
        self.transfers = transfers
        self.host = torch.empty_like(p, device="cpu", pin_memory=transfers.pinned).requires_grad_(True)
        self.grad = torch.empty_like(self.host, pin_memory=transfers.pinned)
        self.version = -1  # differs from p._version: the first hook copies p to the CPU
        self.pending = False  # a gradient copy not yet taken by the optimizer
        self.arrived = False  # the optimizer took a gradient of this iteration
        self.sent = False  # the CPU copy was updated and sent back in this iteration

    def refresh_host(self) -> Any:
        """Copies the GPU parameter to the CPU if it changed outside the optimizer; returns the
        copy's event (None: no copy)."""
        p = self.device_param
        if p._version == self.version:
            return None
        self.version = p._version
        with torch.no_grad():
            return self.transfers.to_host(self.host, p.detach())

    def send_back(self) -> None:
        p = self.device_param
        with torch.no_grad():
            self.transfers.to_device(p, self.host)
        self.version = p._version  # the copy bumped it; later changes are someone else's
        self.sent = True


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
        update_during_backward: update each bucket on backward's thread once its gradient copies have
            landed, rather than all in ``step()`` (module docstring: slower where backward's kernel
            launches are what the GPU waits for).
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
        update_during_backward: bool = False,
        **kwargs: Any,
    ) -> None:
        if optimizer_class is None:
            from .adam import AdamW

            optimizer_class = AdamW
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
                if p.device not in transfers:
                    transfers[p.device] = _transfers_for(p.device)  # raises for other devices, before any copy
        self._entries: dict[torch.Tensor, _Offloaded] = {}
        host_groups = []
        for group in groups:
            host_params = []
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if transfers[p.device] is None:
                    host_params.append(p)
                    continue
                entry = _Offloaded(p, transfers[p.device])
                with torch.no_grad():
                    entry.host.copy_(p.detach())
                entry.version = p._version
                self._entries[p] = entry
                host_params.append(entry.host)
            host_groups.append({**group, "params": host_params})
        self.optimizer = optimizer_class(host_groups, **kwargs)
        self.offload_gradients = offload_gradients
        self.update_during_backward = update_during_backward
        self._in_backward: Optional[StepInBackward] = None
        if callable(getattr(self.optimizer, "_step_part", None)) and getattr(self.optimizer, "STEPS_IN_BACKWARD", True):
            self._in_backward = StepInBackward(
                self.optimizer, accumulate=accumulate, accumulation=accumulation, clip=clip, bucket_numel=bucket_numel
            ).__enter__()
        elif clip is not None or accumulation != "gradient":
            raise ValueError(f"clip and accumulation='optimizer' need an optimizer that steps inside backward; "
                             f"{type(self.optimizer).__name__} is stepped whole in step()")
        self._host_entry = {id(e.host): e for e in self._entries.values()}
        self._pending: deque[tuple[_Offloaded, Any]] = deque()
        self._lock = threading.RLock()  # backward may run hooks on one thread per device
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._entries]

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
        """The wrapped optimizer's ``state_dict`` (with ``ClipPreviousNorm``, call it between iterations)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:  # type: ignore[override]
        raise NotImplementedError("CPUOffloadOptimizer cannot take parameter groups after construction; "
                                  "construct it with every group")

    def train(self) -> None:
        """Schedule-Free's ``train()``: switches the CPU copies, then sends them to the GPU."""
        self._switch("train")

    def eval(self) -> None:
        """Schedule-Free's ``eval()``: switches the CPU copies, then sends them to the GPU."""
        self._switch("eval")

    def _switch(self, mode: str) -> None:
        switch = getattr(self.optimizer, mode, None)
        if not callable(switch):
            raise AttributeError(f"{type(self.optimizer).__name__} has no {mode}() (Schedule-Free optimizers have)")
        with self._lock:
            for entry in self._entries.values():
                entry.refresh_host()
            for transfers in self._transfers():
                transfers.synchronize()  # copies back still reading the CPU values, and the refreshes
            switch()
            for entry in self._entries.values():
                entry.send_back()
                entry.sent = False
            self._before_compute()

    def __repr__(self) -> str:
        return f"CPUOffloadOptimizer({self.optimizer!r})"

    # -- during backward ----------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        entry = self._entries[p]
        with self._lock:
            if entry.pending:
                self._take(until=entry)  # its buffer is read before the next copy lands in it
            entry.refresh_host()
            event = entry.transfers.to_host(entry.grad, p.grad)
            entry.transfers.keep_until_copied(p.grad)
            entry.pending = True
            self._pending.append((entry, event))
            if self.offload_gradients:
                p.grad = None
            if self.update_during_backward and self._in_backward is not None:
                self._take(until=None)

    def _take(self, until: Optional[_Offloaded], wait: bool = False) -> None:
        """Hands the landed gradient copies to the optimizer in arrival order: all of them with
        ``wait``, up to ``until``'s, or (both unset) those whose copy has already run."""
        while self._pending:
            entry, event = self._pending[0]
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

    def _send_updated_buckets(self, entry: _Offloaded) -> None:
        bucket = self._in_backward._bucket_of.get(entry.host)  # type: ignore[union-attr]
        if bucket is None or not bucket.done:
            return
        for host in bucket.params:
            updated = self._host_entry.get(id(host))
            if updated is not None and updated.arrived and not updated.sent:
                updated.send_back()

    # -- the iteration ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Finishes the iteration: the CPU update of what backward left, then the parameters sent back."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            self._take(until=None, wait=True)
            self._take_kept_gradients()
            try:
                self.optimizer.step()
            finally:
                self._end_iteration()
        return loss

    def _take_kept_gradients(self) -> None:
        """The CPU gradients mirror the GPU ones: a gradient no backward of this iteration
        produced but the GPU still holds (no ``zero_grad``) is stepped again, as the ordinary loop
        would; one set to None by hand is not."""
        for entry in self._entries.values():
            if entry.arrived:
                continue
            grad = entry.device_param.grad
            if grad is None:
                entry.host.grad = None
                continue
            entry.refresh_host()
            entry.transfers.to_host(entry.grad, grad).synchronize()
            entry.host.grad = entry.grad
            entry.arrived = True

    def _end_iteration(self) -> None:
        """Sends back every CPU copy updated in this iteration that backward did not send."""
        for entry in self._entries.values():
            if entry.arrived and not entry.sent:
                entry.send_back()
            entry.arrived = entry.sent = False
        self._before_compute()

    def _transfers(self) -> list:
        return list({id(e.transfers): e.transfers for e in self._entries.values()}.values())

    def _before_compute(self) -> None:
        for transfers in self._transfers():
            transfers.before_compute()

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        """Clears the GPU gradients. Before ``step()`` it drops the unfinished iteration as
        ``step_in_backward`` does: every bucket whose gradients all arrived is updated (whether its
        copies landed during backward or not: the result does not depend on timing), the rest are not."""
        with self._lock:
            self._take(until=None, wait=True)
            for p in self._entries:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
            self.optimizer.zero_grad(set_to_none)
            for entry in self._entries.values():
                entry.arrived = entry.sent = False

    def close(self) -> None:
        """Removes the hooks; the CUDA parameters keep their last values."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._in_backward is not None:
            self._in_backward.close()


def _param_groups(params: Iterable[Any]) -> list[dict]:
    """torch's reading of ``params``, checked before any memory is taken."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    groups = list(params)
    if len(groups) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    seen: set[int] = set()
    checked = []
    for group in groups:
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in ps:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError("some parameters appear in more than one parameter group")
            seen.add(id(p))
        checked.append({**group, "params": ps})
    return checked
