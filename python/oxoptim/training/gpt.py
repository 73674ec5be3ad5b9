"""A small decoder-only transformer (GPT): a character language model, and a classifier on top of it."""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from oxoptim import rows

__all__ = ["GPT", "GPTClassifier", "GPT_POOLS"]

GPT_POOLS = ("mean", "last")


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)); causal attention."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Token + position embeddings, ``layers`` pre-norm blocks, a final norm, and the output layer tied
    to the token embedding. ``forward(ids)`` maps ``(B, T)`` ids (T <= ``block``) to ``(B, T, vocab)``
    logits; :meth:`features` gives the final hidden states."""

    def __init__(self, vocab_size: int, block: int = 128, layers: int = 4, dim: int = 256, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.block = block
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.apply(self._init)
        for blk in self.blocks:  # residual branches scaled down with depth (GPT-2)
            assert isinstance(blk, Block)
            for lin in (blk.proj, blk.mlp[2]):
                assert isinstance(lin, nn.Linear)
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.block:
            raise ValueError(f"sequences of {ids.shape[1]} tokens, the model takes at most {self.block}")
        x = self.drop(rows.embedding(ids, self.tok.weight) + self.pos.weight[: ids.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return rows.linear(self.features(ids), self.tok.weight)

    def released_rows(self) -> List[torch.Tensor]:
        """What a ``release_rows`` stage updates row block by row block (:mod:`oxoptim.rows`): the
        token embedding, also the output layer."""
        return [self.tok.weight]

    def layer_groups(self) -> List[List[torch.Tensor]]:
        """Parameters from the input up: embeddings, each block, the final norm."""
        groups = [[self.tok.weight, self.pos.weight]]
        groups += [list(b.parameters()) for b in self.blocks]
        groups.append(list(self.norm.parameters()))
        return groups


class GPTClassifier(nn.Module):
    """A :class:`GPT` body reading right-padded ids (``padding_idx``), its final hidden states pooled
    (``"mean"`` over the real tokens, or ``"last"``: the last real token, which under causal attention
    has read the whole text) into a linear head. Sequences are trimmed to the batch's longest text."""

    def __init__(self, body: GPT, num_classes: int = 2, pool: str = "mean", dropout: float = 0.0,
                 padding_idx: int = 0):
        super().__init__()
        if pool not in GPT_POOLS:
            raise ValueError(f"pool must be one of {GPT_POOLS}, not {pool!r}")
        self.body = body
        self.pool = pool
        self.padding_idx = padding_idx
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(body.norm.normalized_shape[0], num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.padding_idx
        lengths = mask.sum(1).clamp(min=1)
        t = min(int(lengths.max()), self.body.block)
        h = self.body.features(ids[:, :t])
        mask = mask[:, :t]
        if self.pool == "last":
            feat = h[torch.arange(h.shape[0]), (lengths.clamp(max=t) - 1)]
        else:
            feat = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1).clamp(min=1).unsqueeze(-1)
        return self.head(self.drop(feat))

    def released_rows(self) -> List[torch.Tensor]:
        """The body's token embedding (:meth:`GPT.released_rows`); the head is small."""
        return self.body.released_rows()

    def layer_groups(self) -> List[List[torch.Tensor]]:
        """The body's groups from the input up, then the head."""
        return self.body.layer_groups() + [list(self.head.parameters())]
