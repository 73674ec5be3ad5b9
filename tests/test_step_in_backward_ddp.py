"""``step_in_backward(opt, ddp=model)`` under DDP (gloo, 2 CPU processes): each DDP bucket is
updated after its allreduce, and the parameters equal the ordinary DDP loop's bit for bit."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_distributed import WORLD, _batch, run_workers

import oxoptim

STEPS = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Big enough for several DDP buckets at bucket_cap_mb=0.01 (10 kB).
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        out = {}
        for name in ("ordinary", "in_backward"):
            model = DDP(_model(), bucket_cap_mb=0.01)
            opt = oxoptim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
            released = []
            if name == "ordinary":
                for step in range(STEPS):
                    x, y = _batch(rank, step)
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
            else:
                with oxoptim.step_in_backward(opt, ddp=model):
                    for step in range(STEPS):
                        x, y = _batch(rank, step)
                        torch.nn.functional.mse_loss(model(x), y).backward()
                        released.append(all(p.grad is None for p in model.parameters()))
                        opt.step()
                out["released"] = released
            out[name] = [p.detach().clone() for p in model.parameters()]
            out[name + "_state"] = opt.state_dict()["state"]
        # accumulate=2: the first micro-batch under no_sync() or reduced too; the update in the 2nd's allreduce
        for name in ("ordinary", "in_backward"):
            for no_sync in (True, False):
                model = DDP(_model(), bucket_cap_mb=0.01)
                opt = oxoptim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
                released = []
                ctx = oxoptim.step_in_backward(opt, ddp=model, accumulate=2) if name == "in_backward" else None
                if ctx is not None:
                    ctx.__enter__()
                for step in range(STEPS):
                    for micro in range(2):
                        x, y = _batch(rank, 2 * step + micro)
                        sync = model.no_sync() if (no_sync and micro == 0) else contextlib.nullcontext()
                        with sync:
                            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
                        if micro == 0:
                            released.append(any(p.grad is None for p in model.parameters()))
                    released.append(all(p.grad is None for p in model.parameters()))
                    opt.step()
                    opt.zero_grad()
                if ctx is not None:
                    ctx.close()
                key = f"{name}_acc_{'no_sync' if no_sync else 'sync'}"
                out[key] = [p.detach().clone() for p in model.parameters()]
                out[key + "_released"] = released
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker)


def test_parameters_and_state_equal_the_ordinary_ddp_loop(results) -> None:
    for rank in results:
        for a, b in zip(rank["ordinary"], rank["in_backward"]):
            assert torch.equal(a, b)
        for key, entry in rank["ordinary_state"].items():
            for name, value in entry.items():
                assert torch.equal(value, rank["in_backward_state"][key][name]), f"state[{key}][{name!r}]"
    for a, b in zip(results[0]["in_backward"], results[1]["in_backward"]):
        assert torch.equal(a, b)


def test_gradients_are_released_after_each_backward(results) -> None:
    for rank in results:
        assert rank["released"] == [True] * STEPS


@pytest.mark.parametrize("pattern", ["no_sync", "sync"])
def test_accumulation_equals_the_ordinary_ddp_loop(results, pattern) -> None:
    """accumulate=2 under DDP: the first micro-batch under no_sync() (the usual idiom) or reduced as
    well; either way bit-identical to the ordinary DDP loop with the same pattern, the update in
    the second micro-batch's allreduce, which releases the gradients."""
    for rank in results:
        for a, b in zip(rank[f"ordinary_acc_{pattern}"], rank[f"in_backward_acc_{pattern}"]):
            assert torch.equal(a, b)
        released = rank[f"in_backward_acc_{pattern}_released"]
        assert released == [False, True] * STEPS  # kept after the 1st micro-batch, gone after the 2nd
    assert not all(torch.equal(a, b) for a, b in zip(results[0]["ordinary_acc_no_sync"], results[0]["ordinary"]))


# -- which backward is the K-th; parameters no rank used ----------------------------------------

ITERS = 3


