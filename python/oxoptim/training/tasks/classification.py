"""Classification (or any (inputs, targets) problem scored by a loss function and batch-mean metrics)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch

from .base import Metric, TensorTask, as_xy

__all__ = ["ClassificationTask", "metric_table"]


def metric_table(metrics: Union[None, Mapping[str, Metric], Sequence[Union[str, Metric]]]) -> Dict[str, Metric]:
    """``{"name": fn}`` from a mapping, or from a list of known names (``"accuracy"``) and functions."""
    from ..model import DEFAULT_METRICS

    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out: Dict[str, Metric] = {}
    for m in metrics:
        if isinstance(m, str):
            if m not in DEFAULT_METRICS:
                raise ValueError(f"unknown metric {m!r}; known: {sorted(DEFAULT_METRICS)}")
            out[m] = DEFAULT_METRICS[m]
        else:
            out[getattr(m, "__name__", f"metric{len(out)}")] = m
    return out


class ClassificationTask(TensorTask):
    """``loss_fn(model(x), y)`` over rows of ``(x, y)``; validation logs ``val_<metric>``.

    When ``x`` holds right-padded token ids (a 2-D integer tensor, ``pad_value`` padding), each
    row's length is its count of non-padding ids: batching can then draw length buckets.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], train: Any, val: Any,
                 metrics: Any = ("accuracy",), metric_modes: Optional[Mapping[str, str]] = None,
                 pad_value: int = 0):
        super().__init__(loss_fn, train, val, metric_table(metrics), metric_modes)
        self.pad_value = pad_value

    def lengths(self, data: Any) -> Optional[torch.Tensor]:
        x = as_xy(data)[0]
        if x.dim() != 2 or x.is_floating_point():
            return None
        return (x != self.pad_value).sum(1)
