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


# Gradients whose norm leaves the range of the dtype torch reduces in (float32
# for float32, bfloat16 and float16; float64 for float64). Each case:
# (dtype, norm_type, tensors as (numel, value)). torch's per-tensor
# ``vector_norm`` sums |x|^p in that dtype, then takes the norm of the stacked
# per-tensor norms; a tensor of one element is its |x|.
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
RANGE_CASES = {
    # the review's cases: torch's float32 sum of squares / cubes / powers overflows
    "f32-p2-4096x4e17": (_F32, 2.0, [(4096, 4e17)]),
    "f32-p2-2x1.5e19": (_F32, 2.0, [(2, 1.5e19)]),
    "f32-p3-2x1e13": (_F32, 3.0, [(2, 1e13)]),
    "f32-p1000-2x2": (_F32, 1000.0, [(2, 2.0)]),
    # ... or underflows: each |x|^3 is 0 in float32, so torch's norm is 0
    "f32-p3-5x1e-20": (_F32, 3.0, [(5, 1e-20)]),
    "f32-p1000-2x0.9": (_F32, 1000.0, [(2, 0.9)]),
    # |x|^3 = 1e-45 is float32's smallest subnormal: torch's terms lose digits
    "f32-p3-5x1e-15-subnormal": (_F32, 3.0, [(5, 1e-15)]),
    # finite per-tensor norms whose stacked norm overflows (the total-norm stage)
    "f32-p2-total-[1.5e19]+[1.5e19]": (_F32, 2.0, [(1, 1.5e19), (1, 1.5e19)]),
    "f32-p2-total-2x1.3e19+2x1.3e19": (_F32, 2.0, [(2, 1.3e19), (2, 1.3e19)]),
    "f32-p3-total-[6e12]+[6e12]": (_F32, 3.0, [(1, 6e12), (1, 6e12)]),
    "f32-p3-total-[3e38]+empty": (_F32, 3.0, [(1, 3e38), (0, 0.0)]),
    "bf16-p2-4096x4e17": (_BF16, 2.0, [(4096, 4e17)]),
    "bf16-p2-total-[1.5e19]+[1.5e19]": (_BF16, 2.0, [(1, 1.5e19), (1, 1.5e19)]),
    "bf16-p1000-2x2": (_BF16, 1000.0, [(2, 2.0)]),
    "bf16-p3-4x1e-20": (_BF16, 3.0, [(4, 1e-20)]),
    "f16-p1000-2x2": (_F16, 1000.0, [(2, 2.0)]),
    "f16-p20-2x300": (_F16, 20.0, [(2, 300.0)]),
    # one tensor of one element: torch returns |x| whatever p, with no |x|^p to overflow
    "f64-p2-single-1e300": (_F64, 2.0, [(1, 1e300)]),
    "f64-p2-single-1e-200": (_F64, 2.0, [(1, 1e-200)]),
}
# Cases the float64 accumulation already got right; they guard the emulation
# (float16 norms above 65504, p < 1, one-element tensors, float64's own range).
RANGE_GUARDS = {
    "f16-p2-2x60000": (_F16, 2.0, [(2, 60000.0)]),
    "f16-p2-total-[50000]+[50000]": (_F16, 2.0, [(1, 50000.0), (1, 50000.0)]),
    "f16-p1-total-[40000]+[40000]": (_F16, 1.0, [(1, 40000.0), (1, 40000.0)]),
    "f16-p2-100000x300": (_F16, 2.0, [(100_000, 300.0)]),
    "f16-p3-2x60000": (_F16, 3.0, [(2, 60000.0)]),
    "f16-p3-single-60000": (_F16, 3.0, [(1, 60000.0)]),
    "f32-p1-2x2e38": (_F32, 1.0, [(2, 2e38)]),
    "f32-p0.5-2x1e38": (_F32, 0.5, [(2, 1e38)]),
    "f32-p0.5-2x1e20": (_F32, 0.5, [(2, 1e20)]),
    "f32-p3-single-3e38": (_F32, 3.0, [(1, 3e38)]),
    "f32-p3-single-1e-20": (_F32, 3.0, [(1, 1e-20)]),
    "f32-p1000-single-2": (_F32, 1000.0, [(1, 2.0)]),
    "f32-p2-1e-23": (_F32, 2.0, [(5, 1e-23)]),
    "f32-pinf-3e38": (_F32, float("inf"), [(2, 3e38), (1, 3e38)]),
    "bf16-p2-4x1e-30": (_BF16, 2.0, [(4, 1e-30)]),
    "f64-p2-total-[1e300]+[1e300]": (_F64, 2.0, [(1, 1e300), (1, 1e300)]),
    "f64-p1000-2x2": (_F64, 1000.0, [(2, 2.0)]),
    "f64-p3-2x1e-110": (_F64, 3.0, [(2, 1e-110)]),
}


def _range_grads(dtype, spec):
    ps = []
    for numel, value in spec:
        p = torch.zeros(numel, dtype=dtype, requires_grad=True)
        p.grad = torch.full((numel,), value, dtype=dtype)
        ps.append(p)
    return ps


