"""oxoptim optimizers produce torch's numbers (for-loop reference), step after step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oxoptim
from optimizers import SHAPES, TOLERANCE, TWIN_IDS, TWINS, Twin, clone_params, set_grads, state_of

STEPS = 25


def _groups(params: list[torch.Tensor], second: dict) -> list[dict]:
    if len(params) < 2:
        return [{"params": params}]
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], **second}]


def _assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, **tol) -> None:
    for p_ours, p_theirs in zip(
        (p for g in ours.param_groups for p in g["params"]), (p for g in theirs.param_groups for p in g["params"])
    ):
        torch.testing.assert_close(p_ours, p_theirs, **tol)
        s_ours, s_theirs = ours.state.get(p_ours, {}), theirs.state.get(p_theirs, {})
        assert s_ours.keys() == s_theirs.keys()
        for key in s_ours:
            torch.testing.assert_close(s_ours[key], s_theirs[key], **tol)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@given(data=st.data())
def test_matches_torch_over_many_steps(twin: Twin, data) -> None:
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    shapes = data.draw(st.lists(SHAPES, min_size=1, max_size=6), label="shapes")
    defaults, second = data.draw(twin.hyper(), label="group0"), data.draw(twin.hyper(), label="group1")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    mine, ref = clone_params(params), clone_params(params)
    ours = twin.ours(_groups(mine, second), **defaults)
    theirs = twin.make_theirs(_groups(ref, second), **defaults)
    for _ in range(STEPS):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, **TOLERANCE[dtype])


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_large_tensors_on_several_threads(twin: Twin, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen) for s in [(300_001,), (512, 300), (5,), ()]]
        mine, ref = clone_params(params), clone_params(params)
        ours, theirs = twin.ours(mine, **twin.typical), twin.make_theirs(ref, **twin.typical)
        for _ in range(20):
            set_grads(gen, mine, ref)
            ours.step()
            theirs.step()
        _assert_same_state(ours, theirs, **TOLERANCE[torch.float32])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_results_do_not_depend_on_thread_count(twin: Twin) -> None:
    before = torch.get_num_threads()
    finals = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(2)
            params = clone_params([torch.randn(s, generator=gen) for s in [(200_003,), (70_001,), (9,)]])
            opt = twin.ours(params, lr=0.01)
            for _ in range(5):
                set_grads(gen, params)
                opt.step()
            finals.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(before)
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            assert torch.equal(a, b)


def test_hundred_steps_of_sgd_momentum_match_within_1e6_relative() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randn(256, 1)
    models = [torch.nn.Linear(32, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [oxoptim.SGD(models[0].parameters(), lr=0.05, momentum=0.9), torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=0.9)]
    for _ in range(100):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_closure_and_lr_scheduler(twin: Twin) -> None:
    torch.manual_seed(4)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [twin.ours(models[0].parameters(), lr=0.05), twin.make_theirs(models[1].parameters(), lr=0.05)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in opts]
    for _ in range(20):
        losses = []
        for model, opt, sched in zip(models, opts, scheds):

            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
            sched.step()
        torch.testing.assert_close(losses[0], losses[1])
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"] < 0.05
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_params_without_grad_are_skipped(twin: Twin) -> None:
    a, b = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
    opt = twin.ours([a, b], lr=0.1)
    initial = state_of(opt, b)
    a.grad = torch.ones(5)
    opt.step()
    assert torch.equal(b, torch.ones(5)) and state_of(opt, b) == initial
    assert not torch.equal(a, torch.ones(5))


@pytest.mark.parametrize("twin", [t for t in TWINS if t.name in ("adam", "adamw")], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_torch_fused(twin: Twin, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters: fp32 math inside, state in the parameter dtype, as torch's fused path."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(dtype) for s in [(67,), (33, 3), (1,)]]
    mine, ref = clone_params(params), clone_params(params)
    ours, theirs = twin.ours(mine, lr=0.01, weight_decay=0.01), twin.theirs(ref, lr=0.01, weight_decay=0.01, fused=True)
    for _ in range(20):
        set_grads(gen, mine, ref)
        ours.step()
        theirs.step()
    for p in mine:
        assert p.dtype == dtype and ours.state[p]["exp_avg"].dtype == dtype
    # One rounding of the low-precision format, accumulated over the steps.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    _assert_same_state(ours, theirs, **tol)


def test_sgd_half_precision_matches_float32_math() -> None:
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(1000, generator=gen)
    p16 = base.to(torch.bfloat16).requires_grad_()
    p32 = base.to(torch.bfloat16).float().requires_grad_()
    o16, o32 = oxoptim.SGD([p16], lr=0.1), torch.optim.SGD([p32], lr=0.1)
    g = torch.randn(1000, generator=gen).to(torch.bfloat16)
    p16.grad, p32.grad = g.clone(), g.float()
    o16.step()
    o32.step()
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


_TEAM_SCRIPT = """
import hashlib, torch, oxoptim
torch.manual_seed(0)
ps = [torch.randn(s, requires_grad=True) for s in [(300_001,), (70_001,), (9,)]]
opt = oxoptim.AdamW(ps, lr=0.01)
for _ in range(3):
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
print(oxoptim.parallel_backend(), hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in ps)).hexdigest())
"""


def test_torch_openmp_team_and_rayon_pool_give_identical_results() -> None:
    import os
    import subprocess
    import sys

    out = {}
    for team in ("openmp", "rayon"):
        env = {**os.environ, "OXOPTIM_PARALLEL": team}
        line = subprocess.run([sys.executable, "-c", _TEAM_SCRIPT], env=env, capture_output=True, text=True, check=True).stdout.split()
        out[line[0]] = line[1]
    # With torch imported its libgomp is loaded, so the default is torch's team.
    assert set(out) == {"openmp", "rayon"}
    assert out["openmp"] == out["rayon"]
