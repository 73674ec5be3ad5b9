"""torch.distributed (torchrun) for the trainer: which rank this is, DDP wrapping, and the few collectives."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

__all__ = ["check_distributed_stage", "Processes", "param_digest"]


@dataclass(frozen=True)
class Processes:
    """This process's place among the job's processes (one process: rank 0 of 1, no collectives)."""

    distributed: bool = False
    rank: int = 0
    world: int = 1

    @classmethod
    def detect(cls) -> "Processes":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(True, dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module training steps run: DDP around ``model`` when distributed."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of the examples ``idx``."""
        return idx[self.rank::self.world]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (in place when distributed)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(values)
        return values

    def mean_gradients(self, model: nn.Module, n_local: int) -> None:
        """After a full-batch accumulation: each rank's mean gradient over its ``n_local`` examples
        becomes the mean over all ranks' examples."""
        if not self.distributed:
            return
        n = self.sum(torch.tensor([float(n_local)]))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(n_local / n.item())
                self.sum(p.grad)

    def gather_on_main(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, as a list on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: Optional[List[Any]] = [None] * self.world if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def agreement(self, model: nn.Module) -> dict:
        """Every rank's parameter digest, and whether they agree (warns on stderr when not)."""
        import torch.distributed as dist

        digests: List[Any] = [None] * self.world
        dist.all_gather_object(digests, param_digest(model))
        agree = len(set(digests)) == 1
        if not agree:
            print(f"warning: the ranks' final parameters differ: {digests}", file=sys.stderr, flush=True)
        return {"rank_param_digests": digests, "ranks_agree": agree}


def param_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes): equal digests, equal weights."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_distributed_stage(stage, n_train: Optional[int], world: int) -> None:
    """What a stage needs under DDP, checked before training: every rank gets examples from every
    batch (else it would skip a backward the others wait in), step_in_backward accumulates
    gradients, not optimizer state (its updates run once per reduced bucket), and every parameter
    trains (DDP registered them all when it wrapped the model)."""
    if stage.step_in_backward and stage.accumulate > 1 and stage.accumulation == "optimizer":
        raise ValueError(f"stage {stage.name!r}: under DDP, step_in_backward accumulates gradients "
                         f"(accumulation = 'gradient'): it updates each bucket after its allreduce")
    if stage.trainable != "all":
        raise ValueError(f"stage {stage.name!r}: trainable = {stage.trainable!r} is not supported under DDP: the model "
                         "is wrapped once with every parameter trainable, and DDP would wait for gradients of the "
                         "frozen ones (use trainable = 'all')")
    if stage.full_batch or n_train is None:  # the batch check needs the data
        return
    bs = int(stage.batch_size)
    last = 0 if stage.steps_per_epoch else n_train % bs
    if bs < world or 0 < last < world:
        raise ValueError(f"stage {stage.name!r}: with {world} processes every batch needs >= {world} examples "
                         f"(one per process); batch_size {bs} over {n_train} training examples leaves a last batch "
                         f"of {last if 0 < last < world else bs}: choose another batch_size")
