"""The seed's model: Embedding + bidirectional GRU + Dense, and the default loss/metrics."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["BiGRUClassifier", "accuracy", "DEFAULT_METRICS"]


class BiGRUClassifier(nn.Module):
    """Embedding → bidirectional GRU → Dense over the pooled GRU outputs.

    ``pool`` is ``"last"`` (final hidden state of each direction, padding packed away),
    ``"max"`` or ``"mean"`` (over the non-padding positions). ``dropout`` applies to
    the embeddings and to the pooled features (0 = the seed's plain model).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        embed_dim: int = 64,
        hidden: int = 64,
        dropout: float = 0.0,
        pool: str = "max",
        padding_idx: int = 0,
    ):
        super().__init__()
        if pool not in ("last", "max", "mean"):
            raise ValueError(f"pool must be 'last', 'max' or 'mean', not {pool!r}")
        self.pool = pool
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x != self.padding_idx
        lengths = mask.sum(1).clamp(min=1)
        # Trim to the longest sequence in the batch: same result, less work.
        x = x[:, : int(lengths.max())]
        mask = mask[:, : x.shape[1]]
        e = self.drop(self.embed(x))
        if self.pool == "last":
            packed = nn.utils.rnn.pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.gru(packed)
            feat = torch.cat([h[0], h[1]], dim=1)
        else:
            out, _ = self.gru(e)
            m = mask.unsqueeze(-1)
            if self.pool == "max":
                feat = out.masked_fill(~m, float("-inf")).max(1).values
            else:
                feat = (out * m).sum(1) / lengths.unsqueeze(1)
        return self.dense(self.drop(feat))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the label (summed over a batch by the trainer)."""
    return float((logits.argmax(-1) == y).float().mean())


DEFAULT_METRICS: Dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {"accuracy": accuracy}
