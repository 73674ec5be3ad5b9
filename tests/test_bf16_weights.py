"""bfloat16 weights without an fp32 master copy (``bf16_stochastic_round`` and
``kahan_sum``): stochastic rounding is unbiased and never leaves the two
neighbours of the float64 update; both track a float64 run where rounding to
nearest stalls; Kahan matches torch-optimi's; the thread count never changes
a bit; state dicts resume bit for bit; bad input changes nothing."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import oxoptim

SR = {"bf16_stochastic_round": True}
KAHAN = {"kahan_sum": True}
BF16_STATE = {"state_dtype": torch.bfloat16}


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 numbers at or below and at or above each float64 value."""
    near = x.to(torch.bfloat16)
    below = torch.where(near.double() > x, torch.nextafter(near, torch.tensor(-math.inf, dtype=torch.bfloat16)), near)
    above = torch.where(near.double() < x, torch.nextafter(near, torch.tensor(math.inf, dtype=torch.bfloat16)), near)
    return below, above


def adamw_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float, wd: float) -> torch.Tensor:
    """One torch AdamW step in float64 (moments given, updated in place)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    p = p.double() * (1 - lr * wd)
    m.lerp_(g.double(), 1 - beta1)
    v.mul_(beta2).addcmul_(g.double(), g.double(), value=1 - beta2)
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return p - lr / (1 - beta1**step) * m / denom


def test_stochastic_rounding_is_unbiased() -> None:
    # Every element takes the same value a quarter of the way from one bfloat16
    # to the next: the fraction rounded up must be 1/4 within a binomial bound.
    torch.manual_seed(0)
    n = 1 << 16
    lo = torch.tensor(1.5, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    ulp = (hi.double() - lo.double()).item()
    p = torch.nn.Parameter(torch.full((n,), hi.item(), dtype=torch.bfloat16))
    opt = oxoptim.SGD([p], lr=1.0, **SR)
    ups = 0
    steps = 8
    for _ in range(steps):
        with torch.no_grad():
            p.fill_(hi.item())
        p.grad = torch.full_like(p, 0.75 * ulp)  # hi - 0.75 ulp: a quarter above lo
        opt.step()
        assert bool(((p == lo) | (p == hi)).all()), "a value outside the two neighbours"
        ups += int((p == hi).sum())
    trials = n * steps
    sigma = math.sqrt(trials * 0.25 * 0.75)
    assert abs(ups - 0.25 * trials) < 5 * sigma, (ups, trials)
    assert opt.param_groups[0]["sr_count"] == steps


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_adamw_step_lies_between_the_neighbours_of_float64(wd: float) -> None:
    torch.manual_seed(1)
    n = 4099
    p = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16))
    m, v = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    opt = oxoptim.AdamW([p], lr=1e-2, weight_decay=wd, **SR)
    for step in range(1, 6):
        g = torch.randn(n).to(torch.bfloat16)
        # The reference starts from the stored bfloat16 state, as the kernel does.
        if step > 1:
            m.copy_(opt.state[p]["exp_avg"].double())
            v.copy_(opt.state[p]["exp_avg_sq"].double())
        want = adamw_reference(p.detach(), g, m, v, step, 1e-2, wd)
        p.grad = g
        opt.step()
        below, above = neighbours(want)
        outside = ((p.detach() != below) & (p.detach() != above)).double().mean().item()
        assert outside == 0.0, f"step {step}: {outside:.2%} outside the two neighbours"


def run(options: dict, steps: int, lr: float, n: int = 4096, threads: int | None = None) -> torch.Tensor:
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = oxoptim.SGD([p], lr=lr, **options)
    grads = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            p.grad = (torch.rand(n, generator=grads) + 0.5).to(torch.bfloat16)
            opt.step()
    finally:
        torch.set_num_threads(old)
    return p.detach().clone()


def test_low_precision_tracks_float64_where_rounding_to_nearest_stalls() -> None:
    # Updates of about lr = 1e-3, a quarter of an ulp of 1.0 in bfloat16:
    # round-to-nearest never moves; stochastic rounding and Kahan follow float64.
    steps, lr, n = 200, 1e-3, 4096
    grads = torch.Generator().manual_seed(3)
    want = torch.ones(n, dtype=torch.float64)
    for _ in range(steps):
        want -= lr * (torch.rand(n, generator=grads) + 0.5).to(torch.bfloat16).double()
    error = {name: run(options, steps, lr).double() - want for name, options in [("nearest", {}), ("sr", SR), ("kahan", KAHAN)]}
    bias = {name: e.mean().item() for name, e in error.items()}
    assert bias["nearest"] > 0.15, bias  # the control visibly loses: it never moves
    # Stochastic rounding: unbiased (each element a random walk of about
    # sqrt(steps) half-ulps, 0.015 here, which averages out over elements).
    assert abs(bias["sr"]) < 1e-3 and error["sr"].abs().mean().item() < 0.03, bias
    assert error["kahan"].abs().max().item() < 4e-3, bias
    # Kahan: the stored weight is within one bfloat16 ulp of float64 (mismatch rate 0).
    kahan = run(KAHAN, steps, lr).double()
    below, above = neighbours(want)
    off = ((kahan < below.double() - 1e-12) | (kahan > above.double() + 1e-12)).double().mean().item()
    assert off < 0.01, off


@pytest.mark.parametrize("options", [SR, KAHAN], ids=["sr", "kahan"])
def test_thread_count_never_changes_a_bit(options: dict) -> None:
    n = 200_003  # split across threads
    one = run(options, 3, 1e-2, n, threads=1)
    two = run(options, 3, 1e-2, n, threads=2)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))


# The other Rust twins take the same options through the same engine.
OTHER_TWINS = [oxoptim.RMSprop, oxoptim.Adagrad, oxoptim.Adamax, oxoptim.NAdam, oxoptim.RAdam, oxoptim.Adadelta,
               oxoptim.ASGD, oxoptim.Rprop, oxoptim.Lion]
# Settings that give each optimizer all its state arrays.
EXTRA: dict = {oxoptim.SGD: {"momentum": 0.9}, oxoptim.SGD8bit: {"momentum": 0.9, "nesterov": True}, oxoptim.RMSprop: {"momentum": 0.9, "centered": True}, oxoptim.Lion: {"weight_decay": 0.1}}


def make(cls: type, options: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in [(300,), (17, 5), (70_001,)]]
    return params, cls(params, lr=1e-3, **EXTRA.get(cls, {}), **options)


def grads_for(params: list, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def steps(params: list, opt: torch.optim.Optimizer, start: int, count: int) -> None:
    for s in range(start, start + count):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize(
    "cls, options",
    [(cls, options) for cls in (oxoptim.AdamW, oxoptim.Adam, oxoptim.SGD) for options in (SR, KAHAN, BF16_STATE, {**SR, **BF16_STATE})]
    + [(oxoptim.AdamW8bit, SR), (oxoptim.Adam8bit, SR), (oxoptim.SGD8bit, SR)]
    + [(cls, options) for cls in OTHER_TWINS for options in (SR, KAHAN, BF16_STATE)],
    ids=lambda x: x.__name__ if isinstance(x, type) else "+".join(x),
)
def test_state_dict_resumes_bit_for_bit(cls: type, options: dict) -> None:
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16  # bfloat16 state of float32 weights
    fresh, resumed = resume(cls, options, dtype)
    if options is BF16_STATE:
        assert all(v.dtype == torch.bfloat16 for e in fresh.state.values() for v in e.values() if v.dim())
    if options is KAHAN and cls not in (oxoptim.SGD, oxoptim.Lion):
        assert fresh.state[resumed[0]]["kahan_comp"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.SGD, *OTHER_TWINS], ids=lambda c: c.__name__)
def test_half_precision_weights_without_options_resume_bit_for_bit(cls: type, dtype: torch.dtype) -> None:
    """torch casts loaded 0-d state (NAdam's mu_product, ASGD's eta and mu) to the parameter's
    dtype; the native path computed with float32 ones before the checkpoint, so it keeps them."""
    fresh, resumed = resume(cls, {}, dtype)
    assert all(v.dtype == torch.float32 for e in fresh.state.values() for v in e.values() if v.dim() == 0)


def resume(cls: type, options: dict, dtype: torch.dtype) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """Three steps, a checkpoint, three more; a fresh optimizer loads the checkpoint and its three
    steps must give the same weights, bit for bit. Returns it and its parameters."""
    params, opt = make(cls, options, dtype=dtype)
    steps(params, opt, 0, 3)
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    steps(params, opt, 3, 3)
    # A fresh optimizer (another seed drawn) loads the checkpoint and goes on identically.
    resumed, fresh = make(cls, options, seed=1, dtype=dtype)
    with torch.no_grad():
        for r, w in zip(resumed, weights):
            r.copy_(w)
    fresh.load_state_dict(saved)
    steps(resumed, fresh, 3, 3)
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))
    return fresh, resumed


def test_seed_comes_from_torchs_generator() -> None:
    _, a = make(oxoptim.AdamW, SR, seed=5)
    _, b = make(oxoptim.AdamW, SR, seed=5)
    _, c = make(oxoptim.AdamW, SR, seed=6)
    assert a.param_groups[0]["sr_seed"] == b.param_groups[0]["sr_seed"] != c.param_groups[0]["sr_seed"]
    # Default state dicts stay torch's: no extra group keys.
    _, plain = make(oxoptim.AdamW, {})
    assert not {"bf16_stochastic_round", "kahan_sum", "sr_seed", "sr_count"} & set(plain.state_dict()["param_groups"][0])


def test_kahan_matches_torch_optimi() -> None:
    optimi = pytest.importorskip("optimi")
    torch.manual_seed(4)
    n = 8192
    init = torch.randn(n).to(torch.bfloat16)
    ours_p = torch.nn.Parameter(init.clone())
    theirs_p = torch.nn.Parameter(init.clone())
    ours = oxoptim.AdamW([ours_p], lr=1e-3, weight_decay=1e-2, kahan_sum=True)
    theirs = optimi.AdamW([theirs_p], lr=1e-3, weight_decay=1e-2, kahan_sum=True, foreach=False)
    for s in range(20):
        g = grads_for([ours_p], s)[0]
        ours_p.grad, theirs_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    a, b = ours_p.detach().double(), theirs_p.detach().double()
    ulp = (torch.nextafter(theirs_p.detach(), torch.tensor(math.inf, dtype=torch.bfloat16)).double() - b).abs()
    mismatch = ((a - b).abs() > ulp).double().mean().item()
    # Measured: 0.27% (torch-optimi debiases the betas instead of the moments, rounded differently).
    assert mismatch < 0.01, f"{mismatch:.2%} of weights more than one ulp from torch-optimi's"
    # Weight plus compensation: the same displacement, to a few percent.
    moved_ours = a + ours.state[ours_p]["kahan_comp"].double() - init.double()
    moved_theirs = b + theirs.state[theirs_p]["kahan_comp"].double() - init.double()
    assert (moved_ours - moved_theirs).abs().mean() < 0.1 * moved_theirs.abs().mean()


def test_bad_input_is_refused_before_anything_changes() -> None:
    f32 = torch.nn.Parameter(torch.randn(4))
    for options in (SR, KAHAN):
        with pytest.raises(ValueError, match="bfloat16 parameters"):
            oxoptim.AdamW([f32], **options)
    with pytest.raises(ValueError, match="alternatives"):
        oxoptim.AdamW([torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))], **SR, **KAHAN)
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        oxoptim.Lion([f32], bf16_stochastic_round=True)
    with pytest.raises(TypeError):
        oxoptim.Subgradient([f32], bf16_stochastic_round=True)  # no Rust twin, no low-precision options
    params, opt = make(oxoptim.AdamW, SR)
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        opt.add_param_group({"params": [f32]})
    assert len(opt.param_groups) == 1
    # A parameter turned float32 after construction: the step refuses, every
    # group, weight, state entry and counter stays as it was.
    steps(params, opt, 0, 2)
    bad = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
    opt.add_param_group({"params": [bad]})
    bad.data = bad.data.float()
    bad.grad = torch.ones(3)
    for p, g in zip(params, grads_for(params, 2)):
        p.grad = g
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        opt.step()
    after = opt.state_dict()
    assert [g["sr_count"] for g in after["param_groups"]] == [g["sr_count"] for g in before["param_groups"]]
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), name
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_eight_bit_state_with_bf16_weights() -> None:
    # Rounded to nearest: the float32 8-bit step on the widened weights, rounded.
    torch.manual_seed(7)
    init = torch.randn(5000).to(torch.bfloat16)
    grads = [torch.randn(5000).to(torch.bfloat16) for _ in range(3)]
    half = torch.nn.Parameter(init.clone())
    wide = torch.nn.Parameter(init.float())
    a, b = oxoptim.AdamW8bit([half], lr=1e-2), oxoptim.AdamW8bit([wide], lr=1e-2)
    sr_p = torch.nn.Parameter(init.clone())
    sr = oxoptim.AdamW8bit([sr_p], lr=1e-2, bf16_stochastic_round=True)
    for g in grads:
        # Each step starts the float32 run from the stored bfloat16 weights.
        with torch.no_grad():
            wide.copy_(half.float())
        half.grad, wide.grad = g, g.float()
        a.step()
        b.step()
        assert torch.equal(half, wide.to(torch.bfloat16))
        assert torch.equal(a.state[half]["exp_avg"], b.state[wide]["exp_avg"])
    # Stochastic rounding: one step from the same state lies between the neighbours of the float32 update.
    with torch.no_grad():
        wide.copy_(half.float())
        sr_p.copy_(half)
    sr.load_state_dict({**a.state_dict(), "param_groups": [{**a.state_dict()["param_groups"][0], "bf16_stochastic_round": True, "sr_seed": 1, "sr_count": 0}]})
    g = torch.randn(5000).to(torch.bfloat16)
    sr_p.grad, wide.grad = g, g.float()
    sr.step()
    b.step()
    below, above = neighbours(wide.detach().double())
    assert bool(((sr_p == below) | (sr_p == above)).all())
    assert bool((sr_p != wide.to(torch.bfloat16)).any()), "never left round-to-nearest"
    with pytest.raises(ValueError, match="kahan_sum"):
        oxoptim.AdamW8bit([half], kahan_sum=True)


@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.Adam, oxoptim.SGD, *OTHER_TWINS], ids=lambda c: c.__name__)
def test_bf16_state_is_the_float32_update_with_moments_rounded(cls: type) -> None:
    """float32 weights, bfloat16 state: each step computes exactly what the
    float32-state optimizer computes from the same (widened) state and weights;
    the weights match bit for bit and the new state is its float32 state rounded."""
    params, ours = make(cls, BF16_STATE, dtype=torch.float32)
    twins, theirs = make(cls, {}, dtype=torch.float32)
    # Rprop's fresh step sizes are lr, which bfloat16 rounds: its first steps differ by design.
    start = 1 if cls is oxoptim.Rprop else 0
    for s in range(4):
        grads = grads_for(params, s)
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g, g.clone()
        if s:
            for p, t in zip(params, twins):
                with torch.no_grad():
                    t.copy_(p)
                for key, value in ours.state[p].items():
                    if value.dim():  # the widened bfloat16 state
                        theirs.state[t][key] = value.float()
        ours.step()
        theirs.step()
        if s < start:
            continue
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
            for key, value in ours.state[p].items():
                if value.dim():
                    assert value.dtype == torch.bfloat16
                    assert torch.equal(value, theirs.state[t][key].to(torch.bfloat16)), key


def test_bf16_state_bytes_threads_and_bad_input() -> None:
    params, opt = make(oxoptim.AdamW, BF16_STATE, dtype=torch.float32)
    steps(params, opt, 0, 1)
    state_bytes = sum(v.numel() * v.element_size() for e in opt.state.values() for v in e.values() if v.dim())
    assert state_bytes == 4 * sum(p.numel() for p in params)  # Adam: 4 bytes per parameter (fp32: 8)
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params, opt = make(oxoptim.AdamW, BF16_STATE, dtype=torch.float32)
            steps(params, opt, 0, 3)
        finally:
            torch.set_num_threads(old)
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="state_dtype"):
        oxoptim.AdamW(params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16 parameters"):
        oxoptim.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], state_dtype=torch.bfloat16)


def test_stream_ids_name_each_parameters_random_bits() -> None:
    """A parameter's stochastic rounding follows its stream id, not its place in the call;
    a wrong number of ids is refused before anything is written."""
    from oxoptim import _core

    def step(params: list[torch.Tensor], ids: list[int] | None) -> bool:
        grads = [torch.full_like(p, -1.0 / 256) for p in params]  # halfway: every element shows its bit
        hyper = {"lr": 1.0, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
        return _core.step("sgd", params, grads, [], [], hyper, stochastic_round=(7, 2), stream_ids=ids)

    a, b = torch.ones(300, dtype=torch.bfloat16), torch.ones(300, dtype=torch.bfloat16)
    assert step([a, b], [4, 11])
    alone = torch.ones(300, dtype=torch.bfloat16)
    assert step([alone], [11])
    assert torch.equal(alone, b)
    positional = torch.ones(300, dtype=torch.bfloat16)
    assert step([positional], None)
    assert not torch.equal(positional, b)
    untouched = torch.ones(300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected 1 stream ids, got 2"):
        step([untouched], [1, 2])
    assert torch.equal(untouched, torch.ones(300, dtype=torch.bfloat16))


def test_stream_ids_follow_the_groups_as_they_are_now() -> None:
    """A parameter's stream is its position in the optimizer as the groups are at the call, after
    groups are removed or parameters moved between them, so that a continued run equals the run
    resumed from its checkpoint (a fresh optimizer numbers the parameters afresh)."""
    from oxoptim._lowprec import stream_ids

    a, b, c, d = (torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)) for _ in range(4))
    opt = oxoptim.SGD([{"params": [a, b]}, {"params": [c]}, {"params": [d]}], lr=0.1, **SR)
    assert stream_ids(opt, [c, d]) == [2, 3]
    del opt.param_groups[0]
    assert stream_ids(opt, [c, d]) == [0, 1]
    opt.add_param_group({"params": [a, b]})
    assert stream_ids(opt, [a, b, c]) == [2, 3, 0]
    opt.param_groups[0]["params"][0], opt.param_groups[2]["params"][0] = a, c  # moved between groups
    assert stream_ids(opt, [c, a]) == [2, 0]
    del opt.param_groups[2]["params"][1]  # b
    opt.param_groups[0]["params"].insert(0, b)
    assert stream_ids(opt, [d, c, b]) == [2, 3, 0]


def test_a_run_continued_after_removing_a_group_equals_its_resumed_checkpoint() -> None:
    def grads(params: list, step: int) -> None:
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(torch.bfloat16)

    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(300, generator=g).to(torch.bfloat16)) for _ in range(3)]
    opt = oxoptim.RMSprop([{"params": [p]} for p in params], lr=1e-2, **SR)
    grads(params, 0)
    opt.step()
    del opt.param_groups[0]  # the first block is no longer trained (torch's state_dict needs its state gone too)
    del opt.state[params[0]]
    grads(params[1:], 1)
    opt.step()
    saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params[1:]]
    grads(params[1:], 2)
    opt.step()
    resumed = [torch.nn.Parameter(w) for w in weights]
    fresh = oxoptim.RMSprop([{"params": [p]} for p in resumed], lr=1e-2, **SR)
    fresh.load_state_dict(saved)
    grads(resumed, 2)
    fresh.step()
    for a, b in zip(params[1:], resumed):
        assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))


@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.Adam, oxoptim.SGD, *OTHER_TWINS], ids=lambda c: c.__name__)
def test_every_twin_rounds_its_step_stochastically(cls: type) -> None:
    """One step from bfloat16 weights: every element is one of the two bfloat16 neighbours of
    the float32 optimizer's result from the same (widened) weights and gradients, and a good
    share is not the nearest one (the option is honoured, not rounded to nearest)."""
    n = 20_000
    g = torch.Generator().manual_seed(9)
    weights, grads = torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
    # bfloat16 holds these lrs exactly (Rprop's fresh step sizes, state like the weights, are lr);
    # Adadelta's lr scales an already small delta.
    lr = 1.0 if cls is oxoptim.Adadelta else 2.0**-10
    ours, exact = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.float())
    extra = EXTRA.get(cls, {})
    opt, reference = cls([ours], lr=lr, **extra, **SR), cls([exact], lr=lr, **extra)
    ours.grad, exact.grad = grads.clone(), grads.float()
    opt.step()
    reference.step()
    below, above = neighbours(exact.detach().double())
    got = ours.detach()
    assert bool(((got == below) | (got == above)).all())
    not_nearest = (got != exact.detach().to(torch.bfloat16)).double().mean().item()
    assert not_nearest > 0.05, not_nearest


@pytest.mark.parametrize(
    "cls, options",
    [(cls, options) for cls in (oxoptim.SGD, oxoptim.AdamW, oxoptim.RMSprop, oxoptim.Lion) for options in (SR, KAHAN, BF16_STATE)]
    + [(oxoptim.AdamW8bit, SR), (oxoptim.SGD8bit, SR)],  # 8-bit state takes only stochastic rounding
    ids=lambda x: x.__name__ if isinstance(x, type) else "+".join(x),
)
def test_a_checkpoint_saved_without_the_options_keeps_the_optimizers_own(cls: type, options: dict) -> None:
    """A state dict saved without low-precision options (torch's, or an earlier run's) stores none
    in its groups: loading it keeps the options the optimizer was built with, as torch keeps the
    defaults of group keys a saved dict lacks, instead of silently rounding to nearest."""
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16
    params, plain = make(cls, {}, dtype=dtype)
    steps(params, plain, 0, 2)
    saved = copy.deepcopy(plain.state_dict())
    _, opt = make(cls, options, seed=3, dtype=dtype)
    own = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    opt.load_state_dict(copy.deepcopy(saved))  # torch's load keeps tensors it need not cast: no aliasing
    group = opt.param_groups[0]
    for key in ("bf16_stochastic_round", "kahan_sum", "state_dtype", "sr_seed", "sr_count"):
        assert group.get(key) == own.get(key), key
    ours = group["params"]
    steps(ours, opt, 2, 2)  # and the options are in effect
    if options is SR:
        assert group["sr_count"] == 2
    if options is KAHAN:
        assert all(opt.state[p]["kahan_comp"].dtype == torch.bfloat16 for p in ours)
    if options is BF16_STATE:
        assert all(v.dtype == torch.bfloat16 for e in opt.state.values() for v in e.values() if v.dim())


def _not_contiguous(opt: torch.optim.Optimizer, bad: torch.nn.Parameter) -> None:
    pass  # the parameter itself is a transposed view


def _no_number(opt: torch.optim.Optimizer, bad: torch.nn.Parameter) -> None:
    opt.param_groups[-1]["weight_decay"] = None  # the kernels take a number


def _counter_in_compensation(opt: torch.optim.Optimizer, bad: torch.nn.Parameter) -> None:
    state = opt.state[bad]
    cell = state["kahan_comp"].view(torch.float32).reshape(-1)[0]
    cell.fill_(state["step"].item())
    state["step"] = cell  # a 0-d counter inside memory the step writes


@pytest.mark.parametrize(
    "options, cls, fault",
    [(options, cls, fault) for options in (SR, KAHAN, BF16_STATE) for cls in (oxoptim.AdamW, oxoptim.RMSprop, oxoptim.Lion)
     for fault in (_not_contiguous, _no_number, _counter_in_compensation)
     if fault is not _counter_in_compensation or (options is KAHAN and cls is not oxoptim.Lion)],  # Lion counts no steps
    ids=lambda x: x.__name__.strip("_") if callable(x) and not isinstance(x, type) else x.__name__ if isinstance(x, type) else "+".join(x),
)
def test_a_group_the_native_path_cannot_take_is_refused_before_any_group_steps(options: dict, cls: type, fault) -> None:
    """The options run on the native path only: a later group it cannot take (a non-contiguous
    parameter, a hyper-parameter that is no number, a step counter inside the Kahan compensation)
    is refused before the first group is stepped; weights, state and counters stay."""
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16
    params, opt = make(cls, options, dtype=dtype)
    if fault is _not_contiguous:
        steps(params, opt, 0, 1)
        bad = torch.nn.Parameter(torch.randn(8, 6).to(dtype).t())  # a transposed view: not contiguous
        opt.add_param_group({"params": [bad]})
    else:
        bad = torch.nn.Parameter(torch.randn(6, 8).to(dtype))
        opt.add_param_group({"params": [bad]})
        bad.grad = torch.ones(6, 8, dtype=dtype)
        steps(params, opt, 0, 1)  # the later group's state exists too
    fault(opt, bad)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    bad.grad = torch.ones(6, 8, dtype=dtype)
    _assert_native_only_refusal_changes_nothing(opt, params)


def _assert_native_only_refusal_changes_nothing(opt: Any, params: list) -> None:
    """``opt.step()`` raises the native-only error and leaves weights, state and stream counts as they were."""
    before, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="runs on the native path only"):
        opt.step()
    after = opt.state_dict()
    assert [g.get("sr_count") for g in after["param_groups"]] == [g.get("sr_count") for g in before["param_groups"]]
    assert after["state"].keys() == before["state"].keys()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), name
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_eight_bit_refuses_a_parameter_its_rounding_cannot_take_before_writing() -> None:
    """A small (fp32-state) parameter that is not contiguous cannot be rounded stochastically: the
    step refuses before the 8-bit parameters are stepped, and nothing moves."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(5000).to(torch.bfloat16))
    small = torch.nn.Parameter(torch.randn(8, 6).to(torch.bfloat16).t())  # below min_8bit_size, a transposed view
    opt = oxoptim.AdamW8bit([big, small], lr=1e-2, **SR)
    big.grad, small.grad = torch.randn(5000).to(torch.bfloat16), torch.randn(6, 8).to(torch.bfloat16)
    before = big.detach().clone()
    with pytest.raises(ValueError, match="needs dense contiguous bfloat16 CPU tensors"):
        opt.step()
    assert torch.equal(before, big) and not opt.state and opt.param_groups[0]["sr_count"] == 0


