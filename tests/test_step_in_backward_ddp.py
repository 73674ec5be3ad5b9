"""``step_in_backward(opt, ddp=model)`` under DDP (gloo, 2 CPU processes): each DDP bucket is
updated after its allreduce, and the parameters equal the ordinary DDP loop's bit for bit."""

from __future__ import annotations

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
