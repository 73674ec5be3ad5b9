"""Language modelling: predict each next token of fixed-length blocks of a token stream."""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from .base import Batch, Task

__all__ = ["LanguageModelTask"]


class LanguageModelTask(Task):
    """Example ``i`` of a 1-D token stream is the block ``stream[i*L : i*L + L + 1]`` (``L`` = ``block``):
    the model maps its first ``L`` ids to ``(B, L, vocab)`` logits, scored by next-token cross-entropy.
    Blocks have equal lengths, so batch means weighted by blocks are token means. Validation logs
    ``val_bpc``, the loss in bits per token (per character for a character model; lower is better)."""

    metric_modes = {"bpc": "min"}

    def __init__(self, train: torch.Tensor, val: torch.Tensor, block: int):
        if block < 1:
            raise ValueError(f"block must be >= 1, not {block}")
        self.train, self.val, self.block = train, val, int(block)
        for name, stream in (("training", train), ("validation", val)):
            if self.size(stream) < 1:
                raise ValueError(f"the {name} text ({stream.numel()} tokens) is shorter than one block of "
                                 f"{block} + 1 tokens")

    def size(self, data: torch.Tensor) -> int:
        return (int(data.numel()) - 1) // self.block

    def batch(self, data: torch.Tensor, idx: torch.Tensor) -> Batch:
        rows = data[idx.unsqueeze(1) * self.block + torch.arange(self.block + 1)]
        return Batch(rows[:, :-1], rows[:, 1:])

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), batch.y.reshape(-1))

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> Dict[str, float]:
        return {"bpc": float(self.loss(outputs, batch)) / math.log(2)}
