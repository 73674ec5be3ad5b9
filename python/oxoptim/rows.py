"""Row release: a large 2-D weight updated row block by row block inside backward.

``step_in_backward`` updates a parameter when its gradient is complete and
frees it, so the gradients never all exist together; but the largest one must
still exist whole. In a language model that is the token embedding (in GPT-2
small, 50257×768: 31% of all gradients), and when the output head is tied to
it, its gradient is complete only at the very end of backward. Row release
removes it too. The model computes the embedding and the output layer with
this module's functions, drop-in for ``F.embedding(ids, weight)`` and
``F.linear(x, weight)`` (or, for the output layer and its loss together,
``linear_cross_entropy``)::

    h = oxoptim.rows.embedding(ids, model.tok.weight)
    ...
    logits = oxoptim.rows.linear(h, model.tok.weight)       # tied head
    # or the head and the loss without the logits:
    loss = oxoptim.rows.linear_cross_entropy(h, model.tok.weight, targets)

    with oxoptim.step_in_backward(opt, release_rows=[model.tok.weight]):
        ...

Outside such a context (or under ``torch.no_grad()``) ``embedding`` and
``linear`` are the plain torch functions (``linear_cross_entropy``: below).
Inside it, the weight never gets a ``.grad``:

* the output layer's backward computes the input gradient first (with the
  weights before the update, as autograd's), then the weight's gradient
  ``row_chunk`` rows at a time (``grad[:, rows].T @ x``: the sums autograd
  forms as ``(x.T @ grad).T``), and updates those rows at once, one native
  call per chunk;
* rows the embedding looked up in this iteration (at most one per token) also
  get the embedding's gradient, which exists only at the end of backward:
  their head gradient is kept (a few rows) and they are updated when the
  embedding's backward arrives, with the sum the ordinary loop forms;
* an embedding without a head (an untied one) updates its looked-up rows
  with their gradient and every other row with a zero gradient, a chunk at a
  time, as the ordinary loop's dense gradient does.

Each row is updated once per iteration with its whole gradient (a second
backward through the output layer or the embedding in one iteration, as with
``retain_graph``, raises), and the optimizers allowed here are elementwise (an
element's update reads only its own gradient and state and the per-parameter
step count, which advances once per iteration), so the weight and its state
are those of the ordinary loop given the same gradient (the tests check this
bit for bit, optimizer by optimizer, float32/float64, bfloat16 weights with
stochastic rounding, Kahan summation, bfloat16 and 8-bit state). The gradient
itself may differ from autograd's in the last bits: a BLAS may sum a slice of
a product in another order than the whole product (MKL here does for slices
of 9 rows or fewer, and at any slice size for some widths, 7 features among
them).

What the weight's gradient costs instead: ``row_chunk`` rows at a time, plus the head gradient of the rows the
embedding looked up (one row per distinct token; with 8-bit state on rows
that split blocks, every row of each unit that holds one, up to a unit of
rows per distinct token: 2 rows of 384, but 256 rows of 7), so the saving
needs batches with far fewer distinct tokens (units) than the vocabulary, as
fine-tuning on a CPU has. With ``linear`` the logits and their gradient
(tokens × vocabulary) are there as in the ordinary loop; ``linear_cross_entropy``
(the output layer and the loss in one, ``F.cross_entropy(F.linear(x, weight), target)``)
leaves them out too: its forward keeps each token's log-sum-exp, and its backward
forms the logits again ``row_chunk`` classes at a time, each chunk giving its
share of the input gradient (with the rows before their update) and its rows'
gradient, which updates them::

    loss = oxoptim.rows.linear_cross_entropy(h, model.head.weight, targets)

Outside a context it is the same chunked computation, with an ordinary gradient
(its ``chunk_rows``, 1024 by default, in place of ``row_chunk``: with equal
chunks the ordinary loop and row release give the same bits). Its loss and
gradients equal torch's to rounding, not bit for bit: the log-sum-exp is summed
chunk by chunk (in float64, as are the softmax and the input gradient's sum over
chunks), and for half-precision weights the logits and products are float32
(torch rounds the logits to the weights' dtype).

SGD with momentum makes its buffer on the first step as the ordinary step
does: from a zero buffer with dampening 0, else with torch's own step on each
piece (elementwise: the same bits for float32/float64 weights; refused for
half-precision weights, whose pieces torch would round apart at their tails,
and under the low-precision options, whose ordinary first step with dampening
is refused too).

8-bit state is kept in blocks of 256 elements, each dequantised, updated and
quantised whole. Rows that split blocks (a width that is not a multiple of
256) are therefore updated in units: the fewest rows that end on a block
boundary (``256 / gcd(width, 256)``: 2 rows of 384, 64 rows of 300).
``row_chunk`` is rounded up to whole units, and the rows that wait for the
embedding's gradient are the units that hold a looked-up row (their other
rows' embedding gradient is zero, as in the dense gradient).

Refused with a clear error: optimizers whose state is not elementwise
(Adafactor's factored moments, Prodigy's d), SGD's first momentum buffer with
dampening for half-precision weights or under a low-precision option,
``accumulate > 1``, clipping, DDP, autocast around ``linear``, and
``create_graph`` through an update. A graph built in an earlier iteration
cannot update rows (``optimizer.zero_grad()`` before ``step()`` drops the
iteration as ``step_in_backward`` does: rows held for the embedding's gradient
are updated with the head's alone, as ``step()`` would; see
:meth:`RowRelease.drop`); one backpropagated after the context closed gives the
weight an ordinary gradient, as do ``torch.autograd.grad`` calls that leave
the weight out (they update nothing). A released weight that also gets a
``.grad`` from another operation makes ``optimizer.step()`` raise, after its
rows were updated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.optim.sgd import sgd as torch_sgd

from . import _blockwise as bw
from . import _core
from ._cross_entropy import ChunkedCrossEntropy
from ._lowprec import KAHAN_COMP
from ._native import group_is_native, num_threads

__all__ = ["embedding", "linear", "linear_cross_entropy"]

# Kinds whose update is elementwise over parameter-shaped state (or, for the 8-bit optimizers,
# over blocks of 256 elements: rows are then updated in units that cover whole blocks).
_ELEMENTWISE = frozenset({"sgd", "adam", "rmsprop", "adagrad", "adamax", "nadam", "radam", "adadelta", "asgd",
                          "rprop", "lion", "adamw_schedulefree", "sgd_schedulefree", "adam8bit", "sgd8bit"})
_EIGHT_BIT = frozenset({"adam8bit", "sgd8bit"})
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ACTIVE: dict[int, "RowRelease"] = {}  # id(weight) -> its release, while a step_in_backward context is open


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` (no ``padding_idx``, ``max_norm`` or ``scale_grad_by_freq``);
    inside ``step_in_backward(release_rows=[weight])`` the looked-up rows are updated when their
    gradient is complete (module docstring)."""
    rows = _released(weight)
    if rows is None:
        return F.embedding(ids, weight)
    return _Embedding.apply(ids, weight, rows)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias); inside ``step_in_backward(release_rows=[weight])`` the
    weight's gradient is formed and applied ``row_chunk`` rows at a time (module docstring)."""
    rows = _released(weight)
    if rows is None:
        return F.linear(x, weight)
    if torch.is_autocast_enabled(weight.device.type):
        raise RuntimeError("oxoptim.rows.linear on a released weight does not run under autocast (its backward "
                           "forms the weight's gradient in the weight's dtype); cast the model instead")
    return _Linear.apply(x, weight, rows)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight).flatten(0, -2), target.flatten(), ignore_index=...,
    reduction=...)`` for a ``target`` of ``x``'s shape less its last dimension (``none`` returns that
    shape), without the logits: they are formed ``chunk_rows`` classes at a time, in forward and
    again in backward, so a language model's tokens × vocabulary logits and their gradient never
    exist whole. CPU tensors; under autocast it runs in the weight's dtype (as autocast runs
    ``cross_entropy`` in float32), except on a released weight, where autocast is refused.
    Equal to torch's to rounding (the log-sum-exp is summed chunk by chunk; float32 logits for
    half-precision weights). Inside ``step_in_backward(release_rows=[weight])`` the weight's rows
    are also updated chunk by chunk (module docstring), with the context's ``row_chunk`` in place of
    ``chunk_rows``; with ``chunk_rows`` equal to it, the ordinary loop with this function gives the
    same bits."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    devices = {t.device.type for t in (x, weight, target)}
    if devices != {"cpu"}:
        raise RuntimeError(f"oxoptim.rows.linear_cross_entropy runs on CPU tensors, got {sorted(devices)}")
    rows = _released(weight)
    if rows is not None:
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("oxoptim.rows.linear_cross_entropy on a released weight does not run under autocast "
                               "(its backward forms the weight's gradient in the weight's dtype); cast the model "
                               "instead")
        chunk_rows = rows.chunk_rows()
    elif torch.is_autocast_enabled("cpu"):
        x = x.to(weight.dtype)  # runs in the weight's dtype, as autocast runs cross_entropy in float32
    ce = ChunkedCrossEntropy(x, weight, target, ignore_index, reduction, chunk_rows)
    return _LinearCrossEntropy.apply(x, weight, ce, rows)


