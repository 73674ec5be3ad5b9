"""The table of optimizers under test (optax style): every equivalence,
state_dict and threading test draws from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st

import oxoptim


@dataclass(frozen=True)
class Twin:
    """An oxoptim optimizer, its torch twin, and a strategy for its hyper-parameters."""

    name: str
    ours: type
    theirs: type
    hyper: Callable[[], st.SearchStrategy[dict[str, Any]]]

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


TWINS = [
    Twin("sgd", oxoptim.SGD, torch.optim.SGD, _sgd_hyper),
    Twin("adam", oxoptim.Adam, torch.optim.Adam, _adam_with_decoupled),
    Twin("adamw", oxoptim.AdamW, torch.optim.AdamW, _adam_hyper(1e-2)),
]
TWIN_IDS = [t.name for t in TWINS]

# Shapes: 0-d, empty, every vector-tail length class, odd 2-D, a larger one.
SHAPES = st.sampled_from(
    [(), (0,), (1,), (3,), (7,), (8,), (15,), (16,), (17,), (31,), (33,), (63,), (64,), (65,), (67,), (3, 5), (4, 0, 2), (2, 3, 7), (257, 9)]
)

# torch's own consistency tolerances (torch.testing defaults).
TOLERANCE = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(generator: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    """Gives every list the same fresh random gradients (each param its own tensor)."""
    for tensors in zip(*param_lists):
        g = torch.randn(tensors[0].shape, generator=generator, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = g.clone()


# SGD matches torch's for-loop bit for bit; Adam/AdamW within torch's consistency tolerances
# (their exp_avg_sq rounds differently, see test_equivalence.py).
BIT_EXACT = frozenset({"sgd"})


def assert_twin_matches(twin: Twin, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` (oxoptim) against ``expected`` (torch) as closely as ``twin`` is claimed to match."""
    if twin.name in BIT_EXACT:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        differ = int((actual != expected).sum()) if actual.numel() else 0
        assert torch.equal(actual, expected), f"{twin.name}: {differ} of {actual.numel()} elements differ from torch"
    else:
        torch.testing.assert_close(actual, expected, **TOLERANCE[actual.dtype])


class TorchFallback(Exception):
    """Raised when a test forbade torch's implementation and oxoptim used it."""


def forbid_torch_fallback(monkeypatch) -> None:
    """Makes oxoptim's use of torch's own step implementation an error, so that an equivalence
    test compares the Rust path with torch (and cannot pass by running torch against torch)."""
    import oxoptim.adam
    import oxoptim.sgd

    def forbidden(*args, **kwargs):
        raise TorchFallback("oxoptim fell back to torch's implementation")

    monkeypatch.setattr(oxoptim.sgd, "torch_sgd", forbidden)
    monkeypatch.setattr(oxoptim.adam, "torch_adam", forbidden)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """The float's bit pattern as an integer that counts representable values in order (±0 equal)."""
    bits = t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).long()
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def beyond_one_ulp_rate(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Fraction of elements more than one ulp (one representable step of their dtype) apart."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.numel() == 0:
        return 0.0
    return float(((_ordered(actual) - _ordered(expected)).abs() > 1).double().mean())
