"""Lion's optimizer-wide settings against lion-pytorch (the shared tests in
the TWINS table cover the per-group ones)."""

from __future__ import annotations

import copy
import pickle

import lion_pytorch
import pytest
import torch

import oxoptim


def _run(make, steps=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(5,), (33,), (4, 7)]]
    opt = make(params)
    for k in range(steps):
        if k == 6:
            opt.param_groups[0]["lr"] *= 0.5  # a scheduler's change: decoupled decay keeps dividing by the initial lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("decoupled", [False, True])
def test_decoupled_weight_decay_matches_the_reference(decoupled):
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.2, decoupled_weight_decay=decoupled)
    ours, _ = _run(lambda ps: oxoptim.Lion(ps, **kw))
    theirs, _ = _run(lambda ps: lion_pytorch.Lion(ps, **kw))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    plain, _ = _run(lambda ps: oxoptim.Lion(ps, **{**kw, "decoupled_weight_decay": not decoupled}))
    assert not all(torch.equal(a, b) for a, b in zip(ours, plain))  # the flag changes the result


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copies_keep_the_optimizer_wide_settings(clone):
    # lion-pytorch's copies lose them (AttributeError at the next step); oxoptim's step on identically.
    params, opt = _run(lambda ps: oxoptim.Lion(ps, lr=1e-2, weight_decay=0.5, decoupled_weight_decay=True), steps=3)
    twin = clone((params, opt))
    for (p, q) in zip(params, twin[0]):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    twin[1].step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin[0]))


def test_triton_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="Triton"):
        oxoptim.Lion([torch.zeros(2, requires_grad=True)], use_triton=True)
