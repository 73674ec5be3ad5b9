"""oxoptim under torch.distributed (gloo, 2 CPU processes): DDP and ZeRO."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import oxoptim

WORLD = 2
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def _train(model, opt, rank):
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        finals = {}
        for name, cls in (("oxoptim", oxoptim.AdamW), ("torch", torch.optim.AdamW)):
            model = DDP(_model())
            _train(model, cls(model.parameters(), lr=0.01), rank)
            finals[name] = [p.detach().clone() for p in model.parameters()]

        zero_model = DDP(_model())
        zero = ZeroRedundancyOptimizer(zero_model.parameters(), optimizer_class=oxoptim.AdamW, lr=0.01)
        _train(zero_model, zero, rank)
        finals["zero"] = [p.detach().clone() for p in zero_model.parameters()]
        zero.consolidate_state_dict(to=0)
        # Rank 0 holds the consolidated dict; every rank loads it into a fresh ZeRO optimizer.
        payload = [zero.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        reloaded_model = DDP(_model())
        reloaded = ZeroRedundancyOptimizer(reloaded_model.parameters(), optimizer_class=oxoptim.AdamW, lr=0.01)
        reloaded.load_state_dict(payload[0])
        local = reloaded.optim.state_dict()["state"]
        finals["reloaded_steps"] = sorted(float(s["step"]) for s in local.values())
        torch.save(finals, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def run_workers(worker) -> list:
    """Runs ``worker(rank, port, out_dir)`` in WORLD spawned processes; what each saved as ``rank{r}.pt``."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker)


def test_ddp_adamw_matches_torch(results) -> None:
    for rank in results:
        for a, b in zip(rank["oxoptim"], rank["torch"]):
            torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5)
    # DDP keeps replicas identical.
    for a, b in zip(results[0]["oxoptim"], results[1]["oxoptim"]):
        assert torch.equal(a, b)


def test_zero_redundancy_optimizer_trains_like_plain_adamw(results) -> None:
    for rank in results:
        for a, b in zip(rank["zero"], rank["torch"]):
            torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5)


def test_zero_consolidated_state_dict_loads_back(results) -> None:
    for rank in results:
        assert rank["reloaded_steps"] and all(s == STEPS for s in rank["reloaded_steps"])
