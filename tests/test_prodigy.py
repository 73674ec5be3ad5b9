"""Prodigy against ``prodigyopt.Prodigy`` (its reference package): the
plain-torch statement of its maths bit for bit, the Rust path to rounding
(each tensor's sums of the estimate of d are reduced in a fixed order, not by
torch's dot/sum) while d moves. The shared tests (tests/optimizers.py, TWINS)
cover state_dict both ways, bad input, layouts, threads and skip_nonfinite."""

from __future__ import annotations

import contextlib
import io

import prodigyopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizers import _prodigy_hyper

import oxoptim
from oxoptim.prodigy import ProdigyReference

SHAPES = st.sampled_from([(), (0,), (1,), (7,), (17,), (33,), (3, 5), (2, 3, 7), (257, 9)])
HYPER = _prodigy_hyper()  # the shared table's strategy


def _run(make, params, hyper, steps, seed, zero_first=False):
    """``steps`` steps on the gradient of ½‖p − target‖² plus noise (d moves), fresh each step."""
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    opt = make(params, **hyper)
    d = []
    for k in range(steps):
        for p, t in zip(params, targets):
            noise = 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = torch.zeros_like(p) if zero_first and k == 0 else (p.detach() - t) + noise
        with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints about weight decay
            opt.step()
        d.append(opt.param_groups[0]["d"])
    return opt, d


def _params(shapes, dtype, zero_some, layout):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, s in enumerate(shapes):
        x = torch.zeros(s, dtype=dtype) if zero_some and i % 2 else torch.randn(s, generator=gen, dtype=dtype)
        if layout == "transposed" and x.dim() == 2:
            x = x.t().contiguous().t()  # a non-contiguous parameter: torch's path
        out.append(x)
    return out


