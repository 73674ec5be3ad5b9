"""Helpers shared by the tests of the 8-bit optimizers (``test_lowbit.py``, ``test_lowbit_sgd.py``)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch


def snapshot(params: list, opt: torch.optim.Optimizer) -> list[Any]:
    """The parameters, every state tensor and the group settings, copied."""
    return ([p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()]
            + [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]])


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def refused_steps_change_nothing(params: list, opt: torch.optim.Optimizer, grad: Callable[[torch.Tensor, int], torch.Tensor], absmax: str) -> None:
    """``params[0]`` has 8-bit state, ``params[1]`` is a (7, 9) parameter: a sparse gradient on the
    second, and then a short ``absmax`` entry of the first, are refused before anything is written."""
    before = snapshot(params, opt)
    params[0].grad = grad(params[0], 7)
    params[1].grad = torch.zeros(7, 9).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert same(snapshot(params, opt), before)
    params[1].grad = grad(params[1], 7)
    saved = opt.state[params[0]][absmax]
    opt.state[params[0]][absmax] = saved[:-1]
    with pytest.raises(ValueError, match=absmax):
        opt.step()
    opt.state[params[0]][absmax] = saved
    assert same(snapshot(params, opt), before)


def stepped(params: list, opt: torch.optim.Optimizer, grad: Callable[[torch.Tensor, int], torch.Tensor], seeds: range) -> list[torch.Tensor]:
    """One step of ``opt`` per seed, each with fresh gradients ``grad(p, seed)``; returns the
    parameters and every state tensor after them, copied."""
    for s in seeds:
        for p in params:
            p.grad = grad(p, s)
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()]


def close_to_fp32_on_a_regression(fp32: Callable[..., torch.optim.Optimizer], eight: Callable[..., torch.optim.Optimizer], steps: int, **kw: Any) -> None:
    """A small MLP regression trained ``steps`` full-batch steps by each optimizer class (``kw`` its
    settings): both learn (loss under a tenth of y's variance) and the 8-bit one, whose 8192-element
    layer has 8-bit state, ends within 10% of the fp32 one's loss."""

    def train(cls: Callable[..., torch.optim.Optimizer]) -> float:
        torch.manual_seed(0)
        x = torch.randn(128, 16)
        y = torch.sin(x @ torch.randn(16, 1)) + 0.1 * x[:, :1]
        model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1))
        opt = cls(model.parameters(), **kw)
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert cls is not eight or any(v.dtype == torch.uint8 for entry in opt.state.values() for v in entry.values())
        return torch.nn.functional.mse_loss(model(x), y).item()

    reference, low = train(fp32), train(eight)
    start = 0.5  # about the variance of y: both must have learnt a lot
    assert reference < 0.1 * start and low < 0.1 * start
    assert low <= 1.1 * reference + 1e-4, (low, reference)
