"""Schedule-Free's train/eval switch and group schedule against the reference
package (the shared tests of the TWINS table cover the per-step update)."""

from __future__ import annotations

import copy

import pytest
import schedulefree
import torch

import oxoptim

VARIANTS = [
    (oxoptim.AdamWScheduleFree, schedulefree.AdamWScheduleFree, dict(lr=0.02, weight_decay=0.05, warmup_steps=4, r=0.5)),
    (oxoptim.SGDScheduleFree, schedulefree.SGDScheduleFree, dict(lr=0.3, momentum=0.8, weight_decay=0.01, warmup_steps=3)),
]
IDS = ["adamw", "sgd"]


def _params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in [(7,), (3, 5), (65,)]]


def _train(opt, params, steps, seed, evaluate_every=0):
    """Steps with fresh gradients; every `evaluate_every` steps switches to eval and back, as a loop does."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        if evaluate_every and (k + 1) % evaluate_every == 0:
            opt.eval()
            opt.train()


@pytest.mark.parametrize("ours_cls,ref_cls,kw", VARIANTS, ids=IDS)
def test_eval_weights_and_schedule_match_the_reference(ours_cls, ref_cls, kw):
    mine, ref = _params(), _params()
    ours, theirs = ours_cls(mine, **kw), ref_cls(ref, foreach=False, **kw)
    for opt in (ours, theirs):
        opt.train()
    _train(ours, mine, 15, seed=1, evaluate_every=4)
    _train(theirs, ref, 15, seed=1, evaluate_every=4)
    ours.eval()
    theirs.eval()  # the parameters now hold the averaged weights x
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    # eval() moved the parameters away from y (the test would pass vacuously otherwise).
    ours.train()
    assert not all(torch.equal(a, b) for a, b in zip(mine, ref))


@pytest.mark.parametrize("ours_cls,ref_cls,kw", VARIANTS, ids=IDS)
def test_step_in_eval_mode_raises_the_references_error_and_changes_nothing(ours_cls, ref_cls, kw):
    params = _params()
    opt = ours_cls(params, **kw)
    opt.train()
    _train(opt, params, 3, seed=2)
    opt.eval()
    before = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(Exception, match="not in train mode") as ours_error:
        opt.step()
    ref = ref_cls(_params(), **kw)
    with pytest.raises(Exception) as ref_error:
        ref.step()
    assert type(ours_error.value) is type(ref_error.value) and str(ours_error.value) == str(ref_error.value)
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    assert opt.param_groups[0]["k"] == before[1]["param_groups"][0]["k"] == 3


@pytest.mark.parametrize("ours_cls,ref_cls,kw", VARIANTS, ids=IDS)
def test_switching_between_oxoptim_and_the_reference_mid_training(ours_cls, ref_cls, kw):
    """Saved in eval mode (as the reference asks), loaded by the other, trained on: same weights."""
    straight, switched = _params(seed=3), _params(seed=3)
    a = ref_cls(straight, foreach=False, **kw)
    a.train()
    _train(a, straight, 12, seed=4)
    b = ref_cls(switched, foreach=False, **kw)
    b.train()
    _train(b, switched, 6, seed=4)
    b.eval()
    saved = copy.deepcopy(b.state_dict())
    mid = [p.detach().clone() for p in switched]
    resumed = [p.detach().clone().requires_grad_() for p in mid]
    c = ours_cls(resumed, **kw)
    c.load_state_dict(saved)
    c.train()
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):  # replay the generator to where b stopped
        for p in resumed:
            torch.randn(p.shape, generator=gen, dtype=p.dtype)
    for _ in range(6):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        c.step()
    a.eval()
    c.eval()
    for x, y in zip(straight, resumed):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
