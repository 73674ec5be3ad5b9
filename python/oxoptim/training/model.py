"""The seed's model: Embedding + bidirectional GRU + Dense, and the default loss/metrics."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

__all__ = ["BiGRUClassifier", "accuracy", "DEFAULT_METRICS"]

_POOLS = ("last", "max", "mean", "max_mean")


class BiGRUClassifier(nn.Module):
    """Embedding → bidirectional GRU → Dense over the pooled GRU outputs.

    ``pool`` is ``"last"`` (final hidden state of each direction, padding packed away),
    ``"max"``, ``"mean"`` (over the non-padding positions) or ``"max_mean"`` (both,
    concatenated). Regularisation, all off at 0 (the seed's plain model):

    * ``dropout``: on the pooled features, and on the embeddings unless ``embed_dropout`` is given;
    * ``embed_dropout``: element-wise dropout on the embeddings (default: ``dropout``);
    * ``spatial_dropout``: drops whole embedding channels, the same ones at every position;
    * ``word_dropout``: replaces each non-padding token by ``unk_idx`` with this probability.
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
        embed_dropout: Optional[float] = None,
        spatial_dropout: float = 0.0,
        word_dropout: float = 0.0,
        unk_idx: int = 1,
    ):
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, not {pool!r}")
        self.pool = pool
        self.padding_idx = padding_idx
        self.unk_idx = unk_idx
        self.word_dropout = float(word_dropout)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.embed_drop = nn.Dropout(dropout if embed_dropout is None else float(embed_dropout))
        self.spatial_drop = nn.Dropout(float(spatial_dropout))
        self.dense = nn.Linear((4 if pool == "max_mean" else 2) * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x != self.padding_idx
        lengths = mask.sum(1).clamp(min=1)
        # Trim to the longest sequence in the batch: same result, less work.
        x = x[:, : int(lengths.max())]
        mask = mask[:, : x.shape[1]]
        if self.training and self.word_dropout > 0:
            hit = (torch.rand(x.shape) < self.word_dropout) & mask
            x = x.masked_fill(hit, self.unk_idx)
        e = self.embed_drop(self.embed(x))
        if self.training and self.spatial_drop.p > 0:
            keep = self.spatial_drop(torch.ones(e.shape[0], 1, e.shape[2], dtype=e.dtype))
            e = e * keep
        if self.pool == "last":
            packed = nn.utils.rnn.pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.gru(packed)
            feat = torch.cat([h[0], h[1]], dim=1)
        else:
            out, _ = self.gru(e)
            m = mask.unsqueeze(-1)
            mx = out.masked_fill(~m, float("-inf")).max(1).values
            mean = (out * m).sum(1) / lengths.unsqueeze(1)
            feat = {"max": mx, "mean": mean}.get(self.pool)
            if feat is None:
                feat = torch.cat([mx, mean], dim=1)
        return self.dense(self.drop(feat))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the label (summed over a batch by the trainer)."""
    return float((logits.argmax(-1) == y).float().mean())


DEFAULT_METRICS: Dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {"accuracy": accuracy}
