"""``oxoptim.CPUOffloadOptimizer``: the CPU copies are the ordinary loop, bit for bit (every twin,
accumulation, clipping, schedulers, resume), the GPU is the truth for the weights, refused input
changes nothing. Without a GPU the copies between "device" and CPU are simulated on CPU tensors
(``Deferred``: a copy lands only after its event has been polled, as an asynchronous one would);
the tests marked ``cuda`` run the real streams."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import pickle
import threading
import time
import weakref
from typing import Any, Callable

import pytest
import torch
from optimizers import TWINS, TWIN_IDS, Twin
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from test_step_in_backward import MODELS, Toy, assert_same_training, batches

import oxoptim
from oxoptim import ClipPerParameter, ClipPreviousNorm, CPUOffloadOptimizer, offload

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CI machine)")


class _Event:
    """The end of a copy on the simulated stream: waiting for it runs every copy issued before it
    (one stream, in order), and polling it ``delay`` times lets it land by itself."""

    def __init__(self, stream: "Deferred", copy_now: Callable[[], Any], delay: int) -> None:
        self.stream, self.copy_now, self.delay = stream, copy_now, delay

    def query(self) -> bool:
        with self.stream.lock:
            self.delay -= 1
            if self.delay <= 0:
                self.synchronize()
            return self.copy_now is None

    def synchronize(self) -> None:
        with self.stream.lock:  # the update worker waits for copies while backward's hooks issue more
            while self.copy_now is not None:
                self.stream.queue.pop(0).run()

    def run(self) -> None:
        self.copy_now()
        self.copy_now = None


class Deferred:
    """Stands in for ``_CudaTransfers`` on CPU tensors. A copy to the host reads its source when
    issued (the stream orders it after backward's kernels) and writes its destination late, or
    (``lands_early``) at once, while its event still reports it unfinished for a while: the CPU must
    not read a buffer before its event says so, nor let a later copy overwrite one it has not read."""

    pinned = False

    def __init__(self, lands_early: bool, delay: int = 2) -> None:
        self.lands_early, self.delay = lands_early, delay
        self.queue: list[_Event] = []
        self.issued = 0
        self.lock = threading.RLock()

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> _Event:
        with self.lock:
            snapshot = src.detach().clone()
            if self.lands_early:
                dst.detach().copy_(snapshot)
            event = _Event(self, lambda: None if self.lands_early else dst.detach().copy_(snapshot), self.delay)
            self.queue.append(event)
            self.issued += 1
            return event

    def keep_until_copied(self, tensor: torch.Tensor) -> None:
        pass

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # Issued after the CPU update: everything queued before it has landed (the stream is in order).
        with self.lock:
            self.synchronize()
            dst.copy_(src)

    def before_compute(self) -> None:
        pass

    def synchronize(self) -> None:
        with self.lock:
            while self.queue:
                self.queue.pop(0).run()


NEVER = 1 << 30  # polls before a copy reports itself finished: only waiting for it does


@pytest.fixture(params=["lands-late", "lands-early", "lands-early-reported-never"])
def simulated(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Deferred:
    """CPU parameters are offloaded as CUDA ones would be, through one ``Deferred``."""
    transfers = Deferred(lands_early=request.param != "lands-late", delay=NEVER if request.param.endswith("never") else 2)
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    return transfers


def trained(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def make(twin: Twin, model: Toy, offloaded: bool, two_groups: bool, **options: Any) -> torch.optim.Optimizer:
    params = trained(model)
    second = {"lr": 0.005} if twin.per_group_lr else {}
    groups: Any = [{"params": params[:2]}, {"params": params[2:], **second}] if two_groups else params
    if offloaded:
        opt = CPUOffloadOptimizer(groups, twin.ours, **options, **twin.typical)
    else:
        opt = twin.make_ours(groups, **twin.typical)
    twin.prepare(opt)
    return opt


def ordinary(model: Toy, opt: torch.optim.Optimizer, xs: list[torch.Tensor], accumulate: int = 1) -> None:
    for i in range(0, len(xs), accumulate):
        for x in xs[i : i + accumulate]:
            model(x).backward()
        opt.step()
        opt.zero_grad()


def pair(cls: Any = oxoptim.AdamW, kind: str = "mlp", hyper: Any = None, **options: Any) -> tuple:
    """Two copies of one model: ``cls`` on the first, offloaded ``cls`` (with ``options``) on the second."""
    hyper = {"lr": 0.01} if hyper is None else hyper
    a, b = Toy(kind), Toy(kind)
    return a, cls(trained(a), **hyper), b, CPUOffloadOptimizer(trained(b), cls, **options, **hyper)


WHEN = [False, True, "worker"]
WHEN_IDS = ["update-in-step", "update-during-backward", "update-on-a-worker"]
DURING = pytest.mark.parametrize("during", WHEN, ids=WHEN_IDS)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("offload_gradients", [False, True], ids=["keep-grads", "offload-grads"])
@DURING
def test_bit_identical_to_the_ordinary_loop(twin: Twin, kind: str, offload_gradients: bool, during: bool, simulated: Deferred) -> None:
    xs = batches(5, torch.float32)
    a, b = Toy(kind), Toy(kind)
    opt_a = make(twin, a, offloaded=False, two_groups=True)
    opt_b = make(twin, b, offloaded=True, two_groups=True, offload_gradients=offload_gradients, bucket_numel=40,
                 update_during_backward=during)
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    assert simulated.issued, "nothing went through the transfers"
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("bucket_numel", [0, 40, 1 << 16])
@pytest.mark.parametrize("during", WHEN[:2], ids=WHEN_IDS[:2])
def test_updates_run_inside_backward_once_their_copies_land(bucket_numel: int, during: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy lands on the second poll: the last gradient of backward is still in flight at its end.
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=False, delay=2))
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01, bucket_numel=bucket_numel,
                              update_during_backward=during)
    hosts = [e.host for e in opt._entries.values()]
    model(batches(1, torch.float32)[0]).backward()
    in_backward = sum(bool(opt.state.get(h)) for h in hosts)
    # Backward gives w2, b1, w1 their gradients in that order, and a copy back to the GPU lands
    # after every copy issued before it on the stream. One parameter per bucket: w2, b1 (w1's copy is
    # in flight); buckets [w2, b1] and [w1] (40 elements): all three, w1's copy landing before
    # [w2, b1] is sent back; one bucket of all: none.
    assert in_backward == ({0: 2, 40: 3, 1 << 16: 0}[bucket_numel] if during else 0)
    opt.step()
    assert all(opt.state[h] for h in hosts)


def test_hooks_never_wait_for_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward's thread updates only what has landed: with no copy reported finished, nothing
    is updated inside backward and ``step()`` does it all."""
    transfers = Deferred(lands_early=False, delay=NEVER)
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward=True)
    model(batches(1, torch.float32)[0]).backward()
    assert len(opt.state) == 0 and len(transfers.queue) == 3
    opt.step()
    assert len(opt.state) == 3 and not transfers.queue


