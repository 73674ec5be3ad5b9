"""oxoptim.training: adversarial training on embeddings equals its definition, in and out of the Trainer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oxoptim.training import Stage, Trainer
from oxoptim.training.adversarial import EmbeddingAdversary


class BagModel(nn.Module):
    """Embedding -> mean over positions -> Linear: small, deterministic (no dropout)."""

    def __init__(self, vocab=20, dim=6, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def head(self, e):
        return self.out(torch.tanh(e).mean(1))

    def forward(self, x):
        return self.head(self.embed(x))


def batch(n=7, length=5, vocab=20, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, classes, (n,), generator=g)


def manual_grads(model, x, y, eps):
    """The definition: grad of loss(e) + loss(e + eps * g / ||g||), g = d loss / d e per example."""
    e = model.embed(x)
    e_leaf = e.detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(model.head(e_leaf), y), e_leaf)
    r = eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    total = F.cross_entropy(model.head(e), y) + F.cross_entropy(model.head(model.embed(x) + r), y)
    return torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("eps", [0.05, 1.0, 3.0])
def test_gradient_matches_definition(eps):
    model = BagModel()
    x, y = batch()
    expected = manual_grads(model, x, y, eps)
    adv = EmbeddingAdversary(model, eps)
    loss = adv.forward_backward(lambda: F.cross_entropy(model(x), y))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item())
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    adv.remove()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # hooks gone: a plain step again
    clean = [p.grad.clone() for p in model.parameters()]
    assert not all(torch.allclose(a, b) for a, b in zip(clean, expected))


def test_perturbation_raises_the_loss_and_hooks_are_inert_outside_steps():
    model = BagModel()
    x, y = batch()
    adv = EmbeddingAdversary(model, 0.5)
    seen = {}
    adv.forward_backward(lambda: F.cross_entropy(model(x), y))
    e = model.embed(x)  # outside a step the hook changes nothing
    torch.testing.assert_close(model.head(e), model.head(model.embed.weight[x]))
    g = torch.autograd.grad(F.cross_entropy(model.head(e), y), e)[0]
    r = 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    with torch.no_grad():
        seen["clean"] = F.cross_entropy(model.head(e), y).item()
        seen["adv"] = F.cross_entropy(model.head(e + r), y).item()
        seen["random"] = F.cross_entropy(model.head(e + r[torch.randperm(len(r))]), y).item()
    assert seen["adv"] > seen["clean"]
    assert seen["adv"] > seen["random"]


def test_frozen_embedding_is_still_perturbed():
    model = BagModel()
    model.embed.weight.requires_grad_(False)
    x, y = batch()
    expected = manual_grads(model, x, y, 1.0)  # grads for out.weight, out.bias only
    EmbeddingAdversary(model, 1.0).forward_backward(lambda: F.cross_entropy(model(x), y))
    assert model.embed.weight.grad is None
    for p, want in zip([model.out.weight, model.out.bias], expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nn.Embedding"):
        EmbeddingAdversary(nn.Linear(3, 2), 1.0)
    with pytest.raises(ValueError, match="> 0"):
        EmbeddingAdversary(BagModel(), 0.0)
    with pytest.raises(ValueError, match="adversarial"):
        Stage("s", adversarial=-1.0)
    x, y = batch(n=40)
    with pytest.raises(ValueError, match="nn.Embedding"):
        Trainer(nn.Linear(5, 3), F.cross_entropy, (x.float(), y), (x.float(), y), [Stage("s", adversarial=1.0)])


def test_trainer_stage_step_equals_manual_step():
    """One adversarial SGD step through the Trainer equals the manual definition; a later plain stage
    takes plain steps."""
    x, y = batch(n=16, seed=2)
    model, ref = BagModel(seed=3), BagModel(seed=3)
    stages = [Stage("adv", "sgd", epochs=1, batch_size=16, lr=0.1, adversarial=0.7),
              Stage("plain", "sgd", epochs=1, batch_size=16, lr=0.1)]
    Trainer(model, F.cross_entropy, (x, y), (x, y), stages, quiet=True, metrics=[]).fit()
    grads = manual_grads(ref, x, y, 0.7)
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= 0.1 * g
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "adversarial 0.7" in stages[0].describe()


def test_a_model_without_embedding_outputs_is_refused():
    """The GPT embeds its tokens through oxoptim.rows, not an nn.Embedding call: nothing is captured,
    and the "perturbed" pass would add the clean gradient again; the adversary refuses instead."""
    from oxoptim.training.gpt import GPT, GPTClassifier

    torch.manual_seed(0)
    model = GPTClassifier(GPT(11, block=8, layers=1, dim=8, heads=2), 2)
    adv = EmbeddingAdversary(model, 1.0)
    x, y = torch.randint(1, 11, (4, 8)), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="no nn.Embedding output"):
        adv.forward_backward(lambda: F.cross_entropy(model(x), y))