def _check_range_case(dtype, norm_type, spec):
    ours, theirs = _range_grads(dtype, spec), _range_grads(dtype, spec)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    got = oxoptim.clip_grad_norm_(ours, 1.0, norm_type)
    assert got.dtype == want.dtype
    if not want.isfinite() or want.item() == 0.0:
        assert torch.equal(got, want), (got, want)  # inf and 0 exactly
    else:
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=0)
    for p, q in zip(ours, theirs):  # an infinite norm zeroes the gradients (coef = max_norm / inf)
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL[dtype], atol=0, equal_nan=True)
    grads = [t.grad for t in _range_grads(dtype, spec)]
    want_total = torch.nn.utils.get_total_norm(grads, norm_type)
    got_total = oxoptim.get_total_norm(grads, norm_type)
    assert torch.equal(got_total, want_total) or want_total.isfinite() and want_total.item() != 0.0


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_norm_leaving_the_reduction_dtype_range_matches_torch(case):
    _check_range_case(*RANGE_CASES[case])


@pytest.mark.parametrize("case", list(RANGE_GUARDS))
def test_norm_at_the_range_edges_stays_torch_s(case):
    _check_range_case(*RANGE_GUARDS[case])


@pytest.mark.parametrize(
    "dtype, norm_type, spec",
    [
        (_F32, 1000.0, [(2, 2.0)]),
        (_F32, 2.0, [(4096, 4e17)]),
        (_F32, 2.0, [(2, 1.3e19), (2, 1.3e19)]),
        (_BF16, 3.0, [(2, 1e13)]),
        (_F16, 1000.0, [(2, 2.0)]),
    ],
    ids=["f32-p1000-2x2", "f32-p2-4096x4e17", "f32-p2-total-2x1.3e19+2x1.3e19", "bf16-p3-2x1e13", "f16-p1000-2x2"],
)
def test_overflowing_norm_raises_like_torch(dtype, norm_type, spec):
    with pytest.raises(RuntimeError, match="non-finite") as e2:
        torch.nn.utils.clip_grad_norm_(_range_grads(dtype, spec), 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite") as e1:
        oxoptim.clip_grad_norm_(_range_grads(dtype, spec), 1.0, norm_type, error_if_nonfinite=True)
    assert str(e1.value) == str(e2.value)
    grads = [p.grad for p in _range_grads(dtype, spec)]
    with pytest.raises(RuntimeError, match="non-finite"):
        oxoptim.get_total_norm(grads, norm_type, error_if_nonfinite=True)


def _with_grads(values: list) -> list:
    params = [torch.zeros(len(v), requires_grad=True) for v in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor(v)
    return params


def test_the_total_norm_is_on_the_gradients_device_not_the_default_one():
    outcomes = []
    for clip in (torch.nn.utils.clip_grad_norm_, oxoptim.clip_grad_norm_):
        params = _with_grads([[3.0, 4.0]])
        with torch.device("meta"):
            norm = clip(params, 1.0)
            total = (torch.nn.utils.get_total_norm if clip is torch.nn.utils.clip_grad_norm_ else oxoptim.get_total_norm)([p.grad for p in params])
        outcomes.append((norm.device, float(norm), total.device, params[0].grad.tolist()))
    assert outcomes[0] == outcomes[1] and outcomes[1][0].type == "cpu"


def test_an_empty_generator_warns_as_torch_does():
    messages = []
    for clip in (torch.nn.utils.clip_grad_norm_, oxoptim.clip_grad_norm_):
        with pytest.warns(UserWarning) as record:
            clip((p for p in []), 1.0)
        messages.append([str(w.message) for w in record])
    assert messages[0] == messages[1] == ["`parameters` is an empty generator, no gradient clipping will occur."]


@pytest.mark.parametrize("max_norm", ["abc", None])
def test_max_norm_is_checked_without_gradients_too(max_norm):
    errors = []
    for clip in (torch.nn.utils.clip_grad_norm_, oxoptim.clip_grad_norm_):
        with pytest.raises((TypeError, ValueError)) as info:
            clip([torch.zeros(2, requires_grad=True)], max_norm)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("norm_type, values", [
    (1e300, [[1.0, 2.0], [3.0, 4.0]]), (-1e300, [[1.0, 2.0], [3.0, 4.0]]), (3.5e38, [[0.5, 0.25], [0.1]]),
    (1e-300, [[0.0, 0.0], [0.0]]), (1e-300, [[1.0, 2.0], [3.0]]), (1e-41, [[1.0, 2.0], [3.0]]),
], ids=str)
def test_a_norm_type_beyond_float32_is_torchs_norm(norm_type, values):
    """torch computes with a float32 p (inf, 0 or subnormal here): its result, bit for bit."""
    outcomes = []
    for clip in (torch.nn.utils.clip_grad_norm_, oxoptim.clip_grad_norm_):
        params = _with_grads(values)
        norm = clip(params, 1.0, norm_type)
        outcomes.append((norm.tolist(), [p.grad.tolist() for p in params]))
    assert outcomes[0] == outcomes[1]
