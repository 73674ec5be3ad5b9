"""The table of optimizers under test (optax style): every equivalence,
state_dict and threading test draws from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import strategies as st

import oxoptim


@dataclass(frozen=True)
class Twin:
    """An oxoptim optimizer, its torch twin, a strategy for its hyper-parameters,
    and one setting that uses every state entry (what the shared tests construct)."""

    name: str
    ours: type
    theirs: type
    hyper: Callable[[], st.SearchStrategy[dict[str, Any]]]
    typical: dict[str, Any] = field(default_factory=dict)

    def make_theirs(self, params, **kw):
        # The for-loop implementation is torch's reference semantics.
        return self.theirs(params, foreach=False, **kw)


def _sgd_hyper() -> st.SearchStrategy[dict[str, Any]]:
    def build(lr, momentum, dampening, weight_decay, nesterov, maximize):
        if nesterov:
            momentum, dampening = max(momentum, 0.1), 0.0
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)

    return st.builds(
        build,
        lr=st.sampled_from([1e-3, 0.01, 0.1]),
        momentum=st.sampled_from([0.0, 0.5, 0.9]),
        dampening=st.sampled_from([0.0, 0.1]),
        weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
        nesterov=st.booleans(),
        maximize=st.booleans(),
    )


def _adam_hyper(default_wd: float) -> Callable[[], st.SearchStrategy[dict[str, Any]]]:
    def strategy() -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {
                "lr": st.sampled_from([1e-3, 0.01, 0.1]),
                "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
                "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
                "weight_decay": st.sampled_from([0.0, default_wd, 0.1]),
                "amsgrad": st.booleans(),
                "maximize": st.booleans(),
            }
        )

    return strategy


def _adam_with_decoupled() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda d, dec: {**d, "decoupled_weight_decay": dec}, _adam_hyper(0.0)(), st.booleans())


def _rmsprop_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01]),
            "alpha": st.sampled_from([0.99, 0.9, 0.5]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "momentum": st.sampled_from([0.0, 0.5, 0.9]),
            "centered": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _adagrad_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01, 0.1]),
            "lr_decay": st.sampled_from([0.0, 0.01, 0.5]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "initial_accumulator_value": st.sampled_from([0.0, 0.1]),
            "eps": st.sampled_from([1e-10, 1e-3]),
            "maximize": st.booleans(),
        }
    )


def _adamax_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([2e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _nadam_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([2e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "momentum_decay": st.sampled_from([4e-3, 0.0, 0.1]),
            "decoupled_weight_decay": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _radam_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # beta2 = 0.999 or 0.9 rectifies from the 6th step on, 0.5 never.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1e-3, 0.01, 0.1]),
            "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.9), (0.3, 0.5)]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "decoupled_weight_decay": st.booleans(),
            "maximize": st.booleans(),
        }
    )


def _adadelta_hyper() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([1.0, 0.1]),
            "rho": st.sampled_from([0.9, 0.5]),
            "eps": st.sampled_from([1e-6, 1e-3]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _asgd_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # t0 = 3: averaging starts within the tests' steps (mu < 1 from step 5).
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([0.01, 0.1]),
            "lambd": st.sampled_from([1e-4, 0.1]),
            "alpha": st.sampled_from([0.75, 0.5]),
            "t0": st.sampled_from([1e6, 3.0]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        }
    )


def _rprop_hyper() -> st.SearchStrategy[dict[str, Any]]:
    # Tight step-size bounds make the clamp bite within the tests' steps.
    return st.fixed_dictionaries(
        {
            "lr": st.sampled_from([0.01, 0.1]),
            "etas": st.sampled_from([(0.5, 1.2), (0.3, 1.7)]),
            "step_sizes": st.sampled_from([(1e-6, 50.0), (0.005, 0.05)]),
            "maximize": st.booleans(),
        }
    )


TWINS = [
    Twin("sgd", oxoptim.SGD, torch.optim.SGD, _sgd_hyper, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    Twin("adam", oxoptim.Adam, torch.optim.Adam, _adam_with_decoupled, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    Twin("adamw", oxoptim.AdamW, torch.optim.AdamW, _adam_hyper(1e-2), dict(lr=0.01, amsgrad=True)),
    Twin("rmsprop", oxoptim.RMSprop, torch.optim.RMSprop, _rmsprop_hyper, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    Twin("adagrad", oxoptim.Adagrad, torch.optim.Adagrad, _adagrad_hyper, dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    Twin("adamax", oxoptim.Adamax, torch.optim.Adamax, _adamax_hyper, dict(lr=0.01, weight_decay=0.01)),
    Twin("nadam", oxoptim.NAdam, torch.optim.NAdam, _nadam_hyper, dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)),
    Twin("radam", oxoptim.RAdam, torch.optim.RAdam, _radam_hyper, dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.01)),
    Twin("adadelta", oxoptim.Adadelta, torch.optim.Adadelta, _adadelta_hyper, dict(lr=0.5, weight_decay=0.01)),
    Twin("asgd", oxoptim.ASGD, torch.optim.ASGD, _asgd_hyper, dict(lr=0.05, lambd=0.01, t0=2.0, weight_decay=0.01)),
    Twin("rprop", oxoptim.Rprop, torch.optim.Rprop, _rprop_hyper, dict(lr=0.01, step_sizes=(1e-4, 0.05))),
]
TWIN_IDS = [t.name for t in TWINS]

# Shapes: 0-d, empty, every vector-tail length class, odd 2-D, a larger one.
SHAPES = st.sampled_from(
    [(), (0,), (1,), (3,), (7,), (8,), (15,), (16,), (17,), (31,), (33,), (63,), (64,), (65,), (67,), (3, 5), (4, 0, 2), (2, 3, 7), (257, 9)]
)

# torch's own consistency tolerances (torch.testing defaults).
TOLERANCE = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}


def state_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> Any:
    """``p``'s state as plain values, None when it has none (Adagrad creates state up front)."""
    if p not in opt.state:
        return None
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(generator: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    """Gives every list the same fresh random gradients (each param its own tensor)."""
    for tensors in zip(*param_lists):
        g = torch.randn(tensors[0].shape, generator=generator, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = g.clone()
