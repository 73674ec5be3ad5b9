"""oxoptim.training.embeddings: co-occurrence (PPMI + SVD) initialisation of embeddings."""

import pytest
import torch

from oxoptim.training.embeddings import cooccurrence_embeddings, init_embedding_


def corpus(n=400, seed=0):
    """Tokens 2/3 are interchangeable (same neighbours, 10-12), as are 4/5 (neighbours 13-15)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a = int(torch.randint(2, 4, (1,), generator=g)) if i % 2 else int(torch.randint(4, 6, (1,), generator=g))
        ctx = torch.randint(10, 13, (4,), generator=g) if a < 4 else torch.randint(13, 16, (4,), generator=g)
        rows.append([int(ctx[0]), int(ctx[1]), a, int(ctx[2]), int(ctx[3]), 0, 0])  # padded with 0
    return torch.tensor(rows)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_similar_contexts_give_similar_vectors():
    vec = cooccurrence_embeddings(corpus(), 20, 4, window=2)
    assert cos(vec[2], vec[3]) > 0.9 and cos(vec[4], vec[5]) > 0.9
    assert cos(vec[2], vec[4]) < 0.5
    assert torch.all(vec[:2] == 0)  # padding and unknown take no part
    assert torch.all(vec[6:10] == 0) and torch.all(vec[16:] == 0)  # never seen
    seen = vec[[2, 3, 4, 5, 10, 11, 12, 13, 14, 15]]
    assert seen.std().item() == pytest.approx(1.0, rel=1e-4)


def test_deterministic_and_bounded():
    ids = corpus()
    a = cooccurrence_embeddings(ids, 20, 4, window=1)
    assert torch.equal(a, cooccurrence_embeddings(ids, 20, 4, window=1))
    capped = cooccurrence_embeddings(ids, 20, 4, window=1, max_tokens=8)
    assert torch.all(capped[8:] == 0)
    assert capped.shape == (20, 4)
    with pytest.raises(ValueError):
        cooccurrence_embeddings(ids.float(), 20, 4)
    with pytest.raises(ValueError):
        cooccurrence_embeddings(ids, 20, 4, window=0)
    assert torch.all(cooccurrence_embeddings(torch.zeros(3, 4, dtype=torch.long), 20, 4) == 0)


def test_init_embedding_replaces_only_factorised_rows():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, padding_idx=0)
    before = emb.weight.detach().clone()
    n = init_embedding_(emb, corpus(), window=2)
    assert n == 10  # ids 2..5 and 10..15
    w = emb.weight.detach()
    for keep in (slice(0, 2), slice(6, 10), slice(16, 20)):
        assert torch.equal(w[keep], before[keep])
    assert not torch.equal(w[2:6], before[2:6]) and not torch.equal(w[10:16], before[10:16])
    assert emb.weight.requires_grad
