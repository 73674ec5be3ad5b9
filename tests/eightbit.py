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
