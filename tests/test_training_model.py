"""The default model: its bidirectional GRU equals torch's packed BiGRU and ignores padding."""

import pytest
import torch
from torch import nn

from oxoptim.training.model import BiGRUClassifier


def padded_batch(seed=0, vocab=50, lengths=(7, 1, 4, 7, 2), extra_pad=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths) + extra_pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(2, vocab, (n,), generator=g)
    return x, torch.tensor(lengths)


def packed_reference(model, x, lengths):
    """The textbook way: torch's BiGRU on a packed batch."""
    e = model.embed(x[:, : int(lengths.max())])
    packed = nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
    out, h = model.gru(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    return out, torch.cat([h[0], h[1]], dim=1)


@pytest.mark.parametrize("pool", ["last", "max", "mean", "max_mean"])
def test_matches_packed_gru_and_ignores_padding(pool):
    torch.manual_seed(0)
    model = BiGRUClassifier(50, 3, embed_dim=6, hidden=5, pool=pool).eval()
    x, lengths = padded_batch()
    out, last = packed_reference(model, x, lengths)
    mine = model._bigru(model.embed(x[:, : int(lengths.max())]), lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(mine[i, :n], out[i, :n], rtol=1e-5, atol=1e-6)
    mask = (torch.arange(out.shape[1]) < lengths.unsqueeze(1)).unsqueeze(-1)
    feats = {"last": last, "max": out.masked_fill(~mask, float("-inf")).max(1).values,
             "mean": (out * mask).sum(1) / lengths.unsqueeze(1)}
    feats["max_mean"] = torch.cat([feats["max"], feats["mean"]], 1)
    torch.testing.assert_close(model(x), model.dense(feats[pool]), rtol=1e-5, atol=1e-6)
    # more padding, or each row alone: the same logits
    wide = torch.cat([x, torch.zeros(len(x), 20, dtype=torch.long)], 1)
    torch.testing.assert_close(model(wide), model(x), rtol=0, atol=0)
    alone = torch.cat([model(x[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(alone, model(x), rtol=1e-5, atol=1e-6)


def test_gradients_match_packed_gru():
    torch.manual_seed(1)
    model = BiGRUClassifier(50, 2, embed_dim=6, hidden=5, pool="max_mean").eval()
    x, lengths = padded_batch(seed=2)
    model(x).square().sum().backward()
    mine = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    out, _ = packed_reference(model, x, lengths)
    mask = (torch.arange(out.shape[1]) < lengths.unsqueeze(1)).unsqueeze(-1)
    feat = torch.cat([out.masked_fill(~mask, float("-inf")).max(1).values, (out * mask).sum(1) / lengths.unsqueeze(1)], 1)
    model.dense(feat).square().sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(mine[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_bad_pool():
    with pytest.raises(ValueError, match="pool"):
        BiGRUClassifier(10, pool="attention")