def _clone(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


@given(shapes=st.lists(SHAPES, min_size=1, max_size=4), hyper=HYPER, dtype=st.sampled_from([torch.float32, torch.float64]),
       zero_some=st.booleans(), slice_p=st.sampled_from([1, 1, 2, 3]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_the_torch_reference_is_prodigyopt_bit_for_bit(shapes, hyper, dtype, zero_some, slice_p, seed) -> None:
    params = _params(shapes, dtype, zero_some, "contiguous")
    ours, d_ours = _run(ProdigyReference, _clone(params), {**hyper, "slice_p": slice_p}, 12, seed)
    theirs, d_theirs = _run(prodigyopt.Prodigy, _clone(params), {**hyper, "slice_p": slice_p}, 12, seed)
    assert d_ours == d_theirs
    _assert_states(ours, theirs, exact=True)


@given(shapes=st.lists(SHAPES, min_size=1, max_size=4), hyper=HYPER, dtype=st.sampled_from([torch.float32, torch.float64]),
       zero_some=st.booleans(), layout=st.sampled_from(["contiguous", "contiguous", "transposed"]),
       zero_first=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_matches_prodigyopt_to_rounding_while_d_moves(shapes, hyper, dtype, zero_some, layout, zero_first, seed) -> None:
    params = _params(shapes, dtype, zero_some, layout)
    ours, d_ours = _run(oxoptim.Prodigy, _clone(params), hyper, 15, seed, zero_first)
    theirs, d_theirs = _run(prodigyopt.Prodigy, _clone(params), hyper, 15, seed, zero_first)
    # d: each tensor's sums agree to rounding (float32: a few ulps of the sum), so d does.
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(d_ours, d_theirs):
        assert abs(a - b) <= rel * abs(b), (d_ours, d_theirs)
    _assert_states(ours, theirs, exact=False)


def _assert_states(ours, theirs, exact: bool) -> None:
    for g, h in zip(ours.param_groups, theirs.param_groups):
        assert g.keys() - {"skip_nonfinite"} == h.keys()
        assert g["k"] == h["k"]
        for p, q in zip(g["params"], h["params"]):
            pairs = [(p.detach(), q.detach())] + [(ours.state[p][k], theirs.state[q][k]) for k in theirs.state[q]]
            assert ours.state[p].keys() == theirs.state[q].keys()
            assert ours.state[p]["step"] == theirs.state[q]["step"] and type(ours.state[p]["step"]) is int
            for a, b in pairs:
                if not torch.is_tensor(b):
                    continue
                if exact:
                    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                else:
                    assert a.dtype == b.dtype and a.shape == b.shape
                    _assert_close_but_a_few(a, b)


def _assert_close_but_a_few(a: torch.Tensor, b: torch.Tensor) -> None:
    """Relative to each element and to the tensor's scale (s and the moments scale with d,
    elements near zero cancel). Over 15 steps an element whose second moment is tiny (beta1 = 0,
    a gradient near zero) or whose sum s cancels amplifies d's last-bit difference (d itself is
    checked to 1e-4): at most 0.5% of the elements beyond 100x the per-element tolerance (seen:
    2 of 2313, 5% off), none beyond 1000x."""
    rtol, scale = (1e-4, 1e-5) if a.dtype == torch.float32 else (1e-9, 1e-11)
    atol = scale * float(b.abs().max()) if b.numel() else 0.0
    a64, b64 = a.double(), b.double()
    off = (a64 - b64).abs() - atol
    beyond = off > 100 * rtol * b64.abs()
    assert int(beyond.sum()) <= 0.005 * b.numel(), f"{int(beyond.sum())} of {b.numel()} elements off: {a[beyond]} vs {b[beyond]}"
    torch.testing.assert_close(a, b, rtol=1000 * rtol, atol=10 * atol)


def test_the_native_passes_run(monkeypatch) -> None:
    """Float32/float64 CPU groups take the Rust passes, never the torch reference's."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's path ran")

    for name in ("_moments", "_params"):
        monkeypatch.setattr(ProdigyReference, name, forbidden)
    sums = []
    original = oxoptim._core.prodigy_sums
    monkeypatch.setattr(oxoptim._core, "prodigy_sums", lambda *a, **k: sums.append(1) or original(*a, **k))
    params = _clone([torch.randn(5, 3), torch.zeros(4), torch.randn(2, dtype=torch.float64)])
    _run(oxoptim.Prodigy, params, dict(weight_decay=0.1, decouple=False, d0=1e-2), 3, 0)
    assert len(sums) == 3 * 2  # per step: the parameters with a p0, then those whose p0 is zero
    sums.clear()
    _run(oxoptim.Prodigy, _clone([torch.randn(5, 3).bfloat16(), torch.randn(4).half()]), dict(d0=1e-2), 3, 0)
    assert len(sums) == 3  # half precision: the same native sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_sums_are_the_float32_sums_of_the_widened_tensors(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    p, g, s, p0 = (torch.randn(5000, generator=gen).to(dtype) for _ in range(4))
    options = dict(weight_decay=0.1, beta3=0.9, s_weight=0.3)
    (dot, abs_sum), = oxoptim._core.prodigy_sums([p], [g], [s], [p0], **options)
    (dot32, abs32), = oxoptim._core.prodigy_sums([p.float()], [g.float()], [s.float()], [p0.float()], **options)
    assert (dot, abs_sum) == (dot32, abs32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype) -> None:
    """Half precision too: its sums are widened and folded in float32 in a fixed order (torch's
    half-precision dot, which the reference uses, changes with the thread count)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300_001, generator=gen).to(dtype), torch.randn(70_001, generator=gen).to(dtype)]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            opt, d = _run(oxoptim.Prodigy, _clone(params), dict(d0=1e-2), 4, 1)
            results.append(([p.detach() for g in opt.param_groups for p in g["params"]], d))
    finally:
        torch.set_num_threads(before)
    assert results[0][1] == results[1][1]
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    assert all(torch.equal(a.view(bits), b.view(bits)) for a, b in zip(results[0][0], results[1][0]))  # NaN too


def test_step_in_backward_and_fsdp_are_refused() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="every gradient"):
        with oxoptim.step_in_backward(oxoptim.Prodigy(model.parameters())):
            pass
    with pytest.raises(ValueError, match="fsdp_in_use"):
        oxoptim.Prodigy(model.parameters(), fsdp_in_use=True)


@pytest.mark.parametrize("bad_group", [0, 1])
def test_a_group_skipped_for_a_nonfinite_gradient_steps_as_a_group_without_gradients(bad_group) -> None:
    """A NaN in either group gives what that group having no gradient gives (whichever group it
    is): its parameters and state untouched, while the one estimate of d moves on in every group."""
    torch.manual_seed(0)
    start = [torch.randn(6, 4), torch.randn(5)]

    def run(bad: str) -> tuple:
        params = [t.clone().requires_grad_() for t in start]
        opt = oxoptim.Prodigy([{"params": [params[0]]}, {"params": [params[1]]}], d0=1e-3, skip_nonfinite=True)
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1))
                if i == bad_group and step == 3:
                    p.grad = None if bad == "none" else p.grad.fill_(float("nan"))
            opt.step()
        settings = [{k: g[k] for k in ("d", "d_max", "d_numerator", "k")} for g in opt.param_groups]
        return [p.detach() for p in params], settings, opt.skipped_steps

    skipped, without = run("nan"), run("none")
    assert skipped[2] == 1 and without[2] == 0
    assert all(torch.equal(a, b) for a, b in zip(skipped[0], without[0]))
    assert skipped[1] == without[1] and skipped[1][0] == skipped[1][1]