def test_sgd_with_dampening_takes_first_steps_under_bf16_state() -> None:
    """SGD with momentum and dampening under ``state_dtype=bfloat16``: a parameter's first
    step (torch's ``buf = clone(grad)``, dampening unused) and the later ones are the float32-
    state SGD's from the same widened state, bit for bit, also when a parameter's first
    gradient comes after the others' (a group with fresh and running buffers)."""
    kw = dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.1)
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(300,), (17, 5)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = oxoptim.SGD(params, **kw, **BF16_STATE), oxoptim.SGD(twins, **kw)
    for s in range(4):
        grads = grads_for(params, s)
        for i, (p, t, g) in enumerate(zip(params, twins, grads)):
            late = i == 1 and s < 2  # the second parameter's first gradient arrives at step 2
            p.grad, t.grad = (None, None) if late else (g, g.clone())
        for p, t in zip(params, twins):
            with torch.no_grad():
                t.copy_(p)
            if "momentum_buffer" in ours.state[p]:
                theirs.state[t]["momentum_buffer"] = ours.state[p]["momentum_buffer"].float()
        ours.step()
        theirs.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
            if "momentum_buffer" in theirs.state[t]:
                buf = ours.state[p]["momentum_buffer"]
                assert buf.dtype == torch.bfloat16 and torch.equal(buf, theirs.state[t]["momentum_buffer"].to(torch.bfloat16))
    assert all("momentum_buffer" in ours.state[p] for p in params)


