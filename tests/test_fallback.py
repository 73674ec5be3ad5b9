"""Tensors the Rust path cannot take run torch's implementation; the drop-in never breaks."""

from __future__ import annotations

import inspect

import pytest
import torch

import oxoptim
from optimizers import TWIN_IDS, TWINS, Twin, assert_twin_matches


def _run_both(twin: Twin, make_params, steps=10, defaults=False, **hyper):
    """``defaults``: the reference with torch's defaults, as ours passes them on (not the for-loop)."""
    gen = torch.Generator().manual_seed(0)
    mine, ref = make_params(), make_params()
    ours = twin.make_ours(mine, **hyper)
    theirs = twin.make_theirs(ref, **hyper) if not defaults else twin.theirs(ref, **hyper)
    if defaults:
        twin.prepare(theirs)
    for _ in range(steps):
        for p, q in zip(mine, ref):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    return mine, ref


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_non_contiguous_parameters(twin: Twin) -> None:
    def make():
        torch.manual_seed(1)
        return [torch.randn(6, 4).t().requires_grad_(), torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()]

    mine, ref = _run_both(twin, make, lr=0.01)
    for a, b in zip(mine, ref):  # torch's own implementation ran: the very same numbers
        assert torch.equal(a, b)


# SGD steps complex parameters natively; torch's Adafactor refuses them (RuntimeError, ours too).
COMPLEX = [t for t in TWINS if t.name not in ("sgd", "adafactor")]


@pytest.mark.parametrize("twin", COMPLEX, ids=[t.name for t in COMPLEX])
def test_complex_parameters(twin: Twin) -> None:
    def make():
        torch.manual_seed(2)
        return [torch.randn(7, dtype=torch.complex64).requires_grad_()]

    if not twin.complex_params:  # the reference refuses them: ours refuses them the same way
        errors = []
        for build in (twin.make_ours, twin.make_theirs):
            params = make()
            opt = build(params, lr=0.01)
            params[0].grad = torch.ones_like(params[0])
            with pytest.raises(Exception) as caught:
                opt.step()
            errors.append((caught.type, str(caught.value)))
            assert torch.equal(params[0], make()[0])  # nothing written
        assert errors[0] == errors[1]
        return
    mine, ref = _run_both(twin, make, lr=0.01)
    assert torch.equal(mine[0], ref[0])


DIFFERENTIABLE = [t for t in TWINS if "differentiable" in inspect.signature(t.theirs).parameters]


def test_only_reference_packages_and_adafactor_lack_differentiable_mode() -> None:
    # torch's Adafactor has no `differentiable` argument either.
    assert {t.name for t in TWINS} - {t.name for t in DIFFERENTIABLE} == {t.name for t in TWINS if not t.torch_twin} | {"adafactor"}


@pytest.mark.parametrize("twin", DIFFERENTIABLE, ids=[t.name for t in DIFFERENTIABLE])
def test_differentiable_mode_backpropagates_through_the_step(twin: Twin) -> None:
    results = []
    for make in (twin.make_ours, twin.make_theirs):
        leaf = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
        p = leaf.clone()  # differentiable mode optimises non-leaf tensors
        opt = make([p], **twin.typical, differentiable=True)
        p.grad = (leaf * leaf).detach() + 0.5
        opt.step()
        (p * p).sum().backward()
        results.append((p.detach().clone(), leaf.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_sparse_gradients_follow_torch() -> None:
    emb_a = torch.nn.Embedding(10, 3, sparse=True)
    emb_b = torch.nn.Embedding(10, 3, sparse=True)
    emb_b.load_state_dict(emb_a.state_dict())
    idx = torch.tensor([1, 2, 2, 7])
    opt_a, opt_b = oxoptim.SGD(emb_a.parameters(), lr=0.1), torch.optim.SGD(emb_b.parameters(), lr=0.1)
    for emb, opt in ((emb_a, opt_a), (emb_b, opt_b)):
        emb(idx).sum().backward()
        opt.step()
    torch.testing.assert_close(emb_a.weight, emb_b.weight)
    emb_c = torch.nn.Embedding(10, 3, sparse=True)
    emb_c(idx).sum().backward()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        oxoptim.Adam(emb_c.parameters()).step()


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_tensor_lr(twin: Twin) -> None:
    def make():
        torch.manual_seed(4)
        return [torch.randn(9).requires_grad_()]

    mine, ref = _run_both(twin, make, lr=torch.tensor(0.01))
    assert_twin_matches(twin, mine[0].detach(), ref[0].detach())


@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_is_a_torch_optimizer_with_hooks(twin: Twin) -> None:
    torch.manual_seed(6)
    p = torch.randn(4, requires_grad=True)
    ref = p.detach().clone().requires_grad_()
    opt, twin_opt = twin.make_ours([p], lr=0.1), twin.make_theirs([ref], lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer) and (isinstance(opt, twin.theirs) or not twin.torch_twin)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    p.grad, ref.grad = torch.ones(4), torch.ones(4)
    opt.step()
    twin_opt.step()
    assert calls == ["pre", "post"]
    # An added group steps with its own lr, as in torch.
    extra = torch.randn(2, requires_grad=True)
    extra_ref = extra.detach().clone().requires_grad_()
    lr = 0.5 if twin.per_group_lr else 0.1  # prodigyopt: one lr (or 0) for all groups
    opt.add_param_group({"params": [extra], "lr": lr})
    twin_opt.add_param_group({"params": [extra_ref], "lr": lr})
    before = extra.detach().clone()
    for o, params in ((opt, [p, extra]), (twin_opt, [ref, extra_ref])):
        for t in params:
            t.grad = torch.full_like(t, 2.0)
        o.step()
    assert calls == ["pre", "post"] * 2
    assert not torch.equal(extra, before)
    assert_twin_matches(twin, extra.detach(), extra_ref.detach())
    assert_twin_matches(twin, p.detach(), ref.detach())
    opt.zero_grad()
    assert p.grad is None


def test_stepping_between_forward_and_backward_is_caught_like_torch() -> None:
    w = torch.randn(3, requires_grad=True)
    opt = oxoptim.SGD([w], lr=0.1)
    w.grad = torch.ones(3)
    loss = (w * w).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_validation_errors_are_torchs() -> None:
    p = [torch.randn(2, requires_grad=True)]
    for ours, theirs, kw in [
        (oxoptim.SGD, torch.optim.SGD, dict(lr=-1.0)),
        (oxoptim.SGD, torch.optim.SGD, dict(lr=0.1, nesterov=True)),
        (oxoptim.Adam, torch.optim.Adam, dict(betas=(1.0, 0.9))),
        (oxoptim.AdamW, torch.optim.AdamW, dict(eps=-1.0)),
        (oxoptim.Adam, torch.optim.Adam, dict(weight_decay=-0.1)),
    ]:
        with pytest.raises(ValueError) as a:
            ours(p, **kw)
        with pytest.raises(ValueError) as b:
            theirs(p, **kw)
        assert str(a.value) == str(b.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CI machine)")
@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def test_cuda_parameters_use_torchs_path(twin: Twin) -> None:
    def make():
        torch.manual_seed(5)
        return [torch.randn(33, device="cuda").requires_grad_(), torch.randn(4, 4, device="cuda").requires_grad_()]

    # torch's implementation runs with the arguments given (on CUDA its default is foreach):
    # the very same numbers as torch's class constructed alike.
    mine, ref = _run_both(twin, make, defaults=True, lr=0.01)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)
