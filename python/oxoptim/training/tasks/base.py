"""The task interface and its common case: examples are rows of an input tensor and a target tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["Batch", "Task", "TensorTask", "as_xy"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def as_xy(data: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) tensors from a TextDataset, a TensorDataset or an (x, y) pair."""
    if data is None:
        raise ValueError("training and validation data are required")
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    if hasattr(data, "tensors"):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    raise TypeError(f"data must be (x, y) tensors, a TensorDataset or a TextDataset, not {type(data).__name__}")


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Task:
    """The interface the loop uses. ``data`` is whatever the task's ``train``/``val`` hold."""

    train: Any
    val: Any
    # Metric name -> "min" or "max": which way is better. Logged as ``val_<name>``; rules that
    # monitor one and give no mode follow this direction.
    metric_modes: Dict[str, str] = {}

    def size(self, data: Any) -> int:
        raise NotImplementedError

    def batch(self, data: Any, idx: torch.Tensor) -> Batch:
        raise NotImplementedError

    def forward(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        return net(batch.x)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> Dict[str, float]:
        """Batch means of the metrics (weighted by batch size over an evaluation)."""
        return {}

    def lengths(self, data: Any) -> Optional[torch.Tensor]:
        """Per-example lengths for length buckets, or None (no bucketing)."""
        return None


class TensorTask(Task):
    """Examples are rows of ``x`` and ``y``; ``loss_fn(outputs, y)`` is the batch mean and each
    metric ``fn(outputs, y)`` a batch mean. A metric missing from ``metric_modes`` is better lower
    when its name ends in "loss", else higher."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], train: Any, val: Any,
                 metrics: Optional[Mapping[str, Metric]] = None, metric_modes: Optional[Mapping[str, str]] = None):
        self.loss_fn = loss_fn
        self.train, self.val = as_xy(train), as_xy(val)
        self.metric_fns: Dict[str, Metric] = dict(metrics or {})
        modes = dict(metric_modes or {})
        for name in self.metric_fns:
            modes.setdefault(name, "min" if name.endswith("loss") else "max")
            if modes[name] not in ("min", "max"):
                raise ValueError(f"metric {name!r}: mode must be 'min' or 'max', not {modes[name]!r}")
        self.metric_modes = {name: modes[name] for name in self.metric_fns}

    def size(self, data: Any) -> int:
        return len(as_xy(data)[1])

    def batch(self, data: Any, idx: torch.Tensor) -> Batch:
        x, y = as_xy(data)
        return Batch(x[idx], y[idx])

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_fn(outputs, batch.y)

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> Dict[str, float]:
        return {name: float(fn(outputs, batch.y)) for name, fn in self.metric_fns.items()}
