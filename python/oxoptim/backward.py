"""The optimizer step inside backward ("gradient release").

``with oxoptim.step_in_backward(optimizer) as sib:`` installs a
``register_post_accumulate_grad_hook`` on every parameter of a Rust-backed
oxoptim optimizer. When a parameter's gradient is complete, backward calls the
hook, which updates that parameter (or, for small parameters, a bucket of them
once all their gradients are in) with one native call, GIL released, and sets
``p.grad = None`` at once: gradients never all exist together. The training
loop keeps its shape::

    with oxoptim.step_in_backward(opt) as sib:
        for x, y in batches:
            loss_fn(model(x), y).backward()   # parameters are updated in here
            opt.step()                        # only finishes the iteration
            sched.step()

``optimizer.step()`` (or ``sib.step()``) finishes the iteration: it steps the
parameters whose bucket did not complete (a parameter unused by this
backward, a gradient set by hand), advances the clipping norm, and counts for
LR schedulers and step hooks as an ordinary step. Parameter values and
optimizer state after N iterations are bit-identical to the ordinary loop
(``backward(); step(); zero_grad()``) with the same optimizer: each
parameter's state is its own and the kernels are elementwise.

Accumulation over ``accumulate=K`` micro-batches (``optimizer.step()`` once
per K backward passes, as in the ordinary loop):

* ``accumulation="gradient"`` (exact): ``p.grad`` is the buffer. Backward sums
  the micro-batch gradients into it as the ordinary loop does (g = Σ_k g_k;
  scale the loss by 1/K for a mean), and the K-th backward updates the
  parameter and releases the gradient. Bit-identical to the ordinary loop;
  saves gradient memory only during the K-th backward.
* ``accumulation="optimizer"`` (Adam/AdamW; torch-optimi's
  ``optimizer_accumulation``, AdamA arXiv 2305.19982): no gradient buffer.
  Each of micro-batches 1..K-1 is absorbed into the moments and released::

      t ← t+1;  m ← β1·m + (1−β1)·g_k;  v ← β2·v + (1−β2)·g_k²    (θ unchanged)

  (g_k negated under ``maximize``; no weight decay), and the K-th micro-batch
  is an ordinary Adam step with g_K (its weight decay, bias corrections with
  the step count t, which counts micro-batches). This is optimi's maths in
  torch's parametrisation (optimi keeps the bias-corrected moments); an
  approximation of gradient accumulation, not an equality. The micro-batches
  are counted per parameter: one that gets fewer than K gradients in an
  iteration (unused by some micro-batch, as a mixture-of-experts layer, or a
  ``step()`` after fewer than K backward passes) absorbs each, and
  ``step()`` makes the update its last one would have made as the K-th, from
  the moments as they are (AdamW's decay of θ included; Adam's coupled decay,
  which enters through g, not): an Adam step with its last gradient. Complex
  parameters are absorbed as torch's Adam steps them, as real views.

Clipping: the global norm of all gradients is known only after backward,
when the gradients are gone. ``clip=ClipPerParameter(max_norm)`` clips each
parameter's gradient by its own norm (``clip_grad_norm_([p], max_norm)``);
``clip=ClipPreviousNorm(max_norm)`` scales every gradient of iteration t by
``min(1, max_norm / (‖g_{t−1}‖ + 1e-6))``, the global norm of the previous
iteration (as AdaLomo/LOMO do); iteration 0 is not clipped. ``sib.grad_norm``
is the global norm of the last finished iteration's (unclipped) gradients.

Before its first update of each iteration the context makes the checks the
ordinary ``step()`` makes before writing anything, on the parameters (their
gradients are not known yet): Schedule-Free's train mode, the low-precision
and 8-bit options' needs, ``skip_nonfinite`` switched on after entry, step
counters (and other scalar state) the kernels cannot take (Adam's bias
correction of 0 for a loaded step of -1). A refusal is raised by backward
with nothing updated. Which parameters will get a gradient is not known yet,
so a counter is checked for every trained parameter with state: one that gets
no gradient in this iteration is refused too, where the ordinary step would
pass it over until it gets one. A group the ordinary step
would hand whole to torch's implementation (a parameter the kernels cannot
take, such as a channels-last weight, or parameters sharing memory) goes to
torch bucket by bucket, so results stay bit-identical. What only a gradient
shows (a sparse one) sends that bucket alone to torch: the other buckets of
its group run the kernels, equal to torch's to rounding (sqrt) rather than bit
for bit. ``optimizer.zero_grad()`` before ``step()`` (a backward that raised,
a skipped batch) drops the unfinished iteration: what its backward already
updated stays updated, and the next backward starts a new iteration (with
``release_rows``, rows held for the embedding's gradient are then updated
with the output layer's alone, as ``step()`` would: see :mod:`oxoptim.rows`).

Not supported: a parameter listed twice (refused at entry); a layer shared by
two reentrant activation-checkpointing blocks, or used both inside one such
block and outside it (``use_reentrant=True``: each block's inner backward
completes the parameter's gradient once, so the first updates it before
autograd is done with it, and the error comes after that write; use
``use_reentrant=False``).

Where it differs from the ordinary loop, by design or not yet handled:

* gradients are released (``None``) after each update, so a loop calling
  ``zero_grad(set_to_none=False)`` steps a parameter unused by an iteration's
  backward with no gradient (no momentum, no decay), as ``set_to_none=True``
  would; the ordinary loop steps it with zeros;
* step pre-hooks (``register_step_pre_hook``) run in ``optimizer.step()``, after
  backward's updates, and see the gradients released;
* the choice of torch's implementation for a whole group is made at the
  iteration's first update from every parameter that requires a gradient;
  the ordinary step makes it from those that have one, so a group whose only
  parameter the kernels cannot take (channels-last) got no gradient in an
  iteration runs torch's code here and the kernels there (equal to rounding);
* Adafactor with ``eps=(None, …)`` takes ``eps1`` from a bucket's first
  parameter's dtype, the ordinary step from the group's first with a
  gradient (they differ only in a group mixing dtypes);
* with ``accumulation="optimizer"``, a parameter without a hook (made
  trainable or added after entry) gets its K gradients summed and one step in
  ``step()``, not the K−1 absorptions.

Refused at entry with a clear error, never silently skipped: optimizers
constructed with ``skip_nonfinite=True`` (the skip decision needs every
gradient of a group), an enabled ``torch.amp.GradScaler`` passed as
``grad_scaler=`` (unscaling and the inf check need every gradient before any
update), optimizer accumulation for other optimizers or with previous-norm
clipping. A GradScaler that is not passed cannot be seen: the first iteration
is then applied with scaled gradients and the scaler's ``step`` fails with
torch's "No inf checks were recorded for this optimizer".

DDP: pass ``ddp=model``. Post-accumulate hooks would fire before the
allreduce, so instead a DDP communication hook updates each DDP bucket's
parameters as soon as its allreduce completes (with ``accumulate=K``: the
allreduce of the K-th backward pass, the earlier ones under ``no_sync()`` or not) (what
``DistributedDataParallel._register_fused_optim`` does for torch's functional
optimizers, which oxoptim's classes are not). Backward passes are counted when
they reach the model's outputs (once per autograd graph task, so a forward that
is never backpropagated, such as a metric computed without ``torch.no_grad()``,
counts nothing); a (K+1)-th backward pass before ``optimizer.step()`` raises, and
a DDP bucket is updated at most once per iteration (a second update raises).
Only parameters that the K-th backward gave a gradient on this rank are updated
in the hook; the others are left to ``optimizer.step()``, which steps them with
what DDP leaves in ``p.grad``, as the ordinary loop does: under
``find_unused_parameters=True`` the reduced gradient of a parameter another rank
used, and none (no step, no weight decay, no state) for one that no rank used.
A backward that raises after some buckets were launched returns without DDP's
wait for their updates: ``zero_grad()``, ``step()`` and leaving the context wait
for them first. An update that failed (backward raised its error) is not retried:
the next ``step()`` raises and drops the iteration, whose other buckets were
updated, so go on from the last checkpoint.
DDP allows one communication hook per model; it stays registered and is a plain
allreduce once the context is closed. DDP keeps its bucket buffers, so no
gradient memory is saved there.

``release_rows=[w]``: a token embedding or output head (tied or not) whose
gradient is never formed whole; its rows are updated a chunk at a time inside
the backward of ``oxoptim.rows.embedding`` / ``oxoptim.rows.linear``, which the
model calls instead of ``F.embedding`` / ``F.linear`` (:mod:`oxoptim.rows`).

``overlap=True`` (updates on a worker thread while autograd goes on) is
refused: a second Python thread running during backward crashed the process
inside torch (its garbage collector traversing autograd state that backward,
without the GIL, was changing; and a storage object freed there tripped
torch's ``THPStorage_dealloc`` assertion). Without ``ddp=``, updates run in
backward's own thread (the thread running the post-accumulate hook).

Under ``ddp=`` they do not: each DDP bucket's update is chained with
``future.then`` on the bucket's allreduce future, so it runs on the thread
that completes that future (with gloo, one of its worker threads, while
backward goes on in its own thread computing other buckets' gradients; the
thread that chains it if the allreduce has already completed). What makes
that correct: the update starts only once the bucket's gradients are
reduced, and touches only that bucket's parameters and their optimizer
state, which autograd no longer reads (their gradients are complete) and no
other bucket's update writes; its Python code (clipping, creating state,
the checks) holds the GIL as any Python callback does, the native call
releases it as in backward's thread; the parameters, the bucket's reduced
gradients and the state are referenced by the bucket, the optimizer and this
context until the update returns, and DDP waits for every bucket's future at
the end of backward, before ``backward()`` returns. The refusal of
``overlap=True`` above was for a thread of oxoptim's own; gloo's threads run
this callback under DDP as torch's ``_register_fused_optim`` has them run
its optimizer step (no crash was seen in a 60-second stress run with
``gc.set_threshold(1, 1, 1)``).

A parameter may be updated in place during backward only because autograd
has finished with it when its gradient is complete; a graph that reads a
parameter through ``.detach()`` or ``.data`` in a node that runs later would
see the new value (torch's own optimizer-in-backward pattern shares this).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import _core
from ._lowprec import shares_memory
from ._native import group_is_native
from .clip import clip_grad_norm_
from .rows import RowRelease, check_release

__all__ = ["ClipPerParameter", "ClipPreviousNorm", "StepInBackward", "step_in_backward"]

_ACTIVE = "_oxoptim_step_in_backward"  # the optimizer attribute its step() looks for


@dataclass(frozen=True)
class ClipPerParameter:
    """Clip each parameter's gradient by its own norm: ``clip_grad_norm_([p], max_norm, norm_type)``."""

    max_norm: float
    norm_type: float = 2.0


