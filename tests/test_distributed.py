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


def _sr_worker(rank: int, port: int, out_dir: str) -> None:
    """bfloat16 DDP replicas with stochastic rounding, each rank's generator seeded differently
    before the optimizer is built (per-rank seeding for dropout or augmentation)."""
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        out = {}
        for name, make in (("AdamW", lambda ps: oxoptim.AdamW(ps, lr=1e-2, bf16_stochastic_round=True)),
                           ("AdamW8bit", lambda ps: oxoptim.AdamW8bit(ps, lr=1e-2, bf16_stochastic_round=True))):
            model = DDP(_model().to(torch.bfloat16))
            torch.manual_seed(100 + rank)
            opt = make(model.parameters())
            for step in range(4):
                x, y = _batch(rank, step)
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
                opt.step()
            out[name] = ([p.detach().clone() for p in model.parameters()], opt.param_groups[0]["sr_seed"])
        # A group given its own seed draws and broadcasts nothing: an optimizer built on one rank only.
        if rank == 1:
            alone = oxoptim.AdamW([{"params": [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], "sr_seed": 7}],
                                  bf16_stochastic_round=True)
            out["alone_seed"] = alone.param_groups[0]["sr_seed"]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_stochastic_rounding_seed_agrees_across_ranks() -> None:
    """Per-rank generator seeds: every rank takes rank 0's sr_seed, so the replicas DDP gives identical
    gradients round identically and stay bit-identical (as torch.optim.AdamW's do)."""
    r0, r1 = run_workers(_sr_worker)
    for name in ("AdamW", "AdamW8bit"):
        (p0, seed0), (p1, seed1) = r0[name], r1[name]
        assert seed0 == seed1
        assert all(p.dtype == torch.bfloat16 for p in p0)
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), name
    assert r1["alone_seed"] == 7 and "alone_seed" not in r0
