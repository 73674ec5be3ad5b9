"""Which examples each step sees: seeded epoch orders, length buckets, and full-batch gradients."""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .distributed import Processes
from .stages import Stage

__all__ = ["steps_per_epoch", "epoch_order", "bucketed", "full_batch_gradient"]


def steps_per_epoch(stage: Stage, n_train: int) -> int:
    if stage.full_batch:
        return stage.steps_per_epoch or 1
    return stage.steps_per_epoch or max(1, math.ceil(n_train / int(stage.batch_size)))


def epoch_order(seed: int, epoch_counter: int, n: int, batch_size: int,
                lengths: Optional[torch.Tensor] = None, bucket: int = 0, steps: Optional[int] = None) -> torch.Tensor:
    """The epoch's example order, a function of (seed, epoch number) only, so resumable exactly: a
    permutation of the ``n`` examples, or (``steps`` batches that need more) several, one after the
    other. With ``lengths``, consecutive ``batch_size`` slices are batches of similar length."""
    g = torch.Generator()
    key = seed * 1_000_003 + epoch_counter
    if not -(2**63) <= key < 2**64:  # large seeds: folded into torch's range (the seeds that fit keep their order)
        key %= 2**64
    g.manual_seed(key)
    order = torch.randperm(n, generator=g)
    while steps is not None and len(order) < steps * batch_size:
        order = torch.cat([order, torch.randperm(n, generator=g)])
    if lengths is None or bucket <= 0:
        return order
    return bucketed(order, lengths, batch_size, bucket, g)


def bucketed(order: torch.Tensor, lengths: torch.Tensor, bs: int, bucket: int, g: torch.Generator) -> torch.Tensor:
    """``order`` cut into chunks of ``bucket`` batches, each chunk sorted by length and cut into
    batches, the full batches shuffled (the one short batch, if any, stays last)."""
    chunk = bucket * bs
    batches: List[torch.Tensor] = []
    for i in range(0, len(order), chunk):
        part = order[i:i + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches.extend(part[j:j + bs] for j in range(0, len(part), bs))
    full = [b for b in batches if len(b) == bs]
    short = [b for b in batches if len(b) < bs]  # at most one: the end of the last chunk
    perm = torch.randperm(len(full), generator=g).tolist()
    return torch.cat([full[k] for k in perm] + short)


def full_batch_gradient(model: nn.Module, n_train: int, micro_batch: int, procs: Processes,
                        forward_backward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Tuple[float, int]:
    """Leaves in ``.grad`` the exact mean gradient over all training examples, accumulated over
    micro-batches (:class:`oxoptim.GradientAverager`) and over ranks; returns (loss sum, count) of
    this rank's examples."""
    import oxoptim

    if not hasattr(oxoptim, "GradientAverager"):
        raise RuntimeError("batch_size='full' needs oxoptim.GradientAverager, which this build lacks")
    params = [p for p in model.parameters() if p.requires_grad]
    ga = oxoptim.GradientAverager(params)
    idx = torch.arange(procs.rank, n_train, procs.world)
    loss_sum, n_local = 0.0, 0
    for i in range(0, len(idx), micro_batch):
        b = idx[i:i + micro_batch]
        loss = forward_backward(model, b)
        ga.accumulate(len(b))
        loss_sum += loss.item() * len(b)
        n_local += len(b)
    ga.finalize()
    procs.mean_gradients(model, n_local)
    return loss_sum, n_local