class _Branchy(torch.nn.Module):
    """``unused`` takes part in no forward (no rank uses it: DDP leaves its gradient None);
    ``rank0`` is used on rank 0 only (DDP reduces it: the other rank contributes zeros)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 64)
        self.unused = torch.nn.Linear(64, 4)
        self.rank0 = torch.nn.Linear(64, 4)
        self.b = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, use_rank0: bool) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        out = self.b(h)
        return out + self.rank0(h) if use_rank0 else out


def _snapshot(model: torch.nn.Module, opt: Any) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()["state"]}


def _both_loops(make_model: Any, make_optimizer: Any, accumulate: int) -> Any:
    """Yields ``(name, model, optimizer)`` for the ordinary DDP loop, then for step_in_backward's
    (the loop body runs inside its context); the optimizer is made with lr=0.01."""
    for name in ("ordinary", "in_backward"):
        model = make_model()
        opt = make_optimizer(model.parameters(), lr=0.01)
        in_backward = oxoptim.step_in_backward(opt, ddp=model, accumulate=accumulate)
        with in_backward if name == "in_backward" else contextlib.nullcontext():
            yield name, model, opt


def _robust_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        out: dict = {}
        mse = torch.nn.functional.mse_loss
        # Defect A: accumulate=2 with one grad-enabled forward per iteration that is never
        # backpropagated (a metric computed without torch.no_grad()).
        for pattern in ("no_sync", "sync"):
            for name, model, opt in _both_loops(lambda: DDP(_model(), bucket_cap_mb=0.01), oxoptim.Adam, 2):
                for step in range(ITERS):
                    x, _ = _batch(rank, 100 + step)
                    metric = model(x).abs().mean()  # grad enabled, never backpropagated
                    assert metric.requires_grad
                    for micro in range(2):
                        x, y = _batch(rank, 2 * step + micro)
                        sync = model.no_sync() if (pattern == "no_sync" and micro == 0) else contextlib.nullcontext()
                        with sync:
                            (mse(model(x), y) / 2).backward()
                    opt.step()
                    opt.zero_grad()
                out[f"extra_forward_{pattern}_{name}"] = _snapshot(model, opt)
        # More backward passes than accumulate= before optimizer.step(): refused, not stepped twice.
        model = DDP(_model(), bucket_cap_mb=0.01)
        opt = oxoptim.Adam(model.parameters(), lr=0.01)
        with oxoptim.step_in_backward(opt, ddp=model, accumulate=2):
            message = None
            try:
                for micro in range(3):
                    x, y = _batch(rank, micro)
                    mse(model(x), y).backward()
            except RuntimeError as e:
                message = str(e)
            out["third_backward_error"] = message
            out["third_backward_steps"] = sorted(float(s["step"]) for s in opt.state.values())
        # zero_grad() after the first of accumulate=2 micro-batches drops it (a skipped batch): the
        # next two backward passes make the iteration, as in the ordinary loop.
        for name, model, opt in _both_loops(lambda: DDP(_model(), bucket_cap_mb=0.01), oxoptim.Adam, 2):
            for step in range(ITERS):
                with model.no_sync():
                    x, y = _batch(rank, 50 + step)
                    (mse(model(x), y) / 2).backward()
                opt.zero_grad()  # dropped
                for micro in range(2):
                    x, y = _batch(rank, 2 * step + micro)
                    with model.no_sync() if micro == 0 else contextlib.nullcontext():
                        (mse(model(x), y) / 2).backward()
                opt.step()
                opt.zero_grad()
            out[f"dropped_{name}"] = _snapshot(model, opt)
        # Defect B: find_unused_parameters=True; accumulate=1, and accumulate=2 under no_sync()
        # with rank0 used in the first micro-batch only.
        for accumulate in (1, 2):
            branchy = lambda: DDP(_Branchy(), bucket_cap_mb=0.001, find_unused_parameters=True)  # noqa: E731
            for name, model, opt in _both_loops(branchy, lambda ps, lr: oxoptim.AdamW(ps, lr=lr, weight_decay=0.1), accumulate):
                for step in range(ITERS):
                    for micro in range(accumulate):
                        x, y = _batch(rank, accumulate * step + micro)
                        last = micro == accumulate - 1
                        sync = contextlib.nullcontext() if last else model.no_sync()
                        with sync:
                            use = rank == 0 and (accumulate == 1 or not last)
                            (mse(model(x, use), y) / accumulate).backward()
                    opt.step()
                    opt.zero_grad()
                out[f"unused_{accumulate}_{name}"] = _snapshot(model, opt)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def robust_results():
    return run_workers(_robust_worker)


def _assert_same(ordinary: dict, in_backward: dict) -> None:
    assert len(ordinary["params"]) == len(in_backward["params"])
    for i, (a, b) in enumerate(zip(ordinary["params"], in_backward["params"])):
        assert torch.equal(a, b), f"parameter {i}: max |diff| {(a - b).abs().max().item()}"
    assert ordinary["state"].keys() == in_backward["state"].keys()
    for key, entry in ordinary["state"].items():
        assert entry.keys() == in_backward["state"][key].keys(), f"state[{key}]"
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(in_backward["state"][key][name])), f"state[{key}][{name!r}]"


@pytest.mark.parametrize("pattern", ["no_sync", "sync"])
def test_a_forward_never_backpropagated_does_not_shift_the_kth_backward(robust_results, pattern) -> None:
    """accumulate=2 with an extra grad-enabled forward per iteration (a metric without no_grad):
    the update still runs once per iteration, in the 2nd backward, bit-identical to the ordinary loop."""
    for rank in robust_results:
        _assert_same(rank[f"extra_forward_{pattern}_ordinary"], rank[f"extra_forward_{pattern}_in_backward"])
        assert {float(s["step"]) for s in rank[f"extra_forward_{pattern}_in_backward"]["state"].values()} == {float(ITERS)}


def test_more_backward_passes_than_accumulate_raise(robust_results) -> None:
    for rank in robust_results:
        assert rank["third_backward_error"] is not None and "accumulate=2" in rank["third_backward_error"]
        assert set(rank["third_backward_steps"]) == {1.0}  # the 2nd backward's update only


@pytest.mark.parametrize("accumulate", [1, 2])
def test_parameters_no_rank_used_are_skipped_as_in_the_ordinary_loop(robust_results, accumulate) -> None:
    """find_unused_parameters=True: a parameter that no rank used keeps no gradient in the ordinary
    loop, so AdamW leaves it (no weight decay, no state); one used on rank 0 only is reduced and stepped."""
    for rank in robust_results:
        ordinary, in_backward = rank[f"unused_{accumulate}_ordinary"], rank[f"unused_{accumulate}_in_backward"]
        _assert_same(ordinary, in_backward)
        assert len(in_backward["state"]) == 6  # a, rank0, b: weight and bias each; not unused


def test_a_micro_batch_dropped_by_zero_grad_is_not_counted(robust_results) -> None:
    for rank in robust_results:
        _assert_same(rank["dropped_ordinary"], rank["dropped_in_backward"])


class DdpStandIn(torch.nn.Module):
    """What step_in_backward uses of DistributedDataParallel, without a process group: the
    registered communication hook is kept for the test to call."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.process_group = None
        self.comm_hooks: list = []

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        self.comm_hooks.append(hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_ddp_must_be_a_distributed_model() -> None:
    model = _model()
    with pytest.raises(TypeError, match="DistributedDataParallel model.*got Sequential"):
        oxoptim.step_in_backward(oxoptim.Adam(model.parameters()), ddp=model)


class _Bucket:
    def __init__(self, params: list, grads: list) -> None:
        self.params, self.grads = params, grads

    def index(self) -> int:
        return 0

    def parameters(self) -> list:
        return self.params

    def gradients(self) -> list:
        return self.grads


def _allreduce_by_hand(monkeypatch) -> torch.futures.Future:
    """The allreduce of the communication hook installed next: a future the test completes (on
    another thread, as gloo's threads complete theirs)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import oxoptim.backward

    allreduce: torch.futures.Future = torch.futures.Future()
    monkeypatch.setattr(default_hooks, "allreduce_hook", lambda state, bucket: allreduce)
    monkeypatch.setattr(oxoptim.backward, "_release_after_backward", lambda ddp, context: None)  # DDP's part
    return allreduce


def _launch_bucket(model: DdpStandIn, sib: Any) -> tuple[Any, list]:
    """Calls the communication hook as in the iteration's last backward pass; returns the update's future."""
    params = list(model.parameters())[-2:]
    for p in params:
        p.grad = torch.full_like(p, 9.0)  # the local gradient DDP copies the reduced bucket into
    sib._backwards, sib._used = 1, {id(p) for p in params}
    update = model.comm_hooks[0](None, _Bucket(params, [torch.ones_like(p) for p in params]))
    return update, params


def test_zero_grad_and_step_wait_for_a_bucket_update_still_running(monkeypatch) -> None:
    """A backward that raises after a bucket's allreduce was launched returns without DDP's wait
    for it: zero_grad() and step() wait for the update before they clear or step anything."""
    import threading

    for end in ("zero_grad", "step"):
        model = DdpStandIn(_model())
        opt = oxoptim.Adam(model.parameters(), lr=0.01)
        allreduce = _allreduce_by_hand(monkeypatch)
        with oxoptim.step_in_backward(opt, ddp=model) as sib:
            update, params = _launch_bucket(model, sib)
            before = [p.detach().clone() for p in params]
            threading.Timer(0.3, lambda: allreduce.set_result(torch.zeros(1))).start()
            getattr(opt, end)()
            assert update.done()
            assert all(not torch.equal(p, b) for p, b in zip(params, before))  # updated with the reduced ones
            assert all(float(opt.state[p]["step"]) == 1 for p in params)
            assert all(p.grad is None for p in params)  # released after the update lent its gradient back


def test_zero_grad_during_a_bucket_update_clears_the_gradients_after_it(monkeypatch) -> None:
    """The update lends the reduced gradient to ``p.grad`` and gives the local one back: a
    zero_grad() that cleared gradients meanwhile would find them back afterwards."""
    import threading
    import time

    model = DdpStandIn(_model())
    opt = oxoptim.Adam(model.parameters(), lr=0.01)
    allreduce = _allreduce_by_hand(monkeypatch)
    with oxoptim.step_in_backward(opt, ddp=model) as sib:
        started, plain_update = threading.Event(), sib._update

        def slow_update(*args: Any, **kwargs: Any) -> None:
            started.set()
            time.sleep(0.3)
            plain_update(*args, **kwargs)

        monkeypatch.setattr(sib, "_update", slow_update)
        update, params = _launch_bucket(model, sib)
        threading.Thread(target=allreduce.set_result, args=(torch.zeros(1),)).start()
        assert started.wait(10)
        opt.zero_grad()
        assert update.done() and all(p.grad is None for p in params)


def test_a_failed_bucket_update_fails_the_step(monkeypatch) -> None:
    model = DdpStandIn(_model())
    opt = oxoptim.Adam(model.parameters(), lr=0.01)
    allreduce = _allreduce_by_hand(monkeypatch)
    with oxoptim.step_in_backward(opt, ddp=model) as sib:
        update, params = _launch_bucket(model, sib)
        before = [p.detach().clone() for p in model.parameters()]
        allreduce.set_exception(RuntimeError("gloo went away"))
        with pytest.raises(RuntimeError, match="bucket's update failed.*restore the last checkpoint.*gloo went away"):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state
        opt.step()  # the next iteration: the remaining gradients are stepped as usual
        assert all(float(opt.state[p]["step"]) == 1 for p in params)


def test_a_ddp_bucket_is_never_updated_twice_in_one_iteration() -> None:
    """The guard behind the count: in the iteration's last backward pass, a DDP bucket whose
    parameters were updated is refused a second update (the context is not entered)."""
    model = DdpStandIn(_model())
    opt = oxoptim.Adam(model.parameters(), lr=0.01)
    sib = oxoptim.step_in_backward(opt, ddp=model, accumulate=2)
    sib._build_buckets()
    params = list(model.parameters())[-2:]

    class Bucket:
        def index(self) -> int:
            return 0

        def parameters(self) -> list:
            return params

    sib._backwards = 1
    assert sib._ddp_bucket_launched(Bucket()) is None  # not the last backward pass: a plain allreduce
    sib._backwards = 2
    sib._used = {id(params[0])}
    assert sib._ddp_bucket_launched(Bucket()) == {id(params[0])}  # params[1] is left to optimizer.step()
    with pytest.raises(RuntimeError, match="second time"):
        sib._ddp_bucket_launched(Bucket())
