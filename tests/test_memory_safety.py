"""Memory safety at the Rust boundary, under a second thread.

Every tensor a native call reads or writes stays alive until it returns,
whatever another thread does meanwhile (``p.grad = None``, emptying the lists
it passed, allocating over the freed memory); two calls updating the same
tensors from two threads at once get an error, not a data race.

The attacks run in a subprocess (``python test_memory_safety.py SCENARIO
[CASE...]``) so that a segfault fails the test instead of killing pytest. A
second thread strikes only while the main thread is inside a native call's
kernel (its innermost frame at the call, and the call registered in flight):
torch itself crashes when one thread reads ``p.grad`` while another assigns
it, so the attack must not overlap the step's own reads of ``.grad``.
"""

from __future__ import annotations

import contextlib
import dis
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

import pytest
import torch
import torch.utils._python_dispatch

import oxoptim
from optimizers import TWINS as ALL_TWINS
from optimizers import assert_twin_matches
from oxoptim import _core

# The subprocess fixes glibc's mmap threshold at 1 MiB, so freeing a BIG
# tensor unmaps it: a kernel still reading or writing it faults, or hits the
# allocations made right after (which the checks below catch).
BIG = 4_000_000
MMAP_THRESHOLD = str(1 << 20)
SMALL = 1000
ROUNDS = 4
MAX_TRIES = 40


class OnNativeCall:
    """Runs ``action`` once per armed round on a second thread, at a moment
    when the main thread is inside the native call that one of ``callers``
    makes last, registered in flight (its kernel running, GIL released)."""

    def __init__(self, callers: Iterable[Callable], action: Callable[[], object]) -> None:
        # Each caller's last call instruction: the main thread is inside the
        # native call when its innermost frame is there, not merely somewhere
        # in the caller (a thread switch can happen between its bytecodes).
        self.calls = {}
        for caller in callers:
            code = getattr(caller, "__func__", caller).__code__
            self.calls[code] = max(i.offset for i in dis.get_instructions(code) if i.opname.startswith("CALL"))
        self.action = action
        self.main = threading.get_ident()
        self.lock = threading.Lock()
        self.phase = "idle"
        self.hits = 0
        self.results: list = []
        self.finished = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _in_native_call(self) -> bool:
        frame = sys._current_frames().get(self.main)
        if frame is None or self.calls.get(frame.f_code) != frame.f_lasti:
            return False
        # Registered in flight: past reading its tensors, in the kernel.
        # (Builds without the registry: the frame is the best evidence.)
        in_flight = getattr(_core, "calls_in_flight", None)
        return in_flight is None or in_flight() > 0

    def _run(self) -> None:
        while not self.finished:
            with self.lock:
                act = self.phase == "armed" and self._in_native_call()
                if act:
                    self.phase = "acting"
            if not act:
                time.sleep(0)  # lets the main thread take the GIL
                continue
            try:
                self.results.append(self.action())
            except BaseException as e:  # reported to the main thread
                self.results.append(e)
            with self.lock:
                self.phase = "done"
                self.hits += 1

    def arm(self) -> None:
        with self.lock:
            self.phase = "armed"

    def disarm(self) -> None:
        """Waits for an action under way to end, then disarms."""
        while True:
            with self.lock:
                if self.phase != "acting":
                    self.phase = "idle"
                    return
            time.sleep(1e-4)

    def close(self) -> None:
        self.disarm()
        self.finished = True
        self.thread.join()


def _junk_like(sizes: list[int]) -> list[torch.Tensor]:
    """Allocations of the sizes just freed, filled with a sentinel: the old
    memory gets reused, so a kernel still using it writes into these."""
    return [torch.full((n,), 7.0) for n in sizes]


def _assert_junk_untouched(junk: list) -> None:
    for j in junk:
        assert bool((j == 7.0).all()), "a native call wrote into memory freed during the call"


# --- scenario "group": the reported crash, every optimizer's whole-group path ---