class Gate(Deferred):
    """Copies land at once but report themselves finished only once ``gate`` is set: waiting for
    one blocks whoever waits (the update worker) until then."""

    def __init__(self) -> None:
        super().__init__(lands_early=True, delay=NEVER)
        self.gate = threading.Event()

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> _Event:
        event = super().to_host(dst, src)
        gate, wait = self.gate, event.synchronize
        event.synchronize = lambda: (gate.wait(), wait())  # type: ignore[method-assign]
        return event


def worker_steps(opt: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of every native update ``opt`` makes from now on."""
    threads: list[int] = []
    original = type(opt.optimizer)._step_part

    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        threads.append(threading.get_ident())
        original(self, *args, **kwargs)

    monkeypatch.setattr(type(opt.optimizer), "_step_part", recorded)
    return threads


def test_a_worker_updates_while_backward_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward returns while the worker still waits for the first copy; once the copies land the
    worker updates every bucket on its own thread before ``step()`` is called."""
    transfers = Gate()
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward="worker")
    threads = worker_steps(opt, monkeypatch)
    model(batches(1, torch.float32)[0]).backward()
    assert len(opt.state) == 0 and len(transfers.queue) == 3  # backward did not wait for the worker
    transfers.gate.set()
    opt._worker.drain()
    assert len(opt.state) == 3 and len(threads) == 3
    assert threading.get_ident() not in threads
    opt.step()
    assert len(threads) == 3  # step() had nothing left to update


def fail_once_on_the_worker(opt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first native update ``opt`` makes on a thread other than the main one is refused."""
    original = type(opt.optimizer)._step_part
    failures = [RuntimeError("refused once")]

    def flaky(self: Any, *args: Any, **kwargs: Any) -> None:
        if failures and threading.current_thread() is not threading.main_thread():
            raise failures.pop()
        original(self, *args, **kwargs)

    monkeypatch.setattr(type(opt.optimizer), "_step_part", flaky)


def test_an_error_on_the_worker_is_raised_by_step_and_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused update on the worker is raised by ``step()``, which updates what was left; the run
    is then the ordinary loop's, bit for bit."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(bucket_numel=0, update_during_backward="worker")
    fail_once_on_the_worker(opt_b, monkeypatch)
    b(xs[0]).backward()
    with pytest.raises(RuntimeError, match="refused once"):
        opt_b.step()
    opt_b.step()  # the retry updates what the worker did not, once
    opt_b.zero_grad()
    a(xs[0]).backward()
    opt_a.step()
    opt_a.zero_grad()
    ordinary(a, opt_a, xs[1:])
    ordinary(b, opt_b, xs[1:])
    assert_same_training(a, opt_a, b, opt_b)


def test_an_idle_worker_ends_and_lets_the_optimizer_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    monkeypatch.setattr(offload._Worker, "IDLE_S", 0.05)
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward="worker")
    threads = worker_steps(opt, monkeypatch)
    model(batches(1, torch.float32)[0]).backward()
    opt.step()
    assert threads and threading.get_ident() not in threads
    gone = weakref.ref(opt)
    del opt
    deadline = time.monotonic() + 5
    while (gone() is not None or any(t.name == "oxoptim-offload-update" for t in threading.enumerate())) \
            and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert gone() is None
    assert not any(t.name == "oxoptim-offload-update" for t in threading.enumerate())
    model(batches(1, torch.float32)[0]).backward()  # its hooks are gone: nothing steps, nothing breaks


def test_a_second_micro_batch_waits_until_the_worker_has_read_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizer accumulation on a worker that is slow to absorb a micro-batch: the next
    micro-batch's copy into the same buffer waits for it (the copies land as they are issued)."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True, delay=NEVER))
    absorb = oxoptim.StepInBackward._absorb

    def slow(self: Any, p: torch.Tensor) -> None:
        time.sleep(0.02)
        absorb(self, p)

    monkeypatch.setattr(oxoptim.StepInBackward, "_absorb", slow)
    xs = batches(6, torch.float32)
    a, opt_a, b, opt_b = pair(accumulate=3, accumulation="optimizer", offload_gradients=True, bucket_numel=0,
                              update_during_backward="worker")
    with oxoptim.step_in_backward(opt_a, accumulate=3, accumulation="optimizer"):
        ordinary(a, opt_a, xs, accumulate=3)
    ordinary(b, opt_b, xs, accumulate=3)
    assert_same_training(a, opt_a, b, opt_b)


def test_update_during_backward_takes_three_values() -> None:
    with pytest.raises(ValueError, match="update_during_backward must be False, True or 'worker', got 'thread'"):
        CPUOffloadOptimizer(Toy("mlp").parameters(), oxoptim.AdamW, update_during_backward="thread")
    with pytest.raises(ValueError, match="got 1"):
        CPUOffloadOptimizer(Toy("mlp").parameters(), oxoptim.AdamW, update_during_backward=1)


@DURING
def test_gradient_accumulation_keeps_the_sum_on_the_device(during: bool, simulated: Deferred) -> None:
    xs = batches(6, torch.float32)
    a, opt_a, b, opt_b = pair(kind="tied", accumulate=3, bucket_numel=0, update_during_backward=during)
    ordinary(a, opt_a, xs, accumulate=3)
    ordinary(b, opt_b, xs, accumulate=3)
    assert_same_training(a, opt_a, b, opt_b)


@DURING
def test_optimizer_accumulation_keeps_no_device_gradient(during: bool, simulated: Deferred) -> None:
    xs = batches(6, torch.float32)
    a, opt_a, b, opt_b = pair(accumulate=3, accumulation="optimizer", offload_gradients=True, bucket_numel=0,
                              update_during_backward=during)
    with oxoptim.step_in_backward(opt_a, accumulate=3, accumulation="optimizer"):
        for i in range(0, 6, 3):
            for x in xs[i : i + 3]:
                a(x).backward()
            opt_a.step()
    for i in range(0, 6, 3):
        for x in xs[i : i + 3]:
            b(x).backward()
            assert all(p.grad is None for p in b.parameters())
        opt_b.step()
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("clip", [ClipPerParameter(0.05), ClipPreviousNorm(0.05)], ids=["per-parameter", "previous-norm"])
@DURING
def test_clipping_is_step_in_backwards(clip: Any, during: bool, simulated: Deferred) -> None:
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair(oxoptim.SGD, hyper={"lr": 0.1, "momentum": 0.9}, clip=clip, update_during_backward=during)
    with oxoptim.step_in_backward(opt_a, clip=clip):
        for x in xs:
            a(x).backward()
            opt_a.step()
    ordinary(b, opt_b, xs)
    assert_same_training(a, opt_a, b, opt_b)


def test_schedulers_and_resume_into_the_plain_optimizer(simulated: Deferred) -> None:
    """LR schedulers drive the wrapped groups; the checkpoint is the plain optimizer's, both ways."""
    xs = batches(8, torch.float32)
    a, opt_a, b, opt_b = pair()
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 2, 0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 2, 0.5)
    for x in xs[:4]:
        for model, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
            model(x).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt_b.param_groups[0]["lr"] == 0.0025
    assert_same_training(a, opt_a, b, opt_b)
    # Swap the checkpoints: the offloaded one goes on as a plain optimizer and vice versa.
    saved_a, saved_b = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(opt_b.state_dict())
    c, d = copy.deepcopy(a), copy.deepcopy(b)
    opt_c = CPUOffloadOptimizer(trained(c), oxoptim.AdamW, lr=0.01)
    opt_d = oxoptim.AdamW(trained(d), lr=0.01)
    opt_c.load_state_dict(saved_a)
    opt_d.load_state_dict(saved_b)
    ordinary(a, opt_a, xs[4:])
    ordinary(c, opt_c, xs[4:])
    ordinary(d, opt_d, xs[4:])
    assert_same_training(a, opt_a, c, opt_c)
    assert_same_training(a, opt_a, d, opt_d)


