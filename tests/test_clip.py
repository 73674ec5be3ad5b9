"""oxoptim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oxoptim

# torch's own float32 sums are not exact (ours add blocks in float64), hence 1e-5.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def twins(shapes, dtype, seed, scale):
    torch.manual_seed(seed)
    a = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    b = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p, q in zip(a, b):
        g = (torch.randn(p.shape) * scale).to(dtype)
        p.grad, q.grad = g.clone(), g.clone()
    return a, b


shapes = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@given(
    shapes=shapes,
    norm_type=st.sampled_from([1, 2, 2.0, float("inf"), "inf", 3.0, 0.5]),
    dtype=st.sampled_from(list(TOL)),
    max_norm=st.sampled_from([0.1, 1.0, 1e6]),
    seed=st.integers(0, 1000),
    scale=st.sampled_from([1e-3, 1.0, 10.0]),
)
def test_matches_torch(shapes, norm_type, dtype, max_norm, seed, scale):
    ours, theirs = twins(shapes, dtype, seed, scale)
    try:
        want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    except RuntimeError as e:  # e.g. the infinity norm of an empty tensor
        with pytest.raises(RuntimeError, match=str(e)[:40]):
            oxoptim.clip_grad_norm_(ours, max_norm, norm_type)
        return
    got = oxoptim.clip_grad_norm_(ours, max_norm, norm_type)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-30 if dtype != torch.float16 else 1e-7)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=1e-30 if dtype != torch.float16 else 1e-7)


def test_single_tensor_empty_and_grad_none():
    p = torch.zeros(3, requires_grad=True)
    assert oxoptim.clip_grad_norm_(p, 1.0).item() == 0.0  # no grad
    assert oxoptim.clip_grad_norm_([], 1.0).item() == 0.0
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    q = torch.zeros(2, requires_grad=True)
    total = oxoptim.clip_grad_norm_([p, q], 1.0)
    assert total.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0]) * (1.0 / (5.0 + 1e-6)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_errors_like_torch(bad):
    ours, theirs = twins([(5,)], torch.float32, 0, 1.0)
    ours[0].grad[2] = bad
    theirs[0].grad[2] = bad
    with pytest.raises(RuntimeError, match="non-finite") as e1:
        oxoptim.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite") as e2:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    assert str(e1.value) == str(e2.value)
    a = oxoptim.clip_grad_norm_(ours, 1.0)
    b = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isnan(a.item()) == math.isnan(b.item()) and math.isinf(a.item()) == math.isinf(b.item())


def test_fallbacks_other_norms_and_layouts():
    for norm_type in (0.0, -float("inf")):
        ours, theirs = twins([(4, 3), (7,)], torch.float32, 1, 1.0)
        torch.testing.assert_close(
            oxoptim.clip_grad_norm_(ours, 1.0, norm_type), torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        )
    ours, theirs = twins([(4, 4)], torch.float32, 2, 1.0)
    for p in ours + theirs:
        p.grad = p.grad.t()  # non-contiguous
    torch.testing.assert_close(oxoptim.clip_grad_norm_(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    torch.testing.assert_close(ours[0].grad, theirs[0].grad)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf"), 3.0])
def test_total_norm_is_bit_identical_for_any_thread_count(norm_type):
    torch.manual_seed(0)
    grads = [torch.randn(300_001), torch.randn(70_003), torch.randn(5)]
    results = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            ps = [torch.zeros_like(g, requires_grad=True) for g in grads]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            total = oxoptim.clip_grad_norm_(ps, 1.0, norm_type)
            results.append((total.item(), [p.grad for p in ps]))
    finally:
        torch.set_num_threads(old)
    for total, gs in results[1:]:
        assert total == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(gs, results[0][1]))


def test_get_total_norm_matches_torch():
    torch.manual_seed(0)
    ts = [torch.randn(10, 10), torch.randn(3)]
    torch.testing.assert_close(oxoptim.get_total_norm(ts, 2.0), torch.nn.utils.get_total_norm(ts, 2.0))


def _duplicated(kind: str, dtype=torch.float32):
    """Parameters whose gradients alias: the same parameter listed twice, or
    two parameters sharing one gradient tensor."""
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(300, dtype=dtype, requires_grad=True)
    q = torch.zeros(7, dtype=dtype, requires_grad=True)
    p.grad = (torch.randn(300, generator=gen) * 3).to(dtype)
    q.grad = torch.randn(7, generator=gen).to(dtype)
    if kind == "listed-twice":
        return [p, q, p]
    r = torch.zeros(300, dtype=dtype, requires_grad=True)
    r.grad = p.grad  # one gradient tensor for two parameters
    return [p, q, r]


@pytest.mark.parametrize("kind", ["listed-twice", "shared-grad"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf"), 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_aliased_gradients_are_clipped_as_torch_does(kind, norm_type, max_norm):
    ours, theirs = _duplicated(kind), _duplicated(kind)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    got = oxoptim.clip_grad_norm_(ours, max_norm, norm_type)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for p, q in zip(ours, theirs):  # torch scales an aliased gradient once per listing
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0)


def test_total_norm_of_a_tensor_listed_twice_matches_torch():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for norm_type in (1.0, 2.0, float("inf"), 0.5):
        torch.testing.assert_close(
            oxoptim.get_total_norm([t, t[:10], t], norm_type), torch.nn.utils.get_total_norm([t, t[:10], t], norm_type)
        )