GROUP_CASES = [
    (oxoptim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (oxoptim.Adam, dict(lr=0.01)),
    (oxoptim.Adam, dict(lr=0.01, weight_decay=0.1)),
    (oxoptim.AdamW, dict(lr=0.01, amsgrad=True)),
    # One native call for every group: the BIG parameter's state is 8-bit, the SMALL one's fp32
    # (SGD8bit takes that call only when every parameter's state is 8-bit).
    (oxoptim.AdamW8bit, dict(lr=0.01)),
    (oxoptim.SGD8bit, dict(lr=0.1, momentum=0.9, min_8bit_size=SMALL)),
]


def _grads(seed: int) -> list[torch.Tensor]:
    return _fresh(100 + seed) + [torch.randn(SMALL, generator=torch.Generator().manual_seed(seed))]


def _group_run(cls, kw, steps: Optional[int] = None, repoint: bool = False) -> tuple[list[torch.Tensor], int, int]:
    """Steps until the attack struck ROUNDS times (at most MAX_TRIES steps),
    or exactly ``steps`` times without an attack; returns the parameters,
    the steps taken and the attacks. The attack drops the gradients
    (``p.grad = None``) or, with ``repoint``, re-points the gradient tensors
    themselves at empty storage (``set_()``), which frees their memory unless
    the call holds the storage, not only the tensor."""
    params = [_fresh(0)[0].requires_grad_(), torch.randn(SMALL, generator=torch.Generator().manual_seed(0)).requires_grad_()]
    opt = cls(params, **kw)
    sizes = [BIG, SMALL]
    current: list[torch.Tensor] = []  # this step's gradient tensors

    def attack():
        for p, g in zip(params, current):
            if repoint:
                g.set_()
            else:
                p.grad = None
        return _junk_like(sizes)

    native_step = getattr(cls, "_native_step", None) or cls._fast_step  # whose last call is the native one
    vandal = OnNativeCall([native_step], attack) if steps is None else None
    step = 0
    while (step < steps) if vandal is None else (vandal.hits < ROUNDS and step < MAX_TRIES):
        current[:] = _grads(step)
        for p, g in zip(params, current):
            p.grad = g
        del g
        if vandal is not None and step > 0:  # step 0 creates the state (list path)
            vandal.arm()
        opt.step()
        step += 1
        if vandal is not None:
            vandal.disarm()
            for junk in vandal.results:
                _assert_junk_untouched(junk)
            vandal.results.clear()
    hits = 0
    if vandal is not None:
        vandal.close()
        hits = vandal.hits
    return [p.detach().clone() for p in params], step, hits


def scenario_group(repoint: bool = False) -> None:
    torch.set_num_threads(1)
    for cls, kw in GROUP_CASES:
        got, steps, hits = _group_run(cls, kw, repoint=repoint)
        want, _, _ = _group_run(cls, kw, steps)
        assert hits > 0, f"{cls.__name__}: the attack never struck during a step"
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{cls.__name__} {kw}: wrong numbers after grads were {'re-pointed' if repoint else 'dropped'} mid-step"
        print(f"group {cls.__name__} {kw}: {hits} attacks in {steps} steps survived, numbers exact", flush=True)


def scenario_group_repoint() -> None:
    scenario_group(repoint=True)


# --- scenario "lists": every native entry point, its lists emptied mid-call ---


def call(fn, *args, **kwargs):
    """The only frame from which the lists scenario calls into Rust."""
    return fn(*args, **kwargs)


_BASES: dict = {}


def _fresh(seed: int) -> list[torch.Tensor]:
    """A new list holding a new BIG tensor of the values of ``seed``."""
    if seed not in _BASES:
        _BASES[seed] = torch.randn(BIG, generator=torch.Generator().manual_seed(seed))
    return [_BASES[seed].clone()]


def _with_inf_at_end(seed: int) -> int:
    """``seed``, whose tensor ends in an infinity (the sentinel that reused
    memory holds is finite)."""
    _fresh(seed)
    _BASES[seed][-1] = float("inf")
    return seed


def _run_emptying(make_call: Callable[[], tuple], expect: Optional[Callable[[object], None]] = None) -> int:
    """Calls ``fn(*lists, **kw)`` from ``make_call()`` until a second thread
    struck ROUNDS times (at most MAX_TRIES calls): it empties ``doomed``
    (lists whose tensors nothing else references) while the call runs and
    allocates over the freed memory."""
    return _run_attacked(make_call, lambda doomed: [lst.clear() for lst in doomed], expect)


def _run_attacked(make_call: Callable[[], tuple], strike: Callable[[list], object],
                  expect: Optional[Callable[[object], None]] = None, around: Callable[[], Any] = contextlib.nullcontext) -> int:
    """Calls ``fn(*args, **kw)`` from ``make_call()`` (inside ``around()``) until a second thread
    struck ROUNDS times (at most MAX_TRIES calls): ``strike(doomed)`` (``doomed``: tensors, or lists of
    them) while the call runs, then it allocates over the freed memory and checks that the call
    wrote none of it."""
    hits = tries = 0
    while hits < ROUNDS and tries < MAX_TRIES:
        tries += 1
        fn, args, kwargs, doomed = make_call()
        sizes = [t.numel() for x in doomed for t in (x if isinstance(x, list) else [x])]

        def attack(doomed=doomed, sizes=sizes):
            strike(doomed)
            return _junk_like(sizes)

        vandal = OnNativeCall([call], attack)
        vandal.arm()
        with around():
            out = call(fn, *args, **kwargs)
        del args, kwargs, doomed
        vandal.close()
        hits += vandal.hits
        for junk in vandal.results:
            _assert_junk_untouched(junk)
        if expect is not None:
            expect(out)
    assert hits > 0, f"{fn.__name__}: the attack never struck during the call"
    print(f"  {fn.__name__}: {hits} attacks in {tries} calls", flush=True)
    return hits


SGD = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
ADAM = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False)
SUB = dict(l1=0.01, weight_decay=0.0, maximize=False)


def _tensor_lists(args: Iterable) -> list[list]:
    """The non-empty lists of tensors among ``args``, also one level down
    (``_core.step`` takes one list per state entry)."""
    out = []
    for x in args:
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            out.append(x)
        elif isinstance(x, list):
            out.extend(_tensor_lists(x))
    return out


def _optimizer_step(fn, state: Callable[[], tuple], kwargs: dict, doom_all: bool = False, kind: Optional[str] = None, hyper: Optional[dict] = None) -> int:
    """The gradients' list is the only reference to them; the parameters
    must end as a step with the original gradients makes them. With
    ``doom_all`` every list (parameters and state too) is emptied. For the
    generic ``_core.step(kind, params, grads, state, scalars, hyper)``,
    ``state()`` returns the state and scalar lists."""
    pre = (kind,) if kind is not None else ()
    post = (hyper,) if hyper is not None else ()
    params = _fresh(1)
    want = [p.clone() for p in params]
    assert fn(*pre, want, _fresh(2), *state(), *post, **kwargs) is True

    def make():
        grads = _fresh(2)
        if doom_all:
            lists = (_fresh(1), grads, *state())
            return fn, (*pre, *lists, *post), kwargs, _tensor_lists(lists)
        params[0].copy_(_fresh(1)[0])
        return fn, (*pre, params, grads, *state(), *post), kwargs, [grads]

    def expect(out):
        assert out is True
        if not doom_all:
            assert torch.equal(params[0], want[0]), f"{fn.__name__}: wrong numbers after its gradients were freed mid-call"

    return _run_emptying(make, expect)