@dataclass(frozen=True)
class ClipPreviousNorm:
    """Scale iteration t's gradients by ``min(1, max_norm / (‖g_{t−1}‖ + 1e-6))``, with
    ‖g_{t−1}‖ the global ``norm_type`` norm of the previous iteration's gradients (unclipped,
    computed as ``torch.nn.utils.get_total_norm``); the first iteration is not clipped."""

    max_norm: float
    norm_type: float = 2.0


Clip = Union[ClipPerParameter, ClipPreviousNorm, None]


_SKIP_NONFINITE_REFUSED = (
    "skip_nonfinite=True cannot be honoured by step_in_backward: a group's step is skipped only when "
    "every gradient of the group is known, after backward, but its parameters are updated during "
    "backward. Construct the optimizer without skip_nonfinite, or use the ordinary loop."
)


def _group_takes_kernels(optimizer: Any, group: dict) -> bool:
    """Whether the ordinary step could run ``group`` on the kernels as far as its settings and
    parameters tell (the gradients, not known before backward, are checked per bucket)."""
    if not group_is_native(optimizer, group):
        return False
    trained = [p for p in group["params"] if p.requires_grad]
    if not all(p.device.type == "cpu" and p.layout == torch.strided and p.is_contiguous() for p in trained):
        return False
    return not shares_memory(trained, [])