def _released(weight: torch.Tensor) -> Optional["RowRelease"]:
    rows = _ACTIVE.get(id(weight))
    if rows is None or rows.weight is not weight or not (torch.is_grad_enabled() and weight.requires_grad):
        return None
    return rows


def _accumulates(ctx: Any) -> Optional[bool]:
    """Whether this backward pass accumulates into the weight (input 1): True for ``backward()``,
    False for ``backward(inputs=...)`` that leaves it out, None for ``torch.autograd.grad``
    (which accumulates nothing: it may return the weight's gradient)."""
    node = ctx.next_functions[1][0]
    if not ctx.needs_input_grad[1] or node is None:
        return False
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # private: torch.utils.checkpoint's
    if will_execute is None:
        raise RuntimeError("release_rows needs torch._C._will_engine_execute_node, which this torch lacks")
    try:
        return bool(will_execute(node))
    except RuntimeError:  # torch refuses the question for a leaf under autograd.grad
        return None


def _stepping(ctx: Any) -> bool:
    """Whether a backward of ``ctx``'s graph updates rows (else the weight's gradient is ordinary)."""
    rows: RowRelease = ctx.rows
    if not _accumulates(ctx):
        return False
    if _ACTIVE.get(id(rows.weight)) is not rows:
        return False  # the context was closed: the weight is an ordinary parameter again
    if ctx.iteration != rows.iteration:
        raise RuntimeError("release_rows: this graph was built before the last optimizer.step(); backward it "
                           "in the iteration that built it")
    if torch.is_grad_enabled():
        raise RuntimeError("release_rows cannot differentiate a backward that updates the weight "
                           "(create_graph=True)")
    return True


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, rows: "RowRelease") -> torch.Tensor:
        out = F.embedding(ids, weight)
        rows.record_embedding(ids)
        ctx.rows, ctx.iteration, ctx.num_rows = rows, rows.iteration, weight.shape[0]
        ctx.save_for_backward(ids)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (ids,) = ctx.saved_tensors
        if not _stepping(ctx):
            wanted = _accumulates(ctx) is not False
            ordinary = torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_rows, -1, False) if wanted else None
            return None, ordinary, None
        ctx.rows.embedding_backward(ids, grad)
        return None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, rows: "RowRelease") -> torch.Tensor:
        rows.record_linear()
        ctx.rows, ctx.iteration = rows, rows.iteration
        ctx.save_for_backward(x)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        w = ctx.rows.weight
        if not _stepping(ctx):
            dx = grad.matmul(w) if ctx.needs_input_grad[0] else None
            gw = None
            if _accumulates(ctx) is not False:
                gw = weight_gradient_rows(x.reshape(-1, w.shape[1]), grad.reshape(-1, w.shape[0]), 0, w.shape[0])
            return dx, gw, None
        return ctx.rows.linear_backward(x, grad, ctx.needs_input_grad[0]), None, None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, ce: ChunkedCrossEntropy,
                rows: Optional["RowRelease"]) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            loss = ce.forward(weight)
        if rows is not None:
            rows.record_linear()
            ctx.iteration = rows.iteration
        ctx.rows, ctx.ce = rows, ce
        # Versions checked in backward: an in-place change of the input, weight or targets raises.
        ctx.save_for_backward(x, weight, ce.target)
        ce.detach()
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, target = ctx.saved_tensors
        ce: ChunkedCrossEntropy = ctx.ce
        ce.attach(x, target)
        try:
            with torch.autocast("cpu", enabled=False):
                if ctx.rows is not None and _stepping(ctx):
                    dx = ctx.rows.cross_entropy_backward(ce, grad, ctx.needs_input_grad[0])
                    return _input_shaped(dx, ctx), None, None, None
                return _ordinary_cross_entropy_backward(ctx, grad, weight)
        finally:
            ce.detach()


