"""Exact gradient averaging over micro-batches and parameter averaging (EMA/SWA), on Rust kernels."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch.optim.swa_utils import get_swa_avg_fn

from . import _core
from ._native import num_threads

__all__ = ["GradientAverager", "ParamAverager"]


def _param_list(params: Any) -> list:
    """Parameters from a tensor, an iterable of tensors, or torch-style param group dicts."""
    if isinstance(params, torch.Tensor):
        return [params]
    out: list = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_param_list(item["params"]))
        else:
            out.append(item)
    return out


def _check_shapes(targets: list, averages: list) -> None:
    """Refuses to write averages into parameters of another count or shape (a copy by element count would scramble them)."""
    if len(targets) != len(averages):
        raise ValueError(f"{len(averages)} averages for {len(targets)} parameters")
    for i, (t, a) in enumerate(zip(targets, averages)):
        if t.shape != a.shape:
            raise ValueError(f"parameter {i} is {tuple(t.shape)} but its average is {tuple(a.shape)}")


def _copy(dst: list, src: list) -> None:
    if dst and not _core.copy_scaled(dst, src, scale=1.0, num_threads=num_threads()):
        torch._foreach_copy_(dst, src)


def _distinct(tensors: list) -> list:
    """``tensors`` without repeats (by identity), in order."""
    seen: set = set()
    distinct = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            distinct.append(t)
    return distinct


def _check_fold(means: list, grads: list, weight: float, first: bool) -> None:
    """Raises what folding ``grads`` into ``means`` and zeroing them would raise (an immutable
    ZeroTensor, an inference tensor outside inference mode, a dtype or device torch refuses),
    having written nothing: each operation is tried on zero-element views of the tensors."""
    for m, g in zip(means, grads):
        m0, g0 = m.as_strided((0,), (1,)), g.as_strided((0,), (1,))
        if first:
            m0.copy_(g0)
        else:
            m0.lerp_(g0, weight)
        g0.zero_()


class GradientAverager:
    r"""Exact full-batch (or large-batch) gradient from micro-batches.

    After each micro-batch's ``backward()`` (of a *mean* loss over that
    micro-batch), :meth:`accumulate` with the micro-batch's sample count folds
    every ``.grad`` into a running weighted mean — one fused Rust pass per call,
    ``mean ← mean + (n/N)·(grad − mean)`` with N the samples seen so far — and
    zeroes ``.grad`` in the same pass. :meth:`finalize` writes the mean back
    into ``.grad`` so any optimizer can step. With uneven micro-batches (a
    short last batch) the result is the gradient of the mean loss over all
    samples, which averaging per-batch gradients equally gets wrong.

    A parameter without a gradient in some micro-batch counts as a zero
    gradient for it; one without a gradient in every micro-batch since the
    last ``finalize()`` keeps its ``.grad`` (``None`` after ``zero_grad``), so
    an optimizer leaves it alone. A parameter listed twice, or parameters
    sharing one ``.grad`` tensor, fold that gradient once each and get one
    mean written into it. A call that raises (a gradient that cannot be read
    or zeroed) changes nothing: gradients, means and counts stay as they were.
    ``n_samples`` may be any positive weight
    (e.g. a token count), not only a sample count. Usable as a context manager: ``finalize()`` runs on a
    normal exit (if anything was accumulated), and nothing is written back
    when the block raises.
    """

    def __init__(self, params: Any) -> None:
        self.params = _param_list(params)
        self._means: list[Optional[torch.Tensor]] = [None] * len(self.params)
        # Whether each parameter had a gradient in some micro-batch since the last reset.
        self._seen = [False] * len(self.params)
        self.samples: Union[int, float] = 0
        self.batches = 0

    @torch.no_grad()
    def accumulate(self, n_samples: Union[int, float]) -> None:
        """Folds the current ``.grad``s, from a micro-batch of ``n_samples`` samples, into the mean."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Real):
            raise TypeError(f"n_samples must be a number, got {type(n_samples).__name__}")
        if not (math.isfinite(n_samples) and n_samples > 0):
            raise ValueError(f"n_samples must be positive and finite, got {n_samples}")
        n = n_samples if isinstance(n_samples, numbers.Integral) else float(n_samples)
        total = self.samples + n
        weight = n / total
        first = self.samples == 0
        # Nothing is written (gradients, means, counters) until every tensor is known to fold:
        # a refused call leaves everything as it was.
        means, grads, absent = [], [], []
        created: dict[int, torch.Tensor] = {}  # index -> a new mean (first use, or a new shape/dtype/device)
        densified: dict[int, torch.Tensor] = {}  # index -> the dense gradient of a sparse one
        dense_of: dict[int, torch.Tensor] = {}  # id(sparse gradient) -> its dense copy (a shared one: one copy)
        for i, p in enumerate(self.params):
            g = p.grad
            m = self._means[i]
            if g is None:
                if m is not None and not first and self._seen[i]:
                    absent.append(m)
                continue
            if g.is_sparse:
                if id(g) not in dense_of:
                    dense_of[id(g)] = g.to_dense()
                g = densified[i] = dense_of[id(g)]
            if m is None or m.shape != g.shape or m.dtype != g.dtype or m.device != g.device:
                m = created[i] = torch.zeros_like(g, memory_format=torch.contiguous_format)
            means.append(m)
            grads.append(g)
        had_grad = [p.grad is not None for p in self.params]
        if means and not _core.accumulate_mean(means, grads, weight=weight, first=first, num_threads=num_threads()):
            # torch: every gradient is folded before any is zeroed, so a gradient listed twice (a
            # parameter listed twice, parameters sharing one .grad) or overlapping another is read whole.
            _check_fold(means, grads, weight, first)
            for m, g in zip(means, grads):
                if first:
                    m.copy_(g)
                else:
                    m.lerp_(g, weight)
            for g in _distinct(grads):
                g.zero_()
        for i, m in created.items():
            self._means[i] = m
        for i, g in densified.items():
            self.params[i].grad = g
        if absent:
            torch._foreach_mul_(absent, 1.0 - weight)
        if first:
            # Means of parameters without a gradient in the first batch start from zero.
            seen = {id(m) for m in means}
            for m in self._means:
                if m is not None and id(m) not in seen:
                    m.zero_()
        self._seen = had_grad if first else [a or b for a, b in zip(self._seen, had_grad)]
        self.samples = total
        self.batches += 1

    @torch.no_grad()
    def finalize(self) -> Union[int, float]:
        """Writes the mean gradient into ``.grad`` and starts over; returns the sample count."""
        if self.samples == 0:
            raise RuntimeError("finalize() before any accumulate()")
        dst, src, written = [], [], set()
        for p, m, seen in zip(self.params, self._means, self._seen):
            if m is None or not seen:
                continue
            if p.grad is None or p.grad.shape != m.shape or p.grad.dtype != m.dtype or not p.grad.is_contiguous():
                p.grad = torch.empty_like(m)
            if id(p.grad) in written:  # a parameter listed twice, or sharing its .grad: one mean per tensor
                continue
            written.add(id(p.grad))
            dst.append(p.grad)
            src.append(m)
        _copy(dst, src)
        samples = self.samples
        self.reset()
        return samples

    def reset(self) -> None:
        """Forgets what was accumulated (the buffers are kept for reuse)."""
        self.samples = 0
        self.batches = 0
        self._seen = [False] * len(self.params)

    def __enter__(self) -> "GradientAverager":
        self.reset()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self.samples > 0:
            self.finalize()
        else:
            self.reset()