def _clip_coefficient(clip: ClipPreviousNorm, norm: torch.Tensor) -> torch.Tensor:
    return torch.clamp(clip.max_norm / (norm + 1e-6), max=1.0)


class _Bucket:
    """Parameters of one group updated by one native call once all their gradients are in."""

    __slots__ = ("group", "params", "cache", "ready", "done")

    def __init__(self, group: dict, params: list[torch.Tensor]) -> None:
        self.group = group
        self.params = params  # one list object: the tensor cache keys its layouts by it
        self.cache = _core.TensorCache()
        self.ready = 0
        self.done = False


def _adam_family(optimizer: Any) -> bool:
    return getattr(optimizer, "KIND", None) == "adam"


class StepInBackward:
    """Context manager returned by :func:`step_in_backward` (see the module docstring).

    Args:
        optimizer: a Rust-backed oxoptim optimizer: the ``torch.optim`` twins (``SGD``, ``Adam``,
            ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adamax``, ``NAdam``, ``RAdam``, ``Adadelta``,
            ``ASGD``, ``Rprop``, ``Adafactor``), ``Lion``, the Schedule-Free optimizers,
            ``Adam8bit``, ``AdamW8bit`` and ``SGD8bit``.
        accumulate: micro-batches (backward passes) per ``optimizer.step()``; may be changed
            between iterations (a short last batch with fewer micro-batches).
        accumulation: ``"gradient"`` (exact, ``p.grad`` is the buffer) or ``"optimizer"``
            (Adam/AdamW: micro-batches absorbed into the moments, no buffer).
        clip: ``ClipPerParameter(max_norm)``, ``ClipPreviousNorm(max_norm)`` or None.
        bucket_numel: parameters of a group are gathered, in reverse order, into buckets of at
            least this many elements, each updated by one native call once all its gradients
            are in (0: one call per parameter).
        overlap: must be False: updates on a worker thread during backward are refused (module docstring).
        ddp: the ``DistributedDataParallel`` model: update each bucket after its allreduce (with
            ``accumulate=K``: the allreduce of the K-th backward through the model; the earlier ones under
            ``model.no_sync()`` or not, as in the ordinary loop).
        grad_scaler: pass the ``GradScaler`` in use so that an enabled one is refused here.
        release_rows: 2-D weights (a token embedding, an output head, the two tied) whose gradient
            is never formed whole: the model computes with ``oxoptim.rows.embedding`` /
            ``oxoptim.rows.linear``, and their rows are updated ``row_chunk`` at a time inside
            backward (:mod:`oxoptim.rows`).
        row_chunk: rows per native call of a released weight's output-layer gradient.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        accumulate: int = 1,
        accumulation: str = "gradient",
        clip: Clip = None,
        bucket_numel: int = 1 << 16,
        overlap: bool = False,
        ddp: Optional[torch.nn.Module] = None,
        grad_scaler: Any = None,
        release_rows: Any = (),
        row_chunk: int = 1024,
    ) -> None:
        if not callable(getattr(optimizer, "_step_part", None)):
            raise TypeError(
                "step_in_backward needs a Rust-backed oxoptim optimizer (the torch twins, Lion, the Schedule-Free "
                f"optimizers, Adam8bit, AdamW8bit, SGD8bit), got {type(optimizer).__name__}"
            )
        if not getattr(optimizer, "STEPS_IN_BACKWARD", True):
            raise TypeError(f"step_in_backward cannot step {type(optimizer).__name__}: its step needs every gradient before any update")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
        if accumulation not in ("gradient", "optimizer"):
            raise ValueError(f"accumulation must be 'gradient' or 'optimizer', got {accumulation!r}")
        if accumulation == "optimizer" and not _adam_family(optimizer):
            raise ValueError(f"accumulation='optimizer' is defined for Adam and AdamW, not {type(optimizer).__name__}")
        if accumulation == "optimizer" and any(g.get("amsgrad") for g in optimizer.param_groups):
            raise ValueError("accumulation='optimizer' is not defined with amsgrad=True")
        if accumulation == "optimizer" and any(g.get("state_dtype") is not None for g in optimizer.param_groups):
            raise ValueError("accumulation='optimizer' absorbs micro-batches into moments of the parameters' dtype; "
                             "state_dtype=torch.bfloat16 is not supported with it (use accumulation='gradient')")
        if clip is not None:
            if not isinstance(clip, (ClipPerParameter, ClipPreviousNorm)):
                raise TypeError(f"clip must be ClipPerParameter, ClipPreviousNorm or None, got {type(clip).__name__}")
            if not (clip.max_norm > 0 and math.isfinite(clip.max_norm)):
                raise ValueError(f"clip max_norm must be positive and finite, got {clip.max_norm!r}")
            if isinstance(clip, ClipPreviousNorm) and accumulation == "optimizer":
                raise ValueError("ClipPreviousNorm cannot be combined with accumulation='optimizer' (no whole-iteration gradient exists)")
        if any(g.get("skip_nonfinite") for g in optimizer.param_groups):
            raise ValueError(_SKIP_NONFINITE_REFUSED)
        if grad_scaler is not None and grad_scaler.is_enabled():
            raise ValueError(
                "a GradScaler cannot be honoured by step_in_backward: unscaling and its inf check need every "
                "gradient before any parameter is updated. Use bfloat16 autocast (no scaling) or the ordinary loop."
            )
        if overlap:
            raise ValueError(
                "step_in_backward(overlap=True) is refused: a Python worker thread running while backward goes on "
                "can crash the process inside torch (garbage collection of autograd state backward is changing); "
                "the updates run in backward's own thread"
            )
        if ddp is not None and not (isinstance(ddp, torch.nn.Module) and callable(getattr(ddp, "register_comm_hook", None))):
            raise TypeError(f"ddp= takes the DistributedDataParallel model (torch.nn.parallel.DistributedDataParallel), "
                            f"got {type(ddp).__name__}")
        if ddp is not None and accumulate > 1 and accumulation == "optimizer":
            raise ValueError("with ddp=, step_in_backward does not take accumulation='optimizer' "
                             "(the updates run in DDP's communication hook, once per reduced bucket)")
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 0:
            raise ValueError(f"bucket_numel must be a non-negative int, got {bucket_numel!r}")
        released = check_release(optimizer, release_rows, row_chunk, accumulate=accumulate, clip=clip, ddp=ddp)
        self._rows = [RowRelease(optimizer, w, row_chunk, self._begin_iteration, lambda: self._refused)
                      for w in released]
        self.optimizer = optimizer
        self.accumulate = accumulate
        self.accumulation = accumulation
        self.clip = clip
        self.bucket_numel = bucket_numel
        self.overlap = overlap
        self.ddp = ddp
        #: Global norm of the last finished iteration's gradients (with ``ClipPreviousNorm``).
        self.grad_norm: Optional[torch.Tensor] = None
        self._coef: Optional[torch.Tensor] = None
        self._order: dict[torch.Tensor, int] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[torch.Tensor, _Bucket] = {}
        self._arrivals: dict[torch.Tensor, int] = {}
        # Parameters handed over once per iteration with the summed gradient (CPUOffloadOptimizer's
        # CPU copies updated in step()), however many micro-batches the others count.
        self._arrives_once: set[torch.Tensor] = set()
        # Each gradient clipped in this iteration, and its version then (a weak reference: a new
        # gradient of the same parameter is clipped again).
        self._clipped: dict[torch.Tensor, tuple[Any, int]] = {}
        self._handles: list[Any] = []
        self._leftover_cache = _core.TensorCache()
        self._checked = False  # whether this iteration's first update passed the step's checks
        self._refused = False  # whether they refused it (nothing was written in this iteration)
        self._torch_groups: set[int] = set()  # ids of the groups the ordinary step hands to torch
        # Under DDP: backward passes through the model's outputs in this iteration, the autograd
        # graph task counted last, the parameters given a gradient by that backward (ids), and the
        # DDP buckets (indices) updated in this iteration.
        self._backwards = 0
        self._backward_task: Optional[int] = None
        self._used: set[int] = set()
        self._reduced: set[int] = set()
        self._lock = threading.Lock()
        # The futures of the bucket updates chained on DDP's allreduces in this iteration: they run
        # on gloo's threads and must be complete before the iteration is finished or dropped.
        self._ddp_updates: list[Any] = []
        self._entered = False

    # -- entry and exit ---------------------------------------------------
    def __enter__(self) -> "StepInBackward":
        if self._entered:
            raise RuntimeError("this step_in_backward context is already in use")
        if self.optimizer.__dict__.get(_ACTIVE) is not None:
            raise RuntimeError(f"{type(self.optimizer).__name__} already steps inside backward (nested step_in_backward)")
        self._build_buckets()
        opened: list[RowRelease] = []
        try:
            for rows in self._rows:
                rows.open()
                opened.append(rows)
        except RuntimeError:
            for rows in opened:
                rows.close()
            raise
        if self.ddp is not None:
            _DdpSlot.install(self.ddp).active = self
            self._watch_ddp()
        else:
            for bucket in self._buckets:
                for p in bucket.params:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self.optimizer.__dict__[_ACTIVE] = self
        self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Removes the hooks (the optimizer steps normally again)."""
        self._await_ddp_updates()  # an update still running on gloo's thread (backward raised) ends first
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.ddp is not None:
            _DdpSlot.install(self.ddp).active = None
        if self.optimizer.__dict__.get(_ACTIVE) is self:
            del self.optimizer.__dict__[_ACTIVE]
        try:
            for rows in self._rows:
                rows.drop()  # as zero_grad(): held rows get the head's gradient, the step count moves once
        finally:
            for rows in self._rows:
                rows.close()
            self._next_iteration()  # an iteration left unfinished (an error in backward) is dropped
        self._entered = False

    def _build_buckets(self) -> None:
        """Per group, in reverse order (roughly the order backward completes them): parameters
        that require grad, gathered until a bucket holds ``bucket_numel`` elements."""
        self._buckets, self._bucket_of, self._order = [], {}, {}
        index = 0
        # Under DDP, DDP's buckets decide when parameters are updated; ours only record it.
        limit = 0 if self.ddp is not None else self.bucket_numel
        released = {id(rows.weight) for rows in self._rows}
        for group in self.optimizer.param_groups:
            current: list[torch.Tensor] = []
            size = 0
            for p in group["params"]:
                if p in self._order:
                    raise ValueError(
                        "step_in_backward: a parameter appears twice in the optimizer's groups; torch's step updates "
                        "it twice, which one update per complete gradient inside backward cannot do"
                    )
                self._order[p] = index
                index += 1
            for p in reversed(group["params"]):
                if not p.requires_grad or id(p) in released:
                    continue  # frozen (never gets a gradient, as in the ordinary loop) or updated by its rows
                current.append(p)
                size += p.numel()
                if size >= limit:
                    self._add_bucket(group, current)
                    current, size = [], 0
            if current:
                self._add_bucket(group, current)

    def _add_bucket(self, group: dict, params: list[torch.Tensor]) -> None:
        bucket = _Bucket(group, params)
        self._buckets.append(bucket)
        for p in params:
            self._bucket_of[p] = bucket

    # -- checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next iteration depends on beyond the optimizer: the previous iteration's
        gradient norm (``ClipPreviousNorm``). Saved between iterations."""
        return {"grad_norm": None if self.grad_norm is None else self.grad_norm.clone()}

    def load_state_dict(self, state: dict) -> None:
        norm = state.get("grad_norm")
        self.grad_norm = None if norm is None else norm.clone()
        clip = self.clip
        if isinstance(clip, ClipPreviousNorm) and self.grad_norm is not None:
            self._coef = _clip_coefficient(clip, self.grad_norm)
        else:
            self._coef = None

    # -- during backward ----------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        with self._lock:  # backward may run hooks on several device threads
            arrived = self._arrivals.get(p, 0) + 1
            expected = self._expected(p)
            if arrived > expected:
                raise RuntimeError(
                    f"step_in_backward(accumulate={self.accumulate}): a parameter received more than "
                    f"{expected} gradient(s) before optimizer.step() (more backward passes than accumulate, "
                    "or a layer shared by two use_reentrant=True checkpoint blocks, which step_in_backward cannot take)"
                )
            self._arrivals[p] = arrived
            bucket = self._bucket_of[p]
            if arrived == expected:
                bucket.ready += 1
            complete = arrived == expected and bucket.ready == len(bucket.params)
        if arrived < expected:
            if self.accumulation == "optimizer":
                try:
                    self._absorb(p)
                except BaseException:
                    with self._lock:
                        self._arrivals[p] = arrived - 1  # not absorbed: counted again when retried
                    raise
            return  # gradient accumulation: p.grad is the buffer
        if complete:
            self._dispatch(bucket)

    def _expected(self, p: torch.Tensor) -> int:
        """The gradients ``p`` gets per iteration."""
        return 1 if p in self._arrives_once else self.accumulate

    def _group(self, bucket: _Bucket) -> dict:
        """The bucket's group as the optimizer holds it now: ``load_state_dict`` replaces the group
        dicts (keeping each ``params`` list), and the update must read the new ones (lr, rounding count)."""
        groups = self.optimizer.param_groups
        if not any(g is bucket.group for g in groups):
            bucket.group = next((g for g in groups if g["params"] is bucket.group["params"]), bucket.group)
        return bucket.group

    def _dispatch(self, bucket: _Bucket) -> None:
        self._group(bucket)
        self._update(bucket.group, bucket.params, bucket.cache)
        bucket.done = True  # not before: a refused update (nothing written) is retried by step()

    @torch.no_grad()
    def _update(self, group: dict, params: list[torch.Tensor], cache: Any, release: bool = True) -> None:
        """One native call for ``params`` (those with a gradient), then their gradients are released."""
        optimizer: Any = self.optimizer
        self._begin_iteration()
        self._clip(params)
        sub = optimizer._bucket_group(group, params)
        cache.begin_step()
        try:
            optimizer._step_part(sub, cache, native=id(group) not in self._torch_groups)
        finally:
            cache.finish_step()
        if release:
            for p in params:
                p.grad = None

    def _clip(self, params: list[torch.Tensor]) -> None:
        clip = self.clip
        if clip is None:
            return
        for p in params:
            g = p.grad
            if g is None or self._was_clipped(p, g):
                continue  # an update refused after clipping, retried: clipped once
            if isinstance(clip, ClipPerParameter):
                clip_grad_norm_([p], clip.max_norm, clip.norm_type)
            elif isinstance(clip, ClipPreviousNorm):
                # Parameters added to the optimizer after entry come last, in their order.
                at = self._order.setdefault(p, len(self._order))
                self._norms[at] = torch.linalg.vector_norm(g, clip.norm_type)
                if self._coef is not None:
                    g.mul_(self._coef)
            self._clipped[p] = (weakref.ref(g), g._version)

    def _was_clipped(self, p: torch.Tensor, g: torch.Tensor) -> bool:
        mark = self._clipped.get(p)
        return mark is not None and mark[0]() is g and mark[1] == g._version

    def _check_iteration(self) -> None:
        optimizer: Any = self.optimizer
        if any(g.get("skip_nonfinite") for g in optimizer.param_groups):
            raise ValueError("skip_nonfinite=True was set after step_in_backward was entered; " + _SKIP_NONFINITE_REFUSED)
        if self._rows:  # what entry checked, again: settings, state and accumulate/clip may have changed since
            check_release(optimizer, [rows.weight for rows in self._rows], self._rows[0].row_chunk,
                          accumulate=self.accumulate, clip=self.clip, ddp=self.ddp)
        optimizer._check_before_backward_steps()

    def _begin_iteration(self) -> None:
        """Before the iteration's first update: what the ordinary ``step()`` refuses before it writes
        anything (options set after entry, the optimizer's own checks), and which groups it would hand
        whole to torch (a parameter the kernels cannot take, parameters sharing memory)."""
        if self._checked:
            return
        try:
            self._check_iteration()
        except Exception:
            self._refused = True
            raise
        optimizer: Any = self.optimizer
        self._torch_groups = {id(g) for g in optimizer.param_groups if not _group_takes_kernels(optimizer, g)}
        self._checked = True

    @torch.no_grad()
    def _absorb(self, p: torch.Tensor) -> None:
        """Optimizer accumulation of one micro-batch (k < K) into Adam's moments; releases the gradient."""
        optimizer: Any = self.optimizer
        group = self._group(self._bucket_of[p])
        g = p.grad
        if g is None:
            return
        self._begin_iteration()
        self._clip([p])
        lists: list[list[Any]] = [[] for _ in range(optimizer._INIT_LISTS)]
        optimizer._init_group({**group, "params": [p]}, *lists)  # creates the state as the step would
        state = optimizer.state[p]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            g = -g
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if torch.is_complex(p):  # as torch's Adam: re² and im² apart (g·g of a complex g is re² − im² + …)
            g, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (g, exp_avg, exp_avg_sq))
        state["step"] += 1
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.grad = None

    @torch.no_grad()
    def _update_absorbed(self, group: dict, params: list[torch.Tensor]) -> None:
        """Parameters that absorbed fewer than K micro-batches in this iteration (module docstring):
        the parameter part of Adam's step, as torch's single-tensor Adam computes it, from the
        moments and step count their last micro-batch left."""
        self._check_absorbed(group)
        state = self.optimizer.state
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for p in params:
            entry = state[p]
            step = float(entry["step"])
            param, exp_avg, exp_avg_sq = p, entry["exp_avg"], entry["exp_avg_sq"]
            if torch.is_complex(p):
                param, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (p, exp_avg, exp_avg_sq))
            if weight_decay != 0 and group.get("decoupled_weight_decay"):
                param.mul_(1 - lr * weight_decay)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    @staticmethod
    def _check_absorbed(group: dict) -> None:
        """What :meth:`_update_absorbed` cannot do for ``group``, checked by ``finish`` before any update."""
        if any(group.get(k) for k in ("bf16_stochastic_round", "kahan_sum")):
            raise RuntimeError(
                "step_in_backward(accumulation='optimizer'): parameters that got fewer than accumulate= gradients "
                "in this iteration are updated by step() from their moments, which bf16_stochastic_round/kahan_sum "
                "groups cannot do: give every parameter a gradient in each micro-batch, or use accumulation='gradient'"
            )

    # -- finishing the iteration ---------------------------------------------
    def step(self, closure: Any = None) -> Any:
        """``optimizer.step(closure)``: finishes the iteration (LR schedulers and step hooks see a step)."""
        return self.optimizer.step(closure)

    def finish(self) -> None:
        """Called by ``optimizer.step()``: steps what backward left (incomplete buckets,
        gradients set by hand), then starts the next iteration's bookkeeping."""
        failed = self._await_ddp_updates()
        if failed is not None:
            self._next_iteration()
            raise RuntimeError(
                "step_in_backward(ddp=...): a DDP bucket's update failed in backward (its parameters were not "
                "updated, the other buckets' were, and the step count did not move); the iteration is dropped: "
                f"restore the last checkpoint to go on from a consistent state. The update's error: {failed}"
            ) from failed
        if self.optimizer.__dict__.get("grad_scale") is not None or self.optimizer.__dict__.get("found_inf") is not None:
            raise RuntimeError("a GradScaler cannot be honoured by step_in_backward (see its grad_scaler argument)")
        errors, refused = [], set()
        for rows in self._rows:  # raised once the iteration is finished, which goes on without that .grad
            try:
                rows.finish()
            except RuntimeError as e:
                errors.append(e)
                refused.add(id(rows.weight))
        absorbed_of: dict[int, list[torch.Tensor]] = {}
        if self.accumulation == "optimizer":  # refused before anything is updated (a later group's too)
            for group in self.optimizer.param_groups:
                absorbed = [p for p in group["params"] if 0 < self._arrivals.get(p, 0) < self._expected(p)]
                if absorbed:
                    self._check_absorbed(group)
                    absorbed_of[id(group)] = absorbed
        for group in self.optimizer.param_groups:
            left = [
                p
                for p in group["params"]
                if p.grad is not None and not (p in self._bucket_of and self._bucket_of[p].done)
                and id(p) not in refused
            ]
            if left:
                self._update(group, left, self._leftover_cache)
            if id(group) in absorbed_of:
                self._update_absorbed(group, absorbed_of[id(group)])
        if self.ddp is not None:
            self._release_done()  # in case backward's callback did not run (no bucket launched)
        for group in self.optimizer.param_groups:  # each bucket stepped a copy of its group
            self.optimizer._advance_group(group)  # type: ignore[attr-defined]
        if isinstance(self.clip, ClipPreviousNorm):
            self._finish_norm(self.clip)
        self._next_iteration()
        if errors:
            raise errors[0]

    def drop_iteration(self) -> None:
        """``optimizer.zero_grad()`` before ``step()``: the unfinished iteration is dropped (what its
        backward updated stays updated) and the next backward starts a new one. Released rows
        (``release_rows``) whose backward began are dropped too: rows that waited for the
        embedding's gradient get the head's alone (:meth:`oxoptim.rows.RowRelease.drop`)."""
        failed = self._await_ddp_updates()
        errors = [] if failed is None else [failed]
        for rows in self._rows:  # each is reset even when another's held rows fail to update
            try:
                rows.drop()
            except Exception as e:  # noqa: BLE001 - raised below, once every weight is reset
                errors.append(e)
        if failed is not None or self._arrivals or self._checked or self._refused or self._backwards:
            self._next_iteration()
        if errors:
            raise errors[0]

    def _next_iteration(self) -> None:
        self._checked = self._refused = False
        self._backwards, self._backward_task = 0, None
        self._used.clear()
        self._reduced.clear()
        for bucket in self._buckets:
            bucket.ready = 0
            bucket.done = False
        self._arrivals.clear()
        self._norms.clear()
        self._clipped.clear()

    def _await_ddp_updates(self) -> Optional[BaseException]:
        """Waits for the bucket updates chained on DDP's allreduces (DDP itself waits for them at the
        end of a backward that completes; one that raised midway leaves them running on gloo's
        threads). Returns the first update's error, if any failed."""
        with self._lock:
            updates, self._ddp_updates = self._ddp_updates, []
        failed: Optional[BaseException] = None
        for update in updates:
            try:
                update.wait()
            except Exception as e:  # noqa: BLE001 - reported by the caller
                failed = failed or e
        return failed

    def _release_done(self) -> None:
        for p, bucket in self._bucket_of.items():
            if bucket.done:
                p.grad = None

    def _finish_norm(self, clip: ClipPreviousNorm) -> None:
        norms = [self._norms[i] for i in sorted(self._norms)]
        self._norms.clear()
        if not norms:
            return
        total = torch.linalg.vector_norm(torch.stack(norms), clip.norm_type)
        self.grad_norm = total
        self._coef = _clip_coefficient(clip, total)

    # -- DDP ------------------------------------------------------------------
    def _watch_ddp(self) -> None:
        """Counts backward passes through the DDP model's outputs (a forward that is never
        backpropagated counts nothing) and records which parameters each one gives a gradient."""
        ddp: Any = self.ddp
        self._handles.append(ddp.register_forward_hook(self._watch_outputs))
        for p in ddp.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._mark_used))

    def _watch_outputs(self, module: Any, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        from torch.nn.parallel.distributed import _find_tensors

        for t in _find_tensors(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._backward_through_output)

    def _backward_through_output(self, grad: torch.Tensor) -> None:
        """Runs when backward reaches an output of the DDP model, before any of its parameters'
        gradients: the first time in a graph task, a backward pass of this iteration begins.
        (The model's outputs belong to the backward's own graph task, also when the model
        checkpoints with ``use_reentrant=True``, whose recomputations run in nested tasks.)"""
        task = torch._C._current_graph_task_id()
        with self._lock:
            if task == self._backward_task:
                return  # another output (another forward) of the same backward
            self._backward_task = task
            self._backwards += 1
            self._used.clear()
            count = self._backwards
        if count > self.accumulate:
            raise RuntimeError(
                f"step_in_backward(accumulate={self.accumulate}, ddp=...): backward pass {count} through the "
                f"model before optimizer.step(); the update ran in backward pass {self.accumulate}. Call "
                "optimizer.step() after every accumulate= backward passes (change accumulate between iterations "
                "for a short one)"
            )

    def _mark_used(self, p: torch.Tensor) -> None:
        self._used.add(id(p))

    def _ddp_bucket_launched(self, bucket: Any) -> Optional[set[int]]:
        """Called as DDP launches a bucket's allreduce (in backward's thread). In the iteration's
        K-th backward pass returns the ids of the bucket's parameters to update once it is reduced:
        those this optimizer steps that this backward gave a gradient. A parameter this rank did not
        use is left to ``optimizer.step()``, which steps it with what DDP leaves in ``p.grad`` exactly
        as the ordinary loop does: the reduced gradient if another rank used it, and None (no step)
        if no rank did (``find_unused_parameters=True``). Returns None in other backward passes.
        A bucket is updated at most once per iteration: a second update raises."""
        with self._lock:
            if self._backwards != self.accumulate:
                return None
            index = bucket.index()
            params = bucket.parameters()
            if index in self._reduced or any(p in self._bucket_of and self._bucket_of[p].done for p in params):
                raise RuntimeError(
                    f"step_in_backward(accumulate={self.accumulate}, ddp=...): DDP reduced bucket {index} a second "
                    "time in the iteration's last backward pass, after its parameters were updated; a parameter is "
                    "never updated twice per optimizer.step() (a backward that did not pass through the model's "
                    "outputs, or more backward passes than accumulate=?)"
                )
            self._reduced.add(index)
            chosen = set()
            for p in params:
                if p in self._bucket_of and id(p) in self._used:
                    self._bucket_of[p].done = True
                    chosen.add(id(p))
            return chosen

    def _ddp_bucket_reduced(self, chosen: set[int], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Updates the ``chosen`` parameters of one DDP bucket with their allreduced (averaged)
        gradients (the earlier micro-batches may have run under ``no_sync()``, or been reduced and
        left in ``p.grad`` to sum with the next, as the ordinary DDP loop does)."""
        by_group: dict[int, list[torch.Tensor]] = {}
        local: list[tuple[torch.Tensor, Any]] = []
        for p, g in zip(params, grads):
            if id(p) not in chosen:
                continue  # not this optimizer's, frozen, or not used by this rank in this backward
            # The reducer copies the bucket back into the local gradient after this hook and
            # asserts they are not aliases: lend the reduced view for the update only.
            local.append((p, p.grad))
            p.grad = g
            by_group.setdefault(id(self._group(self._bucket_of[p])), []).append(p)
        try:
            for group in self.optimizer.param_groups:
                params_of_group = by_group.get(id(group))
                if params_of_group:
                    self._update(group, params_of_group, _core.TensorCache(), release=False)
        finally:
            for p, grad in local:
                p.grad = grad


class _DdpSlot:
    """The one communication hook DDP allows per model: allreduce (mean), then the active
    context's update of the bucket; a plain allreduce while no context is active."""

    def __init__(self) -> None:
        self.active: Optional[StepInBackward] = None

    @classmethod
    def install(cls, ddp: torch.nn.Module) -> "_DdpSlot":
        slot = ddp.__dict__.get("_oxoptim_ddp_slot")
        if slot is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            slot = cls()

            def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations that are not its own
                future = allreduce_hook(state, bucket)
                context = slot.active
                if context is None:
                    return future
                chosen = context._ddp_bucket_launched(bucket)
                if not chosen:
                    return future  # not the iteration's last backward pass, or nothing to update here

                def then(done: Any) -> Any:
                    buffer = done.value()
                    context._ddp_bucket_reduced(chosen, bucket.parameters(), bucket.gradients())
                    return buffer

                _release_after_backward(ddp, context)  # queued from backward's thread, after DDP's own
                update = future.then(then)
                with context._lock:
                    context._ddp_updates.append(update)
                return update

            try:
                ddp.register_comm_hook(ddp.process_group, hook)  # type: ignore[operator]
            except RuntimeError as e:
                raise RuntimeError(f"step_in_backward(ddp=...) needs DDP's communication hook, and one is already registered: {e}") from e
            ddp.__dict__["_oxoptim_ddp_slot"] = slot
        return slot


def _release_after_backward(ddp: torch.nn.Module, context: StepInBackward) -> None:
    """Once per backward, after DDP has copied the reduced buckets back: drop the gradients.

    DDP queues its finalising callback once the last bucket is launched, after this is
    called; so the callback queued here queues the release behind DDP's."""
    if ddp.__dict__.get("_oxoptim_release_queued"):
        return
    ddp.__dict__["_oxoptim_release_queued"] = True
    engine = torch.autograd.Variable._execution_engine

    def release() -> None:
        ddp.__dict__["_oxoptim_release_queued"] = False
        context._release_done()

    engine.queue_callback(lambda: engine.queue_callback(release))


def step_in_backward(optimizer: torch.optim.Optimizer, **options: Any) -> StepInBackward:
    """Runs ``optimizer``'s update inside backward, parameter by parameter: see
    :class:`StepInBackward` for the options and :mod:`oxoptim.backward` for the maths."""
    return StepInBackward(optimizer, **options)
