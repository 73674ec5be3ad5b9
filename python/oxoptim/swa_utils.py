"""``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``, ``update_bn``, ...),
re-exported so that ``oxoptim.swa_utils`` works wherever ``torch.optim``'s did."""

from torch.optim.swa_utils import *  # noqa: F401,F403
from torch.optim.swa_utils import __all__  # noqa: F401

import torch.optim.swa_utils as _torch_module


def __getattr__(name: str) -> object:
    """Every other name of torch's module too (``_LRScheduler``, helpers): scripts reach for them."""
    try:
        return getattr(_torch_module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
