"""oxoptim.GradientAverager (exact mean over uneven micro-batches) and
oxoptim.ParamAverager (EMA/SWA) against torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import oxoptim


def model_and_data(seed=0, n=103):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.randn(n, 8), torch.randn(n, 1)


def full_batch_grads(model, x, y):
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_uneven_micro_batches_give_the_full_batch_gradient(sizes):
    n = sum(sizes)
    model, x, y = model_and_data(n=n)
    want = full_batch_grads(model, x, y)
    model.zero_grad()
    avg = oxoptim.GradientAverager(model.parameters())
    start = 0
    for m in sizes:
        torch.nn.functional.mse_loss(model(x[start : start + m]), y[start : start + m]).backward()
        avg.accumulate(m)
        assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())  # cleared
        start += m
    assert avg.finalize() == n
    # Relative error of the whole gradient vector (a single tensor such as a
    # scalar bias can be a near-cancelling sum, where even torch's own float32
    # full-batch gradient is ~1e-6 off the float64 one).
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    full = torch.cat([g.flatten() for g in want])
    rel = float((ours - full).norm() / full.norm())
    assert rel <= 1e-6, rel


def test_equal_weighting_is_wrong_but_ours_is_right():
    model, x, y = model_and_data(n=9)
    want = full_batch_grads(model, x, y)
    sizes = [4, 4, 1]
    per_batch = []
    with oxoptim.GradientAverager(model.parameters()) as avg:
        start = 0
        for m in sizes:
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x[start : start + m]), y[start : start + m]).backward()
            per_batch.append([p.grad.clone() for p in model.parameters()])
            avg.accumulate(m)
            start += m
    naive = [sum(gs) / len(gs) for gs in zip(*per_batch)]
    assert max(float((a - b).abs().max()) for a, b in zip(naive, want)) > 1e-3
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


def test_reproduces_a_full_batch_gd_step():
    model, x, y = model_and_data(n=50)
    reference = copy.deepcopy(model)
    full_batch_grads(reference, x, y)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    opt = oxoptim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    with oxoptim.GradientAverager(model.parameters()) as avg:
        for chunk_x, chunk_y in zip(x.split(16), y.split(16)):  # 16, 16, 16, 2
            torch.nn.functional.mse_loss(model(chunk_x), chunk_y).backward()
            avg.accumulate(len(chunk_x))
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_exception_inside_the_context_writes_nothing_and_missing_grads_count_as_zero():
    w = torch.zeros(3, requires_grad=True)
    v = torch.zeros(2, requires_grad=True)
    with pytest.raises(ZeroDivisionError):
        with oxoptim.GradientAverager([w, v]) as avg:
            w.grad = torch.ones(3)
            avg.accumulate(1)
            1 / 0
    assert torch.equal(w.grad, torch.zeros(3))  # cleared by accumulate, never written back
    avg = oxoptim.GradientAverager([w, v])
    w.grad = torch.full((3,), 3.0)
    avg.accumulate(1)
    w.grad = None
    v.grad = torch.full((2,), 4.0)
    avg.accumulate(3)  # w: no grad in this batch → (1·3 + 3·0)/4; v: (1·0 + 3·4)/4
    avg.finalize()
    torch.testing.assert_close(w.grad, torch.full((3,), 0.75))
    torch.testing.assert_close(v.grad, torch.full((2,), 3.0))
    with pytest.raises(ValueError):
        avg.accumulate(0)


def _train_with_averagers(mode, steps, dtype=torch.float32, start_step=0, decay=0.9):
    model, x, y = model_and_data(seed=3)
    model = model.to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    if mode == "ema":
        theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    else:
        theirs = AveragedModel(model)
    ours = oxoptim.ParamAverager(model.parameters(), mode=mode, decay=decay, start_step=start_step)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ours.update()
        if step >= start_step:
            theirs.update_parameters(model)
    return model, ours, theirs


@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_param_averager_equals_averaged_model(mode, dtype):
    model, ours, theirs = _train_with_averagers(mode, 300, dtype, start_step=20)
    assert ours.n_averaged == 280
    for a, b in zip(ours.averages, theirs.module.parameters()):
        assert a.dtype == dtype and torch.equal(a, b.detach()), float((a - b.detach()).abs().max())


def test_averaged_context_swaps_and_restores_even_on_exception():
    model, ours, theirs = _train_with_averagers("ema", 50)
    live = [p.detach().clone() for p in model.parameters()]
    # The swap is visible: the average is not the live weights (and is AveragedModel's).
    assert all(float((a - l).abs().max()) > 1e-4 for a, l in zip(ours.averages, live))
    for a, b in zip(ours.averages, theirs.module.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=2e-6)
    with ours.averaged():
        for p, a in zip(model.parameters(), ours.averages):
            assert torch.equal(p, a)
    for p, l in zip(model.parameters(), live):
        assert torch.equal(p, l)
    with pytest.raises(KeyError):
        with ours.averaged():
            raise KeyError("boom")
    for p, l in zip(model.parameters(), live):
        assert torch.equal(p, l)


def test_state_dict_roundtrip():
    model, ours, _ = _train_with_averagers("swa", 30)
    sd = copy.deepcopy(ours.state_dict())
    fresh = oxoptim.ParamAverager(model.parameters(), mode="ema")
    fresh.load_state_dict(sd)
    assert (fresh.mode, fresh.n_averaged, fresh.n_updates) == ("swa", 30, 30)
    for a, b in zip(fresh.averages, ours.averages):
        assert torch.equal(a, b)
    ours.update()
    fresh.update()
    for a, b in zip(fresh.averages, ours.averages):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        oxoptim.ParamAverager(model.parameters(), mode="bogus")


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_failed_update_changes_nothing(mode):
    model, ours, _ = _train_with_averagers(mode, 3)
    before = copy.deepcopy(ours.state_dict())
    weight = next(model.parameters())
    weight.data = torch.zeros(weight.numel() + 1)  # what a resized model does to a parameter
    with pytest.raises(ValueError, match="average it with a new ParamAverager"):
        ours.update()
    after = ours.state_dict()
    assert (after["n_updates"], after["n_averaged"]) == (before["n_updates"], before["n_averaged"])
    assert all(torch.equal(a, b) for a, b in zip(after["averages"], before["averages"]))


def test_a_reused_gradient_averager_leaves_a_parameter_without_gradients_this_round_alone():
    """Frozen after a round with gradients: its ``.grad`` stays None (as with a fresh averager and
    plain torch), so AdamW's decay and momentum do not move it."""
    w, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w, frozen], lr=0.1, weight_decay=0.5)
    avg = oxoptim.GradientAverager([w, frozen])
    for round_ in range(2):
        opt.zero_grad()
        frozen.requires_grad_(round_ == 0)
        for _ in range(2):
            (w.sum() + (frozen.sum() if frozen.requires_grad else 0)).backward()
            avg.accumulate(4)
        assert avg.finalize() == 8
        before = frozen.detach().clone()
        opt.step()
    assert frozen.grad is None and torch.equal(frozen.detach(), before)
    assert torch.equal(w.grad, torch.ones(3))