def test_weights_changed_on_the_device_are_copied_again(simulated: Deferred) -> None:
    """``model.load_state_dict`` after construction: the next update starts from the loaded weights."""
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair()
    ordinary(a, opt_a, xs[:2])
    ordinary(b, opt_b, xs[:2])
    fresh = Toy("mlp", seed=7).state_dict()
    a.load_state_dict(fresh)
    b.load_state_dict(fresh)
    with torch.no_grad():
        a.w2.mul_(0.5)
        b.w2.mul_(0.5)
    ordinary(a, opt_a, xs[2:])
    ordinary(b, opt_b, xs[2:])
    assert_same_training(a, opt_a, b, opt_b)


@DURING
@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_zero_grad_before_step_drops_the_iteration(cls: Any, during: bool, simulated: Deferred) -> None:
    """A skipped batch (``backward(); zero_grad()``): dropped, as the ordinary loop drops it. With
    ``update_during_backward`` what backward updated stays updated, as with ``step_in_backward``
    (every bucket whose gradients all arrived, however late their copies land)."""
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(cls, bucket_numel=0, update_during_backward=during)
    in_backward = during and cls is oxoptim.AdamW
    with oxoptim.step_in_backward(opt_a, bucket_numel=0) if in_backward else contextlib.nullcontext():
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(xs[0]).backward()
            opt.zero_grad()
            for x in xs[1:]:
                model(x).backward()
                opt.step()
                opt.zero_grad()
    assert_same_training(a, opt_a, b, opt_b)


def test_schedule_free_train_and_eval_reach_the_device(simulated: Deferred) -> None:
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair(oxoptim.AdamWScheduleFree, hyper={"lr": 0.01, "warmup_steps": 2})
    for opt in (opt_a, opt_b):
        opt.train()
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    opt_a.eval()
    opt_b.eval()
    assert_same_training(a, opt_a, b, opt_b)
    opt_a.train()
    opt_b.train()
    assert_same_training(a, opt_a, b, opt_b)
    with pytest.raises(AttributeError, match="has no train"):
        CPUOffloadOptimizer(trained(Toy("mlp")), oxoptim.AdamW).train()


def test_torch_optimizers_are_stepped_whole_in_step(simulated: Deferred) -> None:
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair(torch.optim.AdamW, kind="partial", hyper={"lr": 0.01, "foreach": False})
    assert opt_b._in_backward is None
    for x in xs:  # no zero_grad: gradients accumulate as torch's do
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).backward()
            opt.step()
    assert_same_training(a, opt_a, b, opt_b)
    with pytest.raises(ValueError, match="need an optimizer that steps inside backward"):
        CPUOffloadOptimizer(trained(Toy("mlp")), torch.optim.AdamW, clip=ClipPerParameter(1.0))


@pytest.mark.parametrize("cls", [torch.optim.SGD, oxoptim.SGD], ids=["torch", "oxoptim"])
def test_kept_gradients_are_stepped_again(cls: Any, simulated: Deferred) -> None:
    """The ordinary loop steps every parameter that holds a gradient: without ``zero_grad`` and
    with no new backward, a kept gradient is stepped again and one set to None is not."""
    a, opt_a, b, opt_b = pair(cls, hyper={"lr": 0.1, "momentum": 0.9})
    x = batches(1, torch.float32)[0]
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).backward()
        opt.step()
        model.w2.grad = None  # a gradient dropped by hand is not stepped; the others are, again
        opt.step()
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize(
    "params,options,error,message",
    [
        ([], {}, ValueError, "optimizer got an empty parameter list"),
        (lambda m: m.w1, {}, TypeError, "should be an iterable of Tensors or dicts"),
        (lambda m: [m.w1, 3.0], {}, TypeError, "optimizer can only optimize Tensors"),
        (lambda m: [m.w1 * 2], {}, ValueError, "can't optimize a non-leaf Tensor"),
        (lambda m: [{"params": [m.w1]}, {"params": [m.w1]}], {}, ValueError, "appear more than once"),
        (lambda m: [m.w1, m.b1, m.w1], {}, ValueError, "appear more than once"),
        (lambda m: {m.w1, m.b1}, {}, TypeError, "ordered collections"),
        (lambda m: [{"params": {m.w1}}], {}, TypeError, "ordered collections"),
        (lambda m: [("w1", m.w1), m.b1], {}, ValueError, "all optimizer params should be with/without names"),
        (None, {"accumulate": 0}, ValueError, "accumulate must be a positive int"),
        (None, {"accumulation": "sum"}, ValueError, "accumulation must be"),
        (None, {"accumulate": 2, "offload_gradients": True}, ValueError, "frees: use accumulation='optimizer'"),
        (None, {"accumulate": 2, "accumulation": "optimizer"}, ValueError, "needs offload_gradients=True"),
        (None, {"lr": -1.0}, ValueError, "Invalid learning rate"),
        (None, {"clip": 1.0}, TypeError, "clip must be"),
        (lambda m: [torch.nn.Parameter(torch.ones(3, device="meta"))], {}, ValueError, "takes CUDA and CPU parameters"),
    ],
)
def test_refused_input_leaves_no_hook(params: Any, options: dict, error: type, message: str) -> None:
    model = Toy("mlp")
    given = trained(model) if params is None else (params if not callable(params) else params(model))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        CPUOffloadOptimizer(given, oxoptim.AdamW, **options)
    model(batches(1, torch.float32)[0]).backward()  # no hook of a refused optimizer runs
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())


def test_cpu_parameters_are_stepped_where_they_are() -> None:
    """Without a GPU nothing is copied: the optimizer owns the parameters themselves."""
    xs = batches(3, torch.float32)
    a, b = Toy("mlp"), Toy("mlp")
    opt_a = oxoptim.AdamW(trained(a), lr=0.01)
    opt_b = CPUOffloadOptimizer(trained(b), lr=0.01)  # AdamW by default
    assert all(p is q for p, q in zip(opt_b.param_groups[0]["params"], trained(b)))
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    assert_same_training(a, opt_a, b, opt_b)
    opt_b.close()
    assert all(p._post_accumulate_grad_hooks in (None, {}) or not p._post_accumulate_grad_hooks for p in b.parameters())