def _reduction(fn, arity: int, kwargs: dict, seed: int = 10) -> int:
    """Every input list is emptied; the value must be the true one. (Three
    tensors per list: a read-only pass is short, and the attack must land
    inside it.)"""

    def lists():
        return [_fresh(seed + k) + _fresh(seed + 5) + _fresh(seed + 6) for k in range(arity)]

    want = fn(*lists(), **kwargs)

    def make():
        doomed = lists()
        return fn, tuple(doomed), kwargs, doomed

    def expect(out):
        assert out == want, f"{fn.__name__}: {out} != {want} after its inputs were freed mid-call"

    return _run_emptying(make, expect)


def _update(fn, kwargs: dict, keep_first: bool) -> int:
    """The read list is emptied and the written one kept (and checked), or
    both are emptied (then only the freed memory can be checked)."""
    kept = _fresh(20)
    want = [t.clone() for t in kept]
    assert fn(want, _fresh(21), **kwargs) is True

    def make():
        kept[0].copy_(_fresh(20)[0])
        other = _fresh(21)
        if keep_first:
            return fn, (kept, other), kwargs, [other]
        first = _fresh(20)
        return fn, (first, other), kwargs, [first, other]

    def expect(out):
        assert out is True
        if keep_first:
            assert torch.equal(kept[0], want[0]), f"{fn.__name__}: wrong numbers after its inputs were freed mid-call"

    return _run_emptying(make, expect)


def _scale() -> int:
    def make():
        lst = _fresh(30) + _fresh(31)
        return _core.scale_, (lst,), dict(scale=0.5), [lst]

    return _run_emptying(make, lambda out: None)


# Every native entry point that takes tensor lists.
LIST_CASES: dict[str, Callable[[], int]] = {
    "sgd_step": lambda: _optimizer_step(_core.step, lambda: ([[torch.zeros(BIG)]], []), {}, kind="sgd", hyper=SGD),
    "adam_step": lambda: _optimizer_step(_core.step, lambda: ([[torch.zeros(BIG)], [torch.zeros(BIG)]], [[torch.zeros(())]]), {}, kind="adam", hyper=ADAM),
    "sgd_step_all": lambda: _optimizer_step(_core.step, lambda: ([[torch.zeros(BIG)]], []), {}, doom_all=True, kind="sgd", hyper=SGD),
    "adam_step_all": lambda: _optimizer_step(_core.step, lambda: ([[torch.zeros(BIG)], [torch.zeros(BIG)]], [[torch.zeros(())]]), {}, doom_all=True, kind="adam", hyper=ADAM),
    "subgradient_step": lambda: _optimizer_step(_core.subgradient_step, lambda: (), dict(step=0.05, **SUB)),
    "tensor_norm": lambda: _reduction(_core.tensor_norm, 1, dict(norm_type=2.0)),
    "any_nonfinite": lambda: _reduction(_core.any_nonfinite, 1, {}, seed=_with_inf_at_end(40)),
    "direction_sq_norm": lambda: _reduction(_core.direction_sq_norm, 2, SUB),
    "lerp_average": lambda: _update(_core.lerp_average, dict(weight=0.25), keep_first=True),
    "copy_scaled": lambda: _update(_core.copy_scaled, dict(scale=0.5), keep_first=True),
    "accumulate_mean": lambda: _update(_core.accumulate_mean, dict(weight=0.5, first=False), keep_first=False),
    "scale_": _scale,
}


def scenario_lists(*names: str) -> None:
    torch.set_num_threads(1)
    for name in names or LIST_CASES:
        hits = LIST_CASES[name]()
        print(f"lists {name}: {hits} attacks survived, results exact", flush=True)


# --- gradients are checked like every other tensor -------------------------