class ParamAverager:
    r"""Exponential (EMA) or stochastic-weight (SWA) averaging of parameters.

    Call :meth:`update` after each optimizer step. The first ``start_step``
    calls are ignored; the next one copies the parameters; after that each
    call blends them in, bit for bit as ``torch.optim.swa_utils.AveragedModel``
    does on the CPU: ``mode="ema"`` with one fused Rust lerp over all tensors,
    ``avg ← avg + (1 − decay)·(θ − avg)`` (its ``get_ema_multi_avg_fn``);
    ``mode="swa"``, the running mean, with torch's own
    ``avg + (θ − avg) / (n_averaged + 1)`` per tensor (its default averaging).

    ``with averager.averaged():`` puts the averaged weights into the
    parameters (e.g. for evaluation) and restores the live ones afterwards,
    also when the block raises. ``state_dict``/``load_state_dict`` save and
    restore the averages and counters.
    """

    def __init__(self, params: Any, mode: str = "ema", decay: float = 0.999, start_step: int = 0) -> None:
        _check_settings(mode, decay, start_step)
        self.params = _param_list(params)
        self.mode = mode
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.n_updates = 0
        self.n_averaged = 0
        self.averages: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        """Folds the current parameters into the average."""
        # Counters move only once the averages are written: a failed call changes nothing.
        if self.n_updates + 1 <= self.start_step:
            self.n_updates += 1
            return
        live = [p.detach() for p in self.params]
        if self.n_averaged == 0:
            averages = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in live]
            _copy(averages, live)
            self.averages = averages
        else:
            for i, (a, p) in enumerate(zip(self.averages, live)):
                if a.shape != p.shape or a.dtype != p.dtype or a.device != p.device:
                    raise ValueError(
                        f"parameter {i} is now {tuple(p.shape)} {p.dtype} on {p.device} but its average is "
                        f"{tuple(a.shape)} {a.dtype} on {a.device}; average it with a new ParamAverager"
                    )
            if self.mode == "swa":
                n_averaged = torch.tensor(self.n_averaged)
                average = get_swa_avg_fn()
                for a, p in zip(self.averages, live):
                    a.copy_(average(a, p, n_averaged.to(p.device)))
            elif not _core.lerp_average(self.averages, live, weight=1.0 - self.decay, num_threads=num_threads()):
                torch._foreach_lerp_(self.averages, live, 1.0 - self.decay)
        self.n_updates += 1
        self.n_averaged += 1

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Swaps the averaged weights into the parameters for the block, then restores the live ones."""
        if self.n_averaged == 0:
            yield
            return
        live = [p.detach() for p in self.params]
        _check_shapes(live, self.averages)
        with torch.no_grad():
            backup = [t.clone(memory_format=torch.contiguous_format) for t in live]
            _copy(live, self.averages)
        try:
            yield
        finally:
            with torch.no_grad():
                _copy(live, backup)

    @torch.no_grad()
    def copy_to(self, params: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Writes the averages into ``params`` (default: the averaged parameters) for good."""
        if self.n_averaged == 0:
            raise RuntimeError("nothing has been averaged yet")
        targets = [p.detach() for p in (self.params if params is None else _param_list(params))]
        _check_shapes(targets, self.averages)
        _copy(targets, self.averages)

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "decay": self.decay,
            "start_step": self.start_step,
            "n_updates": self.n_updates,
            "n_averaged": self.n_averaged,
            "averages": [a.clone() for a in self.averages],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads what :meth:`state_dict` saved; everything is checked first, so a refused dict changes nothing."""
        missing = [k for k in ("mode", "decay", "start_step", "n_updates", "n_averaged", "averages") if k not in state_dict]
        if missing:
            raise KeyError(f"ParamAverager state dict lacks {', '.join(map(repr, missing))}")
        mode, decay, start_step = state_dict["mode"], state_dict["decay"], state_dict["start_step"]
        _check_settings(mode, decay, start_step)
        counts = {k: state_dict[k] for k in ("n_updates", "n_averaged")}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state dict entry {key!r} must be a non-negative int, got {value!r}")
        averages = list(state_dict["averages"])
        if (len(averages) > 0) != (counts["n_averaged"] > 0):
            raise ValueError(f"state dict holds {len(averages)} averages but n_averaged={counts['n_averaged']}")
        if averages:
            if not all(isinstance(a, torch.Tensor) for a in averages):
                raise TypeError("state dict entry 'averages' must be a list of tensors")
            _check_shapes([p.detach() for p in self.params], averages)
        loaded = [a.detach().to(device=p.device, dtype=p.dtype).clone(memory_format=torch.contiguous_format) for a, p in zip(averages, self.params)]
        self.mode, self.decay, self.start_step = mode, float(decay), int(start_step)
        self.n_updates, self.n_averaged = counts["n_updates"], counts["n_averaged"]
        self.averages = loaded


def _check_settings(mode: Any, decay: Any, start_step: Any) -> None:
    """ParamAverager's settings, as the constructor and a loaded state dict must give them."""
    if mode not in ("ema", "swa"):
        raise ValueError(f"Invalid mode {mode!r}: expected 'ema' or 'swa'")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
        raise ValueError(f"Invalid start_step: {start_step}")
