"""``torch.optim.lr_scheduler``, re-exported so that ``oxoptim.lr_scheduler.StepLR``
(and ``from oxoptim.lr_scheduler import ...``) work wherever ``torch.optim``'s did.
oxoptim's optimizers are torch optimizers, so every scheduler drives them unchanged."""

from torch.optim.lr_scheduler import *  # noqa: F401,F403
from torch.optim.lr_scheduler import __all__  # noqa: F401

import torch.optim.lr_scheduler as _torch_module


def __getattr__(name: str) -> object:
    """Every other name of torch's module too (``_LRScheduler``, helpers): scripts reach for them."""
    try:
        return getattr(_torch_module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
