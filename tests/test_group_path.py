"""The whole-group fast path (tensors gathered in Rust, descriptions cached
between steps) follows every change a user can make between steps."""

from __future__ import annotations

import pytest
import torch

import oxoptim
from optimizers import TWINS, Twin, assert_twin_matches, clone_params, set_grads


# Twins whose steps take the group path (Adafactor's do not: list path only).
GROUP_PATH_TWINS = [t for t in TWINS if t.group_path]
GROUP_PATH_IDS = [t.name for t in GROUP_PATH_TWINS]


def _pair(twin: Twin, shapes=((5,), (3, 4), ())):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    mine, ref = clone_params(params), clone_params(params)
    return gen, mine, ref, twin.make_ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)


def _steps(gen, mine, ref, ours, theirs, n=3):
    for _ in range(n):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()


def _check(twin, mine, ref):
    # NaN where torch gives NaN too (edited state can make centered RMSprop's variance negative).
    for a, b in zip(mine, ref):
        assert_twin_matches(twin, a.detach(), b.detach(), equal_nan=True)


@pytest.fixture
def fast_path(monkeypatch) -> list:
    """What each whole-group fast-path call answered, in order (True: it took the step), so a
    test knows the steps it checks ran there and not on the general path."""
    answers: list = []
    real = oxoptim._core.group_step

    def spy(*args, **kwargs):
        answers.append(real(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(oxoptim._core, "group_step", spy)
    return answers


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=GROUP_PATH_IDS)
def test_param_data_swapped_between_steps(twin: Twin, fast_path: list) -> None:
    gen, mine, ref, ours, theirs = _pair(twin)
    _steps(gen, mine, ref, ours, theirs)
    new = torch.randn(5, generator=gen)
    mine[0].data = new.clone()
    ref[0].data = new.clone()
    _steps(gen, mine, ref, ours, theirs)
    assert fast_path[-3:] == [True] * 3  # the cached group saw the new storage
    _check(twin, mine, ref)
    # Swapped for a non-contiguous view: the general path takes over.
    view = torch.randn(4, 3, generator=gen)
    mine[1].data = view.clone().t()
    ref[1].data = view.clone().t()
    _steps(gen, mine, ref, ours, theirs)
    _check(twin, mine, ref)


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=GROUP_PATH_IDS)
def test_state_replaced_or_reset_between_steps(twin: Twin, fast_path: list) -> None:
    gen, mine, ref, ours, theirs = _pair(twin)
    _steps(gen, mine, ref, ours, theirs)
    key = twin.ours.PARAM_SHAPED[0]
    for opt, p in ((ours, mine[0]), (theirs, ref[0])):
        opt.state[p][key] = torch.full_like(p, 0.5)
    _steps(gen, mine, ref, ours, theirs)
    assert fast_path[-3:] == [True] * 3
    _check(twin, mine, ref)
    for opt, p in ((ours, mine[1]), (theirs, ref[1])):
        opt.state[p] = {}
    _steps(gen, mine, ref, ours, theirs)
    _check(twin, mine, ref)
    for opt in (ours, theirs):
        opt.state.clear()
    _steps(gen, mine, ref, ours, theirs)
    _check(twin, mine, ref)


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=GROUP_PATH_IDS)
def test_gradients_come_and_go(twin: Twin, fast_path: list) -> None:
    gen, mine, ref, ours, theirs = _pair(twin)
    _steps(gen, mine, ref, ours, theirs)
    for step in range(6):
        set_grads(gen, mine, ref)
        for i in range(len(mine)):
            if (step + i) % 3 == 0:
                mine[i].grad = ref[i].grad = None
        if step == 4:  # a non-contiguous gradient
            g = torch.randn(4, 3, generator=gen)
            mine[1].grad, ref[1].grad = g.clone().t(), g.clone().t()
        ours.step()
        theirs.step()
    assert fast_path.count(True) >= 6  # the steps with missing gradients stayed on the fast path
    _check(twin, mine, ref)


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=GROUP_PATH_IDS)
def test_in_place_edits_of_params_and_state_are_seen(twin: Twin, fast_path: list) -> None:
    gen, mine, ref, ours, theirs = _pair(twin)
    _steps(gen, mine, ref, ours, theirs)
    with torch.no_grad():
        for p in mine + ref:
            p.mul_(0.5)
    for opt in (ours, theirs):
        for s in opt.state.values():
            for v in s.values():
                v.add_(1.0) if torch.is_tensor(v) and v.dim() else None
    _steps(gen, mine, ref, ours, theirs)
    assert fast_path[-3:] == [True] * 3
    _check(twin, mine, ref)


@pytest.mark.parametrize("twin", GROUP_PATH_TWINS, ids=GROUP_PATH_IDS)
def test_a_fast_path_step_moves_the_versions_torch_moves(twin: Twin, fast_path: list) -> None:
    """Parameters and the state tensors the twin's step writes in place get new version counters on
    the fast path too, as torch's in-place ops give them (autograd's check of a saved tensor relies
    on it)."""
    gen, mine, ref, ours, theirs = _pair(twin)
    _steps(gen, mine, ref, ours, theirs, n=2)

    def versions(opt, params):
        return [(p._version, {k: t._version for k, t in opt.state[p].items() if torch.is_tensor(t)}) for p in params]

    ours_before, theirs_before = versions(ours, mine), versions(theirs, ref)
    set_grads(gen, mine, ref)
    ours.step()
    theirs.step()
    assert fast_path[-1] is True
    moved = 0
    for (p, state), (p_was, state_was), (_, ref_state), (_, ref_was) in zip(
        versions(ours, mine), ours_before, versions(theirs, ref), theirs_before
    ):
        assert p > p_was
        for key, version in ref_state.items():
            if key in ref_was and version > ref_was[key] and key in state:
                assert state[key] > state_was[key], key
                moved += 1
    assert moved, "torch moved no state tensor's version: the test checks only the parameters"