def test_a_refused_step_counts_no_skip() -> None:
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = oxoptim.Prodigy([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5}], skip_nonfinite=True)
    params[0].grad, params[1].grad = torch.full((3,), float("nan")), torch.ones(2)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="different lr values"):
            opt.step()
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("slice_p", [1, 3])
@pytest.mark.parametrize("key", ["s", "p0"])
def test_a_flat_slice_of_the_wrong_length_is_refused_at_load(slice_p: int, key: str) -> None:
    """``s`` and ``p0`` are the reference's ``p.flatten()[::slice_p]``: ceil(numel / slice_p) elements
    (``p0`` a 0-d zero for a parameter that was all zeros). One element short or over loaded and the
    next step raised a size mismatch: refused at load, nothing changed. The reference's own state loads."""
    from optimizers import assert_unchanged, snapshot

    shapes = [(300,), (7, 5), (4,), (1,)]
    params = _params(shapes, torch.float32, False, "contiguous")
    params[2].zero_()  # its p0 is the reference's 0-d zero
    ours, _ = _run(oxoptim.Prodigy, _clone(params), {"d0": 1e-3, "slice_p": slice_p}, 2, seed=1)
    theirs, _ = _run(prodigyopt.Prodigy, _clone(params), {"d0": 1e-3, "slice_p": slice_p}, 2, seed=1)
    assert ours.state_dict()["state"][2]["p0"].dim() == 0
    fresh = oxoptim.Prodigy(_clone(params), d0=1e-3)  # slice_p=1: the loaded groups bring theirs
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.param_groups[0]["slice_p"] == slice_p
    good = ours.state_dict()
    for index, numel in ((0, 300), (1, 35), (3, 1)):
        size = -(-numel // slice_p)
        assert good["state"][index][key].shape == (size,)
        wrong = [torch.zeros(size - 1), torch.zeros(size + 1), torch.zeros(1, size), torch.zeros(numel + 1)]
        if key == "s":
            wrong.append(torch.tensor(0.0))
        if size != numel:
            wrong.append(torch.zeros(numel))  # the whole parameter: a slice_p=1 state
        for bad in wrong:
            sd = {"state": {i: dict(e) for i, e in good["state"].items()}, "param_groups": good["param_groups"]}
            sd["state"][index][key] = bad
            before = snapshot(ours)
            with pytest.raises(ValueError, match=rf"state\[{index}\]\['{key}'\] has shape .* but the parameter has shape .*: with slice_p={slice_p}, {key} needs shape \({size},\)"):
                ours.load_state_dict(sd)
            assert_unchanged(ours, before)
    if key == "p0":  # a 0-d p0 is the reference's own
        sd = {"state": {i: dict(e) for i, e in good["state"].items()}, "param_groups": good["param_groups"]}
        sd["state"][0]["p0"] = torch.tensor(0.0)
        ours.load_state_dict(sd)
    ours.load_state_dict(good)