@torch.autograd.function.once_differentiable
def _ordinary_cross_entropy_backward(ctx: Any, grad: torch.Tensor, weight: torch.Tensor) -> Any:
    want_weight = ctx.needs_input_grad[1] if ctx.rows is None else _accumulates(ctx) is not False
    dx, dw = ctx.ce.backward(weight, grad, ctx.needs_input_grad[0], want_weight)
    return _input_shaped(dx, ctx), dw, None, None


def _input_shaped(dx: Optional[torch.Tensor], ctx: Any) -> Optional[torch.Tensor]:
    return None if dx is None else dx.reshape(*ctx.ce.shape, ctx.ce.x2.shape[1])


def check_release(optimizer: Any, weights: Any, row_chunk: int, *, accumulate: int, clip: Any, ddp: Any) -> list:
    """The weights of ``step_in_backward(release_rows=...)``, validated before anything is installed."""
    weights = list(weights)
    if not weights:
        return []
    if isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1:
        raise ValueError(f"row_chunk must be a positive int, got {row_chunk!r}")
    kind = getattr(optimizer, "KIND", None)
    if kind not in _ELEMENTWISE:
        raise ValueError(f"release_rows needs an optimizer whose update is elementwise over its state; "
                         f"{type(optimizer).__name__} is not (Adafactor's factored moments, Prodigy's d are not)")
    if accumulate != 1 or clip is not None or ddp is not None:
        raise ValueError("release_rows cannot be combined with accumulate > 1, clip or ddp: each needs the "
                         "weight's whole gradient")
    for w in weights:
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"release_rows takes parameters (tensors), got {type(w).__name__}")
        if sum(1 for v in weights if v is w) > 1:
            raise ValueError("release_rows lists a weight twice")
        group = _group_of(optimizer, w)
        if group is None:
            raise ValueError(f"release_rows: a weight of shape {tuple(w.shape)} is not a parameter of this optimizer")
        if w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu" or w.dtype not in _DTYPES or not w.requires_grad:
            raise ValueError(f"release_rows takes contiguous 2-D floating-point CPU parameters that require grad, got "
                             f"shape {tuple(w.shape)}, {w.dtype} on {w.device}")
        if _first_momentum_by_torch(optimizer, group, w):
            _check_torch_momentum(group, w)
        if kind in _EIGHT_BIT:  # what the ordinary step refuses for this weight (dtype, state)
            index = next(i for i, p in enumerate(group["params"]) if p is w)
            optimizer._check_param(group, index, w, optimizer.state.get(w) or None)
        if kind == "sgd8bit" and not _eight_bit_state(optimizer, group, w):
            raise _sgd8bit_refused(group, w)
        if kind not in _EIGHT_BIT and not group_is_native(optimizer, group):
            raise ValueError("release_rows: the weight's group must take the native path (no differentiable, "
                             "capturable or tensor hyper-parameters, no AMP grad scaling)")
    return weights


