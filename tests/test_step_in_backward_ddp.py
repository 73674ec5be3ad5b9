"""``step_in_backward(opt, ddp=model)`` under DDP (gloo, 2 CPU processes): each DDP bucket is
updated after its allreduce, and the parameters equal the ordinary DDP loop's bit for bit."""

from __future__ import annotations

import contextlib
import os

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