class OnDevice(torch.nn.Parameter):
    """A CPU parameter the offload takes for one on another device (``device`` reads "meta", which
    ``mixed`` routes through simulated transfers): parameters that stay in CPU memory and copied
    ones in one model."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("meta")


def mixed(model: Toy, copied: set, monkeypatch: pytest.MonkeyPatch, transfers: Deferred) -> None:
    for name in copied:
        setattr(model, name, OnDevice(getattr(model, name).detach().clone()))
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers if device.type == "meta" else None)


@pytest.mark.parametrize("accumulation", ["gradient", "optimizer"])
@DURING
def test_parameters_that_stay_and_ones_copied_accumulate_together(accumulation: str, during: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """w1 and b2 stay in CPU memory (stepped by their own hooks, counting micro-batches as the
    copies do), w2 and b1 are copied: with K = 3 micro-batches the run is the ordinary loop's
    (gradient accumulation) or step_in_backward's (optimizer accumulation), bit for bit."""
    transfers = Deferred(lands_early=False)
    xs = batches(6, torch.float32)
    a, b = Toy("mlp"), Toy("mlp")
    mixed(b, {"w2", "b1"}, monkeypatch, transfers)
    offloaded = accumulation == "optimizer"
    opt_b = CPUOffloadOptimizer(trained(b), oxoptim.AdamW, lr=0.01, accumulate=3, accumulation=accumulation,
                                offload_gradients=offloaded, bucket_numel=40, update_during_backward=during)
    assert len(opt_b._entries) == 2
    opt_a = oxoptim.AdamW(trained(a), lr=0.01)
    if offloaded:
        with oxoptim.step_in_backward(opt_a, accumulate=3, accumulation="optimizer", bucket_numel=40):
            ordinary(a, opt_a, xs, accumulate=3)
    else:
        ordinary(a, opt_a, xs, accumulate=3)
    ordinary(b, opt_b, xs, accumulate=3)
    assert transfers.issued
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("during", WHEN[1:], ids=WHEN_IDS[1:])
def test_a_bucket_a_cpu_parameter_completes_is_sent_back_by_zero_grad(during: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket of a copied parameter (w2, whose gradient comes first) and staying ones (b1, w1):
    the last staying parameter's own hook completes and updates it. A skipped batch's
    ``zero_grad()`` keeps what backward updated, so w2's update reaches the device too."""
    transfers = Deferred(lands_early=True, delay=1)
    if during == "worker":  # the worker takes w2 before the staying parameters' hooks complete the bucket
        on_grad = oxoptim.StepInBackward._on_grad

        def slow_on_backwards_thread(self: Any, p: torch.Tensor) -> None:
            if threading.current_thread() is threading.main_thread():
                time.sleep(0.2)
            on_grad(self, p)

        monkeypatch.setattr(oxoptim.StepInBackward, "_on_grad", slow_on_backwards_thread)
    model = Toy("mlp")
    mixed(model, {"w2"}, monkeypatch, transfers)
    opt = CPUOffloadOptimizer(trained(model), oxoptim.AdamW, lr=0.01, update_during_backward=during)
    entry = opt._entries[model.w2]
    model(batches(1, torch.float32)[0]).backward()
    opt.zero_grad()
    assert opt.state[entry.host], "the bucket was updated"
    assert torch.equal(model.w2.detach(), entry.host.detach()), "the device's w2 did not receive its update"


class FirstThenGate(Deferred):
    """The first ``free`` copies report themselves finished at once, later ones once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(lands_early=True, delay=NEVER)
        self.gate = threading.Event()
        self.free = 0

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> _Event:
        event = super().to_host(dst, src)
        if self.free > 0:
            self.free -= 1
            return event
        gate, wait = self.gate, event.synchronize
        event.synchronize = lambda: (gate.wait(), wait())  # type: ignore[method-assign]
        return event


def wait_for(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_eval_between_backward_and_step_waits_for_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backward(); eval(); ...; train(); step()`` with Schedule-Free: ``eval()`` waits until the
    worker has updated every bucket (in train mode), as the ordinary loop's step() would have."""
    transfers = FirstThenGate()
    transfers.gate.set()
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    xs = batches(2, torch.float32)
    a, opt_a, b, opt_b = pair(oxoptim.AdamWScheduleFree, hyper={"lr": 0.01}, bucket_numel=0,
                              update_during_backward="worker")
    for opt in (opt_a, opt_b):
        opt.train()
    ordinary(a, opt_a, xs[:1])
    ordinary(b, opt_b, xs[:1])
    a(xs[1]).backward()
    opt_a.step()  # what the worker's updates amount to: all of them in train mode
    opt_a.eval()
    opt_a.train()
    transfers.gate.clear()
    transfers.free = 1  # w2's copy lands, b1's and w1's wait for the gate
    w2 = opt_b._entries[b.w2].host
    before = opt_b.state[w2]["z"].clone()
    b(xs[1]).backward()
    wait_for(lambda: not torch.equal(opt_b.state[w2]["z"], before))
    threading.Timer(0.1, transfers.gate.set).start()
    opt_b.eval()
    time.sleep(0.3)  # an evaluation: the copies land meanwhile
    opt_b.train()
    opt_b.step()
    assert_same_training(a, opt_a, b, opt_b)


def test_a_worker_failure_trains_the_same_whichever_call_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch skipped after the worker failed on its first bucket: ``step()`` raising the error and
    then ``zero_grad()``, or ``zero_grad()`` raising it, both drop the failed bucket, update the ones
    whose copies it left, and the next batches train as usual."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    xs = batches(3, torch.float32)
    a, b = Toy("mlp"), Toy("mlp")
    opt_a, opt_b = (CPUOffloadOptimizer(trained(m), oxoptim.AdamW, lr=0.01, bucket_numel=0,
                                        update_during_backward="worker") for m in (a, b))
    for model, opt in ((a, opt_a), (b, opt_b)):
        fail_once_on_the_worker(opt, monkeypatch)
        model(xs[0]).backward()
        opt._worker.drain()
    with pytest.raises(RuntimeError, match="refused once"):
        opt_a.step()
    opt_a.zero_grad()
    with pytest.raises(RuntimeError, match="refused once"):
        opt_b.zero_grad()
    ordinary(a, opt_a, xs[1:])
    ordinary(b, opt_b, xs[1:])
    assert_same_training(a, opt_a, b, opt_b)


def test_a_worker_failure_in_steps_closure_is_retried_by_that_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """``step(closure)`` whose backward makes the worker fail retries the failed bucket itself: the
    step is the ordinary loop's and no stale error is raised later."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    xs = batches(2, torch.float32)
    a, opt_a, b, opt_b = pair(bucket_numel=0, update_during_backward="worker")
    fail_once_on_the_worker(opt_b, monkeypatch)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for x in xs:
            opt.step(lambda: model(x).backward())
            opt.zero_grad()
    assert_same_training(a, opt_a, b, opt_b)


def test_eval_and_train_then_zero_grad_send_nothing_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward (the worker updates and sends every bucket), ``eval()``, ``train()``, weights loaded
    into the model, then a skipped batch's ``zero_grad()``: the loaded weights stay."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(trained(model), oxoptim.AdamWScheduleFree, lr=0.01, bucket_numel=0,
                              update_during_backward="worker")
    opt.train()
    model(batches(1, torch.float32)[0]).backward()
    opt._worker.drain()
    opt.eval()
    opt.train()
    loaded = Toy("mlp", seed=5)
    with torch.no_grad():
        model.w2.copy_(loaded.w2)
    opt.zero_grad()
    assert torch.equal(model.w2.detach(), loaded.w2.detach())


def test_a_worker_failure_after_clipping_clips_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ClipPreviousNorm`` scales the gradient in place before the update; an update refused after
    that and retried by ``step()`` does not scale it again."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    clip = ClipPreviousNorm(0.05)
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(oxoptim.SGD, hyper={"lr": 0.1, "momentum": 0.9}, clip=clip, bucket_numel=0,
                              update_during_backward="worker")
    with oxoptim.step_in_backward(opt_a, clip=clip):
        for x in xs:
            a(x).backward()
            opt_a.step()
    ordinary(b, opt_b, xs[:1])  # the first iteration sets the previous norm: the second is clipped
    fail_once_on_the_worker(opt_b, monkeypatch)
    b(xs[1]).backward()
    with pytest.raises(RuntimeError, match="refused once"):
        opt_b.step()
    opt_b.step()
    opt_b.zero_grad()
    ordinary(b, opt_b, xs[2:])
    assert_same_training(a, opt_a, b, opt_b)


def test_a_refused_absorption_on_the_worker_loses_no_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizer accumulation, K = 2: the worker's absorption of the first micro-batch is refused;
    the second micro-batch's hook absorbs it before its copy takes the buffer, and after ``step()``
    raises the error and is called again the run is step_in_backward's, bit for bit."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair(accumulate=2, accumulation="optimizer", offload_gradients=True, bucket_numel=0,
                              update_during_backward="worker")
    with oxoptim.step_in_backward(opt_a, accumulate=2, accumulation="optimizer"):
        ordinary(a, opt_a, xs, accumulate=2)
    absorb = oxoptim.StepInBackward._absorb
    failures = [RuntimeError("refused once")]

    def flaky(self: Any, p: torch.Tensor) -> None:
        if failures and threading.current_thread() is not threading.main_thread():
            raise failures.pop()
        absorb(self, p)

    monkeypatch.setattr(oxoptim.StepInBackward, "_absorb", flaky)
    b(xs[0]).backward()
    opt_b._worker.drain()
    b(xs[1]).backward()
    with pytest.raises(RuntimeError, match="refused once"):
        opt_b.step()
    opt_b.step()
    opt_b.zero_grad()
    ordinary(b, opt_b, xs[2:], accumulate=2)
    assert_same_training(a, opt_a, b, opt_b)


def test_close_from_a_global_step_hook_does_not_wait_for_the_worker_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    """A global step hook runs inside ``step()``, which holds the lock the idle worker needs to end."""
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(trained(model), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward="worker")
    handle = register_optimizer_step_post_hook(lambda o, a, k: opt.close())
    done = threading.Event()

    def go() -> None:
        model(batches(1, torch.float32)[0]).backward()
        opt.step()
        done.set()

    try:
        threading.Thread(target=go, daemon=True).start()
        assert done.wait(10), "step() with close() in a global step hook never returned"
    finally:
        handle.remove()


def test_a_dropped_optimizer_with_an_unraised_worker_error_is_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "_transfers_for", lambda device: Deferred(lands_early=True))
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(trained(model), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward="worker")
    original = type(opt.optimizer)._step_part

    def failing(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("worker failure")

    monkeypatch.setattr(type(opt.optimizer), "_step_part", failing)
    model(batches(1, torch.float32)[0]).backward()
    opt._worker.drain()
    assert opt._worker._error is not None
    monkeypatch.setattr(type(opt.optimizer), "_step_part", original)
    gone = weakref.ref(opt)
    del opt
    for _ in range(3):
        gc.collect()
    assert gone() is None
    assert offload._owner(model.w1) is None
    CPUOffloadOptimizer(trained(model), oxoptim.AdamW, lr=0.01)  # refused while another offload holds them


EDITS = {
    "clip_grad_norm_": lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01),
    "grad set to None": lambda m: setattr(m.w2, "grad", None),
    "grad scaled in place": lambda m: m.b1.grad.mul_(3.0),
    "grad replaced": lambda m: setattr(m.w1, "grad", m.w1.grad * 0.5),
    "weights loaded": lambda m: m.load_state_dict(Toy("mlp", seed=5).state_dict()),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_changes_between_backward_and_step_are_seen(edit: str, cls: Any, simulated: Deferred) -> None:
    """The ordinary loop steps the gradients and weights as they are at ``step()``."""
    _assert_edits_seen(edit, cls)


def _assert_edits_seen(edit: str, cls: Any, **kwargs: Any) -> None:
    """Three iterations, each with ``EDITS[edit]`` between backward and step(): as the plain optimizer's."""
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(cls, **kwargs)
    for x in xs:
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).backward()
            EDITS[edit](model)
            opt.step()
            opt.zero_grad()
    assert_same_training(a, opt_a, b, opt_b)


