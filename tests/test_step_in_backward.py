"""``oxoptim.step_in_backward``: the update inside backward is the ordinary loop, bit for bit
(parameters and state, every twin, several models), gradients are released during backward,
both accumulation modes, both clipping modes, refused combinations, schedulers and resume."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
import weakref
from typing import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optimizers import TWINS as ALL_TWINS
from optimizers import forbid_torch_fallback

import oxoptim
from oxoptim import ClipPerParameter, ClipPreviousNorm, step_in_backward

# Prodigy needs every gradient before any update: step_in_backward refuses it.
TWINS = [t for t in ALL_TWINS if t.in_backward]
TWIN_IDS = [t.name for t in TWINS]


class Toy(torch.nn.Module):
    """Small models with the cases that matter: ``mlp`` (two layers), ``tied`` (one weight
    used twice in the graph), ``partial`` (a parameter unused by the loss, a frozen one, a 0-d one)."""

    def __init__(self, kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kind = kind

        def param(*shape: int, requires_grad: bool = True) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype) * 0.5, requires_grad=requires_grad)

        self.w1 = param(12, 6)
        self.b1 = param(12)
        self.w2 = param(3, 12)
        if kind == "tied":
            self.tied = param(6, 6)
        if kind == "partial":
            self.unused = param(5)
            self.frozen = param(12, requires_grad=False)
            self.scale = param()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "tied":
            x = torch.tanh(x @ self.tied) @ self.tied.T
        h = torch.tanh(x @ self.w1.T + self.b1)
        if self.kind == "partial":
            h = h * self.scale + self.frozen
        return (h @ self.w2.T).square().mean()


MODELS = ["mlp", "tied", "partial"]


def batches(n: int, dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=gen, dtype=dtype) for _ in range(n)]


def make_optimizer(cls: Callable[..., torch.optim.Optimizer], model: Toy, hyper: dict, two_groups: bool) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if not two_groups:
        return cls(params, **hyper)
    lr = hyper.get("lr", 0.01)
    return cls([{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5}], **hyper)


def train(model: Toy, opt: torch.optim.Optimizer, xs: list[torch.Tensor], accumulate: int = 1, sib: dict | None = None, clip_each=None):
    """The ordinary loop (``sib`` None) or the same loop inside ``step_in_backward(opt, **sib)``."""
    iterations = [xs[i : i + accumulate] for i in range(0, len(xs), accumulate)]
    if sib is None:
        for micro in iterations:
            for x in micro:
                model(x).backward()
            if clip_each is not None:
                clip_each(model)
            opt.step()
            opt.zero_grad()
        return None
    with step_in_backward(opt, accumulate=accumulate, **sib) as context:
        for micro in iterations:
            for x in micro:
                model(x).backward()
            opt.step()
    return context


def assert_same_training(a: torch.nn.Module, opt_a: torch.optim.Optimizer, b: torch.nn.Module, opt_b: torch.optim.Optimizer,
                         same: Callable[[torch.Tensor, torch.Tensor], bool] = torch.equal) -> None:
    """Parameters, groups and state equal by ``same`` (tensors) and ``==`` (the rest)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert same(p, q), f"parameter {name} differs"
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, entry in sa["state"].items():
        assert entry.keys() == sb["state"][key].keys()
        for name, value in entry.items():
            other = sb["state"][key][name]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and same(value, other), f"state[{key}][{name!r}] differs"
            else:
                assert value == other, f"state[{key}][{name!r}] differs"


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@given(data=st.data())
def test_bit_identical_to_the_ordinary_loop(twin, data) -> None:
    hyper = data.draw(twin.hyper(), label="hyper")
    kind = data.draw(st.sampled_from(MODELS), label="model")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    two_groups = data.draw(st.booleans(), label="two_groups")
    sib = dict(bucket_numel=data.draw(st.sampled_from([0, 40, 1 << 16]), label="bucket_numel"))
    xs = batches(4, dtype)
    with pytest.MonkeyPatch.context() as mp:  # not the fixture: hypothesis reruns the body
        forbid_torch_fallback(mp)
        a, b = Toy(kind, dtype), Toy(kind, dtype)
        opt_a, opt_b = make_optimizer(twin.make_ours, a, hyper, two_groups), make_optimizer(twin.make_ours, b, hyper, two_groups)
        train(a, opt_a, xs)
        train(b, opt_b, xs, sib=sib)
    assert_same_training(a, opt_a, b, opt_b)


def test_each_gradient_is_released_as_soon_as_its_parameter_is_updated() -> None:
    model = Toy("tied")
    opt = oxoptim.AdamW(model.parameters(), lr=0.01)
    alive: list[weakref.ref] = []
    most_alive = 0

    def count(p: torch.Tensor) -> None:  # registered first: runs before the update hook
        nonlocal most_alive
        alive.append(weakref.ref(p.grad))
        most_alive = max(most_alive, sum(r() is not None for r in alive))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)
    with step_in_backward(opt, bucket_numel=0):
        for x in batches(3, torch.float32):
            alive.clear()
            model(x).backward()
            assert len(alive) == len(list(model.parameters()))
            assert all(p.grad is None for p in model.parameters())
            assert all(r() is None for r in alive), "a gradient outlived backward"
            opt.step()
    assert most_alive == 1, f"{most_alive} gradients were alive at once"