TWINS = [
    (oxoptim.SGD, torch.optim.SGD, dict(lr=0.1)),
    (oxoptim.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.1)),
    (oxoptim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (oxoptim.Adam, torch.optim.Adam, dict(lr=0.01)),
    (oxoptim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    (oxoptim.AdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
]
TWIN_IDS = [f"{o.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for o, _, kw in TWINS]
TOL = dict(rtol=1.3e-6, atol=1e-5)


def _snapshot(params, opt) -> tuple:
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state


def _assert_same(a: tuple, b: tuple, exact: bool = True) -> None:
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, **TOL)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            x, y = a[1][i][k], b[1][i][k]
            assert x.dtype == y.dtype, (k, x.dtype, y.dtype)
            if exact:
                assert torch.equal(x, y), k
            else:
                torch.testing.assert_close(x, y, **TOL)


def _step_with(cls, kw, shape, swap: Callable[[torch.nn.Parameter], None], warm: bool, foreach=None):
    """One step of ``cls`` on a parameter of ``shape`` whose gradient ``swap``
    replaced behind torch's checks (after a normal step when ``warm``, so that
    oxoptim takes its whole-group path). Returns the error (type, message) or
    None, and the snapshots before and after."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = cls([p], **kw) if foreach is None else cls([p], foreach=foreach, **kw)
    if warm:
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    p.grad = torch.randn(shape, generator=gen)
    swap(p)
    before = _snapshot([p], opt)
    try:
        opt.step()
        error = None
    except Exception as e:  # compared with torch's
        error = (type(e), str(e))
    return error, before, _snapshot([p], opt)


def _set_grad_data(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.nn.Parameter], None]:
    def swap(p):
        p.grad.data = make(p.grad)

    return swap


@pytest.mark.parametrize("warm", [False, True], ids=["list-path", "group-path"])
@pytest.mark.parametrize("ours,theirs,kw", TWINS, ids=TWIN_IDS)
def test_grad_of_the_wrong_shape_raises_torchs_error_and_leaves_what_torch_leaves(ours, theirs, kw, warm) -> None:
    """The generic step never describes a gradient whose shape differs from
    its parameter's: torch's own path runs, raising its error and leaving
    exactly what torch leaves (it may have updated state before raising)."""
    swap = _set_grad_data(lambda g: torch.randn(3, 2))  # same numel as (2, 3)
    error, _, after = _step_with(ours, kw, (2, 3), swap, warm)
    want, _, want_after = _step_with(theirs, kw, (2, 3), swap, warm, foreach=False)
    assert want is not None and want[0] is RuntimeError
    assert error == want
    _assert_same(after, want_after)


@pytest.mark.parametrize("warm", [False, True], ids=["list-path", "group-path"])
@pytest.mark.parametrize("ours,theirs,kw", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize(
    "case",
    [
        ((1, 6), lambda g: g.reshape(6).clone()),  # broadcasts into the parameter: torch steps
        ((6,), lambda g: g.reshape(1, 6).clone()),  # broadcasts past it: torch raises
        ((2, 3), lambda g: g.double()),  # dtype: torch promotes (SGD) or raises (Adam)
        ((4, 4), lambda g: g.t().contiguous().t()),  # non-contiguous
    ],
    ids=["broadcast-into", "broadcast-past", "float64", "non-contiguous"],
)
def test_unusual_grads_take_torchs_path(ours, theirs, kw, warm, case) -> None:
    shape, make = case
    error, _, after = _step_with(ours, kw, shape, _set_grad_data(make), warm)
    want, _, want_after = _step_with(theirs, kw, shape, _set_grad_data(make), warm, foreach=False)
    assert error == want
    _assert_same(after, want_after, exact=False)


@pytest.mark.parametrize("warm", [False, True], ids=["list-path", "group-path"])
@pytest.mark.parametrize("ours,theirs,kw", TWINS, ids=TWIN_IDS)
def test_sparse_grads_take_torchs_path(ours, theirs, kw, warm) -> None:
    def swap(p):
        p.grad = p.grad.to_sparse()  # torch's setter allows sparse gradients

    error, _, after = _step_with(ours, kw, (3, 4), swap, warm)
    want, _, want_after = _step_with(theirs, kw, (3, 4), swap, warm, foreach=False)
    assert error == want
    _assert_same(after, want_after, exact=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put a CUDA gradient on a CPU parameter")
@pytest.mark.parametrize("warm", [False, True], ids=["list-path", "group-path"])
@pytest.mark.parametrize("ours,theirs,kw", TWINS, ids=TWIN_IDS)
def test_grad_moved_to_another_device_through_data_takes_torchs_path(ours, theirs, kw, warm) -> None:
    swap = _set_grad_data(lambda g: g.cuda())
    error, _, after = _step_with(ours, kw, (2, 3), swap, warm)
    want, _, want_after = _step_with(theirs, kw, (2, 3), swap, warm, foreach=False)
    assert error == want
    _assert_same(after, want_after, exact=False)


def test_list_entry_points_check_grads_like_any_tensor() -> None:
    sgd = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    odd = [torch.empty(5, device="meta"), torch.ones(5).to_sparse(), torch.ones(10)[::2], torch.ones(5, dtype=torch.float64)]
    if torch.backends.mkldnn.is_available():
        odd.append(torch.ones(5).to_mkldnn())  # CPU, float32, "contiguous", but no storage
    for grad in odd:
        p = torch.ones(5)
        assert _core.step("sgd", [p], [grad], [], [], sgd) is False
        assert _core.subgradient_step([p], [grad], step=0.1, l1=0.0, weight_decay=0.0, maximize=False) is False
        assert _core.direction_sq_norm([p], [grad], l1=0.0, weight_decay=0.0, maximize=False) is None
        assert torch.equal(p, torch.ones(5))
    # A gradient of the right size but the wrong shape: the generic step hands
    # it to torch's path (False, nothing touched), where torch raises its own
    # error; the subgradient method raises that error itself.
    for wd in (0.0, 0.1):
        p = torch.ones(2, 3)
        assert _core.step("sgd", [p], [torch.ones(3, 2)], [], [], {**sgd, "weight_decay": wd}) is False
        assert torch.equal(p, torch.ones(2, 3))
    for ours, theirs in ((oxoptim.SGD, torch.optim.SGD),):
        for wd in (0.0, 0.1):
            messages = []
            for cls in (ours, theirs):
                p = torch.nn.Parameter(torch.ones(2, 3))
                opt = cls([p], lr=0.1, weight_decay=wd)
                p.grad = torch.ones(2, 3)
                p.grad.data = torch.ones(3, 2)
                with pytest.raises(RuntimeError, match="must match the size") as info:
                    opt.step()
                messages.append(str(info.value))
                assert torch.equal(p.detach(), torch.ones(2, 3))
            assert messages[0] == messages[1]


def test_tensor_subclasses_take_torchs_path_and_are_never_trusted_for_an_address() -> None:
    """A subclass's methods may run Python (``__torch_function__``), which can
    report any data pointer: the Rust path never describes one."""
    victim = torch.ones(4)

    class Lying(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.data_ptr:
                return victim.data_ptr()
            return super().__torch_function__(func, types, args, kwargs or {})

    liar = torch.zeros(4).as_subclass(Lying)
    assert liar.data_ptr() == victim.data_ptr()
    assert _core.scale_([liar], scale=3.0) is False
    assert _core.tensor_norm([liar], 2.0) is None
    assert torch.equal(victim, torch.ones(4))
    # An optimizer over a subclass parameter steps as torch's does.
    results = []
    for cls in (oxoptim.Adam, torch.optim.Adam):
        p = torch.linspace(-1, 1, 6).as_subclass(Lying).requires_grad_()
        opt = cls([p], lr=0.1)
        for _ in range(2):
            p.grad = torch.full((6,), 0.5)
            opt.step()
        results.append(torch.Tensor(p.detach()).clone())
    torch.testing.assert_close(results[0], results[1])
    assert torch.equal(victim, torch.ones(4))


# --- nothing is written before everything is validated ------------------------

ADAM_LIST = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False)


def _refused(call: Callable[[], object]) -> None:
    """The generic step refuses a call either by raising or by returning
    False (torch's path runs instead); both must leave everything untouched."""
    try:
        out = call()
    except (RuntimeError, ValueError):
        return
    assert out is False


@pytest.mark.parametrize(
    "broken",
    ["exp_avg", "exp_avg_sq", "step", "params"],
)
def test_a_failing_adam_list_call_leaves_params_state_and_step_as_they_were(broken) -> None:
    params = [torch.ones(6), torch.ones(4)]
    grads = [torch.full((6,), 0.5), torch.full((4,), 0.5)]
    lists = {"exp_avg": [torch.zeros(6), torch.zeros(4)], "exp_avg_sq": [torch.zeros(6), torch.zeros(4)], "step": [torch.tensor(3.0), torch.tensor(3.0)]}
    if broken == "step":
        lists["step"][1] = torch.tensor([3.0, 3.0])  # two elements: not a counter
    elif broken == "params":
        params.append(torch.ones(2))  # one list longer than the others
    else:
        lists[broken][1] = torch.zeros(5)
    before = [t.clone() for t in params + lists["exp_avg"] + lists["exp_avg_sq"] + lists["step"]]
    _refused(lambda: _core.step("adam", params, grads, [lists["exp_avg"], lists["exp_avg_sq"]], [lists["step"]], ADAM_LIST))
    after = params + lists["exp_avg"] + lists["exp_avg_sq"] + lists["step"]
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_a_failing_sgd_list_call_leaves_params_and_buffers_as_they_were() -> None:
    params, grads, bufs = [torch.ones(6), torch.ones(4)], [torch.ones(6), torch.ones(4)], [torch.ones(6), torch.ones(5)]
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    _refused(lambda: _core.step("sgd", params, grads, [bufs], [], sgd))
    assert all(torch.equal(t, torch.ones_like(t)) for t in params + bufs)


def test_state_shrunk_in_place_between_steps_is_read_again_and_refused() -> None:
    """``resize_`` to fewer elements keeps the address: the cached length
    must not be used (it would update memory past the tensor's end). The
    generic step describes the state afresh, finds it does not match its
    parameter and runs torch's path, which raises torch's error and leaves
    what torch leaves; the memory past the tensor's end is never written."""
    outcomes = []
    for cls, extra in ((oxoptim.Adam, {}), (torch.optim.Adam, dict(foreach=False))):
        p = torch.nn.Parameter(torch.ones(8))
        opt = cls([p], lr=0.1, **extra)
        for _ in range(2):  # the second step caches the state's description
            p.grad = torch.ones(8)
            opt.step()
        exp_avg = opt.state[p]["exp_avg"]
        address = exp_avg.data_ptr()
        exp_avg.resize_(5)
        assert exp_avg.data_ptr() == address
        whole = torch.empty(0).set_(exp_avg.untyped_storage(), 0, (8,), (1,))
        storage_before = whole.clone()
        p.grad = torch.ones(8)
        with pytest.raises(RuntimeError, match="size of tensor a \\(5\\)") as info:
            opt.step()
        assert torch.equal(whole, storage_before)
        outcomes.append((str(info.value), _snapshot([p], opt)))
    assert outcomes[0][0] == outcomes[1][0]
    _assert_same(outcomes[0][1], outcomes[1][1])


# --- a parameter whose dtype changed under existing state --------------------


@pytest.mark.parametrize("ours,theirs,kw", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float32])
def test_parameter_converted_to_double_after_state_exists_behaves_like_torch(ours, theirs, kw, grad_dtype) -> None:
    """What ``model.double()`` does mid-training: ``p.data = p.data.double()``;
    the state stays float32 (torch promotes, or raises for Adam's lerp)."""
    outcomes = []
    for cls, extra in ((ours, {}), (theirs, dict(foreach=False))):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, generator=gen))
        opt = cls([p], **kw, **extra)
        errors = []
        for step in range(3):
            if step == 1:
                p.data = p.data.double()
            p.grad = torch.randn(5, generator=gen, dtype=p.dtype)
            if step and grad_dtype != p.dtype:  # a gradient computed before the conversion
                p.grad.data = p.grad.data.to(grad_dtype)
            try:
                opt.step()
            except RuntimeError as e:
                errors.append(str(e))
        outcomes.append((errors, _snapshot([p], opt)))
    assert outcomes[0][0] == outcomes[1][0]
    _assert_same(outcomes[0][1], outcomes[1][1], exact=False)



