"""``import oxoptim as optim`` stands in for ``torch.optim``: every optimizer
class torch has, with torch's signature (plus ``skip_nonfinite`` on the
Rust-backed twins), and torch's schedulers, SWA utilities and base class."""

from __future__ import annotations

import inspect
from typing import Optional

import pytest
import torch

import oxoptim
from oxoptim._lowprec import LowPrecisionWeights
from oxoptim._twin import TorchTwin

TORCH_OPTIMIZERS = sorted(
    name
    for name in torch.optim.__all__
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer
)
# Those documented in the README as running torch's implementation.
TORCH_IMPLEMENTATION = {"LBFGS", "SparseAdam", "Muon"}


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_every_torch_optimizer_is_here_with_torchs_signature(name: str) -> None:
    theirs = getattr(torch.optim, name)
    ours = getattr(oxoptim, name)
    assert name in oxoptim.__all__
    if name in TORCH_IMPLEMENTATION:
        assert ours is theirs
        return
    assert issubclass(ours, TorchTwin) and issubclass(ours, theirs)
    expected = list(inspect.signature(theirs).parameters.values())
    expected.append(inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool))
    expected += low_precision_options(ours)
    assert list(inspect.signature(ours).parameters.values()) == expected


def low_precision_options(ours: type) -> list:
    """The keyword-only options of twins that take bfloat16 weights (stochastic rounding or
    Kahan summation) and bfloat16 state."""
    if not issubclass(ours, LowPrecisionWeights):
        return []
    flags = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool) for k in ("bf16_stochastic_round", "kahan_sum")]
    return [*flags, inspect.Parameter("state_dtype", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[torch.dtype])]


# Beyond torch.optim: twins of reference packages on PyPI (see tests/optimizers.py).
BEYOND_TORCH = {"Lion": "lion_pytorch", "AdamWScheduleFree": "schedulefree", "SGDScheduleFree": "schedulefree", "Prodigy": "prodigyopt"}


def test_the_rust_table_backs_every_twin() -> None:
    twins = {name for name in TORCH_OPTIMIZERS if name not in TORCH_IMPLEMENTATION} | set(BEYOND_TORCH)
    kinds = {getattr(oxoptim, name).KIND for name in twins}
    assert kinds == {kind for kind, row in oxoptim._core.optimizers().items() if row["torch_twin"]}


@pytest.mark.parametrize("name", sorted(BEYOND_TORCH))
def test_optimizers_beyond_torch_have_their_reference_signature(name: str) -> None:
    theirs = getattr(__import__(BEYOND_TORCH[name]), name)
    ours = getattr(oxoptim, name)
    assert name in oxoptim.__all__ and issubclass(ours, TorchTwin)
    expected = list(inspect.signature(theirs).parameters.values())
    expected.append(inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool))
    expected += low_precision_options(ours)
    got = list(inspect.signature(ours).parameters.values())
    # Same names, kinds and defaults, in order (annotations are the reference's business).
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in expected]


def test_positional_arguments_land_where_torchs_do() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    # Adagrad's `foreach` is positional in torch; Rprop's `etas` is a pair.
    assert oxoptim.Adagrad(p, 0.5, 0.1, 0.2, 0.3, 1e-5, False).param_groups[0]["initial_accumulator_value"] == 0.3
    assert oxoptim.Rprop(p, 0.1, (0.4, 1.5)).param_groups[0]["etas"] == (0.4, 1.5)
    with pytest.raises(TypeError):
        oxoptim.SGD(p, 0.1, 0.9, 0.0, 0.0, False, False)  # maximize is keyword-only, as in torch


def test_schedulers_swa_and_base_class_are_torchs() -> None:
    assert oxoptim.Optimizer is torch.optim.Optimizer
    assert oxoptim.lr_scheduler.StepLR is torch.optim.lr_scheduler.StepLR
    assert set(oxoptim.lr_scheduler.__all__) == set(torch.optim.lr_scheduler.__all__)
    assert oxoptim.swa_utils.AveragedModel is torch.optim.swa_utils.AveragedModel
    from oxoptim.lr_scheduler import CosineAnnealingLR  # a real submodule, not just an attribute
    from oxoptim.swa_utils import SWALR

    assert CosineAnnealingLR is torch.optim.lr_scheduler.CosineAnnealingLR and SWALR is torch.optim.swa_utils.SWALR


def test_a_torch_training_script_runs_with_oxoptim_as_optim() -> None:
    """A torch.optim script with `import oxoptim as optim` instead: same losses."""

    def train(optim) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        opt = optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
        sched = optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        swa = optim.swa_utils.AveragedModel(model)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            swa.update_parameters(model)
            losses.append(loss.item())
        return losses

    torch.testing.assert_close(train(oxoptim), train(torch.optim))


def test_every_name_of_torch_optim_and_its_modules_resolves() -> None:
    """Every public name of ``torch.optim`` is in ``oxoptim``, and every name of its scheduler and SWA
    modules, private ones included (``class Warmup(optim.lr_scheduler._LRScheduler)`` is common),
    resolves to torch's own."""
    for name in torch.optim.__all__:
        assert name in oxoptim.__all__, name
        getattr(oxoptim, name)
    for module, theirs in ((oxoptim.lr_scheduler, torch.optim.lr_scheduler), (oxoptim.swa_utils, torch.optim.swa_utils)):
        for name in dir(theirs):
            if not name.startswith("__"):
                assert getattr(module, name) is getattr(theirs, name), name
        with pytest.raises(AttributeError, match="no attribute 'NoSuchScheduler'"):
            module.NoSuchScheduler  # noqa: B018
    assert oxoptim.lr_scheduler._LRScheduler is torch.optim.lr_scheduler._LRScheduler
