"""The training layer takes every optimizer of the namespace by name."""

from __future__ import annotations

import pytest
import torch

import oxoptim
from oxoptim.training.stages import OPTIMIZERS, Stage, build_optimizer


# Arguments an optimizer has no default for (SGD8bit: momentum; its default 0 keeps no state to quantise).
REQUIRED = {"sgd8bit": {"momentum": 0.9}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_name_builds_the_oxoptim_class_and_steps(name: str) -> None:
    model = torch.nn.Linear(4, 2)
    stage = Stage("s", optimizer=name, epochs=1, lr=0.01, **REQUIRED.get(name, {}))
    opt = build_optimizer(stage, model.parameters())
    assert type(opt) is getattr(oxoptim, OPTIMIZERS[name])
    if hasattr(opt, "train"):  # Schedule-Free: what a phase does before its first step
        opt.train()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_rust_backed_optimizers_are_all_reachable_by_name() -> None:
    from oxoptim._twin import TorchTwin

    twins = {name for name in oxoptim.__all__ if isinstance(getattr(oxoptim, name), type) and issubclass(getattr(oxoptim, name), TorchTwin)}
    assert twins <= set(OPTIMIZERS.values())


def test_an_optimizer_that_refuses_its_settings_stops_the_stage_before_training() -> None:
    with pytest.raises(ValueError, match=r"stage 's': sgd8bit\(.*\): SGD without momentum is not supported"):
        Stage("s", optimizer="sgd8bit", epochs=1, lr=0.01)


def test_a_release_rows_stage_of_sgd8bit_validates_with_weights_it_can_release() -> None:
    """SGD8bit releases the rows of weights with 8-bit state only: the stage's check probes with one."""
    Stage("s", optimizer="sgd8bit", epochs=1, momentum=0.9, step_in_backward=True, release_rows=True)
    with pytest.raises(ValueError, match="8-bit state only"):
        Stage("s", optimizer="sgd8bit", epochs=1, momentum=0.9, min_8bit_size=10**9, step_in_backward=True, release_rows=True)