@pytest.mark.parametrize("options", [SR, KAHAN], ids=["SR", "kahan"])
def test_sgd_with_dampening_steps_bfloat16_weights(options: dict) -> None:
    """bfloat16 weights with SGD momentum and dampening: the first step (fresh buffers) lands
    on a bfloat16 neighbour of the float32 SGD's result, and training goes on."""
    n = 20_000
    g = torch.Generator().manual_seed(5)
    weights, grads = torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
    ours, exact = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.float())
    kw = dict(lr=2.0**-6, momentum=0.9, dampening=0.5)
    opt, reference = oxoptim.SGD([ours], **kw, **options), torch.optim.SGD([exact], **kw)
    ours.grad, exact.grad = grads.clone(), grads.float()
    opt.step()
    reference.step()
    below, above = neighbours(exact.detach().double())
    assert bool(((ours.detach() == below) | (ours.detach() == above)).all())
    assert torch.equal(opt.state[ours]["momentum_buffer"], grads)  # torch's first buffer: the gradient
    ours.grad = torch.randn(n, generator=g).to(torch.bfloat16)
    opt.step()


@pytest.mark.parametrize("options", [SR, KAHAN, BF16_STATE], ids=["SR", "kahan", "bf16_state"])
def test_parameters_sharing_memory_in_a_later_group_are_refused_before_any_group_steps(options: dict) -> None:
    """Views of one tensor in the second group: refused (the native call cannot take them) before
    the first group is stepped, its rounding stream not moved."""
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16
    first = torch.nn.Parameter(torch.randn(64).to(dtype))
    base = torch.randn(100).to(dtype)
    views = [torch.nn.Parameter(base[:64]), torch.nn.Parameter(base[10:74])]
    for p in (first, *views):
        p.grad = torch.randn_like(p)
    opt = oxoptim.AdamW([{"params": [first]}, {"params": views}], **options)
    before, groups = first.detach().clone(), copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match="no shared memory"):
        opt.step()
    assert torch.equal(first, before) and not opt.state
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