def test_a_refused_step_updates_everything_once_retried(simulated: Deferred) -> None:
    """Schedule-Free steps in train mode only: the refused step writes nothing, the retry all."""
    x = batches(1, torch.float32)[0]
    a, opt_a, b, opt_b = pair(oxoptim.AdamWScheduleFree, hyper={"lr": 0.01}, bucket_numel=0)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).backward()
        with pytest.raises(Exception, match="train"):
            opt.step()
        opt.train()
        opt.step()
    assert_same_training(a, opt_a, b, opt_b)
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), Toy("mlp").parameters()))


def test_clip_previous_norm_resumes(simulated: Deferred) -> None:
    """The previous iteration's norm travels in the state dict: a resumed run goes on unchanged."""
    xs = batches(6, torch.float32)
    clip = ClipPreviousNorm(0.05)
    a, b = Toy("mlp"), Toy("mlp")
    opt_a = CPUOffloadOptimizer(trained(a), oxoptim.SGD, lr=0.1, momentum=0.9, clip=clip)
    opt_b = CPUOffloadOptimizer(trained(b), oxoptim.SGD, lr=0.1, momentum=0.9, clip=clip)
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    assert saved["previous_grad_norm"] is not None
    opt_b.close()
    opt_b = CPUOffloadOptimizer(trained(b), oxoptim.SGD, lr=0.1, momentum=0.9, clip=clip)
    opt_b.load_state_dict(saved)
    ordinary(b, opt_b, xs[3:])
    assert_same_training(a, opt_a, b, opt_b)


