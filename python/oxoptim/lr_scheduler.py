"""``torch.optim.lr_scheduler``, re-exported so that ``oxoptim.lr_scheduler.StepLR``
(and ``from oxoptim.lr_scheduler import ...``) work wherever ``torch.optim``'s did.
oxoptim's optimizers are torch optimizers, so every scheduler drives them unchanged."""

from torch.optim.lr_scheduler import *  # noqa: F401,F403
from torch.optim.lr_scheduler import __all__  # noqa: F401
