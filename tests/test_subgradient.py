"""oxoptim.Subgradient: convergence on non-smooth convex problems with a float64
reference optimum, the constant-step band, the best iterate and state_dict."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oxoptim
from optimizers import beyond_one_ulp_rate

# --- problems and float64 reference solvers ---------------------------------


def lasso_problem(seed=0, m=80, d=20, lam=0.1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, d))
    w = np.zeros(d)
    w[:5] = 2 * rng.standard_normal(5)
    y = X @ w + 0.1 * rng.standard_normal(m)
    return X, y, lam


def lasso_objective(X, y, lam, w):
    return 0.5 * np.mean((X @ w - y) ** 2) + lam * np.abs(w).sum()


def lasso_reference(X, y, lam, iters=20000):
    """FISTA (accelerated proximal gradient) in float64, run far past convergence."""
    m = len(y)
    L = np.linalg.eigvalsh(X.T @ X / m).max()
    w = np.zeros(X.shape[1])
    z, t = w.copy(), 1.0
    for _ in range(iters):
        v = z - X.T @ (X @ z - y) / m / L
        w_next = np.sign(v) * np.maximum(np.abs(v) - lam / L, 0.0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = w_next + (t - 1) / t_next * (w_next - w)
        w, t = w_next, t_next
    # Optimality: 0 ∈ ∇smooth + lam·∂‖w‖₁.
    g = X.T @ (X @ w - y) / m
    assert np.all(np.abs(g[w == 0]) <= lam + 1e-9)
    assert np.allclose(g[w != 0], -lam * np.sign(w[w != 0]), atol=1e-9)
    return lasso_objective(X, y, lam, w)


def svm_problem(seed=0, m=100, d=10, lam=0.1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, d))
    y = np.sign(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(m))
    return X, y, lam


def svm_reference(X, y, lam, epochs=300):
    """Dual coordinate descent (Hsieh et al. 2008) in float64; certified by the duality gap."""
    m, d = X.shape
    C = 1.0 / (lam * m)
    a, w, Q = np.zeros(m), np.zeros(d), (X * X).sum(1)
    for _ in range(epochs):
        for i in range(m):
            G = y[i] * (w @ X[i]) - 1
            new = min(max(a[i] - G / Q[i], 0.0), C)
            w += (new - a[i]) * y[i] * X[i]
            a[i] = new
    primal = np.mean(np.maximum(0.0, 1 - y * (X @ w))) + lam / 2 * w @ w
    dual = lam * (a.sum() - 0.5 * w @ w)
    assert primal - dual < 1e-10 * primal
    return primal


@pytest.fixture(scope="module")
def problems():
    X, y, lam = lasso_problem()
    Xs, ys, lams = svm_problem()
    return {
        "lasso": (X, y, lam, lasso_reference(X, y, lam)),
        "svm": (Xs, ys, lams, svm_reference(Xs, ys, lams)),
    }


def make_run(problems, name, rule, lr, dtype=torch.float32, **extra):
    X, y, lam, f_star = problems[name]
    Xt, yt = torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)
    w = torch.zeros(X.shape[1], dtype=dtype, requires_grad=True)
    if name == "lasso":
        loss_fn = lambda: 0.5 * ((Xt @ w - yt) ** 2).mean()  # noqa: E731
        penalty = dict(l1=lam)
    else:
        loss_fn = lambda: torch.clamp(1 - yt * (Xt @ w), min=0).mean()  # noqa: E731
        penalty = dict(weight_decay=lam)
    opt = oxoptim.Subgradient([w], lr=lr, step_rule=rule, f_star=f_star if rule == "polyak" else None, **penalty, **extra)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return w, opt, closure, f_star


def steps_to_within(problems, name, rule, lr, max_steps, tol=0.01):
    w, opt, closure, f_star = make_run(problems, name, rule, lr)
    for s in range(max_steps):
        opt.step(closure)
        if opt.best_objective <= f_star * (1 + tol):
            return s + 1, opt
    return None, opt


# Steps to within 1% of f*, measured (float32 parameters): lasso sqrt 72,
# harmonic 36, polyak 16; svm sqrt 93, harmonic 81, polyak 7. Bounds leave margin.
CONVERGENCE = [
    ("lasso", "sqrt", 0.3, 400),
    ("lasso", "harmonic", 1.0, 400),
    ("lasso", "polyak", 1.0, 100),
    ("svm", "sqrt", 0.3, 400),
    ("svm", "harmonic", 1.0, 400),
    ("svm", "polyak", 1.0, 100),
]


@pytest.mark.parametrize("name,rule,lr,bound", CONVERGENCE)
def test_reaches_one_percent_of_optimum(problems, name, rule, lr, bound):
    steps, opt = steps_to_within(problems, name, rule, lr, bound)
    f_star = problems[name][3]
    assert steps is not None, f"{name}/{rule}: best {opt.best_objective} vs f* {f_star} after {bound} steps"
    print(f"{name} {rule} lr={lr}: within 1% of f*={f_star:.6f} after {steps} steps")
    # The best iterate is what restore_best() returns, and its objective is real (float64 check).
    w = opt.param_groups[0]["params"][0]
    opt.restore_best()
    X, y, lam, _ = problems[name]
    wn = w.detach().double().numpy()
    if name == "lasso":
        f = lasso_objective(X, y, lam, wn)
    else:
        f = np.mean(np.maximum(0, 1 - y * (X @ wn))) + lam / 2 * wn @ wn
    assert f <= f_star * 1.0101
    assert f == pytest.approx(opt.best_objective, rel=1e-5)


@pytest.mark.parametrize("name", ["lasso", "svm"])
def test_constant_step_oscillates_in_a_band_proportional_to_lr(problems, name):
    f_star = problems[name][3]
    ratios = []
    for lr in (0.2, 0.1, 0.05):
        w, opt, closure, _ = make_run(problems, name, "constant", lr)
        gaps = []
        for _ in range(2000):
            opt.step(closure)
            gaps.append(opt.last_objective - f_star)
        tail, prev = np.array(gaps[-500:]), np.array(gaps[-1000:-500])
        # Stationary (no convergence), strictly above f*, and not monotone (not a descent method).
        assert tail.min() > 0
        assert tail.mean() == pytest.approx(prev.mean(), rel=0.1)
        assert np.any(np.diff(tail) > 0) and np.any(np.diff(tail) < 0)
        ratios.append(tail.mean() / lr)
        print(f"{name} constant lr={lr}: mean gap over the tail {tail.mean():.3g} (gap/lr {ratios[-1]:.4g})")
    # Halving lr halves the band: gap/lr is the same constant within 25%.
    assert max(ratios) / min(ratios) < 1.25


def test_update_is_the_formula_and_native_matches_torch_fallback():
    torch.manual_seed(0)
    p = torch.randn(1000, dtype=torch.float64)
    p[::7] = 0.0
    g = torch.randn(1000, dtype=torch.float64)
    for maximize in (False, True):
        a = p.clone().requires_grad_()
        a.grad = g.clone()
        opt = oxoptim.Subgradient([a], lr=0.1, l1=0.05, weight_decay=0.2, maximize=maximize)
        opt.step()
        d = (-g if maximize else g) + 0.05 * torch.sign(p) + 0.2 * p
        torch.testing.assert_close(a.detach(), p - 0.1 * d, rtol=1e-14, atol=1e-15)


def test_step_rules_and_normalize():
    torch.manual_seed(1)
    for rule, expected in (("constant", [0.5, 0.5, 0.5]), ("sqrt", [0.5 / math.sqrt(t + 1) for t in range(3)]),
                           ("harmonic", [0.5 / (t + 1) for t in range(3)])):
        w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        opt = oxoptim.Subgradient([w], lr=0.5, step_rule=rule, normalize=True)
        for t in range(3):
            before = w.detach().clone()
            w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
            opt.step()
            moved = (before - w.detach()).norm().item()
            assert moved == pytest.approx(expected[t], rel=1e-12)


def test_polyak_needs_f_star_and_loss():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError):
        oxoptim.Subgradient([w], lr=1.0, step_rule="polyak")
    with pytest.raises(ValueError):
        oxoptim.Subgradient([w], lr=1.0, step_rule="bogus")
    opt = oxoptim.Subgradient([w], lr=1.0, step_rule="polyak", f_star=0.0)
    w.grad = torch.ones(3)
    with pytest.raises(RuntimeError):
        opt.step()
    # record_loss supplies it: f = |w|₁ = 3 at w = 1, g = 1 → Polyak step 3/3 lands on 0.
    opt.record_loss(3.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.zeros(3))


def _two_groups(second: dict, first: dict | None = None):
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = oxoptim.Subgradient([{"params": [a], **(first or {})}, {"params": [b], **second}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    return a, b, opt


def _counters(opt) -> tuple:
    return (opt.steps, opt.skipped_steps, opt.best_objective, opt.best_step, opt.last_objective, opt._pending_loss,
            {k: v.clone() for p in opt.state for k, v in opt.state[p].items()})


def _assert_counters(opt, before: tuple) -> None:
    after = _counters(opt)
    assert after[:6] == before[:6]
    assert after[6].keys() == before[6].keys() and all(torch.equal(after[6][k], before[6][k]) for k in after[6])


def test_a_group_step_rule_or_f_star_is_checked_when_the_group_is_added():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid step_rule 'Harmonic'"):
        oxoptim.Subgradient([{"params": [w], "step_rule": "Harmonic"}], lr=0.1)
    with pytest.raises(ValueError, match="needs f_star"):
        oxoptim.Subgradient([{"params": [w], "step_rule": "polyak"}], lr=0.1)
    with pytest.raises(ValueError, match="f_star to be a number"):
        oxoptim.Subgradient([{"params": [w], "step_rule": "polyak", "f_star": "zero"}], lr=0.1)
    opt = oxoptim.Subgradient([w], lr=0.1)
    with pytest.raises(ValueError, match="needs f_star"):
        opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "step_rule": "polyak"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("second, closure, error", [
    ({"step_rule": "polyak", "f_star": 0.0}, False, RuntimeError),  # Polyak without the loss
    ({"step_rule": "bogus"}, True, ValueError),  # set after construction
    ({"step_rule": "polyak", "f_star": None}, True, ValueError),
    ({"maximize": True, "step_rule": "polyak", "f_star": 0.0}, True, ValueError),  # Polyak's gap of one loss, min and max
    ({"lr": None}, True, TypeError),
    ({"sparse": True}, True, RuntimeError),
], ids=["polyak-no-loss", "bogus-rule", "polyak-no-f_star", "mixed-maximize-polyak", "lr-none", "sparse-grad"])
def test_a_refused_step_changes_no_group_counter_best_iterate_or_recorded_loss(second, closure, error):
    a, b, opt = _two_groups({}, {"skip_nonfinite": True})
    opt.step(lambda: torch.tensor(1.0))  # a best iterate exists
    a.grad, b.grad = torch.full((3,), math.nan), torch.ones(2)  # the first group would be skipped
    if second.pop("sparse", False):
        b.grad = torch.ones(2).to_sparse()
    opt.param_groups[1].update(second)
    if not closure:
        opt._pending_loss = None
    else:
        opt.record_loss(0.5)
    before, values = _counters(opt), (a.detach().clone(), b.detach().clone())
    with pytest.raises(error):
        opt.step(None)
    _assert_counters(opt, before)
    assert torch.equal(a.detach(), values[0]) and torch.equal(b.detach(), values[1])


def test_the_objective_follows_the_groups_maximize():
    p = torch.zeros(1, requires_grad=True)
    opt = oxoptim.Subgradient([{"params": [p], "maximize": True}], lr=1.0)
    assert opt.objective(2.0) == -2.0
    for loss in (0.0, 1.0, 2.0):  # maximizing: the best iterate is the one of the largest loss
        p.grad = torch.ones(1)
        opt.step(lambda: torch.tensor(loss))
    assert opt.best_objective == -2.0 and opt.restore_best() == -2.0 and p.item() == 2.0


def test_best_iterate_record_loss_and_state_dict_roundtrip():
    torch.manual_seed(2)
    w = torch.randn(10, requires_grad=True)
    opt = oxoptim.Subgradient([w], lr=0.3, step_rule="constant", l1=0.1, weight_decay=0.01)
    best_w, best_f = None, math.inf
    for _ in range(30):
        loss = (w - 1).abs().sum()
        f = loss.item() + 0.1 * w.detach().abs().sum().item() + 0.005 * w.detach().square().sum().item()
        if f < best_f:
            best_f, best_w = f, w.detach().clone()
        opt.zero_grad()
        loss.backward()
        opt.record_loss(loss)
        opt.step()
    assert opt.best_objective == pytest.approx(best_f, rel=1e-6)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["subgradient"]["steps"] == 30
    w2 = w.detach().clone().requires_grad_()
    opt2 = oxoptim.Subgradient([w2], lr=0.3, l1=0.1, weight_decay=0.01)
    opt2.load_state_dict(sd)
    assert opt2.best_objective == opt.best_objective and opt2.steps == 30 and opt2.best_step == opt.best_step
    assert opt2.restore_best() == opt.best_objective
    torch.testing.assert_close(w2.detach(), best_w)
    opt.restore_best()
    torch.testing.assert_close(w.detach(), best_w)


@given(n=st.integers(0, 300), threads=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_thread_count_and_dtype_paths(n, threads, dtype):
    torch.manual_seed(n)
    p = torch.randn(n).to(dtype)
    g = torch.randn(n).to(dtype)
    outs = []
    for t in (1, threads):
        a = p.clone().requires_grad_()
        a.grad = g.clone()
        old = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            oxoptim.Subgradient([a], lr=0.1, l1=0.01, normalize=True).step()
        finally:
            torch.set_num_threads(old)
        outs.append(a.detach())
    assert torch.equal(outs[0], outs[1])
    d = g.double() + 0.01 * torch.sign(p.double())
    expected = p.double() - 0.1 * d / d.norm() if n and d.norm() > 0 else p.double()
    if dtype == torch.bfloat16:  # float32 math inside, one rounding to bfloat16 at the end
        assert beyond_one_ulp_rate(outs[0], expected.to(dtype)) == 0.0
    else:
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(outs[0].double(), expected, **tol)


def test_skip_nonfinite_and_fallback_device_free_path():
    w = torch.ones(5, requires_grad=True)
    opt = oxoptim.Subgradient([w], lr=0.1, skip_nonfinite=True)
    w.grad = torch.tensor([1.0, float("nan"), 0, 0, 0])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(5)) and opt.skipped_steps == 1 and opt.steps == 0
    # A non-contiguous gradient takes torch's path with the same result.
    w2 = torch.ones(5, requires_grad=True)
    w2.grad = torch.arange(10.0)[::2]
    oxoptim.Subgradient([w2], lr=0.1).step()
    torch.testing.assert_close(w2.detach(), torch.ones(5) - 0.1 * torch.arange(10.0)[::2])


def test_a_best_objective_under_other_settings_is_not_kept():
    """A state dict loaded into a Subgradient whose objective differs (``l1``, ``weight_decay`` or
    ``maximize``: a continued training stage) keeps the best point but not its objective, which is
    not comparable under the new f: a later point replaces it, and restore_best() reports that
    point's objective under the current settings. A plain resume keeps the best objective."""

    def steps(opt: oxoptim.Subgradient, losses: list) -> None:
        for loss in losses:
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.full_like(p, 0.3)
            opt.record_loss(loss)
            opt.step()

    a = oxoptim.Subgradient([torch.linspace(-1, 1, 8).requires_grad_()], lr=0.01)
    steps(a, [1.0, 0.9, 0.8])
    saved = a.state_dict()
    same = oxoptim.Subgradient([torch.linspace(-1, 1, 8).requires_grad_()], lr=0.01)
    same.load_state_dict(saved)
    assert same.best_objective == a.best_objective and same.best_step == a.best_step
    b = oxoptim.Subgradient([torch.linspace(-1, 1, 8).requires_grad_()], lr=0.01, l1=1.0)
    b.load_state_dict({**saved, "param_groups": b.state_dict()["param_groups"]})
    assert b.steps == a.steps and b.best_objective == math.inf and b.last_objective is None
    steps(b, [0.8, 0.8, 0.8])
    assert b.restore_best() == pytest.approx(b.objective(0.8))


def test_groups_that_disagree_on_maximize_step_and_keep_no_best_iterate():
    """A min-max problem: each group follows its own direction; the objective has none."""
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = oxoptim.Subgradient([{"params": [a]}, {"params": [b], "maximize": True}], lr=0.5)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step(lambda: torch.tensor(1.0))
    assert a.tolist() == [0.5, 0.5] and b.tolist() == [1.5, 1.5]
    assert opt.best_step is None and opt.last_objective is None and opt.steps == 1
    with pytest.raises(ValueError, match="maximize differs"):
        opt.objective(1.0)