def test_one_offload_per_parameter_and_a_dropped_one_lets_go(simulated: Deferred) -> None:
    model = Toy("mlp")
    first = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    with pytest.raises(RuntimeError, match="already offloaded by another CPUOffloadOptimizer"):
        CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    first.close()
    second = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    del second  # dropped without close(): collected, its hooks removed
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    third = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    model(batches(1, torch.float32)[0]).backward()
    third.step()
    assert len(third.state) == 3


def test_a_parameter_unfrozen_after_construction_is_refused(simulated: Deferred) -> None:
    model = Toy("partial")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    model.frozen.requires_grad_(True)
    model(batches(1, torch.float32)[0]).backward()
    with pytest.raises(RuntimeError, match="did not require grad when the CPUOffloadOptimizer was built"):
        opt.step()


def test_torch_optimizer_surface(simulated: Deferred) -> None:
    a, opt_a, b, opt_b = pair()
    assert not hasattr(opt_b, "train") and not hasattr(opt_b, "eval")  # as frameworks probe it
    assert callable(CPUOffloadOptimizer(trained(Toy("mlp")), oxoptim.SGDScheduleFree, lr=0.1).train)
    calls = []
    opt_b.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    opt_b.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    opt_b.register_state_dict_post_hook(lambda opt, sd: calls.append(("state_dict", None)))
    sched = torch.optim.lr_scheduler.LinearLR(opt_b, 0.5, total_iters=2)
    b(batches(1, torch.float32)[0]).backward()
    opt_b.step()
    sched.step()
    opt_b.state_dict()
    assert calls == [("pre", opt_b), ("post", opt_b), ("state_dict", None)]
    for copier in (copy.deepcopy, lambda o: pickle.dumps(o)):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            copier(opt_b)
    with pytest.raises(NotImplementedError):
        opt_b.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(TypeError, match="cannot run LBFGS"):
        CPUOffloadOptimizer(trained(Toy("mlp")), torch.optim.LBFGS)


def test_sparse_gradients_are_refused(simulated: Deferred) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = CPUOffloadOptimizer(emb.parameters(), torch.optim.SGD, lr=0.1)  # noqa: F841 (kept alive: its hooks)
    with pytest.raises(RuntimeError, match="does not take torch.sparse_coo gradients"):
        emb(torch.tensor([1, 2])).sum().backward()


def test_zero_grad_orders_the_next_forward_after_the_copies_back(monkeypatch: pytest.MonkeyPatch) -> None:
    transfers = Deferred(lands_early=False)
    calls: list[str] = []
    monkeypatch.setattr(transfers, "to_device", lambda dst, src: (calls.append("to_device"), dst.copy_(src)))
    monkeypatch.setattr(transfers, "before_compute", lambda: calls.append("before_compute"))
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01, bucket_numel=0, update_during_backward=True)
    model(batches(1, torch.float32)[0]).backward()
    opt.zero_grad()  # updates what arrived, sends it back: the next forward must wait for that
    assert "to_device" in calls and calls[-1] == "before_compute"


@pytest.mark.parametrize("between", ["model.zero_grad", "grad = None", "accumulate"])
@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_two_backward_passes_before_step_are_the_ordinary_loop(between: str, cls: Any, simulated: Deferred) -> None:
    """A retried batch (the first gradient dropped) or gradients summed over two passes."""
    xs = batches(4, torch.float32)
    a, opt_a, b, opt_b = pair(cls)
    for i in range(0, 4, 2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(xs[i]).backward()
            if between == "model.zero_grad":
                model.zero_grad()
            elif between == "grad = None":
                model.w1.grad = None
            model(xs[i + 1]).backward()
            opt.step()
            opt.zero_grad()
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_a_second_backward_with_offloaded_gradients_is_refused(cls: Any, simulated: Deferred) -> None:
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), cls, lr=0.01, offload_gradients=True)  # noqa: F841
    xs = batches(2, torch.float32)
    model(xs[0]).backward()
    with pytest.raises(RuntimeError, match="a second backward before step"):
        model(xs[1]).backward()


def test_changed_gradients_are_all_copied_again_before_any_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """clip_grad_norm_ after backward: every gradient is copied again, all issued before step()
    waits for the first (so the copies overlap each other and the updates)."""
    transfers = Deferred(lands_early=False, delay=NEVER)
    log: list[str] = []
    issue, run = transfers.to_host, _Event.run
    monkeypatch.setattr(transfers, "to_host", lambda dst, src: (log.append("issue"), issue(dst, src))[1])
    monkeypatch.setattr(_Event, "run", lambda event: (log.append("land"), run(event))[1])
    monkeypatch.setattr(offload, "_transfers_for", lambda device: transfers)
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    model(batches(1, torch.float32)[0]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    log.clear()
    opt.step()
    assert log[:3] == ["issue"] * 3 and log.count("issue") == 3


def test_global_step_hooks_run_once_per_step(simulated: Deferred) -> None:
    calls: list[str] = []
    pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    try:
        model = Toy("mlp")
        opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
        model(batches(1, torch.float32)[0]).backward()
        opt.step()
    finally:
        pre.remove()
        post.remove()
    assert calls == ["pre", "post"]


def test_a_closed_optimizer_writes_nothing_and_the_model_pickles(simulated: Deferred) -> None:
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    torch.save(model, io.BytesIO())  # an offloaded model saves whole
    model(batches(1, torch.float32)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_frozen_parameter_with_an_old_gradient_is_no_unfrozen_one(simulated: Deferred) -> None:
    """A plain optimizer holds every parameter given: its zero_grad clears a frozen one's gradient too."""
    model = Toy("partial")
    model.frozen.grad = torch.ones_like(model.frozen)
    opt = CPUOffloadOptimizer(model.parameters(), oxoptim.AdamW, lr=0.01)
    model(batches(1, torch.float32)[0]).backward()
    opt.step()  # frozen still does not require grad: not refused
    opt.zero_grad()
    assert model.frozen.grad is None


# -- found by a review: each test fails without its fix --------------------------------------------------
WHOLE = pytest.mark.parametrize("cls, hyper", [(torch.optim.AdamW, {"lr": 0.01}), (oxoptim.Prodigy, {"lr": 1.0})],
                                ids=["torch", "prodigy"])


@WHOLE
@DURING
def test_an_optimizer_stepped_whole_refuses_a_second_offloaded_backward_in_every_mode(cls: Any, hyper: dict, during: Any,
                                                                                     simulated: Deferred) -> None:
    """Nothing is updated during backward for it: a second backward would overwrite the first
    gradient's copy, so it is refused as in the default mode."""
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(model.parameters(), cls, offload_gradients=True, update_during_backward=during, **hyper)
    xs = batches(2, torch.float32)
    model(xs[0]).backward()
    with pytest.raises(RuntimeError, match="a second backward before step"):
        model(xs[1]).backward()


@WHOLE
@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
@pytest.mark.parametrize("during", WHEN[1:], ids=WHEN_IDS[1:])
def test_an_optimizer_stepped_whole_sees_changes_after_backward_in_every_mode(cls: Any, hyper: dict, edit: str, during: Any,
                                                                             simulated: Deferred) -> None:
    _assert_edits_seen(edit, cls, hyper=hyper, update_during_backward=during)


@pytest.mark.parametrize("offload_gradients", [False, True], ids=["keep-grads", "offload-grads"])
def test_a_step_torch_refused_steps_the_same_gradients_once_retried(offload_gradients: bool, simulated: Deferred) -> None:
    """torch's Adam(capturable=True) refuses CPU parameters; the retry without it steps the
    gradients of the refused call, offloaded or not, as the plain optimizer does."""
    x = batches(1, torch.float32)[0]
    a, opt_a, b, opt_b = pair(torch.optim.Adam, hyper={"lr": 0.01, "capturable": True}, offload_gradients=offload_gradients)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).backward()
        with pytest.raises(AssertionError, match="capturable=True"):
            opt.step()
        for group in opt.param_groups:
            group["capturable"] = False
        opt.step()
    assert_same_training(a, opt_a, b, opt_b)
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), Toy("mlp").parameters()))