def test_a_reused_gradient_averager_starts_a_parameter_missing_the_first_micro_batch_from_zero():
    """Round 2: a parameter without a gradient in the first micro-batch counts it as zero, not as
    the mean the last round left in its buffer."""
    w, late = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    avg = oxoptim.GradientAverager([w, late])
    w.grad, late.grad = torch.full((3,), 5.0), torch.full((3,), 7.0)
    avg.accumulate(2)
    avg.finalize()  # late's buffer now holds 7
    w.grad, late.grad = torch.full((3,), 1.0), None
    avg.accumulate(1)
    late.grad = torch.full((3,), 3.0)
    w.grad = torch.full((3,), 1.0)
    avg.accumulate(3)
    assert avg.finalize() == 4
    assert torch.equal(late.grad, torch.full((3,), 3.0 * 3 / 4))
    assert torch.equal(w.grad, torch.ones(3))


def test_micro_batches_may_be_weighted_by_any_positive_number():
    w = torch.nn.Parameter(torch.zeros(2))
    avg = oxoptim.GradientAverager([w])
    for weight, value in ((1.9, 1.0), (1, 4.0)):
        w.grad = torch.full((2,), value)
        avg.accumulate(weight)
    assert avg.finalize() == pytest.approx(2.9)
    torch.testing.assert_close(w.grad, torch.full((2,), (1.9 * 1.0 + 1 * 4.0) / 2.9))
    w.grad = torch.ones(2)
    for bad, error in ((0, ValueError), (-1.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("3", TypeError), (True, TypeError)):
        with pytest.raises(error):
            avg.accumulate(bad)
    assert avg.samples == 0 and torch.equal(w.grad, torch.ones(2))


def test_averages_are_not_written_into_parameters_of_another_shape():
    source = torch.nn.Linear(3, 2, bias=False)
    ours = oxoptim.ParamAverager(source.parameters())
    ours.update()
    other = torch.nn.Linear(2, 3, bias=False)  # as many elements, transposed
    weight = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 0 is \(3, 2\) but its average is \(2, 3\)"):
        ours.copy_to(other.parameters())
    with pytest.raises(ValueError, match="1 averages for 2 parameters"):
        ours.copy_to([source.weight, source.weight])
    assert torch.equal(other.weight.detach(), weight)
    fresh = oxoptim.ParamAverager(other.parameters())
    with pytest.raises(ValueError, match=r"is \(3, 2\) but its average is \(2, 3\)"):
        fresh.load_state_dict(ours.state_dict())
    assert fresh.n_averaged == 0 and fresh.averages == []


@pytest.mark.parametrize(
    "change, error",
    [(dict(mode="bogus"), ValueError), (dict(decay=5.0), ValueError), (dict(start_step=-1), ValueError), (dict(n_updates=-2), ValueError),
     (dict(n_averaged="3"), ValueError), (dict(averages=[]), ValueError), (dict(n_updates=None), ValueError), ("drop n_updates", KeyError)],
    ids=str,
)  # fmt: skip
def test_a_refused_param_averager_state_dict_changes_nothing(change, error):
    model, ours, _ = _train_with_averagers("swa", 5)
    bad = copy.deepcopy(ours.state_dict())
    if change == "drop n_updates":
        del bad["n_updates"]
    else:
        bad.update(change)
    target = oxoptim.ParamAverager(model.parameters(), mode="ema", decay=0.9, start_step=2)
    for _ in range(4):
        target.update()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(error):
        target.load_state_dict(bad)
    after = target.state_dict()
    assert {k: v for k, v in after.items() if k != "averages"} == {k: v for k, v in before.items() if k != "averages"}
    assert all(torch.equal(a, b) for a, b in zip(after["averages"], before["averages"]))


def _two_batches(params_and_grads, ga, sizes=(3, 5)):
    """Two micro-batches: ``params_and_grads(k)`` sets batch k's gradients; returns finalize()'s count."""
    for k, n in enumerate(sizes):
        params_and_grads(k)
        ga.accumulate(n)
    return ga.finalize()


@pytest.mark.parametrize("device_like", ["native", "torch"])
def test_a_parameter_listed_twice_keeps_its_gradient(device_like):
    """The native call refuses a gradient listed twice; torch's fold used to zero it after folding
    it for the first listing, so the second folded zeros (and finalize wrote that zero mean last)."""
    p = torch.nn.Parameter(torch.zeros(3, 2))
    q = torch.nn.Parameter(torch.zeros(4))
    grads = [torch.randn(3, 2), torch.randn(3, 2)]
    other = [torch.randn(4), torch.randn(4)]

    def set_grads(k):
        g = grads[k].clone()
        p.grad = g if device_like == "native" else g.t().contiguous().t()  # non-contiguous: torch's path
        q.grad = other[k].clone()

    ga = oxoptim.GradientAverager([p, q, p])
    _two_batches(set_grads, ga)
    torch.testing.assert_close(p.grad, (3 * grads[0] + 5 * grads[1]) / 8)
    torch.testing.assert_close(q.grad, (3 * other[0] + 5 * other[1]) / 8)


def test_parameters_sharing_one_gradient_tensor_each_get_the_mean():
    a, b, c = (torch.nn.Parameter(torch.zeros(5)) for _ in range(3))
    batches = [torch.randn(5), torch.randn(5)]
    extra = [torch.randn(5), torch.randn(5)]

    def set_grads(k):
        g = batches[k].clone()
        a.grad = g
        b.grad = g
        c.grad = extra[k].clone()

    ga = oxoptim.GradientAverager([a, b, c])
    _two_batches(set_grads, ga)
    want = (3 * batches[0] + 5 * batches[1]) / 8
    torch.testing.assert_close(a.grad, want)
    torch.testing.assert_close(b.grad, want)
    torch.testing.assert_close(c.grad, (3 * extra[0] + 5 * extra[1]) / 8)


def _snapshot(ga, params):
    return ([None if p.grad is None else p.grad.clone() for p in params],
            [None if m is None else m.clone() for m in ga._means], list(ga._seen), ga.samples, ga.batches)


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("already", [0, 1])
def test_a_refused_accumulate_changes_nothing(already):
    """A gradient that cannot be zeroed (an immutable ZeroTensor, which sends the call to torch's
    path) after others that can: the call raises having zeroed, folded and counted nothing, and a retry with the
    gradient repaired gives the right mean."""
    a, b, c = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))
    ga = oxoptim.GradientAverager([a, b, c])
    first = [torch.randn(4), torch.randn(4), torch.randn(2, 3)]
    if already:
        a.grad, b.grad, c.grad = (g.clone() for g in first)
        ga.accumulate(2)
    second = [torch.randn(4), torch.randn(4), torch.randn(2, 3)]
    a.grad, c.grad = second[0].clone(), second[2].clone()
    b.grad = torch._efficientzerotensor(4)
    before = _snapshot(ga, [a, b, c])
    with pytest.raises(RuntimeError):
        ga.accumulate(3)
    assert _same(_snapshot(ga, [a, b, c]), before)
    b.grad = torch.zeros(4)
    ga.accumulate(3)
    ga.finalize()
    if already:
        torch.testing.assert_close(a.grad, (2 * first[0] + 3 * second[0]) / 5)
        torch.testing.assert_close(b.grad, 2 * first[1] / 5)
        torch.testing.assert_close(c.grad, (2 * first[2] + 3 * second[2]) / 5)
    else:
        torch.testing.assert_close(a.grad, second[0])
        torch.testing.assert_close(b.grad, torch.zeros(4))
        torch.testing.assert_close(c.grad, second[2])
