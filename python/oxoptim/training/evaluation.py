"""Evaluation: a task's loss and metrics over a data set, in batches, summed over ranks."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .distributed import Processes
from .tasks import Task

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: Any, batch_size: int, procs: Processes,
             by_length: bool = False) -> Dict[str, float]:
    """``{"loss": ..., <metric>: ...}``, means over every example of ``data`` (each rank scores its
    share). ``by_length``: batches of similar length (less padding for models that trim it)."""
    was_training = model.training
    model.eval()
    idx_all = torch.arange(procs.rank, task.size(data), procs.world)
    lengths = task.lengths(data) if by_length else None
    if lengths is not None:
        idx_all = idx_all[torch.argsort(lengths[idx_all], stable=True)]
    names = list(task.metric_modes)
    sums = torch.zeros(2 + len(names), dtype=torch.float64)  # loss, metrics..., count
    for i in range(0, len(idx_all), batch_size):
        batch = task.batch(data, idx_all[i:i + batch_size])
        out = task.forward(model, batch)
        k = len(batch)
        sums[0] += float(task.loss(out, batch)) * k
        scores = task.metrics(out, batch)
        for j, name in enumerate(names):
            sums[1 + j] += scores[name] * k
        sums[-1] += k
    procs.sum(sums)
    model.train(was_training)
    n = max(1.0, float(sums[-1]))
    result = {"loss": float(sums[0]) / n}
    result.update({name: float(sums[1 + j]) / n for j, name in enumerate(names)})
    return result