@pytest.mark.parametrize(
    "cls, options",
    [(cls, options) for cls in (oxoptim.AdamW, oxoptim.SGD, *OTHER_TWINS) for options in (SR, KAHAN, BF16_STATE)]
    + [(oxoptim.AdamW8bit, SR), (oxoptim.SGD8bit, SR)],  # the 8-bit ones take stochastic rounding only
    ids=lambda x: x.__name__ if isinstance(x, type) else "+".join(x),
)
def test_named_parameters_take_the_options_as_parameters_do(cls: type, options: dict) -> None:
    """``cls(model.named_parameters(), **options)``: the group keeps ``param_names`` (torch's) and steps
    as the same optimizer built from the parameters alone."""
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16
    runs = []
    for named in (False, True):
        params, _ = make(cls, {}, dtype=dtype)
        names = ["a", "b", "c"]
        opt = cls(list(zip(names, params)) if named else params, lr=1e-3, **EXTRA.get(cls, {}), **options)
        if named:
            assert opt.param_groups[0]["param_names"] == names
        runs.append((params, opt))
    if options is SR:  # the same random stream for both
        runs[1][1].param_groups[0]["sr_seed"] = runs[0][1].param_groups[0]["sr_seed"]
    for params, opt in runs:
        steps(params, opt, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.Lion, oxoptim.SGD], ids=lambda c: c.__name__)