@pytest.mark.parametrize("offload_gradients", [False, True], ids=["keep-grads", "offload-grads"])
@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_step_pre_hooks_run_before_anything_is_updated(cls: Any, offload_gradients: bool, simulated: Deferred) -> None:
    """A global step pre-hook that raises changes nothing (the retry steps everything once); what
    the wrapped optimizer's own pre-hook sets (its lr) is used by this step."""
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(cls, offload_gradients=offload_gradients)
    initial = [p.detach().clone() for p in b.parameters()]
    refuse: list[str] = []

    def global_hook(opt: Any, args: Any, kwargs: Any) -> None:
        if refuse:
            raise RuntimeError(refuse.pop())

    def halve_lr(opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            group["lr"] *= 0.5

    opt_a.register_step_pre_hook(halve_lr)
    opt_b.optimizer.register_step_pre_hook(halve_lr)
    handle = register_optimizer_step_pre_hook(global_hook)
    try:
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(xs[0]).backward()
            refuse.append("refused")
            with pytest.raises(RuntimeError, match="refused"):
                opt.step()
            assert not opt.state and all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
            opt.step()
            opt.zero_grad()
            ordinary(model, opt, xs[1:])
    finally:
        handle.remove()
    assert_same_training(a, opt_a, b, opt_b)


@DURING
def test_zero_grad_keeps_the_micro_batches_already_absorbed(during: Any, simulated: Deferred) -> None:
    """``accumulation="optimizer"``: a batch dropped after two of its three micro-batches keeps
    both in the moments, as ``step_in_backward`` does (each is absorbed as it arrives)."""
    xs = batches(5, torch.float32)
    a, opt_a, b, opt_b = pair(accumulate=3, accumulation="optimizer", offload_gradients=True, bucket_numel=0,
                              update_during_backward=during)
    with oxoptim.step_in_backward(opt_a, accumulate=3, accumulation="optimizer", bucket_numel=0):
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(xs[0]).backward()
            model(xs[1]).backward()
            opt.zero_grad()
            ordinary(model, opt, xs[2:], accumulate=3)
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("norm", [2.5, torch.ones(2)], ids=["float", "two-elements"])
def test_a_refused_previous_grad_norm_changes_nothing(norm: Any, simulated: Deferred) -> None:
    model = Toy("mlp")
    opt = CPUOffloadOptimizer(trained(model), oxoptim.SGD, lr=0.1, momentum=0.9, clip=ClipPreviousNorm(0.05))
    ordinary(model, opt, batches(2, torch.float32))
    before = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(before)
    saved["param_groups"][0]["lr"] = 0.5
    saved["state"][0]["momentum_buffer"].zero_()
    saved["previous_grad_norm"] = norm
    with pytest.raises(TypeError, match="previous_grad_norm must be None or a one-element tensor"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["previous_grad_norm"], before["previous_grad_norm"])
    assert all(torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"]) for k, v in before["state"].items())


@pytest.mark.parametrize("cls, hyper", [(oxoptim.AdamW, dict(lr=0.01, bf16_stochastic_round=True)),
                                        (oxoptim.AdamW8bit, dict(lr=0.01, min_8bit_size=16, bf16_stochastic_round=True))],
                         ids=["AdamW", "AdamW8bit"])
def test_frozen_parameters_left_out_keep_the_rounding_streams(cls: Any, hyper: dict, simulated: Deferred) -> None:
    """bf16 stochastic rounding: each parameter's stream is its position among the parameters
    given, the frozen ones the offload leaves out included, as in the plain optimizer."""
    xs = batches(4, torch.bfloat16)
    a, b = Toy("partial", torch.bfloat16), Toy("partial", torch.bfloat16)
    torch.manual_seed(3)
    opt_a = cls(a.parameters(), **hyper)
    torch.manual_seed(3)
    opt_b = CPUOffloadOptimizer(b.parameters(), cls, **hyper)
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs"


@pytest.mark.parametrize("cls", [oxoptim.AdamW, torch.optim.AdamW], ids=["oxoptim", "torch"])
def test_named_parameters_are_taken_as_torch_takes_them(cls: Any, simulated: Deferred) -> None:
    xs = batches(3, torch.float32)
    a, b = Toy("mlp"), Toy("mlp")
    opt_a = cls(a.named_parameters(), lr=0.01)
    opt_b = CPUOffloadOptimizer(b.named_parameters(), cls, lr=0.01)
    assert opt_b.param_groups[0]["param_names"] == ["w1", "b1", "w2"]
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("cls", [oxoptim.SGD, torch.optim.SGD], ids=["oxoptim", "torch"])
@pytest.mark.parametrize("warmed", [False, True], ids=["first-step", "after-a-step"])
def test_a_grad_scaler_is_refused_before_anything_is_written(cls: Any, warmed: bool, simulated: Deferred) -> None:
    xs = batches(3, torch.float32)
    a, opt_a, b, opt_b = pair(cls, hyper={"lr": 0.01})
    if warmed:
        ordinary(a, opt_a, xs[:1])
        ordinary(b, opt_b, xs[:1])
    before = [p.detach().clone() for p in b.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(b(xs[1])).backward()
    with pytest.raises(RuntimeError, match="does not support a GradScaler"):
        scaler.step(opt_b)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))
    opt_b.zero_grad()
    ordinary(a, opt_a, xs[2:])  # the optimizer goes on without the scaler
    ordinary(b, opt_b, xs[2:])
    assert_same_training(a, opt_a, b, opt_b)


# -- on a GPU ---------------------------------------------------------------------------------------------
def _gpu_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 8)]
    return torch.nn.Sequential(*layers).cuda()