def test_a_bucket_holds_its_gradients_until_its_last_one_and_is_one_native_call(monkeypatch) -> None:
    model = Toy("mlp")
    opt = oxoptim.Adam(model.parameters(), lr=0.01)
    calls = []
    original = type(opt)._fast_step

    def counting(self, group, cache):
        calls.append(len(group["params"]))
        return original(self, group, cache)

    monkeypatch.setattr(type(opt), "_fast_step", counting)
    with step_in_backward(opt) as sib:  # the default bucket takes the whole toy model
        for x in batches(3, torch.float32):
            model(x).backward()
            opt.step()
    assert len(sib._buckets) == 1
    assert calls == [3, 3, 3]


def test_hooks_are_removed_on_exit_and_the_optimizer_steps_normally_again() -> None:
    model = Toy("mlp")
    opt = oxoptim.SGD(model.parameters(), lr=0.1)
    with step_in_backward(opt):
        model(batches(1, torch.float32)[0]).backward()
        opt.step()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    model(batches(1, torch.float32)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("accumulate", [2, 3])
def test_gradient_accumulation_is_the_ordinary_loop_with_summed_gradients(twin, accumulate) -> None:
    # "partial": its unused parameter never gets a gradient, its frozen one is never stepped.
    xs = batches(3 * accumulate, torch.float32)
    a, b = Toy("partial"), Toy("partial")
    opt_a, opt_b = twin.make_ours(a.parameters(), **twin.typical), twin.make_ours(b.parameters(), **twin.typical)
    train(a, opt_a, xs, accumulate)
    train(b, opt_b, xs, accumulate, sib=dict(accumulation="gradient"))
    assert_same_training(a, opt_a, b, opt_b)


def test_gradient_accumulation_with_a_parameter_missing_from_some_micro_batches() -> None:
    class Sometimes(Toy):
        def forward(self, x):
            loss = super().forward(x)
            return loss + self.unused.square().sum() if x[0, 0] > 0 else loss

    xs = batches(8, torch.float32, seed=3)
    assert len({bool(x[0, 0] > 0) for x in xs}) == 2
    a, b = Sometimes("partial"), Sometimes("partial")
    opt_a, opt_b = oxoptim.Adam(a.parameters(), lr=0.01), oxoptim.Adam(b.parameters(), lr=0.01)
    train(a, opt_a, xs, 4)
    train(b, opt_b, xs, 4, sib=dict(bucket_numel=0))
    assert_same_training(a, opt_a, b, opt_b)


def test_more_backward_passes_than_accumulate_is_an_error() -> None:
    model = Toy("mlp")
    opt = oxoptim.Adam(model.parameters(), lr=0.01)
    with step_in_backward(opt, accumulate=2):
        for x in batches(2, torch.float32):
            model(x).backward()
        with pytest.raises(RuntimeError, match="more than 2 gradient"):
            model(batches(1, torch.float32)[0]).backward()


def adam_accumulation_reference(model: Toy, xs, accumulate, lr, betas, eps, weight_decay, decoupled, maximize):
    """The documented maths of optimizer accumulation, in float64, parameter by parameter."""
    params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    t = 0
    b1, b2 = betas
    for start in range(0, len(xs), accumulate):
        for k, x in enumerate(xs[start : start + accumulate]):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(params[n].float())
            model.zero_grad()
            model(x).backward()
            t += 1
            last = k == accumulate - 1
            for n, p in model.named_parameters():
                g = p.grad.double()
                g = -g if maximize else g
                if last and weight_decay:
                    if decoupled:
                        params[n] = params[n] * (1 - lr * weight_decay)
                    else:
                        g = g + weight_decay * params[n]
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                if last:
                    mhat, vhat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
                    params[n] = params[n] - lr * mhat / (vhat.sqrt() + eps)
    return params


@given(
    accumulate=st.sampled_from([1, 2, 3]),
    lr=st.sampled_from([1e-3, 0.01]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    decoupled=st.booleans(),
    maximize=st.booleans(),
)
def test_optimizer_accumulation_follows_its_float64_maths(accumulate, lr, betas, eps, weight_decay, decoupled, maximize) -> None:
    xs = batches(3 * accumulate, torch.float32)
    model = Toy("mlp", torch.float32)
    cls = oxoptim.AdamW if decoupled else oxoptim.Adam
    opt = cls(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
    expected = adam_accumulation_reference(Toy("mlp", torch.float32), xs, accumulate, lr, betas, eps, weight_decay, decoupled, maximize)
    train(model, opt, xs, accumulate, sib=dict(accumulation="optimizer"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == len(xs)
        assert p.grad is None


@pytest.mark.parametrize("cls", [oxoptim.AdamW, oxoptim.Adam], ids=["adamw", "adam"])
@pytest.mark.parametrize("uses, accumulate", [((2,), 2), ((1,), 2), ((1, 3), 3), ((1, 2), 4)],
                         ids=["only-the-last", "only-the-first", "first-and-last-of-3", "two-of-4-then-step"])
def test_optimizer_accumulation_updates_a_parameter_that_misses_micro_batches(cls, uses, accumulate) -> None:
    """A parameter with fewer than K gradients absorbs each and is updated by step(), as an Adam
    step with its last gradient: torch's for-loop Adam on the same gradients, the earlier ones
    absorbed (float64 moments and parameter, exactly)."""
    always = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))
    sometimes = torch.nn.Parameter(torch.linspace(0.5, 2, 4, dtype=torch.float64))
    opt = cls([always, sometimes], lr=0.1, weight_decay=0.1, betas=(0.8, 0.9))
    grads = [torch.linspace(-0.3, 0.6, 4, dtype=torch.float64) * (k + 1) for k in range(accumulate)]
    micro_batches = max(uses) if max(uses) < accumulate else accumulate
    with step_in_backward(opt, accumulate=accumulate, accumulation="optimizer"):
        for k in range(1, micro_batches + 1):
            loss = (always * grads[k - 1]).sum() + ((sometimes * grads[k - 1]).sum() if k in uses else 0.0)
            loss.backward()
        opt.step()
    # the reference: moments absorbed by hand, then torch's Adam step with the last gradient
    ref = torch.nn.Parameter(torch.linspace(0.5, 2, 4, dtype=torch.float64))
    torch_cls = torch.optim.AdamW if cls is oxoptim.AdamW else torch.optim.Adam
    ref_opt = torch_cls([ref], lr=0.1, weight_decay=0.1, betas=(0.8, 0.9), foreach=False)
    ref.grad = torch.zeros_like(ref)
    ref_opt.step()  # makes the state
    with torch.no_grad():
        ref.copy_(torch.linspace(0.5, 2, 4, dtype=torch.float64))
        state = ref_opt.state[ref]
        state["step"].zero_()
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        for k in uses[:-1]:
            g = grads[k - 1]
            state["step"] += 1
            state["exp_avg"].lerp_(g, 0.2)
            state["exp_avg_sq"].mul_(0.9).addcmul_(g, g, value=0.1)
    ref.grad = grads[uses[-1] - 1].clone()
    if cls is oxoptim.Adam:  # coupled decay enters through g, which the last micro-batch's absorption left out
        ref_opt.param_groups[0]["weight_decay"] = 0.0
    ref_opt.step()
    assert float(opt.state[sometimes]["step"]) == len(uses)
    assert torch.equal(sometimes.detach(), ref.detach()), (sometimes, ref)
    assert sometimes.grad is None


@pytest.mark.parametrize("option", ["bf16_stochastic_round", "kahan_sum"])
def test_optimizer_accumulation_refuses_a_short_parameter_before_step_updates_anything(option) -> None:
    """A bf16_stochastic_round/kahan_sum group with a parameter that got fewer than K gradients is
    refused by step() before it updates the parameters backward left it (one whose bucket did not
    complete keeps its gradient and its state)."""
    gen = torch.Generator().manual_seed(0)
    full = torch.nn.Parameter(torch.randn(8, generator=gen).bfloat16())
    short = torch.nn.Parameter(torch.randn(8, generator=gen).bfloat16())
    opt = oxoptim.AdamW([full, short], lr=0.1, **{option: True})
    with step_in_backward(opt, accumulate=2, accumulation="optimizer"):  # one bucket: it never completes
        (full.float().sum() + short.float().sum()).backward()
        full.float().square().sum().backward()
        before = full.detach().clone(), {k: v.clone() for k, v in opt.state[full].items()}
        with pytest.raises(RuntimeError, match="fewer than accumulate"):
            opt.step()
        assert torch.equal(full.detach(), before[0])
        assert all(torch.equal(v, before[1][k]) for k, v in opt.state[full].items())
        assert full.grad is not None
        opt.zero_grad()


def test_optimizer_accumulation_absorbs_complex_parameters_as_real_views() -> None:
    z = torch.nn.Parameter(torch.tensor([0.1 + 2.0j, -1.0 + 0.5j], dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = oxoptim.Adam([z], lr=0.1), oxoptim.Adam([r], lr=0.1)
    target = torch.tensor([1.0 - 1.0j, 0.5 + 3.0j], dtype=torch.complex128)
    for opt, loss in ((opt_z, lambda: (z - target).abs().square().sum()),
                      (opt_r, lambda: (r - torch.view_as_real(target)).square().sum())):
        with step_in_backward(opt, accumulate=2, accumulation="optimizer"):
            for _ in range(2):
                loss().backward()
                loss().backward()
                opt.step()
    assert torch.isfinite(torch.view_as_real(z.detach())).all()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-12)
    assert (torch.view_as_real(opt_z.state[z]["exp_avg_sq"]) >= 0).all()


def test_optimizer_accumulation_of_one_micro_batch_is_the_ordinary_step() -> None:
    xs = batches(4, torch.float32)
    a, b = Toy("tied"), Toy("tied")
    opt_a, opt_b = oxoptim.AdamW(a.parameters(), lr=0.01), oxoptim.AdamW(b.parameters(), lr=0.01)
    train(a, opt_a, xs)
    train(b, opt_b, xs, sib=dict(accumulation="optimizer"))
    assert_same_training(a, opt_a, b, opt_b)


def test_optimizer_accumulation_matches_torch_optimi() -> None:
    optimi = pytest.importorskip("optimi", reason="torch-optimi is not installed (pip install --no-deps torch-optimi)")
    from optimi import prepare_for_gradient_release, remove_gradient_release

    accumulate, lr, betas, eps = 3, 0.01, (0.9, 0.99), 1e-6
    xs = batches(3 * accumulate, torch.float32)
    ours, theirs = Toy("mlp"), Toy("mlp")
    opt = oxoptim.Adam(ours.parameters(), lr=lr, betas=betas, eps=eps)
    train(ours, opt, xs, accumulate, sib=dict(accumulation="optimizer"))
    ref = optimi.Adam(theirs.parameters(), lr=lr, betas=betas, eps=eps, gradient_release=True, triton=False, foreach=False)
    prepare_for_gradient_release(theirs, ref)
    for i, x in enumerate(xs):
        ref.optimizer_accumulation = (i + 1) % accumulate != 0
        theirs(x).backward()
        if (i + 1) % accumulate == 0:
            ref.step()
            ref.zero_grad()
    remove_gradient_release(theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_per_parameter_is_the_ordinary_loop_clipping_each_parameter() -> None:
    def clip_each(model):
        for p in model.parameters():
            if p.grad is not None:
                oxoptim.clip_grad_norm_([p], 0.05)

    xs = batches(6, torch.float32)
    a, b = Toy("tied"), Toy("tied")
    opt_a, opt_b = oxoptim.Adam(a.parameters(), lr=0.01), oxoptim.Adam(b.parameters(), lr=0.01)
    train(a, opt_a, xs, 2, clip_each=clip_each)
    train(b, opt_b, xs, 2, sib=dict(clip=ClipPerParameter(0.05), bucket_numel=0))
    assert_same_training(a, opt_a, b, opt_b)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_clip_previous_norm_scales_by_the_previous_iterations_global_norm(norm_type) -> None:
    previous: list = [None]
    norms = []

    def clip_each(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type, foreach=False)
        norms.append(total)
        if previous[0] is not None:
            for g in grads:
                g.mul_(previous[0])
        previous[0] = torch.clamp(0.05 / (total + 1e-6), max=1.0)

    xs = batches(5, torch.float32)
    a, b = Toy("partial"), Toy("partial")
    opt_a, opt_b = oxoptim.SGD(a.parameters(), lr=0.1, momentum=0.9), oxoptim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train(a, opt_a, xs, clip_each=clip_each)
    sib = train(b, opt_b, xs, sib=dict(clip=ClipPreviousNorm(0.05, norm_type), bucket_numel=0))
    assert torch.equal(sib.grad_norm, norms[-1])
    assert float(norms[0]) > 0.05 * 2, "the test must clip"
    assert_same_training(a, opt_a, b, opt_b)


REFUSED = [
    ("a torch optimizer", lambda ps: torch.optim.Adam(ps), {}, TypeError, "Rust-backed oxoptim"),
    ("skip_nonfinite", lambda ps: oxoptim.Adam(ps, skip_nonfinite=True), {}, ValueError, "skip_nonfinite=True cannot be honoured"),
    ("a GradScaler", lambda ps: oxoptim.Adam(ps), {"grad_scaler": torch.amp.GradScaler("cpu")}, ValueError, "GradScaler cannot be honoured"),
    ("optimizer accumulation for SGD", lambda ps: oxoptim.SGD(ps, lr=0.1), {"accumulation": "optimizer"}, ValueError, "Adam and AdamW"),
    ("optimizer accumulation with amsgrad", lambda ps: oxoptim.Adam(ps, amsgrad=True), {"accumulation": "optimizer"}, ValueError, "amsgrad"),
    ("optimizer accumulation with bfloat16 state", lambda ps: oxoptim.AdamW(ps, state_dtype=torch.bfloat16), {"accumulation": "optimizer"},
     ValueError, "state_dtype"),
    ("previous norm with optimizer accumulation", lambda ps: oxoptim.Adam(ps), {"accumulation": "optimizer", "clip": ClipPreviousNorm(1.0)}, ValueError, "ClipPreviousNorm"),
    ("accumulate 0", lambda ps: oxoptim.Adam(ps), {"accumulate": 0}, ValueError, "positive int"),
    ("an unknown accumulation", lambda ps: oxoptim.Adam(ps), {"accumulation": "sum"}, ValueError, "'gradient' or 'optimizer'"),
    ("clip a number", lambda ps: oxoptim.Adam(ps), {"clip": 1.0}, TypeError, "clip must be"),
    ("clip max_norm 0", lambda ps: oxoptim.Adam(ps), {"clip": ClipPerParameter(0.0)}, ValueError, "positive and finite"),
    ("negative buckets", lambda ps: oxoptim.Adam(ps), {"bucket_numel": -1}, ValueError, "bucket_numel"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_combination_that_cannot_be_honoured_is_refused_at_entry(case) -> None:
    _, make, kwargs, error, message = case
    model = Toy("mlp")
    opt = make(model.parameters())
    with pytest.raises(error, match=message):
        with step_in_backward(opt, **kwargs):
            pytest.fail("entered")
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert "_oxoptim_step_in_backward" not in opt.__dict__


def test_a_disabled_grad_scaler_is_accepted() -> None:
    opt = oxoptim.Adam(Toy("mlp").parameters())
    with step_in_backward(opt, grad_scaler=torch.amp.GradScaler("cpu", enabled=False)):
        pass


def test_nested_contexts_on_one_optimizer_are_refused() -> None:
    opt = oxoptim.Adam(Toy("mlp").parameters())
    with step_in_backward(opt):
        with pytest.raises(RuntimeError, match="nested"):
            with step_in_backward(opt):
                pass


def test_lr_schedulers_see_ordinary_steps() -> None:
    xs = batches(6, torch.float32)
    results = []
    for sib in (None, {}):
        model = Toy("mlp")
        opt = oxoptim.AdamW(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=len(xs))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail
            if sib is None:
                for x in xs:
                    model(x).backward()
                    opt.step()
                    opt.zero_grad()
                    sched.step()
            else:
                with step_in_backward(opt):
                    for x in xs:
                        model(x).backward()
                        opt.step()
                        sched.step()
        results.append((model, opt, sched.get_last_lr()))
    (a, opt_a, lr_a), (b, opt_b, lr_b) = results
    assert lr_a == lr_b
    assert_same_training(a, opt_a, b, opt_b)


# Low-precision weights and state: bfloat16 models; stochastic rounding draws each parameter's
# bits from its position in the optimizer, so a bucket's call draws what the group's call would.
LOW_PRECISION = [
    ("adamw_sr", oxoptim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "bf16_stochastic_round": True}),
    ("sgd_momentum_sr", oxoptim.SGD, {"lr": 0.05, "momentum": 0.9, "bf16_stochastic_round": True}),
    ("adam_kahan", oxoptim.Adam, {"lr": 0.01, "kahan_sum": True}),
    ("adamw_bf16_state", oxoptim.AdamW, {"lr": 0.01, "state_dtype": torch.bfloat16}),
    ("adamw8bit", oxoptim.AdamW8bit, {"lr": 0.01, "min_8bit_size": 16}),
    ("adamw8bit_sr", oxoptim.AdamW8bit, {"lr": 0.01, "min_8bit_size": 16, "bf16_stochastic_round": True}),
    ("adam8bit_sr_mixed_state", oxoptim.Adam8bit, {"lr": 0.01, "min_8bit_size": 50, "bf16_stochastic_round": True}),
    ("sgd8bit_sr", oxoptim.SGD8bit, {"lr": 0.05, "momentum": 0.9, "min_8bit_size": 16, "bf16_stochastic_round": True}),
    ("sgd8bit_nesterov_mixed_state", oxoptim.SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "min_8bit_size": 50}),
]


@pytest.mark.parametrize("name, cls, hyper", LOW_PRECISION, ids=[c[0] for c in LOW_PRECISION])
@given(data=st.data())
def test_low_precision_weights_and_state_are_bit_identical_to_the_ordinary_loop(name, cls, hyper, data) -> None:
    kind = data.draw(st.sampled_from(MODELS), label="model")
    two_groups = data.draw(st.booleans(), label="two_groups")
    sib = dict(bucket_numel=data.draw(st.sampled_from([0, 40, 1 << 16]), label="bucket_numel"))
    xs = batches(4, torch.bfloat16)
    results = []
    for in_backward in (None, sib):
        torch.manual_seed(5)  # the same stochastic-rounding seeds
        model = Toy(kind, torch.bfloat16)
        opt = make_optimizer(cls, model, hyper, two_groups)
        train(model, opt, xs, sib=in_backward)
        results.append((model, opt))
    (a, opt_a), (b, opt_b) = results
    assert_same_training(a, opt_a, b, opt_b)
    if "8bit" in name:
        assert any(v.dtype == torch.uint8 for entry in opt_a.state.values() for v in entry.values())


@pytest.mark.parametrize("name, cls, hyper", LOW_PRECISION, ids=[c[0] for c in LOW_PRECISION])
def test_low_precision_resume_from_a_checkpoint_is_bit_identical(name, cls, hyper) -> None:
    xs = batches(7, torch.bfloat16)
    torch.manual_seed(5)
    straight = Toy("partial", torch.bfloat16)
    opt = cls(straight.parameters(), **hyper)
    train(straight, opt, xs, sib={})
    torch.manual_seed(5)
    first = Toy("partial", torch.bfloat16)
    opt_first = cls(first.parameters(), **hyper)
    train(first, opt_first, xs[:4], sib={})
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = Toy("partial", torch.bfloat16, seed=99)
    resumed.load_state_dict(saved["model"])
    opt_resumed = cls(resumed.parameters(), **hyper)  # another seed until the checkpoint loads
    opt_resumed.load_state_dict(saved["optimizer"])
    train(resumed, opt_resumed, xs[4:], sib={})
    assert_same_training(straight, opt, resumed, opt_resumed)


def test_optimizer_accumulation_is_refused_for_8bit_state() -> None:
    opt = oxoptim.AdamW8bit(Toy("mlp").parameters(), lr=0.01)
    with pytest.raises(ValueError, match="accumulation='optimizer' is defined for Adam and AdamW, not AdamW8bit"):
        step_in_backward(opt, accumulate=2, accumulation="optimizer")


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_resume_from_a_checkpoint_is_bit_identical(twin) -> None:
    xs = batches(7, torch.float32)
    straight = Toy("partial")
    opt = twin.make_ours(straight.parameters(), **twin.typical)
    train(straight, opt, xs, sib={})

    first = Toy("partial")
    opt_first = twin.make_ours(first.parameters(), **twin.typical)
    train(first, opt_first, xs[:4], sib={})
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = Toy("partial", seed=99)  # other weights until the checkpoint loads
    resumed.load_state_dict(saved["model"])
    opt_resumed = twin.make_ours(resumed.parameters(), **twin.typical)
    opt_resumed.load_state_dict(saved["optimizer"])
    train(resumed, opt_resumed, xs[4:], sib={})
    assert_same_training(straight, opt, resumed, opt_resumed)



RESUME_CHILD = """
import sys, torch, oxoptim
sys.path.insert(0, sys.argv[1])
from test_step_in_backward import Toy, batches, train
saved = torch.load(sys.argv[2])
model = Toy("tied", seed=99)
model.load_state_dict(saved["model"])
opt = oxoptim.AdamW(model.parameters(), lr=0.01, amsgrad=True)
opt.load_state_dict(saved["optimizer"])
train(model, opt, batches(7, torch.float32)[4:], sib={})
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, sys.argv[2])
"""


def test_resume_in_a_new_process_is_bit_identical(tmp_path) -> None:
    import os
    import subprocess
    import sys

    xs = batches(7, torch.float32)
    straight = Toy("tied")
    opt = oxoptim.AdamW(straight.parameters(), lr=0.01, amsgrad=True)
    train(straight, opt, xs, sib={})
    first = Toy("tied")
    opt_first = oxoptim.AdamW(first.parameters(), lr=0.01, amsgrad=True)
    train(first, opt_first, xs[:4], sib={})
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, path)
    subprocess.run([sys.executable, "-c", RESUME_CHILD, os.path.dirname(__file__), str(path)], check=True)
    resumed = torch.load(path)
    for name, p in straight.state_dict().items():
        assert torch.equal(p, resumed["model"][name]), name
    for key, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, resumed["optimizer"]["state"][key][name]), f"state[{key}][{name!r}]"


def test_a_context_entered_again_and_after_an_error_trains_as_the_ordinary_loop() -> None:
    xs = batches(6, torch.float32)
    a, b = Toy("mlp"), Toy("mlp")
    opt_a, opt_b = oxoptim.RMSprop(a.parameters(), lr=0.01), oxoptim.RMSprop(b.parameters(), lr=0.01)
    train(a, opt_a, xs)
    context = step_in_backward(opt_b, bucket_numel=1 << 20)  # one bucket
    for x in xs[:3]:
        with context:
            b(x).backward()
            opt_b.step()
    with pytest.raises(RuntimeError, match="more than 1"):
        with context:  # the bucket never completes: nothing is updated
            b.w2.square().sum().backward()
            b.w2.square().sum().backward()
    b.zero_grad()
    with context:
        for x in xs[3:]:
            b(x).backward()
            opt_b.step()
    assert_same_training(a, opt_a, b, opt_b)


def test_overlap_on_a_worker_thread_is_refused() -> None:
    """A Python thread running during backward crashed the process inside torch (garbage
    collection on it traversed autograd state backward was changing): refused at entry."""
    opt = oxoptim.Adam(Toy("mlp").parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"overlap=True\) is refused"):
        step_in_backward(opt, overlap=True)
    assert "_oxoptim_step_in_backward" not in opt.__dict__


def test_an_error_in_a_bucket_update_is_raised_by_backward(monkeypatch) -> None:
    model = Toy("mlp")
    opt = oxoptim.Adam(model.parameters(), lr=0.01)

    def failing(self, group, cache):
        raise ValueError("kernel refused")

    monkeypatch.setattr(type(opt), "_fast_step", failing)
    with pytest.raises(ValueError, match="kernel refused"):
        with step_in_backward(opt, bucket_numel=0):
            model(batches(1, torch.float32)[0]).backward()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # removed on the way out


@pytest.mark.parametrize("cls, hyper", [(oxoptim.AdamW, {"lr": 0.01, "bf16_stochastic_round": True}),
                                        (oxoptim.AdamW8bit, {"lr": 0.01, "min_8bit_size": 16, "bf16_stochastic_round": True})],
                         ids=["adamw_sr", "adamw8bit_sr"])
def test_a_checkpoint_loaded_inside_the_context_is_the_one_trained_on(cls, hyper) -> None:
    """torch's load_state_dict makes new group dicts: the buckets must step with them (their lr,
    as a scheduler sets it, and their stochastic-rounding count), not with the groups of entry."""
    xs = batches(6, torch.bfloat16)
    results = []
    for in_backward in (False, True):
        torch.manual_seed(5)
        model = Toy("mlp", torch.bfloat16)
        opt = cls(model.parameters(), **hyper)
        context = step_in_backward(opt, bucket_numel=0) if in_backward else contextlib.nullcontext()
        with context:
            for i, x in enumerate(xs):
                model(x).backward()
                opt.step()
                opt.zero_grad()
                if i == 1:
                    saved = copy.deepcopy(opt.state_dict())
                if i == 3:  # roll back the optimizer to iteration 1's state, then decay the lr
                    opt.load_state_dict(copy.deepcopy(saved))
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * group["lr"]
        results.append((model, opt))
    (a, opt_a), (b, opt_b) = results
    assert_same_training(a, opt_a, b, opt_b)


# -- what the ordinary step refuses or hands to torch, decided for the whole iteration -------------


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_untouched(model: torch.nn.Module, opt: torch.optim.Optimizer, before: tuple) -> None:
    params, state = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"] and now["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        assert all(torch.equal(v, now["state"][key][k]) if torch.is_tensor(v) else v == now["state"][key][k] for k, v in entry.items())


def _bf16_channels_last_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    return model.to(torch.bfloat16, memory_format=torch.channels_last)


def _float_conv() -> torch.nn.Module:
    return _bf16_channels_last_conv().float().to(memory_format=torch.contiguous_format)


def _half_then_float() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16).half(), torch.nn.Linear(16, 16))


def _conv_loss(model: torch.nn.Module) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return model(torch.randn(2, 3, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)).float().square().sum()


def _stepped_once(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: Callable) -> torch.optim.Optimizer:
    """``opt`` after one ordinary step of ``loss(model)`` (its state made)."""
    loss(model).backward()
    opt.step()
    opt.zero_grad()
    return opt


# (case, model, optimizer, a change after entry, the loss, the error, its message)
REFUSED_IN_BACKWARD = [
    ("schedule-free in eval mode", _float_conv, lambda m: oxoptim.AdamWScheduleFree(m.parameters(), lr=0.1), lambda opt: opt.eval(),
     _conv_loss, Exception, "not in train mode"),
    ("stochastic rounding of a channels-last weight", _bf16_channels_last_conv,
     lambda m: oxoptim.AdamW(m.parameters(), lr=0.1, bf16_stochastic_round=True), None, _conv_loss, ValueError, "native path only"),
    ("8-bit state of a float16 weight", _half_then_float, lambda m: oxoptim.AdamW8bit(m.parameters(), lr=0.1, min_8bit_size=16), None,
     lambda m: m[1](m[0](torch.randn(2, 16).half()).float()).sum(), ValueError, "8-bit state needs"),
    ("skip_nonfinite set after entry", _float_conv, lambda m: oxoptim.AdamW(m.parameters(), lr=0.1),
     lambda opt: opt.param_groups[0].update(skip_nonfinite=True), _conv_loss, ValueError, "set after step_in_backward was entered"),
    # The first layer's counter, whose update comes last in backward (bias_correction1 = 1 - beta1**0 = 0).
    *((f"a step counter Adam cannot take ({name})", _float_conv, lambda m, make=make: _stepped_once(make(m), m, _conv_loss),
       lambda opt: opt.state[opt.param_groups[0]["params"][0]]["step"].fill_(-1.0), _conv_loss, ZeroDivisionError, "float division by zero")
      for name, make in [("8-bit state", lambda m: oxoptim.AdamW8bit(m.parameters(), lr=0.1, min_8bit_size=16)),
                         ("8-bit optimizer, fp32 state", lambda m: oxoptim.AdamW8bit(m.parameters(), lr=0.1, min_8bit_size=10**6)),
                         ("fp32 twin", lambda m: oxoptim.AdamW(m.parameters(), lr=0.1)),
                         ("bfloat16 state of float32 weights", lambda m: oxoptim.AdamW(m.parameters(), lr=0.1, state_dtype=torch.bfloat16))]),
    # A loaded integer counter: the kernels decline it and torch's path raises, after earlier buckets.
    ("an int64 step counter Adam cannot take", _float_conv,
     lambda m: _stepped_once(oxoptim.AdamW(m.parameters(), lr=0.1), m, _conv_loss),
     lambda opt: opt.state[opt.param_groups[0]["params"][0]].update(step=torch.tensor(-1, dtype=torch.int64)),
     _conv_loss, ZeroDivisionError, "float division by zero"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_IN_BACKWARD, ids=[c[0] for c in REFUSED_IN_BACKWARD])
def test_what_the_step_refuses_is_refused_before_backward_updates_anything(case) -> None:
    """Refusals the ordinary step makes before writing anything are made before the first update of
    the iteration, not at the bucket of the parameter concerned (after earlier buckets were updated)."""
    _, make_model, make_opt, after_entry, loss, error, message = case
    model = make_model()
    opt = make_opt(model)
    if isinstance(opt, oxoptim.AdamWScheduleFree):
        opt.train()
    with step_in_backward(opt, bucket_numel=0):
        if after_entry is not None:
            after_entry(opt)
        before = _snapshot(model, opt)
        with pytest.raises(error, match=message):
            loss(model).backward()
        _assert_untouched(model, opt, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_the_ordinary_step_hands_to_torch_is_handed_whole(dtype) -> None:
    """One channels-last weight sends the ordinary step's whole group to torch's implementation;
    inside backward every bucket of that group goes there too, so results stay bit-identical."""
    models = [_bf16_channels_last_conv().to(dtype) for _ in range(2)]
    opts = [oxoptim.AdamW(m.parameters(), lr=0.01) for m in models]
    xs = [torch.randn(2, 3, 8, 8, dtype=dtype).to(memory_format=torch.channels_last) for _ in range(3)]
    for x in xs:
        models[0](x).float().square().sum().backward()
        opts[0].step()
        opts[0].zero_grad()
    with step_in_backward(opts[1], bucket_numel=0):
        for x in xs:
            models[1](x).float().square().sum().backward()
            opts[1].step()
    assert_same_training(models[0], opts[0], models[1], opts[1])


@pytest.mark.parametrize("bucket_numel", [0, 1 << 16])
def test_adafactor_resolves_eps1_from_the_group_not_the_bucket(bucket_numel) -> None:
    """``eps=(None, ...)``: torch takes eps1 from the group's first parameter (float32 here); a bucket
    starting at the bfloat16 weight must still use it (tiny gradients, where the eps1 clamps act)."""
    def run(in_backward: bool) -> tuple:
        torch.manual_seed(0)
        w1, w2 = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
        opt = oxoptim.Adafactor([w1, w2], lr=0.01)
        x = torch.randn(3, 4)
        context = step_in_backward(opt, bucket_numel=bucket_numel) if in_backward else contextlib.nullcontext()
        with context:
            for _ in range(3):
                ((x @ w1).bfloat16() @ w2).float().square().sum().mul(1e-6).backward()
                opt.step()
                opt.zero_grad()
        return torch.nn.ParameterList([w1, w2]), opt

    assert_same_training(*run(False), *run(True))


class _FailingIdentity(torch.autograd.Function):
    fail = False

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        if _FailingIdentity.fail:
            raise RuntimeError("simulated failure in backward")
        return g


def test_zero_grad_after_a_failed_backward_starts_a_new_iteration() -> None:
    """A backward that raised (the batch skipped with ``zero_grad()``) does not poison the context;
    what it had already updated (the layer after the failing node) stays updated."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = oxoptim.Adam([*first.parameters(), *second.parameters()], lr=0.1)
    with step_in_backward(opt, bucket_numel=0):
        for i in range(4):
            _FailingIdentity.fail = i == 1
            try:
                second(_FailingIdentity.apply(first(torch.randn(2, 4)))).sum().backward()
            except RuntimeError:
                opt.zero_grad()
                continue
            opt.step()
    _FailingIdentity.fail = False
    steps = [int(opt.state[p]["step"]) for p in [*first.parameters(), *second.parameters()]]
    assert steps == [3, 3, 4, 4]


def test_a_parameter_listed_twice_is_refused_at_entry() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = oxoptim.SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        with step_in_backward(opt):
            pytest.fail("entered")
    assert not w._post_accumulate_grad_hooks
