"""skip_nonfinite=True on every Rust-backed optimizer: a group with a NaN/Inf
gradient is not stepped, parameters and state stay untouched, and the skip is counted."""

from __future__ import annotations

import copy

import pytest
import torch

import oxoptim
from optimizers import TWINS, same_setting, state_of

# (constructor, settings): each twin as a training loop makes it (Schedule-Free in train mode).
OPTIMIZERS = [(t.make_ours, t.typical) for t in TWINS] + [(oxoptim.SGD, dict(lr=0.1))]
IDS = [t.name for t in TWINS] + ["sgd-no-momentum"]


def params(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(50, requires_grad=True), torch.randn(3, 7, requires_grad=True)]


def set_grads(ps, bad=None):
    for i, p in enumerate(ps):
        p.grad = torch.randn_like(p)
        if bad is not None and i == 1:
            p.grad[1, 2] = bad


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_step_is_skipped(cls, kw, bad):
    ps = params()
    opt = cls(ps, skip_nonfinite=True, **kw)
    assert opt.skipped_steps == 0
    set_grads(ps)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict()["state"])
    set_grads(ps, bad)
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()["state"]
    for k in state:
        for name, v in state[k].items():
            assert same_setting(after[k][name], v), name


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_fresh_state_is_not_created_by_a_skipped_first_step(cls, kw):
    ps = params()
    opt = cls(ps, skip_nonfinite=True, **kw)
    initial = [state_of(opt, p) for p in ps]  # Adagrad creates its state up front
    set_grads(ps, float("nan"))
    opt.step()
    assert [state_of(opt, p) for p in ps] == initial and opt.skipped_steps == 1


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_finite_steps_equal_the_default_path_and_default_is_unchanged(cls, kw):
    a, b = params(), params()
    oa, ob = cls(a, skip_nonfinite=True, **kw), cls(b, **kw)
    assert "skip_nonfinite" not in ob.param_groups[0] and ob.skipped_steps == 0
    for step in range(3):
        torch.manual_seed(step)
        set_grads(a)
        torch.manual_seed(step)
        set_grads(b)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert oa.skipped_steps == 0
    # Without the flag a NaN gradient goes through, as in torch.
    ref = [p.detach().clone().requires_grad_() for p in b]
    theirs = next(t for t in TWINS if cls in (t.make_ours, t.ours)).make_theirs(ref, **kw)
    theirs.load_state_dict(copy.deepcopy(ob.state_dict()))
    torch.manual_seed(9)
    set_grads(b, float("nan"))
    torch.manual_seed(9)
    set_grads(ref, float("nan"))
    ob.step()
    theirs.step()
    for p, q in zip(b, ref):
        torch.testing.assert_close(p, q, equal_nan=True)


def test_only_the_bad_group_is_skipped_and_flag_survives_state_dict():
    ps = params()
    opt = oxoptim.SGD([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.1, skip_nonfinite=True)
    set_grads(ps, float("nan"))
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert not torch.equal(ps[0].detach(), before[0])
    assert torch.equal(ps[1].detach(), before[1])
    assert opt.skipped_steps == 1
    assert all(g["skip_nonfinite"] for g in opt.param_groups)
    fresh = params(1)
    other = oxoptim.SGD([{"params": [fresh[0]]}, {"params": [fresh[1]]}], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert all(g["skip_nonfinite"] for g in other.param_groups)


def test_nonfinite_check_on_tensors_rust_cannot_read():
    p = torch.zeros(4, 4, requires_grad=True)
    opt = oxoptim.Adam([p], lr=0.1, skip_nonfinite=True)
    g = torch.zeros(4, 4)
    g[0, 3] = float("nan")
    p.grad = g.t()  # non-contiguous: checked by torch
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.zeros(4, 4))


def test_rust_any_nonfinite_across_dtypes_and_threads():
    from oxoptim import _core

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        ts = [torch.randn(100_000).to(dtype), torch.randn(33).to(dtype)]
        for threads in (1, 3):
            assert _core.any_nonfinite(ts, num_threads=threads) is False
        ts[0][99_999] = float("inf")
        for threads in (1, 3):
            assert _core.any_nonfinite(ts, num_threads=threads) is True


@pytest.mark.parametrize("bad", [False, True])
def test_parameters_sharing_one_gradient_tensor(bad):
    """Two parameters given the very same gradient tensor (memory the Rust
    read pass cannot take as one batch): the check falls back to torch's."""
    from oxoptim._skip import grads_nonfinite

    g = torch.ones(6)
    if bad:
        g[3] = float("nan")
    assert grads_nonfinite([g, g, g[:3]]) is bad
    p, q = torch.zeros(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    p.grad = q.grad = g
    opt = oxoptim.Adam([p, q], lr=0.1, skip_nonfinite=True)
    opt.step()
    assert opt.skipped_steps == int(bad)
    assert torch.equal(p, q) and (torch.equal(p, torch.zeros(6)) is bad)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("kind", ["listed-twice", "shared-grad"])
def test_aliased_gradients_are_checked_and_stepped_like_torch(cls, kw, kind):
    """A parameter listed twice (torch warns) or two parameters sharing one
    gradient tensor: the non-finite check reads the aliases, the step is torch's."""
    import warnings

    twin = next(t for t in TWINS if cls in (t.make_ours, t.ours))
    results = []
    for make in (lambda ps: cls(ps, skip_nonfinite=True, **kw), lambda ps: twin.make_semantics(ps, **kw)):
        p, q = torch.linspace(-1, 1, 50).requires_grad_(), torch.linspace(0, 1, 50).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's duplicate-parameter warning
            opt = make([p, p] if kind == "listed-twice" else [p, q])
        for _ in range(3):
            g = torch.full((50,), 0.25)
            p.grad = g
            q.grad = g if kind == "shared-grad" else None
            opt.step()
        results.append((p.detach().clone(), q.detach().clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    # And a non-finite aliased gradient skips the step.
    p = torch.zeros(5, requires_grad=True)
    q = torch.zeros(5, requires_grad=True)
    opt = cls([p, q], skip_nonfinite=True, **kw)
    p.grad = q.grad = torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0])
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p, torch.zeros(5)) and torch.equal(q, torch.zeros(5))