# --- ZeroTensors (no memory behind their data pointer) ------------------------


ZERO_TWINS = [pytest.param(t, id=t.name) for t in ALL_TWINS]


@pytest.mark.parametrize("warm", [False, True], ids=["list-path", "group-path"])
@pytest.mark.parametrize("twin", ZERO_TWINS)
def test_a_zero_tensor_gradient_takes_torchs_path(twin, warm) -> None:
    """``torch._efficientzerotensor``: a plain CPU float tensor, dense and contiguous, whose
    data pointer is 0 (or, for a view of one, an offset from 0): nothing to read there."""
    outcomes = []
    for make_opt in (twin.make_ours, twin.make_semantics):  # schedulefree and prodigyopt write into p.grad
        p = torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_()
        opt = make_opt([p], **twin.typical)
        error = None
        for step in range(3 if warm else 1):
            p.grad = torch.full((3, 4), 0.25) if step < (2 if warm else 0) else torch._efficientzerotensor(3, 4)
            try:
                opt.step()
            except Exception as e:  # compared with the twin's
                error = (type(e), str(e))
        outcomes.append((error, p.detach().clone()))
    assert outcomes[0][0] == outcomes[1][0]
    assert_twin_matches(twin, outcomes[0][1], outcomes[1][1])


ZERO_VIEW = """
import torch, oxoptim
for cls, kw in ((oxoptim.SGD, dict(lr=0.1, momentum=0.9)), (oxoptim.Adam, dict(lr=0.1))):
    for warm in (False, True):
        p = torch.nn.Parameter(torch.ones(500))
        opt = cls([p], **kw)
        if warm:
            for _ in range(2):
                p.grad = torch.ones(500)
                opt.step()
        p.grad = torch._efficientzerotensor(10**6)[500:1000]  # data pointer 2000
        assert p.grad.data_ptr() == 2000
        opt.step()
print("ok")
"""


