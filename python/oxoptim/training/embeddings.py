"""Embedding initialisation from token co-occurrence in the training data (PPMI + truncated SVD)."""

from __future__ import annotations

import torch

__all__ = ["cooccurrence_embeddings", "init_embedding_"]


def cooccurrence_embeddings(
    ids: torch.Tensor,
    num_embeddings: int,
    dim: int,
    window: int = 2,
    first_id: int = 2,
    max_tokens: int = 8192,
    context_power: float = 0.75,
) -> torch.Tensor:
    """``(num_embeddings, dim)`` vectors from the positive PMI of token pairs at most ``window`` apart.

    ``ids`` is a ``(N, L)`` integer tensor of padded token ids (the training split only: no
    validation or test text is looked at). Ids below ``first_id`` (padding, unknown) take no part;
    only ids below ``max_tokens`` are factorised, which bounds the dense matrix at
    ``max_tokens**2``. Rows that are not factorised, and tokens never seen in a window, are zero:
    callers keep their random initialisation there. Vectors are the top ``dim`` left singular
    vectors scaled by the square root of their singular values, then rescaled so that the
    factorised rows have unit standard deviation, the scale of ``nn.Embedding``'s default init.
    Context counts are smoothed with ``context_power`` (Levy et al., 2015).
    """
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError("ids must be a 2-D integer tensor of padded token ids")
    if window < 1 or dim < 1:
        raise ValueError(f"window and dim must be >= 1, not {window} and {dim}")
    v = min(int(num_embeddings), int(max_tokens))
    counts = torch.zeros(v * v, dtype=torch.float64)
    ids = ids.long()
    for k in range(1, min(window, ids.shape[1] - 1) + 1):
        left, right = ids[:, :-k].reshape(-1), ids[:, k:].reshape(-1)
        ok = (left >= first_id) & (right >= first_id) & (left < v) & (right < v)
        pairs = left[ok] * v + right[ok]
        counts.index_add_(0, pairs, torch.ones(pairs.numel(), dtype=torch.float64))
    counts = counts.view(v, v)
    counts = counts + counts.T
    total = counts.sum()
    out = torch.zeros(int(num_embeddings), dim)
    if total == 0:
        return out
    p_row = counts.sum(1, keepdim=True) / total
    p_ctx = counts.sum(0, keepdim=True).pow(context_power)
    p_ctx = p_ctx / p_ctx.sum()
    seen = counts > 0
    pmi = torch.zeros_like(counts)
    pmi[seen] = torch.log((counts / total)[seen] / (p_row * p_ctx).expand_as(counts)[seen])
    pmi.clamp_(min=0.0)
    k = min(dim, v)
    u, s = _top_singular(pmi, k)
    vec = u * s.sqrt()
    # A sign convention per component, so the result does not depend on the LAPACK build.
    flip = torch.sign(vec[vec.abs().argmax(0), torch.arange(k)])
    vec = vec * torch.where(flip == 0, torch.ones_like(flip), flip)
    seen_rows = counts.sum(1) > 0  # ids < first_id are never counted
    vec[~seen_rows] = 0.0  # not SVD round-off: exactly "no information"
    std = vec[seen_rows].std()
    if torch.isfinite(std) and std > 0:
        vec = vec / std
    out[:v, :k] = vec.float()
    return out


def _top_singular(a: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 6):
    """Top-``k`` left singular vectors and values of ``a``.

    A full SVD is cubic in the vocabulary (47 s for 4,400 tokens on one core); the randomised
    range finder of Halko et al. (2011) with a few power iterations costs a handful of
    matrix products. Its random start comes from a fixed private generator: deterministic, and
    torch's global RNG is left alone.
    """
    n = a.shape[1]
    if k + oversample >= min(a.shape):
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k]
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(a @ torch.randn(n, k + oversample, generator=g, dtype=a.dtype))
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    ub, s, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :k], s[:k]


@torch.no_grad()
def init_embedding_(embedding: torch.nn.Embedding, ids: torch.Tensor, window: int = 2, first_id: int = 2,
                    max_tokens: int = 8192) -> int:
    """Overwrites ``embedding``'s rows with :func:`cooccurrence_embeddings` where those are non-zero.

    Returns how many rows were replaced; the others (padding, unknown, unseen or rare tokens) keep
    their current values.
    """
    vec = cooccurrence_embeddings(ids, embedding.num_embeddings, embedding.embedding_dim, window=window,
                                  first_id=first_id, max_tokens=max_tokens)
    rows = vec.abs().sum(1) > 0
    embedding.weight[rows] = vec[rows].to(embedding.weight.dtype)
    return int(rows.sum())