def test_a_group_stepped_before_one_that_raised_moves_its_rounding_count_on(cls: type) -> None:
    """torch's own step of a later group raises part-way through ``step()`` (as torch does, the
    groups before it are updated): their ``sr_count`` moves on, so that the next update draws new
    rounding bits rather than repeating the ones used."""
    torch.manual_seed(0)
    a, b = torch.randn(64).bfloat16(), torch.randn(4)
    opt = cls([dict(params=[a], bf16_stochastic_round=True), dict(params=[b])], lr=1e-3)
    a.grad = torch.randn(64).bfloat16()
    b.grad = torch.randn(4)
    b.grad.data = torch.randn(2, 2)  # a gradient of another shape: torch's step of group 1 raises
    before = a.clone()
    with pytest.raises(RuntimeError):
        opt.step()
    assert not torch.equal(a, before) and opt.param_groups[0]["sr_count"] == 1
    b.grad = torch.randn(4)
    opt.step()
    assert opt.param_groups[0]["sr_count"] == 2


def _misaligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor at an odd byte offset of a buffer (as from a memory-mapped file), filled with ones."""
    raw = torch.frombuffer(bytearray(1 + n * torch.tensor([], dtype=dtype).element_size()), dtype=dtype, offset=1, count=n)
    assert raw.data_ptr() % raw.element_size()
    return raw.fill_(1)


@pytest.mark.parametrize("options", [SR, KAHAN, BF16_STATE], ids=lambda o: "+".join(o))
@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.SGD, oxoptim.Lion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("where", ["param", "grad"])
def test_a_misaligned_tensor_in_a_later_group_is_refused_before_any_group_steps(options: dict, cls: type, where: str) -> None:
    """A parameter or gradient at an odd byte offset cannot be a kernel's array: with the options
    (native path only) a later group holding one is refused before the first group is stepped
    (the first group was stepped, then the native-only error was raised)."""
    dtype = torch.float32 if options is BF16_STATE else torch.bfloat16
    params, opt = make(cls, options, dtype=dtype)
    steps(params, opt, 0, 1)
    bad = torch.nn.Parameter(_misaligned(48, dtype) if where == "param" else torch.ones(48, dtype=dtype))
    opt.add_param_group({"params": [bad]})
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    bad.grad = _misaligned(48, dtype) if where == "grad" else torch.ones(48, dtype=dtype)
    _assert_native_only_refusal_changes_nothing(opt, [*params, bad])