def _capture_grads(gpu: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Each parameter's gradient as its hook sees it, copied to the CPU by hand. Registered before
    the offload's hooks, so it runs before the gradient is released."""
    seen: dict[int, torch.Tensor] = {}
    for i, p in enumerate(gpu.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, i=i: seen.__setitem__(i, p.grad.detach().cpu()))
    return seen


def _step_both(opt: Any, ref: Any, cpu: list[torch.Tensor], seen: dict[int, torch.Tensor]) -> None:
    """The offloaded step, and the reference's on CPU copies with the gradients seen."""
    opt.step()
    opt.zero_grad()
    for i, c in enumerate(cpu):
        c.grad = seen.pop(i)
    ref.step()
    ref.zero_grad()


def _assert_gpu_equals(gpu: torch.nn.Module, cpu: list[torch.Tensor]) -> None:
    torch.cuda.synchronize()
    for p, c in zip(gpu.parameters(), cpu):
        assert torch.equal(p.cpu(), c)


@needs_cuda
@pytest.mark.parametrize("cls,kw", [(oxoptim.AdamW, dict(lr=1e-3)), (oxoptim.SGD, dict(lr=0.01, momentum=0.9)),
                                    (oxoptim.AdamW8bit, dict(lr=1e-3)), (torch.optim.AdamW, dict(lr=1e-3, fused=True))],
                         ids=["adamw", "sgd", "adamw8bit", "torch-adamw-fused"])
@pytest.mark.parametrize("offload_gradients", [False, True], ids=["keep-grads", "offload-grads"])
@pytest.mark.parametrize("bucket_numel", [0, 1 << 16])
@DURING
def test_cuda_bit_identical_to_stepping_cpu_copies(cls: Any, kw: dict, offload_gradients: bool, bucket_numel: int, during: bool) -> None:
    """The reference steps CPU copies of the weights with the same gradients, copied by hand (a hook
    registered before the offload's sees each gradient before it is released)."""
    gpu = _gpu_model(0)
    cpu = [p.detach().cpu().requires_grad_() for p in gpu.parameters()]
    ref = cls(cpu, **kw)
    seen = _capture_grads(gpu)
    opt = CPUOffloadOptimizer(gpu.parameters(), cls, offload_gradients=offload_gradients, bucket_numel=bucket_numel,
                              update_during_backward=during, **kw)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(5):
        x = torch.randn(64, 256, device="cuda", generator=gen)
        gpu(x).square().mean().backward()
        if offload_gradients:
            assert all(p.grad is None for p in gpu.parameters())
        _step_both(opt, ref, cpu, seen)
    _assert_gpu_equals(gpu, cpu)
    ours, theirs = opt.state_dict()["state"], ref.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key, entry in theirs.items():
        for name, value in entry.items():
            got = ours[key][name]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, f"state[{key}][{name!r}]"


@needs_cuda
def test_cuda_holds_no_optimizer_state_and_releases_gradients() -> None:
    """Peak GPU memory of an iteration: the offloaded optimizer adds nothing beyond the model's own
    weights and activations, where torch's AdamW on the GPU adds two moments and the gradients."""

    def peak(make_opt: Callable[[torch.nn.Module], Any]) -> tuple[int, int]:
        model = _gpu_model(1)
        opt = make_opt(model)
        x = torch.randn(64, 256, device="cuda")
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, base  # above what stays, and what stays

    weights = sum(p.numel() * 4 for p in _gpu_model(1).parameters())
    (extra_torch, held_torch) = peak(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True))
    (extra_ours, held_ours) = peak(lambda m: CPUOffloadOptimizer(m.parameters(), oxoptim.AdamW, lr=1e-3, offload_gradients=True))
    assert held_torch - held_ours >= 2 * weights  # two moments live on the CPU
    assert extra_ours < extra_torch  # and gradients are freed as they are copied


@needs_cuda
@DURING
def test_cuda_gradient_accumulation_and_reloaded_weights(during: bool) -> None:
    """Two micro-batches per step summed in the GPU gradient; weights loaded into the model between
    steps reach the CPU copies. The reference steps CPU copies with the summed gradients."""
    gpu = _gpu_model(0)
    cpu = [p.detach().cpu().requires_grad_() for p in gpu.parameters()]
    ref = oxoptim.AdamW(cpu, lr=1e-3)
    seen = _capture_grads(gpu)  # the last micro-batch's hook sees the sum
    opt = CPUOffloadOptimizer(gpu.parameters(), oxoptim.AdamW, lr=1e-3, accumulate=2, update_during_backward=during)
    gen = torch.Generator(device="cuda").manual_seed(4)
    for step in range(4):
        if step == 2:
            fresh = _gpu_model(9).state_dict()
            gpu.load_state_dict(fresh)
            with torch.no_grad():
                for c, w in zip(cpu, fresh.values()):
                    c.copy_(w.cpu())
        for _ in range(2):
            gpu(torch.randn(64, 256, device="cuda", generator=gen)).square().mean().backward()
        _step_both(opt, ref, cpu, seen)
    _assert_gpu_equals(gpu, cpu)


EIGHT_BIT = [
    (oxoptim.AdamW8bit, dict(lr=0.01, min_8bit_size=16), torch.float32),
    (oxoptim.SGD8bit, dict(lr=0.1, momentum=0.9, nesterov=True, min_8bit_size=16), torch.float32),
    (oxoptim.AdamW8bit, dict(lr=0.01, min_8bit_size=16, bf16_stochastic_round=True), torch.bfloat16),
    (oxoptim.SGD8bit, dict(lr=0.1, momentum=0.9, min_8bit_size=16, bf16_stochastic_round=True), torch.bfloat16),
]


@pytest.mark.parametrize("cls, hyper, dtype", EIGHT_BIT, ids=["AdamW8bit", "SGD8bit", "AdamW8bit-bf16-SR", "SGD8bit-bf16-SR"])
@DURING
def test_8bit_optimizers_offloaded_are_the_ordinary_loop(cls: Any, hyper: dict, dtype: torch.dtype, during: Any,
                                                          simulated: Deferred) -> None:
    """8-bit state (weights from 16 elements up here, the rest float) kept with the CPU copies: the
    same weights and state as the ordinary loop, bit for bit, whichever thread updates."""
    xs = batches(5, dtype)
    a, b = Toy("mlp", dtype), Toy("mlp", dtype)
    torch.manual_seed(3)  # the same stochastic-rounding seed for both
    opt_a = cls(trained(a), **hyper)
    torch.manual_seed(3)
    opt_b = CPUOffloadOptimizer(trained(b), cls, bucket_numel=40, update_during_backward=during, **hyper)
    ordinary(a, opt_a, xs)
    ordinary(b, opt_b, xs)
    assert simulated.issued, "nothing went through the transfers"
    assert_same_training(a, opt_a, b, opt_b)
    assert any(v.dtype == torch.uint8 for entry in opt_a.state.values() for v in entry.values())