def test_a_view_of_a_zero_tensor_is_never_read() -> None:
    """A view of a ZeroTensor has a small non-null, aligned data pointer: read, it faulted."""
    proc = subprocess.run([sys.executable, "-c", ZERO_VIEW], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", f"return code {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"


# --- two threads updating the same tensors at once ---------------------------


@pytest.fixture
def one_thread():
    """One kernel thread: a long single-threaded kernel leaves the other
    thread time to act while it runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _during_a_step(
    opt_a, params_a, call: Callable[[], object], wanted: Callable[[Optional[BaseException]], bool], other_state: Callable[[], object] = lambda: None, tries: int = 40
) -> tuple[Optional[BaseException], object, tuple, tuple]:
    """Steps ``opt_a`` until ``call``, made on another thread while the
    step's kernel runs, ended in a ``wanted`` way (its error, or None);
    returns that error, ``other_state()`` from before that try, and
    ``opt_a``'s snapshots before and after that step. (On a loaded machine
    the other thread may be descheduled until the kernel is over; such tries
    are repeated.)"""

    def action():
        try:
            call()
        except RuntimeError as e:
            return e
        return None

    other = OnNativeCall([type(opt_a)._fast_step], action)
    seen = []
    try:
        for step in range(tries):
            for p in params_a:
                p.grad = torch.full_like(p, 0.01 * (step + 1))
            before, before_other = _snapshot(params_a, opt_a), other_state()
            other.arm()
            opt_a.step()
            other.disarm()
            if other.results:
                error = other.results.pop()
                seen.append(error)
                if wanted(error):
                    return error, before_other, before, _snapshot(params_a, opt_a)
    finally:
        other.close()
    pytest.fail(f"no wanted outcome in {tries} tries; the other thread's calls gave {seen!r}")


def _is_refusal(error: Optional[BaseException]) -> bool:
    return isinstance(error, RuntimeError)


def _replayed(opt_a, params_a, before: tuple) -> tuple:
    """``opt_a``'s snapshot after one step from ``before`` with the current grads, on copies."""
    copies = [b.clone().requires_grad_() for b in before[0]]
    replay = type(opt_a)(copies, **opt_a.defaults)
    for i, q in enumerate(copies):
        replay.state[q] = {k: v.clone() for k, v in before[1][i].items()}
        q.grad = params_a[i].grad.clone()
    replay.step()
    return _snapshot(copies, replay)


@pytest.mark.parametrize("cls,kw", [(oxoptim.Adam, dict(lr=0.01)), (oxoptim.SGD, dict(lr=0.1, momentum=0.9))], ids=["Adam", "SGD"])
def test_two_optimizers_stepping_the_same_parameters_at_once_get_an_error(one_thread, cls, kw) -> None:
    params = [torch.randn(BIG).requires_grad_(), torch.randn(SMALL).requires_grad_()]
    opt_a, opt_b = cls(params, **kw), cls(params, **kw)
    for opt in (opt_a, opt_b):  # both with state: the whole-group path
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    error, b_state, a_before, a_after = _during_a_step(opt_a, params, opt_b.step, _is_refusal, lambda: _snapshot(params, opt_b)[1])
    assert "in flight on another thread" in str(error) and "must not update the same tensors" in str(error)
    # The refused step changed nothing of its own; the running one is exact.
    _assert_same((a_after[0], _snapshot(params, opt_b)[1]), (a_after[0], b_state))
    _assert_same(a_after, _replayed(opt_a, params, a_before))


@pytest.mark.parametrize("cls,kw", [(oxoptim.Adam, dict(lr=0.01)), (oxoptim.SGD, dict(lr=0.1, momentum=0.9))], ids=["Adam", "SGD"])
def test_two_threads_stepping_one_optimizer_at_once_get_an_error(one_thread, cls, kw) -> None:
    """The second thread's step of the same optimizer (its description cache held by the
    running step) gets the in-flight error, as two optimizers over the same tensors do,
    and changes nothing."""
    params = [torch.randn(BIG).requires_grad_(), torch.randn(SMALL).requires_grad_()]
    opt = cls(params, **kw)
    for p in params:  # state exists: the whole-group path
        p.grad = torch.ones_like(p)
    opt.step()
    error, _, before, after = _during_a_step(opt, params, opt.step, _is_refusal)
    assert "in flight on another thread" in str(error) and "must not update the same tensors" in str(error)
    _assert_same(after, _replayed(opt, params, before))
    for p in params:  # and the optimizer steps on afterwards
        p.grad = torch.ones_like(p)
    before = _snapshot(params, opt)
    opt.step()
    _assert_same(_snapshot(params, opt), _replayed(opt, params, before))


def test_a_check_only_call_on_tensors_a_step_is_writing_gets_the_in_flight_error(one_thread) -> None:
    """``_core.step(check_only=True)`` reads the real step counters (an 8-bit step's call per group
    checks them so): while another thread's step writes them it gets that step's in-flight error,
    as the step itself would, rather than a racing read."""
    params = [torch.randn(BIG).requires_grad_(), torch.randn(SMALL).requires_grad_()]
    opt = oxoptim.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    entries = [opt.state[p] for p in params]

    def check() -> bool:
        return _core.step("adam", params, [p.grad for p in params], [[e["exp_avg"] for e in entries], [e["exp_avg_sq"] for e in entries]],
                          [[e["step"] for e in entries]], {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                          "amsgrad": False, "maximize": False, "decoupled_weight_decay": False}, check_only=True)

    assert check() is True  # nothing in flight: checked, nothing written
    error, _, before, after = _during_a_step(opt, params, check, _is_refusal)
    assert "in flight on another thread" in str(error)
    _assert_same(after, _replayed(opt, params, before))


def test_an_averager_reading_parameters_an_optimizer_is_writing_gets_an_error(one_thread) -> None:
    params = [torch.randn(BIG).requires_grad_()]
    opt = oxoptim.Adam(params, lr=0.01)
    averager = oxoptim.ParamAverager(params, decay=0.9)
    params[0].grad = torch.ones(BIG)
    opt.step()
    averager.update()  # copies the parameters
    averager.update()  # then blends them in (the native lerp)
    error, averages, _, _ = _during_a_step(opt, params, averager.update, _is_refusal, lambda: [a.clone() for a in averager.averages])
    assert "in flight on another thread" in str(error)
    assert all(torch.equal(a, b) for a, b in zip(averager.averages, averages))


@pytest.mark.parametrize("cls,kw", [(oxoptim.Adam, dict(lr=0.01)), (oxoptim.SGD, dict(lr=0.1, momentum=0.9))], ids=["Adam", "SGD"])
def test_optimizers_over_disjoint_parameters_step_at_once(one_thread, cls, kw) -> None:
    params_a = [torch.randn(BIG).requires_grad_()]
    params_b = [torch.randn(SMALL).requires_grad_(), torch.randn(BIG).requires_grad_()]
    opt_a, opt_b = cls(params_a, **kw), cls(params_b, **kw)
    for opt, ps in ((opt_a, params_a), (opt_b, params_b)):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    error, b_before, a_before, a_after = _during_a_step(opt_a, params_a, opt_b.step, lambda e: True, lambda: _snapshot(params_b, opt_b))
    assert error is None, f"a step over disjoint parameters failed: {error!r}"
    _assert_same(_snapshot(params_b, opt_b), _replayed(opt_b, params_b, b_before))
    _assert_same(a_after, _replayed(opt_a, params_a, a_before))


def test_a_tensor_read_by_two_calls_at_once_is_fine(one_thread) -> None:
    params = [torch.randn(BIG).requires_grad_()]
    opt = oxoptim.Adam(params, lr=0.01)
    params[0].grad = torch.ones(BIG)
    opt.step()
    # The gradient is only read by the step and by the norm: no conflict.
    error, _, _, _ = _during_a_step(opt, params, lambda: oxoptim.get_total_norm([params[0].grad]), lambda e: True)
    assert error is None, f"two calls only reading a tensor conflicted: {error!r}"


class _FakeHolder(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode whose ``detach`` hands back a tensor of other memory: the storage holder
    a native call takes of each tensor (a detached alias) must not be the mode's answer."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return torch.empty(0)
        return func(*args, **(kwargs or {}))


def scenario_dispatch_mode() -> None:
    """Under a torch-dispatch mode, a second thread re-points (``set_()``) the tensors a native
    call reads and writes while its kernel runs: their memory must stay allocated."""
    torch.set_num_threads(1)

    def scale():
        lst = _fresh(30) + _fresh(31)
        return _core.scale_, (lst,), dict(scale=0.5), lst

    def adam():
        params, grads = _fresh(1), _fresh(2)
        state = [[torch.zeros(BIG)], [torch.zeros(BIG)]]
        args = ("adam", params, grads, state, [[torch.zeros(())]], ADAM)
        return _core.step, args, {}, params + grads + state[0] + state[1]

    def native(out: object) -> None:
        assert out is True, "declined under a dispatch mode"

    for make in (scale, adam):
        _run_attacked(make, lambda targets: [t.set_() for t in targets], native, _FakeHolder)


SCENARIOS = {"group": scenario_group, "group_repoint": scenario_group_repoint, "lists": scenario_lists, "dispatch_mode": scenario_dispatch_mode}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_tensors_stay_alive_while_another_thread_drops_them(scenario: str) -> None:
    env = dict(os.environ, PYTHONFAULTHANDLER="1", MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    proc = subprocess.run([sys.executable, __file__, scenario], capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scenario {scenario!r} died with return code {proc.returncode}:\n{output[-4000:]}"


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])


class _Liar(torch.overrides.TorchFunctionMode):
    """A mode that reports twice the length of ``targets`` and records every function it sees."""

    def __init__(self, targets: set) -> None:
        super().__init__()
        self.targets, self.seen = targets, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(getattr(func, "__name__", str(func)))
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.numel and args and id(args[0]) in self.targets:
            return out * 2
        return out


@pytest.mark.parametrize("steps", [1, 2], ids=["described", "cached"])
def test_a_torch_function_mode_cannot_misdescribe_a_tensor_to_the_native_path(steps) -> None:
    """Modes are off while tensors are described: the kernel writes the parameter's 8 floats, not
    the 8 after it, and the mode never sees the description's calls."""
    base, grad_base = torch.zeros(16), torch.ones(16)
    grad_base[8:] = 1000.0
    p = torch.nn.Parameter(base[:8])
    opt = oxoptim.SGD([p], lr=1.0)
    for _ in range(steps - 1):  # the second step's descriptions come from the cache
        p.grad = grad_base[:8]
        opt.step()
    p.grad = grad_base[:8]
    mode = _Liar({id(p), id(p.grad)})
    with mode:
        opt.step()
    assert p.detach().tolist() == [-float(steps)] * 8
    assert base[8:].tolist() == [0.0] * 8
    assert not mode.seen & {"numel", "data_ptr", "is_contiguous", "detach"}, mode.seen


def test_set_default_device_keeps_the_native_path_and_its_results(monkeypatch) -> None:
    from optimizers import forbid_torch_fallback

    forbid_torch_fallback(monkeypatch)
    results = []
    for device_context in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 300))
        opt = oxoptim.AdamW([p], lr=0.1)
        for i in range(3):
            p.grad = torch.full_like(p, 0.5 - i)
            if device_context:
                with torch.device("cpu"):
                    opt.step()
            else:
                opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def test_a_parameter_made_a_subclass_after_a_native_step_takes_torchs_path() -> None:
    class Frozen(torch.Tensor):  # ignores in-place updates: what torch's path honours
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.add_, torch.Tensor.addcdiv_, torch.Tensor.mul_, torch.Tensor.lerp_):
                return args[0]
            return super().__torch_function__(func, types, args, kwargs or {})

    p = torch.nn.Parameter(torch.zeros(4))
    opt = oxoptim.SGD([p], lr=1.0)
    p.grad = torch.ones(4)
    opt.step()  # described and cached while plain
    p.__class__ = Frozen
    opt.step()
    assert p.detach().as_subclass(torch.Tensor).tolist() == [-1.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_misaligned_parameter_takes_torchs_path(dtype) -> None:
    """A float tensor at an odd byte offset (as from a memory-mapped buffer) cannot be a kernel's
    array: torch's implementation steps it, as torch would."""
    results = []
    for cls in (torch.optim.Adam, oxoptim.Adam):
        buffer = bytearray(1 + 9 * torch.tensor([], dtype=dtype).element_size())
        raw = torch.frombuffer(buffer, dtype=dtype, offset=1, count=9)
        raw.copy_(torch.linspace(-1, 1, 9, dtype=dtype))
        assert raw.data_ptr() % 2 == 1
        p = torch.nn.Parameter(raw)
        opt = cls([p], lr=0.1, foreach=False)
        p.grad = torch.linspace(0, 1, 9, dtype=dtype)
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def test_prodigy_sums_refuses_lists_of_other_lengths() -> None:
    params = [torch.ones(3), torch.ones(3)]
    grads = [torch.ones(3), torch.ones(3)]
    for s in ([torch.zeros(3)] * 3, [torch.zeros(3)]):
        with pytest.raises(ValueError, match=f"expected 2 s tensors, got {len(s)}"):
            _core.prodigy_sums(params, grads, s, None, weight_decay=0.0, beta3=0.9, s_weight=1.0)


def test_a_refused_bfloat16_state_step_leaves_the_float32_moments_it_loaded() -> None:
    p = torch.nn.Parameter(torch.linspace(-1, 1, 8))
    ref = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.linspace(0.1, 0.9, 8)
    ref.step()
    opt = oxoptim.Adam([p], lr=0.1, state_dtype=torch.bfloat16)
    opt.load_state_dict(ref.state_dict())
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch._neg_view(torch.linspace(0.1, 0.9, 8))  # the native call declines it
    with pytest.raises(ValueError, match="runs on the native path only"):
        opt.step()
    assert opt.state[p].keys() == before.keys()
    assert all(opt.state[p][k].dtype == v.dtype and torch.equal(opt.state[p][k], v) for k, v in before.items())