@dataclass
class _Kernel:
    """One native call's description for pieces (row ranges) of one weight."""

    kind: str
    hyper: dict
    arrays: list  # (state key, elements per entry: 1, or bw.BLOCK for a block's absmax)
    scalars: list  # per-parameter scalar state keys
    options: dict = field(default_factory=dict)  # call-wide (stochastic rounding, bfloat16 state)
    stream: Optional[int] = None  # the weight's random stream (stochastic rounding)
    compensation: bool = False  # Kahan summation: the weight's compensation buffer, sliced too


def _eight_bit_state(optimizer: Any, group: dict, w: torch.Tensor) -> bool:
    """Whether the 8-bit optimizer keeps (or its first step makes) 8-bit state for ``w``."""
    entry = optimizer.state.get(w)
    return bw.is_8bit(entry) if entry else w.numel() >= group["min_8bit_size"]


def _sgd8bit_refused(group: dict, w: torch.Tensor) -> ValueError:
    return ValueError(f"release_rows takes SGD8bit weights with 8-bit state only (at least min_8bit_size = "
                      f"{group['min_8bit_size']} elements, or loaded 8-bit state): this one has {w.numel()} elements "
                      f"and float state, whose steps count in Python")


def _kernel(optimizer: Any, group: dict, w: torch.Tensor) -> _Kernel:
    """The weight's native call, its state made first as the ordinary step would make it."""
    if optimizer.KIND in _EIGHT_BIT:
        if optimizer.KIND == "sgd8bit" and not _eight_bit_state(optimizer, group, w):
            raise _sgd8bit_refused(group, w)  # before any state is made or row written
        if not optimizer.state.get(w):
            optimizer.state[w] = optimizer._fresh_state(w, group["min_8bit_size"])
        rounding = dict(optimizer._rounding(group, [w]))
        stream = rounding.pop("stream_ids", [None])[0]
        hyper = optimizer._hyper(group)
        if bw.is_8bit(optimizer.state[w]):
            codes = [(m, 1) for m in optimizer.MOMENTS] + [(f"{m}_absmax", bw.BLOCK) for m in optimizer.MOMENTS]
            return _Kernel(optimizer.KIND, hyper, codes, ["step"], rounding, stream)
        hyper = {**hyper, "amsgrad": False, "maximize": False}
        return _Kernel("adam", hyper, [("exp_avg", 1), ("exp_avg_sq", 1)], ["step"], rounding, stream)
    hyper = optimizer._hyper(group)
    arrays, scalars = _core.layout(optimizer.KIND, hyper)
    if optimizer.KIND == "sgd" and "momentum_buffer" in arrays and optimizer.state[w].get("momentum_buffer") is None:
        # As oxoptim.SGD's first step: from a zero buffer (dampening 0), or the rows of torch's.
        optimizer.state[w]["momentum_buffer"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
    entry = optimizer.state.get(w, {})
    if any(key not in entry for key in (*arrays, *scalars)):
        w.grad = torch.zeros((), dtype=w.dtype).expand_as(w)  # what _init_group reads, without the memory
        try:
            lists: list[list[Any]] = [[] for _ in range(optimizer._INIT_LISTS)]
            optimizer._init_group({**group, "params": [w]}, *lists)
        finally:
            w.grad = None
        entry = optimizer.state.get(w, {})
        missing = [key for key in (*arrays, *scalars) if key not in entry]
        if missing:
            raise RuntimeError(f"release_rows: {type(optimizer).__name__} creates {missing} on its first step")
    options = dict(optimizer._native_options(group, [w]))  # bfloat16 and Kahan state made here too
    stream = options.pop("stream_ids", [None])[0]
    compensation = options.pop("compensation", None) is not None
    return _Kernel(optimizer.KIND, hyper, [(key, 1) for key in arrays], list(scalars), options, stream, compensation)


def _first_momentum_by_torch(optimizer: Any, group: dict, w: torch.Tensor) -> bool:
    """Whether SGD's next step of ``w`` makes its momentum buffer with dampening: torch's step makes
    it (the gradient itself, undamped), as the ordinary step leaves it to torch (``oxoptim.SGD``). With
    dampening 0 the kernel's step from a zero buffer gives the same numbers."""
    return (optimizer.KIND == "sgd" and group["momentum"] != 0 and group["dampening"] != 0
            and optimizer.state.get(w, {}).get("momentum_buffer") is None)


def _check_torch_momentum(group: dict, w: torch.Tensor) -> None:
    """Refuses the first momentum step with dampening that the ordinary step does not make with
    torch's for-loop: for half-precision weights and under the low-precision options it runs on the
    kernels, undamped from a zero buffer in float32 (as torch's fused step), which the row pieces
    do not do (they step with the group's dampening)."""
    options = [k for k in ("bf16_stochastic_round", "kahan_sum") if group.get(k)]
    if group.get("state_dtype") not in (None, torch.float32):
        options.append("state_dtype")
    if options:
        raise ValueError(f"release_rows cannot make SGD's first momentum buffer with dampening under {options[0]}; "
                         "set dampening=0")
    if w.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"release_rows cannot make SGD's first momentum buffer with dampening for {w.dtype} weights "
                         "(the ordinary step makes it undamped in float32, as torch's fused step; the row pieces do "
                         "not); set dampening=0, or let one ordinary "
                         "step make the buffer before entering")


