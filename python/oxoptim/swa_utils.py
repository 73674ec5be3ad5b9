"""``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``, ``update_bn``, ...),
re-exported so that ``oxoptim.swa_utils`` works wherever ``torch.optim``'s did."""

from torch.optim.swa_utils import *  # noqa: F401,F403
from torch.optim.swa_utils import __all__  # noqa: F401