def _sgd_first_momentum(weight: torch.Tensor, group: dict, buffer: torch.Tensor, pieces: list) -> None:
    """Steps ``pieces`` (``(first row, end row, gradient rows)``) of a weight whose momentum buffer
    this iteration makes, with torch's own SGD as the ordinary step does (elementwise: each piece
    gets the bits of the whole), and keeps each piece's new buffer in ``buffer``'s rows."""
    made: list[Optional[torch.Tensor]] = [None] * len(pieces)
    torch_sgd(
        [weight.detach()[a:b] for a, b, _ in pieces], [g for _, _, g in pieces], made,
        weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
        nesterov=group["nesterov"], maximize=group["maximize"], foreach=group.get("foreach"), fused=group.get("fused"))
    for (a, b, _), rows in zip(pieces, made):
        assert rows is not None
        buffer[a:b].copy_(rows)


def _group_of(optimizer: Any, weight: torch.Tensor) -> Optional[dict]:
    return next((g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None)


class RowRelease:
    """One weight's row-by-row update within one ``step_in_backward`` context."""

    def __init__(self, optimizer: Any, weight: torch.Tensor, row_chunk: int,
                 begin_iteration: Callable[[], None], refused: Callable[[], bool]) -> None:
        self.optimizer = optimizer
        self.weight = weight
        self.row_chunk = row_chunk
        self._begin_iteration = begin_iteration  # the context's checks before an iteration's first write
        self._refused = refused  # whether they refused this iteration (nothing was written)
        self._reset()

    def open(self) -> None:
        if id(self.weight) in _ACTIVE:
            raise RuntimeError("this weight's rows are already released by another step_in_backward context")
        _ACTIVE[id(self.weight)] = self

    def close(self) -> None:
        if _ACTIVE.get(id(self.weight)) is self:
            del _ACTIVE[id(self.weight)]
        self._reset()

    def _reset(self) -> None:
        # A graph built before this reset (an earlier iteration) cannot update rows.
        self.iteration = getattr(self, "iteration", -1) + 1
        self._linear_forward = False
        self._looked_up: Optional[torch.Tensor] = None  # sorted unique rows the embedding read
        self._held: Optional[torch.Tensor] = None  # rows whose update waits for the embedding's gradient
        self._head_rows: Optional[torch.Tensor] = None  # the head's gradient of the held rows
        self._backwards: set[str] = set()
        self._scalar_keys: tuple = ()
        self._cells: Optional[list] = None  # scalar state as the iteration started
        self._advanced: Optional[list] = None  # scalar state after one update of this iteration
        self._torch_momentum = False  # this iteration makes SGD's momentum buffer with torch's step

    def _unit(self) -> int:
        """Rows updated together: 1, or for 8-bit state on rows that split its blocks, the fewest rows
        that end on a block boundary (a block is dequantised, updated and quantised whole)."""
        w, optimizer = self.weight, self.optimizer
        if optimizer.KIND not in _EIGHT_BIT or w.shape[1] % bw.BLOCK == 0:
            return 1
        entry = optimizer.state.get(w)
        group = _group_of(optimizer, w)
        eight_bit = bw.is_8bit(entry) if entry else (group is not None and w.numel() >= group["min_8bit_size"])
        return bw.BLOCK // math.gcd(w.shape[1], bw.BLOCK) if eight_bit else 1

    def _chunk_rows(self, unit: int) -> int:
        return -(-self.row_chunk // unit) * unit  # row_chunk rounded up to whole units

    def chunk_rows(self) -> int:
        """Rows of the output layer's backward per chunk (and per update)."""
        return self._chunk_rows(self._unit())

    def _held_rows(self, unit: int) -> Optional[torch.Tensor]:
        """The looked-up rows, widened to the whole units that hold them (sorted)."""
        looked_up = self._looked_up
        if looked_up is None or unit == 1:
            return looked_up
        starts = torch.unique(looked_up // unit) * unit
        rows = (starts[:, None] + torch.arange(unit)).reshape(-1)
        return rows[rows < self.weight.shape[0]]

    # -- forward --------------------------------------------------------------
    def record_linear(self) -> None:
        self._linear_forward = True

    def record_embedding(self, ids: torch.Tensor) -> None:
        """Rows looked up by any forward of this iteration wait for their embedding gradient; a row
        whose embedding backward never comes (a forward without backward) gets the head's alone."""
        seen = ids.reshape(-1) if self._looked_up is None else torch.cat([self._looked_up, ids.reshape(-1)])
        self._looked_up = torch.unique(seen)  # sorted

    # -- backward -------------------------------------------------------------
    @torch.no_grad()
    def linear_backward(self, x: torch.Tensor, grad: torch.Tensor, needs_x: bool) -> Optional[torch.Tensor]:
        w = self.weight
        rows, dim = w.shape
        x2, g2 = x.reshape(-1, dim), grad.reshape(-1, rows)
        self._check_head_backward()
        dx = g2.mm(w).reshape(x.shape) if needs_x else None  # with the weights before any update
        self._head_backward(lambda a, b, out: weight_gradient_rows(x2, g2, a, b, out=out))
        return dx

    @torch.no_grad()
    def cross_entropy_backward(self, ce: ChunkedCrossEntropy, grad_out: torch.Tensor, needs_x: bool
                               ) -> Optional[torch.Tensor]:
        """The output layer's backward of ``linear_cross_entropy``: each chunk's logit gradient is
        formed again, gives its share of the input gradient (with its rows before their update) and
        its rows' gradient."""
        w = self.weight
        self._check_head_backward()
        coef = ce.coefficients(grad_out)
        dx = ce.input_grad() if needs_x else None

        def chunk_rows(a: int, b: int, out: torch.Tensor) -> torch.Tensor:
            dz = ce.logit_grad(w, a, b, coef)
            if dx is not None:
                ce.add_input_grad(dx, dz, w, a, b)
            return ce.weight_rows(dz, out=out)

        self._head_backward(chunk_rows)
        return None if dx is None else dx.to(w.dtype)

    def _check_head_backward(self) -> None:
        if "linear" in self._backwards:
            raise RuntimeError("release_rows: the output layer's backward ran twice in one iteration (two "
                               "oxoptim.rows.linear calls, or retain_graph); its rows were updated by the first")
        if "embedding" in self._backwards:
            raise RuntimeError("release_rows: the embedding's backward ran before the output layer's; the weight "
                               "cannot be updated row by row in that order")

    def _head_backward(self, weight_rows: Callable[[int, int, torch.Tensor], torch.Tensor]) -> None:
        """Updates the weight a chunk of rows at a time, ``weight_rows(a, b, out)`` giving rows
        ``a:b`` of its gradient (into ``out``); rows the embedding looked up wait for its gradient."""
        w = self.weight
        rows, dim = w.shape
        unit = self._unit()
        held = self._held = self._held_rows(unit)  # tied: rows whose update waits for the embedding's gradient
        head_rows = None if held is None else torch.empty(len(held), dim, dtype=w.dtype)
        step = self._chunk_rows(unit)
        chunk = torch.empty(min(step, rows), dim, dtype=w.dtype)
        for a in range(0, rows, step):
            b = min(a + step, rows)
            part = weight_rows(a, b, chunk[: b - a])
            if held is None or head_rows is None:
                self._update([(0, b - a)], part, a)
                continue
            inside = _within(held, a, b)
            head_rows[inside] = part[held[inside] - a]
            self._update(_runs_outside(held[inside] - a, b - a), part, a)
        self._head_rows = head_rows
        self._backwards.add("linear")
        if held is None:
            self._complete()

    @torch.no_grad()
    def embedding_backward(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        if "embedding" in self._backwards:
            raise RuntimeError("release_rows: the embedding's backward ran twice in one iteration (two "
                               "oxoptim.rows.embedding calls, or retain_graph); its rows were updated by the first")
        w = self.weight
        rows, dim = w.shape
        looked_up = self._looked_up
        if looked_up is None or ("linear" in self._backwards and self._held is None):
            raise RuntimeError("release_rows: the embedding was looked up after the output layer's backward in this "
                               "iteration; its rows were already updated with the head's gradient alone")
        # torch's own embedding backward on the looked-up rows alone: each row's sum in its order and precision.
        at = torch.searchsorted(looked_up, ids.reshape(-1))
        summed = torch.ops.aten.embedding_dense_backward(grad.reshape(-1, dim), at, len(looked_up), -1, False)
        if "linear" in self._backwards:
            held, head_rows = self._held, self._head_rows
            assert held is not None and head_rows is not None  # checked above
            summed = _head_plus_embedding(head_rows, summed, torch.searchsorted(held, looked_up))
            self._head_rows = None
        elif self._linear_forward:
            raise RuntimeError("release_rows: the embedding's backward ran before the output layer's; the weight "
                               "cannot be updated row by row in that order")
        else:  # no head: every other row steps with a zero gradient, as in the dense gradient
            unit = self._unit()
            held = self._held_rows(unit)
            assert held is not None
            if len(held) != len(looked_up):  # whole units: their other rows' embedding gradient is zero
                full = torch.zeros(len(held), dim, dtype=summed.dtype)
                full[torch.searchsorted(held, looked_up)] = summed
                summed = full
            step = self._chunk_rows(unit)
            zeros = torch.zeros(min(step, rows), dim, dtype=w.dtype)
            for a in range(0, rows, step):
                b = min(a + step, rows)
                inside = _within(held, a, b)
                self._update(_runs_outside(held[inside] - a, b - a), zeros[: b - a], a)
        self._update_rows(held, summed)
        self._backwards.add("embedding")
        self._complete()

    def finish(self) -> None:
        """At ``optimizer.step()``: rows whose embedding backward never came get the head's gradient alone."""
        try:
            if self.weight.grad is not None and self._backwards:
                raise RuntimeError("a released weight also got a .grad (an operation other than oxoptim.rows used "
                                   "it); its rows were already updated in this iteration, the .grad is left as is")
            self._update_held_rows()
        finally:
            self._reset()

    def _update_held_rows(self) -> None:
        """Rows held for the embedding's gradient, when the output layer's backward ran and the
        embedding's did not: they get the head's gradient alone, completing the iteration."""
        if "linear" in self._backwards and "embedding" not in self._backwards and self._held is not None:
            assert self._head_rows is not None
            self._update_rows(self._held, self._head_rows)
            self._complete()

    def drop(self) -> None:
        """At ``optimizer.zero_grad()`` before ``step()`` (a skipped batch, a backward that raised):
        the iteration is dropped and the next backward starts a new one. What backward already
        updated stays updated; rows held for the embedding's gradient after the output layer's
        backward finished get the head's gradient alone, as ``optimizer.step()`` would give them, so
        the weight has had one whole update (each row once, its step count once). An output
        layer's or embedding's backward that raised partway leaves the rows it updated updated
        and the rest as they were (the step count does not move). A forward whose backward has
        not begun keeps its graph: ``zero_grad()`` between a forward and its backward is the
        ordinary loop."""
        if not self._backwards and self._cells is None:
            return  # no backward has reached the weight in this iteration: a forward keeps its graph
        if self._refused():  # the iteration's checks refused it: nothing was written, nothing to complete
            self._reset()
            return
        try:
            self._update_held_rows()
        finally:
            self._reset()

    # -- updates --------------------------------------------------------------
    def _update_rows(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Rows ``rows`` (sorted) with gradients ``grads`` (one row each): runs of consecutive rows per call."""
        listed = rows.tolist()
        runs, start = [], 0
        for i in range(1, len(listed) + 1):
            if i == len(listed) or listed[i] != listed[i - 1] + 1:
                runs.append((start, i))
                start = i
        if not runs:
            return
        group = _group_of(self.optimizer, self.weight)
        assert group is not None
        self._call(group, [(listed[s], listed[s] + (e - s), grads[s:e]) for s, e in runs])

    def _update(self, runs: list, grad: torch.Tensor, offset: int) -> None:
        """Rows ``offset + a .. offset + b`` for each run ``(a, b)``, gradients ``grad[a:b]``."""
        if not runs:
            return
        group = _group_of(self.optimizer, self.weight)
        assert group is not None
        self._call(group, [(offset + a, offset + b, grad[a:b]) for a, b in runs])

    def _call(self, group: dict, pieces: list) -> None:
        """One native call stepping ``pieces``, ``(first row, end row, gradient rows)`` each."""
        optimizer, w = self.optimizer, self.weight
        self._begin_iteration()  # what the ordinary step() refuses, before this iteration's first write
        if self._cells is None:  # the iteration's first update decides how this iteration steps
            self._torch_momentum = _first_momentum_by_torch(optimizer, group, w)
            if self._torch_momentum:  # settings or state changed after entry: before any row is updated
                _check_torch_momentum(group, w)
        kernel = _kernel(optimizer, group, w)
        entry = optimizer.state.get(w, {})
        if self._torch_momentum:
            _sgd_first_momentum(w, group, entry["momentum_buffer"], pieces)
            self._cells, self._advanced = [], []  # SGD keeps no scalar state
            return
        if self._cells is None:  # the iteration's first update: its scalars, which each piece copies
            self._scalar_keys = tuple(kernel.scalars)
            self._cells = [entry[key] for key in kernel.scalars]
        width = w.shape[1]
        base = w.detach()
        params = [base[a:b] for a, b, _ in pieces]
        grads = [g for _, _, g in pieces]
        # Per block: rows a..b hold elements a*width..b*width, whole blocks but maybe the weight's last.
        state = [[entry[key][a:b] if per == 1 else entry[key][a * width // per:-(-b * width // per)]
                  for a, b, _ in pieces] for key, per in kernel.arrays]
        # Each piece steps its own copy of the iteration's starting scalars: they advance once.
        cells = [[c.clone() for _ in pieces] for c in self._cells]
        options = dict(kernel.options)
        if kernel.stream is not None:  # each piece draws its rows' bits of the weight's stream
            options.update(stream_ids=[kernel.stream] * len(pieces), stream_offsets=[a * width for a, _, _ in pieces])
        if kernel.compensation:
            options["compensation"] = [entry[KAHAN_COMP][a:b] for a, b, _ in pieces]
        if not _core.step(kernel.kind, params, grads, state, cells, kernel.hyper, num_threads=num_threads(), **options):
            raise RuntimeError("release_rows: the native kernel refused the weight's rows")
        self._advanced = [c[0] for c in cells]

    def _complete(self) -> None:
        """Every row has its update: the scalar state moves on once."""
        if self._advanced:
            entry = self.optimizer.state[self.weight]
            for key, value in zip(self._scalar_keys, self._advanced):
                entry[key].copy_(value)
        self._cells = self._advanced = None


def _head_plus_embedding(head: torch.Tensor, embedding: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The ordinary loop's head + embedding gradient of the held rows, in ``head``'s memory: the
    looked-up rows ``at`` get their embedding gradient, the others a zero (as the dense gradient,
    which turns a head's -0 into +0), a block of rows at a time so that no second copy of the held
    rows exists. Addition commutes, so the bits are those of either order."""
    if len(at) == len(head):
        return head.add_(embedding)
    block = 4096
    for a in range(0, len(head), block):
        b = min(a + block, len(head))
        inside = _within(at, a, b)
        part = torch.zeros(b - a, head.shape[1], dtype=embedding.dtype)
        part[at[inside] - a] = embedding[inside]
        head[a:b].add_(part)
    return head


def weight_gradient_rows(x2: torch.Tensor, g2: torch.Tensor, a: int, b: int, out: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
    """Rows ``a:b`` of the output layer's weight gradient, ``grad[:, a:b].T @ x``, contiguous (into
    ``out`` when given); ``x2`` and ``g2`` are the layer's input and output gradient flattened to 2-D.
    The same sums as autograd's ``(x.T @ grad).T``; a BLAS may add them in another order."""
    return torch.mm(g2[:, a:b].t(), x2, out=out)


def _within(sorted_rows: torch.Tensor, a: int, b: int) -> slice:
    lo, hi = torch.searchsorted(sorted_rows, torch.tensor([a, b])).tolist()
    return slice(lo, hi)


def _runs_outside(held: torch.Tensor, n: int) -> list:
    """The runs ``(a, b)`` of 0..n that avoid the sorted rows ``held``."""
    runs, start = [], 0
    for r in held.tolist():
        if r > start:
            runs.append((start, r))
        start = r + 1
    if n > start:
        runs.append((start, n))
    return runs
